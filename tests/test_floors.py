"""Floors, the one metric rule, the learning-rate schedule and step accounting: the parts of the
benchmark that decide whether a figure means anything."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.floors import compute_floors, constant_scores, score_probs
from client_app.trainer import SiteTrainer, TrainSettings
from common.config import NodeConfig, parse_run_config
from common.metrics import ThresholdedScores
from common.schedule import round_learning_rate
from common.sites import load_site


def _mask(n: int, size: int = 16, fg: slice | None = slice(4, 12)) -> np.ndarray:
    m = np.zeros((n, 1, size, size), np.uint8)
    if fg is not None:
        m[:, :, fg, fg] = 1
    return m


def test_empty_mask_rule_at_threshold_half():
    """Empty prediction on an empty mask scores 1; any foreground on an empty mask scores 0."""
    empty = _mask(1, fg=None)
    assert constant_scores(empty, 0.0)["dice05"] == 1.0
    assert constant_scores(empty, 1.0)["dice05"] == 0.0
    one_px = torch.zeros(1, 1, 16, 16)
    one_px[0, 0, 0, 0] = 0.9
    assert score_probs(one_px, empty)["dice05"] == 0.0 and score_probs(one_px, empty)["iou05"] == 0.0


def test_constant_floors_have_their_closed_form():
    """All-foreground on a mask covering a fraction f of the image: Dice 2f/(1+f); all-background: 0
    on a non-empty mask. Averaged per image, so an empty frame counts as much as any other."""
    masks = np.concatenate([_mask(3), _mask(1, fg=None)])  # 3 images with 64/256 foreground, 1 empty
    f = 64 / 256
    fg = constant_scores(masks, 1.0)
    assert fg["dice05"] == pytest.approx((3 * 2 * f / (1 + f) + 0.0) / 4, abs=1e-6)
    assert fg["iou05"] == pytest.approx((3 * f + 0.0) / 4, abs=1e-6)
    bg = constant_scores(masks, 0.0)
    assert bg["dice05"] == pytest.approx(0.25) and bg["n"] == 4


def test_dice05_is_the_half_threshold_and_dice_the_average():
    probs = torch.zeros(1, 1, 16, 16)
    probs[0, 0, 4:12, 4:12] = 0.6  # right at 0.1-0.5, missed at 0.7 and 0.9
    sc = ThresholdedScores()
    sc.update(probs, torch.from_numpy(_mask(1).astype(np.float32)))
    r = sc.result()
    assert r["dice05"] == pytest.approx(1.0) and r["dice"] == pytest.approx(3 / 5)


def test_floors_on_phantom_sites_are_deterministic_and_named():
    cfg = parse_run_config({"image-size": 32, "phantom-images-per-site": 16, "holdout-site": "phantom-2"})
    a = compute_floors(cfg, 3, (0, 1), with_fm=False, log=lambda m: None)
    b = compute_floors(cfg, 3, (0, 1), with_fm=False, log=lambda m: None)
    assert a == b
    assert set(a["untrained"]["test"]) == {"phantom-0", "phantom-1"}
    assert a["untrained"]["holdout"]["n"] == 16  # the held-out site is scored on all its pairs
    assert set(a["untrained"]["per_seed_dice05_test_mean"]) == {"0", "1"}
    best = max(("untrained", "all-foreground", "all-background"), key=lambda n: a[n]["dice05_test_mean"])
    assert a["best_floor"] == {"name": best, "dice05_test_mean": a[best]["dice05_test_mean"]}
    # all-background scores exactly the share of empty masks (1 each, 0 elsewhere), site by site
    for k, name in enumerate(("phantom-0", "phantom-1")):
        site, split = load_site(cfg, NodeConfig(partition_id=k, num_partitions=3))
        _, masks = site.subset(split["test"])
        empty = float(np.mean([m.sum() == 0 for m in masks]))
        assert a["all-background"]["test"][name]["dice05"] == pytest.approx(empty)


def test_warmup_cosine_schedule():
    lrs = [round_learning_rate(1.0, r, 10, "warmup-cosine", 2) for r in range(1, 11)]
    assert lrs[:2] == [0.5, 1.0]
    assert all(x > y for x, y in zip(lrs[1:], lrs[2:], strict=False))  # decays every round after warm-up
    assert 0.01 < lrs[-1] < 0.05
    assert round_learning_rate(3e-3, 7, 10, "constant", 2) == 3e-3


@pytest.fixture(scope="module")
def phantom_trainer():
    torch.set_num_threads(1)
    cfg = parse_run_config({"image-size": 32, "phantom-images-per-site": 20})
    site, split = load_site(cfg, NodeConfig(partition_id=0, num_partitions=2))
    return site, split


def test_a_unit_that_trains_k_steps_reports_k(phantom_trainer):
    site, split = phantom_trainer
    n = len(split["train"])
    tr = SiteTrainer(site, split, "unet", torch.device("cpu"))
    out = tr.train(TrainSettings(epochs=2, batch_size=4, learning_rate=1e-3, augment=False, seed=0))
    assert out["steps"] == 2 * -(-n // 4)
    out = tr.train(
        TrainSettings(epochs=1, batch_size=4, learning_rate=1e-3, augment=False, seed=1, extra_steps=5)
    )
    assert out["steps"] == -(-n // 4) + 5  # fedavg-matched: the extra steps cycle through the data
    state = tr.optim_states["local"]["state"]
    assert state and max(int(s["step"]) for s in state.values()) == 2 * -(-n // 4) + -(-n // 4) + 5


def test_round_settings_follow_the_runs_schedule():
    run = parse_run_config(
        {"num-rounds": 4, "lr-schedule": "warmup-cosine", "warmup-rounds": 1, "learning-rate": 0.01,
         "extra-local-steps": 3, "weight-decay": 1e-4, "augment-set": "flips"}
    )  # fmt: skip
    s1, s4 = TrainSettings.from_run(run, 1), TrainSettings.from_run(run, 4)
    assert s1.learning_rate == pytest.approx(0.01) and s4.learning_rate < s1.learning_rate
    assert (s1.extra_steps, s1.weight_decay, s1.augment_set) == (3, 1e-4, "flips")
