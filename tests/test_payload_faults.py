"""Malformed payloads at both ends, made from REAL replies and requests.

Replies come from the real ClientApp handlers called in-process; each is then damaged one way (NaN
probabilities, a wrong shape, a huge array, a missing key, a wrong dtype, a negative example count,
non-finite weights, bytes that are no array) and fed to the real server validators, which must
reject it with a reason that names the problem.  Two round-level tests run the real strategies'
``start`` against an in-process grid whose second site's train reply is damaged: the round
completes, the rejection is logged and booked, and what is averaged (FedAvg weights, the DSFedMed
ensemble) equals what the good site alone gives.  Requests the server could send wrongly (a pool or
soft targets larger than the run config allows, undecodable bytes, a damaged cached pool) get error
replies from the site.  Every assertion names the reason, so removing a check fails its test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from client_app.app import ERR_PAYLOAD, app
from client_app.errors import local_detail
from common import protocol as P
from common.codec import decode_probs, encode_probs, from_array_record, to_array_record
from common.config import parse_run_config
from common.phantoms import phantom_site
from server_app.dsfedmed import DSFedMedStrategy
from server_app.fedavg import DeadlineFedAvg
from server_app.federation import Exchange, Federation
from server_app.rundir import RunDirectory
from tests.support import (
    DSFEDMED,
    FEDAVG,
    LoopbackGrid,
    StubFM,
    StubTeacher,
    global_weights,
    site_context,
    site_contexts,
    train_msg,
)

SELECTED = [0, 2, 4]
POOL_N = 6  # the pool of _pool(): sites answer on all of it


@pytest.fixture(scope="module")
def identity():
    """Task ids for building Messages outside a Flower runtime (as conftest's ``task_identity``)."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


def _pool(n: int = 6, size: int = 32):
    s = phantom_site(50, n, size)
    return s.images, s.masks


def _dsfedmed_request(selected=SELECTED, pool=None, soft=None, pool_id="p1", included="all") -> Message:
    """A DSFedMed train request, as tests/test_handlers_dsfedmed.py builds them."""
    return train_msg(selected, included=included, soft=soft, pool=pool, pool_id=pool_id)


@pytest.fixture(scope="module")
def real(identity, tmp_path_factory, one_torch_thread):
    """Real replies of the real handlers: a FedAvg train reply (and the global weights it answers),
    a DSFedMed logits train reply on 3 selected samples, a generator reply and an evaluate reply."""
    tmp = tmp_path_factory.mktemp("real")
    out = {}
    w = global_weights()
    req = Message(
        RecordDict({P.KEY_ARRAYS: to_array_record(w), P.KEY_CONFIG: ConfigRecord({P.CFG_ROUND: 1})}),
        dst_node_id=3,
        message_type=P.MSG_TRAIN,
    )
    out["fedavg"] = (req, app(req, site_context(FEDAVG, tmp)))
    out["reference"] = to_array_record(w)
    req = _dsfedmed_request()
    out["logits"] = (req, app(req, site_context(DSFEDMED, tmp)))
    req = Message(
        RecordDict({P.KEY_CONFIG: ConfigRecord({})}), dst_node_id=3, message_type=P.MSG_TRAIN_GENERATOR
    )
    out["generator"] = (req, app(req, site_context(DSFEDMED, tmp)))
    req = Message(
        RecordDict({P.KEY_ARRAYS: to_array_record(w), P.KEY_CONFIG: ConfigRecord({P.CFG_SPLIT: "val"})}),
        dst_node_id=3,
        message_type=P.MSG_EVALUATE,
    )
    out["evaluate"] = (req, app(req, site_context(FEDAVG, tmp)))
    for name, value in out.items():
        if isinstance(value, tuple):
            assert not value[1].has_error(), f"{name}: {value[1].error.reason}"
    return out


def _damaged(pair, **records) -> Message:
    """A copy of a real reply with some records replaced (None removes one); the original is kept."""
    req, rep = pair
    content = RecordDict({k: v for k, v in rep.content.items() if k not in records})
    for k, v in records.items():
        if v is not None:
            content[k] = v
    return Message(content, reply_to=req)


def _metrics(pair, **changes) -> MetricRecord:
    m = dict(pair[1].content.metric_records[P.KEY_METRICS])
    for k, v in changes.items():
        if v is None:
            m.pop(k, None)
        else:
            m[k] = v
    return MetricRecord(m)


@pytest.fixture
def no_decode(monkeypatch):
    """Counts every Flower ``Array`` decoded (a size check must turn a huge array away unread)."""
    calls = []
    real_numpy = Array.numpy

    def spy(self):
        calls.append(self.shape)
        return real_numpy(self)

    monkeypatch.setattr(Array, "numpy", spy)
    return calls


@pytest.fixture
def dsfedmed(tmp_path):
    class NoGrid:
        def get_node_ids(self):
            return []

    cfg = parse_run_config({**DSFEDMED, "tensorboard": False})
    return DSFedMedStrategy(cfg, Federation(NoGrid()), RunDirectory.create(str(tmp_path), "", "dsfedmed"))


# --- site probabilities (server side) -------------------------------------------------------------


def test_real_logits_reply_passes(real, dsfedmed):
    p, why = dsfedmed._validate_probs(real["logits"][1], POOL_N)
    assert why is None and p.shape == (POOL_N, 1, 16, 16)  # sites answer on the whole pool
    assert DeadlineFedAvg.validate_metrics(real["logits"][1]) is None


@pytest.mark.parametrize(
    "probs, needle",
    [
        (np.full((3, 1, 16, 16), np.nan, np.float16), "non-finite"),  # NaN logits
        (np.full((3, 1, 16, 16), np.inf, np.float16), "non-finite"),
        (np.full((3, 1, 16, 16), 1.5, np.float16), "out-of-range"),
        (np.zeros((3, 1, 8, 8), np.uint8), "16x16"),  # wrong shape
        (np.zeros((3, 16, 16), np.uint8), "(N,1,S,S)"),
        (np.zeros((2, 1, 16, 16), np.uint8), "for 3 samples"),  # answers on other samples
        (np.zeros((3, 1, 16, 16), np.float32), "logit-dtype is"),  # wrong dtype
        (np.zeros((3, 1, 16, 16), np.float64), "logit-dtype is"),
    ],
)
def test_bad_site_probs_rejected(real, dsfedmed, probs, needle):
    if probs.dtype == np.float16:  # a float16 run: the values themselves are wrong
        dsfedmed.cfg = parse_run_config({**DSFEDMED, "logit-dtype": "float16"})
    rep = _damaged(real["logits"], **{P.KEY_SITE_PROBS: to_array_record({P.ARR_PROBS: probs})})
    p, why = dsfedmed._validate_probs(rep, 3)
    assert p is None and needle in why and P.KEY_SITE_PROBS in why


def test_float16_probs_rejected_when_the_run_says_uint8(real, dsfedmed):
    ok = encode_probs(np.full((3, 1, 16, 16), 0.5), 16, "float16")
    decode_probs(ok, 3, 16)  # a valid protocol dtype, just not this run's
    rep = _damaged(real["logits"], **{P.KEY_SITE_PROBS: to_array_record({P.ARR_PROBS: ok})})
    assert "logit-dtype is uint8" in dsfedmed._validate_probs(rep, 3)[1]


def test_huge_site_probs_rejected_before_decoding(real, dsfedmed, no_decode):
    huge = np.zeros((3, 1, 1024, 1024), np.uint8)  # 3 MB where 768 bytes are due
    rep = _damaged(real["logits"], **{P.KEY_SITE_PROBS: to_array_record({P.ARR_PROBS: huge})})
    p, why = dsfedmed._validate_probs(rep, 3)
    assert p is None and "bytes, more than" in why and "'site-probs'" in why
    assert no_decode == []  # turned away on its length alone


@pytest.mark.parametrize(
    "record, needle",
    [
        (None, "no 'site-probs' record"),
        (ArrayRecord({"logits": Array(np.zeros((3, 1, 16, 16), np.uint8))}), "has no 'probs' array"),
        (
            to_array_record({P.ARR_PROBS: np.zeros((3, 1, 16, 16), np.uint8), "extra": np.zeros(1)}),
            "unexpected arrays ['extra']",
        ),
        (
            ArrayRecord({P.ARR_PROBS: Array("uint8", (3, 1, 16, 16), "numpy.ndarray", b"\x00" * 300)}),
            "cannot be decoded",
        ),
    ],
)
def test_missing_or_undecodable_site_probs_rejected(real, dsfedmed, record, needle):
    rep = _damaged(real["logits"], **{P.KEY_SITE_PROBS: record})
    p, why = dsfedmed._validate_probs(rep, 3)
    assert p is None and needle in why


# --- metrics (server side) -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, needle",
    [
        ({P.MET_NUM_EXAMPLES: -4}, "expected a whole number >= 0"),  # negative num-examples
        ({P.MET_NUM_EXAMPLES: 0}, "expected a positive number"),
        ({P.MET_NUM_EXAMPLES: 2.5}, "expected a whole number"),
        ({P.MET_NUM_EXAMPLES: float("nan")}, "expected a finite number"),
        ({P.MET_NUM_EXAMPLES: float("inf")}, "expected a finite number"),
        ({P.MET_NUM_EXAMPLES: None}, "lacks 'num-examples'"),  # missing key
    ],
)
def test_bad_train_metrics_rejected(real, change, needle):
    for kind in ("fedavg", "logits"):
        rep = _damaged(real[kind], **{P.KEY_METRICS: _metrics(real[kind], **change)})
        why = DeadlineFedAvg.validate_metrics(rep)
        assert why is not None and needle in why, (kind, why)


