"""A site's own policy: what it agrees to send, checked before and after every handler.

The file is TOML, named by node config ``policy-file`` (``dsfedmed provision`` writes a template)::

    allowed-message-types = ["query.profile", "train", "evaluate", "train.generator", "evaluate.pool",
                             "train.teacher"]
    max-reply-bytes = 0              # 0 = no limit; else the largest reply (array bytes) the site sends
    max-request-bytes = 1073741824   # the largest request (array bytes) the site decodes (0 = no limit)
    allow-generator-upload = true    # false: refuse train.generator (the diffusion weights)
    allow-weights-upload = true      # false: never send model weights (FedAvg, weights/hybrid exchange)

    [dp]                             # site-level differential privacy on uploaded probabilities
    enabled = false
    clip = 1.0                       # L2 bound of each sample's logit map (logit-size x logit-size)
    noise-multiplier = 1.0           # Gaussian noise std = noise-multiplier x L2 sensitivity
    delta = 1e-5
    max-epsilon = 0.0                # the site's total ε budget over every run, generators included (0 = none)

    [generator-dp]                   # DP-SGD (opacus) for the site's diffusion generator
    enabled = false
    noise-multiplier = 1.0
    max-grad-norm = 1.0
    delta = 1e-5

    [evaluate]                       # the server may score models on the site's labelled data
    splits = ["val", "test", "all"]  # which splits it may ask for ("all": a held-out site)
    max-requests-per-run = 0         # 0 = no limit; else evaluate requests answered per Flower run

A request the policy forbids gets an error reply that names the rule (the detail stays in the
site's log); the server records it and goes on without the site for that step.
"""

from __future__ import annotations

import fcntl
import json
import os
import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from common import protocol as P
from common.config import ConfigError

ALL_MESSAGE_TYPES = (
    P.MSG_QUERY_PROFILE,
    P.MSG_TRAIN,
    P.MSG_EVALUATE,
    P.MSG_TRAIN_GENERATOR,
    P.MSG_EVALUATE_POOL,
    P.MSG_TRAIN_TEACHER,
)


class PolicyViolation(Exception):
    """A request or a reply the site's policy forbids; ``rule`` names the policy key."""

    def __init__(self, rule: str, detail: str):
        super().__init__(f"policy {rule}: {detail}")
        self.rule = rule


class _Section(BaseModel):
    model_config = ConfigDict(
        alias_generator=lambda n: n.replace("_", "-"), populate_by_name=True, extra="forbid", frozen=True
    )


class LogitDP(_Section):
    """Gaussian mechanism on every upload of site probabilities (see :mod:`client_app.privacy`)."""

    enabled: bool = False
    clip: float = Field(1.0, gt=0.0)
    noise_multiplier: float = Field(1.0, gt=0.0)
    delta: float = Field(1e-5, gt=0.0, lt=1.0)
    max_epsilon: float = Field(0.0, ge=0.0)


