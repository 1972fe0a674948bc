"""Where the benchmark's real data is, and the fixed, capped split every method shares."""

from __future__ import annotations

import json
import os
from pathlib import Path

from common.config import parse_run_config
from common.data import default_cache_dir, load_site_folder
from common.fileio import atomic_write_text
from common.sites import list_site_folders
from common.splits import make_splits

REPO = Path(__file__).resolve().parents[1]


def default_polypgen_root() -> Path:
    """PolypGen beside the repository (``../shared/data/polypgen``), or ``$DSFEDMED_POLYPGEN``."""
    candidates = [
        os.environ.get("DSFEDMED_POLYPGEN", ""),
        REPO.parent / "shared" / "data" / "polypgen",
        "/work/shared/data/polypgen",
    ]
    for c in candidates:
        if c and Path(c).is_dir():
            return Path(c).resolve()
    return (REPO.parent / "shared" / "data" / "polypgen").resolve()


def write_capped_split(
    data_root: Path,
    out: Path,
    image_size: int,
    caps: tuple[int, int, int] | None,
    seed: int = 0,
    fractions: tuple[float, float] | None = None,
) -> dict[str, dict[str, int]]:
    """One split file for every method and seed: the run's own grouped split (videos never cross
    train/test) with seed ``seed`` and (val, test) ``fractions``, each part cut to at most
    ``caps`` = (train, val, test) pairs (None: every pair).

    Returns the per-site sizes. Sites are decoded through the same on-disk cache the sites use.
    """
    defaults = parse_run_config({})
    split, sizes = {}, {}
    for folder in list_site_folders(data_root):
        site = load_site_folder(
            folder, image_size, name=folder.name, cache_dir=str(default_cache_dir() / "sites")
        )
        parts = make_splits(
            site.stems,
            seed=seed,
            site=site.name,
            val_fraction=fractions[0] if fractions else defaults.val_fraction,
            test_fraction=fractions[1] if fractions else defaults.test_fraction,
            group_regex=defaults.split_group_regex,
        )
        capped = {
            p: [site.stems[i] for i in (parts[p][:cap] if cap else parts[p])]
            for p, cap in zip(("train", "val", "test"), caps or (0, 0, 0), strict=True)
        }
        split[site.name] = capped
        sizes[site.name] = {p: len(v) for p, v in capped.items()}
    atomic_write_text(out, json.dumps(split, indent=1) + "\n")
    return sizes
