"""Nothing but the protocol leaves the site: every reply type, answered from a real site folder, is
walked for strings, and none names the folder, a file, or a file's hash; replies that break the
protocol's schema are withheld."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from PIL import Image

from client_app.app import ERR_CONFIG, ERR_INTERNAL, app
from client_app.errors import local_detail
from client_app.outgoing import OutgoingViolation, check_reply
from common import protocol as P
from common.codec import to_array_record
from common.phantoms import phantom_site
from tests.support import global_weights, train_msg

STEMS = [f"mrn4471-doe-jane-{i:03d}" for i in range(12)]
RUN = {"image-size": 32, "local-epochs": 1, "batch-size": 4, "gen-steps": 2, "gen-batch-size": 4}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ward-7-private") / "patients-2026"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    site = phantom_site(3, len(STEMS), 48)
    for stem, img, m in zip(STEMS, site.images, site.masks, strict=True):
        Image.fromarray(img.transpose(1, 2, 0)).save(root / "images" / f"{stem}.png")
        Image.fromarray((m[0] * 255).astype(np.uint8)).save(root / "masks" / f"{stem}.png")
    (root / "images" / "mrn9999-broken.png").write_bytes(b"\x89PNG truncated")  # a reported problem
    return root


def _ctx(folder: Path, tmp_path: Path, **run) -> Context:
    return Context(
        run_id=9,
        node_id=3,
        node_config={
            "data-dir": str(folder),
            "site-name": "hospital-1",
            "state-dir": str(tmp_path / "state"),
            "cache-dir": str(tmp_path / "cache"),
        },
        state=RecordDict(),
        run_config={**RUN, **run},
    )


def _strings(reply: Message) -> list[str]:
    if reply.has_error():
        return [reply.error.reason]
    out: list[str] = []
    for name, rec in reply.content.config_records.items():
        out.append(name)
        for k, v in rec.items():
            out.append(k)
            out.extend(x for x in (v if isinstance(v, list) else [v]) if isinstance(x, str))
    for name, rec in reply.content.metric_records.items():
        out += [name, *rec]
    for name, rec in reply.content.array_records.items():
        out += [name, *rec]
    return out


def _forbidden(folder: Path) -> set[str]:
    names = {folder.name, folder.parent.name, "mrn9999-broken", *STEMS}
    hashes = {hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*.png")}
    return names | hashes | {h[:16] for h in hashes} | {str(folder)}


def _requests() -> list[tuple[str, Message, dict]]:
    def msg(mtype, records):
        return Message(RecordDict(records), dst_node_id=3, message_type=mtype)

    images, masks = phantom_site(50, 6, 32).images, phantom_site(50, 6, 32).masks
    pool = to_array_record({P.ARR_IMAGES: images, P.ARR_MASKS: masks})
    fedavg = {"method": "fedavg"}
    return [
        ("profile", msg(P.MSG_QUERY_PROFILE, {}), fedavg),
        (
            "train",
            msg(
                P.MSG_TRAIN, {P.KEY_ARRAYS: to_array_record(global_weights()), P.KEY_CONFIG: ConfigRecord({})}
            ),
            fedavg,
        ),
        (
            "evaluate",
            msg(
                P.MSG_EVALUATE,
                {
                    P.KEY_ARRAYS: to_array_record(global_weights()),
                    P.KEY_CONFIG: ConfigRecord({P.CFG_SPLIT: "val"}),
                },
            ),
            fedavg,
        ),
        ("generator", msg(P.MSG_TRAIN_GENERATOR, {P.KEY_CONFIG: ConfigRecord({})}), {"method": "dsfedmed"}),
        (
            "pool score",
            msg(P.MSG_EVALUATE_POOL, {P.KEY_CONFIG: ConfigRecord({P.CFG_POOL_ID: "p1"}), P.KEY_POOL: pool}),
            {"method": "dsfedmed", "pool-score-epochs": 1},
        ),
        ("dsfedmed train", train_msg([0, 2]), {"method": "dsfedmed", "logit-size": 16}),
        # failures: a missing pool, a bad request, a config the site cannot run
        (
            "no pool",
            train_msg([0], included="none", pool_id="never-sent"),
            {"method": "dsfedmed", "logit-size": 16},
        ),
        ("bad payload", msg(P.MSG_TRAIN, {P.KEY_CONFIG: ConfigRecord({})}), fedavg),
        ("bad config", msg(P.MSG_QUERY_PROFILE, {}), {"method": "fedavg", "num-rounds": -1}),
    ]


def test_no_reply_names_the_sites_folder_files_or_their_hashes(task_identity, folder, tmp_path):
    forbidden = _forbidden(folder)
    seen_error = seen_ok = 0
    for label, request, run in _requests():
        reply = app(request, _ctx(folder, tmp_path / label.replace(" ", "-"), **run))
        seen_error += reply.has_error()
        seen_ok += not reply.has_error()
        if label in ("profile", "train", "evaluate", "generator", "pool score", "dsfedmed train"):
            assert not reply.has_error(), f"{label}: {local_detail(reply.error.reason)}"
        for s in _strings(reply):
            assert "/" not in s and "\\" not in s, f"{label}: {s!r} holds a path separator"
            hits = [f for f in forbidden if f in s]
            assert not hits, f"{label}: {s!r} names {hits}"
    assert seen_ok == 6 and seen_error == 3
    # the problem is counted in the profile, its file named only in the site's own detail
    prof = app(_requests()[0][1], _ctx(folder, tmp_path, method="fedavg")).content.config_records[
        P.KEY_PROFILE
    ]
    assert prof["n-skipped"] == 1 and "1 x missing mask" in prof["data-report"]


def test_a_reply_outside_the_protocol_is_withheld(task_identity, folder, tmp_path):
    """Whatever a handler puts in its reply, only the protocol's records and safe strings leave."""
    request = Message(RecordDict(), dst_node_id=3, message_type=P.MSG_QUERY_PROFILE)
    ok = app(request, _ctx(folder, tmp_path, method="fedavg"))
    cases = {
        "a path in a field": {"site": str(folder)},
        "a file hash": {"site": hashlib.sha256(b"x").hexdigest()},
        "an extra field": {"data-folder": "x"},
    }
    base = dict(ok.content.config_records[P.KEY_PROFILE])
    for label, change in cases.items():
        rec = ConfigRecord({**base, **change})
        with pytest.raises(OutgoingViolation):
            check_reply(P.MSG_QUERY_PROFILE, Message(RecordDict({P.KEY_PROFILE: rec}), reply_to=request))
            pytest.fail(f"{label} was let through")
    extra = RecordDict({P.KEY_METRICS: MetricRecord({"loss": 1.0}), "debug": ConfigRecord({"x": 1})})
    with pytest.raises(OutgoingViolation, match="not part of a evaluate reply"):
        check_reply(P.MSG_EVALUATE, Message(extra, reply_to=request))
    check_reply(P.MSG_QUERY_PROFILE, ok)  # the real profile passes


