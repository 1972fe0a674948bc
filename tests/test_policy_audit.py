"""Site policy, differential privacy and the audit log, through the real ClientApp handlers."""

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client_app.app import ERR_AUDIT, ERR_CONFIG, ERR_POLICY, app
from client_app.errors import local_detail
from client_app.policy import LogitDP, load_policy
from client_app.privacy import epsilon, privatize_probs
from common import protocol as P
from common.codec import decode_probs
from common.config import ConfigError
from tests.support import DSFEDMED_HANDLER_RUN as RUN
from tests.support import global_weights, train_msg


@pytest.fixture
def site(tmp_path):
    """A context maker for phantom site 0 with a policy file and its own audit log."""

    def make(policy: str = "", audit: str = "", **run):
        node = {"phantom-id": 0, "site-name": "h0", "state-dir": str(tmp_path / "state")}
        if policy:
            (tmp_path / "policy.toml").write_text(policy)
            node["policy-file"] = str(tmp_path / "policy.toml")
        if audit:
            node["audit-log"] = audit
        return Context(run_id=11, node_id=3, node_config=node, state=RecordDict(), run_config={**RUN, **run})

    return make


def _audit(tmp_path):
    return [json.loads(x) for x in (tmp_path / "state" / "audit.jsonl").read_text().splitlines()]


def _gen_msg():
    return Message(
        RecordDict({P.KEY_CONFIG: ConfigRecord({})}), dst_node_id=3, message_type=P.MSG_TRAIN_GENERATOR
    )


def test_every_reply_is_audited_with_its_arrays_and_the_request_config(task_identity, site, tmp_path):
    rep = app(train_msg([0, 2, 4]), site())
    assert not rep.has_error(), rep.error.reason if rep.has_error() else ""
    (entry,) = _audit(tmp_path)
    assert entry["site"] == "h0" and entry["run_id"] == 11 and entry["round"] == 1
    assert entry["message_type"] == P.MSG_TRAIN and entry["status"] == "ok" and entry["policy"] == "ok"
    assert entry["request_config"][P.KEY_CONFIG][P.CFG_SELECTED] == [0, 2, 4]
    assert set(entry["request_config"]["_received_arrays"]) == {P.KEY_POOL, P.KEY_SOFT}
    arrays = {(r["key"], a["name"]): a for r in entry["records"] if r["kind"] == "array" for a in r["arrays"]}
    assert set(arrays) == {(P.KEY_SITE_PROBS, P.ARR_PROBS)}  # the probabilities, nothing else
    probs = rep.content.array_records[P.KEY_SITE_PROBS][P.ARR_PROBS].numpy()
    a = arrays[(P.KEY_SITE_PROBS, P.ARR_PROBS)]
    assert a["shape"] == [6, 1, 16, 16] and a["dtype"] == "uint8"  # an answer on the whole pool
    import hashlib

    assert a["sha256"] == hashlib.sha256(probs.tobytes()).hexdigest()
    assert 0 < entry["array_bytes"] < entry["reply_bytes"]
    metrics = next(r for r in entry["records"] if r["key"] == P.KEY_METRICS)
    assert metrics["kind"] == "metric" and "distill-loss" in metrics["values"]


def test_policy_refuses_generator_upload_before_training(task_identity, site, tmp_path):
    rep = app(_gen_msg(), site(policy="allow-generator-upload = false\n"))
    assert rep.has_error() and rep.error.code == ERR_POLICY
    assert local_detail(rep.error.reason).startswith("policy allow-generator-upload:")
    (entry,) = _audit(tmp_path)
    assert entry["status"] == "error" and entry["policy"] == "allow-generator-upload"
    assert entry["records"] == [] and entry["error_code"] == ERR_POLICY
    assert not (tmp_path / "state" / "run-11").exists() or not any(
        (tmp_path / "state" / "run-11").rglob("*.pt")
    )


@pytest.mark.parametrize(
    "policy, rule",
    [
        ('allowed-message-types = ["query.profile", "evaluate"]\n', "allowed-message-types"),
        ("max-reply-bytes = 100\n", "max-reply-bytes"),
    ],
)
def test_policy_rules_name_themselves(task_identity, site, tmp_path, policy, rule):
    rep = app(train_msg([0, 1]), site(policy=policy))
    assert (
        rep.has_error()
        and rep.error.code == ERR_POLICY
        and f"policy {rule}:" in local_detail(rep.error.reason)
    )
    assert _audit(tmp_path)[-1]["policy"] == rule


def test_policy_refuses_weights_upload(task_identity, site, tmp_path):
    from common.codec import to_array_record

    msg = Message(
        RecordDict(
            {P.KEY_ARRAYS: to_array_record(global_weights()), P.KEY_CONFIG: ConfigRecord({P.CFG_ROUND: 1})}
        ),
        dst_node_id=3,
        message_type=P.MSG_TRAIN,
    )
    rep = app(msg, site(policy="allow-weights-upload = false\n", method="fedavg"))
    assert rep.has_error() and "policy allow-weights-upload:" in local_detail(rep.error.reason)


