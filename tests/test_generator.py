"""The site's diffusion generator: training mechanics, sampling shapes, determinism, mask source."""

import numpy as np
import pytest

from common.generator import (
    GeneratorConfig,
    build_unet,
    mask_statistics,
    random_masks,
    sample_images,
    train_generator,
)
from common.phantoms import phantom_site

TINY = GeneratorConfig(size=16, widths=(8, 16), norm_groups=4, train_steps=4, batch_size=4, sample_steps=3)


@pytest.fixture(scope="module")
def trained():
    site = phantom_site(0, 8, 32)
    return train_generator(site.images, site.masks, TINY)


def test_training_returns_weights_and_only_summary_stats(trained):
    state, stats = trained
    ref = build_unet(TINY).state_dict()
    assert set(state) == set(ref) and all(state[k].shape == tuple(ref[k].shape) for k in ref)
    assert stats["steps"] == 4 and np.isfinite(stats["loss_last"])
    # the stats are scalars (two of them about mask sizes) plus the generator's own settings, never
    # per-image values; the handler sends the scalars only
    assert set(stats) >= {"mask_log_fg_mean", "mask_log_fg_std"}
    assert {k for k, v in stats.items() if not isinstance(v, int | float)} == {"config"}
    assert not any(isinstance(v, np.ndarray) for v in stats["config"].values())


def test_training_is_deterministic_under_a_seed(trained):
    site = phantom_site(0, 8, 32)
    again, _ = train_generator(site.images, site.masks, TINY)
    for k, v in trained[0].items():
        np.testing.assert_allclose(v, again[k], rtol=0, atol=1e-6)


def test_wall_time_budget_stops_training():
    site = phantom_site(0, 8, 32)
    cfg = GeneratorConfig(
        size=16, widths=(8, 16), norm_groups=4, train_steps=10_000, max_seconds=0.5, batch_size=4
    )
    _, stats = train_generator(site.images, site.masks, cfg)
    assert 1 <= stats["steps"] < 10_000 and stats["seconds"] < 10


def test_sampling_shapes_and_determinism(trained):
    masks = random_masks(3, 16, -2.5, 0.4, seed=1)
    a = sample_images(trained[0], TINY, masks, seed=5)
    b = sample_images(trained[0], TINY, masks, seed=5)
    assert a.shape == (3, 3, 16, 16) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, sample_images(trained[0], TINY, masks, seed=6))


def test_sampling_rejects_foreign_weights(trained):
    other = GeneratorConfig(size=16, widths=(16, 16), norm_groups=4)
    with pytest.raises(ValueError, match="do not fit"):
        sample_images(trained[0], other, random_masks(1, 16, -2.5, 0.4, 0), seed=0)


def test_random_masks_follow_site_statistics():
    m = random_masks(200, 64, np.log(0.1), 0.3, seed=0)
    assert m.shape == (200, 1, 64, 64) and set(np.unique(m)) == {0, 1}
    frac = m.reshape(200, -1).mean(1)
    assert (frac > 0).all()
    assert 0.06 < np.exp(np.log(frac).mean()) < 0.16
    mean, std = mask_statistics(m)
    assert abs(mean - np.log(0.1)) < 0.3 and 0.1 <= std < 0.6


def test_mask_statistics_of_all_empty_masks_is_a_safe_default():
    mean, std = mask_statistics(np.zeros((4, 1, 8, 8), np.uint8))
    assert np.isfinite(mean) and std > 0
