"""``dsfedmed site``: what a hospital runs from its own installed package: the task launcher that
runs only app bundles the site allowed, and the allow-list it reads (docs/security.md)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cli.output import fail as _fail

site_app = typer.Typer(
    help="At a hospital: run ClientApp tasks only from allowed app bundles (docs/security.md).",
    no_args_is_help=True,
)
console = Console()
AllowOpt = Annotated[
    Path, typer.Option("--allow-list", help="the site's allow-list (one FAB SHA-256 per line)")
]


@site_app.command("allow")
def allow_cmd(
    source: Annotated[str, typer.Argument(help="a .fab file, an app folder, or a FAB SHA-256")],
    allow_list: AllowOpt = Path("allowed-fabs.txt"),
    note: Annotated[
        str, typer.Option(help="a comment kept beside the hash (e.g. the version reviewed)")
    ] = "",
) -> None:
    """Allow an app bundle the site has reviewed: its hash goes on the allow-list."""
    from deploy.site_exec import AllowListError, allow

    try:
        h = allow(allow_list, source, note)
    except AllowListError as exc:
        raise _fail(str(exc)) from exc
    console.print(f"allowed {h} in {allow_list}", soft_wrap=True)


@site_app.command("exec")
def exec_cmd(
    allow_list: AllowOpt = Path("allowed-fabs.txt"),
    runtime_api_address: Annotated[
        str, typer.Option(help="the SuperNode's Runtime API (its --host:--port), on this machine")
    ] = "127.0.0.1:9094",
    insecure: Annotated[
        bool, typer.Option(help="plain HTTP to the SuperNode's Runtime API (loopback)")
    ] = True,
    root_certificates: Annotated[str | None, typer.Option(help="CA of a TLS Runtime API")] = None,
    superexec_auth_secret_file: Annotated[
        str | None, typer.Option(help="the secret shared with the SuperNode: only this launcher takes tasks")
    ] = None,
    audit_log: Annotated[
        str | None, typer.Option(help="the site's audit log (refusals are recorded)")
    ] = None,
    site_name: Annotated[str, typer.Option(help="the site's name in audit entries")] = "?",
    parent_pid: Annotated[
        int | None, typer.Option(help="exit when this process (the SuperNode) ends")
    ] = None,
    warm: Annotated[
        bool, typer.Option(help="fork each task from this process, which imported torch/MONAI/Flower once")
    ] = True,
) -> None:
    """Run the SuperNode's ClientApp tasks (start it with --isolation process) from allowed app
    bundles only; any other bundle is refused with an error reply and an audit entry."""
    from deploy.site_exec import AllowListError, run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run(
            runtime_api_address,
            allow_list,
            insecure=insecure and not root_certificates,
            root_certificates=root_certificates,
            auth_secret_file=superexec_auth_secret_file,
            parent_pid=parent_pid,
            audit_log=audit_log,
            site=site_name,
            warm=warm,
        )
    except AllowListError as exc:
        raise _fail(str(exc)) from exc
