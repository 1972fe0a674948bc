"""A multi-site trial on one machine without Docker: a TLS SuperLink with node authentication,
one SuperNode process per site, ``flwr run`` against it, everything stopped by PID at the end.

What it starts (all on loopback, each in its own session, logs under ``<work>/logs``)::

    flower-superlink   --ssl-{ca-certfile,certfile,keyfile}  --enable-supernode-auth
                       --database <work>/superlink/state.db   --isolation subprocess
                       --disable-runtime-dependency-installation
    flwr supernode register <keys>/sites/<site>/node.pub   (one per site, before it connects)
    flower-supernode   --root-certificates ca.crt  --auth-supernode-private-key node.key
                       --node-config "site-name=... data-dir=... model=..."  --port <free>
                       --isolation process  --superexec-auth-secret-file <site>/superexec.secret
    dsfedmed site exec --allow-list <work>/allowed-fabs.txt  (the site's own launcher: it runs
                       only app bundles on the list; the trial allows the app it runs)
    flwr run <app> dsfedmed-trial --stream --run-config ...     (FLWR_HOME=<work>/flwr-home)

A SuperNode only opens an outbound connection to the SuperLink port, as at a real site.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deploy.certs import SITE_NAME, KeySpec, add_site, make_federation_keys
from deploy.probe import probe_superlink
from deploy.processes import (
    BIN,
    flwr_base_env,
    free_port,
    register_node_key,
    start,
    stop_children_on_sigterm,
    stop_group,
    stream_until,
    toml_value,
    wait_healthy,
)

REPO = Path(__file__).resolve().parents[1]
CONNECTION = "dsfedmed-trial"


class TrialError(RuntimeError):
    """The trial could not be set up or its run did not complete; the message says where."""


class SiteSpec(BaseModel):
    """One hospital of the trial: a name, its data (a folder, or a built-in phantom site), its model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(pattern=SITE_NAME.pattern)]
    data_dir: str = ""
    phantom_id: int | None = Field(None, ge=0)
    model: str = ""
    policy_file: str = ""  # the site's policy (client_app/policy.py); empty = permissive
    registered: bool = True  # False: the SuperNode starts with a key the SuperLink does not know

    @model_validator(mode="after")
    def _one_source(self) -> SiteSpec:
        if bool(self.data_dir) == (self.phantom_id is not None):
            raise ValueError(f"site {self.name!r}: give exactly one of data_dir and phantom_id")
        if self.data_dir and not Path(self.data_dir).expanduser().is_dir():
            raise ValueError(f"site {self.name!r}: data folder {self.data_dir!r} does not exist")
        if self.policy_file:
            from client_app.policy import load_policy

            load_policy(self.policy_file)  # a missing or invalid policy stops the trial before it starts
        return self

    def node_config(self, state_dir: Path) -> str:
        items = {"site-name": self.name, "state-dir": str(state_dir)}
        if self.data_dir:
            items["data-dir"] = str(Path(self.data_dir).expanduser().resolve())
        else:
            items["phantom-id"] = self.phantom_id
        if self.model:
            items["model"] = self.model
        if self.policy_file:
            items["policy-file"] = str(Path(self.policy_file).expanduser().resolve())
        return " ".join(f"{k}={toml_value(v)}" for k, v in items.items())


