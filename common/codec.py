"""Conversion between numpy state dicts and Flower records, exact byte accounting, and the checked
decoding of a received record (bytes bounded before anything is decoded; the bounds and the
framework-neutral checks are in common/validation.py, probability maps in common/probs.py).
The only module of ``common`` besides ``protocol`` that knows Flower's types.

Bytes are counted from the real serialised objects Flower transmits: a Message is a tree of
"inflatable" objects (message, record dict, records, arrays, array chunks), each sent as its
deflated bytes and de-duplicated by content id.  :func:`message_nbytes` sums exactly those.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from common import protocol as P
from common.probs import PROB_DTYPES, decode_probs, encode_probs  # noqa: F401 - re-exported
from common.validation import (
    PayloadInvalid,
    check_pool,
    check_probs,
    check_weights,
    pool_bounds,
    pool_record_limit,
    probs_record_limit,
    weights_record_limit,
)


def to_array_record(state: dict[str, np.ndarray]) -> ArrayRecord:
    """Named numpy arrays as a record. Kept because Flower builds an ArrayRecord from Arrays, a torch
    state dict or an *unnamed* list of ndarrays; the protocol's records are named numpy arrays
    (probabilities, the pool, weights that both ends check as numpy)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def half_precision(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Weights as they travel when half the bytes are enough (the generator upload with
    ``gen-upload-dtype`` float16, the FM decoder in the teacher's rounds): float32/64 arrays as
    float16, the rest unchanged. The receiver casts them back to its model's dtype."""
    return {k: v.astype(np.float16) if v.dtype in (np.float32, np.float64) else v for k, v in state.items()}


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """A record's arrays by name (``ArrayRecord.to_numpy_ndarrays`` drops the names)."""
    return {k: v.numpy() for k, v in record.items()}


def message_nbytes(msg: Message) -> int:
    """Serialised size of everything Flower sends for ``msg`` (content and metadata)."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    objects = get_all_nested_objects(msg)
    return sum(len(obj.deflate()) for obj in objects.values())


# --- records checked before they are used (the bounds and checks are common/validation.py) ------


def record_nbytes(record: ArrayRecord) -> int:
    """Serialised bytes of a record's arrays (what was received, before any decoding)."""
    return sum(len(a.data) for a in record.values())


def check_array_bytes(record: ArrayRecord, limit: int, what: str) -> None:
    """Reject a record whose arrays hold more bytes than ``limit``, before they are decoded."""
    n = record_nbytes(record)
    if n > limit:
        raise PayloadInvalid(
            f"{what} holds {n} bytes, more than the {limit} the protocol allows for it; not decoded"
        )


# --- decoding ------------------------------------------------------------------------------------


def decode_array(array: Array, what: str) -> np.ndarray:
    """An ``Array``'s numpy value; unreadable bytes (not ``.npy``, pickled objects) are rejected."""
    try:
        arr = array.numpy()
    except Exception as exc:  # noqa: BLE001 - whatever np.load makes of the bytes, it is a bad payload
        raise PayloadInvalid(
            f"{what} cannot be decoded as a numpy array: {type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(arr, np.ndarray):  # an .npz or other container
        raise PayloadInvalid(f"{what} is not a single numpy array")
    return arr


def decode_record(record: ArrayRecord, what: str) -> dict[str, np.ndarray]:
    return {k: decode_array(a, f"{what} array {k!r}") for k, a in record.items()}


def check_probs_record(
    record: ArrayRecord | None, n: int, size: int, dtype: str | None = None, key: str = P.KEY_SITE_PROBS
):
    """A probabilities record (``site-probs`` or ``soft-targets``): present, only a ``probs`` array,
    no more bytes than ``n`` maps at ``size`` px, then :func:`check_probs`."""
    if record is None:
        raise PayloadInvalid(f"no '{key}' record")
    if P.ARR_PROBS not in record:
        raise PayloadInvalid(f"'{key}' record has no '{P.ARR_PROBS}' array")
    extra = sorted(set(record.keys()) - {P.ARR_PROBS})
    if extra:
        raise PayloadInvalid(f"'{key}' record holds unexpected arrays {extra[:3]}")
    check_array_bytes(record, probs_record_limit(n, size), f"'{key}' record")
    arr = decode_array(record[P.ARR_PROBS], f"'{key}' array '{P.ARR_PROBS}'")
    return check_probs(arr, n, size, dtype, what=f"'{key}'")


def array_shapes(record: ArrayRecord) -> dict[str, tuple[int, ...]]:
    """Name -> shape of a record's arrays, from their metadata (nothing is decoded)."""
    return {k: tuple(a.shape) for k, a in record.items()}


def check_weights_record(
    record: ArrayRecord | None, reference: Mapping[str, Iterable[int]], what: str, key: str = P.KEY_ARRAYS
) -> dict[str, np.ndarray]:
    """A weights record: present, within the reference model's byte size, then :func:`check_weights`."""
    if record is None:
        raise PayloadInvalid(f"no '{key}' record")
    check_array_bytes(record, weights_record_limit(reference), f"'{key}' record")
    state = decode_record(record, f"'{key}' record")
    check_weights(state, reference, what)
    return state


def check_pool_record(
    record: ArrayRecord | None,
    *,
    max_n: int | None = None,
    max_size: int | None = None,
    key: str = P.KEY_POOL,
) -> tuple[np.ndarray, np.ndarray]:
    """A pool record: present with ``images`` and ``masks``, within ``max_n`` pairs at ``max_size`` px
    by its byte size, then :func:`check_pool`."""
    if record is None:
        raise PayloadInvalid(f"no '{key}' record")
    for name in (P.ARR_IMAGES, P.ARR_MASKS):
        if name not in record:
            raise PayloadInvalid(f"'{key}' record has no '{name}' array")
    if max_n is not None and max_size is not None:
        check_array_bytes(record, pool_record_limit(max_n, max_size), f"'{key}' record")
    images = decode_array(record[P.ARR_IMAGES], f"'{key}' array '{P.ARR_IMAGES}'")
    masks = decode_array(record[P.ARR_MASKS], f"'{key}' array '{P.ARR_MASKS}'")
    check_pool(images, masks, max_n=max_n, max_size=max_size, what=key)
    return images, masks


def check_request_bytes(content, run) -> None:
    """A site's size gate on a request, before any handler decodes it: the pool within
    :func:`pool_bounds`, soft targets within the selected samples' (at most ``pool-size``) maps."""
    n_pool, side = pool_bounds(run)
    arrays = content.array_records
    if P.KEY_POOL in arrays:
        check_array_bytes(arrays[P.KEY_POOL], pool_record_limit(n_pool, side), f"'{P.KEY_POOL}' record")
    if P.KEY_SOFT in arrays:
        conf = content.config_records.get(P.KEY_CONFIG)
        selected = conf.get(P.CFG_SELECTED, []) if conf is not None else []
        n = len(selected) if isinstance(selected, list) and selected else n_pool
        if n > n_pool:
            raise PayloadInvalid(f"{n} selected samples, more than pool-size {n_pool}")
        check_array_bytes(arrays[P.KEY_SOFT], probs_record_limit(n, run.logit_size), f"'{P.KEY_SOFT}' record")
