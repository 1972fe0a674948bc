"""The docker-compose trial validates: every service, volume, port, flag and certificate path it
references is real (checked by parsing, always), and `docker compose config` accepts it where a
compose tool is installed."""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from deploy.certs import KeySpec, make_federation_keys
from deploy.processes import BIN
from tests.conftest import REPO

DOCKER = REPO / "docker"
SITES = ("hospital-1", "hospital-2", "hospital-3")
VAR = re.compile(r"\$\{(\w+)(?::([-?])([^}]*))?\}")


def _env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip()
    return out


def _interpolate(obj, env: dict[str, str]):
    if isinstance(obj, dict):
        return {k: _interpolate(v, env) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_interpolate(v, env) for v in obj]
    if isinstance(obj, str):

        def sub(m):
            name, op, arg = m.groups()
            if env.get(name):
                return env[name]
            if op == "?":
                raise KeyError(f"{name}: {arg}")
            return arg if op == "-" else ""

        return VAR.sub(sub, obj)
    return obj


def _flags(command: list[str]) -> list[str]:
    return [c.split("=")[0] for c in command if c.startswith("--")]


def _arg(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


@functools.cache
def _help_flags(tool: str) -> set[str]:
    out = subprocess.run([str(BIN / tool), "--help"], capture_output=True, text=True).stdout
    return set(re.findall(r"(--[a-z0-9-]+)", out))


@pytest.fixture(scope="module")
def compose(tmp_path_factory):
    keys = tmp_path_factory.mktemp("compose") / "keys"
    make_federation_keys(
        keys, KeySpec(sites=SITES, san_hosts=("superlink", "localhost")), trial_site_keys=True
    )
    env = {**_env_file(DOCKER / ".env.example"), "KEYS_DIR": str(keys)}
    base = _interpolate(yaml.safe_load((DOCKER / "compose.yml").read_text()), env)
    gpu = _interpolate(yaml.safe_load((DOCKER / "compose.gpu.yml").read_text()), env)
    return base, gpu, env, keys


def _mounts(service: dict) -> list[tuple[str, str, bool]]:
    out = []
    for v in service.get("volumes", []):
        parts = v.split(":")
        out.append((parts[0], parts[1], len(parts) > 2 and "ro" in parts[2]))
    return out


def _host_path(src: str) -> Path:
    p = Path(src)
    return p if p.is_absolute() else (DOCKER / p).resolve()


def _container_file(service: dict, path: str) -> Path | None:
    """The host file behind a path inside the container, through the service's bind mounts."""
    for src, dst, _ in _mounts(service):
        if path == dst or path.startswith(dst.rstrip("/") + "/"):
            return _host_path(src) / path[len(dst) :].lstrip("/") if path != dst else _host_path(src)
    return None


def test_services_flags_ports_and_certificate_paths(compose):
    base, _, env, keys = compose
    services, volumes = base["services"], set(base["volumes"])
    expected = {"superlink", "superexec-serverapp"} | {f"supernode-{i}" for i in (1, 2, 3)}
    expected |= {f"superexec-clientapp-{i}" for i in (1, 2, 3)}
    assert set(services) == expected

    # SuperLink: TLS with the key set's files, node auth, persistent state, no runtime installs
    link = services["superlink"]
    cmd = link["command"]
    assert set(_flags(cmd)) <= _help_flags("flower-superlink"), set(_flags(cmd)) - _help_flags(
        "flower-superlink"
    )
    for flag, name in (
        ("--ssl-ca-certfile", "ca.crt"),
        ("--ssl-certfile", "server.crt"),
        ("--ssl-keyfile", "server.key"),
    ):
        f = _container_file(link, _arg(cmd, flag))
        assert f is not None and f.is_file() and f == keys / "superlink" / name, (flag, f)
    assert "--enable-supernode-auth" in cmd and "--disable-runtime-dependency-installation" in cmd
    assert "--insecure" not in cmd
    db_dir = str(Path(_arg(cmd, "--database")).parent)
    assert any(src in volumes and dst == db_dir for src, dst, _ in _mounts(link))  # a named volume
    port = _arg(cmd, "--port")
    assert f"{env['SUPERLINK_PORT']}:{port}" in link["ports"]

    ports = {"superlink": port}
    for i, site in enumerate(SITES, start=1):
        node = services[f"supernode-{i}"]
        cmd = node["command"]
        assert set(_flags(cmd)) <= _help_flags("flower-supernode")
        assert _arg(cmd, "--superlink") == f"superlink:{port}" and "--insecure" not in cmd
        ca = _container_file(node, _arg(cmd, "--root-certificates"))
        key = _container_file(node, _arg(cmd, "--auth-supernode-private-key"))
        assert ca == keys / "sites" / site / "ca.crt" and ca.is_file()
        assert key == keys / "sites" / site / "node.key" and key.is_file()
        assert all(ro for *_, ro in _mounts(node))  # keys read-only
        assert f'site-name="{site}"' in _arg(cmd, "--node-config")
        ports[f"supernode-{i}"] = _arg(cmd, "--port")

    # executors: real flags, and each connects to a service and port that exists
    superexec_flags = _help_flags("flower-superexec")
    for name, svc in services.items():
        if not name.startswith("superexec-"):
            continue
        assert set(_flags(svc["command"])) <= superexec_flags, name
        host, _, p = _arg(svc["command"], "--runtime-api-address").partition(":")
        assert host in services and ports[host] == p, name
        dockerfile = Path(svc["build"]["context"]) / svc["build"]["dockerfile"]
        assert (DOCKER / dockerfile).resolve().is_file()
    f = _container_file(
        services["superexec-serverapp"],
        _arg(services["superexec-serverapp"]["command"], "--root-certificates"),
    )
    assert f == keys / "superlink" / "ca.crt"

    # every named volume used is declared; every network used is declared
    for svc in services.values():
        for src, _, _ in _mounts(svc):
            site_data = {env[f"SITE{i}_DATA"] for i in (1, 2, 3)}  # checked in the next test
            assert src in volumes or src in site_data or _host_path(src).exists(), src
        assert set(svc.get("networks", [])) <= set(base["networks"])


def test_each_site_data_is_mounted_read_only_into_that_site_only(compose):
    base, _, env, _ = compose
    data = {f"SITE{i}_DATA": env[f"SITE{i}_DATA"] for i in (1, 2, 3)}
    for name, svc in base["services"].items():
        mounted = [(src, ro) for src, _, ro in _mounts(svc) if src in data.values()]
        m = re.fullmatch(r"superexec-clientapp-(\d)", name)
        if m:
            assert mounted == [(data[f"SITE{m.group(1)}_DATA"], True)], name
            # a hospital's executor is on its own internal network only
            assert (
                svc["networks"] == [f"site-{m.group(1)}"]
                and base["networks"][f"site-{m.group(1)}"]["internal"]
            )
        else:
            assert not mounted, f"{name} must not see any hospital's data"
    for i in (1, 2, 3):  # the defaults in .env.example are real site folders (the shared PolypGen copy)
        if not (_host_path(data[f"SITE{i}_DATA"]) / "images").is_dir():
            pytest.skip("the shared PolypGen data is not on this machine")


def test_gpu_override_reserves_a_gpu_for_existing_executors(compose):
    base, gpu, _, _ = compose
    for name, svc in gpu["services"].items():
        assert name in base["services"] and name.startswith("superexec-")
        dev = svc["deploy"]["resources"]["reservations"]["devices"][0]
        assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]


def test_dockerfile_copies_only_what_exists():
    text = (DOCKER / "superexec.Dockerfile").read_text()
    assert re.search(r"^FROM flwr/superexec:\$\{FLWR_VERSION\}", text, re.M)
    for src in re.findall(r"^COPY (?:--chown=\S+ )?(.+?) \S+$", text, re.M):
        for part in src.split():
            assert (REPO / part).exists(), part


def _compose_tool() -> list[str] | None:
    if (
        shutil.which("docker")
        and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    ):
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_docker_compose_config_accepts_the_files(compose):
    tool = _compose_tool()
    if tool is None:
        pytest.skip("no docker compose / docker-compose here; the parsing tests above still ran")
    _, _, env, keys = compose
    env_file = Path(keys).parent / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    for files in (["compose.yml"], ["compose.yml", "compose.gpu.yml"]):
        args = [*tool, "--env-file", str(env_file)] + [a for f in files for a in ("-f", str(DOCKER / f))]
        res = subprocess.run([*args, "config", "-q"], capture_output=True, text=True, cwd=DOCKER)
        assert res.returncode == 0, res.stderr
