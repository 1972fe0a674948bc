"""Deployment end to end: a real TLS SuperLink with node authentication and SuperNode processes on
loopback (``deploy.local.LocalTrial``, what ``dsfedmed deploy local`` runs), every process stopped by PID."""

from __future__ import annotations

import json
import threading
import time

import pytest
from typer.testing import CliRunner

from cli.main import app
from deploy.certs import KeySpec, make_federation_keys
from deploy.local import LocalTrial, SiteSpec, TrialConfig
from deploy.processes import BIN, free_port, start
from tests.test_dsfedmed_integration import TINY as DSFEDMED_TINY

pytestmark = pytest.mark.integration

# the DSFedMed integration tests' tiny run, with the built-in phantom pool (no generators to train)
TINY = {**DSFEDMED_TINY, "pool-source": "phantoms", "pool-score-epochs": 0}


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    out = tmp_path_factory.mktemp("keys") / "keys"
    make_federation_keys(out, KeySpec(sites=("site-0", "site-1", "site-2", "rogue")))
    return out


def _sites(n: int, **extra: SiteSpec) -> list[SiteSpec]:
    return [SiteSpec(name=f"site-{i}", phantom_id=i) for i in range(n)] + list(extra.values())


def _wait_exit(proc, timeout_s: float) -> int | None:
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    return proc.poll()


def test_tls_trial_with_node_auth_refused_rogue_and_a_site_killed_mid_run(tmp_path, keys):
    """One trial (the e2e runs are the suite's slowest; they share one federation): 3 registered
    sites complete DSFedMed rounds 1-2 with every site's metrics; a 4th SuperNode whose key was never
    registered is refused; site-2 is then killed, round 3 finishes after its deadline without it, the
    dropout is recorded in metrics.jsonl, and the run completes."""
    rogue = SiteSpec(name="rogue", phantom_id=3, registered=False)
    cfg = TrialConfig(
        sites=_sites(3, rogue=rogue),
        work_dir=tmp_path / "trial",
        keys_dir=keys,
        run_config={
            **TINY,
            "num-rounds": 3,
            "min-sites": 2,
            "round-timeout-s": 90,
            "sampling-deadline-s": 30,
        },
        timeout_s=900,
    )
    run_dir = tmp_path / "trial" / "run"
    metrics = run_dir / "metrics.jsonl"
    with LocalTrial(cfg, echo=lambda m: None) as trial:
        trial.start()
        procs = dict(trial.procs)
        result: dict = {}
        runner = threading.Thread(target=lambda: result.setdefault("res", trial.run()))
        runner.start()
        # the SuperLink refuses the node whose key was never registered
        assert _wait_exit(procs["supernode-rogue"], 120) not in (None, 0)
        rogue_log = (trial.logs / "supernode-rogue.log").read_text()
        assert "Failed to activate SuperNode" in rogue_log, rogue_log[-2000:]
        # as soon as round 2 is logged, site-2 dies: round 3 must go on without it
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and runner.is_alive():
            if metrics.is_file() and any(
                json.loads(x)["round"] == 2 for x in metrics.read_text().splitlines()
            ):
                break
            time.sleep(0.5)
        trial.stop_site("site-2")
        runner.join(600)
        assert not runner.is_alive()
    # every process the trial started is gone
    assert all(p.poll() is not None for p in procs.values())
    res = result["res"]
    assert res.completed, f"{res.status} {res.details}\n{res.output[-3000:]}"
    assert set(res.node_ids) == {"site-0", "site-1", "site-2"}
    assert (trial.work / "superlink" / "state.db").stat().st_size > 0  # persistent SuperLink state

    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    for r in rows[:3]:  # rounds 0-2: every site's metrics
        assert set(r["sites"]) == {"site-0", "site-1", "site-2"} and not r["dropped"]
        assert all(0 <= v["dice"] <= 1 and v["n"] > 0 for v in r["sites"].values())
        assert r["bytes_down"] > 0 and r["bytes_up"] > 0
    # gone before round 3 asked it (absent) or in the middle of it (no answer): dropped either way
    assert "site-2" in rows[3]["dropped"] and set(rows[3]["sites"]) == {"site-0", "site-1"}
    assert rows[3]["dice_mean"] is not None
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["method"] == "dsfedmed" and summary["rounds"] == 3
    assert "rogue" not in json.loads((run_dir / "config.json").read_text())["site_profiles"]
    assert set(summary["test"]) == {"site-0", "site-1"}
    assert (run_dir / "pool.png").is_file() and (run_dir / "dice.png").is_file()


def test_plaintext_client_against_the_tls_superlink_fails_clearly(tmp_path, keys, monkeypatch):
    cfg = TrialConfig(sites=_sites(1), work_dir=tmp_path / "trial", keys_dir=keys)
    with LocalTrial(cfg, echo=lambda m: None) as trial:
        trial.start_superlink()
        # `dsfedmed deploy register` against the real SuperLink, through the trial's connection
        monkeypatch.setenv("FLWR_HOME", str(trial.flwr_home))
        reg = CliRunner().invoke(
            app,
            ["deploy", "register", "--keys", str(keys), "--superlink", "dsfedmed-trial", "--site", "site-0"],
        )
        assert reg.exit_code == 0 and "site site-0: registered as node" in reg.output, reg.output
        res = CliRunner().invoke(app, ["deploy", "check", "--superlink", trial.address])
        assert res.exit_code == 2 and "requires TLS" in res.output and "--root-certificates" in res.output
        ok = CliRunner().invoke(
            app,
            [
                "deploy",
                "check",
                "--superlink",
                trial.address,
                "--root-certificates",
                str(keys / "ca" / "ca.crt"),
            ],
        )
        assert ok.exit_code == 0 and "TLS verified" in ok.output
        # Flower's own SuperNode in plaintext gives up after its retries instead of retrying forever
        log = trial.logs / "plain.log"
        proc = start(
            [
                str(BIN / "flower-supernode"),
                "--insecure",
                "--superlink",
                trial.address,
                "--node-config",
                "phantom-id=0",
                "--port",
                str(free_port()),
                "--max-retries",
                "2",
            ],
            log,
            trial.env,
        )
        trial.procs["plain"] = proc  # stopped by PID with the trial, whatever happens
        assert _wait_exit(proc, 90) not in (None, 0)
        assert "could not establish a connection" in log.read_text()
