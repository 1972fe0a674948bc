"""The teacher's rounds at the sites (``fm-site-rounds``, message ``train.teacher``), before round 1.

The FM on the server knows the task only from the synthetic pool, which is unlike the sites' images.
In each teacher round every training site fine-tunes the FM's mask decoder on cached frozen-encoder
embeddings of its own training images and sends it back; the server averages the decoders weighted
by training-set size (Flower's ``aggregate_arrayrecords``) and the teacher continues from the
average. Only the decoder travels (float16, about 8 MB for LiteMedSAM's 4.1 M parameters) and its
bytes are booked under the traffic kind ``teacher``. A site that refuses (its policy, no FM) or
fails is left out of the average; with no usable reply the teacher stays as it was.

A mixin of :class:`server_app.dsfedmed.DSFedMedStrategy`: it uses ``cfg``, ``fed``, ``train_nodes``
and the reply checks of :class:`server_app.fedavg.DeadlineFedAvg`.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from common import protocol as P
from common.codec import from_array_record, half_precision, to_array_record
from server_app.round_state import RoundState

log = logging.getLogger("dsfedmed.server")


class TeacherAtSites:
    def teacher_at_sites(self, rs: RoundState) -> list[dict]:
        """``fm-site-rounds`` rounds of the decoder at the sites; one summary row per round: sites
        that answered, their validation Dice@0.5 of the decoder as they received it (the teacher
        before that round, where their evaluate policy allows), and the errors."""
        cfg, fed = self.cfg, self.fed
        rows = []
        for r in range(1, cfg.fm_site_rounds + 1):
            sent = to_array_record(half_precision(rs.teacher.decoder_state()))
            conf = {P.CFG_ROUND: r}
            if cfg.evaluate_every:
                conf[P.CFG_EVALUATE_SPLIT] = "val"
            live = set(fed.grid.get_node_ids())
            nodes = [n for n in self.train_nodes if n in live]
            fed.mark_absent(n for n in self.train_nodes if n not in live)
            content = RecordDict({P.KEY_ARRAYS: sent, P.KEY_CONFIG: ConfigRecord(conf)})
            ex = fed.send([fed.make(n, P.MSG_TRAIN_TEACHER, content, 0) for n in nodes], cfg.round_timeout_s)
            usable, val = [], {}
            for site, rep in ex.replies.items():
                why = (
                    self.validate_metrics(rep)
                    or self.validate_example_count(site, rep)
                    or self.validate_weights(rep, sent)
                )
                if why:
                    ex.errors[site] = f"rejected train.teacher reply: {why}"
                    log.warning("site %s: %s", site, ex.errors[site])
                    continue
                m = rep.content.metric_records[P.KEY_METRICS]
                state = {
                    k: v.astype(np.float32)
                    for k, v in from_array_record(rep.content.array_records[P.KEY_ARRAYS]).items()
                }
                usable.append(
                    RecordDict(
                        {
                            P.KEY_ARRAYS: to_array_record(state),
                            P.KEY_METRICS: MetricRecord({P.MET_NUM_EXAMPLES: float(m[P.MET_NUM_EXAMPLES])}),
                        }
                    )
                )
                v = float(m.get(P.MET_VAL_PREFIX + P.MET_DICE05, math.nan))
                if math.isfinite(v) and 0.0 <= v <= 1.0:
                    val[site] = round(v, 4)
            row = {
                "round": r,
                "sites": sorted(s for s in ex.replies if s not in ex.errors),
                "val_dice05_received": val,
                "errors": dict(ex.errors),
                "no_answer": sorted(ex.timeouts),
            }
            rows.append(row)
            if not usable:
                log.warning(
                    "teacher round %d: no usable decoder from any site; the teacher stays as it was", r
                )
                break
            avg = aggregate_arrayrecords(usable, P.MET_NUM_EXAMPLES)
            rs.teacher.load_decoder(from_array_record(avg))
            log.info(
                "teacher round %d/%d: decoder averaged over %d site(s); validation Dice@0.5 as received %s",
                r, cfg.fm_site_rounds, len(usable), val or "not scored",
            )  # fmt: skip
        return rows
