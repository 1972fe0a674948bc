"""Registry of lightweight MONAI segmentation networks for hospital sites.

Each entry is a builder ``(in_channels, out_channels) -> nn.Module`` with small default widths,
so a site on a CPU trains it in seconds per epoch at 64-128 px.  All networks output raw
logits (one channel per foreground class); sigmoid is applied by losses and metrics.
Nothing here downloads weights: FlexibleUNet's EfficientNet encoder is built randomly initialised.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from common.validation import check_weights


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    builder: Callable[[int, int], nn.Module]
    min_size_multiple: int  # input height/width must be a multiple of this


def _unet(in_ch: int, out_ch: int) -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=2,
        in_channels=in_ch,
        out_channels=out_ch,
        channels=(16, 32, 64, 128),
        strides=(2, 2, 2),
        num_res_units=1,
        norm="instance",  # batch statistics averaged across shifted sites hurt FedAvg badly
    )


def _unet_m(in_ch: int, out_ch: int) -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=2,
        in_channels=in_ch,
        out_channels=out_ch,
        channels=(16, 32, 64, 128, 256),
        strides=(2, 2, 2, 2),
        num_res_units=2,
        norm="instance",
    )


def _basicunet(in_ch: int, out_ch: int) -> nn.Module:
    from monai.networks.nets import BasicUNet

    return BasicUNet(
        spatial_dims=2,
        in_channels=in_ch,
        out_channels=out_ch,
        features=(8, 16, 32, 64, 128, 8),
    )


def _segresnet(in_ch: int, out_ch: int) -> nn.Module:
    from monai.networks.nets import SegResNet

    return SegResNet(
        spatial_dims=2,
        in_channels=in_ch,
        out_channels=out_ch,
        init_filters=8,
        blocks_down=(1, 2, 2, 4),
        blocks_up=(1, 1, 1),
    )


def _flexunet(in_ch: int, out_ch: int) -> nn.Module:
    from monai.networks.nets import FlexibleUNet

    return FlexibleUNet(
        in_channels=in_ch,
        out_channels=out_ch,
        backbone="efficientnet-b0",
        pretrained=False,
        spatial_dims=2,
        decoder_channels=(128, 64, 32, 16, 8),
    )


def _attentionunet(in_ch: int, out_ch: int) -> nn.Module:
    from monai.networks.nets import AttentionUnet

    return AttentionUnet(
        spatial_dims=2,
        in_channels=in_ch,
        out_channels=out_ch,
        channels=(8, 16, 32, 64),
        strides=(2, 2, 2),
    )


REGISTRY: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec(
            "unet", "MONAI UNet, residual units, instance norm, channels 16-128 (~0.2 M params)", _unet, 8
        ),
        ModelSpec(
            "unet-m",
            "MONAI UNet, 2 residual units, instance norm, channels 16-256 (~1.6 M params; the "
            "benchmark's calibrated site model)",
            _unet_m,
            16,
        ),
        ModelSpec("basicunet", "MONAI BasicUNet, features 8-128", _basicunet, 16),
        ModelSpec("segresnet", "MONAI SegResNet, 8 initial filters", _segresnet, 8),
        ModelSpec(
            "flexunet-effb0",
            "MONAI FlexibleUNet, EfficientNet-B0 encoder (random init, no download)",
            _flexunet,
            32,
        ),
        ModelSpec("attentionunet", "MONAI AttentionUnet, channels 8-64", _attentionunet, 8),
    )
}
MODEL_NAMES: tuple[str, ...] = tuple(REGISTRY)


def build_model(name: str, in_channels: int = 3, out_channels: int = 1) -> nn.Module:
    """Build a registered network by name (raises ``KeyError`` naming the known models)."""
    try:
        spec = REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(MODEL_NAMES)}") from None
    return spec.builder(in_channels, out_channels)


def load_weights(model: nn.Module, weights: dict[str, np.ndarray], name: str = "model") -> None:
    """Load a ``{name: array}`` state dict after checking it fits (same keys, same shapes, real
    dtypes, finite: :func:`common.validation.check_weights`, the check the server applies too).

    Flower serialises 0-d tensors (batch-norm counters) as shape (1,); they are restored here.
    """
    own = model.state_dict()
    arrays = {k: np.asarray(v) for k, v in weights.items()}
    for k, ref in own.items():
        if k in arrays and ref.dim() == 0 and arrays[k].size == 1:
            arrays[k] = arrays[k].reshape(())
    check_weights(arrays, {k: tuple(v.shape) for k, v in own.items()}, f"model {name!r}")
    model.load_state_dict(
        {k: torch.from_numpy(np.ascontiguousarray(arrays[k])).to(ref.dtype) for k, ref in own.items()}
    )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_input_size(name: str, image_size: int) -> None:
    """Fail early, with the reason, when a network cannot take ``image_size`` inputs."""
    mult = REGISTRY[name].min_size_multiple
    if image_size % mult:
        raise ValueError(f"model {name!r} needs image-size to be a multiple of {mult} (got {image_size})")