def test_reply_without_metrics_rejected(real):
    assert DeadlineFedAvg.validate_metrics(_damaged(real["fedavg"], **{P.KEY_METRICS: None})) == (
        "no 'metrics' record"
    )


@pytest.mark.parametrize(
    "change, needle",
    [
        ({P.MET_DICE: 1.5}, "within [0, 1]"),
        ({P.MET_IOU: -0.1}, "within [0, 1]"),
        ({P.MET_DICE: float("nan")}, "expected a finite number"),
        ({P.MET_NUM_EXAMPLES: -1}, "whole number >= 0"),
        ({P.MET_DICE: None}, "lacks 'dice'"),
    ],
)
def test_bad_evaluate_metrics_rejected_and_booked(real, change, needle):
    good = DeadlineFedAvg._scores(Exchange(replies={"A": real["evaluate"][1]}))
    assert 0 <= good["A"]["dice"] <= 1 and good["A"]["n"] > 0
    ex = Exchange(
        replies={
            "A": real["evaluate"][1],
            "B": _damaged(real["evaluate"], **{P.KEY_METRICS: _metrics(real["evaluate"], **change)}),
        }
    )
    scores = DeadlineFedAvg._scores(ex)
    assert set(scores) == {"A"} and needle in ex.errors["B"] and "rejected evaluate reply" in ex.errors["B"]


