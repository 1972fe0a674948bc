"""Deterministic train/val/test splits that keep correlated frames together.

Frames of one video must not straddle train and test.  ``group_regex`` extracts a group id from a
file stem (default ``^(\\d+)_``: PolypGen C4's ``NN_`` video prefix); stems that do not match form
their own group.  Whole groups are shuffled with a seed derived from the run seed and the site
name, then filled into test, val and train in that order.  An explicit split file
(``{"train": [...], "val": [...], "test": [...]}`` of stems, or ``{site: {...}}``) overrides this.
"""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import numpy as np

Split = dict[str, list[int]]


def make_splits(
    stems: list[str],
    *,
    seed: int,
    site: str,
    val_fraction: float,
    test_fraction: float,
    group_regex: str = r"^(\d+)_",
) -> Split:
    n = len(stems)
    pattern = re.compile(group_regex) if group_regex else None
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(stems):
        m = pattern.match(s) if pattern else None
        key = f"g:{m.group(1)}" if m and m.groups() else f"s:{s}"
        groups.setdefault(key, []).append(i)
    keys = sorted(groups)
    rng = np.random.default_rng([seed, zlib.crc32(site.encode())])
    rng.shuffle(keys)
    n_test = int(round(test_fraction * n)) if test_fraction > 0 else 0
    n_val = int(round(val_fraction * n)) if val_fraction > 0 else 0
    if test_fraction > 0 and n >= 3:
        n_test = max(n_test, 1)
    if val_fraction > 0 and n >= 3:
        n_val = max(n_val, 1)
    out: Split = {"train": [], "val": [], "test": []}
    for k in keys:
        if len(out["test"]) < n_test:
            out["test"].extend(groups[k])
        elif len(out["val"]) < n_val:
            out["val"].extend(groups[k])
        else:
            out["train"].extend(groups[k])
    if not out["train"]:
        raise ValueError(
            f"site {site!r}: {n} pairs leave no training data with val {val_fraction} "
            f"and test {test_fraction}"
        )
    return {k: sorted(v) for k, v in out.items()}


def load_split_file(path: str | Path, stems: list[str], site: str) -> Split:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"split file {path} cannot be read: {exc}") from None
    if site in data and isinstance(data[site], dict):
        data = data[site]
    index = {s: i for i, s in enumerate(stems)}
    out: Split = {}
    for part in ("train", "val", "test"):
        names = data.get(part, [])
        missing = [s for s in names if s not in index]
        if missing:
            raise ValueError(
                f"split file {path}: {len(missing)} '{part}' stem(s) not among site {site!r}'s "
                f"loaded pairs (first: {', '.join(missing[:5])})"
            )
        out[part] = sorted(index[s] for s in names)
    seen = out["train"] + out["val"] + out["test"]
    if len(seen) != len(set(seen)):
        raise ValueError(f"split file {path}: a stem appears in more than one split")
    if not out["train"]:
        raise ValueError(f"split file {path}: no training stems for site {site!r}")
    return out