def test_bad_policy_files_are_config_errors_naming_the_file(task_identity, site, tmp_path):
    rep = app(train_msg([0]), site(policy="max-reply-bytes = -3\n"))
    assert rep.has_error() and rep.error.code == ERR_CONFIG
    assert "policy.toml" in local_detail(rep.error.reason) and "max-reply-bytes" in local_detail(
        rep.error.reason
    )
    assert (
        str(tmp_path) not in rep.error.reason and "policy.toml" not in rep.error.reason
    )  # stays at the site
    with pytest.raises(ConfigError, match="not found"):
        load_policy(str(tmp_path / "missing.toml"))
    (tmp_path / "typo.toml").write_text('allowed-message-types = ["train", "trian"]\n')
    with pytest.raises(ConfigError, match="unknown message type"):
        load_policy(str(tmp_path / "typo.toml"))
    (tmp_path / "extra.toml").write_text("[dp]\nepsilon = 3\n")
    with pytest.raises(ConfigError, match="dp.epsilon"):
        load_policy(str(tmp_path / "extra.toml"))


def test_dp_noises_uploads_and_accounts_epsilon_until_the_cap(task_identity, site, tmp_path):
    eps = [epsilon([2.0] * k, 1e-5) for k in (1, 2, 3)]
    assert 0 < eps[0] < eps[1] < eps[2]  # composition over the run's uploads
    cap = (eps[1] + eps[2]) / 2  # the cap falls after two uploads
    policy = f"[dp]\nenabled = true\nclip = 2.0\nnoise-multiplier = 2.0\ndelta = 1e-5\nmax-epsilon = {cap}\n"
    ctx = site(policy=policy)
    reps = [app(train_msg([0, 1, 2], included="all" if i == 0 else "none"), ctx) for i in range(3)]
    for rep in reps[:2]:
        assert not rep.has_error(), rep.error.reason if rep.has_error() else ""
        # the answer covers the whole pool (6 samples): that is what DP noises and accounts for
        decode_probs(rep.content.array_records[P.KEY_SITE_PROBS][P.ARR_PROBS].numpy(), 6, 16)
    assert reps[2].has_error() and reps[2].error.code == ERR_POLICY
    assert "policy dp.max-epsilon:" in local_detail(reps[2].error.reason)
    ledger = json.loads((tmp_path / "state" / "privacy-ledger.json").read_text())
    assert len(ledger["releases"]) == 2 and ledger["epsilon_total"] == pytest.approx(eps[1])
    assert ledger["releases"][0]["sensitivity"] == pytest.approx(2 * 2.0 * np.sqrt(6))
    # the server sees which answers were noised, and the site's total ε
    m = reps[1].content.metric_records[P.KEY_METRICS]
    assert m[P.MET_DP_EPSILON] == pytest.approx(eps[1])


def test_a_new_run_or_state_key_does_not_reset_the_sites_budget(task_identity, site, tmp_path):
    """The budget belongs to the site's state folder: another Flower run id and another state key
    from the server find the same ledger, spent."""
    one = epsilon([2.0], 1e-5)
    policy = f"[dp]\nenabled = true\nclip = 2.0\nnoise-multiplier = 2.0\nmax-epsilon = {one * 1.01}\n"
    ctx = site(policy=policy)
    assert not app(train_msg([0, 1]), ctx).has_error()
    fresh = Context(
        run_id=99, node_id=3, node_config=ctx.node_config, state=RecordDict(), run_config=ctx.run_config
    )
    req = train_msg([0, 1])
    req.content.config_records["config"][P.CFG_STATE_KEY] = 123456
    rep = app(req, fresh)
    assert rep.has_error() and "(rule dp.max-epsilon)" in rep.error.reason
    assert "over every run" in local_detail(rep.error.reason)
    # a damaged ledger never hands out a fresh budget
    (tmp_path / "state" / "privacy-ledger.json").write_text("{not json")
    rep = app(train_msg([0, 1]), fresh)
    assert rep.has_error() and "ledger" in local_detail(rep.error.reason)


def test_dp_refuses_weights_and_un_noised_generators(task_identity, site):
    """Under [dp] nothing un-noised leaves: weights (hybrid/weights exchange, FedAvg) and a
    generator trained without DP-SGD are refused."""
    policy = "[dp]\nenabled = true\n"
    rep = app(train_msg([0, 1]), site(policy=policy, exchange="hybrid"))
    assert rep.has_error() and "(rule dp.enabled)" in rep.error.reason
    rep = app(_gen_msg(), site(policy=policy))
    assert rep.has_error() and "(rule generator-dp.enabled)" in rep.error.reason