def test_empty_split_scores_are_not_an_error(real):
    """A site whose split is empty reports n = 0 and NaN scores: nothing to reject."""
    m = MetricRecord({P.MET_DICE: float("nan"), P.MET_IOU: float("nan"), P.MET_NUM_EXAMPLES: 0})
    ex = Exchange(replies={"A": _damaged(real["evaluate"], **{P.KEY_METRICS: m})})
    assert DeadlineFedAvg._scores(ex)["A"]["n"] == 0 and not ex.errors


# --- weights (server side) -------------------------------------------------------------------------


def _weights_with(pair, **changes) -> ArrayRecord:
    state = from_array_record(pair[1].content.array_records[P.KEY_ARRAYS])
    for k, v in changes.items():
        if v is None:
            state.pop(k)
        else:
            state[k] = v
    return to_array_record(state)


def test_real_fedavg_reply_passes(real):
    assert DeadlineFedAvg.validate_weights(real["fedavg"][1], real["reference"]) is None
    assert DeadlineFedAvg.validate_metrics(real["fedavg"][1]) is None


def _float_key(real) -> str:
    ref = from_array_record(real["reference"])
    return next(k for k, v in ref.items() if v.dtype.kind == "f" and v.ndim == 4)


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda a: a * np.nan, "non-finite"),  # non-finite weights
        (lambda a: np.where(a > 0, np.inf, a), "non-finite"),
        (lambda a: a[..., :1], "has shape"),  # wrong shape
        (lambda a: a.astype(np.complex64), "dtype complex64"),  # wrong dtype
        (lambda a: a.astype(np.str_), "dtype <U"),
        (lambda a: a.astype(np.longdouble), "at most 8 bytes"),
    ],
)
def test_bad_weights_rejected(real, damage, needle):
    k = _float_key(real)
    arr = from_array_record(real["fedavg"][1].content.array_records[P.KEY_ARRAYS])[k]
    rep = _damaged(real["fedavg"], **{P.KEY_ARRAYS: _weights_with(real["fedavg"], **{k: damage(arr)})})
    why = DeadlineFedAvg.validate_weights(rep, real["reference"])
    assert why is not None and needle in why and repr(k) in why


