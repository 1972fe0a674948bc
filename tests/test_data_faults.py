"""Data faults at a site: every kind of bad file is a clear problem naming the file (strict mode
stops with it, skip mode reports it and goes on), and a site whose folder disappears mid-run answers
with a data error naming the folder instead of training on its cached copy."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from PIL import Image

from client_app.app import ERR_DATA, app
from client_app.errors import local_detail
from common import protocol as P
from common.data import SiteDataError, load_site_folder

AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  # root reads files whatever their mode


def _pair(folder, stem, img=None, mask=None, size=(40, 40)):
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    h, w = size
    if img is None:
        img = np.full((h, w, 3), 100, np.uint8)
    if mask is None:
        mask = np.zeros((h, w), np.uint8)
        mask[5:15, 5:15] = 255
    Image.fromarray(img).save(folder / "images" / f"{stem}.png")
    Image.fromarray(mask).save(folder / "masks" / f"{stem}.png")


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _noise(h=64, w=64):
    return np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)


# Each fault: how to make it in a folder that also holds one good pair, the file it names, and the
# start of the reason.  ``good`` must stay loadable in skip mode whatever the fault.
FAULTS = {
    "truncated image": (
        lambda f: (_pair(f, "bad", _noise(), np.zeros((64, 64), np.uint8)), _truncate(f / "images/bad.png")),
        "images/bad.png",
        "unreadable or truncated image",
    ),
    "truncated mask": (
        lambda f: (_pair(f, "bad", _noise(), _noise()[..., 0] // 128 * 255), _truncate(f / "masks/bad.png")),
        "masks/bad.png",
        "unreadable or truncated mask",
    ),
    "corrupt image": (
        lambda f: (_pair(f, "bad"), (f / "images/bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)),
        "images/bad.png",
        "unreadable or truncated image",
    ),
    "directory named like an image": (
        lambda f: (_pair(f, "good2"), (f / "images" / "bad.png").mkdir()),
        "images/bad.png",
        "unreadable or truncated image: not a regular file",
    ),
    "broken link named like a mask": (
        lambda f: (
            _pair(f, "bad"),
            (f / "masks/bad.png").unlink(),
            (f / "masks/bad.png").symlink_to(f / "nowhere"),
        ),
        "masks/bad.png",
        "unreadable or truncated mask: not a regular file",
    ),
    "size mismatch": (
        lambda f: (_pair(f, "bad"), Image.fromarray(np.zeros((30, 30), np.uint8)).save(f / "masks/bad.png")),
        "masks/bad.png",
        "mask/image size mismatch",
    ),
    "non-binary mask": (
        lambda f: _pair(f, "bad", mask=(np.arange(1600).reshape(40, 40) % 200).astype(np.uint8)),
        "masks/bad.png",
        "unexpected mask values",
    ),
    "missing mask": (
        lambda f: (_pair(f, "bad"), (f / "masks/bad.png").unlink()),
        "images/bad.png",
        "missing mask",
    ),
    "duplicate stem": (
        lambda f: (
            _pair(f, "bad"),
            Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(f / "images/bad.jpg"),
        ),
        "images/bad.png",
        "duplicate stem 'bad': bad.jpg, bad.png",
    ),
}


@pytest.fixture(params=sorted(FAULTS))
def faulty(request, tmp_path):
    make, path, reason = FAULTS[request.param]
    folder = tmp_path / "site"
    _pair(folder, "good")
    make(folder)
    return folder, path, reason


def test_skip_mode_reports_the_file_and_goes_on(faulty):
    folder, path, reason = faulty
    site = load_site_folder(folder, 16)
    assert "good" in site.stems and "bad" not in site.stems
    hits = [p for p in site.report.problems if p.path.endswith(path)]
    assert hits and hits[0].reason.startswith(reason), site.report.problems
    assert set(np.unique(site.masks)) <= {0, 1} and site.images.shape[1:] == (3, 16, 16)


def test_strict_mode_stops_naming_the_file(faulty):
    folder, path, reason = faulty
    with pytest.raises(SiteDataError) as e:
        load_site_folder(folder, 16, strict=True)
    assert path.split("/")[-1] in str(e.value) and reason.split(":")[0] in str(e.value)


def test_decompression_bomb_is_a_problem_not_a_crash(tmp_path, monkeypatch):
    _pair(tmp_path, "good", size=(20, 20))
    _pair(tmp_path, "bomb", size=(200, 200))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5_000)  # 200x200 is more than twice that
    site = load_site_folder(tmp_path, 16)
    assert site.stems == ["good"]
    (p,) = site.report.problems
    assert p.path.endswith("images/bomb.png") and "DecompressionBombError" in p.reason


@pytest.mark.skipif(AS_ROOT, reason="root reads files whatever their permissions")
def test_unreadable_file_and_unlistable_folder(tmp_path):
    _pair(tmp_path, "good")
    _pair(tmp_path, "locked")
    locked = tmp_path / "images" / "locked.png"
    locked.chmod(0)
    try:
        site = load_site_folder(tmp_path, 16)
        (p,) = site.report.problems
        assert p.path.endswith("locked.png") and p.reason.startswith("unreadable or truncated image")
        (tmp_path / "masks").chmod(0)
        with pytest.raises(SiteDataError, match="cannot list .*masks"):
            load_site_folder(tmp_path, 16)
    finally:
        locked.chmod(0o644)
        (tmp_path / "masks").chmod(0o755)


def test_unlistable_sub_folder_is_a_site_data_error(tmp_path, monkeypatch):
    """A sub-folder that cannot be listed (permissions, gone since the check) names itself; the
    listing fails as it would for a user without read rights (which root, running tests, has)."""
    from pathlib import Path

    _pair(tmp_path, "good")
    real_iterdir = Path.iterdir

    def iterdir(self):
        if self.name == "masks":
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    with pytest.raises(SiteDataError, match="cannot list .*masks.*Permission denied"):
        load_site_folder(tmp_path, 16)


def test_only_unusable_entries_is_an_error_naming_them(tmp_path):
    (tmp_path / "images" / "a.png").mkdir(parents=True)
    (tmp_path / "masks").mkdir()
    with pytest.raises(SiteDataError, match="no usable image/mask pairs.*unreadable.*images/a.png") as e:
        load_site_folder(tmp_path, 16)
    assert [p.reason for p in e.value.report.problems] == [
        "unreadable or truncated image: not a regular file"
    ]


def test_file_gone_between_listing_and_reading(tmp_path):
    from common.data import _fingerprint

    with pytest.raises(SiteDataError, match="changed while it was read"):
        _fingerprint(tmp_path, [tmp_path / "images" / "gone.png"], [], 16)


def test_cache_is_invalidated_by_a_new_unusable_entry(tmp_path):
    _pair(tmp_path, "good")
    cache = tmp_path / "cache"
    assert not load_site_folder(tmp_path, 16, cache_dir=cache).report.problems
    (tmp_path / "images" / "odd.png").mkdir()
    site = load_site_folder(tmp_path, 16, cache_dir=cache)
    assert [p.reason for p in site.report.problems] == ["unreadable or truncated image: not a regular file"]


# --- a folder that disappears mid-run ------------------------------------------------------------


def _ctx(folder, state) -> Context:
    return Context(
        run_id=5,
        node_id=3,
        node_config={"data-dir": str(folder), "state-dir": str(state)},
        state=RecordDict(),
        run_config={"method": "fedavg", "image-size": 32, "local-epochs": 1, "batch-size": 4},
    )


def _profile() -> Message:
    return Message(RecordDict(), dst_node_id=3, message_type=P.MSG_QUERY_PROFILE)


@pytest.mark.parametrize("gone", ["", "images", "masks"])
def test_site_folder_removed_mid_run_is_a_data_error_naming_it(task_identity, phantom_folder, tmp_path, gone):
    """The site loaded its folder (and cached it in-process and on disk); the folder (or one of its
    sub-folders) is then removed: the next request gets ERR_DATA naming it, not a stale answer."""
    folder = tmp_path / f"hospital-{gone or 'all'}"
    shutil.copytree(phantom_folder, folder)
    ctx = _ctx(folder, tmp_path / "state")
    rep = app(_profile(), ctx)
    assert not rep.has_error(), rep.error.reason if rep.has_error() else ""
    shutil.rmtree(folder / gone if gone else folder)
    for msg in (
        _profile(),
        Message(
            RecordDict({P.KEY_CONFIG: ConfigRecord({P.CFG_SPLIT: "val"})}),
            dst_node_id=3,
            message_type=P.MSG_EVALUATE,
        ),
    ):
        rep = app(msg, ctx)
        assert rep.has_error() and rep.error.code == ERR_DATA
        assert str(folder / gone if gone else folder) in local_detail(
            rep.error.reason
        ) and "does not exist" in local_detail(rep.error.reason)
