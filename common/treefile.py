"""A nested state (dicts, lists, tuples, numbers, strings, numpy arrays, torch tensors) on disk
without pickle: the structure as JSON, every array in one safetensors file beside it.

``<name>.json`` holds the tree with each array replaced by a reference into ``<name>.safetensors``
and the SHA-256 of that file, so a JSON written against another arrays file (a crash between the two
writes, or a file swapped in by hand) is refused instead of loaded. Reading never executes code from
the files: JSON and safetensors are data formats only.

Encoded forms (a JSON object with exactly one of these keys):
  ``{"__tensor__": k}`` / ``{"__ndarray__": k}``   array ``k`` of the safetensors file, restored as a
                                                    torch tensor or a numpy array
  ``{"__tuple__": [...]}``                          a tuple (optimiser betas, RNG states)
  ``{"__dict__": [[key, value], ...]}``             a dict whose keys are not all strings (optimiser
                                                    state is keyed by parameter index)
Floats that are not finite are written as JSON's NaN/Infinity extensions (Python reads them back).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.fileio import atomic_write, atomic_write_text

_MARKERS = ("__tensor__", "__ndarray__", "__tuple__", "__dict__")


class TreeFileError(ValueError):
    """The files are missing, damaged, or do not belong together; the message says which and why."""


def _encode(obj: Any, arrays: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"a{len(arrays)}"
        arrays[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        if obj.dtype == object or obj.dtype.kind not in "biuf":
            raise TypeError(f"{where}: numpy arrays of dtype {obj.dtype} cannot be stored without pickle")
        key = f"a{len(arrays)}"
        arrays[key] = torch.from_numpy(np.ascontiguousarray(obj).copy())
        return {"__ndarray__": key}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not (len(obj) == 1 and next(iter(obj)) in _MARKERS):
            return {k: _encode(v, arrays, f"{where}.{k}") for k, v in obj.items()}
        return {
            "__dict__": [
                [_encode(k, arrays, f"{where} key"), _encode(v, arrays, f"{where}[{k!r}]")]
                for k, v in obj.items()
            ]
        }
    raise TypeError(f"{where}: a {type(obj).__name__} cannot be stored without pickle")


def _decode(obj: Any, arrays: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(obj, list):
        return [_decode(v, arrays, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        ((marker, value),) = obj.items()
        if marker in ("__tensor__", "__ndarray__"):
            if value not in arrays:
                raise TreeFileError(f"{where}: array {value!r} is missing from the arrays file")
            t = arrays[value]
            return t.clone() if marker == "__tensor__" else t.numpy().copy()
        if marker == "__tuple__":
            return tuple(_decode(v, arrays, where) for v in value)
        if marker == "__dict__":
            out = {}
            for pair in value:
                key = _decode(pair[0], arrays, where)
                out[key] = _decode(pair[1], arrays, where)
            return out
    return {k: _decode(v, arrays, where) for k, v in obj.items()}


def _arrays_path(json_path: Path) -> Path:
    return json_path.with_suffix(".safetensors")


def save_tree(json_path: Path, tree: Any) -> Path:
    """Write ``tree`` as ``json_path`` plus its ``.safetensors`` beside it, each atomically; the JSON
    (written last) names the arrays file's SHA-256, so the pair is only ever read together."""
    from safetensors.torch import save_file

    json_path = Path(json_path)
    arrays: dict[str, torch.Tensor] = {}
    body = _encode(tree, arrays, "state")
    apath = atomic_write(_arrays_path(json_path), lambda p: save_file(arrays, str(p)))
    digest = hashlib.sha256(apath.read_bytes()).hexdigest()
    doc = {"format": "dsfedmed-tree", "version": 1, "arrays_sha256": digest, "tree": body}
    return atomic_write_text(json_path, json.dumps(doc))


def load_tree(json_path: Path) -> Any:
    """The tree written by :func:`save_tree`, or :class:`TreeFileError` saying what is wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    json_path = Path(json_path)
    apath = _arrays_path(json_path)
    try:
        doc = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TreeFileError(f"{json_path} cannot be read as JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != "dsfedmed-tree" or doc.get("version") != 1:
        raise TreeFileError(f"{json_path} is not a dsfedmed state file (format dsfedmed-tree, version 1)")
    try:
        raw = apath.read_bytes()
    except OSError as exc:
        raise TreeFileError(f"{apath} (the arrays of {json_path.name}) cannot be read: {exc}") from None
    if hashlib.sha256(raw).hexdigest() != doc.get("arrays_sha256"):
        raise TreeFileError(
            f"{apath} is not the arrays file {json_path.name} was written with (SHA-256 differs)"
        )
    try:
        arrays = load(raw)
    except (SafetensorError, ValueError) as exc:
        raise TreeFileError(f"{apath} is not a readable safetensors file: {exc}") from None
    return _decode(doc["tree"], arrays, str(json_path))