def test_a_withheld_reply_becomes_an_internal_error(task_identity, folder, tmp_path, monkeypatch):
    import client_app.app as site_app

    real = site_app.package_versions
    monkeypatch.setattr(site_app, "package_versions", lambda: {**real(), "leak": str(folder)})
    reply = app(
        Message(RecordDict(), dst_node_id=3, message_type=P.MSG_QUERY_PROFILE),
        _ctx(folder, tmp_path, method="fedavg"),
    )
    assert reply.has_error() and reply.error.code == ERR_INTERNAL
    assert str(folder) not in reply.error.reason and "reply withheld" in local_detail(reply.error.reason)


def test_site_state_caches_and_audit_are_private(task_identity, folder, tmp_path):
    """Everything the site writes (decoded-image cache, model, optimiser, audit log) is the owner's:
    folders 0700, files 0600 (the audit log 0640, for an auditors' group)."""
    root = tmp_path / "site-root"
    for label, request, run in _requests()[:3]:
        reply = app(request, _ctx(folder, root, **run))
        assert not reply.has_error(), f"{label}: {local_detail(reply.error.reason)}"
    files = [p for p in root.rglob("*") if p.is_file()]
    assert any(p.name == "audit.jsonl" for p in files) and any(p.suffix == ".npz" for p in files)
    for p in root.rglob("*"):
        mode = p.stat().st_mode & 0o777
        if p.is_dir():
            assert mode & 0o077 == 0, f"{p} is {mode:o}"
        elif p.name == "audit.jsonl":
            assert mode & 0o037 == 0, f"{p} is {mode:o}"
        else:
            assert mode & 0o077 == 0, f"{p} is {mode:o}"