def test_missing_and_unexpected_weights_rejected(real):
    k = _float_key(real)
    rep = _damaged(real["fedavg"], **{P.KEY_ARRAYS: _weights_with(real["fedavg"], **{k: None})})
    assert f"1 missing ['{k}']" in DeadlineFedAvg.validate_weights(rep, real["reference"])
    rep = _damaged(real["fedavg"], **{P.KEY_ARRAYS: _weights_with(real["fedavg"], extra=np.zeros(3))})
    assert "1 unexpected ['extra']" in DeadlineFedAvg.validate_weights(rep, real["reference"])
    rep = _damaged(real["fedavg"], **{P.KEY_ARRAYS: None})
    assert DeadlineFedAvg.validate_weights(rep, real["reference"]) == "no 'arrays' record"


def test_huge_weights_rejected_before_decoding(real, no_decode):
    k = _float_key(real)
    total = sum(int(np.prod(a.shape)) for a in real["reference"].values())
    huge = _weights_with(real["fedavg"], **{k: np.zeros(total + 1_000_000, np.float64)})
    no_decode.clear()
    why = DeadlineFedAvg.validate_weights(_damaged(real["fedavg"], **{P.KEY_ARRAYS: huge}), real["reference"])
    assert "bytes, more than" in why and "'arrays' record" in why
    assert no_decode == []


def test_undecodable_weights_rejected(real):
    k = _float_key(real)
    rec = ArrayRecord(dict(real["fedavg"][1].content.array_records[P.KEY_ARRAYS].items()))
    ref = real["reference"][k]
    rec[k] = Array(ref.dtype, tuple(ref.shape), "numpy.ndarray", b"not an npy file")
    why = DeadlineFedAvg.validate_weights(_damaged(real["fedavg"], **{P.KEY_ARRAYS: rec}), real["reference"])
    assert "cannot be decoded" in why and k in why


# --- generator (server side) -----------------------------------------------------------------------


def _gen_reference():
    from common.generator import build_unet, generator_config_from_run

    gcfg = generator_config_from_run(parse_run_config(DSFEDMED))
    return {k: tuple(v.shape) for k, v in build_unet(gcfg).state_dict().items()}


def test_real_generator_reply_passes(real):
    state, stats = DSFedMedStrategy._validate_generator(real["generator"][1], _gen_reference())
    assert set(state) == set(_gen_reference()) and np.isfinite(stats["mask_log_fg_mean"])


