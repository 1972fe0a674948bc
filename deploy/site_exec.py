"""The site's own task launcher: runs ClientApp tasks only from app bundles (FABs) the site allowed.

A SuperNode started with ``--isolation process`` leaves its ClientApp tasks to an executor that
polls its Runtime API. Flower's ``flower-superexec`` runs whatever bundle the coordinator submitted;
this launcher (``dsfedmed site exec``, from the site's own installed package) does what it does with
Flower's own pieces (``RuntimeHttpClient.AcquireTask``, ``pull_task_input``, ``push_message``,
``push_task_output``) and one check first: the task's FAB hash must be on the site's allow-list
(``dsfedmed site allow``), one SHA-256 per line.

- **Allowed**: a child process runs Flower's ``flwr-clientapp`` with the task's token on stdin
  (:mod:`deploy.site_clientapp`), which checks the exact bytes it installs against the list again.
- **Not allowed**: nothing of the bundle is installed or imported. The launcher pulls the task (the
  only way to end it: a claimed task that is never started is handed out again), answers it with an
  error reply (code ``INVALID_FAB``, a fixed sentence), marks it failed, and writes an audit entry.

The FAB a SuperNode serves for a run is stored by the SHA-256 of its bytes and bound to the run id
for the SuperNode's lifetime, so the hash announced with the task is the bundle the child receives;
the child's re-check makes that independent of Flower's internals. Only one executor may poll a
SuperNode: start the SuperNode and this launcher with the same ``--superexec-auth-secret-file``, and
keep its Runtime API on 127.0.0.1. Pinned and tested with Flower 1.42.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("dsfedmed.site_exec")

REFUSED = "this site runs only app bundles on its allow-list; this one is not (ask the site to review it)"
_HASH = re.compile(r"^[0-9a-f]{64}$")
FLOWER_TESTED = "1.42"


class AllowListError(ValueError):
    """The allow-list file or an entry for it is unusable; the message says which and why."""


def read_allow_list(path: str | Path) -> set[str]:
    """The SHA-256 hashes in ``path`` (one per line; ``#`` starts a comment). A missing or malformed
    file is an error, never an empty list that would refuse silently or a partial one."""
    p = Path(path).expanduser()
    try:
        lines = p.read_text().splitlines()
    except OSError as exc:
        raise AllowListError(f"allow-list {p} cannot be read: {exc}") from None
    out = set()
    for n, line in enumerate(lines, 1):
        entry = line.split("#", 1)[0].strip().lower()
        if not entry:
            continue
        if not _HASH.match(entry):
            raise AllowListError(f"allow-list {p} line {n}: {entry!r} is not a SHA-256 (64 hex digits)")
        out.add(entry)
    return out


def fab_hash(source: str | Path) -> str:
    """The hash Flower gives an app bundle: SHA-256 of the ``.fab`` bytes. ``source`` is a hash, a
    ``.fab`` file (``flwr build``), or an app folder (built in memory exactly as ``flwr run`` does)."""
    s = str(source).strip().lower()
    if _HASH.match(s):
        return s
    p = Path(source).expanduser()
    if p.is_file():
        return hashlib.sha256(p.read_bytes()).hexdigest()
    if (p / "pyproject.toml").is_file():
        from flwr.cli.build import build_fab_from_disk

        return hashlib.sha256(build_fab_from_disk(p)).hexdigest()
    raise AllowListError(f"{source}: not a SHA-256, a .fab file or an app folder with pyproject.toml")


def allow(allow_list: str | Path, source: str | Path, note: str = "") -> str:
    """Add ``source``'s hash to the allow-list (made 0600 if new); returns the hash."""
    from common.fileio import atomic_write_text

    h = fab_hash(source)
    p = Path(allow_list).expanduser()
    present = read_allow_list(p) if p.exists() else set()
    if h not in present:
        old = (
            p.read_text()
            if p.exists()
            else "# app bundles (FAB SHA-256) this site runs; `dsfedmed site allow`\n"
        )
        comment = f"  # {note}" if note else ""
        atomic_write_text(p, old.rstrip("\n") + f"\n{h}{comment}\n")
    return h


def _client(address: str, insecure: bool, root_certificates: str | None, interceptors: list):
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=insecure,
        root_certificates=validate_and_resolve_root_certificates(root_certificates, insecure),
        interceptors=interceptors,
        retry_invoker=make_simple_http_retry_invoker(),
    )


def refuse(client, audit_log: str | None, site: str) -> None:
    """End a task whose bundle is not allowed: pull it (nothing is installed), answer with a fixed
    error, mark it failed, and write the site's audit entry."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supernode.runtime import run_clientapp as rc

    context = None
    try:
        message, context, run, _fab = rc.pull_task_input(client)
        reply = Message(Error(code=ErrorCode.INVALID_FAB, reason=REFUSED), reply_to=message)
        if audit_log:
            from client_app.audit import AuditLog

            AuditLog(Path(audit_log)).record(
                message, reply, run_id=run.run_id, site=site, policy="allow-list"
            )
        rc.push_message(client, reply, context)
    finally:
        rc.push_task_output(client, context, SubStatus.FAILED, REFUSED)


def _ended(child: subprocess.Popen | int, token_file: Path | None) -> bool:
    """Whether a task's process (a Popen, or a forked pid) has ended; then its token file goes too."""
    if isinstance(child, int):
        pid, _ = os.waitpid(child, os.WNOHANG)
        if pid == 0:
            return False
    elif child.poll() is None:
        return False
    if token_file is not None:
        shutil.rmtree(token_file.parent, ignore_errors=True)
    return True


