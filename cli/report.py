"""``dsfedmed report RUN_DIR``: an HTML + Markdown report of a finished run (docs/reports.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cli.output import fail as _fail
from common.runtime import configure_threads
from ops.configs import read_node_config
from ops.report import ReportError, SiteOptions, write_report

console = Console()


def report(
    run_dir: Annotated[
        Path, typer.Argument(help="the server's run directory (holds metrics.jsonl, summary.json)")
    ],
    out: Annotated[
        Path | None, typer.Option("--out", help="where the report goes (default RUN_DIR/report)")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="html, md or both")] = "both",
    site_node_config: Annotated[
        str | None,
        typer.Option(
            "--site-node-config",
            help='SITE ONLY: this site\'s node config ("data-dir=... site-name=... state-dir=...", as given '
            "to its SuperNode) adds its own validation images with its own model; the report is then for "
            "that site's operator only",
        ),
    ] = None,
    site_state: Annotated[
        Path | None,
        typer.Option("--site-state", help="SITE ONLY: the site's state dir (where its model is kept)"),
    ] = None,
    site_run_id: Annotated[
        int | None, typer.Option(help="SITE ONLY: the Flower run id of the site's model (default: found)")
    ] = None,
    site_images: Annotated[int, typer.Option(min=1, max=64, help="SITE ONLY: validation images shown")] = 8,
    device: Annotated[str, typer.Option(help="SITE ONLY: auto, cpu or cuda")] = "auto",
    threads: Annotated[int, typer.Option(min=0, help="SITE ONLY: CPU threads for torch (0 = default)")] = 0,
) -> None:
    """Write a self-contained HTML/Markdown report of a finished run.

    Run config, Dice and traffic per round, selection, dropped sites, the synthetic pool and the
    final table.
    With --site-node-config or --site-state, the report also shows one site's own validation images
    with its model's predictions. That report is written locally as report-site-<site>.* and is for
    that site's operator only.
    """
    if fmt not in ("html", "md", "both"):
        raise _fail(f"--format must be html, md or both (got {fmt!r})")
    site = None
    if site_node_config is not None or site_state is not None:
        try:
            text = (site_node_config or "").strip()
            is_file = text.endswith(".toml") and Path(text).expanduser().is_file()
            node = read_node_config("" if is_file else text, text if is_file else None)
        except (ReportError, ValueError) as exc:
            raise _fail(f"--site-node-config: {exc}") from exc
        site = SiteOptions(node, site_state, site_run_id, site_images, device)
        if threads:
            configure_threads(threads)
    try:
        written = write_report(run_dir, out, fmt, site)
    except ReportError as exc:
        raise _fail(str(exc)) from exc
    for p in written:
        if p.suffix in (".html", ".md"):
            console.print(f"wrote {p}", soft_wrap=True)
    if site is not None:
        console.print(
            "[bold red]This report holds a site's own images: for that site's operator only; do not share it.[/]"
        )
