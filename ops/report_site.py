"""The site-only part of a run report: a site's own validation images with its own model's
prediction. Those are private images: this section is rendered only at the site, for its operator,
into a report written under another name (``report-site-<site>``); nothing of it leaves the machine."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import numpy as np

from ops.document import Figure, Gallery, Note, Para, Section
from ops.run_data import ReportError, RunData, num


def _run_config_obj(run: RunData):
    from common.config import ConfigError, RunConfig

    if not run.run_config:
        raise ReportError(
            f"{run.path / 'config.json'} is missing or has no run_config: the site's data cannot be found"
        )
    known = {f.alias or n for n, f in RunConfig.model_fields.items()}
    try:
        return RunConfig.parse(
            {k: v for k, v in run.run_config.items() if k in known}, source="run config.json"
        )
    except ConfigError as exc:
        raise ReportError(str(exc)) from None


def _state_sites(state_dir: Path) -> list[str]:
    return sorted({p.parent.name for p in state_dir.glob("run-*/*/model.pt")})


def _site_model_path(run: RunData, state_dir: Path, site: str, run_id: int | None) -> tuple[Path, str]:
    """The site's model.pt for this run: ``run_id`` if given; else a run whose state holds this run's
    pool (latest first); else the latest run of the site."""
    from ops.predict import PredictError, find_site_model

    try:
        if run_id is not None:
            return find_site_model(state_dir, site, run_id), f"run {run_id} (as asked)"
        pool_id = (run.summary.get("pool") or {}).get("id")
        if pool_id:
            matches = [
                p / site / "model.pt"
                for p in state_dir.glob("run-*")
                if (p / site / "model.pt").is_file() and list((p / site).glob(f"pool-{pool_id}*.npz"))
            ]
            if matches:
                best = max(matches, key=lambda p: p.stat().st_mtime_ns)
                how = "the run whose state holds this run's synthetic pool"
                if len(matches) > 1:
                    how += f" (latest of {len(matches)}; choose with --site-run-id)"
                return best, how
        path = find_site_model(state_dir, site)
        return path, "the site's latest run in the state dir (choose with --site-run-id)"
    except PredictError as exc:
        raise ReportError(str(exc)) from None


def site_section(
    run: RunData,
    node_config: dict[str, Any],
    state_dir: Path | None = None,
    run_id: int | None = None,
    max_images: int = 8,
    device: str = "auto",
) -> tuple[str, Section]:
    """The site's own validation images with its own model's prediction (site name, section)."""
    import torch
    from PIL import Image

    from common.config import ConfigError
    from common.config import parse_node_config as parse_node
    from common.data import SiteDataError, default_cache_dir
    from common.metrics import per_image_scores
    from common.runtime import resolve_device
    from common.sites import load_site, resolve_site
    from ops.predict import PredictError, load_model, overlay, predict_probs, resize_probs

    cfg = _run_config_obj(run)
    node_config = dict(node_config)
    if state_dir is not None:
        node_config["state-dir"] = str(state_dir)
    state = Path(node_config.get("state-dir") or default_cache_dir() / "state").expanduser()
    # a node config without data: the site is named in it, or is the only one in the state dir
    if not any(k in node_config for k in ("data-dir", "phantom-id", "partition-id")):
        site = node_config.get("site-name")
        if not site:
            found = _state_sites(state) if state.is_dir() else []
            if len(found) != 1:
                raise ReportError(
                    f"which site? the state dir {state} holds models of {found or 'no site'}; "
                    'give --site-node-config "site-name=... data-dir=..."'
                )
            site = found[0]
        if cfg.data_root and (Path(cfg.data_root).expanduser() / site / "images").is_dir():
            node_config["data-dir"] = str(Path(cfg.data_root).expanduser() / site)
        elif not cfg.data_root and (m := re.fullmatch(r"phantom-(\d+)", site)):
            node_config["phantom-id"] = int(m.group(1))
        else:
            raise ReportError(f'where are site {site}\'s images? give --site-node-config "data-dir=..."')
        node_config.setdefault("site-name", site)
    try:
        node = parse_node(node_config)
    except ConfigError as exc:
        raise ReportError(str(exc)) from None

    method, exchange = cfg.method, cfg.exchange
    try:
        if method == "fedfm":
            raise ReportError("fedfm sites run the foundation model itself: no site model to render")
        site = resolve_site(cfg, node).name  # the data folder's or phantom's name, or site-name
        if method == "dsfedmed" and exchange == "logits":
            path, how = _site_model_path(run, state, site, run_id)
            # an older state has no model.json: the network the run says this site used
            sidecar = (path.parent / "model.json").is_file()
            used = (run.summary.get("site_models") or {}).get(site) or node.model or cfg.model_for(site)
            sm = load_model(
                path,
                model=None if sidecar else used or cfg.model,
                image_size=None if sidecar else cfg.image_size,
            )
            source = f"the site's own model {path} ({how})"
        else:
            path = run.path / "checkpoints" / "global_final.pt"
            sm = load_model(path, model=cfg.model, image_size=cfg.image_size)
            source = f"the federation's final global model {path}"
        if sm.image_size != cfg.image_size:
            cfg = cfg.model_copy(update={"image_size": sm.image_size})
        data, split = load_site(cfg, node)
        dev = resolve_device(device)
    except (PredictError, SiteDataError, RuntimeError, ValueError) as exc:
        if isinstance(exc, ReportError):
            raise
        raise ReportError(f"site section: {exc}") from None

    sec = Section("site", f"Site only: {site}'s validation images with its model")
    sec.blocks.append(
        Note(
            f"This section shows images of site {site}. It is for {site}'s operator only: it was made "
            "on this machine from the site's own data and model, is not sent anywhere, and must not be "
            "shared outside the site.",
            "private",
        )
    )
    val = list(split.get("val") or [])
    if not val:
        sec.blocks.append(Note(f"Site {site} has no validation images in this run's split."))
        return site, sec
    # scores over the whole validation split (as the run measured it); pictures of the first few
    images, masks = data.subset(val)
    model = sm.model.to(dev)
    probs = torch.cat([predict_probs(model, images[i : i + 16], dev) for i in range(0, len(images), 16)])
    dice, iou = per_image_scores(probs, torch.from_numpy(masks.astype(np.float32)))
    idx = val[:max_images]
    sec.blocks.append(
        Para(
            f"Model: {source}; network {sm.name}, {sm.image_size} px"
            + (f", saved after round {sm.meta['round']}" if "round" in sm.meta else "")
            + f". On its {len(val)} validation images: Dice (thresholds 0.1-0.9) "
            f"{num(float(dice.mean()))}, IoU {num(float(iou.mean()))}; the first {len(idx)} are shown."
        )
    )
    for n in sm.notes:
        sec.blocks.append(Note(n, "warning"))
    sec.blocks.append(
        Para(
            "Green tint and yellow outline: the model's prediction at threshold 0.5. Magenta outline: the "
            "site's reference mask. Images as the model sees them (resized to the run's image size)."
        )
    )
    disp = max(160, sm.image_size)
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", site)
    figs = []
    for k, i in enumerate(idx):
        img = Image.fromarray(images[k].transpose(1, 2, 0)).resize((disp, disp), Image.Resampling.BILINEAR)
        pred = resize_probs(probs[k], disp, disp) >= 0.5
        truth = (
            np.asarray(Image.fromarray(masks[k, 0] * 255).resize((disp, disp), Image.Resampling.NEAREST)) > 0
        )
        buf = io.BytesIO()
        Image.fromarray(overlay(np.asarray(img), pred, truth)).save(buf, format="PNG")
        stem = data.stems[i]
        figs.append(
            Figure(
                f"report-site-{safe}-val-{re.sub(r'[^A-Za-z0-9_.-]', '_', stem)}.png",
                buf.getvalue(),
                f"{stem}: prediction over the image",
                f"{stem} (Dice {num(float(dice[k]))})",
            )
        )
    sec.blocks.append(Gallery(figs))
    return site, sec
