"""Conversion between numpy state dicts and Flower records, and exact byte accounting.

Bytes are counted from the real serialised objects Flower transmits: a Message is a tree of
"inflatable" objects (message, record dict, records, arrays, array chunks), each sent as its
deflated bytes and de-duplicated by content id.  :func:`message_nbytes` sums exactly those.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Message


def to_array_record(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def message_nbytes(msg: Message) -> int:
    """Serialised size of everything Flower sends for ``msg`` (content and metadata)."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    objects = get_all_nested_objects(msg)
    return sum(len(obj.deflate()) for obj in objects.values())
