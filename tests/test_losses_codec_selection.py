import math

import numpy as np
import pytest
import torch

from common.codec import decode_probs, encode_probs
from common.losses import DistillWeights, binary_kl, distillation_loss, kd_loss, supervised_bce
from server_app.selection import SelectionConfig, select


def test_binary_kl_hand_computed():
    p, q = torch.tensor([0.8]), torch.tensor([0.5])
    expected = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    assert binary_kl(p, q).item() == pytest.approx(expected, rel=1e-5)
    assert binary_kl(p, p).item() == pytest.approx(0.0, abs=1e-7)


def test_kd_loss_applies_temperature_to_teacher_and_student():
    """Teacher probabilities travel at T = 1; the receiver softens both sides by T (Hinton) and
    scales by T^2. At T = 2 a student whose logits equal the teacher's has zero loss."""
    logits = torch.full((1, 1, 2, 2), 2.0)
    teacher = torch.full((1, 1, 2, 2), 0.3)
    t = 2.0
    pt = 1 / (1 + math.exp(-math.log(0.3 / 0.7) / t))  # teacher at T
    s = 1 / (1 + math.exp(-2.0 / t))  # student at T
    expected = (pt * math.log(pt / s) + (1 - pt) * math.log((1 - pt) / (1 - s))) * t * t
    assert kd_loss(logits, teacher, temperature=t).item() == pytest.approx(expected, rel=1e-4)
    same = torch.full((1, 1, 2, 2), math.log(0.3 / 0.7))
    assert kd_loss(same, teacher, temperature=t).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_gate_limits_the_kl_term_to_selected_samples():
    logits = torch.zeros(2, 1, 2, 2)
    teacher = torch.stack([torch.full((1, 2, 2), 0.5), torch.full((1, 2, 2), 0.9)])
    only_first = kd_loss(logits, teacher, sample_weights=torch.tensor([1.0, 0.0]))
    assert only_first.item() == pytest.approx(0.0, abs=1e-6)  # the first sample agrees with the student
    both = kd_loss(logits, teacher)
    assert kd_loss(logits, teacher, sample_weights=torch.tensor([0.0, 1.0])).item() == pytest.approx(
        2 * both.item(), rel=1e-5
    )
    masks = torch.zeros(2, 1, 2, 2)
    w = DistillWeights(supervised=0.9, kd=0.1)
    none_selected = distillation_loss(logits, masks, teacher, w, kd_gate=torch.zeros(2))
    assert none_selected.item() == pytest.approx(distillation_loss(logits, masks, None, w).item())


def test_kd_loss_resizes_student_to_teacher():
    logits = torch.zeros(2, 1, 8, 8)
    teacher = torch.full((2, 1, 4, 4), 0.5)
    assert kd_loss(logits, teacher).item() == pytest.approx(0.0, abs=1e-6)


def test_supervised_bce_pos_weight():
    logits = torch.zeros(1, 1, 1, 2)
    masks = torch.tensor([[[[1.0, 0.0]]]])
    # pixel 1: -2*log(0.5), pixel 2: -log(0.5) -> mean 1.5*log 2
    assert supervised_bce(logits, masks, 2.0).item() == pytest.approx(1.5 * math.log(2), rel=1e-5)


def test_distillation_loss_weights():
    logits = torch.zeros(1, 1, 1, 2)
    masks = torch.tensor([[[[1.0, 0.0]]]])
    teacher = torch.full((1, 1, 1, 2), 0.8)
    w = DistillWeights(supervised=0.9, kd=0.1)
    expected = 0.9 * 1.5 * math.log(2) + 0.1 * (0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5))
    assert distillation_loss(logits, masks, teacher, w).item() == pytest.approx(expected, rel=1e-5)
    assert distillation_loss(logits, masks, None, w).item() == pytest.approx(
        0.9 * 1.5 * math.log(2), rel=1e-5
    )


@pytest.mark.parametrize("dtype, tol", [("float16", 1e-3), ("uint8", 0.5 / 255 + 1e-6)])
def test_codec_round_trip_bounds_error(dtype, tol):
    rng = np.random.default_rng(0)
    probs = torch.from_numpy(rng.random((3, 1, 16, 16)).astype(np.float32))
    enc = encode_probs(probs, 16, dtype)
    assert enc.dtype == np.dtype(dtype)
    dec = decode_probs(enc, expected_n=3, expected_size=16)
    assert (dec - probs).abs().max().item() <= tol


def test_codec_downsamples_by_area_and_shrinks_bytes():
    probs = torch.zeros(1, 1, 64, 64)
    probs[..., :32, :] = 1.0
    enc = encode_probs(probs, 16, "uint8")
    assert enc.shape == (1, 1, 16, 16) and enc.nbytes == 256
    dec = decode_probs(enc)
    assert dec[..., :8, :].min() == 1.0 and dec[..., 8:, :].max() == 0.0


@pytest.mark.parametrize(
    "bad, needle",
    [
        (np.zeros((2, 1, 4, 4), np.float32), "uint8 or float16"),
        (np.zeros((2, 4, 4), np.uint8), "shape"),
        (np.full((2, 1, 4, 4), np.nan, np.float16), "non-finite"),
        (np.full((2, 1, 4, 4), 2.0, np.float16), "out-of-range"),
        (np.zeros((3, 1, 4, 4), np.uint8), "for 2 samples"),
    ],
)
def test_codec_rejects_bad_payloads(bad, needle):
    with pytest.raises(ValueError, match=needle):
        decode_probs(bad, expected_n=2, expected_size=4)


