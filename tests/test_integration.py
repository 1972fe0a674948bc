"""`flwr run .` in Flower's simulation runtime on tiny phantoms, and on real PolypGen sites."""

from __future__ import annotations

import json

import pytest

from bench.flower_sim import flwr_run
from tests.conftest import POLYPGEN, REPO

pytestmark = pytest.mark.integration


def _assert_complete_run_dir(run_dir, rounds, sites):
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["run_config"]["num-rounds"] == rounds
    assert set(sites) <= set(cfg["site_profiles"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(rounds + 1))
    for r in rows:
        assert set(r["sites"]) == set(sites)
        for s in r["sites"].values():
            assert 0 <= s["dice"] <= 1 and 0 <= s["iou"] <= 1 and s["n"] > 0
        assert r["bytes_down"] > 0 and r["bytes_up"] > 0 and r["seconds"] > 0
        assert r["dice_mean"] is not None
    for r in rows[1:]:
        # FedAvg moves the whole model both ways: each site's upload is at least its weights
        assert all(v["up"] > 100_000 for v in r["bytes_per_site"].values())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == rounds
    assert set(summary["test"]) == set(sites)
    # the summary also counts the final test evaluation, which has no metrics row
    assert summary["bytes_total"] > sum(r["bytes_down"] + r["bytes_up"] for r in rows)
    assert (run_dir / "dice.png").stat().st_size > 5_000
    assert (run_dir / "checkpoints" / "global_final.pt").is_file()
    assert len(list((run_dir / "checkpoints").glob("global_round_*.pt"))) == rounds
    return rows, summary


def test_bad_run_config_fails_the_run_with_the_key_named(link, tmp_path):
    out = flwr_run(link, REPO, {"num-rounds": 0, "run-dir": str(tmp_path / "r")}, num_supernodes=2)
    assert not (tmp_path / "r").exists()  # refused before anything was written
    assert out.status == "finished:failed"
    assert "num-rounds" in out.details + out.output


@pytest.mark.realdata
@pytest.mark.skipif(not POLYPGEN.is_dir(), reason="../shared/data/polypgen not present")
def test_fedavg_on_real_polypgen_sites_learns(link, tmp_path, polypgen_split):
    run_dir = tmp_path / "run"
    out = flwr_run(
        link,
        REPO,
        {
            "method": "fedavg",
            "data-root": str(POLYPGEN),
            "split-file": str(polypgen_split),  # 96 training images per hospital
            "num-rounds": 5,
            "image-size": 64,
            "local-epochs": 2,
            "batch-size": 8,
            "learning-rate": 0.006,
            "run-dir": str(run_dir),
        },
        num_supernodes=3,
        timeout_s=1200,
    )
    assert out.status == "finished:completed", out.details + out.output[-3000:]
    rows, summary = _assert_complete_run_dir(run_dir, 5, ["C1", "C2", "C3"])
    assert summary["dice_test_mean"] > summary["dice_test_initial_mean"] + 0.03, summary
