"""Probability maps as they cross the network (framework-neutral: numpy and torch only)."""

from __future__ import annotations

import numpy as np

# --- soft targets and logits on synthetic samples ------------------------------------------------
# They cross the network as probabilities at a reduced resolution, either float16 or uint8-quantised
# (p * 255, rounded): 64x64 uint8 is 4 KiB per sample, 64x smaller than float32 logits at 256 px.

PROB_DTYPES = ("float16", "uint8")


def encode_probs(probs, size: int, dtype: str) -> np.ndarray:
    """(N,1,H,W) probabilities in [0,1] (torch or numpy) -> compact array at ``size`` px."""
    import torch
    import torch.nn.functional as F

    if dtype not in PROB_DTYPES:
        raise ValueError(f"unknown probability dtype {dtype!r}; expected one of {PROB_DTYPES}")
    t = torch.as_tensor(probs, dtype=torch.float32)
    if t.ndim != 4 or t.shape[1] != 1:
        raise ValueError(f"expected probabilities of shape (N,1,H,W), got {tuple(t.shape)}")
    if not torch.isfinite(t).all() or t.min() < 0 or t.max() > 1:
        raise ValueError("probabilities must be finite and within [0, 1]")
    if t.shape[-1] != size or t.shape[-2] != size:
        t = F.interpolate(t, size=(size, size), mode="area")
    if dtype == "float16":
        return t.numpy().astype(np.float16)
    return np.round(t.numpy() * 255.0).astype(np.uint8)


def decode_probs(arr: np.ndarray, expected_n: int | None = None, expected_size: int | None = None):
    """Inverse of :func:`encode_probs`, validating dtype, shape and range; returns float32 torch.

    Dtype, shape and values are checked on the array as received, before it is converted, so a
    wrong or oversized array costs no float32 copy. ``common.validation.check_probs`` wraps this
    with the record's name; both ends use it."""
    import torch

    arr = np.asarray(arr)
    if arr.dtype not in (np.uint8, np.float16):
        raise ValueError(f"probabilities must be uint8 or float16, got {arr.dtype}")
    if arr.ndim != 4 or arr.shape[1] != 1:
        raise ValueError(f"probabilities must have shape (N,1,S,S), got {arr.shape}")
    if expected_n is not None and arr.shape[0] != expected_n:
        raise ValueError(f"expected probabilities for {expected_n} samples, got {arr.shape[0]}")
    if expected_size is not None and arr.shape[-2:] != (expected_size, expected_size):
        raise ValueError(f"expected {expected_size}x{expected_size} probabilities, got {arr.shape[-2:]}")
    if arr.dtype == np.uint8:
        return torch.from_numpy(arr.astype(np.float32) / 255.0)
    if not np.isfinite(arr).all() or arr.min(initial=0) < 0 or arr.max(initial=0) > 1:
        raise ValueError("probabilities hold non-finite or out-of-range values")
    return torch.from_numpy(arr.astype(np.float32))
