"""Typed run and node configuration.

Flower hands both configs over as flat ``{kebab-case-key: scalar}`` dicts
(``[tool.flwr.app.config]`` + ``flwr run --run-config``, and ``--node-config``).
They are parsed exactly once per entry point into the pydantic models below; code deeper in
the app receives the typed object, never the raw dict.  Unknown keys, wrong types and
out-of-range values raise :class:`ConfigError`, whose message names the key and what is allowed.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from common.models import MODEL_NAMES

Method = Literal["fedavg", "dsfedmed", "fedfm"]
FMTrainable = Literal["all", "decoder"]
Exchange = Literal["logits", "weights", "hybrid"]
PoolSource = Literal["generator", "phantoms", "folder"]
SelectionRule = Literal["paper", "quantile", "all"]
PromptMode = Literal["oracle-mask-box", "whole-box", "none"]
ProbDtype = Literal["uint8", "float16"]
Device = Literal["auto", "cpu", "cuda"]


class ConfigError(ValueError):
    """A configuration value is missing, unknown, mistyped or out of range."""


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class _Strict(BaseModel):
    model_config = ConfigDict(
        alias_generator=_kebab,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        strict=False,
    )

    @classmethod
    def parse(cls, raw: Mapping[str, Any], *, source: str) -> _Strict:
        """Validate a flat Flower config dict, turning pydantic errors into one clear message."""
        try:
            return cls.model_validate(dict(raw))
        except ValidationError as exc:
            raise ConfigError(_explain(cls, exc, source)) from None

    def to_flat(self) -> dict[str, Any]:
        """The resolved config with its kebab-case keys (what ``config.json`` stores)."""
        return self.model_dump(by_alias=True)


def _explain(cls: type[BaseModel], exc: ValidationError, source: str) -> str:
    known = sorted(f.alias or n for n, f in cls.model_fields.items())
    lines = [f"invalid {source} ({exc.error_count()} problem(s)):"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            lines.append(f"  - unknown key '{key}'; known keys: {', '.join(known)}")
            continue
        field = next((f for n, f in cls.model_fields.items() if (f.alias or n) == key), None)
        allowed = _allowed(field) if field is not None else ""
        got = err.get("input")
        lines.append(f"  - '{key}': {err['msg']} (got {got!r}){allowed}")
    return "\n".join(lines)


def _allowed(field: Any) -> str:
    parts = []
    ann = field.annotation
    args = getattr(ann, "__args__", None)
    if getattr(ann, "__origin__", None) is Literal and args:
        parts.append("one of " + ", ".join(repr(a) for a in args))
    for meta in field.metadata:
        for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            val = getattr(meta, attr, None)
            if val is not None:
                parts.append(f"{sym} {val}")
    if field.description:
        parts.append(field.description)
    return f"; allowed: {', '.join(parts)}" if parts else ""


class RunConfig(_Strict):
    """Everything the federation agrees on for one run (``[tool.flwr.app.config]``)."""

    method: Method = "dsfedmed"
    num_rounds: int = Field(10, ge=1, le=10_000)
    seed: int = Field(0, ge=0)
    # data
    data_root: str = Field("", description="empty = built-in phantom sites")
    phantom_images_per_site: int = Field(64, ge=8, le=10_000)
    image_size: int = Field(64, ge=16, le=1024)
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    split_file: str = ""
    split_group_regex: str = "^(\\d+)_"
    strict_data: bool = False
    augment: bool = True
    augment_set: Literal["full", "flips"] = Field(
        "full", description="'full' (flips, turns, affine, intensity, noise) or 'flips' only"
    )
    # site model and local training
    model: str = Field("unet", description=f"a registered model: {', '.join(MODEL_NAMES)}")
    local_epochs: int = Field(3, ge=1, le=1000)
    batch_size: int = Field(8, ge=1, le=4096)
    learning_rate: float = Field(3e-3, gt=0.0, le=1.0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW's decoupled weight decay")
    lr_schedule: Literal["constant", "warmup-cosine"] = Field(
        "constant",
        description="learning rate by round over the whole run: constant, or linear warm-up over "
        "warmup-rounds then cosine down to 1% of the peak (every method, central and local included)",
    )
    warmup_rounds: int = Field(1, ge=0, le=10_000)
    extra_local_steps: int = Field(
        0,
        ge=0,
        le=1_000_000,
        description="more optimiser steps on private data per round after local-epochs (the "
        "fedavg-matched baseline: as many as DSFedMed's distillation steps)",
    )
    site_models: str = Field(
        "", description="per-site models in logits exchange, e.g. 'C1=unet,C2=segresnet' (simulation)"
    )
    # DSFedMed: foundation model, synthetic pool, selection, mutual distillation
    exchange: Exchange = "logits"
    fm: str = Field("litemedsam", description="litemedsam, sam_vit_b, sam_vit_l, sam_vit_h, medsam_vit_b")
    fm_checkpoint: str = Field("", description="operator-provided weights (SAM family); empty = bundled")
    fm_checkpoint_sha256: str = Field(
        "",
        pattern=r"^([0-9a-fA-F]{64})?$",
        description="expected sha256 of fm-checkpoint; checked before loading when set",
    )
    fm_prompt: PromptMode = Field(
        "whole-box",
        description="FM prompt on synthetic samples: whole-box or none (prompt-free teacher); "
        "oracle-mask-box hands the FM the answer (evaluation only, never a default)",
    )
    fm_learning_rate: float = Field(1e-4, gt=0.0, le=1.0)
    fm_epochs: int = Field(1, ge=0, le=100, description="epochs of the FM decoder per round (sites -> FM)")
    fm_adapt_epochs: int = Field(
        5,
        ge=0,
        le=1000,
        description="epochs of the FM decoder on the synthetic pool's masks before round 1, so the "
        "prompt-free teacher knows the task before it teaches",
    )
    fm_site_rounds: int = Field(
        0,
        ge=0,
        le=100,
        description="rounds of the teacher learning at the sites before round 1: each site fine-tunes "
        "the FM's mask decoder on its own images' cached frozen-encoder embeddings (message "
        "train.teacher) and the server averages the decoders; 0 = the teacher never sees real data "
        "(the sites then need no FM)",
    )
    fm_site_steps: int = Field(
        60, ge=1, le=100_000, description="decoder steps per site and teacher round (fm-batch-size each)"
    )
    target_fm_weight: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="a site's soft target = this weight x the FM's probabilities + the rest x the "
        "other sites' ensemble (the FM alone until the other sites have answered)",
    )
    # fedfm baseline (sites fine-tune the FM itself, its weights averaged: FedSAM)
    fm_trainable: FMTrainable = Field(
        "all", description="fedfm: 'all' weights (FedSAM) or only the mask 'decoder' (FedMSA direction)"
    )
    fm_local_steps: int = Field(
        0, ge=0, le=100_000, description="fedfm: cap on optimiser steps per round (0 = local-epochs)"
    )
    fm_batch_size: int = Field(4, ge=1, le=1024, description="fedfm: images per site training step")
    pool_source: PoolSource = "generator"
    pool_fallback: Literal["phantoms", "folder", "stop"] = Field(
        "phantoms",
        description="generator pool: the source used when no site sends a usable generator "
        "(e.g. every site's policy refuses the upload); 'stop' ends the run",
    )
    pool_folder: str = ""
    pool_size: int = Field(48, ge=2, le=100_000)
    pool_dir: str = Field(
        "",
        description="reuse/store the synthetic pool and its FM embeddings here; empty = run directory only",
    )
    pool_seed: int = Field(-1, ge=-1, description="seed of the synthetic pool; -1 = the run seed")
    gen_size: int = Field(64, ge=16, le=256, description="pool resolution (px) the generators make")
    gen_upload_dtype: Literal["float16", "float32"] = Field(
        "float16", description="precision of the generator weights a site uploads (half the bytes in float16)"
    )
    gen_steps: int = Field(3000, ge=1)
    gen_seconds: float = Field(150.0, gt=0.0)
    gen_batch_size: int = Field(32, ge=1, le=1024)
    gen_sample_steps: int = Field(50, ge=2, le=1000)
    pool_score_epochs: int = Field(
        10, ge=0, le=1000, description="epochs of the pool-quality check at each site; 0 = skip it"
    )
    selection_rule: SelectionRule = "paper"
    selection_lambda: float = Field(0.5, ge=0.0, le=1.0)
    selection_rho: float = Field(0.5, gt=0.0, le=1.0)
    selection_quantile: float = Field(0.7, gt=0.0, le=1.0)
    sup_weight: float = Field(0.9, ge=0.0)
    kd_weight: float = Field(0.1, ge=0.0)
    temperature: float = Field(1.0, gt=0.0)
    pos_weight: float = Field(2.0, gt=0.0)
    logit_size: int = Field(32, ge=4, le=1024)
    logit_dtype: ProbDtype = "uint8"
    # sampling and deadlines
    min_sites: int = Field(2, ge=1)
    sites_per_round: int = Field(
        0,
        ge=0,
        description="partial participation: train k of the connected sites per round, each about "
        "equally often (0 = every site)",
    )
    sampling_deadline_s: float = Field(120.0, gt=0.0)
    round_timeout_s: float = Field(
        900.0, gt=0.0, description="a site's compute time per request; transfer time is added per payload"
    )
    link_mbps: float = Field(
        10.0, gt=0.0, description="the slowest site link assumed (Mbit/s): sizes each send's deadline"
    )
    holdout_site: str = ""
    holdout_epochs: int = Field(
        3,
        ge=0,
        le=1000,
        description="logits exchange: epochs the held-out site distils from the final FM on the pool",
    )
    evaluate_every: int = Field(
        1,
        ge=0,
        description="validation every k rounds (the last round always); 0 = none until the final test",
    )
    evaluate_in_train: bool = Field(
        False,
        description="a due validation travels in the train reply (the site's model after its training, "
        "before any aggregation) instead of separate evaluate messages",
    )
    # outputs and machine
    tensorboard: bool = Field(True, description="also write per-round metrics for TensorBoard when installed")
    runs_root: str = "runs"
    run_dir: str = ""
    resume_from: str = Field("", description="a run directory whose run to continue at its next round")
    pause_after_round: int = Field(
        0, ge=0, description="stop cleanly after this round's checkpoint (resume later); 0 = never"
    )
    device: Device = "auto"
    num_threads: int = Field(1, ge=1, le=256, description="torch threads per site process")
    server_threads: int = Field(
        2, ge=1, le=256, description="torch threads of the ServerApp (FM work runs while sites wait)"
    )

    @field_validator("fm_prompt", mode="before")
    @classmethod
    def _old_prompt_name(cls, v: Any) -> Any:
        # run directories written before 2026-12-03 call the oracle prompt "mask-box": same meaning
        return "oracle-mask-box" if v == "mask-box" else v

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        if v not in MODEL_NAMES:
            raise ValueError(f"unknown model {v!r}")
        return v

    @field_validator("site_models")
    @classmethod
    def _site_models(cls, v: str) -> str:
        for item in filter(None, (x.strip() for x in v.split(","))):
            site, _, model = item.partition("=")
            if not site or model not in MODEL_NAMES:
                raise ValueError(
                    f"entry {item!r} must be SITE=MODEL with MODEL one of {', '.join(MODEL_NAMES)}"
                )
        return v

    def model_for(self, site: str) -> str | None:
        """The model ``site-models`` assigns to ``site``, if any."""
        for item in filter(None, (x.strip() for x in self.site_models.split(","))):
            name, _, model = item.partition("=")
            if name == site:
                return model
        return None

    @field_validator("fm")
    @classmethod
    def _known_fm(cls, v: str) -> str:
        known = ("litemedsam", "sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam_vit_b")
        if v not in known:
            raise ValueError(f"unknown fm {v!r}")
        return v

    @field_validator("sites_per_round")
    @classmethod
    def _enough_sampled(cls, v: int, info: Any) -> int:
        if v and v < info.data.get("min_sites", 1):
            raise ValueError(
                f"sites-per-round {v} is below min-sites {info.data.get('min_sites')}: no round could complete"
            )
        return v

    @field_validator("test_fraction")
    @classmethod
    def _fractions(cls, v: float, info: Any) -> float:
        val = info.data.get("val_fraction", 0.0)
        if val + v >= 0.9:
            raise ValueError(f"val-fraction + test-fraction must be < 0.9 (got {val} + {v})")
        return v


class NodeConfig(_Strict):
    """One SuperNode's own settings (``flower-supernode --node-config``).

    In simulation Flower sets ``partition-id`` and ``num-partitions``; a deployed site sets
    ``data-dir`` (its own image/mask folder) and optionally its model, device and threads.
    """

    partition_id: int | None = Field(None, ge=0)
    num_partitions: int | None = Field(None, ge=1)
    data_dir: str = Field("", description="this site's folder with images/ and masks/")
    site_name: str = ""
    phantom_id: int | None = Field(None, ge=0, description="use built-in phantom site N")
    model: str = Field("", description=f"empty = the run's model; else one of {', '.join(MODEL_NAMES)}")
    device: Device | Literal[""] = ""
    num_threads: int = Field(0, ge=0, le=256, description="0 = the run's num-threads")
    cache_dir: str = ""
    state_dir: str = Field("", description="where the site keeps its model and pool; empty = cache-dir/state")
    audit_log: str = Field(
        "",
        description="JSON-lines audit log of every reply this site sends; empty = state-dir/audit.jsonl, 'off' = none",
    )
    policy_file: str = Field(
        "", description="the site's policy (TOML); empty = allow what the protocol allows"
    )
    split_file: str = Field("", description="this site's own split file (JSON); empty = a seeded split")
    fm_checkpoint: str = Field(
        "", description="this site's copy of the FM weights (method fedfm, SAM models)"
    )

    @property
    def deployed(self) -> bool:
        """A site of its own (data-dir or phantom-id, no simulation partition): it takes paths only
        from this node config, never from the coordinator's run config."""
        return self.partition_id is None

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        if v and v not in MODEL_NAMES:
            raise ValueError(f"unknown model {v!r}")
        return v


