"""Which data a SuperNode trains on, resolved from run config + node config.

Order: node ``data-dir`` (deployment) > node ``phantom-id`` > run ``data-root`` (simulation: the
virtual SuperNode with ``partition-id`` k gets the k-th site folder in sorted order) > built-in
phantom site ``partition-id``.  The loaded site is cached in-process (Ray actors live for the whole
simulation) and on disk (process-isolated ClientApps start fresh for every message); a site folder
is checked to still exist at every request, so a folder that disappears mid-run makes the site answer
with a data error naming it rather than train on the cached copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from common.config import ConfigError, NodeConfig, RunConfig
from common.data import SiteArrays, SiteDataError, default_cache_dir, load_site_folder
from common.phantoms import phantom_site
from common.splits import Split, load_split_file, make_splits


@dataclass(frozen=True)
class SiteSource:
    name: str
    folder: str | None  # None = built-in phantom
    phantom_index: int | None = None


def list_site_folders(root: str | Path) -> list[Path]:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise SiteDataError(f"data-root not found: {root}")
    sites = sorted(p for p in root.iterdir() if (p / "images").is_dir())
    if not sites:
        raise SiteDataError(f"data-root {root} holds no site folder with an images/ sub-folder")
    return sites


def resolve_site(run: RunConfig, node: NodeConfig) -> SiteSource:
    if node.data_dir:
        folder = Path(node.data_dir).expanduser()
        return SiteSource(node.site_name or folder.name, str(folder))
    if node.phantom_id is not None:
        return SiteSource(node.site_name or f"phantom-{node.phantom_id}", None, node.phantom_id)
    if node.partition_id is None:
        raise SiteDataError(
            "this SuperNode has no data: set node config 'data-dir' to its site folder "
            "(or 'phantom-id' for a built-in phantom site)"
        )
    if run.data_root:
        sites = list_site_folders(run.data_root)
        if node.partition_id >= len(sites):
            raise SiteDataError(
                f"partition-id {node.partition_id} has no site: data-root {run.data_root} holds "
                f"{len(sites)} site(s) ({', '.join(p.name for p in sites)}); run at most that many "
                "SuperNodes"
            )
        folder = sites[node.partition_id]
        return SiteSource(node.site_name or folder.name, str(folder))
    return SiteSource(node.site_name or f"phantom-{node.partition_id}", None, node.partition_id)


@lru_cache(maxsize=8)
def _load_cached(
    source: SiteSource, image_size: int, strict: bool, phantom_n: int, seed: int, cache_dir: str
) -> SiteArrays:
    if source.folder is None:
        site = phantom_site(int(source.phantom_index or 0), phantom_n, image_size, seed)
        site.name = source.name
        return site
    return load_site_folder(
        source.folder, image_size, strict=strict, name=source.name, cache_dir=cache_dir or None
    )


def _check_still_there(folder: Path) -> None:
    """The site's folder must exist at every request, not only when it was first loaded: the decoded
    copy cached in this process (and on disk) must not keep a site training on data that is gone."""
    for d in (folder, folder / "images", folder / "masks"):
        if not d.is_dir():
            raise SiteDataError(
                f"site data folder not found: {d} does not exist (any more); the site does not train "
                "on a cached copy of data that is gone"
            )


# run-config keys that name a path only a site would open: a deployed site refuses a run that sets
# them. (fm-checkpoint names the server's FM file; a deployed site never opens it and uses its node
# config's fm-checkpoint instead.)
SITE_PATH_KEYS = ("data-root", "split-file")


def check_no_server_paths(run: RunConfig, node: NodeConfig) -> None:
    """A deployed site opens only paths its own node config names: a run config that names one
    (the coordinator probing the site's disk, or a simulation config sent to real sites) is refused.
    Flower simulation (a ``partition-id`` and no site folder) keeps using the run config's paths."""
    if not node.deployed:
        return
    flat = run.to_flat()
    named = [k for k in SITE_PATH_KEYS if flat.get(k)]
    if named:
        raise ConfigError(
            f"the run config names site paths ({', '.join(f'{k}={flat[k]!r}' for k in named)}); this site takes "
            "its data and split from its own node config (data-dir, split-file) "
            "and never opens a path the coordinator chose: remove them from the run config"
        )


def load_site(run: RunConfig, node: NodeConfig) -> tuple[SiteArrays, Split]:
    """The site's arrays and its deterministic split."""
    source = resolve_site(run, node)
    if source.folder is not None:
        _check_still_there(Path(source.folder))
    cache_dir = node.cache_dir or str(default_cache_dir() / "sites")
    site = _load_cached(
        source, run.image_size, run.strict_data, run.phantom_images_per_site, run.seed, cache_dir
    )
    split_file = node.split_file if node.deployed else run.split_file
    if split_file:
        split = load_split_file(split_file, site.stems, site.name)
    else:
        split = make_splits(
            site.stems,
            seed=run.seed,
            site=site.name,
            val_fraction=run.val_fraction,
            test_fraction=run.test_fraction,
            group_regex=run.split_group_regex,
        )
    return site, split
