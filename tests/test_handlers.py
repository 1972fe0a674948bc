"""ClientApp handlers called in-process with real Flower Messages."""

import re

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client_app.app import ERR_CONFIG, ERR_DATA, ERR_PAYLOAD, app
from client_app.errors import local_detail
from common import protocol as P
from common.codec import to_array_record
from tests.support import global_weights

RUN = {
    "method": "fedavg",
    "image-size": 32,
    "phantom-images-per-site": 16,
    "local-epochs": 1,
    "batch-size": 4,
}


def _ctx(node=None, run=None):
    return Context(
        run_id=7,
        node_id=3,
        node_config=node if node is not None else {"partition-id": 1, "num-partitions": 2},
        state=RecordDict(),
        run_config={**RUN, **(run or {})},
    )


def _msg(mtype, records):
    return Message(RecordDict(records), dst_node_id=3, message_type=mtype)


def test_profile_reply(task_identity):
    rep = app(_msg(P.MSG_QUERY_PROFILE, {}), _ctx())
    assert not rep.has_error()
    prof = rep.content.config_records[P.KEY_PROFILE]
    assert set(prof) == set(P.PROFILE_FIELDS)  # exactly what the protocol documents, nothing more
    assert prof["site"] == "phantom-1"
    assert prof["n-train"] + prof["n-val"] + prof["n-test"] == 16
    assert prof["model"] == "unet" and prof["model-params"] > 0
    assert prof["image-size"] == 32 and prof["channels"] == 3
    assert any(v.startswith("flwr==") for v in prof["versions"])
    assert not rep.content.array_records  # nothing but the profile leaves the site


def test_train_reply_has_documented_keys_and_sane_values(task_identity):
    w = global_weights()
    rep = app(
        _msg(P.MSG_TRAIN, {P.KEY_ARRAYS: to_array_record(w), P.KEY_CONFIG: ConfigRecord({P.CFG_ROUND: 1})}),
        _ctx(),
    )
    assert not rep.has_error(), rep.error.reason if rep.has_error() else ""
    assert set(rep.content.array_records) == {P.KEY_ARRAYS}
    assert set(rep.content.metric_records) == {P.KEY_METRICS}
    m = rep.content.metric_records[P.KEY_METRICS]
    assert m[P.MET_NUM_EXAMPLES] > 0 and np.isfinite(m[P.MET_LOSS]) and m[P.MET_LOSS] > 0
    new = rep.content.array_records[P.KEY_ARRAYS]
    assert set(new.keys()) == set(w)
    changed = [k for k in w if w[k].dtype.kind == "f" and not np.allclose(new[k].numpy(), w[k])]
    assert changed, "training did not change any weight"


def test_evaluate_reply(task_identity):
    rep = app(
        _msg(
            P.MSG_EVALUATE,
            {
                P.KEY_ARRAYS: to_array_record(global_weights()),
                P.KEY_CONFIG: ConfigRecord({P.CFG_SPLIT: "test"}),
            },
        ),
        _ctx(),
    )
    assert not rep.has_error()
    m = rep.content.metric_records[P.KEY_METRICS]
    assert 0.0 <= m[P.MET_DICE] <= 1.0 and 0.0 <= m[P.MET_IOU] <= m[P.MET_DICE] + 1e-6
    assert m[P.MET_NUM_EXAMPLES] >= 1


@pytest.mark.parametrize(
    "records, needle",
    [
        ({}, "no 'config' config record"),
        ({P.KEY_CONFIG: ConfigRecord({P.CFG_ROUND: 1})}, "no 'arrays' array record"),
        (
            {P.KEY_CONFIG: ConfigRecord({}), P.KEY_ARRAYS: to_array_record({"x": np.zeros(3)})},
            "do not fit model",
        ),
    ],
)
def test_bad_payload_gets_error_reply(task_identity, records, needle):
    rep = app(_msg(P.MSG_TRAIN, records), _ctx())
    assert rep.has_error() and rep.error.code == ERR_PAYLOAD
    assert needle in local_detail(rep.error.reason)


def test_non_finite_weights_rejected(task_identity):
    w = global_weights()
    k = next(k for k in w if w[k].dtype.kind == "f")
    w[k] = w[k] * np.nan
    rep = app(_msg(P.MSG_TRAIN, {P.KEY_ARRAYS: to_array_record(w), P.KEY_CONFIG: ConfigRecord({})}), _ctx())
    assert rep.has_error() and "non-finite" in local_detail(rep.error.reason)


def test_bad_config_and_missing_data_get_error_replies(task_identity, tmp_path):
    rep = app(_msg(P.MSG_QUERY_PROFILE, {}), _ctx(run={"num-rounds": -1}))
    assert rep.has_error() and rep.error.code == ERR_CONFIG and "num-rounds" in local_detail(rep.error.reason)
    rep = app(_msg(P.MSG_QUERY_PROFILE, {}), _ctx(node={"data-dir": str(tmp_path / "gone")}))
    assert rep.has_error() and rep.error.code == ERR_DATA and "gone" in local_detail(rep.error.reason)
    # the server learns the kind of failure and an incident id; the site's paths stay at the site
    assert str(tmp_path) not in rep.error.reason and "gone" not in rep.error.reason
    assert re.fullmatch(
        r"the site's data cannot be used for this request \(site incident [0-9a-f]{12}\)", rep.error.reason
    )
    rep = app(_msg(P.MSG_QUERY_PROFILE, {}), _ctx(node={}))
    assert rep.has_error() and "data-dir" in local_detail(rep.error.reason)


def test_site_folder_via_node_config(task_identity, phantom_folder):
    rep = app(_msg(P.MSG_QUERY_PROFILE, {}), _ctx(node={"data-dir": str(phantom_folder), "site-name": "H1"}))
    assert rep.content.config_records[P.KEY_PROFILE]["site"] == "H1"
