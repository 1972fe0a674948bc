"""What may leave the site: the protocol's records per message type, and strings that cannot name
anything at the site.

Every reply is checked here before it is written to the audit log and sent, whatever the handler
(or code the coordinator shipped in a changed app) put into it:
- record names and kinds are exactly the protocol's for that message type (``REPLY_SCHEMA``);
- a profile holds exactly :data:`common.protocol.PROFILE_FIELDS`;
- every string in a reply (config values, record, array and metric names) is short, printable and
  free of path separators, and is not a hex digest (which could be a hash of a site file).
A reply that breaks a rule is not sent: the site answers with an internal error instead.
"""

from __future__ import annotations

import re

from flwr.app import Message

from common import protocol as P

# message type -> record name -> record kind
REPLY_SCHEMA: dict[str, dict[str, str]] = {
    P.MSG_QUERY_PROFILE: {P.KEY_PROFILE: "config"},
    P.MSG_TRAIN: {P.KEY_METRICS: "metric", P.KEY_ARRAYS: "array", P.KEY_SITE_PROBS: "array"},
    P.MSG_EVALUATE: {P.KEY_METRICS: "metric"},
    P.MSG_TRAIN_GENERATOR: {P.KEY_GENERATOR: "array", P.KEY_GEN_STATS: "config"},
    P.MSG_EVALUATE_POOL: {P.KEY_METRICS: "metric"},
    P.MSG_TRAIN_TEACHER: {P.KEY_METRICS: "metric", P.KEY_ARRAYS: "array"},
}
MAX_STRING = 96
_SAFE = re.compile(r"^[A-Za-z0-9 ._:;+=@,()-]*$")
_DIGEST = re.compile(r"[0-9a-fA-F]{32,}")


class OutgoingViolation(ValueError):
    """A reply holds something the protocol does not let leave the site."""


def check_string(value: str, where: str) -> None:
    if len(value) > MAX_STRING:
        raise OutgoingViolation(f"{where}: a string of {len(value)} characters (at most {MAX_STRING})")
    if not _SAFE.match(value):
        raise OutgoingViolation(
            f"{where}: {value!r} holds characters a reply may not carry (paths, controls)"
        )
    if _DIGEST.search(value):
        raise OutgoingViolation(f"{where}: {value!r} looks like a file hash")


def _check_value(value: object, where: str) -> None:
    if isinstance(value, str):
        check_string(value, where)
    elif isinstance(value, bytes):
        raise OutgoingViolation(f"{where}: bytes may not leave the site in a config record")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_value(v, f"{where}[{i}]")


def _kind(content, name: str) -> str | None:
    for kind, records in (
        ("array", content.array_records),
        ("metric", content.metric_records),
        ("config", content.config_records),
    ):
        if name in records:
            return kind
    return None


def check_reply(message_type: str, reply: Message) -> None:
    """Raise :class:`OutgoingViolation` if ``reply`` (to a ``message_type`` request) holds anything
    but the protocol's records and safe strings. Error replies are built from fixed text elsewhere."""
    if reply.has_error():
        return
    schema = REPLY_SCHEMA.get(message_type)
    if schema is None:
        raise OutgoingViolation(f"no reply is defined for message type {message_type!r}")
    content = reply.content
    for name in content:
        kind = _kind(content, name)
        if schema.get(name) != kind:
            raise OutgoingViolation(f"record {name!r} ({kind}) is not part of a {message_type} reply")
    for name, rec in content.config_records.items():
        if name == P.KEY_PROFILE and set(rec) != set(P.PROFILE_FIELDS):
            raise OutgoingViolation(
                f"profile fields {sorted(set(rec) ^ set(P.PROFILE_FIELDS))} differ from the protocol's"
            )
        for key, value in rec.items():
            check_string(key, f"{name}.{key}")
            _check_value(value, f"{name}.{key}")
    for name, rec in content.metric_records.items():
        for key in rec:
            check_string(key, f"{name}.{key}")
    for name, rec in content.array_records.items():
        for key in rec:
            check_string(key, f"{name}.{key}")
