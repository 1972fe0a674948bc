"""Error replies that tell the server what kind of failure happened and nothing about the site.

An error reply carries a code and a fixed sentence for that code (a policy refusal adds the name of
the rule, one of the policy's own keys), plus an incident id: a random tag with no information in it.
What went wrong in detail (exception text, paths, file names, hashes) stays at the site: in its log
line ``site incident <id>: ...`` and in its audit-log entry, so the site's operator can answer a
coordinator who quotes the incident id.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections import OrderedDict

from flwr.app import Error, Message

from common import protocol as P

log = logging.getLogger("dsfedmed.client")

ERR_CONFIG = 1001
ERR_DATA = 1002
ERR_PAYLOAD = 1003
ERR_POLICY = 1004  # the site's policy forbids the request or its reply; the reason names the rule
ERR_AUDIT = 1005  # the reply could not be written to the site's audit log, so it was not sent
ERR_INTERNAL = 1099

REASONS: dict[int, str] = {
    ERR_CONFIG: "the site cannot run this request with its configuration or the run config",
    ERR_DATA: "the site's data cannot be used for this request",
    ERR_PAYLOAD: "the request's payload does not fit the protocol or the site's limits",
    ERR_POLICY: "the site's policy refuses this request or its reply",
    ERR_AUDIT: "the site's audit log cannot be written, so nothing is sent",
    P.ERR_NO_POOL: "the synthetic pool this request refers to is not held intact at the site: resend it",
    ERR_INTERNAL: "the site failed while answering",
}
_RULE = re.compile(r"^[a-z][a-z0-9-]*(\.[a-z][a-z0-9-]*)*$")
_INCIDENT = re.compile(r"\(site incident ([0-9a-f]{12})\)$")

# the details of this process's recent incidents, by id: for the audit entry of the same message
# (each deployed ClientApp process answers one message) and for tests
_DETAILS: OrderedDict[str, str] = OrderedDict()
_KEEP = 256


def error_reply(msg: Message, code: int, detail: str, rule: str | None = None) -> Message:
    """The error reply for ``msg``: fixed text for ``code``; ``detail`` is logged here, never sent."""
    incident = secrets.token_hex(6)
    _DETAILS[incident] = detail
    while len(_DETAILS) > _KEEP:
        _DETAILS.popitem(last=False)
    log.error("site incident %s: error %d to %s: %s", incident, code, msg.metadata.message_type, detail)
    text = REASONS.get(code, REASONS[ERR_INTERNAL])
    if code == ERR_POLICY and rule and _RULE.match(rule):
        text += f" (rule {rule})"
    return Message(Error(code=code, reason=f"{text} (site incident {incident})"), reply_to=msg)


def incident_of(reason: str) -> str | None:
    m = _INCIDENT.search(reason or "")
    return m.group(1) if m else None


def local_detail(reason: str) -> str:
    """What the site logged for the incident named in an error reply's reason ('' if unknown here)."""
    incident = incident_of(reason)
    return _DETAILS.get(incident, "") if incident else ""


class PayloadError(ValueError):
    """The server's message lacks a record or holds something that does not fit."""


class PoolMissing(PayloadError):
    """The request refers to a synthetic pool this site does not hold intact (error code
    :data:`common.protocol.ERR_NO_POOL`: the server resends it)."""
