"""Reading a site's audit log (``client_app.audit``): summaries and the check that no site data left.

The summary groups the replies by run, round and message type (bytes, arrays, errors, policy
refusals). :func:`data_leaks` compares every audited array with the site's own images and masks:
an array with the same bytes (sha256) as a real image or mask, or shaped like one, is reported.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class AuditLogError(ValueError):
    """The audit log is missing or a line cannot be read."""


def read_audit(path: Path) -> list[dict]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise AuditLogError(f"audit log not found: {path}")
    entries = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AuditLogError(
                f"{path}:{i} is not a JSON line ({exc.msg}); the log may be damaged"
            ) from None
        if not isinstance(entry, dict) or "message_type" not in entry or "records" not in entry:
            raise AuditLogError(f"{path}:{i} is not an audit entry (no message_type/records)")
        entries.append(entry)
    return entries


def select(entries: list[dict], run: int | None = None, site: str | None = None) -> list[dict]:
    return [
        e
        for e in entries
        if (run is None or e.get("run_id") == run) and (site is None or e.get("site") == site)
    ]


def summarise(entries: list[dict]) -> dict:
    """Bytes and messages per run and round, per message type, and every kind of array sent."""
    runs: dict = defaultdict(lambda: {"rounds": defaultdict(_bucket), "types": defaultdict(_bucket)})
    arrays: dict[tuple, int] = defaultdict(int)
    for e in entries:
        run = runs[e.get("run_id")]
        rnd = e.get("round")
        for b in (run["rounds"]["-" if rnd is None else rnd], run["types"][e["message_type"]]):
            b["replies"] += 1
            b["bytes"] += int(e.get("reply_bytes", 0))
            b["array_bytes"] += int(e.get("array_bytes", 0))
            b["errors"] += e.get("status") == "error"
            b["policy_refusals"] += e.get("policy", "ok") != "ok"
            b["sites"].add(e.get("site"))
        for r in e["records"]:
            for a in r.get("arrays", []):
                arrays[(e["message_type"], r["key"], a["name"], a["dtype"], len(a["shape"]))] += 1
    out = {"entries": len(entries), "runs": {}, "array_kinds": []}
    for run_id, run in sorted(runs.items(), key=lambda kv: str(kv[0])):
        out["runs"][str(run_id)] = {
            "rounds": {
                str(k): _plain(v) for k, v in sorted(run["rounds"].items(), key=lambda kv: str(kv[0]))
            },
            "message_types": {k: _plain(v) for k, v in sorted(run["types"].items())},
            "bytes": sum(v["bytes"] for v in run["types"].values()),
        }
    out["array_kinds"] = [
        {"message_type": t, "record": k, "array": n, "dtype": d, "ndim": nd, "count": c}
        for (t, k, n, d, nd), c in sorted(arrays.items())
    ]
    return out


def _bucket() -> dict:
    return {"replies": 0, "bytes": 0, "array_bytes": 0, "errors": 0, "policy_refusals": 0, "sites": set()}


def _plain(b: dict) -> dict:
    return {**b, "sites": sorted(str(s) for s in b["sites"])}


@dataclass(frozen=True)
class Leak:
    entry: int  # index in the entries
    what: str  # "same bytes as ..." or "shaped like ..."
    array: str  # "<message type> <record>/<array> <shape> <dtype>"
    blocking: bool  # identical bytes: blocking; the shape alone: a warning to look at


def _hashes(images: np.ndarray, masks: np.ndarray) -> dict[str, str]:
    """sha256 of every real image and mask as the site holds them, alone and stacked."""
    out = {}
    for kind, stack in (("image", images), ("mask", masks)):
        stack = np.ascontiguousarray(stack)
        out[hashlib.sha256(stack.tobytes()).hexdigest()] = f"all {kind}s"
        for i, a in enumerate(stack):
            for variant in (a, a[None], np.moveaxis(a, 0, -1), a.squeeze()):
                out[hashlib.sha256(np.ascontiguousarray(variant).tobytes()).hexdigest()] = f"{kind} #{i}"
    return out


def data_leaks(entries: list[dict], images: np.ndarray, masks: np.ndarray, native_sizes=()) -> list[Leak]:
    """Audited arrays that equal a real image/mask (blocking) or are shaped like one (warning).

    ``images`` (N,3,S,S) and ``masks`` (N,1,S,S) are the site's data as the app loads it;
    ``native_sizes`` the (H, W) sizes of its files on disk."""
    hashes = _hashes(images, masks)
    sizes = {tuple(images.shape[-2:])} | {tuple(s) for s in native_sizes}
    leaks = []
    for i, e in enumerate(entries):
        for r in e["records"]:
            for a in r.get("arrays", []):
                desc = f"{e['message_type']} {r['key']}/{a['name']} {tuple(a['shape'])} {a['dtype']}"
                if a["sha256"] in hashes:
                    leaks.append(Leak(i, f"same bytes as the site's {hashes[a['sha256']]}", desc, True))
                    continue
                shape = tuple(a["shape"])
                chw = len(shape) >= 3 and shape[-2:] in sizes and shape[-3] in (1, 3)
                hwc = len(shape) >= 3 and shape[-3:-1] in sizes and shape[-1] in (1, 3)
                hw = len(shape) == 2 and shape in sizes
                if chw or hwc or hw:
                    leaks.append(Leak(i, "shaped like a site image or mask", desc, False))
    return leaks
