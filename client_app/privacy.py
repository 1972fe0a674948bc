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

Accounting belongs to the site, not to a run: one ledger per site state folder
(``<state-dir>/privacy-ledger.json``), across every run, run id and state key, so a coordinator that
starts a new run (or sends a new state key) does not get a fresh budget. It holds every release of
probabilities (each one Gaussian mechanism at sampling rate 1, composed with opacus' RDP accountant
at the policy's δ) and every DP-SGD generator training (its ε and δ from opacus). The site's total
is the RDP ε of all probability releases plus the generators' ε (basic composition: ε and δ add).
``[dp] max-epsilon`` caps that total: a release or a generator upload that would pass it is refused,
and nothing more leaves under DP once the budget is spent.

Signal against noise: the noise std per logit is ``noise-multiplier x 2 x clip x sqrt(N)`` while a
clipped map has norm at most ``clip`` spread over S x S logits, so per sample the signal-to-noise
ratio of the norms is at most ``1 / (2 z S sqrt(N))``: 0.0014 at z = 1, S = 32, N = 128. Site-level
DP on every round's answers at any useful ε destroys the signal (docs/security.md says so plainly).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from datetime import UTC, datetime
from pathlib import Path

import torch
from opacus.accountants import RDPAccountant

from client_app.policy import LogitDP, PolicyViolation
from common.config import ConfigError
from common.fileio import atomic_write_text, private_mkdir


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
    for z in sorted(releases):  # opacus merges consecutive equal steps: one history entry per z
        acc.step(noise_multiplier=z, sample_rate=1.0)
    return float(acc.get_epsilon(delta=delta))


LEDGER_FILE = "privacy-ledger.json"


class PrivacyLedger:
    """The site's DP releases over every run (``privacy-ledger.json`` in its state folder), read,
    charged and written under a lock (ClientApp processes of one site may overlap)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.data = self._read()

    def _read(self) -> dict:
        empty = {"mechanism": "gaussian", "unit": "site dataset", "releases": [], "generators": []}
        if not self.path.is_file():
            return empty
        try:
            data = json.loads(self.path.read_text())
            assert isinstance(data.get("releases"), list) and isinstance(data.get("generators", []), list)
        except (OSError, ValueError, AssertionError, AttributeError):
            # never start over silently: a damaged ledger would hand out a fresh budget
            raise ConfigError(
                f"the privacy ledger {self.path} is damaged; no DP release is made until it is repaired"
            ) from None
        data.setdefault("generators", [])
        return data

    @property
    def noise_multipliers(self) -> list[float]:
        return [float(r["noise_multiplier"]) for r in self.data["releases"]]

    def total(self, delta: float, extra_release: float | None = None, extra_generator: float = 0.0) -> float:
        """The site's total ε: RDP over the probability releases (plus one more at noise multiplier
        ``extra_release``) at ``delta``, plus every generator's ε (plus ``extra_generator``)."""
        z = self.noise_multipliers + ([extra_release] if extra_release is not None else [])
        gens = sum(float(g["epsilon"]) for g in self.data["generators"])
        return epsilon(z, delta) + gens + extra_generator

    def _save(self, cap: float, delta: float) -> None:
        self.data.update(epsilon_total=self.total(delta), delta=delta, max_epsilon=cap)
        atomic_write_text(self.path, json.dumps(self.data, indent=2) + "\n")

    def _refuse(self, rule: str, what: str, after: float, cap: float) -> None:
        raise PolicyViolation(
            rule,
            f"{what} would take the site's total ε to {after:.3g}, over its budget {cap:g} "
            f"({len(self.data['releases'])} release(s) and {len(self.data['generators'])} generator(s) so far, "
            "over every run)",
        )

    def charge(self, dp: LogitDP, server_round: int, n: int, run_id: int = 0) -> float:
        """Account for one more release of ``n`` probability maps (raise :class:`PolicyViolation` if
        it would pass the site's budget) and return the site's total ε after it."""
        with _locked(self.path):
            self.data = self._read()
            after = self.total(dp.delta, extra_release=dp.noise_multiplier)
            if dp.max_epsilon and after > dp.max_epsilon:
                self._refuse("dp.max-epsilon", "this upload", after, dp.max_epsilon)
            self.data["releases"].append(
                {
                    "time": datetime.now(UTC).isoformat(timespec="seconds"),
                    "run_id": int(run_id),
                    "round": server_round,
                    "n": n,
                    "clip": dp.clip,
                    "noise_multiplier": dp.noise_multiplier,
                    "sensitivity": sensitivity(dp, n),
                }
            )
            self._save(dp.max_epsilon, dp.delta)
        return after

    def charge_generator(self, dp: LogitDP, eps: float, delta: float, noise: float, run_id: int = 0) -> float:
        """Account for a DP-SGD generator about to leave (its ε at its δ); refuse past the budget."""
        with _locked(self.path):
            self.data = self._read()
            after = self.total(dp.delta, extra_generator=eps)
            if dp.max_epsilon and after > dp.max_epsilon:
                self._refuse("dp.max-epsilon", "this generator upload", after, dp.max_epsilon)
            self.data["generators"].append(
                {
                    "time": datetime.now(UTC).isoformat(timespec="seconds"),
                    "run_id": int(run_id),
                    "epsilon": float(eps),
                    "delta": float(delta),
                    "noise_multiplier": float(noise),
                }
            )
            self._save(dp.max_epsilon, dp.delta)
        return after


class _locked:
    """An exclusive lock on ``<ledger>.lock`` for a read-charge-write."""

    def __init__(self, path: Path):
        self.lock = Path(path).with_suffix(".lock")

    def __enter__(self):
        private_mkdir(self.lock.parent)
        self.fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        return False
