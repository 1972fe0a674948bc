"""`flwr run .` in Flower's simulation runtime on tiny phantoms, and on real PolypGen sites."""

from __future__ import annotations

import pytest

from bench.flower_sim import flwr_run
from tests.conftest import POLYPGEN, REPO
from tests.support import assert_complete_run_dir

pytestmark = pytest.mark.integration


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
    rows, summary = assert_complete_run_dir(run_dir, 5, ["C1", "C2", "C3"])
    assert summary["dice_test_mean"] > summary["dice_test_initial_mean"] + 0.03, summary
