"""Flower ClientApp: thin handlers that translate Messages to :class:`SiteTrainer` calls.

Every handler parses the run and node config once, sets threads and device, loads the site's data
(cached), and answers either with the records documented in :mod:`common.protocol` or with an
error reply whose reason says what is wrong and where (bad config, unusable data, weights that do
not fit).  Only weights, metrics and the profile leave the site; never images or masks.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client_app.trainer import SiteTrainer, TrainSettings
from common import protocol as P
from common.codec import from_array_record, to_array_record
from common.config import ConfigError, NodeConfig, RunConfig, parse_node_config, parse_run_config
from common.data import SiteDataError
from common.runtime import configure_threads, package_versions, resolve_device
from common.sites import load_site

log = logging.getLogger("dsfedmed.client")
app = ClientApp()

# error codes carried in error replies (Flower reserves small codes for its own use)
ERR_CONFIG = 1001
ERR_DATA = 1002
ERR_PAYLOAD = 1003
ERR_INTERNAL = 1099


class PayloadError(ValueError):
    """The server's message lacks a record or holds something that does not fit."""


def _setup(context: Context) -> tuple[RunConfig, NodeConfig]:
    run = parse_run_config(context.run_config)
    node = parse_node_config(context.node_config)
    configure_threads(node.num_threads or run.num_threads)
    return run, node


def _trainer(run: RunConfig, node: NodeConfig, model: str | None = None) -> SiteTrainer:
    site, split = load_site(run, node)
    device = resolve_device(node.device or run.device)
    return SiteTrainer(site, split, model or node.model or run.model, device)


def _guarded(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Turn known failures into error replies that name the problem (the server logs them)."""

    def wrapper(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except ConfigError as exc:
            return _error(msg, ERR_CONFIG, f"configuration error: {exc}")
        except SiteDataError as exc:
            return _error(msg, ERR_DATA, f"site data error: {exc}")
        except (PayloadError, ValueError, KeyError) as exc:
            return _error(msg, ERR_PAYLOAD, f"bad request payload: {exc}")
        except Exception as exc:  # noqa: BLE001 - any other failure still gets a clear reply
            log.error("handler %s failed:\n%s", msg.metadata.message_type, traceback.format_exc())
            return _error(msg, ERR_INTERNAL, f"{type(exc).__name__}: {exc}")

    wrapper.__name__ = handler.__name__
    wrapper.__doc__ = handler.__doc__
    return wrapper


def _error(msg: Message, code: int, reason: str) -> Message:
    log.error("replying with error %d to %s: %s", code, msg.metadata.message_type, reason)
    return Message(Error(code=code, reason=reason), reply_to=msg)


def _config(msg: Message) -> ConfigRecord:
    if P.KEY_CONFIG not in msg.content.config_records:
        raise PayloadError(f"message has no '{P.KEY_CONFIG}' config record")
    return msg.content.config_records[P.KEY_CONFIG]


def _weights(msg: Message) -> dict:
    if P.KEY_ARRAYS not in msg.content.array_records:
        raise PayloadError(f"message has no '{P.KEY_ARRAYS}' array record")
    return from_array_record(msg.content.array_records[P.KEY_ARRAYS])


@app.query("profile")
@_guarded
def query_profile(msg: Message, context: Context) -> Message:
    """Report what the server needs to check the federation is consistent (no image data)."""
    run, node = _setup(context)
    tr = _trainer(run, node)
    site = tr.site
    profile = ConfigRecord(
        {
            "site": site.name,
            "n-train": len(tr.split["train"]),
            "n-val": len(tr.split["val"]),
            "n-test": len(tr.split["test"]),
            "n-skipped": len(site.report.problems),
            "data-report": site.report.summary(),
            "channels": int(site.source_channels),
            "num-classes": 1,
            "image-size": int(site.images.shape[-1]),
            "model": tr.model_name,
            "model-params": tr.num_parameters,
            "device": str(tr.device),
            "versions": [f"{k}=={v}" for k, v in package_versions().items()],
        }
    )
    return Message(RecordDict({P.KEY_PROFILE: profile}), reply_to=msg)


@app.train()
@_guarded
def train(msg: Message, context: Context) -> Message:
    """FedAvg local training: load global weights, train local epochs, return weights + metrics."""
    run, node = _setup(context)
    cfg = _config(msg)
    server_round = int(cfg.get(P.CFG_ROUND, 0))
    tr = _trainer(run, node, model=str(cfg.get(P.CFG_MODEL, "")) or None)
    tr.set_weights(_weights(msg))
    metrics = tr.train(
        TrainSettings(
            epochs=run.local_epochs,
            batch_size=run.batch_size,
            learning_rate=run.learning_rate,
            augment=run.augment,
            seed=run.seed * 100_003 + server_round,
        )
    )
    content = RecordDict(
        {
            P.KEY_ARRAYS: to_array_record(tr.get_weights()),
            P.KEY_METRICS: MetricRecord({k: float(v) for k, v in metrics.items()}),
        }
    )
    return Message(content, reply_to=msg)


@app.evaluate()
@_guarded
def evaluate(msg: Message, context: Context) -> Message:
    """Dice/IoU of the received weights on the requested split of this site's data."""
    run, node = _setup(context)
    cfg = _config(msg)
    split = str(cfg.get(P.CFG_SPLIT, "val"))
    if split not in P.SPLITS:
        raise PayloadError(f"unknown split {split!r}; expected one of {', '.join(P.SPLITS)}")
    tr = _trainer(run, node, model=str(cfg.get(P.CFG_MODEL, "")) or None)
    tr.set_weights(_weights(msg))
    res = tr.evaluate(split)
    metrics = MetricRecord(
        {
            P.MET_DICE: float(res["dice"]),
            P.MET_IOU: float(res["iou"]),
            P.MET_NUM_EXAMPLES: int(res["n"]),
            P.MET_SECONDS: float(res["seconds"]),
        }
    )
    return Message(RecordDict({P.KEY_METRICS: metrics}), reply_to=msg)
