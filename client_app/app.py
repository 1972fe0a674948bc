"""Flower ClientApp: thin handlers that translate Messages to :class:`SiteTrainer` calls.

Every handler parses the run and node config once, sets threads and device, loads the site's data
(cached), and answers with the records documented in :mod:`common.protocol`. What surrounds every
handler (the site's policy, size bounds, error replies, the reply checks and the audit log) is in
:mod:`client_app.guard`. Only weights, metrics and the profile leave the site; never images or masks.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client_app.errors import (  # noqa: F401 - the codes are re-exported: part of the site's API
    ERR_AUDIT,
    ERR_CONFIG,
    ERR_DATA,
    ERR_INTERNAL,
    ERR_PAYLOAD,
    ERR_POLICY,
    PayloadError,
    PoolMissing,
)
from client_app.guard import ledger_path, request_bounds, site_guard
from client_app.policy import load_policy
from client_app.privacy import PrivacyLedger
from client_app.release import release_probs
from client_app.requests import own_validation, pool_arrays
from client_app.state import SiteStore
from client_app.teacher_round import teacher_round
from client_app.trainer import SiteTrainer, TrainSettings
from common import protocol as P
from common.codec import check_probs_record, decode_record, half_precision, to_array_record
from common.config import NodeConfig, RunConfig, parse_node_config, parse_run_config
from common.data import default_cache_dir
from common.fm_cache import CachedPromptFreeSegmenter, EmbeddingCache
from common.foundation import PromptFreeSegmenter, fm_checkpoint_id, load_foundation_model
from common.generator import DPSGD, generator_config_from_run, train_generator
from common.losses import DistillWeights
from common.runtime import configure_threads, package_versions, resolve_device, setup_logging
from common.sites import check_no_server_paths, load_site

log = logging.getLogger("dsfedmed.client")
app = ClientApp(mods=[site_guard, request_bounds])  # every handler: the site guard, then the size gate


def _setup(context: Context) -> tuple[RunConfig, NodeConfig]:
    setup_logging(log)
    run = parse_run_config(context.run_config)
    node = parse_node_config(context.node_config)
    check_no_server_paths(run, node)  # a deployed site opens only the paths of its node config
    configure_threads(node.num_threads or run.num_threads)
    return run, node


def _trainer(run: RunConfig, node: NodeConfig, model: str | None = None) -> SiteTrainer:
    site, split = load_site(run, node)
    device = resolve_device(node.device or run.device)
    torch.manual_seed(run.seed)  # a site's initial model is reproducible from the run seed
    if run.method == "fedfm":  # the site runs the foundation model itself (FedSAM baseline)
        checkpoint = node.fm_checkpoint if node.deployed else run.fm_checkpoint
        fm = load_foundation_model(
            run.fm,
            checkpoint,
            device,
            freeze_encoder=run.fm_trainable == "decoder",
            expected_sha256=run.fm_checkpoint_sha256,
        )
        if run.fm_trainable == "decoder":  # frozen encoder: each image is embedded once, ever
            cache = EmbeddingCache(
                Path(node.cache_dir or default_cache_dir()) / "fm-embeddings",
                run.fm,
                fm_checkpoint_id(checkpoint),
                fm.spec.input_size,
            )
            net: torch.nn.Module = CachedPromptFreeSegmenter(fm, cache)
        else:
            net = PromptFreeSegmenter(fm, run.fm_trainable)
        return SiteTrainer(site, split, f"fm:{run.fm}", device, model=net)
    if not model and _own_model(run):
        model = node.model or run.model_for(site.name)
    return SiteTrainer(site, split, model or node.model or run.model, device)


def _own_model(run: RunConfig) -> bool:
    """In DSFedMed ``logits`` exchange each site keeps (and may choose) its own model."""
    return run.method == "dsfedmed" and run.exchange == "logits"


def _state_key(msg: Message, context: Context) -> int:
    """The name this run's site state is kept under: the server's state key (a resumed run keeps
    the interrupted run's), else this Flower run's id."""
    cfg = msg.content.config_records.get(P.KEY_CONFIG)
    key = cfg.get(P.CFG_STATE_KEY) if cfg is not None else None
    if key is None:
        return int(context.run_id)
    if not isinstance(key, int) or isinstance(key, bool) or key < 0:
        raise PayloadError(f"'{P.CFG_STATE_KEY}' must be a non-negative integer, got {key!r}")
    return key


def _config(msg: Message) -> ConfigRecord:
    if P.KEY_CONFIG not in msg.content.config_records:
        raise PayloadError(f"message has no '{P.KEY_CONFIG}' config record")
    return msg.content.config_records[P.KEY_CONFIG]


def _weights(msg: Message) -> dict:
    if P.KEY_ARRAYS not in msg.content.array_records:
        raise PayloadError(f"message has no '{P.KEY_ARRAYS}' array record")
    return decode_record(msg.content.array_records[P.KEY_ARRAYS], f"'{P.KEY_ARRAYS}' record")


@app.query("profile")
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
            "data-report": site.report.counts(),  # counts only: no folder or file name leaves
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
def train(msg: Message, context: Context) -> Message:
    """FedAvg (and fedfm) local training: load global weights, train, return weights + metrics."""
    run, node = _setup(context)
    if run.method == "dsfedmed":
        return _train_dsfedmed(msg, context, run, node)
    cfg = _config(msg)
    server_round = int(cfg.get(P.CFG_ROUND, 0))
    tr = _trainer(run, node, model=str(cfg.get(P.CFG_MODEL, "")) or None)
    tr.set_weights(_weights(msg))
    # the site's own AdamW state continues across rounds (one recipe for every method); a round
    # asked again starts from the same state
    store = SiteStore(node.state_dir, _state_key(msg, context), tr.site.name)
    saved = store.load_state(before_round=server_round)
    if saved is not None:
        tr.optim_states = dict(saved[1])
    metrics = tr.train(TrainSettings.from_run(run, server_round))
    metrics.update(own_validation(tr, cfg))
    store.save_optimizer(tr.optim_states, server_round)
    content = RecordDict(
        {
            P.KEY_ARRAYS: to_array_record(tr.get_weights()),
            P.KEY_METRICS: MetricRecord({k: float(v) for k, v in metrics.items()}),
        }
    )
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Dice/IoU of the received weights on the requested split of this site's data."""
    run, node = _setup(context)
    cfg = _config(msg)
    split = str(cfg.get(P.CFG_SPLIT, "val"))
    if split not in P.SPLITS:
        raise PayloadError(f"unknown split {split!r}; expected one of {', '.join(P.SPLITS)}")
    if _own_model(run) and P.KEY_ARRAYS not in msg.content.array_records:
        tr = _trainer(run, node)
        # the model after this round's training (newest snapshot up to this round)
        store = SiteStore(node.state_dir, _state_key(msg, context), tr.site.name)
        saved = store.load_model(before_round=int(cfg.get(P.CFG_ROUND, 0)) + 1)
        if saved is not None:
            tr.set_weights(saved)
    else:
        tr = _trainer(run, node, model=str(cfg.get(P.CFG_MODEL, "")) or None)
        tr.set_weights(_weights(msg))
    res = tr.evaluate(split)
    metrics = MetricRecord(
        {
            P.MET_DICE: float(res["dice"]),
            P.MET_IOU: float(res["iou"]),
            P.MET_DICE05: float(res["dice05"]),
            P.MET_IOU05: float(res["iou05"]),
            P.MET_NUM_EXAMPLES: int(res["n"]),
            P.MET_SECONDS: float(res["seconds"]),
        }
    )
    return Message(RecordDict({P.KEY_METRICS: metrics}), reply_to=msg)


# --- DSFedMed ------------------------------------------------------------------------------------


@app.train("generator")
def train_generator_handler(msg: Message, context: Context) -> Message:
    """Train the site's mask-conditioned diffusion generator on its private training pairs.

    Only the generator's weights and two numbers about mask sizes leave the site.
    """
    run, node = _setup(context)
    site, split = load_site(run, node)
    device = resolve_device(node.device or run.device)
    images, masks = site.subset(split["train"])
    policy = load_policy(node.policy_file)
    gdp = policy.generator_dp
    state, stats = train_generator(
        images,
        masks,
        generator_config_from_run(run),
        device,
        log=lambda m: log.info("%s: %s", site.name, m),
        dp=DPSGD(gdp.noise_multiplier, gdp.max_grad_norm, gdp.delta) if gdp.enabled else None,
    )
    if gdp.enabled:  # its ε joins the site's own ledger; past the site's budget nothing leaves
        stats["dp_epsilon_total"] = PrivacyLedger(ledger_path(node)).charge_generator(
            policy.dp, float(stats["dp_epsilon"]), gdp.delta, gdp.noise_multiplier, int(context.run_id)
        )
    if run.gen_upload_dtype == "float16":  # half the bytes; the server's sampler casts them back
        state = half_precision(state)
    flat = {k: float(v) for k, v in stats.items() if isinstance(v, int | float)}
    content = RecordDict({P.KEY_GENERATOR: to_array_record(state), P.KEY_GEN_STATS: ConfigRecord(flat)})
    return Message(content, reply_to=msg)


@app.train("teacher")
def train_teacher_handler(msg: Message, context: Context) -> Message:
    """The teacher's round at this site (client_app/teacher_round.py): the FM's mask decoder in,
    fine-tuned on this site's training images' cached embeddings, back out in float16."""
    run, node = _setup(context)
    cfg = _config(msg)
    fm_run = run.model_copy(update={"method": "fedfm", "fm_trainable": "decoder"})
    tr = _trainer(fm_run, node)
    split = cfg.get(P.CFG_EVALUATE_SPLIT)  # already held to the site's evaluate policy by the guard
    if split not in (None, "val"):
        raise PayloadError(f"a train.teacher request may ask for validation on 'val' only, not {split!r}")
    weights, metrics = teacher_round(
        tr, msg.content.array_records.get(P.KEY_ARRAYS), run, int(cfg.get(P.CFG_ROUND, 0)), split == "val"
    )
    content = RecordDict(
        {
            P.KEY_ARRAYS: to_array_record(weights),
            P.KEY_METRICS: MetricRecord({k: float(v) for k, v in metrics.items()}),
        }
    )
    return Message(content, reply_to=msg)


@app.evaluate("pool")
def evaluate_pool(msg: Message, context: Context) -> Message:
    """Score the synthetic pool against this site's real validation data, and cache the pool."""
    run, node = _setup(context)
    cfg = _config(msg)
    tr = _trainer(run, node)
    store = SiteStore(node.state_dir, _state_key(msg, context), tr.site.name)
    images, masks = pool_arrays(msg, store, str(cfg.get(P.CFG_POOL_ID, "")), None, "all", run.image_size)
    settings = TrainSettings(run.pool_score_epochs, run.batch_size, run.learning_rate, run.augment, run.seed)
    res = tr.pool_score(images, masks, settings)
    return Message(
        RecordDict({P.KEY_METRICS: MetricRecord({k: float(v) for k, v in res.items()})}), reply_to=msg
    )


def _train_dsfedmed(msg: Message, context: Context, run: RunConfig, node: NodeConfig) -> Message:
    """Private training plus distillation towards the FM on the selected synthetic samples."""
    cfg = _config(msg)
    server_round = int(cfg.get(P.CFG_ROUND, 0))
    selected = [int(i) for i in cfg.get(P.CFG_SELECTED, [])]
    if not selected:
        raise PayloadError("no selected synthetic samples in the request")
    bootstrap = str(cfg.get(P.CFG_STAGE, "")) == P.STAGE_BOOTSTRAP
    own = _own_model(run)
    if bootstrap and not own:
        raise PayloadError("stage 'bootstrap' exists in logits exchange only")
    tr = _trainer(run, node, model=None if own else str(cfg.get(P.CFG_MODEL, "")) or None)
    store = SiteStore(node.state_dir, _state_key(msg, context), tr.site.name)
    # continue from the state before this round (the same state if the round is asked again): the
    # site's own model in logits exchange, and its AdamW states in every exchange
    saved = store.load_state(before_round=server_round)
    if saved is not None:
        tr.optim_states = dict(saved[1])
        if own:
            tr.set_weights(saved[0])
    if own:
        done = [r for r in store.snapshots() if r < server_round]
        log.info(
            "%s: round %d starts from %s",
            tr.site.name,
            server_round,
            f"its state after round {max(done)}" if done else "its initial model",
        )
    else:
        tr.set_weights(_weights(msg))
    included = str(cfg.get(P.CFG_POOL_INCLUDED, "selected"))
    whole = included in ("all", "none")  # the whole pool is (or is cached) here: train on all of it
    syn_images, syn_masks = pool_arrays(
        msg, store, str(cfg.get(P.CFG_POOL_ID, "")), None if whole else selected, included, run.image_size
    )
    teacher = check_probs_record(
        msg.content.array_records.get(P.KEY_SOFT), len(selected), run.logit_size, key=P.KEY_SOFT
    )
    gate = None
    if whole:  # supervised on every pool sample; distillation on the selected ones only
        if max(selected) >= len(syn_images) or min(selected) < 0:
            raise PayloadError(f"a selected index is outside the pool of {len(syn_images)} samples")
        full = torch.zeros(len(syn_images), *teacher.shape[1:])
        full[selected] = teacher
        gate = torch.zeros(len(syn_images))
        gate[selected] = 1.0
        teacher = full
    settings = TrainSettings.from_run(run, server_round)
    if bootstrap:
        settings = replace(settings, epochs=max(1, run.holdout_epochs))
    metrics = tr.train_with_distillation(
        settings,
        syn_images,
        syn_masks,
        teacher,
        DistillWeights(run.sup_weight, run.kd_weight, run.temperature, run.pos_weight),
        private=not bootstrap,
        kd_gate=gate,
    )
    weights = tr.get_weights()
    store.save_model(
        weights,
        server_round=server_round,
        optim=tr.optim_states,
        meta={
            "model": tr.model_name,
            "in-channels": int(tr.site.images.shape[1]),
            "image-size": run.image_size,
            "run-id": int(context.run_id),
            "state-key": _state_key(msg, context),
            "site": tr.site.name,
            "round": server_round,
            "stage": "bootstrap" if bootstrap else "train",
        },
    )
    if not bootstrap:
        metrics.update(own_validation(tr, cfg))
    content = RecordDict({P.KEY_METRICS: MetricRecord({k: float(v) for k, v in metrics.items()})})
    if bootstrap:
        return Message(content, reply_to=msg)
    if run.exchange in ("logits", "hybrid"):
        probs, eps = release_probs(tr.predict_probs(syn_images), run, node, server_round, int(context.run_id))
        content[P.KEY_SITE_PROBS] = to_array_record({P.ARR_PROBS: probs})
        if eps is not None:  # the server records which answers were noised, and the site's total ε
            content[P.KEY_METRICS][P.MET_DP_EPSILON] = float(eps)
    if run.exchange in ("weights", "hybrid"):
        content[P.KEY_ARRAYS] = to_array_record(weights)
    return Message(content, reply_to=msg)
