import pytest
import torch

from common.metrics import THRESHOLDS, ThresholdedScores, per_image_scores
from common.models import MODEL_NAMES, REGISTRY, build_model, check_input_size, count_parameters


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_builds_and_runs(name):
    torch.manual_seed(0)
    m = build_model(name).eval()
    size = max(64, REGISTRY[name].min_size_multiple * 2)
    with torch.no_grad():
        y = m(torch.rand(2, 3, size, size))
    assert y.shape == (2, 1, size, size)
    assert torch.isfinite(y).all()
    assert 10_000 < count_parameters(m) < 10_000_000


def test_unknown_model_and_bad_size():
    with pytest.raises(KeyError, match="registered"):
        build_model("vit-huge")
    with pytest.raises(ValueError, match="multiple of 32"):
        check_input_size("flexunet-effb0", 48)


def _masks(*pixels, size=4):
    t = torch.zeros(len(pixels), 1, size, size)
    for i, px in enumerate(pixels):
        for y, x in px:
            t[i, 0, y, x] = 1
    return t


def test_dice_iou_against_hand_computed():
    # prediction covers 2 of 3 target pixels plus 1 false positive: Dice 2*2/(3+3)=2/3, IoU 2/4
    target = _masks([(0, 0), (0, 1), (0, 2)])
    probs = _masks([(0, 0), (0, 1), (3, 3)])
    d, i = per_image_scores(probs, target)
    assert d.item() == pytest.approx(2 / 3, abs=1e-5)
    assert i.item() == pytest.approx(0.5, abs=1e-5)


def test_threshold_averaging():
    target = _masks([(0, 0)])
    probs = torch.zeros(1, 1, 4, 4)
    probs[0, 0, 0, 0] = 0.6  # counts at thresholds 0.1, 0.3, 0.5 only
    d, _ = per_image_scores(probs, target)
    assert d.item() == pytest.approx(3 / len(THRESHOLDS), abs=1e-5)


def test_empty_masks():
    empty = torch.zeros(1, 1, 4, 4)
    d, i = per_image_scores(empty, empty)  # nothing to find, nothing found: perfect
    assert d.item() == 1.0 and i.item() == 1.0
    d, i = per_image_scores(_masks([(1, 1)]), empty)  # false alarm on a polyp-free frame
    assert d.item() == 0.0 and i.item() == 0.0
    d, _ = per_image_scores(empty, _masks([(1, 1)]))  # missed polyp
    assert d.item() == 0.0


def test_accumulator_means_over_images():
    acc = ThresholdedScores()
    acc.update(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))  # 1.0
    acc.update(_masks([(1, 1)]), torch.zeros(1, 1, 4, 4))  # 0.0
    assert acc.result() == {"dice": 0.5, "iou": 0.5, "dice05": 0.5, "iou05": 0.5, "n": 2}


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        per_image_scores(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 8, 8))
