"""DSFedMed's weight-exchanging modes (the paper's ``weights`` and ``hybrid``), one whole run each
through the real strategy and the real ClientApp handlers on an in-process grid (the FM is stubbed:
it is tested on its own in test_foundation.py, and the real transport in the simulation runs)."""

import numpy as np
import pytest

from common import protocol as P
from common.codec import from_array_record, to_array_record
from common.config import parse_run_config
from server_app.federation import Federation
from server_app.rundir import RunDirectory
from tests.test_payload_faults import (
    DSFEDMED,
    LoopbackGrid,
    _global_weights,
    _site_contexts,
    _StubFM,
    _StubTeacher,
)


@pytest.mark.parametrize("exchange", ["weights", "hybrid"])
def test_weight_exchanging_modes(task_identity, tmp_path, monkeypatch, exchange, one_torch_thread):
    import server_app.dsfedmed as dsm

    monkeypatch.setattr(dsm, "load_foundation_model", lambda *a, **k: _StubFM())
    monkeypatch.setattr(dsm, "FoundationTeacher", _StubTeacher)
    monkeypatch.setattr(dsm, "fm_checkpoint_id", lambda *_a: "stub")
    _StubTeacher.seen = []
    run = {
        **DSFEDMED,
        "exchange": exchange,
        "num-rounds": 2,
        "evaluate-every": 2,
        "min-sites": 2,
        "tensorboard": False,
        "sampling-deadline-s": 5.0,
        "pool-source": "phantoms",
        "pool-score-epochs": 0,
    }
    grid = LoopbackGrid(_site_contexts(run, tmp_path))
    rundir = RunDirectory.create(str(tmp_path), "", "dsfedmed")
    strategy = dsm.DSFedMedStrategy(parse_run_config(run), Federation(grid, poll_s=0.01), rundir)
    result = strategy.start(grid, to_array_record(_global_weights()), num_rounds=2, timeout=60.0)
    summary, rows = strategy.summary_data, rundir.read_metrics()
    assert summary["status"] == "completed" and summary["exchange"] == exchange
    assert rows[1]["sites"] == {} and rows[1]["dice_mean"] is None  # validation every 2nd round
    assert set(rows[2]["sites"]) == {"phantom-0", "phantom-1"}
    for r in rows[1:]:
        assert all(v["up"] > 100_000 for v in r["bytes_per_site"].values())  # weights go up
    reply = grid.good[(1, P.MSG_TRAIN)].content.array_records
    assert (P.KEY_SITE_PROBS in reply) == (exchange == "hybrid") and P.KEY_ARRAYS in reply
    assert (rundir.checkpoints / "global_final.pt").is_file()
    assert summary["dice_test_mean"] is not None
    assert all(np.isfinite(v).all() for v in from_array_record(result.arrays).values())
    # the FM learned from an ensemble every round: the site probabilities (hybrid) or the averaged
    # model's own probabilities on the selected samples (weights)
    assert len(_StubTeacher.seen) == 2
