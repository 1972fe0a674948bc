"""Deployment end to end: a real TLS SuperLink with node authentication and SuperNode processes on
loopback (``deploy.local.LocalTrial``, what ``dsfedmed deploy local`` runs), every process stopped by PID."""

from __future__ import annotations

import json
import re
import threading
import time

import pytest
from typer.testing import CliRunner

from cli.main import app
from deploy.certs import KeySpec, make_federation_keys
from deploy.local import LocalTrial, SiteSpec, TrialConfig
from deploy.processes import BIN, free_port, start
from tests.support import DSFEDMED_TINY

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
    make_federation_keys(out, KeySpec(sites=("site-0", "site-1", "site-2", "rogue")), trial_site_keys=True)
    return out


def _sites(n: int, **extra: SiteSpec) -> list[SiteSpec]:
    return [SiteSpec(name=f"site-{i}", phantom_id=i) for i in range(n)] + list(extra.values())


def _wait_exit(proc, timeout_s: float) -> int | None:
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    return proc.poll()


def _rounds_logged(metrics) -> list[int]:
    if not metrics.is_file():
        return []
    return [json.loads(x)["round"] for x in metrics.read_text().splitlines() if x.strip()]


def _wait_round(metrics, rnd: int, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while rnd not in _rounds_logged(metrics):
        assert time.monotonic() < deadline, f"round {rnd} never logged ({_rounds_logged(metrics)})"
        time.sleep(0.3)


def test_tls_trial_policy_audit_and_crashes_of_a_site_and_the_superlink(tmp_path, keys):
    """One trial (the e2e runs are the suite's slowest, so one federation carries the scenario):

    - 2 registered sites with data folders on disk; a 3rd SuperNode whose key was never
      registered is refused;
    - site-1's policy refuses the generator upload (the pool comes from site-0's generator) and
      puts DP noise on its probabilities;
    - site-1's SuperNode is killed (SIGKILL) after round 1: round 2 goes on without it, recorded
      as dropped;
    - after round 2 site-1 comes back, and the SuperLink is killed with the ServerApp it runs; it
      restarts on the same state database, the SuperNodes reconnect, and the run resumed from its
      checkpoint (``resume-from``) completes round 3 with both sites, site-1 continuing from its
      state on disk;
    - every site's audit log then proves that none of its images or masks, nor anything shaped
      like them, left it; the operator's report and prediction work on the real run.
    """
    from common.phantoms import write_phantom_site

    folders = {f"site-{i}": write_phantom_site(tmp_path / f"data-{i}", i, 16, 48) for i in range(2)}
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
            "min-sites": 1,
            "round-timeout-s": 30,
            "sampling-deadline-s": 15,
            "evaluate-every": 2,  # validation after rounds 2 and 3 (and the baseline at 0)
        },
        timeout_s=900,
        supernode_max_retries=100,  # the SuperNodes outlive a SuperLink restart
    )
    run_dir = tmp_path / "trial" / "run"
    metrics = run_dir / "metrics.jsonl"
    with LocalTrial(cfg, echo=lambda m: None) as trial:
        trial.start()
        trial.wait_online()  # min-sites is 1: the roster must not start without site-1
        procs = dict(trial.procs)
        first: dict = {}

        def run_first():
            try:
                first["res"] = trial.run()
            except Exception as exc:  # noqa: BLE001 - its SuperLink is killed under it
                first["error"] = exc

        runner = threading.Thread(target=run_first)
        runner.start()
        # the SuperLink refuses the node whose key was never registered
        assert _wait_exit(procs["supernode-rogue"], 120) not in (None, 0)
        rogue_log = (trial.logs / "supernode-rogue.log").read_text()
        assert "Failed to activate SuperNode" in rogue_log, rogue_log[-2000:]
        # site-1 crashes as soon as round 1 is logged: round 2 must go on without it
        _wait_round(metrics, 1)
        trial.kill("supernode-site-1")
        _wait_round(metrics, 2)
        # site-1 comes back; the SuperLink (and the ServerApp it runs) crashes, and restarts
        trial.restart_site("site-1")
        trial.kill("superlink")
        trial.kill("flwr-run")  # the operator's `flwr run` lost its SuperLink too
        assert (run_dir / "checkpoints" / "state.json").is_file()
        survivors = {k: trial.procs[k] for k in ("supernode-site-0", "supernode-site-1")}
        trial.restart_superlink()
        runner.join(300)
        assert not runner.is_alive()
        res = trial.run({"resume-from": str(run_dir), "min-sites": 2})
        assert all(p.poll() is None for p in survivors.values()), "a SuperNode gave up on the SuperLink"
        procs.update(trial.procs)
    # every process the trial started is gone
    assert all(p.poll() is not None for p in procs.values())
    assert res.completed, f"{res.status} {res.details}\n{res.output[-3000:]}"
    assert set(res.node_ids) == {"site-0", "site-1"}
    assert (trial.work / "superlink" / "state.db").stat().st_size > 0  # persistent SuperLink state

    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]  # each round once, across the two runs
    for r in rows:
        assert all(0 <= v["dice"] <= 1 and v["n"] > 0 for v in r["sites"].values())
        assert r["bytes_down"] > 0 and r["bytes_up"] > 0
    assert set(rows[0]["sites"]) == {"site-0", "site-1"} and rows[1]["sites"] == {}
    assert not rows[0]["dropped"] and not rows[1]["dropped"]  # round 1: every site trained
    # gone before round 2 asked it (absent) or in the middle of it (no answer): dropped either way
    assert "site-1" in rows[2]["dropped"] and set(rows[2]["sites"]) == {"site-0"}
    assert set(rows[3]["sites"]) == {"site-0", "site-1"} and not rows[3]["dropped"]
    # site-1 continued from its state on disk, kept under the first run's key
    # (after round 1, or after round 2 if it had trained round 2 when it was killed: its reply was lost)
    # the site's ClientApp tasks run under its own launcher (`dsfedmed site exec`): their log is the
    # launcher's, beside the SuperNode's
    log = "".join((trial.logs / f"{k}-site-1.log").read_text() for k in ("supernode", "exec"))
    assert re.search(r"site-1: round 3 starts from its state after round [12]\b", log), log[-3000:]
    (state_dir,) = (trial.work / "sites" / "site-1" / "state").glob("run-*")
    assert (state_dir / "site-1" / "round-0003.pt").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["method"] == "dsfedmed" and summary["rounds"] == 3
    assert "rogue" not in json.loads((run_dir / "config.json").read_text())["site_profiles"]
    assert set(summary["test"]) == {"site-0", "site-1"}
    assert (run_dir / "pool.png").is_file() and (run_dir / "dice.png").is_file()
    # site-1's policy refused the generator upload: the pool comes from site-0's generator
    assert set(summary["pool"]["generators"]) == {"site-0"}
    assert "(rule allow-generator-upload)" in summary["pool"]["generator_errors"]["site-1"]
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
    assert all(f"site-{i}" in html for i in range(2)) and "data:image/png;base64," in html
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
            ledger = json.loads((work / "sites" / name / "state" / "privacy-ledger.json").read_text())
            assert len(ledger["releases"]) >= 2 and ledger["epsilon_total"] > 0
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
