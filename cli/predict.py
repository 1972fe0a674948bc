"""``dsfedmed predict``: segment a folder of images with a site's trained model (docs/reports.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from cli.output import fail as _fail
from common.runtime import configure_threads
from ops.predict import PredictError, list_images, load_model, load_site_model, predict_folder

console = Console()


def predict(
    images: Annotated[Path, typer.Option("--images", help="folder of images to segment")],
    out: Annotated[Path, typer.Option("--out", help="where masks, overlays and predictions.json go")],
    state_dir: Annotated[
        Path | None, typer.Option("--state-dir", help="the site's state dir (node config state-dir)")
    ] = None,
    site: Annotated[str | None, typer.Option("--site", help="the site's name (with --state-dir)")] = None,
    run_id: Annotated[
        int | None, typer.Option("--run-id", help="Flower run id of the model (default: the latest run)")
    ] = None,
    weights: Annotated[
        Path | None,
        typer.Option("--weights", help="a model.pt or a server checkpoint instead of --state-dir"),
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="network name (default: from model.json, else unet)")
    ] = None,
    image_size: Annotated[
        int | None, typer.Option("--image-size", help="input size (default: from model.json, else 64)")
    ] = None,
    threshold: Annotated[float, typer.Option(help="probability threshold for the mask")] = 0.5,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda")] = "auto",
    threads: Annotated[int, typer.Option(min=0, help="CPU threads for torch (0 = torch's default)")] = 0,
) -> None:
    """Segment a folder of images with a site's trained model.

    Writes <name>_mask.png (0/255, at the image's own size), <name>_overlay.png and
    predictions.json. Exit code 1 if an image could not be read (the others are still written),
    2 if the model cannot be used.
    """
    if weights is not None and (state_dir is not None or site is not None):
        raise _fail("give either --weights or --state-dir with --site, not both")
    if weights is None and (state_dir is None or site is None):
        raise _fail("give --state-dir and --site (the site's own model), or --weights")
    if threads:
        configure_threads(threads)
    try:
        if weights is not None:
            sm = load_model(weights, model, image_size)
        else:
            sm = load_site_model(state_dir, site, run_id, model=model, image_size=image_size)
        files = list_images(images)
    except PredictError as exc:
        raise _fail(str(exc)) from exc
    where = f"run {sm.meta['run-id']}, " if "run-id" in sm.meta else ""
    console.print(f"model {sm.name} at {sm.image_size} px ({where}{sm.source})", soft_wrap=True)
    for n in sm.notes:
        console.print(f"[yellow]note:[/] {n}", soft_wrap=True)
    progress = Progress(
        TextColumn("[bold]segmenting"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.description}"),
        console=console,
    )
    with progress:
        task = progress.add_task("", total=len(files))
        try:
            res = predict_folder(
                sm,
                images,
                out,
                threshold,
                device,
                on_image=lambda f: progress.update(task, advance=1, description=f.name),
                files=files,
            )
        except PredictError as exc:
            raise _fail(str(exc)) from exc
    console.print(f"{len(res.images)} image(s) segmented; summary {res.summary_path}", soft_wrap=True)
    if res.failed:
        t = Table("skipped file", "why", title=f"{len(res.failed)} image(s) could not be read")
        for f in res.failed:
            t.add_row(f["file"], f["reason"])
        console.print(t)
        raise typer.Exit(1)
