"""DSFedMed through Flower's simulation runtime: logits exchange with a generator pool, resume, and
real PolypGen sites (the weight-exchanging modes run in-process: tests/test_exchange_modes.py)."""

from __future__ import annotations

import json

import pytest

from bench.flower_sim import flwr_run
from tests.conftest import POLYPGEN, REPO
from tests.support import DSFEDMED_TINY as TINY

pytestmark = pytest.mark.integration


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _run(link, tmp_path, sites=2, **overrides):
    run_dir = tmp_path / "run"
    cfg = {**TINY, "run-dir": str(run_dir), **overrides}
    out = flwr_run(link, REPO, cfg, num_supernodes=sites)
    assert out.status == "finished:completed", out.details + out.output[-4000:]
    return run_dir, _rows(run_dir), json.loads((run_dir / "summary.json").read_text())


# logits exchange with site generators, two site architectures and a held-out site
GENERATOR_RUN = {
    "holdout-site": "phantom-2",
    "holdout-epochs": 1,
    "pool-source": "generator",
    "gen-steps": 3,
    "gen-batch-size": 4,
    "gen-sample-steps": 2,
    "site-models": "phantom-0=unet,phantom-1=segresnet",
    # the teacher learns at the sites first: one round of one decoder step (train.teacher)
    "fm-site-rounds": 1,
    "fm-site-steps": 1,
}


@pytest.fixture(scope="module")
def generator_run(link, tmp_path_factory):
    # pool-dir: the resume test's runs reuse this run's pool (and its FM embeddings) instead of
    # training the site generators again; a reused pool is the same pool, so results must match
    GENERATOR_RUN["pool-dir"] = str(tmp_path_factory.mktemp("pools"))
    return _run(link, tmp_path_factory.mktemp("generator"), sites=3, **GENERATOR_RUN)


def test_logits_mode_with_generator_pool_and_two_architectures(generator_run):
    run_dir, rows, summary = generator_run
    assert summary["exchange"] == "logits" and summary["fm"] == "litemedsam"
    # the held-out site deploys the default model, bootstrapped after the rounds
    assert summary["site_models"] == {"phantom-0": "unet", "phantom-1": "segresnet", "phantom-2": "unet"}
    assert summary["fm_params"] > 5_000_000
    assert all(p < 1_000_000 for p in summary["site_model_params"].values())
    assert set(summary["pool"]["generators"]) == {"phantom-0", "phantom-1"}
    assert (run_dir / "pool.png").stat().st_size > 5_000 and (run_dir / "pool.npz").is_file()
    score = json.loads((run_dir / "pool_score.json").read_text())
    assert set(score["sites"]) == {"phantom-0", "phantom-1"}
    assert 0 <= score["dice_pool_mean"] <= 1 and 0 <= score["dice_real_mean"] <= 1
    assert summary["pool"]["score"]["dice_pool_mean"] == score["dice_pool_mean"]
    assert [r["round"] for r in rows] == [0, 1, 2]
    # before round 1 the FM's decoder went to the two training sites and came back averaged
    (teacher_round,) = rows[0]["fm_site_rounds"]
    assert teacher_round["sites"] == ["phantom-0", "phantom-1"] and not teacher_round["errors"]
    assert set(teacher_round["val_dice05_received"]) == {"phantom-0", "phantom-1"}
    assert rows[0]["bytes_by_kind"]["teacher"] > 2 * 2 * 4_000_000 * 2 * 0.9  # 2 sites, 2 ways, fp16
    for r in rows[1:]:
        assert r["selection"]["n_selected"] == 4
        # logits exchange: kilobytes, not a model. The pool went out once, with the pool score
        assert all(v["up"] < 20_000 for v in r["bytes_per_site"].values()), r["bytes_per_site"]
        assert r["bytes_down"] > 0 and r["dice_mean"] is not None
    assert (run_dir / "checkpoints" / "fm_decoder_final.pt").is_file()
    # the held-out site never trained a generator or a round; it bootstrapped from pool + FM
    hold = summary["holdout"]
    assert hold["site"] == "phantom-2" and hold["bootstrap"]["status"] == "trained"
    assert 0 <= hold["dice"] <= 1 and hold["n"] == 16
    assert all("phantom-2" not in r["sites"] for r in rows)


