"""`dsfedmed provision`: per-site kits with the right files, permissions and commands, and never the
CA key or another site's key; a kit then passes `dsfedmed preflight site --kit`."""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from flwr.common.config import parse_config_args
from typer.testing import CliRunner

from cli.main import app
from client_app.policy import PERMISSIVE, load_policy
from common.config import parse_node_config
from deploy.certs import KeySpec, make_federation_keys
from deploy.processes import free_port
from ops.provision import KIT_FILES, KitSpec, ProvisionError, provision

runner = CliRunner()


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture
def keys(tmp_path) -> Path:
    out = tmp_path / "keys"
    make_federation_keys(
        out,
        KeySpec(sites=("hospital-1", "hospital-2"), san_hosts=("localhost",), san_ips=("127.0.0.1",)),
        trial_site_keys=True,
    )
    return out


def _provision(keys: Path, out: Path, *args: str):
    return runner.invoke(app, ["provision", "--keys", str(keys), "--out", str(out), *args])


def test_kit_contents_permissions_and_no_foreign_keys(keys, tmp_path):
    out = tmp_path / "kits"
    res = _provision(
        keys, out, "--site", "hospital-1", "--site", "C7", "--superlink-address", "localhost:9092",
        "--data-dir", "/data/{site}", "--model", "C7=segresnet",
    )  # fmt: skip
    # C7 has no public key in the key set: a real site sends one; only a local trial makes it here
    assert res.exit_code != 0 and "no public key" in res.output and "deploy site-key" in res.output
    res = _provision(
        keys, out, "--site", "hospital-1", "--site", "C7", "--superlink-address", "localhost:9092",
        "--data-dir", "/data/{site}", "--model", "C7=segresnet", "--trial-site-keys",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    # C7 was not in the key set: added to it (and reported as new)
    assert "C7" in json.loads((keys / "manifest.json").read_text())["sites"]
    assert (keys / "sites" / "C7" / "node.key").is_file() and "new key" in res.stdout

    secrets = {
        "CA key": (keys / "ca" / "ca.key").read_bytes(),
        "SuperLink key": (keys / "superlink" / "server.key").read_bytes(),
    }
    for site in ("hospital-1", "C7"):
        kit = out / site
        assert sorted(p.name for p in kit.iterdir()) == sorted(KIT_FILES)
        assert _mode(kit) == 0o700 and _mode(kit / "node.key") == 0o600
        assert _mode(kit / "start-supernode.sh") == 0o755 and _mode(kit / "ca.pem") == 0o644
        assert (kit / "ca.pem").read_bytes() == (keys / "ca" / "ca.crt").read_bytes()
        assert (kit / "node.key").read_bytes() == (keys / "sites" / site / "node.key").read_bytes()
        private = load_ssh_private_key((kit / "node.key").read_bytes(), None)
        public = load_ssh_public_key((kit / "node.pub").read_bytes())
        assert private.public_key().public_numbers() == public.public_numbers()
        others = {
            f"{o}'s key": (keys / "sites" / o / "node.key").read_bytes()
            for o in ("hospital-1", "hospital-2", "C7")
            if o != site
        }
        for f in kit.iterdir():
            data = f.read_bytes()
            for what, secret in {**secrets, **others}.items():
                assert secret.strip() not in data, f"{f} holds the {what}"
            if f.name != "node.key":
                assert b"PRIVATE KEY" not in data, f
        meta = json.loads((kit / "kit.json").read_text())
        assert meta["site"] == site and meta["superlink_address"] == "localhost:9092"
        assert meta["ca"]["sha256"] == json.loads((keys / "manifest.json").read_text())["ca"]["sha256"]
        assert meta["ca"]["not_after"] and meta["created"]
        assert meta["site_key"]["ssh_fingerprint"].startswith("SHA256:")
        assert "node.key" not in meta["files"]

    node = parse_node_config(tomllib.loads((out / "C7" / "node-config.toml").read_text()))
    assert node.model == "segresnet" and node.data_dir == "/data/C7" and node.site_name == "C7"
    assert parse_node_config(tomllib.loads((out / "hospital-1" / "node-config.toml").read_text())).model == ""


def test_node_config_policy_and_env_files(keys, tmp_path):
    out = tmp_path / "kits"
    res = _provision(
        keys, out, "--site", "hospital-1", "--data-dir", "/srv/polyps",
        "--install-root", "/opt/dsfedmed", "--superlink-address", "127.0.0.1:8000",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    kit = out / "hospital-1"
    raw = tomllib.loads((kit / "node-config.toml").read_text())
    assert raw == parse_config_args([str(kit / "node-config.toml")])  # what flower-supernode reads
    node = parse_node_config(raw)
    assert node.to_flat() | raw == node.to_flat()
    assert (node.data_dir, node.site_name) == ("/srv/polyps", "hospital-1")
    assert node.state_dir == "/opt/dsfedmed/hospital-1/state"
    assert node.audit_log == "/opt/dsfedmed/hospital-1/state/audit.jsonl"
    assert node.policy_file == "/opt/dsfedmed/hospital-1/policy.toml"

    policy = tomllib.loads((kit / "policy.toml").read_text())
    parsed = load_policy(str(kit / "policy.toml"))  # the ClientApp's own parser: every key known
    # the template is the permissive default, except that evaluation is bounded: no held-out
    # ("all") scoring and at most 100 evaluate requests per run
    assert {k: v for k, v in parsed.model_dump().items() if k != "evaluate"} == {
        k: v for k, v in PERMISSIVE.model_dump().items() if k != "evaluate"
    }
    assert parsed.evaluate.splits == ("val", "test") and parsed.evaluate.max_requests_per_run == 100
    assert policy["allowed-message-types"] == [
        "query.profile",
        "train",
        "evaluate",
        "train.generator",
        "evaluate.pool",
        "train.teacher",
    ]
    assert policy["max-reply-bytes"] == 0 and policy["allow-generator-upload"] is True
    assert policy["dp"] == {
        "enabled": False,
        "clip": 1.0,
        "noise-multiplier": 1.0,
        "delta": 1e-5,
        "max-epsilon": 0.0,
    }

    env = dict(
        ln.split("=", 1)
        for ln in (kit / "site.env").read_text().splitlines()
        if ln and not ln.startswith("#")
    )
    assert env["SITE1_DATA"] == env["SITE_DATA"] == "/srv/polyps"  # docker/compose.yml's name for hospital-1
    assert env["FLWR_VERSION"] == "1.42.0" and env["KIT_DIR"] == "/opt/dsfedmed/hospital-1"
    readme = (kit / "README.md").read_text()
    assert "dsfedmed preflight site --kit /opt/dsfedmed/hospital-1" in readme
    assert "start-supernode.sh" in readme and "dsfedmed audit" in readme and "never copy" in readme


def test_supernode_command_uses_the_kit_paths_and_flower_flags(keys, tmp_path):
    out = tmp_path / "kits"
    res = _provision(keys, out, "--site", "hospital-2", "--superlink-address", "localhost:8000")
    assert res.exit_code == 0, res.output
    kit = (out / "hospital-2").resolve()
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("hospital-2: flower-supernode"))
    cmd = shlex.split(line.split(": ", 1)[1])
    assert cmd[cmd.index("--root-certificates") + 1] == str(kit / "ca.pem")
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(kit / "node.key")
    assert cmd[cmd.index("--node-config") + 1] == str(kit / "node-config.toml")
    assert cmd[cmd.index("--superlink") + 1] == "localhost:8000"

    script = (kit / "start-supernode.sh").read_text()
    assert subprocess.run(["sh", "-n", str(kit / "start-supernode.sh")]).returncode == 0
    lines = [ln for ln in script.splitlines() if ln and not ln.startswith("#")]
    node_line = next(ln for ln in lines if "flower-supernode --superlink localhost:8000" in ln)
    script_cmd = shlex.split(node_line.split("flower-supernode", 1)[1].rstrip("&"))
    assert script_cmd[script_cmd.index("--root-certificates") + 1] == "ca.pem"  # relative to the kit (cd)
    # the SuperNode leaves its tasks to the site's own launcher, which shares its secret and port
    assert script_cmd[script_cmd.index("--isolation") + 1] == "process"
    exec_line = lines[-1]
    assert (
        exec_line.startswith("exec env") and "dsfedmed site exec --allow-list allowed-fabs.txt" in exec_line
    )
    assert (
        "--runtime-api-address 127.0.0.1:9094" in exec_line
        and "--superexec-auth-secret-file exec.secret" in exec_line
    )
    assert (kit / "allowed-fabs.txt").read_text().startswith("# app bundles")
    site_help = subprocess.run(
        [str(Path(sys.executable).parent / "dsfedmed"), "site", "exec", "--help"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "300"},
    ).stdout  # fmt: skip
    for flag in (a for a in shlex.split(exec_line) if a.startswith("--")):
        assert flag in site_help, flag
    # every flag is one Flower 1.42's flower-supernode knows
    help_text = subprocess.run(
        [str(Path(sys.executable).parent / "flower-supernode"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    for flag in (a for a in cmd if a.startswith("--")):
        assert flag in help_text, flag


def test_existing_kit_is_refused_without_overwrite(keys, tmp_path):
    out = tmp_path / "kits"
    assert _provision(keys, out, "--site", "hospital-1").exit_code == 0
    before = (out / "hospital-1" / "kit.json").read_text()
    (out / "hospital-1" / "state").mkdir()  # a site's own state in the kit folder is left alone
    res = _provision(keys, out, "--site", "hospital-2", "--site", "hospital-1")
    assert res.exit_code == 2 and "already holds a kit" in res.output and "--overwrite" in res.output
    assert not (out / "hospital-2").exists()  # nothing written when one kit is refused
    res = _provision(
        keys, out, "--site", "hospital-1", "--overwrite", "--superlink-address", "127.0.0.1:9000"
    )
    assert res.exit_code == 0, res.output
    after = json.loads((out / "hospital-1" / "kit.json").read_text())
    assert (
        after["superlink_address"] == "127.0.0.1:9000"
        and before != (out / "hospital-1" / "kit.json").read_text()
    )
    assert (out / "hospital-1" / "state").is_dir()


def test_bad_inputs_are_refused_with_the_reason(keys, tmp_path):
    res = _provision(tmp_path / "nokeys", tmp_path / "kits", "--site", "a")
    assert res.exit_code == 2 and "holds no key set" in res.output
    assert "no site given" in _provision(keys, tmp_path / "kits").output
    assert "site name" in _provision(keys, tmp_path / "kits", "--site", "../evil").output
    assert (
        "host:port"
        in _provision(keys, tmp_path / "kits", "--site", "a", "--superlink-address", "nohost").output
    )
    assert "unknown model" in _provision(keys, tmp_path / "kits", "--site", "a", "--model", "resnet").output
    with pytest.raises(ProvisionError, match="repeat"):
        provision(keys, tmp_path / "kits", [KitSpec("a"), KitSpec("a")])
    # an address the SuperLink certificate does not name: made, with a warning
    res = _provision(
        keys, tmp_path / "kits", "--site", "hospital-1", "--superlink-address", "sl.example.org:8000"
    )
    assert res.exit_code == 0 and "not a name in the SuperLink certificate" in res.stdout


def test_a_fresh_kit_passes_site_preflight(keys, tmp_path, phantom_folder):
    out = tmp_path / "kits"
    address = f"127.0.0.1:{free_port()}"  # nothing listens: the one blocking problem
    res = _provision(
        keys, out, "--site", "hospital-1", "--data-dir", str(phantom_folder), "--superlink-address", address
    )
    assert res.exit_code == 0, res.output
    kit = out / "hospital-1"
    res = runner.invoke(
        app, ["preflight", "site", "--kit", str(kit), "--image-size", "32", "--format", "json"]
    )
    rows = json.loads(res.stdout)
    assert res.exit_code == 1
    assert [r["check"] for r in rows if r["status"] == "fail"] == ["SuperLink"]
    assert address in next(r for r in rows if r["check"] == "SuperLink")["message"]
    by = {r["check"]: r for r in rows}
    assert by["policy"]["status"] == "ok" and by["CA certificate"]["status"] == "ok"
    assert by["data"]["status"] == "ok" and str(phantom_folder) in by["data"]["message"]
    assert all(r["status"] == "ok" for r in rows if r["check"] == "site key")
    # a CA that is not the kit's, and a key with loose permissions
    other = tmp_path / "other"
    make_federation_keys(other, KeySpec(sites=("x",)), trial_site_keys=True)
    (kit / "ca.pem").write_bytes((other / "ca" / "ca.crt").read_bytes())
    (kit / "node.key").chmod(0o640)
    rows = json.loads(runner.invoke(app, ["preflight", "site", "--kit", str(kit), "--format", "json"]).stdout)
    assert any(
        r["check"] == "CA certificate" and "not the CA this kit was made with" in r["message"] for r in rows
    )
    assert any(
        r["check"] == "site key" and r["status"] == "fail" and "chmod 600" in r["message"] for r in rows
    )