def warm_up() -> None:
    """Import what every task needs (torch, MONAI, Flower's runner; not the app itself, which comes
    from the bundle) once, in the launcher, before any thread pool exists: each task is then a fork
    of this process and starts warm. Only libraries the site installed are imported here."""
    import monai  # noqa: F401
    import numpy  # noqa: F401
    import torch  # noqa: F401
    from flwr.supernode.runtime import run_clientapp  # noqa: F401

    import deploy.site_clientapp  # noqa: F401


def _fork_task(address: str, token: str, insecure: bool, certificates: bytes | None) -> int:
    """Run one allowed task in a forked child of the warm launcher; returns its pid."""
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:  # the child: Flower's own runner, installs pinned to the allow-list
        from deploy.site_clientapp import run_task

        run_task(address, token, insecure, certificates, parent)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - a child never returns into the launcher's loop
        logging.getLogger("dsfedmed.site_exec").exception("task process failed")
        code = 1
    finally:
        os._exit(code)


def run(
    runtime_api_address: str,
    allow_list: str | Path,
    *,
    insecure: bool = False,
    root_certificates: str | None = None,
    auth_secret_file: str | None = None,
    parent_pid: int | None = None,
    audit_log: str | None = None,
    site: str = "?",
    poll_s: float = 0.5,
    max_tasks: int | None = None,
    warm: bool = True,
) -> None:
    """Poll the SuperNode for ClientApp tasks and run or refuse each (forever, or ``max_tasks``).
    ``warm``: each task is a fork of this process, which imported the libraries once
    (:func:`warm_up`); else a fresh interpreter per task (what Flower's superexec does)."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
        SuperExecAuthHttpInterceptor,
    )

    read_allow_list(allow_list)  # fail at start on a bad list, not at the first task
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if auth_secret_file:
        from flwr.supercore.auth.superexec_secret import load_superexec_auth_secret

        interceptors.append(
            SuperExecAuthHttpInterceptor(
                master_secret=load_superexec_auth_secret(secret_file=auth_secret_file),
                protected_methods=frozenset({"/flwr.proto.Runtime/AcquireTask"}),
            )
        )
    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    if warm:
        warm_up()
        os.environ["DSFEDMED_ALLOW_LIST"] = str(Path(allow_list).expanduser().resolve())
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    certificates = validate_and_resolve_root_certificates(root_certificates, insecure)
    acquirer = _client(runtime_api_address, insecure, root_certificates, interceptors)
    children: list[tuple[subprocess.Popen | int, Path | None]] = []
    done = 0
    tls = (
        ["--insecure"]
        if insecure
        else (["--root-certificates", root_certificates] if root_certificates else [])
    )
    log.info("site exec: polling %s; allow-list %s", runtime_api_address, allow_list)
    try:
        while max_tasks is None or done < max_tasks:
            children = [c for c in children if not _ended(*c)]
            res = acquirer.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            if not (res.HasField("task") and res.token):
                time.sleep(poll_s)
                continue
            done += 1
            task = res.task
            h = task.fab_hash if task.HasField("fab_hash") else ""
            allowed = read_allow_list(allow_list)  # re-read: the site may change it while running
            if h and h in allowed:
                log.info("run %s task %s: app %s is allowed; starting it", task.run_id, task.task_id, h)
                if warm:
                    children.append(
                        (_fork_task(runtime_api_address, res.token, insecure, certificates), None)
                    )
                    continue
                # the token in a 0600 file of a private folder (not on the command line, where
                # every local user could read it); removed when the task's process ends
                token_file = Path(tempfile.mkdtemp(prefix="dsfedmed-task-")) / "token"
                fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                os.write(fd, res.token.encode())
                os.close(fd)
                cmd = [
                    sys.executable,
                    "-m",
                    "deploy.site_clientapp",
                    "--runtime-api-address",
                    runtime_api_address,
                ]
                cmd += ["--token-file", str(token_file), "--parent-pid", str(os.getpid()), *tls]
                child = subprocess.Popen(
                    cmd,
                    env={**os.environ, "DSFEDMED_ALLOW_LIST": str(Path(allow_list).expanduser().resolve())},
                )
                children.append((child, token_file))
            else:
                log.error(
                    "run %s task %s: app %s is NOT on the allow-list; refused",
                    task.run_id,
                    task.task_id,
                    h or "?",
                )
                token_client = _client(
                    runtime_api_address, insecure, root_certificates,
                    [interceptors[0], RuntimeTokenHttpInterceptor(res.token)],
                )  # fmt: skip
                try:
                    refuse(token_client, audit_log, site)
                except Exception:  # noqa: BLE001 - one bad task must not stop the site's launcher
                    log.exception("could not end refused task %s", task.task_id)
                finally:
                    token_client.close()
    finally:
        acquirer.close()
        for child, token_file in children:
            while not _ended(child, token_file):
                time.sleep(0.2)
