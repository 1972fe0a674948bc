"""``dsfedmed preflight``: is a hospital site, or the coordinating server, ready for a run?

Exit code 0 when no check fails, 1 when one does (a blocking problem), 2 for bad usage.
docs/operations.md, section 2."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cli.output import fail as _fail
from ops.preflight import GIB, MIB, Check, ServerInputs, SiteInputs, Thresholds, failed

preflight_app = typer.Typer(
    help="Check a hospital site or the server before a run (docs/operations.md).", no_args_is_help=True
)
console = Console()
STYLE = {"ok": "green", "warn": "yellow", "fail": "red"}


class Format(StrEnum):
    text = "text"
    json = "json"


def report(checks: list[Check], fmt: Format) -> None:
    """Print the checks (a table, then one full line per problem; or a JSON list) and exit 1 on a fail."""
    if fmt is Format.json:
        typer.echo(json.dumps([c.to_json() for c in checks], indent=1))
    else:
        t = Table("check", "status")
        t.add_column("message", overflow="fold")
        for c in checks:
            t.add_row(escape(c.check), f"[{STYLE[c.status]}]{c.status}[/]", escape(c.message))
        console.print(t)
        problems = [c for c in checks if c.status != "ok"]
        for c in problems:  # unwrapped, so each can be copied and searched
            console.print(
                f"[{STYLE[c.status]}]{c.status}[/] {escape(c.check)}: {escape(c.message)}", soft_wrap=True
            )
        n_fail = sum(c.status == "fail" for c in checks)
        verdict = "[red]not ready[/]" if n_fail else "[green]ready[/]"
        console.print(
            f"{verdict}: {n_fail} fail, {len(problems) - n_fail} warn, {len(checks) - len(problems)} ok"
        )
    if failed(checks):
        raise typer.Exit(1)


FormatOpt = Annotated[Format, typer.Option("--format", help="text (a table) or json (a list of rows)")]
DiskWarnOpt = Annotated[float, typer.Option(help="warn when less disk than this is free (GiB)")]
DiskFailOpt = Annotated[float, typer.Option(help="fail when less disk than this is free (MiB)")]


@preflight_app.command("site")
def site(
    node_config: Annotated[
        str, typer.Option(help="the SuperNode's node config, as for flower-supernode --node-config")
    ] = "",
    node_config_file: Annotated[
        Path | None, typer.Option(help="the node config as a TOML file (a kit's node-config.toml)")
    ] = None,
    kit: Annotated[
        Path | None,
        typer.Option(
            help="a site kit from `dsfedmed provision`: its node config, CA, key and SuperLink address"
        ),
    ] = None,
    superlink: Annotated[str, typer.Option(help="the SuperLink's HOST:PORT, as this site reaches it")] = "",
    root_certificates: Annotated[Path | None, typer.Option(help="the federation's CA certificate")] = None,
    auth_key: Annotated[Path | None, typer.Option(help="this site's private key (node.key)")] = None,
    image_size: Annotated[int, typer.Option(help="the run's image-size")] = SiteInputs.image_size,
    fmt: FormatOpt = Format.text,
    disk_warn_gib: DiskWarnOpt = 2.0,
    disk_fail_mib: DiskFailOpt = 200.0,
    expiry_warn_days: Annotated[
        int, typer.Option(help="warn when the CA expires within this many days")
    ] = 30,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the SuperLink")] = 5.0,
) -> None:
    """Data folder (every file), model, device, packages, disk, CA certificate, site key and the
    SuperLink connection of one hospital site."""
    from ops.preflight import site_preflight

    if node_config and node_config_file:
        raise _fail("give --node-config or --node-config-file, not both")
    if kit is not None and not kit.is_dir():
        raise _fail(f"kit folder {kit} does not exist")
    given = dict(
        node_config=node_config,
        node_config_file=node_config_file,
        superlink=superlink,
        root_certificates=root_certificates,
        auth_key=auth_key,
        image_size=image_size,
        limits=Thresholds(int(disk_warn_gib * GIB), int(disk_fail_mib * MIB), expiry_warn_days),
        timeout=timeout,
    )
    inp = SiteInputs.from_kit(kit, **given) if kit is not None else SiteInputs(**given)
    report(site_preflight(inp), fmt)


@preflight_app.command("server")
def server(
    run_config: Annotated[
        str, typer.Option(help="run config overrides, as for `flwr run --run-config`")
    ] = "",
    app: Annotated[
        Path, typer.Option(help="the Flower app whose pyproject.toml holds the run config defaults")
    ] = Path("."),
    runs_root: Annotated[str, typer.Option(help="where run directories go (default: the run config's)")] = "",
    pool_dir: Annotated[str, typer.Option(help="the pool cache folder (default: the run config's)")] = "",
    build_fm: Annotated[
        bool, typer.Option(help="also load the FM's weights into the model (SAM takes a minute)")
    ] = False,
    fmt: FormatOpt = Format.text,
    disk_warn_gib: DiskWarnOpt = 2.0,
    disk_fail_mib: DiskFailOpt = 200.0,
) -> None:
    """Run config, FM checkpoint (hash-checked), pool cache, disk at runs-root, packages and device
    of the coordinating site."""
    from ops.preflight import server_preflight

    inp = ServerInputs(
        run_config=run_config,
        app_dir=app,
        runs_root=runs_root,
        pool_dir=pool_dir,
        build_fm=build_fm,
        limits=Thresholds(int(disk_warn_gib * GIB), int(disk_fail_mib * MIB)),
    )
    report(server_preflight(inp), fmt)
