"""What a site's probability answers look like when they leave: with the policy's ``[dp]``, clipped
and noised at ``logit-size`` and charged to the site's one privacy ledger; then encoded."""

from __future__ import annotations

import logging
import os

import torch

from client_app.guard import ledger_path
from client_app.policy import load_policy
from client_app.privacy import PrivacyLedger, privatize_probs
from common.codec import encode_probs
from common.config import NodeConfig, RunConfig

log = logging.getLogger("dsfedmed.client")


def release_probs(probs: torch.Tensor, run: RunConfig, node: NodeConfig, rnd: int, run_id: int):
    """The probabilities that leave the site, encoded, and the site's total ε (None without DP):
    with the policy's ``[dp]`` clipped and noised at ``logit-size`` first, the release charged to
    the site's own privacy ledger (across every run)."""
    dp = load_policy(node.policy_file).dp
    eps = None
    if dp.enabled:
        probs = torch.nn.functional.interpolate(probs.float(), size=(run.logit_size,) * 2, mode="area")
        eps = PrivacyLedger(ledger_path(node)).charge(dp, rnd, len(probs), run_id)
        gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
        probs = privatize_probs(probs, dp, gen)
        log.info(
            "round %d: DP on %d uploaded probability maps, the site's total ε=%.3g (δ=%g)",
            rnd,
            len(probs),
            eps,
            dp.delta,
        )
    return encode_probs(probs, run.logit_size, run.logit_dtype), eps
