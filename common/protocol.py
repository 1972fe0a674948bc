"""Every message type and record key of the DSFedMed/Flower protocol, in one place.

The ServerApp builds messages and the ClientApp parses them only through these names, so
what crosses the network is visible in one file (and auditable by a hospital's reviewer).

Round protocol (this release):
  query.profile   server -> site: nothing but the run config it already has.
                  site -> server: ``profile`` ConfigRecord (site name, dataset sizes, channels,
                  model, parameters, device, package versions). No image data.
  train           server -> site: ``arrays`` (global model weights, FedAvg), ``config``.
                  site -> server: ``arrays`` (updated weights), ``metrics`` (loss, n).
  evaluate        server -> site: ``arrays`` (global weights), ``config`` (which split).
                  site -> server: ``metrics`` (dice, iou, n, per threshold means).
"""

from __future__ import annotations

# message types (Flower routes "<type>.<name>" to @app.<type>("<name>"))
MSG_QUERY_PROFILE = "query.profile"
MSG_TRAIN = "train"
MSG_EVALUATE = "evaluate"

# record keys
KEY_ARRAYS = "arrays"
KEY_CONFIG = "config"
KEY_METRICS = "metrics"
KEY_PROFILE = "profile"

# config record fields sent by the server
CFG_ROUND = "server-round"
CFG_SPLIT = "split"
CFG_MODEL = "model"

# metric record fields sent by sites
MET_NUM_EXAMPLES = "num-examples"  # Flower's conventional weighting key
MET_LOSS = "train-loss"
MET_DICE = "dice"
MET_IOU = "iou"
MET_SECONDS = "seconds"

# profile fields
PROFILE_FIELDS = (
    "site",
    "n-train",
    "n-val",
    "n-test",
    "n-skipped",
    "channels",
    "num-classes",
    "image-size",
    "model",
    "model-params",
    "device",
    "versions",
)

SPLITS = ("train", "val", "test", "all")
