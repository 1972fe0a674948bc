"""Segment images at a site with its own trained model (``dsfedmed predict``).

Where the model comes from:

- a site's state dir (``<state-dir>/run-<run id>/<site>/model.pt`` with its ``model.json`` sidecar,
  written by the ClientApp in DSFedMed's logits exchange; see ``client_app/state.py``);
- or a weights file: such a ``model.pt`` (a plain state dict), or a server checkpoint
  (``RUN_DIR/checkpoints/global_final.pt``: ``{"state_dict", "meta"}``, see
  ``server_app/rundir.py``), whose run's ``config.json`` then gives the image size.

Images are read and resized exactly as in training (``common.data.read_image`` and
``prepare_image``: RGB, bilinear to ``image-size``, uint8, then ``/255``), the network's
probabilities are resized back to each image's own size with torch (bilinear), and thresholded.
Nothing leaves the machine.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import nn

from common.data import IMAGE_EXTS, prepare_image, read_image
from common.fileio import atomic_write_text
from common.models import MODEL_NAMES, build_model, check_input_size, load_weights
from common.runtime import resolve_device
from common.transforms import to_float_batch

DEFAULT_MODEL = "unet"
DEFAULT_IMAGE_SIZE = 64
TINT = (0, 230, 90)  # foreground tint (green: medical images are mostly red)
OUTLINE = (255, 230, 0)  # mask outline
TRUTH = (255, 0, 255)  # reference-mask outline (site report overlays)


class PredictError(RuntimeError):
    """The model cannot be found, loaded or used (the CLI exits with code 2)."""


@dataclass
class SiteModel:
    """A trained segmentation network and what it expects."""

    model: nn.Module
    name: str
    in_channels: int
    image_size: int
    source: Path
    meta: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# --- finding and loading the model -----------------------------------------------------------------


def _run_id_of(path: Path) -> int | None:
    try:
        return int(path.name.removeprefix("run-"))
    except ValueError:
        return None


def find_site_model(state_dir: Path, site: str, run_id: int | None = None) -> Path:
    """The site's ``model.pt`` in a state dir: of run ``run_id``, else of the latest run (by the
    time the model was last saved)."""
    state_dir = Path(state_dir).expanduser()
    if not state_dir.is_dir():
        raise PredictError(f"state dir not found: {state_dir}")
    if run_id is not None:
        path = state_dir / f"run-{run_id}" / site / "model.pt"
        if not path.is_file():
            raise PredictError(f"no model of site {site!r} for run {run_id}: {path} does not exist")
        return path
    found = [
        p
        for p in state_dir.glob(f"run-*/{site}/model.pt")
        if p.is_file() and _run_id_of(p.parent.parent) is not None
    ]
    if not found:
        sites = sorted({p.parent.name for p in state_dir.glob("run-*/*/model.pt")})
        known = f"; models found for site(s): {', '.join(sites)}" if sites else ""
        raise PredictError(f"no model of site {site!r} under {state_dir} (run-*/{site}/model.pt){known}")
    return max(found, key=lambda p: p.stat().st_mtime_ns)


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PredictError(f"{path} cannot be read: {exc}") from None
    return data if isinstance(data, dict) else None


def _load_state(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """A state dict (and checkpoint meta, if any) from a plain state dict or a server checkpoint."""
    if not path.is_file():
        raise PredictError(f"weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise PredictError(f"{path} is not a readable torch weights file: {exc}") from None
    meta: dict = {}
    if isinstance(obj, dict) and "state_dict" in obj:
        meta = obj.get("meta") or {}
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise PredictError(f"{path} holds no state dict of tensors")
    return {k: v.numpy() for k, v in obj.items()}, meta if isinstance(meta, dict) else {}


def load_model(
    weights: Path,
    model: str | None = None,
    image_size: int | None = None,
    in_channels: int | None = None,
) -> SiteModel:
    """Build the network and load ``weights`` into it.

    What the network is comes from, in order: the arguments, the ``model.json`` next to the
    weights, the checkpoint's meta and its run's ``config.json`` (server checkpoints), and the
    defaults (``unet``, 64 px, 3 channels), which are reported in ``notes``.
    """
    weights = Path(weights).expanduser()
    state, ckpt_meta = _load_state(weights)
    sidecar = _read_json(weights.with_name("model.json")) or {}
    run_cfg: dict = {}
    if weights.parent.name == "checkpoints":
        run_cfg = (_read_json(weights.parent.parent / "config.json") or {}).get("run_config", {}) or {}
    notes: list[str] = []

    def pick(arg, *candidates, default, what):
        if arg is not None:
            return arg
        for c in candidates:
            if c not in (None, ""):
                return c
        notes.append(f"{what} not recorded with the weights; assuming {default!r}")
        return default

    name = pick(
        model,
        sidecar.get("model"),
        ckpt_meta.get("model"),
        run_cfg.get("model"),
        default=DEFAULT_MODEL,
        what="network",
    )
    size = int(
        pick(
            image_size,
            sidecar.get("image-size"),
            run_cfg.get("image-size"),
            default=DEFAULT_IMAGE_SIZE,
            what="image size",
        )
    )
    chans = int(in_channels or sidecar.get("in-channels") or 3)
    if name not in MODEL_NAMES:
        raise PredictError(f"unknown model {name!r}; registered: {', '.join(MODEL_NAMES)}")
    try:
        check_input_size(name, size)
    except ValueError as exc:
        raise PredictError(str(exc)) from None
    net = build_model(name, in_channels=chans)
    try:
        load_weights(net, state, name)
    except ValueError as exc:
        hint = f" ({'; '.join(notes)}: pass --model/--image-size)" if notes else ""
        raise PredictError(f"{weights}: {exc}{hint}") from None
    net.eval()
    meta = {**ckpt_meta, **sidecar}
    return SiteModel(net, name, chans, size, weights, meta, notes)


def load_site_model(state_dir: Path, site: str, run_id: int | None = None, **kw) -> SiteModel:
    return load_model(find_site_model(state_dir, site, run_id), **kw)


# --- inference and pictures ----------------------------------------------------------------------


def model_input(img: Image.Image, size: int, in_channels: int = 3) -> np.ndarray:
    """(C,S,S) uint8, exactly as the site's training data was prepared."""
    arr = prepare_image(img, size)
    return arr[:1] if in_channels == 1 else arr


