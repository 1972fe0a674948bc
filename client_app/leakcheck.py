"""Before a reply leaves: does any array in it hold a copy of one of the site's images?

Every square plane of every outgoing array (the last two axes, at least ``MIN_SIDE`` on a side:
probability maps, feature maps, anything image-shaped; small convolution kernels are not planes) is
compared with each of the site's images, converted to grey and resized to the plane's size with
area averaging (as the protocol resizes). The test is Pearson correlation: a plane that correlates
above ``THRESHOLD`` with a site image is taken as a copy (resized, in any dtype, float or uint8, any
affine change of brightness or contrast) and the reply is withheld.

What it does not catch, stated plainly: an image that was cropped, shifted, flipped, rotated or
encoded (for example spread over weights); a copy of a *mask* (the site's answers are mask-like by
design, so masks are not compared: a probability map that looks like a lesion is the protocol's
purpose); planes that are not square. It is a last guard against a careless or altered app, not a
privacy proof; the audit log and ``dsfedmed audit --data-dir`` check what did leave.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

THRESHOLD = 0.95
MIN_SIDE = 8
MAX_PLANES = 4096  # per array: more planes than this are sampled evenly (weights of big layers)


def _standardise(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` to zero mean and unit norm; constant rows become zero (never a match)."""
    x = x - x.mean(dim=1, keepdim=True)
    n = x.norm(dim=1, keepdim=True)
    return torch.where(n > 1e-8, x / n.clamp_min(1e-8), torch.zeros_like(x))


def _references(images: np.ndarray, side: int, cache: dict[int, torch.Tensor]) -> torch.Tensor:
    if side not in cache:
        grey = torch.from_numpy(np.asarray(images, dtype=np.float32)).mean(dim=1, keepdim=True)
        small = F.interpolate(grey, size=(side, side), mode="area")
        cache[side] = _standardise(small.reshape(len(images), -1))
    return cache[side]


def image_copies(
    arrays: dict[str, np.ndarray], images: np.ndarray, threshold: float = THRESHOLD
) -> list[str]:
    """Where ``arrays`` (name -> array) hold a plane correlating above ``threshold`` with one of
    ``images`` ((N, C, H, W)); an empty list when none does."""
    if images is None or len(images) == 0:
        return []
    found: list[str] = []
    refs: dict[int, torch.Tensor] = {}
    for name, arr in arrays.items():
        a = np.asarray(arr)
        if a.ndim < 2 or a.dtype.kind not in "biuf" or a.shape[-1] != a.shape[-2] or a.shape[-1] < MIN_SIDE:
            continue
        side = a.shape[-1]
        planes = torch.from_numpy(a.reshape(-1, side * side).astype(np.float32))
        if len(planes) > MAX_PLANES:
            planes = planes[torch.linspace(0, len(planes) - 1, MAX_PLANES).long()]
        corr = _standardise(planes) @ _references(images, side, refs).T
        best, where = corr.max(dim=1)
        i = int(best.argmax())
        if float(best[i]) > threshold:
            found.append(
                f"array '{name}' plane {i} correlates {float(best[i]):.3f} with site image {int(where[i])} "
                f"resized to {side}x{side} (threshold {threshold})"
            )
    return found
