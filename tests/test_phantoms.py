import numpy as np

from common.phantoms import phantom_site


def test_phantoms_are_deterministic():
    a, b = phantom_site(1, 6, 32, seed=0), phantom_site(1, 6, 32, seed=0)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.masks, b.masks)
    assert not np.array_equal(a.images, phantom_site(1, 6, 32, seed=1).images)


def test_phantom_sites_have_visible_domain_shift():
    sites = [phantom_site(i, 24, 32) for i in range(4)]
    means = [s.images.reshape(24, 3, -1).mean(axis=(0, 2)) for s in sites]  # per-channel colour
    for i in range(4):
        for j in range(i + 1, 4):
            assert np.abs(means[i] - means[j]).max() > 10, (i, j)
    fg = [s.masks.mean() for s in sites]
    assert max(fg) / min(fg) > 1.5  # object size differs between sites
    for s in sites:
        assert set(np.unique(s.masks)) == {0, 1}
        # most phantom frames show an object (some are empty, as real polyp-free frames are)
        assert (s.masks.reshape(24, -1).sum(1) > 0).mean() >= 0.5


def test_phantom_beyond_hand_picked_domains():
    s = phantom_site(9, 4, 32)
    assert s.name == "phantom-9" and s.images.shape == (4, 3, 32, 32)