@torch.no_grad()
def predict_probs(model: nn.Module, images: np.ndarray, device: torch.device) -> torch.Tensor:
    """Sigmoid probabilities (N,1,S,S) of uint8 (N,C,S,S) images, preprocessed as in training."""
    model.eval()
    return torch.sigmoid(model(to_float_batch(images).to(device))).cpu()


def resize_probs(probs: torch.Tensor, height: int, width: int) -> np.ndarray:
    """A (1,S,S) or (1,1,S,S) probability map at ``height``x``width`` (bilinear), as (H,W) float."""
    p = probs.reshape(1, 1, *probs.shape[-2:]).float()
    if p.shape[-2:] != (height, width):
        p = F.interpolate(p, size=(height, width), mode="bilinear", align_corners=False)
    return p[0, 0].numpy()


def outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """The inner border (``width`` px) of a boolean mask: the mask less its erosion (scipy.ndimage,
    4-neighbour)."""
    from scipy.ndimage import binary_erosion

    inner = binary_erosion(mask, iterations=max(1, width), border_value=0)
    return mask & ~inner


def _tint_cmap() -> str:
    """A one-colour matplotlib colormap (``TINT``) registered once, for MONAI's ``blend_images``."""
    import matplotlib
    from matplotlib.colors import ListedColormap

    name = "dsfedmed-tint"
    if name not in matplotlib.colormaps:
        matplotlib.colormaps.register(ListedColormap([np.array(TINT) / 255.0] * 2), name=name)
    return name