class TrialConfig(BaseModel):
    """Everything one local trial needs; made once by the CLI (or a test)."""

    model_config = ConfigDict(extra="forbid")

    sites: list[SiteSpec]
    work_dir: Path
    keys_dir: Path | None = None  # default <work_dir>/keys; made if missing
    app_dir: Path = REPO
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535)  # 0 = a free port
    run_config: dict = Field(default_factory=dict)
    timeout_s: float = Field(3600.0, gt=0)
    # how often a SuperNode retries a lost SuperLink before it gives up (a refused key fails fast;
    # a trial that restarts its SuperLink wants more)
    supernode_max_retries: int = Field(3, ge=1)
    # each site runs its tasks through its own launcher (`dsfedmed site exec`), which runs only app
    # bundles on the allow-list; None = allow exactly the app this trial runs (app_dir)
    pin_app: bool = True
    allowed_fabs: list[str] | None = None

    @model_validator(mode="after")
    def _unique_sites(self) -> TrialConfig:
        names = [s.name for s in self.sites]
        if not names:
            raise ValueError("a trial needs at least one site")
        if len(set(names)) != len(names):
            raise ValueError(f"site names repeat: {names}")
        return self

    @property
    def keys(self) -> Path:
        return self.keys_dir or self.work_dir / "keys"


@dataclass
class TrialResult:
    run_id: str
    status: str
    details: str
    run_dir: Path
    node_ids: dict[str, int]
    logs: Path
    output: str = ""

    @property
    def completed(self) -> bool:
        return self.status == "finished:completed"


