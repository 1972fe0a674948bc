import json

import pytest

from common.splits import load_split_file, make_splits


def _stems(n=50):
    return [f"img{i:03d}" for i in range(n)]


def test_split_is_deterministic_and_disjoint():
    a = make_splits(_stems(), seed=3, site="A", val_fraction=0.2, test_fraction=0.2)
    b = make_splits(_stems(), seed=3, site="A", val_fraction=0.2, test_fraction=0.2)
    assert a == b
    all_idx = a["train"] + a["val"] + a["test"]
    assert sorted(all_idx) == list(range(50))
    assert len(a["test"]) == 10 and len(a["val"]) == 10


def test_split_changes_with_seed_and_site():
    a = make_splits(_stems(), seed=0, site="A", val_fraction=0.2, test_fraction=0.2)
    assert a != make_splits(_stems(), seed=1, site="A", val_fraction=0.2, test_fraction=0.2)
    assert a != make_splits(_stems(), seed=0, site="B", val_fraction=0.2, test_fraction=0.2)


def test_video_groups_never_straddle_splits():
    stems = [f"{v:02d}_frame_{f}" for v in range(10) for f in range(6)]
    sp = make_splits(stems, seed=0, site="C4", val_fraction=0.2, test_fraction=0.2)
    where = {}
    for part, idx in sp.items():
        for i in idx:
            vid = stems[i][:2]
            where.setdefault(vid, set()).add(part)
    assert all(len(parts) == 1 for parts in where.values())


def test_tiny_site_still_has_every_split():
    sp = make_splits(_stems(4), seed=0, site="A", val_fraction=0.15, test_fraction=0.2)
    assert all(len(v) >= 1 for v in sp.values())


def test_split_file(tmp_path):
    p = tmp_path / "split.json"
    p.write_text(json.dumps({"A": {"train": ["img000", "img001"], "val": ["img002"], "test": ["img003"]}}))
    sp = load_split_file(p, _stems(5), "A")
    assert sp == {"train": [0, 1], "val": [2], "test": [3]}
    p.write_text(json.dumps({"train": ["img000", "zzz"]}))
    with pytest.raises(ValueError, match="zzz"):
        load_split_file(p, _stems(5), "A")
    p.write_text(json.dumps({"train": ["img000"], "test": ["img000"]}))
    with pytest.raises(ValueError, match="more than one split"):
        load_split_file(p, _stems(5), "A")
