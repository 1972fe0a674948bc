"""The server's foundation model as teacher and student on the synthetic pool.

The frozen image encoder embeds the pool once (cached, float16); every round the FM's
probabilities on the pool come from the cached embeddings and the mask decoder alone, and
distillation updates only the decoder (towards the sites' ensemble plus the synthetic masks).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common.fileio import atomic_write
from common.foundation import FoundationSegmenter
from common.losses import DistillWeights, distillation_loss
from common.models import load_weights


class FoundationTeacher:
    def __init__(
        self,
        fm: FoundationSegmenter,
        images: np.ndarray,
        masks: np.ndarray,
        prompt: str,
        learning_rate: float,
        log=None,
        cache: Path | None = None,
        cache_key: dict | None = None,
    ):
        """``cache``: a file that keeps the pool's embeddings across runs (the encoder is frozen, so
        they depend only on ``cache_key``: FM, its weights and the pool); reused when the key matches."""
        self.fm = fm
        self.masks = torch.from_numpy(masks).float()
        self.boxes = fm.prompts(len(images), prompt, self.masks)
        t0 = time.time()
        self.embeddings = self._cached(cache, cache_key, len(images))
        if self.embeddings is None:
            with torch.no_grad():
                self.embeddings = fm.embed(torch.from_numpy(images)).to(torch.float16).cpu()
            if cache is not None:
                payload = {"key": cache_key, "embeddings": self.embeddings}
                atomic_write(cache, lambda p: torch.save(payload, p))
            how = "computed"
        else:
            how = f"reused from {cache}"
        self.embed_seconds = time.time() - t0
        if log:
            log(f"FM embeddings of {len(images)} pool samples {how} in {self.embed_seconds:.1f} s")
        self.opt = torch.optim.AdamW(fm.trainable_parameters(), lr=learning_rate, weight_decay=1e-4)

    @staticmethod
    def _cached(cache: Path | None, key: dict | None, n: int) -> torch.Tensor | None:
        if cache is None or not cache.is_file():
            return None
        try:
            payload = torch.load(cache, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - an unreadable cache is recomputed, never trusted
            return None
        emb = payload.get("embeddings") if isinstance(payload, dict) else None
        if payload.get("key") != key or emb is None or len(emb) != n or not torch.isfinite(emb).all():
            return None
        return emb

    def _logits(self, idx: np.ndarray, size: int) -> torch.Tensor:
        dev = next(self.fm.parameters()).device
        emb = self.embeddings[idx].to(dev, torch.float32)
        boxes = None if self.boxes is None else self.boxes[idx]
        return self.fm.decode(emb, boxes, size)

    @torch.no_grad()
    def probs(self, idx: np.ndarray | None = None, size: int = 64, batch: int = 16) -> torch.Tensor:
        self.fm.eval()
        idx = np.arange(len(self.masks)) if idx is None else np.asarray(idx)
        out = [torch.sigmoid(self._logits(idx[i : i + batch], size)).cpu() for i in range(0, len(idx), batch)]
        return torch.cat(out) if out else torch.zeros(0, 1, size, size)

    def masks_at(self, idx: np.ndarray, size: int) -> torch.Tensor:
        m = self.masks[np.asarray(idx)]
        return (F.interpolate(m, size=(size, size), mode="area") >= 0.5).float()

    def distill(
        self,
        idx: np.ndarray,
        target_probs: torch.Tensor | None,
        w: DistillWeights,
        epochs: int,
        batch: int = 8,
        seed: int = 0,
        kd_gate: torch.Tensor | None = None,
    ) -> float:
        """Update the decoder on samples ``idx``: supervised on their masks, plus KL towards
        ``target_probs`` (the sites' ensemble, aligned with ``idx``) on the samples ``kd_gate``
        selects (all when None)."""
        if epochs <= 0 or len(idx) == 0:
            return float("nan")
        size = target_probs.shape[-1] if target_probs is not None else 64
        gen = torch.Generator().manual_seed(seed)
        self.fm.train()
        losses = []
        idx = np.asarray(idx)
        for _ in range(epochs):
            order = torch.randperm(len(idx), generator=gen).numpy()
            for i in range(0, len(order), batch):
                b = order[i : i + batch]
                logits = self._logits(idx[b], size)
                tgt = target_probs[b].to(logits.device) if target_probs is not None else None
                gate = kd_gate[b].to(logits.device) if kd_gate is not None else None
                loss = distillation_loss(logits, self.masks_at(idx[b], size).to(logits.device), tgt, w, gate)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
                losses.append(float(loss.detach()))
        self.fm.eval()
        return float(np.mean(losses))

    def adapt(self, epochs: int, w: DistillWeights, seed: int = 0) -> float:
        """Before it teaches, the prompt-free FM learns the task on the pool's masks (supervised
        only, decoder only): without it, a whole-image-box SAM answers "the whole frame"."""
        sup_only = DistillWeights(supervised=1.0, kd=0.0, temperature=w.temperature, pos_weight=w.pos_weight)
        return self.distill(np.arange(len(self.masks)), None, sup_only, epochs, seed=seed)

    def state(self) -> dict:
        """What distillation changes: the FM's trainable weights and their optimiser (a checkpoint)."""
        net = self.fm.net
        trainable = {n for n, p in net.named_parameters() if p.requires_grad}
        return {
            "weights": {k: v.detach().cpu().clone() for k, v in net.state_dict().items() if k in trainable},
            "opt": self.opt.state_dict(),
        }

    def load_state(self, state: dict) -> None:
        net = self.fm.net
        trainable = {n for n, p in net.named_parameters() if p.requires_grad}
        if set(state["weights"]) != trainable:
            raise ValueError("the checkpoint's FM weights are not this FM's trainable weights")
        net.load_state_dict(state["weights"], strict=False)
        self.opt.load_state_dict(state["opt"])

    def load_decoder(self, state: dict[str, np.ndarray]) -> None:
        """Continue from another decoder (the sites' average, server_app/teacher_sites.py); checked
        as any received weights are (keys, shapes, real dtypes, finite)."""
        load_weights(self.fm.decoder, state, "the FM's mask decoder")

    def decoder_state(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy() for k, v in self.fm.decoder.state_dict().items()}
