"""Benchmark profiles: the data, scale, seeds, methods and ablations of one comparison.

Every method in a profile gets the same sites, the same fixed split (capped per site so the CPU
budget holds; seeds vary initialisation and training order, not the split), the same rounds and
local epochs, and the same synthetic pool (built once, reused by every DSFedMed run).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["flower", "local", "central"]

# method name -> how it runs and its run-config overrides on top of the profile's base
METHODS: dict[str, tuple[Kind, dict]] = {
    "local": ("local", {}),
    "fedavg": ("flower", {"method": "fedavg"}),
    "fedfm": ("flower", {"method": "fedfm", "fm-trainable": "all"}),
    "fedfm-decoder": ("flower", {"method": "fedfm", "fm-trainable": "decoder"}),
    "dsfedmed-logits": ("flower", {"method": "dsfedmed", "exchange": "logits"}),
    "dsfedmed-weights": ("flower", {"method": "dsfedmed", "exchange": "weights"}),
    "central": ("central", {}),
}
METHOD_NOTES = {
    "local": "each site trains alone (not federated; same SiteTrainer, in the bench process)",
    "fedavg": "FedAvg of the site model (FedU-Net family)",
    "fedfm": "sites fine-tune the whole FM, all weights averaged (FedSAM); whole-image box prompt",
    "fedfm-decoder": "sites fine-tune the FM's mask decoder only, decoder averaged (FedMSA direction)",
    "dsfedmed-logits": "DSFedMed, site probabilities on synthetic samples exchanged (this product's default)",
    "dsfedmed-weights": "DSFedMed, site-model weights exchanged and distilled on the server (the paper's)",
    "central": "pooled training on all training sites' data (upper bound, not federated)",
}


@dataclass(frozen=True)
class Variant:
    """One line of the results: a method, or an ablation of one, with its own overrides."""

    name: str
    method: str
    overrides: dict = field(default_factory=dict)
    seeds: tuple[int, ...] | None = None  # None = the profile's seeds
    note: str = ""

    @property
    def kind(self) -> Kind:
        return METHODS[self.method][0]

    def run_config(self, base: dict, seed: int) -> dict:
        return {**base, **METHODS[self.method][1], **self.overrides, "seed": seed}


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    data: Literal["polypgen", "phantoms"]
    image_size: int
    rounds: int
    local_epochs: int
    seeds: tuple[int, ...]
    holdout: str
    caps: tuple[int, int, int] | None  # per-site (train, val, test) caps of the fixed split
    pool_size: int
    gen_seconds: float
    gen_sample_steps: int
    methods: tuple[Variant, ...]
    ablations: tuple[Variant, ...] = ()
    num_sites: int = 6
    extra: dict = field(default_factory=dict)  # more run-config keys for every run
    run_timeout_s: float = 1800.0

    def base_run_config(self, data_root: str, split_file: str, pool_dir: str) -> dict:
        cfg = {
            "data-root": data_root,
            "split-file": split_file,
            "image-size": self.image_size,
            "num-rounds": self.rounds,
            "local-epochs": self.local_epochs,
            "holdout-site": self.holdout,
            "pool-size": self.pool_size,
            "pool-dir": pool_dir,
            "pool-seed": 0,  # one pool for every seed and method: built once, reused
            "gen-seconds": self.gen_seconds,
            "gen-sample-steps": self.gen_sample_steps,
            "pool-score-epochs": 0,
            "min-sites": 2,
            "round-timeout-s": self.run_timeout_s,
            **self.extra,
        }
        return {k: v for k, v in cfg.items() if v != "" or k in ("data-root", "split-file")}

    def variants(self) -> tuple[Variant, ...]:
        return self.methods + self.ablations

    def scale(self) -> dict:
        return {
            "image_size": self.image_size,
            "rounds": self.rounds,
            "local_epochs": self.local_epochs,
            "pool_size": self.pool_size,
            "generator_seconds_per_site": self.gen_seconds,
            "seeds": list(self.seeds),
            "site_cap_train_val_test": list(self.caps) if self.caps else None,
            "models": {"site": self.extra.get("model", "unet"), "fm": self.extra.get("fm", "litemedsam")},
        }


_ALL = ("local", "fedavg", "dsfedmed-logits", "dsfedmed-weights", "central")

PROFILES: dict[str, Profile] = {
    "quick": Profile(
        name="quick",
        description="6 PolypGen hospitals (C6 held out), 48 px, 3 rounds, 3 seeds; fedfm only in 'full'",
        data="polypgen",
        image_size=48,
        rounds=3,
        local_epochs=2,
        seeds=(0, 1, 2),
        holdout="C6",
        caps=(32, 8, 16),
        pool_size=32,
        gen_seconds=20.0,
        gen_sample_steps=25,
        methods=tuple(Variant(m, m) for m in _ALL),
        run_timeout_s=900.0,
    ),
    "full": Profile(
        name="full",
        description="6 PolypGen hospitals (C6 held out), 64 px, 5 rounds, 3 seeds, fedfm and ablations",
        data="polypgen",
        image_size=64,
        rounds=5,
        local_epochs=2,
        seeds=(0, 1, 2),
        holdout="C6",
        caps=(48, 12, 24),
        pool_size=64,
        gen_seconds=90.0,
        gen_sample_steps=50,
        methods=tuple(Variant(m, m) for m in _ALL)
        + (
            Variant(
                "fedfm",
                "fedfm",
                {"fm-local-steps": 1, "fm-batch-size": 2, "evaluate-every": 5},
                seeds=(0,),
                note="CPU budget: 1 local step of 2 images per round (the FM costs ~18 s per image "
                "and training step on this CPU), validation after the last round only, one seed",
            ),
        ),
        ablations=(
            Variant("no-mutual", "dsfedmed-logits", {"fm-epochs": 0}, note="FM decoder never updated"),
            Variant(
                "no-selection", "dsfedmed-logits", {"selection-rule": "all"}, note="every sample, every round"
            ),
        ),
        run_timeout_s=1800.0,
    ),
    "tiny": Profile(  # for the harness's own test: seconds, not meaningful numbers
        name="tiny",
        description="3 built-in phantom sites (phantom-2 held out), 32 px, 1 round, 1 seed",
        data="phantoms",
        image_size=32,
        rounds=1,
        local_epochs=1,
        seeds=(0,),
        holdout="phantom-2",
        caps=None,
        pool_size=8,
        gen_seconds=5.0,
        gen_sample_steps=4,
        methods=(Variant("local", "local"), Variant("fedavg", "fedavg")),
        num_sites=3,
        extra={"phantom-images-per-site": 16},
        run_timeout_s=300.0,
    ),
}
