"""Server resume: a run paused after round 1 and resumed with ``resume-from`` (a new Flower run) gives
the same metrics as the same run uninterrupted; and what may not resume. A crash (the SuperLink
killed mid-run) and resume is in tests/test_chaos.py."""

from __future__ import annotations

import json
import subprocess

import pytest

from bench.flower_sim import flwr_run, simulation_superlink
from common.config import parse_run_config
from deploy.processes import BIN
from server_app.checkpoint import ResumeError, ServerState, check_compatible, load_state, save_state
from tests.conftest import REPO
from tests.test_dsfedmed_integration import TINY

pytestmark = pytest.mark.integration

CFG = {**TINY, "num-rounds": 2, "pool-source": "phantoms", "pool-score-epochs": 0}


@pytest.fixture(scope="module")
def link(tmp_path_factory):
    home = tmp_path_factory.mktemp("flwr-home")
    with simulation_superlink(home, REPO) as link:
        yield link


def _rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _running_run(link) -> str:
    out = subprocess.run(
        [str(BIN / "flwr"), "list", "--format", "json"],
        env=link.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    runs = [r for r in json.loads(out.stdout)["runs"] if r["status"].startswith("running")]
    assert len(runs) == 1, runs
    return runs[0]["run-id"]


def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(link, tmp_path):
    whole = tmp_path / "whole"
    out = flwr_run(link, REPO, {**CFG, "run-dir": str(whole)}, num_supernodes=2)
    assert out.status == "finished:completed", out.details + out.output[-3000:]

    # the same run, paused after round 1's checkpoint, then resumed in a new Flower run
    cut = tmp_path / "cut"
    out = flwr_run(link, REPO, {**CFG, "run-dir": str(cut), "pause-after-round": 1}, num_supernodes=2)
    assert out.status == "finished:completed", out.details + out.output[-3000:]
    paused = json.loads((cut / "summary.json").read_text())
    assert paused["status"] == "paused" and paused["rounds"] == 1 and "resume-from" in paused["resume"]
    assert [r["round"] for r in _rows(cut)] == [0, 1] and load_state(cut).round == 1
    # a row written after the last checkpoint (a crash between the two) is dropped and redone
    with open(cut / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"round": 2, "sites": {}}) + "\n")

    resumed = flwr_run(link, REPO, {**CFG, "resume-from": str(cut)}, num_supernodes=2)
    assert resumed.status == "finished:completed", resumed.details + resumed.output[-3000:]
    a, b = _rows(whole), _rows(cut)
    assert [r["round"] for r in a] == [r["round"] for r in b] == [0, 1, 2]  # none twice, none missing
    for ra, rb in zip(a, b, strict=True):
        assert set(ra["sites"]) == set(rb["sites"]) == {"phantom-0", "phantom-1"}
        for site in ra["sites"]:
            assert rb["sites"][site]["dice"] == pytest.approx(ra["sites"][site]["dice"], abs=1e-5), (
                ra["round"],
                site,
            )
        assert rb.get("selected") == ra.get("selected")
        if ra.get("fm_distill_loss") is not None:
            assert rb["fm_distill_loss"] == pytest.approx(ra["fm_distill_loss"], rel=1e-5)
    sa = json.loads((whole / "summary.json").read_text())
    sb = json.loads((cut / "summary.json").read_text())
    for site, v in sa["test"].items():
        assert sb["test"][site]["dice"] == pytest.approx(v["dice"], abs=1e-5)
    assert sb["rounds"] == 2 and sb["bytes_total"] > 0


def test_resume_refuses_changed_settings_and_missing_checkpoints(tmp_path):
    cfg = parse_run_config({**CFG})
    st = ServerState(
        round=2, state_key=9, method="dsfedmed", run_config=cfg.to_flat(), history=[], traffic_down={},
        traffic_up={}, wall_seconds=1.0,
    )  # fmt: skip
    (tmp_path / "checkpoints").mkdir()
    save_state(tmp_path / "checkpoints", st)
    back = load_state(tmp_path)
    assert back.round == 2 and back.state_key == 9 and "torch" in back.rng
    check_compatible(back, parse_run_config({**CFG, "num-rounds": 5, "round-timeout-s": 10.0}))
    with pytest.raises(ResumeError, match="seed: 0 -> 1"):
        check_compatible(back, parse_run_config({**CFG, "num-rounds": 5, "seed": 1}))
    with pytest.raises(ResumeError, match="already holds 2 round"):
        check_compatible(back, parse_run_config({**CFG, "num-rounds": 2}))
    with pytest.raises(ResumeError, match="no server checkpoint"):
        load_state(tmp_path / "elsewhere")
    (tmp_path / "checkpoints" / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ResumeError, match="cannot be read"):
        load_state(tmp_path)