def _gen_damaged(real, weights=None, **stats):
    req, rep = real["generator"]
    records = {}
    if weights is not None:
        state = from_array_record(rep.content.array_records[P.KEY_GENERATOR])
        records[P.KEY_GENERATOR] = to_array_record(weights(state))
    if stats:
        s = dict(rep.content.config_records[P.KEY_GEN_STATS])
        s.update(stats)
        records[P.KEY_GEN_STATS] = ConfigRecord({k: v for k, v in s.items() if v is not None})
    return _damaged((req, rep), **records)


def _nan_first(state):
    k = next(iter(state))
    return {**state, k: state[k] * np.nan}


def _drop_first(state):
    return dict(list(state.items())[1:])


def _huge_first(state):
    k = next(iter(state))
    total = sum(v.size for v in state.values())
    return {**state, k: np.zeros(total + 100_000, np.float64)}


@pytest.mark.parametrize(
    "weights, stats, needle",
    [
        (_nan_first, {}, "non-finite"),
        (_drop_first, {}, "do not fit the agreed generator: 1 missing"),
        (_huge_first, {}, "bytes, more than"),
        (None, {"mask_log_fg_mean": float("nan")}, "'mask_log_fg_mean' in 'generator-stats'"),
        (None, {"mask_log_fg_std": -1.0}, "expected a number >= 0"),
        (None, {"mask_log_fg_std": None}, "lacks 'mask_log_fg_std'"),
        (None, {"mask_log_fg_mean": "large"}, "expected a finite number"),
    ],
)
def test_bad_generator_rejected(real, weights, stats, needle):
    from common.validation import PayloadInvalid

    with pytest.raises(PayloadInvalid) as e:
        DSFedMedStrategy._validate_generator(_gen_damaged(real, weights, **stats), _gen_reference())
    assert needle in str(e.value)


# --- rounds complete without the bad reply ---------------------------------------------------------


def _replace(req: Message, rep: Message, **records) -> Message:
    return _damaged((req, rep), **records)


def test_fedavg_round_completes_without_the_nan_reply(identity, tmp_path, caplog, one_torch_thread):
    """Site 2 answers with NaN weights: the round completes on site 1 alone, the rejection is logged
    and booked in metrics.jsonl, and the global model is site 1's weights (nothing NaN averaged in)."""

    def damage(node, req, rep):
        if node != 2 or req.metadata.message_type != P.MSG_TRAIN or rep.has_error():
            return rep
        state = from_array_record(rep.content.array_records[P.KEY_ARRAYS])
        state = {k: v * np.nan if v.dtype.kind == "f" else v for k, v in state.items()}
        return _replace(req, rep, **{P.KEY_ARRAYS: to_array_record(state)})

    run = {**FEDAVG, "num-rounds": 1, "min-sites": 1, "tensorboard": False, "sampling-deadline-s": 5.0}
    grid = LoopbackGrid(site_contexts(run, tmp_path), damage)
    cfg = parse_run_config(run)
    rundir = RunDirectory.create(str(tmp_path), "", "fedavg")
    strategy = DeadlineFedAvg(cfg, Federation(grid, poll_s=0.01), rundir)
    with caplog.at_level("WARNING", logger="dsfedmed.server"):
        result = strategy.start(grid, to_array_record(global_weights()), num_rounds=1, timeout=60.0)
    assert strategy.summary_data["status"] == "completed" and strategy.summary_data["rounds"] == 1
    row = next(r for r in rundir.read_metrics() if r["round"] == 1)
    assert "rejected train reply" in row["errors"]["phantom-1"] and "non-finite" in row["errors"]["phantom-1"]
    assert "site phantom-1: rejected train reply: weight" in caplog.text
    good = from_array_record(grid.good[(1, P.MSG_TRAIN)].content.array_records[P.KEY_ARRAYS])
    final = from_array_record(result.arrays)
    assert all(np.isfinite(v).all() for v in final.values())
    for k, v in good.items():
        np.testing.assert_allclose(
            final[k].astype(np.float64).ravel(), v.astype(np.float64).ravel(), rtol=1e-6
        )