def _frozen(raw: Mapping[str, Any]) -> tuple | None:
    """A hashable key of a flat config (None when a value is not hashable)."""
    try:
        key = tuple(sorted((k, type(v).__name__, v) for k, v in raw.items()))  # 1 and True differ
        hash(key)
    except TypeError:
        return None
    return key


@functools.lru_cache(maxsize=64)
def _parse_frozen(kind: str, key: tuple) -> _Strict:
    cls = RunConfig if kind == "run" else NodeConfig
    return cls.parse({k: v for k, _, v in key}, source=f"{kind} config")


def parse_run_config(raw: Mapping[str, Any]) -> RunConfig:
    """The run config, validated. Parsed once per distinct config: a message's guard, size gate and
    handler all ask, and the models are frozen, so they share one object."""
    key = _frozen(raw)
    if key is None:
        return RunConfig.parse(raw, source="run config")  # type: ignore[return-value]
    return _parse_frozen("run", key)  # type: ignore[return-value]


def parse_node_config(raw: Mapping[str, Any]) -> NodeConfig:
    """The node config, validated; parsed once per distinct config (as :func:`parse_run_config`)."""
    key = _frozen(raw)
    if key is None:
        return NodeConfig.parse(raw, source="node config")  # type: ignore[return-value]
    return _parse_frozen("node", key)  # type: ignore[return-value]
