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
from tests.support import (
    DSFEDMED,
    LoopbackGrid,
    StubFM,
    StubTeacher,
    global_weights,
    site_contexts,
)


@pytest.mark.parametrize("exchange", ["weights", "hybrid"])
def test_weight_exchanging_modes(task_identity, tmp_path, monkeypatch, exchange, one_torch_thread):
    import server_app.dsfedmed as dsm

    monkeypatch.setattr(dsm, "load_foundation_model", lambda *a, **k: StubFM())
    monkeypatch.setattr(dsm, "FoundationTeacher", StubTeacher)
    monkeypatch.setattr(dsm, "fm_checkpoint_id", lambda *_a: "stub")
    StubTeacher.seen = []
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
    grid = LoopbackGrid(site_contexts(run, tmp_path))
    rundir = RunDirectory.create(str(tmp_path), "", "dsfedmed")
    strategy = dsm.DSFedMedStrategy(parse_run_config(run), Federation(grid, poll_s=0.01), rundir)
    result = strategy.start(grid, to_array_record(global_weights()), num_rounds=2, timeout=60.0)
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
    assert len(StubTeacher.seen) == 2
    assert set(rows[2]["server_cpu_s"]) == {
        "select",
        "send",
        "aggregate",
        "teacher",
        "evaluate",
        "record_prev",
    }


def test_a_pause_keeps_the_rounds_files(task_identity, tmp_path, monkeypatch, one_torch_thread):
    """The pause used to be raised while the round's row was written, before that round's
    ``global_round_NNN.pt`` and ``fm_decoder_latest.pt``: a paused run lacked its last round's model.
    Both strategies, paused after round 1 of 2, now have every file of round 1."""
    import server_app.dsfedmed as dsm
    from server_app.checkpoint import RunPaused, load_state
    from server_app.fedavg import DeadlineFedAvg

    monkeypatch.setattr(dsm, "load_foundation_model", lambda *a, **k: StubFM())
    monkeypatch.setattr(dsm, "FoundationTeacher", StubTeacher)
    monkeypatch.setattr(dsm, "fm_checkpoint_id", lambda *_a: "stub")
    base = {
        "num-rounds": 2,
        "pause-after-round": 1,
        "min-sites": 2,
        "tensorboard": False,
        "sampling-deadline-s": 5.0,
    }
    runs = {
        "fedavg": (DeadlineFedAvg, {**DSFEDMED, **base, "method": "fedavg"}),
        "dsfedmed": (
            dsm.DSFedMedStrategy,
            {**DSFEDMED, **base, "exchange": "hybrid", "pool-source": "phantoms", "pool-score-epochs": 0},
        ),
    }
    for method, (cls, run) in runs.items():
        grid = LoopbackGrid(site_contexts(run, tmp_path / method))
        rundir = RunDirectory.create(str(tmp_path / method), "", method)
        strategy = cls(parse_run_config(run), Federation(grid, poll_s=0.01), rundir)
        with pytest.raises(RunPaused):
            strategy.start(grid, to_array_record(global_weights()), num_rounds=2, timeout=60.0)
        files = {p.name for p in rundir.checkpoints.iterdir()}
        assert "global_round_001.pt" in files and "global_round_002.pt" not in files, (method, files)
        if method == "dsfedmed":
            assert "fm_decoder_latest.pt" in files
        assert load_state(rundir.path).round == 1  # the server state is round 1's too