def test_dsfedmed_ensemble_is_not_poisoned_by_nan_probs(
    identity, tmp_path, monkeypatch, caplog, one_torch_thread
):
    """Site 2 answers with NaN probabilities: the round completes, the rejection is logged and booked,
    and the ensemble the FM is distilled towards is site 1's probabilities alone."""
    import server_app.dsfedmed as dsm

    monkeypatch.setattr(dsm, "load_foundation_model", lambda *a, **k: StubFM())
    monkeypatch.setattr(dsm, "FoundationTeacher", StubTeacher)
    monkeypatch.setattr(dsm, "fm_checkpoint_id", lambda *_a: "stub")
    StubTeacher.seen = []

    def damage(node, req, rep):
        if node != 2 or req.metadata.message_type != P.MSG_TRAIN or rep.has_error():
            return rep
        probs = rep.content.array_records[P.KEY_SITE_PROBS][P.ARR_PROBS].numpy()
        nan = np.full(probs.shape, np.nan, np.float16)
        return _replace(req, rep, **{P.KEY_SITE_PROBS: to_array_record({P.ARR_PROBS: nan})})

    run = {
        **DSFEDMED,
        "num-rounds": 1,
        "min-sites": 1,
        "tensorboard": False,
        "sampling-deadline-s": 5.0,
        "pool-source": "phantoms",
        "pool-score-epochs": 0,
        "logit-dtype": "float16",  # probabilities that can be NaN
        "selection-rho": 0.5,
        "fm-epochs": 1,
    }
    grid = LoopbackGrid(site_contexts(run, tmp_path), damage)
    rundir = RunDirectory.create(str(tmp_path), "", "dsfedmed")
    strategy = DSFedMedStrategy(parse_run_config(run), Federation(grid, poll_s=0.01), rundir)
    with caplog.at_level("WARNING", logger="dsfedmed.server"):
        strategy.start(grid, to_array_record(global_weights()), num_rounds=1, timeout=60.0)
    assert strategy.summary_data["status"] == "completed" and strategy.summary_data["rounds"] == 1
    row = next(r for r in rundir.read_metrics() if r["round"] == 1)
    assert "non-finite" in row["errors"]["phantom-1"] and "site-probs" in row["errors"]["phantom-1"]
    assert "site phantom-1: rejected train reply" in caplog.text
    ((idx, ens),) = StubTeacher.seen
    site1 = grid.good[(1, P.MSG_TRAIN)].content.array_records[P.KEY_SITE_PROBS][P.ARR_PROBS].numpy()
    expected = decode_probs(site1, len(idx), 16)
    assert torch.isfinite(ens).all()
    torch.testing.assert_close(ens, expected)


# --- requests (site side) --------------------------------------------------------------------------


def test_pool_larger_than_the_run_allows_is_refused_unread(identity, tmp_path, no_decode):
    images, masks = _pool(40)  # pool-size is 8
    rep = app(_dsfedmed_request(pool=(images, masks)), site_context(DSFEDMED, tmp_path))
    assert rep.has_error() and rep.error.code == ERR_PAYLOAD
    assert "'pool' record holds" in local_detail(rep.error.reason) and "bytes, more than" in local_detail(
        rep.error.reason
    )
    assert no_decode == []


def test_pool_at_a_larger_size_than_the_run_makes_is_refused(identity, tmp_path):
    images, masks = _pool(6, 128)  # image-size 32, gen-size 16: no pool is made at 128 px
    rep = app(_dsfedmed_request(pool=(images, masks)), site_context(DSFEDMED, tmp_path))
    assert rep.has_error() and "'pool' record holds" in local_detail(rep.error.reason)


