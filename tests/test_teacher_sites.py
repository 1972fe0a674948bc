"""The teacher's rounds at the sites (``fm-site-rounds``, message ``train.teacher``): the FM's mask
decoder learns on the sites' real images, which never leave them; only the decoder travels."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from client_app.app import app
from client_app.errors import ERR_PAYLOAD, ERR_POLICY, local_detail
from client_app.policy import PolicyViolation, SitePolicy
from common import protocol as P
from common.codec import from_array_record, half_precision, to_array_record
from common.config import parse_run_config
from common.foundation import PromptFreeSegmenter, load_foundation_model
from server_app.dsfedmed import DSFedMedStrategy
from server_app.federation import Federation, traffic_kind
from server_app.round_state import RoundState
from server_app.rundir import RunDirectory
from tests.support import DSFEDMED_HANDLER_RUN, ScriptedGrid, site_context

RUN = {**DSFEDMED_HANDLER_RUN, "phantom-images-per-site": 8, "fm-site-steps": 1, "fm-batch-size": 2}


@pytest.fixture(scope="module")
def decoder16():
    fm = PromptFreeSegmenter(load_foundation_model("litemedsam"), "decoder")
    return half_precision({k: v.numpy() for k, v in fm.exchanged_module.state_dict().items()})


def _teacher_msg(arrays: dict, conf: dict | None = None) -> Message:
    rec = RecordDict(
        {
            P.KEY_ARRAYS: to_array_record(arrays),
            P.KEY_CONFIG: ConfigRecord({P.CFG_ROUND: 1, **(conf or {})}),
        }
    )
    return Message(rec, dst_node_id=3, message_type=P.MSG_TRAIN_TEACHER)


# --- at the site -------------------------------------------------------------------------------


def test_site_fine_tunes_the_decoder_and_sends_it_back_in_half_precision(task_identity, decoder16, tmp_path):
    ctx = site_context(RUN, tmp_path)
    ctx.node_config["cache-dir"] = str(tmp_path / "cache")
    rep = app(_teacher_msg(decoder16, {P.CFG_EVALUATE_SPLIT: "val"}), ctx)
    assert not rep.has_error(), local_detail(rep.error.reason) if rep.has_error() else ""
    assert set(rep.content) == {P.KEY_ARRAYS, P.KEY_METRICS}  # the decoder and numbers, nothing else
    m = rep.content.metric_records[P.KEY_METRICS]
    assert m["steps"] == 1 and m[P.MET_NUM_EXAMPLES] > 0
    assert 0.0 <= m[P.MET_VAL_PREFIX + P.MET_DICE05] <= 1.0  # the decoder as received, on validation
    new = from_array_record(rep.content.array_records[P.KEY_ARRAYS])
    assert set(new) == set(decoder16) and all(v.dtype == np.float16 for v in new.values())
    assert any(not np.array_equal(new[k], decoder16[k]) for k in new), "one step must move the decoder"
    # each training image was embedded once, in the site's cache (outside the run's state)
    assert list((tmp_path / "cache" / "fm-embeddings").rglob("*.npy"))


def test_site_refuses_a_decoder_that_is_not_this_fms(task_identity, decoder16, tmp_path):
    wrong = dict(decoder16)
    name = next(iter(wrong))
    wrong[name] = np.zeros((3, 3), np.float16)
    rep = app(_teacher_msg(wrong), site_context(RUN, tmp_path))
    assert rep.has_error() and rep.error.code == ERR_PAYLOAD
    assert "mask decoder" in local_detail(rep.error.reason)
    nonfinite = dict(decoder16)
    nonfinite[name] = np.full_like(decoder16[name], np.nan)
    rep = app(_teacher_msg(nonfinite), site_context(RUN, tmp_path))
    assert rep.has_error() and rep.error.code == ERR_PAYLOAD


@pytest.mark.parametrize(
    ("policy", "rule"),
    [
        ("allow-weights-upload = false\n", "allow-weights-upload"),
        ("[dp]\nenabled = true\n", "dp.enabled"),
        ('allowed-message-types = ["query.profile", "train", "evaluate"]\n', "allowed-message-types"),
    ],
)
def test_site_policy_refuses_the_teacher_round_before_any_work(task_identity, tmp_path, policy, rule):
    (tmp_path / "policy.toml").write_text(policy)
    ctx = site_context(RUN, tmp_path)
    ctx.node_config["policy-file"] = str(tmp_path / "policy.toml")
    rep = app(_teacher_msg({"w": np.zeros(2, np.float16)}), ctx)
    assert rep.has_error() and rep.error.code == ERR_POLICY and rule in rep.error.reason


@pytest.mark.parametrize("policy", [{"allow-weights-upload": False}, {"dp": {"enabled": True}}])
def test_policy_check_of_the_request_alone_refuses_the_teacher_round(policy):
    """The refusal is the request check's, before a handler exists to run: a changed app cannot
    train first and be stopped only at the reply."""
    with pytest.raises(PolicyViolation):
        SitePolicy.model_validate(policy).check_request(P.MSG_TRAIN_TEACHER)
    SitePolicy.model_validate(policy).check_request(P.MSG_EVALUATE)  # other requests unaffected


# --- at the server -----------------------------------------------------------------------------


def _sites(answers: dict[int, tuple[float, int, float]]) -> ScriptedGrid:
    """Sites that answer train.teacher with a decoder of constant value: node -> (weight value,
    num-examples, validation Dice@0.5)."""

    def answer(node: int, m: Message) -> Message:
        value, n, val = answers[node]
        ref = from_array_record(m.content.array_records[P.KEY_ARRAYS])
        arrays = {k: np.full_like(v, value) for k, v in ref.items()}
        metrics = {P.MET_NUM_EXAMPLES: float(n), "steps": 1.0, P.MET_VAL_PREFIX + P.MET_DICE05: val}
        return Message(
            RecordDict({P.KEY_ARRAYS: to_array_record(arrays), P.KEY_METRICS: MetricRecord(metrics)}),
            reply_to=m,
        )

    return ScriptedGrid(answers, answer)


class _Decoder:
    def __init__(self):
        self.state = {"w": np.zeros(4, np.float32), "b": np.zeros(2, np.float32)}
        self.loaded: list[dict] = []

    def decoder_state(self):
        return dict(self.state)

    def load_decoder(self, state):
        assert all(v.dtype == np.float32 for v in state.values())  # averaged at full precision
        self.state = state
        self.loaded.append(state)


def _strategy(tmp_path, grid, rounds=2):
    cfg = parse_run_config(
        {
            "method": "dsfedmed",
            "tensorboard": False,
            "min-sites": 2,
            "fm-site-rounds": rounds,
            "evaluate-every": 1,
        }
    )
    fed = Federation(grid, poll_s=0.01)
    for node, name in ((1, "A"), (2, "B"), (3, "C")):
        fed.name_site(node, name)
    st = DSFedMedStrategy(cfg, fed, RunDirectory.create(str(tmp_path), "", "dsfedmed"))
    st.train_nodes = [1, 2, 3]
    st.profiles = {"A": {"n-train": 100}, "B": {"n-train": 300}, "C": {"n-train": 50}}
    return st


def _rs(teacher) -> RoundState:
    return RoundState(
        pool=None, pool_images=None, pool_masks=None, pool_score=None, has_pool=set(), fm=None,
        teacher=teacher, weights_mode=False, arrays=None, ensemble=None, known=None, masks_small=None,
    )  # fmt: skip


def test_server_averages_the_sites_decoders_by_training_set_size(tmp_path, task_identity):
    """A: 1.0 (100 images), B: 3.0 (300), C: NaN weights (rejected, booked): the teacher continues
    from 2.5; the decoder travels in float16 both ways, booked as 'teacher' traffic."""
    grid = _sites({1: (1.0, 100, 0.2), 2: (3.0, 300, 0.4), 3: (float("nan"), 50, 0.3)})
    st, teacher = _strategy(tmp_path, grid), _Decoder()
    rows = st.teacher_at_sites(_rs(teacher))
    assert len(rows) == 2 and len(teacher.loaded) == 2
    assert np.allclose(teacher.state["w"], 2.5) and np.allclose(teacher.state["b"], 2.5)
    assert rows[0]["sites"] == ["A", "B"] and "C" in rows[0]["errors"] and "finite" in rows[0]["errors"]["C"]
    assert rows[0]["val_dice05_received"] == {"A": 0.2, "B": 0.4}
    sent = grid.pushed[0]
    assert sent.metadata.message_type == P.MSG_TRAIN_TEACHER
    assert all(
        v.dtype == np.float16 for v in from_array_record(sent.content.array_records[P.KEY_ARRAYS]).values()
    )
    assert sent.content.config_records[P.KEY_CONFIG][P.CFG_EVALUATE_SPLIT] == "val"
    assert traffic_kind(P.MSG_TRAIN_TEACHER) == "teacher" and st.fed.traffic.by_kind["teacher"] > 0


def test_server_keeps_the_teacher_when_no_site_sends_a_usable_decoder(tmp_path, task_identity):
    grid = _sites({1: (float("inf"), 100, 0.2), 2: (float("nan"), 300, 0.4), 3: (float("nan"), 50, 0.3)})
    st, teacher = _strategy(tmp_path, grid, rounds=3), _Decoder()
    rows = st.teacher_at_sites(_rs(teacher))
    assert len(rows) == 1 and rows[0]["sites"] == [] and not teacher.loaded  # stops after round 1
    assert np.array_equal(teacher.state["w"], np.zeros(4, np.float32))


def test_a_site_cannot_outweigh_its_profile(tmp_path, task_identity):
    grid = _sites({1: (1.0, 100, 0.2), 2: (3.0, 10_000, 0.4), 3: (2.0, 50, 0.3)})
    st, teacher = _strategy(tmp_path, grid, rounds=1), _Decoder()
    rows = st.teacher_at_sites(_rs(teacher))
    assert "B" in rows[0]["errors"] and np.allclose(teacher.state["w"], (100 * 1.0 + 50 * 2.0) / 150)
