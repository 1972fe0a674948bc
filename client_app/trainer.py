"""Framework-neutral site trainer (the MONAI ``ClientAlgo`` idea: no Flower in here).

The Flower handlers translate Messages into calls of this class and its results back into
records.  Weights cross this boundary as ``{name: numpy array}`` state dicts.
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from monai.losses import DiceCELoss
from torch.utils.data import DataLoader

from common.config import RunConfig
from common.data import SiteArrays
from common.losses import DistillWeights, distillation_loss
from common.metrics import ThresholdedScores
from common.models import build_model, check_input_size, count_parameters, load_weights
from common.schedule import round_learning_rate
from common.splits import Split
from common.transforms import make_dataset, to_float_batch

log = logging.getLogger("dsfedmed.client")


class _EpochLog:
    """Progress of a long site step in the SuperNode's log: one line per epoch, at most every
    ``every_s`` seconds (and always for the last epoch of a step that took that long)."""

    def __init__(self, site: str, what: str, epochs: int, every_s: float = 10.0):
        self.site, self.what, self.epochs, self.every_s = site, what, epochs, every_s
        self.t0 = self.last = time.monotonic()

    def epoch(self, e: int, loss: float, steps: int) -> None:
        now = time.monotonic()
        if now - self.last >= self.every_s or (e == self.epochs and now - self.t0 >= self.every_s):
            self.last = now
            log.info(
                "%s: %s epoch %d/%d, loss %.4f, %d steps, %.0f s",
                self.site, self.what, e, self.epochs, loss, steps, now - self.t0,
            )  # fmt: skip


@dataclass(frozen=True)
class TrainSettings:
    epochs: int
    batch_size: int
    learning_rate: float
    augment: bool
    seed: int
    max_steps: int = 0  # cap on optimiser steps (0 = all epochs); the fedfm baseline needs it on a CPU
    extra_steps: int = 0  # more private-data steps after the epochs (fedavg-matched)
    weight_decay: float = 0.0
    augment_set: str = "full"

    @classmethod
    def from_run(cls, run: RunConfig, server_round: int) -> TrainSettings:
        """A round's local training settings: the round's learning rate from the run's schedule;
        the seed changes every round."""
        fm = run.method == "fedfm"
        peak = run.fm_learning_rate if fm else run.learning_rate
        return cls(
            epochs=run.local_epochs,
            batch_size=run.fm_batch_size if fm else run.batch_size,
            learning_rate=round_learning_rate(
                peak, server_round, run.num_rounds, run.lr_schedule, run.warmup_rounds
            ),
            # the decoder-only FM trains on cached embeddings of the unaltered images
            augment=run.augment and not (fm and run.fm_trainable == "decoder"),
            seed=run.seed * 100_003 + server_round,
            max_steps=run.fm_local_steps if fm else 0,
            extra_steps=0 if fm else run.extra_local_steps,
            weight_decay=run.weight_decay,
            augment_set=run.augment_set,
        )


class SiteTrainer:
    """Owns one site's model and data; trains and evaluates it on the site's own splits."""

    def __init__(
        self,
        site: SiteArrays,
        split: Split,
        model_name: str,
        device: torch.device,
        model: torch.nn.Module | None = None,
    ):
        """``model`` overrides the registry (the fedfm baseline passes its prompt-free FM); its
        ``exchanged_module``, if it has one, is the part whose weights travel."""
        if model is None:
            check_input_size(model_name, site.images.shape[-1])
            model = build_model(model_name, in_channels=site.images.shape[1])
        self.site = site
        self.split = split
        self.model_name = model_name
        self.device = device
        self.model = model.to(device)
        self.exchanged: torch.nn.Module = getattr(self.model, "exchanged_module", self.model)
        self.loss_fn = DiceCELoss(sigmoid=True)
        # AdamW states by step ("local", "distill"), kept across rounds by every method (on disk
        # between messages, client_app.state.SiteStore)
        self.optim_states: dict[str, dict] = {}

    def _optimizer(self, kind: str, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
        """AdamW for one kind of step, continuing from its saved state (at this round's lr)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        if kind in self.optim_states:
            opt.load_state_dict(self.optim_states[kind])
            for group in opt.param_groups:
                group["lr"] = lr
                group["weight_decay"] = weight_decay
        return opt

    # --- weights -----------------------------------------------------------------------------
    def get_weights(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy() for k, v in self.exchanged.state_dict().items()}

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        load_weights(self.exchanged, weights, self.model_name)

    @property
    def num_parameters(self) -> int:
        return count_parameters(self.model)

    # --- training ----------------------------------------------------------------------------
    def train(
        self, s: TrainSettings, images: np.ndarray | None = None, masks: np.ndarray | None = None
    ) -> dict[str, float]:
        """Local epochs (then ``extra_steps`` more steps) of DiceCE + AdamW on the site's training
        split (or on the given pairs). ``steps`` in the result is the number of optimiser steps."""
        t0 = time.time()
        gen = torch.Generator().manual_seed(s.seed ^ zlib.crc32(self.site.name.encode()))
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        if images is None or masks is None:
            imgs, masks = self.site.subset(self.split["train"])
        else:
            imgs = images
        ds = make_dataset(imgs, masks, augment=s.augment, kind=s.augment_set)
        ds_rng = np.random.default_rng(s.seed)
        for t in getattr(ds.transform, "transforms", []):
            if hasattr(t, "set_random_state"):
                t.set_random_state(seed=int(ds_rng.integers(2**31)))
        loader = DataLoader(
            ds, batch_size=min(s.batch_size, len(ds)), shuffle=True, generator=gen, drop_last=False
        )
        opt = self._optimizer("local", s.learning_rate, s.weight_decay)
        self.model.train()
        total, steps = 0.0, 0
        target = s.epochs * len(loader) + s.extra_steps
        if s.max_steps:
            target = min(target, s.max_steps)
        epochs = -(-target // max(len(loader), 1))
        progress = _EpochLog(self.site.name, "local training", epochs)
        for epoch in range(1, epochs + 1):
            before = steps
            for batch in loader:
                if steps >= target:
                    break
                x = batch["image"].to(self.device)
                y = batch["mask"].to(self.device)
                if x.shape[0] < 2 and any(
                    isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in self.model.modules()
                ):
                    continue  # batch norm cannot train on a single image
                opt.zero_grad(set_to_none=True)
                loss = self.loss_fn(self.model(x), y)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"site {self.site.name}: training loss became {loss}")
                loss.backward()
                opt.step()
                total += float(loss.detach())
                steps += 1
            progress.epoch(epoch, total / max(steps, 1), steps)
            if steps == before:
                break  # nothing trainable in a whole pass (a single image under batch norm)
        self.optim_states["local"] = opt.state_dict()
        return {
            "train-loss": total / max(steps, 1),
            "num-examples": len(ds),
            "steps": steps,
            "seconds": time.time() - t0,
        }

    def train_with_distillation(
        self,
        s: TrainSettings,
        syn_images: np.ndarray,
        syn_masks: np.ndarray,
        teacher_probs: torch.Tensor | None,
        w: DistillWeights,
        private: bool = True,
        kd_gate: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """DSFedMed site step: epochs over the synthetic samples (supervised BCE on every sample's
        mask + KL towards the soft targets on the samples ``kd_gate`` (N,) selects; all when None;
        ``teacher_probs`` is aligned with the samples), then the local epochs on private data.

        Distillation comes first so that every round ends on the site's own domain: the pool carries
        the other sites' and the FM's knowledge in, and the private epochs anchor the model to the
        site's real images before it is evaluated and before it answers on the pool.
        ``private=False`` (a held-out site bootstrapping) learns from the synthetic samples only."""
        t0 = time.time()
        out: dict[str, float] = {}
        if len(syn_images):
            out.update(self._distill(s, syn_images, syn_masks, teacher_probs, w, kd_gate))
        if private:
            out.update(self.train(s))
        else:
            out.update({"train-loss": float("nan"), "num-examples": len(syn_images), "steps": 0})
        out["seconds"] = time.time() - t0
        return out

    def _distill(
        self,
        s: TrainSettings,
        syn_images: np.ndarray,
        syn_masks: np.ndarray,
        teacher_probs: torch.Tensor | None,
        w: DistillWeights,
        kd_gate: torch.Tensor | None,
    ) -> dict[str, float]:
        gen = torch.Generator().manual_seed(s.seed + 1)
        x_all = to_float_batch(syn_images)
        m_all = torch.from_numpy(syn_masks.astype(np.float32))
        opt = self._optimizer("distill", s.learning_rate, s.weight_decay)
        self.model.train()
        total, steps = 0.0, 0
        bs = max(2, min(s.batch_size, len(x_all)))
        progress = _EpochLog(self.site.name, "distillation", s.epochs)
        for epoch in range(1, s.epochs + 1):
            order = torch.randperm(len(x_all), generator=gen)
            for i in range(0, len(order), bs):
                idx = order[i : i + bs]
                if len(idx) < 2:
                    continue
                x, m = x_all[idx].to(self.device), m_all[idx].to(self.device)
                t = teacher_probs[idx].to(self.device) if teacher_probs is not None else None
                g = kd_gate[idx].to(self.device) if kd_gate is not None else None
                opt.zero_grad(set_to_none=True)
                loss = distillation_loss(self.model(x), m, t, w, g)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"site {self.site.name}: distillation loss became {loss}")
                loss.backward()
                opt.step()
                total += float(loss.detach())
                steps += 1
            progress.epoch(epoch, total / max(steps, 1), steps)
        self.optim_states["distill"] = opt.state_dict()
        return {"distill-loss": total / max(steps, 1), "distill-steps": steps}

    def pool_score(
        self, pool_images: np.ndarray, pool_masks: np.ndarray, s: TrainSettings
    ) -> dict[str, float]:
        """How much a synthetic pool is worth here: validation Dice of this site's (fresh) model
        trained on the pool alone, against the same model trained on as many of its real images."""
        start = self.get_weights()
        self.optim_states.clear()  # both models start fresh: same weights, new optimiser
        self.train(s, pool_images, pool_masks)
        d_pool = self.evaluate("val")["dice"]
        n_real = min(len(pool_images), len(self.split["train"]))
        self.set_weights(start)
        self.optim_states.clear()
        real_imgs, real_masks = self.site.subset(self.split["train"][:n_real])
        self.train(s, real_imgs, real_masks)
        d_real = self.evaluate("val")["dice"]
        self.set_weights(start)
        return {"dice-pool": d_pool, "dice-real": d_real, "n-pool": len(pool_images), "n-real": n_real}

    # --- evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def predict_probs(self, images: np.ndarray, batch_size: int = 32) -> torch.Tensor:
        self.model.eval()
        out = []
        for i in range(0, len(images), batch_size):
            x = to_float_batch(images[i : i + batch_size]).to(self.device)
            out.append(torch.sigmoid(self.model(x)).cpu())
        return torch.cat(out) if out else torch.zeros(0, 1, *images.shape[-2:])

    def evaluate(self, split: str) -> dict[str, float]:
        """Dice/IoU (threshold-averaged) on ``split`` (train, val, test, or all = the three together:
        every pair the run uses, which a held-out site is tested on)."""
        t0 = time.time()
        if split == "all":
            idx = sorted(self.split["train"] + self.split["val"] + self.split["test"])
        else:
            idx = self.split[split]
        if not idx:
            nan = float("nan")
            return {"dice": nan, "iou": nan, "dice05": nan, "iou05": nan, "n": 0, "seconds": 0.0}
        imgs, masks = self.site.subset(idx)
        scores = ThresholdedScores()
        scores.update(self.predict_probs(imgs), torch.from_numpy(masks.astype(np.float32)))
        res = scores.result()
        res["seconds"] = time.time() - t0
        return res
