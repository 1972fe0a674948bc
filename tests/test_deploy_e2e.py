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
# the same with tiny generators (a few steps: what matters here is what leaves each site)
TINY_GEN = {
    **TINY,
    "pool-source": "generator",
    "gen-size": 16,
    "gen-steps": 3,
    "gen-batch-size": 4,
    "gen-sample-steps": 2,
}


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
    sites with data folders on disk complete DSFedMed rounds 1-2 with every site's metrics; a 4th
    SuperNode whose key was never registered is refused; site-1's policy refuses the generator
    upload (the pool comes from the other two) and puts DP noise on its probabilities; site-2 is
    then killed, round 3 finishes after its deadline without it, the dropout is recorded in
    metrics.jsonl, and the run completes. Every site's audit log then proves that none of its images
    or masks, nor anything shaped like them, left it."""
    from common.phantoms import write_phantom_site

    folders = {f"site-{i}": write_phantom_site(tmp_path / f"data-{i}", i, 16, 48) for i in range(3)}
    policy = tmp_path / "site-1-policy.toml"
    policy.write_text(
        "allow-generator-upload = false\n[dp]\nenabled = true\nclip = 40.0\nnoise-multiplier = 0.5\n"
    )
    sites = [
        SiteSpec(name=n, data_dir=str(d), policy_file=str(policy) if n == "site-1" else "")
        for n, d in folders.items()
    ]
    rogue = SiteSpec(name="rogue", phantom_id=3, registered=False)
    cfg = TrialConfig(
        sites=[*sites, rogue],
        work_dir=tmp_path / "trial",
        keys_dir=keys,
        run_config={
            **TINY_GEN,
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
    # site-1's policy refused the generator upload: the pool comes from site-0 and site-2
    assert set(summary["pool"]["generators"]) == {"site-0", "site-2"}
    assert "policy allow-generator-upload" in summary["pool"]["generator_errors"]["site-1"]
    _audit_proves_no_site_data_left(trial.work, folders)
    _report_and_predict_at_site_0(tmp_path, run_dir, trial.work / "sites" / "site-0" / "state", folders)


def _report_and_predict_at_site_0(tmp_path, run_dir, state, folders):
    """The operator's last steps on this real run: the server's report, site-0's own report with
    overlays of its validation images (written at the site), and prediction with its model."""
    from html.parser import HTMLParser

    res = CliRunner().invoke(app, ["report", str(run_dir), "--out", str(tmp_path / "report")])
    assert res.exit_code == 0, res.output
    html = (tmp_path / "report" / "report.html").read_text()
    HTMLParser().feed(html)
    assert all(f"site-{i}" in html for i in range(3)) and "data:image/png;base64," in html
    node = f"data-dir='{folders['site-0']}' site-name='site-0' state-dir='{state}'"
    res = CliRunner().invoke(
        app, ["report", str(run_dir), "--out", str(tmp_path / "site-report"), "--site-node-config", node]
    )
    assert res.exit_code == 0, res.output
    assert list((tmp_path / "site-report").glob("report-site-site-0.*"))
    res = CliRunner().invoke(
        app,
        ["predict", "--state-dir", str(state), "--site", "site-0", "--images", str(folders["site-0"] / "images"),
         "--out", str(tmp_path / "pred")],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "pred").glob("*_mask.png"))) == 16


def _audit_proves_no_site_data_left(work, folders):
    """From each site's own audit log: only protocol records left, nothing equal to or shaped like
    one of its images or masks (native 48 px, or the run's 32 px), and site-1's refusal and DP."""
    from common import protocol as P
    from ops.audit import read_audit

    allowed = {
        (P.MSG_QUERY_PROFILE, P.KEY_PROFILE),
        (P.MSG_TRAIN_GENERATOR, P.KEY_GENERATOR),
        (P.MSG_TRAIN_GENERATOR, P.KEY_GEN_STATS),
        (P.MSG_TRAIN, P.KEY_METRICS),
        (P.MSG_TRAIN, P.KEY_SITE_PROBS),
        (P.MSG_EVALUATE, P.KEY_METRICS),
    }
    for name, folder in folders.items():
        log = work / "sites" / name / "state" / "audit.jsonl"
        entries = read_audit(log)
        types = {e["message_type"] for e in entries}
        assert {P.MSG_QUERY_PROFILE, P.MSG_TRAIN, P.MSG_EVALUATE} <= types, (name, types)
        assert all(e["site"] == name for e in entries)
        sent = {(e["message_type"], r["key"]) for e in entries for r in e["records"]}
        assert sent <= allowed, (name, sent - allowed)
        res = CliRunner().invoke(
            app, ["audit", str(log), "--data-dir", str(folder), "--image-size", "32", "--format", "json"]
        )
        assert res.exit_code == 0, res.output
        check = json.loads(res.output)["data_check"]
        assert check["images"] == 16 and check["arrays_checked"] > 0 and check["problems"] == [], check
        gen = [e for e in entries if e["message_type"] == P.MSG_TRAIN_GENERATOR]
        if name == "site-1":
            assert [e["policy"] for e in gen] == ["allow-generator-upload"]
            ledger = json.loads(next((work / "sites" / name / "state").rglob("privacy.json")).read_text())
            assert len(ledger["releases"]) >= 2 and ledger["epsilon"] > 0
        else:
            assert [e["status"] for e in gen] == ["ok"]
    text = CliRunner().invoke(app, ["audit", str(work / "sites" / "site-1" / "state" / "audit.jsonl")])
    assert text.exit_code == 0 and "policy refusals" in text.output and "site-probs" in text.output


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
