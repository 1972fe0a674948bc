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
    "fedavg-matched": ("flower", {"method": "fedavg"}),
    "fedfm": ("flower", {"method": "fedfm", "fm-trainable": "all"}),
    "fedfm-decoder": ("flower", {"method": "fedfm", "fm-trainable": "decoder"}),
    "dsfedmed-logits": ("flower", {"method": "dsfedmed", "exchange": "logits"}),
    "dsfedmed-weights": ("flower", {"method": "dsfedmed", "exchange": "weights"}),
    "central": ("central", {}),
}
METHOD_NOTES = {
    "local": "each site trains alone (not federated; same SiteTrainer, in the bench process)",
    "fedavg": "FedAvg of the site model (FedU-Net family)",
    "fedavg-matched": "FedAvg whose sites take, per round, as many private-data steps as a DSFedMed "
    "site's private + distillation steps (a gain cannot come from extra steps)",
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
    fractions: tuple[float, float] | None = None  # (val, test) of the fixed split; None = run defaults
    meaningful: bool = False  # False: the table checks the harness only, its numbers mean nothing

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
            "generator_steps_per_site": self.extra.get("gen-steps"),
            "seeds": list(self.seeds),
            "site_cap_train_val_test": list(self.caps) if self.caps else None,
            "models": {"site": self.extra.get("model", "unet"), "fm": self.extra.get("fm", "litemedsam")},
            "recipe": {k: v for k, v in self.extra.items() if k in RECIPE_KEYS},
            "split_fractions_val_test": list(self.fractions) if self.fractions else None,
        }


RECIPE_KEYS = (
    "model",
    "batch-size",
    "learning-rate",
    "weight-decay",
    "lr-schedule",
    "warmup-rounds",
    "augment-set",
)

# One optimiser recipe for every method (central and local included), calibrated on this machine's
# kind: AdamW, peak 3e-3, linear warm-up then cosine by round over the whole run, every site keeping
# its AdamW state across rounds; DiceCE; flips; batch 16; the 1.6 M-parameter MONAI UNet.
RECIPE = {
    "model": "unet-m",
    "batch-size": 16,
    "learning-rate": 3e-3,
    "weight-decay": 1e-4,
    "lr-schedule": "warmup-cosine",
    "warmup-rounds": 2,
    "augment-set": "flips",
}


# the FM's decoder learns at 3e-4 on batches of 8 cached embeddings (fedfm-decoder's sites and
# DSFedMed's teacher alike; the recipe of the calibration, 0.58 Dice@0.5 after 14 epochs of
# 250 real images)
FM_RECIPE = {"fm-learning-rate": 3e-4, "fm-batch-size": 8}
# DSFedMed's teacher learns at the sites before round 1 (client_app/teacher_round.py): 2 rounds of 60
# decoder steps of 8 embeddings per site (480 image passes, about 2 epochs of the largest site's
# training split), the decoder averaged. 2 rounds x 5 sites x 2 ways x 8.1 MB (float16) = 162 MB.
TEACHER_AT_SITES = {"fm-site-rounds": 2, "fm-site-steps": 60}
# fedfm-decoder's decoder steps per site and round: 32 rounds x 4 steps x 8 = 1,024 image passes
# per site, about 4 epochs of a site's training split
FM_DECODER_STEPS = 4


