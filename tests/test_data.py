"""Site-folder loading: good pairs, every bad-file case, strict vs skip, cache."""

import shutil

import numpy as np
import pytest
from PIL import Image

from common.data import SiteDataError, load_site_folder


def _pair(folder, stem, img, mask, img_ext=".png"):
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(folder / "images" / f"{stem}{img_ext}")
    Image.fromarray(mask).save(folder / "masks" / f"{stem}.png")


def _rgb(h=40, w=40, v=100):
    return np.full((h, w, 3), v, np.uint8)


def _mask(h=40, w=40, fg=255):
    m = np.zeros((h, w), np.uint8)
    m[10:20, 10:20] = fg
    return m


def test_good_folder_loads_rgb_resized(phantom_folder):
    site = load_site_folder(phantom_folder, 16)
    assert site.images.shape == (12, 3, 16, 16) and site.images.dtype == np.uint8
    assert site.masks.shape == (12, 1, 16, 16)
    assert set(np.unique(site.masks)) <= {0, 1}
    assert not site.report.problems


def test_formats_and_mask_encodings(tmp_path):
    _pair(tmp_path, "a", _rgb(), _mask(fg=255), ".jpg")
    _pair(tmp_path, "b", _rgb()[..., 0], _mask(fg=1), ".tif")  # grayscale TIFF, {0,1} mask
    _pair(tmp_path, "c", _rgb(), _mask(fg=3))  # small integer label
    site = load_site_folder(tmp_path, 20)
    assert site.stems == ["a", "b", "c"]
    assert site.images.shape == (3, 3, 20, 20)
    for m in site.masks:
        assert m.sum() == 25  # the 10x10 square at half resolution


def test_grayscale_only_site_reports_one_channel(tmp_path):
    _pair(tmp_path, "a", _rgb()[..., 0], _mask())
    site = load_site_folder(tmp_path, 20)
    assert site.source_channels == 1 and site.images.shape[1] == 3


@pytest.fixture
def bad_folder(tmp_path):
    f = tmp_path / "bad"
    _pair(f, "good", _rgb(), _mask())
    _pair(f, "nomask", _rgb(), _mask())
    (f / "masks" / "nomask.png").unlink()
    (f / "images" / "garbage.png").write_bytes(b"this is not an image")
    Image.fromarray(_mask()).save(f / "masks" / "garbage.png")
    _pair(f, "trunc", np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8), _mask(64, 64))
    data = (f / "images" / "trunc.png").read_bytes()
    (f / "images" / "trunc.png").write_bytes(data[: len(data) // 2])
    _pair(f, "size", _rgb(40, 40), _mask(30, 30))
    _pair(f, "values", _rgb(), np.arange(1600, dtype=np.uint8).reshape(40, 40) % 200)
    _pair(f, "colour", _rgb(), _rgb())
    Image.fromarray(np.dstack([_mask(), _mask() // 2, _mask()])).save(f / "masks" / "colour.png")
    return f


def test_bad_files_are_reported_per_file_and_skipped(bad_folder):
    site = load_site_folder(bad_folder, 16)
    assert site.stems == ["good"]
    reasons = {p.path.split("/")[-1]: p.reason for p in site.report.problems}
    assert reasons["nomask.png"] == "missing mask"
    assert reasons["garbage.png"].startswith("unreadable or truncated image")
    assert reasons["trunc.png"].startswith("unreadable or truncated image")
    assert reasons["size.png"].startswith("mask/image size mismatch")
    assert reasons["values.png"].startswith("unexpected mask values")
    assert "channels with different values" in reasons["colour.png"]
    summary = site.report.summary()
    assert "6 problem(s)" in summary and "missing mask" in summary


def test_strict_mode_fails_with_count_and_paths(bad_folder):
    with pytest.raises(SiteDataError) as e:
        load_site_folder(bad_folder, 16, strict=True)
    msg = str(e.value)
    assert "6 problem(s)" in msg and "nomask.png" in msg


def test_mask_without_image_is_reported(tmp_path):
    _pair(tmp_path, "a", _rgb(), _mask())
    Image.fromarray(_mask()).save(tmp_path / "masks" / "orphan.png")
    site = load_site_folder(tmp_path, 16)
    assert [p.reason for p in site.report.problems] == ["mask without image"]


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(SiteDataError, match="not found"):
        load_site_folder(tmp_path / "nope", 16)
    (tmp_path / "e" / "images").mkdir(parents=True)
    with pytest.raises(SiteDataError, match="no 'masks/'"):
        load_site_folder(tmp_path / "e", 16)
    (tmp_path / "e" / "masks").mkdir()
    with pytest.raises(SiteDataError, match="empty folder"):
        load_site_folder(tmp_path / "e", 16)


def test_all_bad_is_an_error_even_when_skipping(tmp_path):
    _pair(tmp_path, "a", _rgb(40, 40), _mask(30, 30))
    with pytest.raises(SiteDataError, match="no usable image/mask pairs"):
        load_site_folder(tmp_path, 16)


def test_disk_cache_hits_and_invalidates(tmp_path, phantom_folder):
    cache = tmp_path / "cache"
    a = load_site_folder(phantom_folder, 16, cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 1
    b = load_site_folder(phantom_folder, 16, cache_dir=cache)
    np.testing.assert_array_equal(a.images, b.images)
    assert b.stems == a.stems
    # a removed pair changes the fingerprint: the cache is not reused
    stem = a.stems[0]
    (phantom_folder / "images" / f"{stem}.png").unlink()
    c = load_site_folder(phantom_folder, 16, cache_dir=cache)
    assert len(c) == len(a) - 1 and c.report.problems[0].reason == "mask without image"
    # a corrupt cache file is rebuilt, not trusted
    for p in cache.glob("*.npz"):
        p.write_bytes(b"junk")
    d = load_site_folder(phantom_folder, 16, cache_dir=cache)
    assert len(d) == len(c)


def test_site_copy_is_independent_of_folder_name(tmp_path, phantom_folder):
    other = tmp_path / "copy"
    shutil.copytree(phantom_folder, other)
    assert load_site_folder(other, 16, name="X").name == "X"


def test_the_summary_that_leaves_the_site_names_no_file_or_folder(bad_folder):
    """The profile reply carries this: counts by kind of problem, never a path or a file name."""
    site = load_site_folder(bad_folder, 16)
    counts = site.report.counts()
    assert "6 problem(s)" in counts and "1 x missing mask" in counts
    for name in (
        "nomask.png",
        "garbage.png",
        "trunc.png",
        "size.png",
        "values.png",
        "colour.png",
        "bad",
        "/",
    ):
        assert name not in counts, name