def test_a_deployed_site_refuses_paths_from_the_run_config(task_identity, folder, tmp_path):
    """The coordinator cannot make a deployed site open (or hash) a path it chose: data-root and
    split-file in the run config are refused; the site's own node config may name them. Flower simulation (partition-id, no site folder) keeps using the run config's paths."""
    probe = tmp_path / "probe.json"
    probe.write_text("{}")
    request = Message(RecordDict(), dst_node_id=3, message_type=P.MSG_QUERY_PROFILE)
    for key in ("data-root", "split-file"):
        reply = app(request, _ctx(folder, tmp_path, method="fedavg", **{key: str(probe)}))
        assert reply.has_error() and reply.error.code == ERR_CONFIG, key
        assert str(probe) not in reply.error.reason and key in local_detail(reply.error.reason)
    # fm-checkpoint names the server's FM file: the run goes on, the site never opens it (fedfm sites
    # load their own copy, node config fm-checkpoint)
    assert not app(
        request, _ctx(folder, tmp_path, method="fedavg", **{"fm-checkpoint": str(probe)})
    ).has_error()
    # the site's own split file (node config) is used
    from common.config import parse_node_config, parse_run_config
    from common.sites import load_site
    from common.splits import make_splits

    ctx = _ctx(folder, tmp_path, method="fedavg")
    run, node = parse_run_config(ctx.run_config), parse_node_config(ctx.node_config)
    site, split = load_site(run, node)
    own = make_splits(site.stems, seed=5, site=site.name, val_fraction=0.25, test_fraction=0.25)
    path = tmp_path / "own-split.json"
    path.write_text(json.dumps({site.name: {k: [site.stems[i] for i in v] for k, v in own.items()}}))
    node2 = parse_node_config({**ctx.node_config, "split-file": str(path)})
    assert load_site(run, node2)[1] == own and split != own


def test_the_sites_own_request_bound_holds_whatever_the_run_config(task_identity, folder, tmp_path):
    """Incoming weights are bounded by the site's policy (max-request-bytes), not the server's config."""
    policy = tmp_path / "policy.toml"
    policy.write_text("max-request-bytes = 100000\n")
    ctx = _ctx(folder, tmp_path, method="fedavg")
    ctx.node_config["policy-file"] = str(policy)
    request = Message(
        RecordDict({P.KEY_ARRAYS: to_array_record(global_weights()), P.KEY_CONFIG: ConfigRecord({})}),
        dst_node_id=3,
        message_type=P.MSG_TRAIN,
    )
    reply = app(request, ctx)
    assert reply.has_error() and "(rule max-request-bytes)" in reply.error.reason


def test_a_resized_copy_of_a_site_image_is_caught_and_not_sent(task_identity, folder, tmp_path, monkeypatch):
    """An altered trainer answers with a site image (grey, resized to the logit size, as
    probabilities): the copy is found before the audit log and sending, and an error goes out."""
    import torch
    import torch.nn.functional as F

    import client_app.trainer as trainer
    from client_app.leakcheck import image_copies
    from common.config import parse_node_config, parse_run_config
    from common.sites import load_site

    run = {"method": "dsfedmed", "logit-size": 16}
    ctx = _ctx(folder, tmp_path, **run)
    site, _ = load_site(parse_run_config(ctx.run_config), parse_node_config(ctx.node_config))
    grey = torch.from_numpy(site.images[3:4].astype(np.float32)).mean(dim=1, keepdim=True) / 255.0

    def leaky(self, images):
        return F.interpolate(grey, size=(32, 32), mode="bilinear").repeat(len(images), 1, 1, 1)

    honest = app(train_msg([0, 2]), ctx)
    assert not honest.has_error(), local_detail(honest.error.reason)  # real answers pass the check
    monkeypatch.setattr(trainer.SiteTrainer, "predict_probs", leaky)
    reply = app(train_msg([0, 2], included="none"), ctx)
    assert reply.has_error() and reply.error.code == ERR_INTERNAL
    assert "correlates" in local_detail(reply.error.reason) and "site image 3" in local_detail(
        reply.error.reason
    )
    audit = [json.loads(x) for x in (tmp_path / "state" / "audit.jsonl").read_text().splitlines()]
    assert audit[-1]["status"] == "error" and audit[-1]["records"] == []  # nothing of it left
    # the test itself: a float copy, a uint8 copy and a brightness change all match; noise does not
    img = site.images[5].astype(np.float32).mean(axis=0)
    small = F.interpolate(torch.from_numpy(img)[None, None], size=(16, 16), mode="area")[0, 0].numpy()
    assert image_copies({"f": small[None, None]}, site.images)
    assert image_copies({"u": (small * 0.5 + 20).astype(np.uint8)[None, None]}, site.images)
    assert not image_copies({"n": np.random.default_rng(0).random((4, 1, 16, 16))}, site.images)