@pytest.mark.realdata
@pytest.mark.skipif(not POLYPGEN.is_dir(), reason="../shared/data/polypgen not present")
def test_dsfedmed_on_real_polypgen_sites_learns(link, tmp_path, polypgen_split):
    run_dir = tmp_path / "run"
    out = flwr_run(
        link,
        REPO,
        {
            "method": "dsfedmed",
            "data-root": str(POLYPGEN),
            "split-file": str(polypgen_split),  # 96 training images per hospital
            "num-rounds": 5,
            "image-size": 64,
            "local-epochs": 2,
            "batch-size": 8,
            "learning-rate": 0.006,
            "pool-source": "phantoms",
            "pool-size": 16,
            "pool-score-epochs": 0,  # the pool's score is tested on phantoms; here it would double the time
            "run-dir": str(run_dir),
        },
        num_supernodes=3,
        timeout_s=1500,
    )
    assert out.status == "finished:completed", out.details + out.output[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["test"]) == {"C1", "C2", "C3"}
    assert summary["dice_test_mean"] > summary["dice_test_initial_mean"] + 0.03, summary


def test_paused_and_resumed_run_equals_the_uninterrupted_one(link, generator_run, tmp_path):
    """The same run paused after round 1's checkpoint and continued with ``resume-from`` in a new
    Flower run (the pool reloaded, the FM, ensemble and site states restored, the held-out site
    bootstrapped at the end) gives the uninterrupted run's metrics. A crash (the SuperLink killed)
    and resume is in tests/test_deploy_e2e.py."""
    from server_app.checkpoint import load_state

    whole, a, sa = generator_run
    cut = tmp_path / "cut"
    out = flwr_run(
        link, REPO, {**TINY, **GENERATOR_RUN, "run-dir": str(cut), "pause-after-round": 1}, num_supernodes=3
    )
    assert out.status == "finished:completed", out.details + out.output[-3000:]
    paused = json.loads((cut / "summary.json").read_text())
    assert paused["status"] == "paused" and paused["rounds"] == 1 and "resume-from" in paused["resume"]
    assert [r["round"] for r in _rows(cut)] == [0, 1] and load_state(cut).round == 1
    # a row written after the last checkpoint (a crash between the two) is dropped and redone
    with open(cut / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"round": 2, "sites": {}}) + "\n")
    out = flwr_run(link, REPO, {**TINY, **GENERATOR_RUN, "resume-from": str(cut)}, num_supernodes=3)
    assert out.status == "finished:completed", out.details + out.output[-3000:]
    b, sb = _rows(cut), json.loads((cut / "summary.json").read_text())
    assert [r["round"] for r in b] == [r["round"] for r in a] == [0, 1, 2]  # none twice, none missing
    for ra, rb in zip(a, b, strict=True):
        assert set(ra["sites"]) == set(rb["sites"])
        for site, v in ra["sites"].items():
            assert rb["sites"][site]["dice"] == pytest.approx(v["dice"], abs=1e-5), (ra["round"], site)
        assert rb.get("selected") == ra.get("selected")
        if ra.get("fm_distill_loss") is not None:
            assert rb["fm_distill_loss"] == pytest.approx(ra["fm_distill_loss"], rel=1e-4)
    assert sb["status"] == "completed" and sb["rounds"] == 2 and sb["pool"]["id"] == sa["pool"]["id"]
    for site, v in sa["test"].items():
        assert sb["test"][site]["dice"] == pytest.approx(v["dice"], abs=1e-5)
    assert sb["holdout"]["dice"] == pytest.approx(sa["holdout"]["dice"], abs=1e-5)
