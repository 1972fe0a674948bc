"""The site's audit log: one JSON line for every reply the ClientApp sends (on by default).

Each entry says what left the site and why: UTC time, run id, round, message type, the request's
config record (what the reply answered), and for the reply every record with its kind and keys,
each array's name, shape, dtype, byte size and sha256 (of the array's raw bytes), metric and config
values, the exact serialised size of the whole reply, and the policy outcome. Error replies are
logged too, with their code and reason. ``dsfedmed audit`` summarises the file.

Location: node config ``audit-log``; empty = ``<state root>/audit.jsonl`` (the folder that holds
``run-<id>/``); ``off`` = no log. Lines are appended under an exclusive lock, so several ClientApp
processes of one site (or, in simulation, several virtual sites sharing a folder) can share a file.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from flwr.app import Message

from client_app.errors import local_detail
from common.codec import message_nbytes
from common.config import NodeConfig
from common.data import default_cache_dir
from common.fileio import private_mkdir

log = logging.getLogger("dsfedmed.client")

AUDIT_VERSION = 1


def audit_path(node: NodeConfig) -> Path | None:
    if node.audit_log == "off":
        return None
    if node.audit_log:
        return Path(node.audit_log).expanduser()
    root = Path(node.state_dir).expanduser() if node.state_dir else default_cache_dir() / "state"
    return root / "audit.jsonl"


def _plain(v):
    if isinstance(v, bytes):
        return {"bytes": len(v), "sha256": hashlib.sha256(v).hexdigest()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if isinstance(v, float | int | str | bool) or v is None:
        return v
    return str(v)


def describe_records(msg: Message) -> tuple[list[dict], int]:
    """Every record of ``msg``'s content (kind, keys, arrays in detail) and the array bytes."""
    records, array_bytes = [], 0
    content = msg.content
    for key, rec in content.array_records.items():
        arrays = []
        for name, arr in rec.items():
            a = np.ascontiguousarray(arr.numpy())
            arrays.append(
                {
                    "name": name,
                    "shape": list(a.shape),
                    "dtype": str(a.dtype),
                    "bytes": len(arr.data),
                    "sha256": hashlib.sha256(a.tobytes()).hexdigest(),
                }
            )
            array_bytes += len(arr.data)
        records.append({"key": key, "kind": "array", "arrays": arrays})
    for key, rec in content.metric_records.items():
        records.append({"key": key, "kind": "metric", "values": {k: _plain(v) for k, v in rec.items()}})
    for key, rec in content.config_records.items():
        records.append({"key": key, "kind": "config", "values": {k: _plain(v) for k, v in rec.items()}})
    return records, array_bytes


def request_config(msg: Message) -> dict:
    """The request's config records (what the reply answers), arrays described but never copied."""
    if msg.has_error():
        return {}
    out = {key: {k: _plain(v) for k, v in rec.items()} for key, rec in msg.content.config_records.items()}
    arrays = {key: sorted(rec.keys()) for key, rec in msg.content.array_records.items()}
    if arrays:
        out["_received_arrays"] = arrays
    return out


class AuditLog:
    def __init__(self, path: Path | None):
        self.path = path

    def record(self, request: Message, reply: Message, *, run_id: int, site: str, policy: str) -> dict:
        """Append the entry for ``reply`` (an answer to ``request``) and return it."""
        cfg = request_config(request)
        server_round = None
        for rec in cfg.values():
            if isinstance(rec, dict) and "server-round" in rec:
                server_round = rec["server-round"]
        entry = {
            "v": AUDIT_VERSION,
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "run_id": int(run_id),
            "site": site,
            "round": server_round,
            "message_type": request.metadata.message_type,
            "request_id": request.metadata.message_id,
            "request_config": cfg,
            "status": "error" if reply.has_error() else "ok",
            "policy": policy,
        }
        if reply.has_error():
            # the reason sent (fixed text and incident id) and what the site knows (kept here only)
            entry.update(
                error_code=reply.error.code,
                error_reason=reply.error.reason,
                error_detail=local_detail(reply.error.reason),
                records=[],
            )
            entry["array_bytes"] = 0
        else:
            entry["records"], entry["array_bytes"] = describe_records(reply)
        entry["reply_bytes"] = message_nbytes(reply)
        if self.path is not None:
            self._append(json.dumps(entry, sort_keys=False) + "\n")
        return entry

    def _append(self, line: str) -> None:
        private_mkdir(self.path.parent)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
