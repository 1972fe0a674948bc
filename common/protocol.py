"""Every message type and record key of the DSFedMed/Flower protocol, in one place.

The ServerApp builds messages and the ClientApp parses them only through these names, so
what crosses the network is visible in one file (and auditable by a hospital's reviewer).

Round protocol:
  query.profile   server -> site: nothing but the run config it already has.
                  site -> server: ``profile`` ConfigRecord (site name, dataset sizes, channels,
                  model, parameters, device, package versions). No image data.
  train           server -> site: ``arrays`` (global model weights, FedAvg), ``config``.
                  site -> server: ``arrays`` (updated weights), ``metrics`` (loss, n).
  evaluate        server -> site: ``arrays`` (global weights; absent in DSFedMed ``logits`` mode,
                  where each site evaluates its own model), ``config`` (which split).
                  site -> server: ``metrics`` (dice, iou threshold-averaged; dice05, iou05 at 0.5; n).

DSFedMed additions:
  train.generator server -> site: ``config`` (generator size, steps, seconds).
                  site -> server: ``generator`` (diffusion UNet weights), ``generator-stats``
                  (steps, seconds, losses, mean/std of log foreground fraction). No image, no mask.
  evaluate.pool   server -> site: ``pool`` (the whole synthetic pool, which the site then caches).
                  site -> server: ``metrics`` (validation Dice of its model trained on the pool alone
                  and on as many real images: the pool's quality, measured where the real data is).
  train           server -> site: ``pool`` (synthetic images + masks, uint8, at the size they were
                  made at: gen-size for a generator pool; both ends resize it to image-size with
                  ``common.transforms.resize_pairs``; the whole pool once
                  when that is cheaper over the run, else the selected samples each round),
                  ``soft-targets`` (FM probabilities on the selected samples, compact dtype),
                  ``config`` (round, pool id, selected ids, distillation weights), and ``arrays``
                  (global site-model weights) in ``weights``/``hybrid`` exchange.
                  site -> server: ``site-probs`` (its probabilities on the selected samples, compact
                  dtype) in ``logits``/``hybrid``; ``arrays`` (its weights) in ``weights``/``hybrid``;
                  ``metrics``.
  train (stage=bootstrap, logits exchange, after the last round) server -> held-out site: the
                  whole ``pool`` and the final FM's ``soft-targets`` on all of it. The site trains
                  its own model on them alone (it never trains on its own labels) and replies with
                  ``metrics`` only: how a hospital that joins late starts from the federation.

  train.teacher   (``fm-site-rounds`` > 0, before round 1) server -> site: ``arrays`` (the FM's mask
                  decoder, float16), ``config`` (round; ``evaluate-split`` "val" to score the decoder
                  as received, if the site's evaluate policy allows). The site fine-tunes the decoder
                  on cached frozen-encoder embeddings of its training images for ``fm-site-steps``.
                  site -> server: ``arrays`` (its decoder, float16), ``metrics`` (loss, steps, n, and
                  ``val-*`` of the received decoder). Refused under the site's ``[dp]`` and by
                  ``allow-weights-upload = false``: a decoder trained on private images is weights.

fedfm baseline (sites fine-tune the FM itself, FedSAM): ``train``/``evaluate`` as FedAvg, where
``arrays`` are the FM's weights (all of them, or the mask decoder's with ``fm-trainable=decoder``).
"""

from __future__ import annotations

# message types (Flower routes "<type>.<name>" to @app.<type>("<name>"))
MSG_QUERY_PROFILE = "query.profile"
MSG_TRAIN = "train"
MSG_EVALUATE = "evaluate"
MSG_TRAIN_GENERATOR = "train.generator"
MSG_EVALUATE_POOL = "evaluate.pool"
MSG_TRAIN_TEACHER = "train.teacher"

# record keys
KEY_ARRAYS = "arrays"
KEY_CONFIG = "config"
KEY_METRICS = "metrics"
KEY_PROFILE = "profile"
KEY_GENERATOR = "generator"
KEY_GEN_STATS = "generator-stats"
KEY_POOL = "pool"
KEY_SOFT = "soft-targets"
KEY_SITE_PROBS = "site-probs"
ARR_IMAGES = "images"
ARR_MASKS = "masks"
ARR_PROBS = "probs"

# config record fields sent by the server
CFG_ROUND = "server-round"
CFG_SPLIT = "split"
CFG_MODEL = "model"
CFG_POOL_ID = "pool-id"
CFG_POOL_INCLUDED = "pool-included"  # "all" (whole pool in this message), "selected", or "none"
CFG_SELECTED = "selected"  # pool indices of this round's selected samples
CFG_EXCHANGE = "exchange"
CFG_EVALUATE_SPLIT = "evaluate-split"  # train: also score the trained model on this split (only "val")
MET_VAL_PREFIX = (
    "val-"  # a train reply's own validation: val-dice, val-iou, val-dice05, val-iou05, val-num-examples
)
CFG_STAGE = "stage"  # "bootstrap": a held-out site learns from the pool and the FM only (logits)
STAGE_BOOTSTRAP = "bootstrap"
CFG_STATE_KEY = "state-key"  # every message: the name a site keeps this run's state under (a resumed
# run keeps the interrupted run's key, so sites continue from their own state; server_app/checkpoint.py)

# error codes a site puts in an error reply that the server acts on (the others: client_app/app.py)
ERR_NO_POOL = 1006  # the referred synthetic pool is not (or no longer intact) at the site: resend it

# metric record fields sent by sites
MET_NUM_EXAMPLES = "num-examples"  # Flower's conventional weighting key
MET_LOSS = "train-loss"
MET_DICE = "dice"
MET_IOU = "iou"
MET_DICE05 = "dice05"  # Dice at threshold 0.5 (the headline; "dice" is threshold-averaged)
MET_IOU05 = "iou05"
MET_STEPS = "steps"  # optimiser steps on private data this round
MET_DISTILL_STEPS = "distill-steps"  # optimiser steps on synthetic samples this round
MET_DP_EPSILON = "dp-epsilon"  # present when the site noised its answers: its total ε over every run
MET_SECONDS = "seconds"

# profile fields
PROFILE_FIELDS = (
    "site",
    "n-train",
    "n-val",
    "n-test",
    "n-skipped",
    "data-report",
    "channels",
    "num-classes",
    "image-size",
    "model",
    "model-params",
    "device",
    "versions",
)

SPLITS = ("train", "val", "test", "all")
