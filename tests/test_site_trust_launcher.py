"""The site's own launcher against a real SuperNode (``--isolation process``) and SuperLink: the app
the site allowed runs; an altered app is refused before any of it is installed, with an error reply
the coordinator sees and an audit entry at the site."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from cli.main import app
from deploy.certs import KeySpec, make_federation_keys
from deploy.local import LocalTrial, SiteSpec, TrialConfig
from deploy.site_exec import AllowListError, allow, fab_hash, read_allow_list

FEDAVG = {"method": "fedavg", "num-rounds": 1, "image-size": 32, "phantom-images-per-site": 12,
          "local-epochs": 1, "batch-size": 4, "round-timeout-s": 120, "sampling-deadline-s": 30,
          "min-sites": 1, "tensorboard": False}  # fmt: skip


def test_allow_list_entries_and_hashes(tmp_path):
    fab = tmp_path / "app.fab"
    fab.write_bytes(b"a bundle")
    h = allow(tmp_path / "allow.txt", fab, note="v1 reviewed")
    assert h == fab_hash(fab) and read_allow_list(tmp_path / "allow.txt") == {h}
    assert allow(tmp_path / "allow.txt", h) == h  # the same hash once
    assert (tmp_path / "allow.txt").read_text().count(h) == 1
    (tmp_path / "bad.txt").write_text("not-a-hash\n")
    with pytest.raises(AllowListError, match="line 1"):
        read_allow_list(tmp_path / "bad.txt")
    with pytest.raises(AllowListError, match="cannot be read"):
        read_allow_list(tmp_path / "missing.txt")
    res = CliRunner().invoke(
        app, ["site", "allow", str(tmp_path / "nope"), "--allow-list", str(tmp_path / "a")]
    )
    assert res.exit_code != 0 and "not a SHA-256" in res.output


@pytest.mark.integration
def test_the_site_runs_only_the_app_it_allowed(tmp_path):
    keys = tmp_path / "keys"
    make_federation_keys(keys, KeySpec(sites=("site-0",)), trial_site_keys=True)
    cfg = TrialConfig(
        sites=[SiteSpec(name="site-0", phantom_id=0)],
        work_dir=tmp_path / "trial",
        keys_dir=keys,
        run_config=FEDAVG,
        timeout_s=600,
    )
    with LocalTrial(cfg, echo=lambda m: None) as trial:
        trial.start()
        trial.wait_online()
        assert "exec-site-0" in trial.procs  # the site's launcher, not Flower's superexec
        ok = trial.run({"run-dir": str(tmp_path / "run-allowed")})
        assert ok.completed, ok.output[-2000:]
        # the app changes (one byte in a file the bundle carries): the site has not allowed it
        allow_list = trial.work / "allowed-fabs.txt"
        allow_list.write_text("# the site revoked everything\n" + "0" * 64 + "\n")
        refused = trial.run({"run-dir": str(tmp_path / "run-refused")})
        summary = json.loads((tmp_path / "run-refused" / "summary.json").read_text())
        assert summary["status"] == "stopped", summary
        assert re.search(r"error 7: this site runs only app bundles on its allow-list", summary["reason"])
        assert not refused.completed
    audit = [
        json.loads(x) for x in (tmp_path / "trial" / "sites" / "site-0" / "state" / "audit.jsonl").open()
    ]
    refusals = [e for e in audit if e["policy"] == "allow-list"]
    assert refusals and all(e["status"] == "error" and e["error_code"] == 7 for e in refusals)
    assert "NOT on the allow-list" in (tmp_path / "trial" / "logs" / "exec-site-0.log").read_text()
