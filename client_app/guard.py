"""Every reply passes here: the site's checks around a ClientApp handler.

Before the handler: the node config and policy load, the request type, its size under the site's
own bound, evaluation limits and DP run rules (``client_app.policy``). After it: the reply fits the
protocol's schema and safe-string rules (``client_app.outgoing``), holds no copy of a site image
(``client_app.leakcheck``) and passes the policy's reply rules. Known failures become error replies
(code + fixed sentence, ``client_app.errors``), and every reply is written to the site's audit log
before it leaves (no log, no reply).
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message

from client_app.audit import AuditLog, audit_path
from client_app.errors import (
    ERR_AUDIT,
    ERR_CONFIG,
    ERR_DATA,
    ERR_INTERNAL,
    ERR_PAYLOAD,
    ERR_POLICY,
    PayloadError,
    PoolMissing,
    error_reply,
)
from client_app.leakcheck import image_copies
from client_app.outgoing import OutgoingViolation, check_reply
from client_app.policy import PERMISSIVE, EvaluateCounter, PolicyViolation, load_policy
from client_app.privacy import LEDGER_FILE
from common import protocol as P
from common.codec import check_request_bytes, from_array_record, message_nbytes, record_nbytes
from common.config import ConfigError, NodeConfig, parse_node_config, parse_run_config
from common.data import SiteDataError, default_cache_dir
from common.sites import load_site, resolve_site

log = logging.getLogger("dsfedmed.client")


def state_root(node: NodeConfig) -> Path:
    """The site's state folder: its node config's state-dir, else under the cache."""
    return Path(node.state_dir).expanduser() if node.state_dir else default_cache_dir() / "state"


def site_guard(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """A Flower ClientApp mod (``ClientApp(mods=[site_guard, request_bounds])``), so it wraps every
    handler the app registers: the site's policy is checked before the handler runs and on what it
    answers, known failures become error replies that name the problem (the server logs them), and
    the reply is written to the site's audit log before it leaves (no log, no reply)."""
    site, policy, audit, reply = "?", PERMISSIVE, AuditLog(None), None
    rule = "ok"
    try:
        node = parse_node_config(context.node_config)
        audit = AuditLog(audit_path(node))
        site = _site_name(context, node)
        policy = load_policy(node.policy_file)
    except ConfigError as exc:
        reply = _error(msg, ERR_CONFIG, f"configuration error: {exc}")
    if reply is None:
        try:
            policy.check_request(msg.metadata.message_type)
            policy.check_request_size(sum(record_nbytes(r) for r in msg.content.array_records.values()))
            if msg.metadata.message_type == P.MSG_EVALUATE:
                policy.check_evaluate(_requested_split(msg), _evaluate_counter(node), int(context.run_id))
            if msg.metadata.message_type in (P.MSG_TRAIN, P.MSG_TRAIN_TEACHER):
                _apply_policy_to_own_validation(msg, policy, node, int(context.run_id))
            if msg.metadata.message_type == P.MSG_TRAIN and policy.dp.enabled:
                run = parse_run_config(context.run_config)  # refused before any work, not only after
                policy.check_dp_run(run.method, run.exchange)
            reply = _answer(call_next, msg, context)
            if not reply.has_error():
                check_reply(msg.metadata.message_type, reply)  # only the protocol leaves
                _check_no_image_copies(reply, context)  # and no copy of a site image in it
                policy.check_reply(reply.content.array_records, message_nbytes(reply))
        except PolicyViolation as exc:
            rule = exc.rule
            reply = error_reply(msg, ERR_POLICY, str(exc), rule=exc.rule)
        except OutgoingViolation as exc:
            rule = "protocol"
            reply = error_reply(msg, ERR_INTERNAL, f"reply withheld: {exc}")
        except ConfigError as exc:  # e.g. a damaged evaluate counter: nothing is answered blind
            reply = _error(msg, ERR_CONFIG, f"configuration error: {exc}")
    try:
        audit.record(msg, reply, run_id=context.run_id, site=site, policy=rule)
    except OSError as exc:
        reply = _error(
            msg,
            ERR_AUDIT,
            f"the site's audit log {audit.path} cannot be written ({exc}); nothing is sent without it",
        )
    return reply