class GeneratorDP(_Section):
    """DP-SGD (opacus) for the site's diffusion generator."""

    enabled: bool = False
    noise_multiplier: float = Field(1.0, gt=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    delta: float = Field(1e-5, gt=0.0, lt=1.0)


class EvaluateLimits(_Section):
    """What the server may learn from the site's labels: each evaluate request scores weights the
    server chose on one of the site's splits, so answering without limit is an oracle."""

    splits: tuple[str, ...] = ("val", "test", "all")
    max_requests_per_run: int = Field(0, ge=0)

    @field_validator("splits")
    @classmethod
    def _known_splits(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(v) - set(P.SPLITS))
        if unknown:
            raise ValueError(f"unknown split(s) {unknown}; known: {', '.join(P.SPLITS)}")
        return v


class SitePolicy(_Section):
    allowed_message_types: tuple[str, ...] = ALL_MESSAGE_TYPES
    max_reply_bytes: int = Field(0, ge=0)
    # the largest request (array bytes) the site decodes, whatever the run config says: weights,
    # pool and soft targets alike (0 = no limit; the protocol's own bounds still apply)
    max_request_bytes: int = Field(1 << 30, ge=0)
    allow_generator_upload: bool = True
    allow_weights_upload: bool = True
    dp: LogitDP = LogitDP()
    generator_dp: GeneratorDP = GeneratorDP()
    evaluate: EvaluateLimits = EvaluateLimits()
    source: str = Field("", exclude=True)  # the file it came from (for messages)

    @field_validator("allowed_message_types")
    @classmethod
    def _known_types(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(v) - set(ALL_MESSAGE_TYPES))
        if unknown:
            raise ValueError(f"unknown message type(s) {unknown}; known: {', '.join(ALL_MESSAGE_TYPES)}")
        return v

    # --- checks ------------------------------------------------------------------------------
    def check_request(self, message_type: str) -> None:
        """Before any work: is this kind of request allowed at all?"""
        if message_type not in self.allowed_message_types:
            raise PolicyViolation(
                "allowed-message-types",
                f"this site does not answer '{message_type}' (allowed: {', '.join(self.allowed_message_types)})",
            )
        if message_type == P.MSG_TRAIN_GENERATOR and not self.allow_generator_upload:
            raise PolicyViolation(
                "allow-generator-upload",
                "this site does not send diffusion generator weights (they can memorise training images)",
            )
        if message_type == P.MSG_TRAIN_TEACHER:  # refused before any work, not only at the reply
            if not self.allow_weights_upload:
                raise PolicyViolation(
                    "allow-weights-upload",
                    "this site does not send model weights (train.teacher answers with the FM's decoder)",
                )
            if self.dp.enabled:
                raise PolicyViolation(
                    "dp.enabled",
                    "train.teacher answers with the FM's decoder trained on private images, which is not "
                    "noised: a site under DP does not take part in the teacher's rounds",
                )

    def check_request_size(self, nbytes: int) -> None:
        """Before anything in a request is decoded: its arrays fit the site's own bound."""
        if self.max_request_bytes and nbytes > self.max_request_bytes:
            raise PolicyViolation(
                "max-request-bytes",
                f"the request holds {nbytes} array bytes, more than this site accepts ({self.max_request_bytes})",
            )

    def check_evaluate(self, split: str, counter: EvaluateCounter | None, run_id: int) -> None:
        """Before an evaluate request is answered: the split is one the site lets the server score,
        and the run has not used up its requests (each allowed request counts, answered or not)."""
        if split not in self.evaluate.splits:
            raise PolicyViolation(
                "evaluate.splits",
                f"this site does not score models on its '{split}' split (allowed: {', '.join(self.evaluate.splits)})",
            )
        limit = self.evaluate.max_requests_per_run
        if limit and counter is not None:
            n = counter.take(run_id)
            if n > limit:
                raise PolicyViolation(
                    "evaluate.max-requests-per-run",
                    f"run {run_id} has asked for {n} evaluations; this site answers at most {limit} per run",
                )

    def check_dp_run(self, method: str, exchange: str) -> None:
        """Under ``[dp]`` a run that would send model weights is refused before training."""
        if self.dp.enabled and (method != "dsfedmed" or exchange != "logits"):
            raise PolicyViolation(
                "dp.enabled",
                f"method {method} / exchange {exchange} sends model weights, which are not noised: a site "
                "under DP takes part in DSFedMed with exchange 'logits' only",
            )

    def check_reply(self, array_records: dict, nbytes: int) -> None:
        """After the handler, before anything leaves: what the reply holds and how big it is."""
        if P.KEY_GENERATOR in array_records and not self.allow_generator_upload:
            raise PolicyViolation("allow-generator-upload", "the reply holds generator weights")
        if P.KEY_ARRAYS in array_records and not self.allow_weights_upload:
            raise PolicyViolation("allow-weights-upload", "the reply holds model weights")
        if self.dp.enabled and P.KEY_ARRAYS in array_records:
            raise PolicyViolation(
                "dp.enabled",
                "the reply holds model weights, which are not noised: a site under DP sends only noised "
                "probabilities (use exchange 'logits')",
            )
        if self.dp.enabled and P.KEY_GENERATOR in array_records and not self.generator_dp.enabled:
            raise PolicyViolation(
                "generator-dp.enabled",
                "the reply holds generator weights trained without DP-SGD while the site's [dp] is on",
            )
        if self.max_reply_bytes and nbytes > self.max_reply_bytes:
            raise PolicyViolation(
                "max-reply-bytes", f"the reply holds {nbytes} bytes, more than {self.max_reply_bytes}"
            )


PERMISSIVE = SitePolicy()


class EvaluateCounter:
    """How many evaluate requests each Flower run has made of this site, kept in the site's state
    folder (``evaluate-requests.json``, locked while counting: ClientApp processes may overlap). The
    run id is the SuperLink's, not something the server's run config can set."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def take(self, run_id: int) -> int:
        """Count one more request of ``run_id``; returns the run's count including this one."""
        from common.fileio import private_mkdir

        private_mkdir(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            raw = os.read(fd, 1 << 20).decode() or "{}"
            try:
                counts = {str(k): int(v) for k, v in json.loads(raw).items()}
            except (ValueError, AttributeError):
                raise ConfigError(
                    f"{self.path} is damaged; the site cannot count evaluate requests"
                ) from None
            counts[str(run_id)] = counts.get(str(run_id), 0) + 1
            os.lseek(fd, 0, os.SEEK_SET)
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(counts).encode())
            os.fsync(fd)
            return counts[str(run_id)]
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def load_policy(path: str) -> SitePolicy:
    """The policy in ``path`` (TOML); empty path = allow what the protocol allows."""
    if not path:
        return PERMISSIVE
    p = Path(path).expanduser()
    try:
        raw = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"policy-file not found: {p}") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"policy-file {p} cannot be read as TOML: {exc}") from None
    try:
        return SitePolicy.model_validate({**raw, "source": str(p)})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e['loc']) or '(file)'}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"policy-file {p}: {problems}") from None
