"""The protocol's payload checks, in one place, used by both ends.

Whatever crosses the network is checked here before it is used: the server checks every site reply
(probabilities, weights, metrics, generator weights) before it is averaged, and a site checks every
request (the synthetic pool, soft targets, weights) before it trains on it.  Every check raises
:class:`PayloadInvalid`, a ``ValueError`` whose message names the record or array and says what the
protocol expects, so the server can log and book the reason and a site can answer with it
(``ERR_PAYLOAD``).

Sizes are bounded *before* an array is decoded: a Flower ``Array`` carries its serialised bytes
(``.npy``), and :func:`check_array_bytes` compares their length with what the protocol and the run
config allow, plus :data:`NPY_HEADER_MAX` per array: probabilities, ``n * logit-size**2`` values and
weights, the reference model's values, at no more than 8 bytes a value (the widest real dtype, so a
same-shape array of a wrong dtype is decoded and reported as a wrong dtype); the pool, ``pool-size``
uint8 pairs at ``max(image-size, gen-size)``.  A huge array is turned away on its length alone, never
loaded, converted or averaged.  After decoding, dtype and shape are checked exactly (probabilities:
uint8 or float16, the run's logit-dtype where known, so exactly ``n * logit-size**2`` bytes or twice
that), before any conversion.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from common import protocol as P
from common.probs import decode_probs

NPY_HEADER_MAX = 1024
"""Bytes allowed per array on top of its values: the ``.npy`` header (128 bytes for ordinary arrays)."""

MAX_ITEMSIZE = 8
"""Real number types that may cross (bool, (u)int8..64, float16..64) take at most 8 bytes a value."""

POOL_MIN_SIZE = 8  # smallest synthetic-image side a site accepts


class PayloadInvalid(ValueError):
    """A record or array does not fit the protocol; the message says which and what was expected."""


# --- sizes ---------------------------------------------------------------------------------------


def probs_record_limit(n: int, size: int) -> int:
    """Most bytes a probabilities record (one ``probs`` array of ``n`` maps at ``size`` px) may hold
    before it is decoded: 8 bytes a value.  A record within it is decoded and must then be exactly
    ``n`` maps at ``size`` px of uint8 or float16 (the run's logit-dtype where the check knows it),
    so what is used is never more than ``n * size**2 * 2`` bytes; a wrong dtype is reported as such,
    anything larger as too many bytes."""
    return int(n) * int(size) ** 2 * MAX_ITEMSIZE + NPY_HEADER_MAX


def weights_record_limit(reference: Mapping[str, Iterable[int]]) -> int:
    """Most bytes a weights record may hold: the reference model's values at 8 bytes each."""
    return sum(
        int(np.prod(tuple(shape), dtype=np.int64)) * MAX_ITEMSIZE + NPY_HEADER_MAX
        for shape in reference.values()
    )


def pool_record_limit(n: int, size: int) -> int:
    """Most bytes a pool record may hold: ``n`` uint8 RGB images and masks at ``size`` px."""
    return int(n) * 4 * int(size) ** 2 + 2 * NPY_HEADER_MAX


# --- probabilities (soft targets, site probabilities) --------------------------------------------


def check_probs(
    arr: np.ndarray, n: int | None, size: int | None, dtype: str | None = None, what: str = "probabilities"
):
    """Decoded probabilities (float32 torch, (n,1,size,size), finite, in [0,1]) via
    :func:`common.probs.decode_probs`; ``dtype`` (when given) is the run's ``logit-dtype``."""
    arr = np.asarray(arr)
    if dtype is not None and arr.dtype != np.dtype(dtype):
        raise PayloadInvalid(f"{what}: probabilities are {arr.dtype}, the run's logit-dtype is {dtype}")
    try:
        return decode_probs(arr, expected_n=n, expected_size=size)
    except ValueError as exc:
        raise PayloadInvalid(f"{what}: {exc}") from None


# --- weights -------------------------------------------------------------------------------------


def check_weights(state: Mapping[str, np.ndarray], reference: Mapping[str, Iterable[int]], what: str) -> None:
    """Weights fit ``reference`` (name -> shape): the same names, the same shapes, real number types
    of at most 8 bytes, finite values.  ``what`` names the model in the reason."""
    missing = sorted(set(reference) - set(state))
    extra = sorted(set(state) - set(reference))
    if missing or extra:
        raise PayloadInvalid(
            f"weights do not fit {what}: {len(missing)} missing {missing[:3]}, {len(extra)} unexpected {extra[:3]}"
        )
    for k, shape in reference.items():
        arr = np.asarray(state[k])
        if arr.dtype.kind not in "biuf" or arr.dtype.itemsize > MAX_ITEMSIZE:
            raise PayloadInvalid(
                f"weight {k!r} has dtype {arr.dtype}; weights are real numbers of at most 8 bytes"
            )
        if tuple(arr.shape) != tuple(shape):
            raise PayloadInvalid(f"weight {k!r} has shape {tuple(arr.shape)}, {what} needs {tuple(shape)}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise PayloadInvalid(f"weight {k!r} holds non-finite values")


# --- metrics -------------------------------------------------------------------------------------


def _number(v: Any) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool | np.bool_)


def check_metrics(
    record: Mapping[str, Any] | None,
    required: Iterable[str] = (),
    *,
    positive: Iterable[str] = (),
    counts: Iterable[str] = (),
    nonnegative: Iterable[str] = (),
    unit: Iterable[str] = (),
    what: str = P.KEY_METRICS,
) -> dict[str, float]:
    """A metrics (or stats) record: ``required`` keys present as finite numbers; ``counts`` whole and
    >= 0, ``positive`` > 0, ``nonnegative`` >= 0, ``unit`` within [0, 1].  Returns the required values."""
    if record is None:
        raise PayloadInvalid(f"no '{what}' record")
    out: dict[str, float] = {}
    positive, counts, nonnegative, unit = set(positive), set(counts), set(nonnegative), set(unit)
    for k in required:
        if k not in record:
            raise PayloadInvalid(f"'{what}' record lacks '{k}'")
        v = record[k]
        if not _number(v) or not np.isfinite(float(v)):
            raise PayloadInvalid(f"'{k}' in '{what}' is {v!r}, expected a finite number")
        v = float(v)
        if k in counts and (v < 0 or not v.is_integer()):
            raise PayloadInvalid(f"'{k}' in '{what}' is {v!r}, expected a whole number >= 0")
        if k in positive and v <= 0:
            raise PayloadInvalid(f"'{k}' in '{what}' is {v!r}, expected a positive number")
        if k in nonnegative and v < 0:
            raise PayloadInvalid(f"'{k}' in '{what}' is {v!r}, expected a number >= 0")
        if k in unit and not 0.0 <= v <= 1.0:
            raise PayloadInvalid(f"'{k}' in '{what}' is {v!r}, expected a value within [0, 1]")
        out[k] = v
    return out


def check_train_metrics(record: Mapping[str, Any] | None) -> float:
    """A train reply's metrics: a positive whole number of examples (the averaging weight)."""
    n = P.MET_NUM_EXAMPLES
    return check_metrics(record, (n,), counts=(n,), positive=(n,))[n]


def check_eval_metrics(record: Mapping[str, Any] | None) -> dict[str, float]:
    """An evaluate reply's metrics: a whole number of images >= 0 and, when there were images, Dice and
    IoU (threshold-averaged and at 0.5) within [0, 1] (an empty split reports n = 0 and no score)."""
    n = P.MET_NUM_EXAMPLES
    out = check_metrics(record, (n,), counts=(n,))
    if out[n] > 0:
        keys = (P.MET_DICE, P.MET_IOU, P.MET_DICE05, P.MET_IOU05)
        out.update(check_metrics(record, keys, unit=keys))
    return out


# --- profile -------------------------------------------------------------------------------------

_PROFILE_COUNTS = (
    "n-train",
    "n-val",
    "n-test",
    "n-skipped",
    "channels",
    "num-classes",
    "image-size",
    "model-params",
)
_PROFILE_TEXT = ("site", "data-report", "model", "device")


def check_profile(record: Mapping[str, Any] | None) -> dict[str, Any]:
    """A ``query.profile`` reply: exactly the protocol's fields, counts as whole numbers >= 0, names
    as short non-empty strings, versions as a list of strings. Returns the profile as a dict."""
    if record is None:
        raise PayloadInvalid(f"no '{P.KEY_PROFILE}' record")
    prof = dict(record)
    missing = [k for k in P.PROFILE_FIELDS if k not in prof]
    extra = sorted(set(prof) - set(P.PROFILE_FIELDS))
    if missing or extra:
        raise PayloadInvalid(f"'{P.KEY_PROFILE}' record lacks {missing} / has unexpected {extra}")
    check_metrics(prof, _PROFILE_COUNTS, counts=_PROFILE_COUNTS, what=P.KEY_PROFILE)
    for k in _PROFILE_TEXT:
        v = prof[k]
        if not isinstance(v, str) or not v.strip() or len(v) > 200:
            raise PayloadInvalid(f"'{k}' in '{P.KEY_PROFILE}' is {v!r}, expected a non-empty string")
    if len(prof["site"]) > 64:
        raise PayloadInvalid(
            f"'site' in '{P.KEY_PROFILE}' is {len(prof['site'])} characters long (at most 64)"
        )
    versions = prof["versions"]
    if not isinstance(versions, list) or not all(isinstance(v, str) for v in versions):
        raise PayloadInvalid(f"'versions' in '{P.KEY_PROFILE}' is {versions!r}, expected a list of strings")
    return prof


# --- synthetic pool ------------------------------------------------------------------------------


def check_pool(
    images: np.ndarray,
    masks: np.ndarray,
    *,
    max_n: int | None = None,
    max_size: int | None = None,
    what: str = "pool",
) -> None:
    """Synthetic pairs: images uint8 (N,3,S,S) with ``POOL_MIN_SIZE`` <= S <= ``max_size``, N <= ``max_n``,
    masks uint8 (N,1,S,S) in {0,1}."""
    images, masks = np.asarray(images), np.asarray(masks)
    if (
        images.dtype != np.uint8
        or images.ndim != 4
        or images.shape[1] != 3
        or images.shape[2] != images.shape[3]
        or images.shape[2] < POOL_MIN_SIZE
    ):
        raise PayloadInvalid(
            f"{what} images must be uint8 (N,3,S,S) with S >= {POOL_MIN_SIZE}, got {images.dtype} {images.shape}"
        )
    if masks.dtype != np.uint8 or masks.shape != (images.shape[0], 1, *images.shape[2:]):
        raise PayloadInvalid(
            f"{what} masks must be {{0,1}} uint8 (N,1,S,S) matching the images {images.shape}, "
            f"got {masks.dtype} {masks.shape}"
        )
    if masks.max(initial=0) > 1:
        raise PayloadInvalid(f"{what} masks must be {{0,1}} uint8 (N,1,S,S), got values up to {masks.max()}")
    if max_n is not None and len(images) > max_n:
        raise PayloadInvalid(f"{what} holds {len(images)} pairs, more than pool-size {max_n}")
    if max_size is not None and images.shape[2] > max_size:
        raise PayloadInvalid(f"{what} images are {images.shape[2]} px, larger than the run's {max_size} px")


def pool_bounds(run) -> tuple[int, int]:
    """(most pairs, largest side) of any pool the server of this run sends: ``pool-size`` pairs, made
    at ``gen-size`` (generator, phantom fallback) or ``image-size`` (phantoms, folder)."""
    return int(run.pool_size), max(int(run.image_size), int(run.gen_size))