def distill_steps_per_round(pool_size: int, batch_size: int, local_epochs: int) -> int:
    """A DSFedMed site's distillation steps per round: its epochs over the whole pool (every
    sample carries the supervised loss; selection gates the distillation term only)."""
    return -(-pool_size // batch_size) * local_epochs


def _polypgen(name: str, image_size: int, description: str, device_note: str = "") -> Profile:
    # 32 rounds: at 24 the pooled model's validation Dice was still rising (0.43 at round 24, seed 0)
    rounds, epochs, pool = 32, 1, 128
    matched = distill_steps_per_round(pool, RECIPE["batch-size"], epochs)
    return Profile(
        name=name,
        description=description,
        data="polypgen",
        image_size=image_size,
        rounds=rounds,
        local_epochs=epochs,
        seeds=(0, 1, 2),
        holdout="C6",
        caps=None,
        fractions=(0.1, 0.2),
        pool_size=pool,
        # the generators are budgeted by steps (1500 at batch 16, ~0.6 s a step on a free core: about
        # 15 min per site); the seconds are only a safety cap. The pool is made once and reused by every
        # DSFedMed unit and seed (its key has no run seed), its cost charged to each unit.
        gen_seconds=3600.0,
        gen_sample_steps=50,
        methods=(
            Variant("central", "central"),
            Variant("local", "local"),
            Variant("fedavg", "fedavg"),
            Variant(
                "fedavg-matched",
                "fedavg-matched",
                {"extra-local-steps": matched},
                note=f"{matched} extra private steps per round = a DSFedMed site's distillation steps "
                f"({pool} pool samples at batch {RECIPE['batch-size']}, {epochs} epoch)",
            ),
            Variant(
                "fedfm-decoder",
                "fedfm-decoder",
                {"fm-local-steps": FM_DECODER_STEPS},
                note=f"{FM_DECODER_STEPS} decoder steps of {FM_RECIPE['fm-batch-size']} cached embeddings per "
                "site and round (a decoder step costs about 2.6 s on one core: a full epoch every round "
                "would be about 3.4 core-hours a unit)",
            ),
            Variant(
                "dsfedmed-logits",
                "dsfedmed-logits",
                TEACHER_AT_SITES,
                note=f"the teacher first learns at the sites: {TEACHER_AT_SITES['fm-site-rounds']} rounds of "
                f"{TEACHER_AT_SITES['fm-site-steps']} decoder steps on each site's cached embeddings, "
                "decoder averaged (float16, its bytes charged)",
            ),
        ),
        # what each part of DSFedMed adds: one seed each, read against the default's seed spread
        ablations=(
            Variant(
                "abl-no-site-teacher",
                "dsfedmed-logits",
                seeds=(0, 1),
                note="the teacher never sees real data: adapted on the pool only (the default before "
                "the teacher's rounds at the sites)",
            ),
            Variant(
                "abl-no-kd",
                "dsfedmed-logits",
                {**TEACHER_AT_SITES, "kd-weight": 0.0},
                seeds=(0,),
                note="kd-weight 0: the pool's masks only, no distillation at the sites",
            ),
            Variant(
                "abl-no-sites-to-fm",
                "dsfedmed-logits",
                {**TEACHER_AT_SITES, "fm-epochs": 0},
                seeds=(0,),
                note="the FM never learns from the sites (one-way distillation)",
            ),
            Variant(
                "abl-selection-all",
                "dsfedmed-logits",
                {**TEACHER_AT_SITES, "selection-rule": "all"},
                seeds=(0,),
                note="distillation on every pool sample (no learnability-guided selection)",
            ),
            Variant(
                "abl-no-fm-teacher",
                "dsfedmed-logits",
                {**TEACHER_AT_SITES, "target-fm-weight": 0.0},
                seeds=(0,),
                note="targets from the other sites' ensemble only (FM teacher off)",
            ),
            # its own pool: an empty pool-dir keeps the phantom pool in its run directory, so the
            # generator pool cached for the other DSFedMed units is never replaced
            Variant(
                "abl-phantom-pool",
                "dsfedmed-logits",
                {**TEACHER_AT_SITES, "pool-source": "phantoms", "pool-dir": ""},
                seeds=(0,),
                note="the pool from built-in phantoms instead of the sites' generators",
            ),
        ),  # fmt: skip
        extra={
            **RECIPE,
            "evaluate-every": 4,
            "gen-steps": 1500,
            "gen-batch-size": 16,
            # the pool's quality, measured at the sites in every DSFedMed unit: a model trained on the
            # pool alone for 30 epochs (240 steps), scored on each site's real validation images
            "pool-score-epochs": 30,
            # the FM: its decoder learns at 3e-4 (fedfm-decoder's sites and DSFedMed's teacher alike);
            # the teacher first adapts on the pool for 10 epochs
            **FM_RECIPE,
            "fm-adapt-epochs": 10,
            # a newcomer (the held-out hospital) trains on the pool and the final targets for as many
            # epochs as the federation had rounds
            "holdout-epochs": rounds,
            **({"device": "auto"} if device_note else {}),
        },
        run_timeout_s=3 * 3600.0,
        meaningful=True,
    )


_QUICK = ("local", "fedavg", "dsfedmed-logits", "dsfedmed-weights", "central")

PROFILES: dict[str, Profile] = {
    "polypgen": _polypgen(
        "polypgen",
        128,
        "reference: C1-C5 every pair in fixed per-site train/val/test splits (70/10/20, grouped by "
        "video), C6 held out entirely, 128 px, 32 rounds x 1 local epoch, 3 seeds",
    ),
    "polypgen-gpu": _polypgen(
        "polypgen-gpu",
        256,
        "the reference profile at 256 px for a GPU machine (device=auto)",
        device_note="gpu",
    ),
    "quick": Profile(
        name="quick",
        description="mechanics only: 6 PolypGen hospitals (C6 held out), 48 px, 3 rounds; numbers meaningless",
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
        methods=tuple(Variant(m, m) for m in _QUICK),
        run_timeout_s=900.0,
    ),
    "tiny": Profile(  # for the harness's own test: seconds, not meaningful numbers
        name="tiny",
        description="mechanics only: 3 built-in phantom sites (phantom-2 held out), 32 px, 1 round, 1 seed",
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