def test_huge_soft_targets_are_refused_unread(identity, tmp_path, no_decode):
    soft = np.zeros((3, 1, 512, 512), np.uint8)
    rep = app(_dsfedmed_request(soft=soft), site_context(DSFEDMED, tmp_path))
    assert rep.has_error() and rep.error.code == ERR_PAYLOAD
    assert "'soft-targets' record holds" in local_detail(rep.error.reason)
    assert no_decode == []


def test_more_selected_samples_than_the_pool_is_refused(identity, tmp_path):
    rep = app(_dsfedmed_request(selected=list(range(9))), site_context(DSFEDMED, tmp_path))
    assert rep.has_error() and "9 selected samples, more than pool-size 8" in local_detail(rep.error.reason)


def test_undecodable_pool_and_non_uint8_masks_are_refused(identity, tmp_path):
    images, masks = _pool()
    req = _dsfedmed_request()
    req.content[P.KEY_POOL] = ArrayRecord(
        {
            P.ARR_IMAGES: Array(images),
            P.ARR_MASKS: Array("uint8", tuple(masks.shape), "numpy.ndarray", b"junk"),
        }
    )
    rep = app(req, site_context(DSFEDMED, tmp_path))
    assert rep.has_error() and "'pool' array 'masks' cannot be decoded" in local_detail(rep.error.reason)
    rep = app(_dsfedmed_request(pool=(images, masks.astype(bool))), site_context(DSFEDMED, tmp_path))
    assert (
        rep.has_error()
        and "masks must be {0,1} uint8" in local_detail(rep.error.reason)
        and "got bool" in local_detail(rep.error.reason)
    )


def test_damaged_cached_pool_asks_for_a_resend(identity, tmp_path):
    from client_app.state import SiteStore

    images, masks = _pool()
    SiteStore(str(tmp_path / "state"), 11, "phantom-0").save_pool("pbad", images, masks * 7)
    rep = app(_dsfedmed_request(included="none", pool_id="pbad"), site_context(DSFEDMED, tmp_path))
    assert (
        rep.has_error()
        and "not cached at this site" in local_detail(rep.error.reason)
        and "masks" in local_detail(rep.error.reason)
    )


def test_weights_of_a_wrong_dtype_are_refused_by_the_site(identity, tmp_path):
    w = global_weights()
    k = next(k for k, v in w.items() if v.dtype.kind == "f")
    w[k] = w[k].astype(np.complex64)
    req = Message(
        RecordDict({P.KEY_ARRAYS: to_array_record(w), P.KEY_CONFIG: ConfigRecord({P.CFG_ROUND: 1})}),
        dst_node_id=3,
        message_type=P.MSG_TRAIN,
    )
    rep = app(req, site_context(FEDAVG, tmp_path))
    assert (
        rep.has_error()
        and rep.error.code == ERR_PAYLOAD
        and "complex64" in local_detail(rep.error.reason)
        and k in local_detail(rep.error.reason)
    )


def test_a_site_cannot_claim_more_examples_than_its_profile(real, tmp_path):
    """num-examples weighs a reply in the average: it is bounded by the training images the site
    reported in its profile, so one site cannot take over the ensemble or the global model."""
    from common.config import parse_run_config
    from server_app.federation import Federation
    from server_app.rundir import RunDirectory

    strategy = DeadlineFedAvg(parse_run_config(FEDAVG), Federation(None), RunDirectory(tmp_path / "run"))
    n = int(real["fedavg"][1].content.metric_records[P.KEY_METRICS][P.MET_NUM_EXAMPLES])
    strategy.profiles["h"] = {"n-train": n}
    assert strategy.validate_train_reply("h", real["fedavg"][1], real["reference"]) is None
    inflated = _damaged(
        real["fedavg"], **{P.KEY_METRICS: _metrics(real["fedavg"], **{P.MET_NUM_EXAMPLES: n * 1000})}
    )
    why = strategy.validate_train_reply("h", inflated, real["reference"])
    assert why and f"more than the {n} training images" in why