def _probs(values):
    return torch.tensor(values, dtype=torch.float32).reshape(-1, 1, 1, 1).expand(-1, 1, 2, 2).clone()


def test_fm_only_selection_keeps_samples_the_fm_fits():
    masks = torch.ones(4, 1, 2, 2)
    fm = _probs([0.9, 0.2, 0.6, 0.99])  # sample 3 fits best, then 0, then 2
    idx, stats = select(fm, masks, None, SelectionConfig(rule="paper", lam=0.3, rho=0.5))
    assert idx.tolist() == [0, 3] and stats["fm_only"]


def test_paper_rule_trades_fit_against_disagreement():
    masks = torch.ones(3, 1, 2, 2)
    fm = _probs([0.9, 0.9, 0.6])
    ens = _probs([0.9, 0.1, 0.6])  # sample 1: FM fits, sites disagree strongly
    idx, _ = select(fm, masks, ens, SelectionConfig(rule="paper", lam=0.1, rho=1 / 3))
    assert idx.tolist() == [1]
    idx, _ = select(fm, masks, ens, SelectionConfig(rule="paper", lam=1.0, rho=1 / 3))
    assert idx.tolist() in ([0], [1])  # pure fit term: 0 and 1 tie on the FM loss


def test_quantile_rule_drops_hard_samples_then_keeps_top_kl():
    masks = torch.ones(5, 1, 2, 2)
    fm = _probs([0.9, 0.8, 0.85, 0.05, 0.9])  # sample 3: FM loss too high
    ens = _probs([0.7, 0.8, 0.5, 0.9, 0.05])  # sample 4: ensemble loss too high
    idx, stats = select(fm, masks, ens, SelectionConfig(rule="quantile", quantile=0.7, kl_keep=0.5))
    # losses are 2*(-log p) (pos_weight 2, all-foreground masks):
    #   FM  [.21 .45 .33 5.99 .21] -> 0.7 quantile .43: drops 1 and 3
    #   ens [.71 .45 1.39 .21 5.99] -> 0.7 quantile 1.25: drops 2 and 4
    # only sample 0 passes both; top 50% of one candidate is that candidate
    assert idx.tolist() == [0]
    # with a looser quantile, 0 and 1 and 2 pass, and the top half by KL keeps 2 (largest disagreement)
    idx, _ = select(fm, masks, ens, SelectionConfig(rule="quantile", quantile=0.95, kl_keep=0.34))
    assert idx.tolist() == [2]
    assert stats["n_selected"] == len(idx)


def test_rule_all_and_unknown():
    m = torch.ones(3, 1, 2, 2)
    assert select(_probs([0.5] * 3), m, None, SelectionConfig(rule="all"))[0].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="unknown selection rule"):
        select(_probs([0.5] * 3), m, _probs([0.5] * 3), SelectionConfig(rule="best"))


def test_site_targets_mix_the_fm_with_the_other_sites_only():
    from server_app.targets import ensemble, site_targets

    fm = torch.full((2, 1, 2, 2), 0.8)
    sites = {
        "A": torch.full((2, 1, 2, 2), 0.2),
        "B": torch.full((2, 1, 2, 2), 0.4),
        "C": torch.zeros(2, 1, 2, 2),
    }
    n = {"A": 100.0, "B": 300.0, "C": 0.0}
    # site A never gets its own answer back: 0.5 * FM + 0.5 * B (C weighs nothing)
    assert torch.allclose(site_targets(fm, sites, n, "A", 0.5), torch.full_like(fm, 0.5 * 0.8 + 0.5 * 0.4))
    # a newcomer gets every site: 0.25 * FM + 0.75 * (100 * 0.2 + 300 * 0.4) / 400
    assert torch.allclose(site_targets(fm, sites, n, "new", 0.25), torch.full_like(fm, 0.2 + 0.75 * 0.35))
    assert torch.equal(site_targets(fm, {}, {}, "A", 0.5), fm)  # nobody answered yet: the FM alone
    assert torch.equal(site_targets(fm, sites, n, "A", 1.0), fm)
    assert torch.allclose(ensemble({"A": sites["A"], "B": sites["B"]}, n), torch.full_like(fm, 0.35))


def test_targets_of_every_site_from_one_pass_equal_the_rule():
    """Targets subtracts a site's own share from the all-sites sum (O(sites) per round); it gives
    the rule's leave-one-out mixture for every site, a newcomer, and a site with weight 0."""
    from server_app.targets import Targets

    gen = torch.Generator().manual_seed(0)
    fm = torch.rand(7, 1, 8, 8, generator=gen)
    sites = {f"s{i}": torch.rand(7, 1, 8, 8, generator=gen) for i in range(6)}
    n = {f"s{i}": float(i + 1) for i in range(6)}
    n["s5"] = 0.0  # answered, but weighs nothing
    t = Targets(fm, sites, n)
    for site in [*sites, "newcomer"]:
        others = [s for s in sites if s != site and n[s] > 0]
        direct = sum(n[s] * sites[s] for s in others) / sum(n[s] for s in others)
        assert torch.allclose(t.of(site, 0.3), 0.3 * fm + 0.7 * direct, atol=1e-6), site
    assert torch.equal(Targets(fm, {"s0": sites["s0"]}, {"s0": 1.0}).of("s0", 0.3), fm)  # no one else
