"""The coordinator against a real site on loopback: a SuperLink, the site's SuperNode in process
isolation and the site's own launcher (``dsfedmed site exec``), TLS and node authentication, the
site's data in a folder of its own and its policy in a file of its own. Between runs only the site
edits its policy (the site reads it at every message); the coordinator changes only the run config.
Each test is one thing a careless or hostile coordinator tries, and what the site does about it.
(The altered app bundle is tests/test_site_trust_launcher.py.)"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from client_app.errors import ERR_CONFIG, ERR_POLICY
from client_app.privacy import LEDGER_FILE, PrivacyLedger
from common.phantoms import write_phantom_site
from deploy.certs import KeySpec, make_federation_keys
from deploy.local import LocalTrial, SiteSpec, TrialConfig

pytestmark = pytest.mark.integration

FEDAVG = {"method": "fedavg", "num-rounds": 1, "image-size": 32, "local-epochs": 1, "batch-size": 4,
          "round-timeout-s": 120, "sampling-deadline-s": 30, "min-sites": 1, "tensorboard": False,
          "evaluate-every": 1}  # fmt: skip
# DSFedMed at its smallest: a phantom pool (no generators), no pool score, no teacher adaptation
DSFEDMED = {**FEDAVG, "method": "dsfedmed", "exchange": "logits", "pool-source": "phantoms", "pool-size": 4,
            "pool-score-epochs": 0, "fm-adapt-epochs": 0, "fm-epochs": 0, "logit-size": 8,
            "selection-rule": "all"}  # fmt: skip


class Site:
    """The trial and what the site owns: its folder, its policy file, its state and audit log."""

    def __init__(self, trial: LocalTrial, folder: Path, policy: Path, work: Path):
        self.trial, self.folder, self.policy, self.work = trial, folder, policy, work
        self.state = work / "trial" / "sites" / "site-0" / "state"
        self.n = 0

    def set_policy(self, text: str) -> None:
        self.policy.write_text(text)

    def run(self, base: dict, **overrides) -> tuple[dict, Path]:
        self.n += 1
        run_dir = self.work / f"run-{self.n}"
        self.trial.run({**base, "run-dir": str(run_dir), **overrides})
        return json.loads((run_dir / "summary.json").read_text()), run_dir

    def audit(self) -> list[dict]:
        return [json.loads(x) for x in (self.state / "audit.jsonl").read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    work = tmp_path_factory.mktemp("trust")
    folder = write_phantom_site(work / "hospital-data", index=0, n=12, image_size=32)
    policy = work / "site-policy.toml"
    policy.write_text("")  # permissive until a test tightens it
    keys = work / "keys"
    make_federation_keys(keys, KeySpec(sites=("site-0",)), trial_site_keys=True)
    cfg = TrialConfig(
        sites=[SiteSpec(name="site-0", data_dir=str(folder), policy_file=str(policy))],
        work_dir=work / "trial",
        keys_dir=keys,
        run_config=FEDAVG,
        timeout_s=600,
    )
    with LocalTrial(cfg, echo=lambda m: None) as trial:
        trial.start()
        trial.wait_online()
        yield Site(trial, folder, policy, work)


def _strings(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for k, v in obj.items() for s in _strings(k) + _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return []


def test_what_the_coordinator_receives_names_no_site_path_file_or_file_hash(site):
    """A permissive run: everything the coordinator kept from the site's replies (summary, rows,
    errors) holds no path of the site, no file name and no hash of a site file."""
    site.set_policy("")
    summary, run_dir = site.run(FEDAVG)
    assert summary["status"] == "completed", summary
    files = [p for p in site.folder.rglob("*") if p.is_file()]
    forbidden = {str(site.folder), str(site.folder.resolve()), site.folder.name}
    forbidden |= {p.name for p in files} | {p.stem for p in files}
    forbidden |= {hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    seen = _strings(summary) + [
        s for x in (run_dir / "metrics.jsonl").open() for s in _strings(json.loads(x))
    ]
    leaks = sorted({f for s in seen for f in forbidden if f in s})
    assert not leaks, leaks


def test_a_site_path_in_the_run_config_is_refused_without_opening_it(site, tmp_path):
    """The coordinator names a split file (any path at the site): the site refuses before it opens
    anything, and the reason the coordinator gets is a code and a fixed sentence, not the path."""
    site.set_policy("")
    probe = tmp_path / "probe-of-the-sites-disk.json"
    summary, _ = site.run(FEDAVG, **{"split-file": str(probe)})
    assert summary["status"] == "stopped", summary
    assert f"error {ERR_CONFIG}" in summary["reason"] and probe.name not in json.dumps(summary)
    assert any(e["status"] == "error" and e["error_code"] == ERR_CONFIG for e in site.audit())


def test_an_oversized_request_is_refused_under_the_sites_own_limit(site):
    """The site's policy bounds what it decodes, whatever the run config says: the global model
    (far more than 10 kB) is refused unread."""
    site.set_policy("max-request-bytes = 10000\n")
    summary, _ = site.run(FEDAVG)
    assert summary["status"] == "stopped" and f"error {ERR_POLICY}" in summary["reason"], summary
    assert any(e["policy"] == "max-request-bytes" for e in site.audit())


def test_evaluate_requests_beyond_the_sites_policy_are_refused(site):
    """The site answers evaluate requests on its validation split only, and one per run; the run
    still trains, and the coordinator sees the refusals by rule."""
    site.set_policy('[evaluate]\nsplits = ["val"]\nmax-requests-per-run = 1\n')
    before = len(site.audit())
    summary, run_dir = site.run(FEDAVG)
    assert summary["status"] == "completed", summary
    new = site.audit()[before:]
    answered = [e for e in new if e["message_type"] == "evaluate" and e["status"] == "ok"]
    refused = {e["policy"] for e in new if e["message_type"] == "evaluate" and e["status"] == "error"}
    assert len(answered) == 1 and refused == {"evaluate.splits", "evaluate.max-requests-per-run"}, refused
    assert not summary["test"], summary["test"]  # the test split was never scored


def test_a_new_run_cannot_reset_the_sites_privacy_budget(site):
    """DP on the site's answers: the ledger lives in the site's state folder, across runs. After one
    run the site caps its budget at 1.1x what that run spent; the next run (a new run id, a fresh
    state key) would pass the cap, so its uploads are refused and the ledger does not move."""
    site.set_policy("[dp]\nenabled = true\nclip = 1.0\nnoise-multiplier = 4.0\n")
    summary, _ = site.run(DSFEDMED)
    assert summary["status"] == "completed", summary
    ledger = PrivacyLedger(site.state / LEDGER_FILE)
    spent = ledger.total(1e-5)
    assert spent > 0
    # RDP composition is sublinear: a second identical release takes the total to about 1.46x
    cap = 1.1 * spent
    assert ledger.total(1e-5, extra_release=4.0) > cap
    site.set_policy(f"[dp]\nenabled = true\nclip = 1.0\nnoise-multiplier = 4.0\nmax-epsilon = {cap}\n")
    summary, _ = site.run(DSFEDMED)
    assert summary["status"] == "stopped" and f"error {ERR_POLICY}" in summary["reason"], summary
    assert PrivacyLedger(site.state / LEDGER_FILE).total(1e-5) == pytest.approx(spent)
    assert any(e["policy"] == "dp.max-epsilon" for e in site.audit())
