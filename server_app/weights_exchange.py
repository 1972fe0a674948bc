"""Weights exchange on the server (the paper's exchange, ``exchange=weights``): the averaged site
model materialised, its probabilities on the pool, and its distillation towards the FM on S_r.

A mixin of :class:`server_app.dsfedmed.DSFedMedStrategy`: it reads ``cfg`` and ``weights``."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord

from common.codec import from_array_record, to_array_record
from common.losses import distillation_loss
from common.models import build_model, load_weights
from common.transforms import to_float_batch


class WeightsExchange:
    def _server_model(self, arrays: ArrayRecord) -> torch.nn.Module:
        """The averaged site model, materialised on the server (weights exchange only)."""
        model = build_model(self.cfg.model)
        load_weights(model, from_array_record(arrays), self.cfg.model)
        return model

    def _model_probs(self, model: torch.nn.Module, images: np.ndarray) -> torch.Tensor:
        """The model's probabilities at ``logit-size``: what sites would have sent in logits mode."""
        model.eval()
        with torch.no_grad():
            p = torch.sigmoid(model(to_float_batch(images)))
        return F.interpolate(p, size=(self.cfg.logit_size,) * 2, mode="area")

    def _distill_server_model(self, model: torch.nn.Module, images, masks, fm_probs, rnd) -> ArrayRecord:
        """The paper's server-side step: the averaged site model learns from the FM on S_r."""
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=self.cfg.learning_rate)
        gen = torch.Generator().manual_seed(rnd)
        x_all, m_all = to_float_batch(images), torch.from_numpy(masks).float()
        for _ in range(max(1, self.cfg.fm_epochs)):
            order = torch.randperm(len(x_all), generator=gen)
            for i in range(0, len(order), self.cfg.batch_size):
                b = order[i : i + self.cfg.batch_size]
                if len(b) < 2:
                    continue
                loss = distillation_loss(model(x_all[b]), m_all[b], fm_probs[b], self.weights)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return to_array_record({k: v.detach().numpy() for k, v in model.state_dict().items()})