def _answer(call_next: Callable[[Message, Context], Message], msg: Message, context: Context) -> Message:
    try:
        return call_next(msg, context)
    except PolicyViolation:
        raise
    except ConfigError as exc:
        return _error(msg, ERR_CONFIG, f"configuration error: {exc}")
    except SiteDataError as exc:
        return _error(msg, ERR_DATA, f"site data error: {exc}")
    except PoolMissing as exc:
        return _error(msg, P.ERR_NO_POOL, str(exc))
    except (PayloadError, ValueError, KeyError) as exc:
        return _error(msg, ERR_PAYLOAD, f"bad request payload: {exc}")
    except Exception as exc:  # noqa: BLE001 - any other failure still gets a clear reply
        log.error("handler %s failed:\n%s", msg.metadata.message_type, traceback.format_exc())
        return _error(msg, ERR_INTERNAL, f"{type(exc).__name__}: {exc}")


def request_bounds(
    msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
) -> Message:
    """A Flower ClientApp mod, inside :func:`site_guard`: the size gate every request passes before a
    handler decodes it. A pool or soft targets larger than the run config allows
    (:func:`common.codec.check_request_bytes`) is refused unread. (Flower's own ``message_size_mod``
    only logs sizes; bounds derived from the run config are the protocol's.)"""
    if msg.content.array_records:
        check_request_bytes(msg.content, parse_run_config(context.run_config))
    return call_next(msg, context)


def ledger_path(node: NodeConfig) -> Path:
    """The site's one privacy ledger: in its state folder, whatever run or state key asks."""
    return state_root(node) / LEDGER_FILE


def _check_no_image_copies(reply: Message, context: Context) -> None:
    """Withhold a reply whose arrays hold a (resized, re-typed) copy of one of the site's images
    (:mod:`client_app.leakcheck`; what it does not catch is stated there)."""
    if not reply.content.array_records:
        return
    try:
        site, _ = load_site(parse_run_config(context.run_config), parse_node_config(context.node_config))
    except (ConfigError, SiteDataError) as exc:  # cannot compare: nothing leaves unchecked
        raise OutgoingViolation(f"the site's images cannot be loaded to check the reply ({exc})") from None
    arrays = {
        f"{rname}.{aname}": arr
        for rname, rec in reply.content.array_records.items()
        for aname, arr in from_array_record(rec).items()
    }
    hits = image_copies(arrays, site.images)
    if hits:
        raise OutgoingViolation("; ".join(hits))


def _apply_policy_to_own_validation(msg: Message, policy, node: NodeConfig, run_id: int) -> None:
    """A train request that also asks for validation (``evaluate-in-train``) is held to the same
    evaluate policy as an evaluate request (allowed splits, requests per run). Where the policy says
    no, the request is trained without it: the site's training is not lost to a scoring rule, and
    the server sees no scores from this site for the round."""
    conf = msg.content.config_records.get(P.KEY_CONFIG)
    if conf is None or P.CFG_EVALUATE_SPLIT not in conf:
        return
    try:
        policy.check_evaluate(str(conf[P.CFG_EVALUATE_SPLIT]), _evaluate_counter(node), run_id)
    except PolicyViolation as exc:
        log.warning("train request's validation declined by policy (%s): %s", exc.rule, exc)
        del conf[P.CFG_EVALUATE_SPLIT]


def _requested_split(msg: Message) -> str:
    cfg = msg.content.config_records.get(P.KEY_CONFIG)
    return str(cfg.get(P.CFG_SPLIT, "val")) if cfg is not None else "val"


def _evaluate_counter(node: NodeConfig) -> EvaluateCounter:
    return EvaluateCounter(state_root(node) / "evaluate-requests.json")


def _site_name(context: Context, node: NodeConfig) -> str:
    """The site's name for the audit log, without loading its data."""
    try:
        return resolve_site(parse_run_config(context.run_config), node).name
    except (ConfigError, SiteDataError):
        return node.site_name or "?"


def _error(msg: Message, code: int, detail: str) -> Message:
    """An error reply: the code and a fixed sentence leave the site; ``detail`` stays in its log."""
    return error_reply(msg, code, detail)
