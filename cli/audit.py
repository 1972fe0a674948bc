"""``dsfedmed audit``: what left this site, from its audit log (docs/operations.md, step 4)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.table import Table

from cli.output import fail as _fail
from ops.audit import AuditLogError, data_leaks, read_audit, select, summarise

console = Console()


def _mb(n: int) -> str:
    return f"{n / 1e6:.3f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def _native_sizes(folder: Path) -> set[tuple[int, int]]:
    from PIL import Image

    sizes = set()
    for sub in ("images", "masks"):
        for p in sorted((folder / sub).glob("*")):
            try:
                with Image.open(p) as im:
                    sizes.add((im.height, im.width))
            except OSError:
                continue  # preflight reports unreadable files; here only sizes matter
    return sizes


def audit(
    log: Annotated[
        Path,
        typer.Argument(help="the site's audit log (node config audit-log; default <state-dir>/audit.jsonl)"),
    ],
    run: Annotated[int | None, typer.Option(help="only this run id")] = None,
    site: Annotated[str | None, typer.Option(help="only this site (a log shared by several sites)")] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="the site's data folder: prove no audited array equals or is shaped like one of its images or masks"
        ),
    ] = None,
    image_size: Annotated[int, typer.Option(help="the run's image-size (with --data-dir)")] = 64,
    fmt: Annotated[Literal["text", "json"], typer.Option("--format", help="text tables or JSON")] = "text",
) -> None:
    """Summarise a site's audit log: replies, bytes and refusals per run and round and per message
    type, and every kind of array that left. With --data-dir, check the log against the site's own
    images and masks (exit 1 if any array carries one)."""
    try:
        entries = select(read_audit(log), run, site)
    except AuditLogError as exc:
        raise _fail(str(exc)) from exc
    summary = summarise(entries)
    leaks = []
    if data_dir is not None:
        from common.data import SiteDataError, load_site_folder

        try:
            arrays = load_site_folder(data_dir, image_size)
        except SiteDataError as exc:
            raise _fail(str(exc)) from exc
        leaks = data_leaks(entries, arrays.images, arrays.masks, _native_sizes(Path(data_dir)))
        summary["data_check"] = {
            "data_dir": str(data_dir),
            "images": len(arrays),
            "arrays_checked": sum(len(r.get("arrays", [])) for e in entries for r in e["records"]),
            "problems": [leak.__dict__ for leak in leaks],
        }
    if fmt == "json":
        print(json.dumps(summary, indent=2))
    else:
        _print(summary, leaks)
    if any(leak.blocking for leak in leaks):
        raise typer.Exit(1)


def _print(summary: dict, leaks) -> None:
    if not summary["runs"]:
        console.print("no replies in this audit log (for this selection)")
    for run_id, run in summary["runs"].items():
        t = Table(title=f"run {run_id}: {_mb(run['bytes'])} sent")
        for col in ("round", "replies", "sent", "of which arrays", "errors", "policy refusals", "sites"):
            t.add_column(col)
        for rnd, b in run["rounds"].items():
            t.add_row(
                rnd,
                str(b["replies"]),
                _mb(b["bytes"]),
                _mb(b["array_bytes"]),
                str(b["errors"]),
                str(b["policy_refusals"]),
                ", ".join(b["sites"]),
            )
        console.print(t)
        m = Table("message type", "replies", "sent", "errors", "policy refusals")
        for mtype, b in run["message_types"].items():
            m.add_row(mtype, str(b["replies"]), _mb(b["bytes"]), str(b["errors"]), str(b["policy_refusals"]))
        console.print(m)
    k = Table("message type", "record", "array", "dtype", "ndim", "times", title="arrays that left the site")
    for a in summary["array_kinds"]:
        k.add_row(a["message_type"], a["record"], a["array"], a["dtype"], str(a["ndim"]), str(a["count"]))
    console.print(k)
    if "data_check" in summary:
        dc = summary["data_check"]
        if not leaks:
            console.print(
                f"[green]ok:[/] none of {dc['arrays_checked']} audited arrays equals or is shaped like any "
                f"of the {dc['images']} images or masks in {dc['data_dir']}"
            )
        for leak in leaks:
            tag = "[red]fail:[/]" if leak.blocking else "[yellow]warn:[/]"
            console.print(f"{tag} entry {leak.entry}: {leak.array}: {leak.what}", soft_wrap=True)