def test_generator_dp_sgd_is_charged_to_the_sites_budget(task_identity, site, tmp_path):
    gen = "[generator-dp]\nenabled = true\nnoise-multiplier = 1.0\nmax-grad-norm = 1.0\n"
    rep = app(_gen_msg(), site(policy=gen))
    assert not rep.has_error(), local_detail(rep.error.reason) if rep.has_error() else ""
    spent = rep.content.config_records[P.KEY_GEN_STATS]["dp_epsilon"]
    ledger = json.loads((tmp_path / "state" / "privacy-ledger.json").read_text())
    assert ledger["generators"][0]["epsilon"] == pytest.approx(spent)
    # a budget below what one more generator costs: trained, but nothing leaves
    capped = gen + f"[dp]\nenabled = true\nmax-epsilon = {spent * 1.5}\n"
    rep = app(_gen_msg(), site(policy=capped))
    assert rep.has_error() and "(rule dp.max-epsilon)" in rep.error.reason


def test_privatize_probs_clips_and_noises():
    import torch

    probs = torch.full((4, 1, 8, 8), 0.9)
    dp = LogitDP(enabled=True, clip=1.0, noise_multiplier=1e-6)
    out = privatize_probs(probs, dp, torch.Generator().manual_seed(0))
    # almost no noise: what is left is the clipped logit map (norm 1 over 64 pixels = 1/8 each)
    assert torch.allclose(out, torch.sigmoid(torch.tensor(1 / 8)), atol=1e-4)
    noisy = privatize_probs(probs, LogitDP(enabled=True, clip=1.0, noise_multiplier=1.0), torch.Generator())
    assert ((noisy >= 0) & (noisy <= 1)).all() and noisy.std() > 0.1


def test_dp_sgd_generator_reports_its_epsilon(task_identity, site):
    policy = "[generator-dp]\nenabled = true\nnoise-multiplier = 1.0\nmax-grad-norm = 1.0\n"
    rep = app(_gen_msg(), site(policy=policy))
    assert not rep.has_error(), rep.error.reason if rep.has_error() else ""
    stats = rep.content.config_records[P.KEY_GEN_STATS]
    assert stats["dp_epsilon"] > 0 and stats["dp_noise_multiplier"] == 1.0


def test_unwritable_audit_log_stops_the_reply(task_identity, site, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    rep = app(train_msg([0]), site(audit=str(blocker / "audit.jsonl")))
    assert rep.has_error() and rep.error.code == ERR_AUDIT and "audit.jsonl" in local_detail(rep.error.reason)
    assert str(tmp_path) not in rep.error.reason and "audit" in rep.error.reason


def test_audit_off(task_identity, site, tmp_path):
    rep = app(train_msg([0]), site(audit="off"))
    assert not rep.has_error()
    assert not (tmp_path / "state" / "audit.jsonl").exists()


def test_deploy_local_refuses_a_policy_for_an_unknown_site_or_a_bad_policy(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app as cli

    res = CliRunner().invoke(
        cli, ["deploy", "local", "--site-policy", "site-9=p.toml", "--work", str(tmp_path)]
    )
    assert res.exit_code == 2 and "site-9" in res.output
    bad = tmp_path / "p.toml"
    bad.write_text("max-reply-bytes = -1\n")
    res = CliRunner().invoke(
        cli, ["deploy", "local", "--site-policy", f"site-0={bad}", "--work", str(tmp_path)]
    )
    assert res.exit_code == 2 and "max-reply-bytes" in res.output, res.output
    assert not (tmp_path / "keys").exists()  # nothing was started or made


def _eval_msg(split: str) -> Message:
    from common.codec import to_array_record
    from common.models import build_model

    w = {k: v.numpy() for k, v in build_model("unet").state_dict().items()}
    return Message(
        RecordDict({P.KEY_ARRAYS: to_array_record(w), P.KEY_CONFIG: ConfigRecord({P.CFG_SPLIT: split})}),
        dst_node_id=3,
        message_type=P.MSG_EVALUATE,
    )


def test_evaluation_is_bounded_by_the_sites_policy(task_identity, site, tmp_path):
    """The server cannot use evaluation as an oracle: splits outside the policy are refused, and a
    run gets at most max-requests-per-run answers; a new Flower run has its own count."""
    policy = '[evaluate]\nsplits = ["val"]\nmax-requests-per-run = 2\n'
    ctx = site(policy=policy, method="fedavg")
    rep = app(_eval_msg("test"), ctx)
    assert rep.has_error() and rep.error.code == ERR_POLICY and "(rule evaluate.splits)" in rep.error.reason
    assert [app(_eval_msg("val"), ctx).has_error() for _ in range(3)] == [False, False, True]
    rep = app(_eval_msg("val"), ctx)
    assert "(rule evaluate.max-requests-per-run)" in rep.error.reason
    assert "run 11 has asked for 4 evaluations" in local_detail(rep.error.reason)
    other_run = Context(
        run_id=12,
        node_id=ctx.node_id,
        node_config=ctx.node_config,
        state=RecordDict(),
        run_config=ctx.run_config,
    )
    assert not app(_eval_msg("val"), other_run).has_error()
    with pytest.raises(ConfigError, match="unknown split"):
        (tmp_path / "bad.toml").write_text('[evaluate]\nsplits = ["train", "holdout"]\n')
        load_policy(str(tmp_path / "bad.toml"))