@dataclass
class LocalTrial:
    """Start, run and stop one trial. Use as a context manager (or call :meth:`stop`)."""

    cfg: TrialConfig
    echo: Callable[[str], None] = print
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    node_ids: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.work = self.cfg.work_dir.resolve()
        self.keys = self.cfg.keys.expanduser().resolve()  # processes start in other directories
        self.logs = self.work / "logs"
        self.flwr_home = self.work / "flwr-home"
        self.port = self.cfg.port or free_port()
        self.address = f"{self.cfg.host}:{self.port}"
        self.env = flwr_base_env(self.flwr_home)

    # --- set-up ------------------------------------------------------------------------------
    def ensure_keys(self) -> Path:
        keys, names = self.keys, [s.name for s in self.cfg.sites]
        if not (keys / "manifest.json").is_file():
            self.echo(f"making a CA, a SuperLink certificate and {len(names)} site keys in {keys}")
            make_federation_keys(  # a trial on one machine: its sites' private keys are made here
                keys,
                KeySpec(sites=tuple(names), san_hosts=("localhost",), san_ips=(self.cfg.host,)),
                trial_site_keys=True,
            )
        for name in names:
            if not (keys / "sites" / name / "node.key").is_file():
                add_site(keys, name, trial_private_key=True)
        return keys

    def _write_flwr_config(self, ca: Path) -> None:
        shutil.rmtree(self.flwr_home, ignore_errors=True)  # throw-away: no stale connections
        self.flwr_home.mkdir(parents=True)
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "{self.address}"\nroot-certificates = "{ca}"\n'
        )

    def start_superlink(self) -> None:
        keys = self.ensure_keys()
        ca = keys / "superlink" / "ca.crt"
        self._write_flwr_config(ca)
        state = self.work / "superlink"
        state.mkdir(parents=True, exist_ok=True)
        log = self.logs / "superlink.log"
        cmd = [
            str(BIN / "flower-superlink"),
            "--ssl-ca-certfile", str(ca),
            "--ssl-certfile", str(keys / "superlink" / "server.crt"),
            "--ssl-keyfile", str(keys / "superlink" / "server.key"),
            "--enable-supernode-auth",
            "--database", str(state / "state.db"),
            "--isolation", "subprocess",
            "--disable-runtime-dependency-installation",
            "--host", self.cfg.host,
            "--port", str(self.port),
        ]  # fmt: skip
        self.echo(f"SuperLink on https://{self.address} (TLS, node authentication), log {log}")
        self.procs["superlink"] = start(cmd, log, self.env, cwd=self.work)
        wait_healthy(self.procs["superlink"], f"https://{self.address}/health", log, cafile=str(ca))

    def register(self, site: SiteSpec) -> int:
        pub = self.keys / "sites" / site.name / "node.pub"
        try:
            node_id = register_node_key(pub, site.name, CONNECTION, self.env)
        except RuntimeError as exc:
            raise TrialError(str(exc)) from exc
        self.node_ids[site.name] = node_id
        return node_id

    def allow_list(self) -> Path:
        """The trial's allow-list: the app it runs (or ``cfg.allowed_fabs``), written once."""
        from deploy.site_exec import allow

        path = self.work / "allowed-fabs.txt"
        if not path.exists():
            for source in (
                self.cfg.allowed_fabs if self.cfg.allowed_fabs is not None else [str(self.cfg.app_dir)]
            ):
                allow(path, source, note="allowed by the local trial")
            if not path.exists():  # an empty list: every bundle is refused
                path.write_text("# nothing allowed\n")
        return path

    def start_supernode(self, site: SiteSpec) -> None:
        keys = self.keys
        probe = probe_superlink(self.address, keys / "sites" / site.name / "ca.crt")
        if not probe.ok:
            raise TrialError(f"site {site.name}: {probe.message}")
        state = self.work / "sites" / site.name
        state.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"supernode-{site.name}.log"
        port = free_port()
        cmd = [
            str(BIN / "flower-supernode"),
            "--superlink", self.address,
            "--root-certificates", str(keys / "sites" / site.name / "ca.crt"),
            "--auth-supernode-private-key", str(keys / "sites" / site.name / "node.key"),
            "--node-config", site.node_config(state / "state"),
            "--host", "127.0.0.1",
            "--port", str(port),
            "--max-retries", str(self.cfg.supernode_max_retries),
        ]  # fmt: skip
        if self.cfg.pin_app:
            secret = state / "superexec.secret"
            if not secret.exists():
                fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                os.write(fd, os.urandom(32).hex().encode())
                os.close(fd)
            cmd += ["--isolation", "process", "--superexec-auth-secret-file", str(secret)]
        else:
            cmd += ["--isolation", "subprocess"]
        self.echo(f"SuperNode {site.name} ({site.data_dir or f'phantom site {site.phantom_id}'}), log {log}")
        node = self.procs[f"supernode-{site.name}"] = start(cmd, log, self.env, cwd=state)
        if self.cfg.pin_app:
            exec_cmd = [
                str(BIN / "dsfedmed"), "site", "exec",
                "--allow-list", str(self.allow_list()),
                "--runtime-api-address", f"127.0.0.1:{port}",
                "--superexec-auth-secret-file", str(state / "superexec.secret"),
                "--audit-log", str(state / "state" / "audit.jsonl"),
                "--site-name", site.name,
                "--parent-pid", str(node.pid),
            ]  # fmt: skip
            self.procs[f"exec-{site.name}"] = start(
                exec_cmd, self.logs / f"exec-{site.name}.log", self.env, cwd=state
            )

    def start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.start_superlink()
        for site in self.cfg.sites:
            if site.registered:
                self.echo(f"registered {site.name} as node {self.register(site)}")
            self.start_supernode(site)

    def wait_online(self, timeout_s: float = 120) -> None:
        """Until every registered site's SuperNode is online at the SuperLink (``flwr supernode list``)."""
        want = {
            str(self.node_ids[s.name]) for s in self.cfg.sites if s.registered and s.name in self.node_ids
        }
        deadline = time.monotonic() + timeout_s
        while True:
            res = self.flwr("supernode", "list", CONNECTION, "--format", "json")
            try:
                nodes = json.loads(res.stdout)["nodes"]
            except (ValueError, KeyError):
                nodes = []
            online = {str(n["node-id"]) for n in nodes if n.get("status") == "online"}
            if want <= online:
                return
            if time.monotonic() > deadline:
                raise TrialError(f"sites not online after {timeout_s:.0f} s: nodes {sorted(want - online)}")
            time.sleep(1)

    # --- the run -----------------------------------------------------------------------------
    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "flwr"), *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def run(self, run_config: dict | None = None) -> TrialResult:
        """``flwr run`` against the trial's SuperLink, streaming its output; returns the final status."""
        run_dir = self.work / "run"
        cfg = {
            "min-sites": len([s for s in self.cfg.sites if s.registered]),
            **self.cfg.run_config,
            **(run_config or {}),
        }
        cfg.setdefault("run-dir", str(run_dir))
        run_dir = Path(cfg["run-dir"])
        overrides = " ".join(f"{k}={toml_value(v)}" for k, v in cfg.items())
        cmd = [
            str(BIN / "flwr"),
            "run",
            str(self.cfg.app_dir),
            CONNECTION,
            "--stream",
            "--run-config",
            overrides,
        ]
        lines: list[str] = []
        proc = subprocess.Popen(
            cmd,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.procs["flwr-run"] = proc
        deadline = time.monotonic() + self.cfg.timeout_s
        assert proc.stdout is not None
        timed_out = stream_until(
            proc, deadline, lambda line: (lines.append(line), self.echo(line.rstrip("\n")))
        )
        proc.wait()
        out = "".join(lines)
        m = re.search(r"Successfully started run (\d+)", out)
        if not m:
            raise TrialError(f"flwr run did not start a run (exit {proc.returncode}):\n{out[-3000:]}")
        if timed_out:  # the run itself goes on in the SuperLink unless it is stopped too
            self.flwr("stop", m.group(1), CONNECTION)
            self.echo(
                f"run {m.group(1)} stopped: it passed the trial's timeout of {self.cfg.timeout_s:.0f} s"
            )
        status, details = self.run_status(m.group(1))
        return TrialResult(m.group(1), status, details, run_dir, dict(self.node_ids), self.logs, out)

    def run_status(self, run_id: str, wait_s: float = 60) -> tuple[str, str]:
        """The run's final status from the SuperLink (``flwr run`` exits 0 even when a run fails)."""
        deadline = time.monotonic() + wait_s
        while True:
            res = self.flwr("list", CONNECTION, "--format", "json")
            try:
                run = next(r for r in json.loads(res.stdout)["runs"] if r["run-id"] == run_id)
            except (ValueError, KeyError, StopIteration) as exc:
                raise TrialError(f"cannot read run {run_id}'s status:\n{res.stdout}{res.stderr}") from exc
            if run["status"].startswith("finished") or time.monotonic() > deadline:
                return run["status"], run.get("status-details", "")
            time.sleep(1)

    # --- faults (what the chaos tests do to a running trial) --------------------------------
    def kill(self, key: str) -> None:
        """SIGKILL one of the trial's processes and its group (``superlink``, ``supernode-<site>``):
        a crash, not a shutdown."""
        keys = [key] + ([f"exec-{key.removeprefix('supernode-')}"] if key.startswith("supernode-") else [])
        for k in keys:  # a site's launcher goes with its SuperNode
            proc = self.procs.pop(k, None)
            if proc is None:
                continue
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)

    def restart_site(self, name: str) -> None:
        """Start a site's SuperNode again (same key, same node config, same state folder)."""
        self.start_supernode(next(s for s in self.cfg.sites if s.name == name))

    def restart_superlink(self) -> None:
        """Start the SuperLink again on the same port and state database; SuperNodes reconnect."""
        self.start_superlink()

    # --- tear-down ---------------------------------------------------------------------------
    def stop_site(self, name: str) -> None:
        for key in (f"exec-{name}", f"supernode-{name}"):
            proc = self.procs.pop(key, None)
            if proc is not None:
                stop_group(proc, grace_s=5)

    def stop(self) -> None:
        """Stop every process this trial started, by PID: SuperNodes first, then the SuperLink."""
        for key in sorted(self.procs, key=lambda k: k == "superlink"):
            stop_group(self.procs[key], grace_s=10)
        self.procs.clear()

    def __enter__(self) -> LocalTrial:
        self._guard = stop_children_on_sigterm()  # a stopped launcher stops its processes
        self._guard.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            self._guard.__exit__(None, None, None)
