"""A site's part in the teacher's rounds (message ``train.teacher``, run config ``fm-site-rounds``).

Before round 1 the server's FM may learn from the sites' real images, which it never sees: each site
fine-tunes the FM's mask decoder, prompted with the whole-image box, on cached frozen-encoder
embeddings of its training images (:class:`common.fm_cache.CachedPromptFreeSegmenter`, the same
machinery as the fedfm-decoder baseline) and sends the decoder back; the server averages them. The
decoder travels in float16 both ways. Framework-neutral: the Flower handler in
:mod:`client_app.app` turns the request into this call and the result into the reply.
"""

from __future__ import annotations

import numpy as np

from client_app.trainer import SiteTrainer, TrainSettings
from common import protocol as P
from common.codec import check_weights_record, half_precision
from common.config import RunConfig


def teacher_settings(run: RunConfig, server_round: int) -> TrainSettings:
    """Exactly ``fm-site-steps`` decoder steps at ``fm-learning-rate`` (a fresh AdamW each round, no
    augmentation: a flipped image would be a new image to the frozen encoder)."""
    return TrainSettings(
        epochs=run.fm_site_steps,  # at least one step per epoch: the step cap decides
        batch_size=run.fm_batch_size,
        learning_rate=run.fm_learning_rate,
        augment=False,
        seed=run.seed * 100_003 + 7_919 * server_round,
        max_steps=run.fm_site_steps,
        weight_decay=run.weight_decay,
    )


def teacher_round(
    tr: SiteTrainer, record, run: RunConfig, server_round: int, score_val: bool
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Load the received decoder (checked against this FM's decoder: keys, shapes, real dtypes,
    finite, byte size), optionally score it as received on the validation split, fine-tune it, and
    return its float16 state with the metrics."""
    reference = {k: tuple(v.shape) for k, v in tr.exchanged.state_dict().items()}
    tr.set_weights(check_weights_record(record, reference, "the FM's mask decoder"))
    metrics: dict[str, float] = {}
    if score_val:
        res = tr.evaluate("val")
        metrics.update(
            {
                P.MET_VAL_PREFIX + "dice": float(res["dice"]),
                P.MET_VAL_PREFIX + "dice05": float(res["dice05"]),
                P.MET_VAL_PREFIX + "num-examples": float(res["n"]),
            }
        )
    metrics.update(tr.train(teacher_settings(run, server_round)))
    return half_precision(tr.get_weights()), metrics
