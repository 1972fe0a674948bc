"""A site's own state on disk (logits exchange): per-round snapshots of the model and its optimisers,
so that a restarted site continues, a round asked again is computed from the same state, and a
site that joins late starts from its initial model."""

import numpy as np
import torch
from flwr.app import Context, RecordDict

from client_app.app import app
from client_app.state import SiteStore
from common import protocol as P
from tests.support import DSFEDMED_HANDLER_RUN as RUN
from tests.support import train_msg


def _w(v: float) -> dict[str, np.ndarray]:
    return {"a": np.full((2, 2), v, np.float32)}


def test_snapshots_pick_the_newest_earlier_round_and_keep_the_last_three(tmp_path):
    store = SiteStore(str(tmp_path), 5, "h1")
    assert store.load_state(before_round=1) is None  # a late joiner: initial model
    for r in range(1, 6):
        store.save_model(_w(r), server_round=r, optim={"local": {"state": {}, "param_groups": [{"lr": r}]}})
    assert list(store.snapshots()) == [3, 4, 5]  # older ones pruned
    weights, optim = store.load_state(before_round=5)  # round 5 asked again: from round 4's state
    assert weights["a"][0, 0] == 4 and optim["local"]["param_groups"][0]["lr"] == 4
    assert store.load_model()["a"][0, 0] == 5  # the newest (what predict uses)
    assert store.load_state(before_round=3) is None  # nothing that old is kept


def test_a_round_asked_again_gives_the_same_reply_and_optimisers_persist(task_identity, tmp_path):
    ctx = Context(
        run_id=11,
        node_id=3,
        node_config={"phantom-id": 0, "state-dir": str(tmp_path / "state")},
        state=RecordDict(),
        run_config=RUN,
    )

    def probs(rep):
        assert not rep.has_error(), rep.error.reason
        return rep.content.array_records[P.KEY_SITE_PROBS][P.ARR_PROBS].numpy()

    def msg(rnd, included):
        m = train_msg([0, 1, 2], included=included)
        m.content.config_records[P.KEY_CONFIG][P.CFG_ROUND] = rnd
        m.content.config_records[P.KEY_CONFIG][P.CFG_STATE_KEY] = 99  # a resumed run's key
        return m

    p1 = probs(app(msg(1, "all"), ctx))
    p2 = probs(app(msg(2, "none"), ctx))
    store = SiteStore(str(tmp_path / "state"), 99, "phantom-0")
    assert list(store.snapshots()) == [1, 2]
    _, optim = store.load_state()
    assert {"local", "distill"} <= set(optim)  # Adam states carried from round to round
    assert optim["local"]["state"] and all(
        torch.is_tensor(v["exp_avg"]) for v in optim["local"]["state"].values()
    )
    # the site restarts, and round 2 is asked again (the server resumed): same state, same answer
    np.testing.assert_array_equal(probs(app(msg(2, "none"), ctx)), p2)
    assert not np.array_equal(p1, p2)
    assert not (tmp_path / "state" / "run-11").exists()  # state lives under the server's key