def overlay(
    rgb: np.ndarray,
    mask: np.ndarray,
    truth: np.ndarray | None = None,
    alpha: float = 0.4,
    line: int | None = None,
) -> np.ndarray:
    """(H,W,3) uint8: the image with the predicted mask tinted (MONAI ``blend_images``) and outlined
    (and the reference mask, if given, outlined in another colour)."""
    from monai.visualize import blend_images

    mask = mask.astype(bool)
    line = line or max(1, round(min(mask.shape) / 256))
    image = np.moveaxis(rgb.astype(np.float32) / 255.0, -1, 0)
    blended = blend_images(image, mask[None].astype(np.float32), alpha, _tint_cmap(), rescale_arrays=False)
    out = np.moveaxis(np.asarray(blended), 0, -1) * 255.0
    out[outline(mask, line)] = OUTLINE
    if truth is not None:
        out[outline(truth.astype(bool), line)] = TRUTH
    return out.round().clip(0, 255).astype(np.uint8)


# --- a folder --------------------------------------------------------------------------------------


def list_images(folder: Path) -> list[Path]:
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise PredictError(f"image folder not found: {folder}")
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")
    )
    if not files:
        raise PredictError(f"no image files ({', '.join(IMAGE_EXTS)}) in {folder}")
    return files


def _out_names(files: list[Path]) -> dict[Path, str]:
    """``<stem>``, or ``<name with dots as underscores>`` where two files share a stem."""
    stems: dict[str, int] = {}
    for f in files:
        stems[f.stem] = stems.get(f.stem, 0) + 1
    return {f: f.stem if stems[f.stem] == 1 else f.name.replace(".", "_") for f in files}


@dataclass
class PredictResult:
    images: list[dict]
    failed: list[dict]
    summary_path: Path


def predict_folder(
    sm: SiteModel,
    images_dir: Path,
    out_dir: Path,
    threshold: float = 0.5,
    device: str = "auto",
    on_image: Callable[[Path], None] | None = None,
    files: list[Path] | None = None,
) -> PredictResult:
    """Write ``<name>_mask.png`` (0/255, original size) and ``<name>_overlay.png`` for every image,
    and ``predictions.json``. Unreadable images are skipped and listed in ``failed``."""
    if not 0.0 < threshold < 1.0:
        raise PredictError(f"threshold must lie strictly between 0 and 1 (got {threshold})")
    try:
        dev = resolve_device(device)
    except RuntimeError as exc:
        raise PredictError(str(exc)) from None
    files = files if files is not None else list_images(images_dir)
    out_dir = Path(out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    model = sm.model.to(dev)
    names = _out_names(files)
    done, failed = [], []
    for f in files:
        try:
            try:
                img = read_image(f)
            except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
                failed.append({"file": f.name, "reason": f"unreadable or truncated image: {exc}"})
                continue
            x = model_input(img, sm.image_size, sm.in_channels)[None]
            probs = resize_probs(predict_probs(model, x, dev)[0], img.height, img.width)
            mask = probs >= threshold
            rgb = np.asarray(img.convert("RGB"))
            name = names[f]
            mask_path, ov_path = out_dir / f"{name}_mask.png", out_dir / f"{name}_overlay.png"
            Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
            Image.fromarray(overlay(rgb, mask)).save(ov_path)
            done.append(
                {
                    "file": f.name,
                    "width": img.width,
                    "height": img.height,
                    "foreground_fraction": float(mask.mean()),
                    "mean_probability": float(probs.mean()),
                    "mask": mask_path.name,
                    "overlay": ov_path.name,
                }
            )
        finally:
            if on_image is not None:
                on_image(f)
    summary = {
        "model": sm.name,
        "weights": str(sm.source),
        "run_id": sm.meta.get("run-id"),
        "site": sm.meta.get("site"),
        "round": sm.meta.get("round"),
        "image_size": sm.image_size,
        "in_channels": sm.in_channels,
        "threshold": threshold,
        "device": str(dev),
        "images_dir": str(Path(images_dir).expanduser().resolve()),
        "n_images": len(done),
        "n_failed": len(failed),
        "notes": sm.notes,
        "images": done,
        "failed": failed,
    }
    path = atomic_write_text(out_dir / "predictions.json", json.dumps(summary, indent=2) + "\n")
    return PredictResult(done, failed, path)
