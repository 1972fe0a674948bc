"""Site-level differential privacy on uploaded probabilities, and its per-run accounting.

Mechanism (policy ``[dp]``): the site's probabilities on the selected synthetic samples are turned
back into logits, each sample's logit map is clipped to L2 norm ``clip``, Gaussian noise with
standard deviation ``noise-multiplier x sensitivity`` is added, and the result goes through the
sigmoid again before the usual encoding (sigmoid and quantisation are post-processing).

Unit of privacy: the site's whole private dataset. The site model is a function of all its data,
so changing the data may move each clipped logit map anywhere in the ball of radius ``clip``:
the L2 sensitivity of one upload of N samples is ``2 x clip x sqrt(N)``. This is site-level DP, the
guarantee that an observer of the uploads learns little about *which* data the site holds; it is
strong, and it costs utility accordingly (see docs/security.md).

Accounting: each upload is one Gaussian mechanism (sampling rate 1); opacus' RDP accountant composes
them over the run. The ledger (``privacy.json`` in the site's state folder for the run) lists every
release and the ε spent at the policy's δ; an upload that would take ε past ``max-epsilon`` is refused.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path

import torch
from opacus.accountants import RDPAccountant

from client_app.policy import LogitDP, PolicyViolation
from common.fileio import atomic_write_text


def sensitivity(dp: LogitDP, n: int) -> float:
    return 2.0 * dp.clip * math.sqrt(n)


def privatize_probs(probs: torch.Tensor, dp: LogitDP, generator: torch.Generator) -> torch.Tensor:
    """Clip-and-noise ``probs`` (N,1,S,S) in [0,1]; returns probabilities in [0,1]."""
    eps = 1e-6
    logits = torch.logit(probs.float().clamp(eps, 1 - eps))
    flat = logits.reshape(len(logits), -1)
    norms = flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
    clipped = flat * torch.clamp(dp.clip / norms, max=1.0)
    std = dp.noise_multiplier * sensitivity(dp, len(probs))
    noisy = clipped + torch.randn(clipped.shape, generator=generator) * std
    return torch.sigmoid(noisy).reshape(probs.shape)


def epsilon(releases: list[float], delta: float) -> float:
    """ε after the Gaussian releases with these noise multipliers (RDP accountant, sampling rate 1)."""
    if not releases:
        return 0.0
    acc = RDPAccountant()
    by_z: dict[float, int] = {}
    for z in releases:
        by_z[z] = by_z.get(z, 0) + 1
    acc.history = [(z, 1.0, k) for z, k in by_z.items()]
    return float(acc.get_epsilon(delta=delta))


class PrivacyLedger:
    """The DP releases of one site in one run (``privacy.json``), written atomically."""

    def __init__(self, path: Path):
        self.path = path
        self.data = (
            json.loads(path.read_text())
            if path.is_file()
            else {"mechanism": "gaussian", "unit": "site dataset", "releases": []}
        )

    @property
    def noise_multipliers(self) -> list[float]:
        return [float(r["noise_multiplier"]) for r in self.data["releases"]]

    def charge(self, dp: LogitDP, server_round: int, n: int) -> float:
        """Account for one more release (raise :class:`PolicyViolation` if it would pass the cap)
        and return the run's ε after it."""
        eps_after = epsilon([*self.noise_multipliers, dp.noise_multiplier], dp.delta)
        if dp.max_epsilon and eps_after > dp.max_epsilon:
            raise PolicyViolation(
                "dp.max-epsilon",
                f"this upload would spend ε={eps_after:.3g} (δ={dp.delta:g}) in this run, over the cap "
                f"{dp.max_epsilon:g}; {len(self.data['releases'])} upload(s) were made",
            )
        self.data["releases"].append(
            {
                "time": datetime.now(UTC).isoformat(timespec="seconds"),
                "round": server_round,
                "n": n,
                "clip": dp.clip,
                "noise_multiplier": dp.noise_multiplier,
                "sensitivity": sensitivity(dp, n),
            }
        )
        self.data.update(delta=dp.delta, epsilon=eps_after)
        atomic_write_text(self.path, json.dumps(self.data, indent=2) + "\n")
        return eps_after