@pytest.mark.parametrize(
    "profile, needle",
    [
        (None, "no 'profile' record"),
        ({"site": "x"}, "lacks"),
        ("n-train=-3", "'n-train' in 'profile' is -3"),
        ("site=", "'site' in 'profile'"),
        ("versions=flwr", "expected a list of strings"),
    ],
)
def test_a_malformed_profile_drops_that_site_and_the_run_goes_on(identity, tmp_path, caplog, profile, needle):
    """Site 2's profile is broken: the server logs why, site 2 does not join, site 1 trains alone."""

    def damage(node, req, rep):
        if node != 2 or req.metadata.message_type != P.MSG_QUERY_PROFILE:
            return rep
        prof = dict(rep.content.config_records[P.KEY_PROFILE])
        if profile is None:
            return _replace(req, rep, **{P.KEY_PROFILE: None})
        if isinstance(profile, dict):
            return _replace(req, rep, **{P.KEY_PROFILE: ConfigRecord(profile)})
        key, value = profile.split("=")
        prof[key] = int(value) if value.lstrip("-").isdigit() else value
        return _replace(req, rep, **{P.KEY_PROFILE: ConfigRecord(prof)})

    run = {**FEDAVG, "num-rounds": 1, "min-sites": 1, "tensorboard": False, "sampling-deadline-s": 5.0}
    grid = LoopbackGrid(site_contexts(run, tmp_path), damage)
    strategy = DeadlineFedAvg(
        parse_run_config(run), Federation(grid, poll_s=0.01), RunDirectory(tmp_path / "r")
    )
    with caplog.at_level("ERROR", logger="dsfedmed.server"):
        strategy.profile_sites()
    assert [strategy.fed.site_of(n) for n in strategy.train_nodes] == ["phantom-0"]
    assert "rejected profile" in caplog.text and needle in caplog.text


def test_pool_score_is_scored_once_per_pool_and_reused(task_identity, tmp_path, monkeypatch):
    """The pool's quality is a property of the pool: scored by the sites once, kept in pool-dir,
    and a later run with the same pool, epochs and sites reuses it without asking the sites again."""
    from flwr.app import Message as Msg

    from server_app.federation import Exchange
    from server_app.synthesis import phantom_pool

    class NoGrid:
        def get_node_ids(self):
            return []

    def strategy(run_dir):
        cfg = parse_run_config({**DSFEDMED, "tensorboard": False, "pool-dir": str(tmp_path / "pool"),
                                "pool-score-epochs": 2})  # fmt: skip
        s = DSFedMedStrategy(cfg, Federation(NoGrid()), RunDirectory.create(str(run_dir), "", "dsfedmed"))
        s.train_nodes = [1, 2]
        s.fed.name_site(1, "A")
        s.fed.name_site(2, "B")
        return s

    sent = []

    def send(msgs, timeout):
        sent.append(len(msgs))
        ex = Exchange()
        for m in msgs:
            rep = Msg(
                RecordDict({P.KEY_METRICS: MetricRecord({"dice-pool": 0.3, "dice-real": 0.5})}), reply_to=m
            )
            rep.metadata.__dict__["_src_node_id"] = m.metadata.dst_node_id
            ex.replies[{1: "A", 2: "B"}[m.metadata.dst_node_id]] = rep
        return ex

    pool = phantom_pool(8, 32, 0)
    first = strategy(tmp_path / "r1")
    monkeypatch.setattr(first.fed, "send", send)
    score = first.score_pool(pool, set())
    assert sent == [2] and score["dice_pool_mean"] == pytest.approx(0.3)
    again = strategy(tmp_path / "r2")
    monkeypatch.setattr(again.fed, "send", send)
    reused = again.score_pool(pool, set())
    assert (
        sent == [2] and reused["sites"] == score["sites"] and reused["reused_from"].startswith("pool_score-")
    )
    other = strategy(tmp_path / "r3")  # another set of sites scores anew
    other.fed.name_site(2, "C")
    monkeypatch.setattr(other.fed, "send", send)
    other.score_pool(pool, set())
    assert sent == [2, 2]
