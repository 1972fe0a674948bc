"""``dsfedmed bench``: run a benchmark profile and write its results, table and plots."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from bench.data import REPO, default_polypgen_root
from bench.profiles import PROFILES
from deploy.processes import stop_children_on_sigterm

bench_app = typer.Typer(
    help="Benchmark DSFedMed against its baselines (README: Benchmark).", no_args_is_help=True
)
console = Console()

ProfileOpt = Annotated[str, typer.Option("--profile", "-p", help=f"one of: {', '.join(PROFILES)}")]
ResultsOpt = Annotated[Path, typer.Option(help="where <profile>.json/.md and plots go")]
WorkOpt = Annotated[
    Path | None, typer.Option(help="run directories, pool, runs.jsonl (default bench/work/<profile>)")
]


def _profile(name: str):
    if name not in PROFILES:
        raise typer.BadParameter(
            f"unknown profile {name!r}; known: {', '.join(PROFILES)}", param_hint="--profile"
        )
    return PROFILES[name]


def _flwr_env() -> None:
    # nothing phones home or installs packages at run time
    for k, v in (
        ("FLWR_TELEMETRY_ENABLED", "0"),
        ("FLWR_DISABLE_UPDATE_CHECK", "1"),
        ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1"),
        ("OMP_WAIT_POLICY", "PASSIVE"),
    ):
        os.environ.setdefault(k, v)


@bench_app.command("list")
def list_profiles() -> None:
    """The profiles, their scale and methods."""
    t = Table("profile", "data", "scale", "seeds", "methods", "ablations")
    for p in PROFILES.values():
        t.add_row(
            p.name,
            f"{p.data} (holdout {p.holdout})",
            f"{p.image_size} px, {p.rounds} rounds, pool {p.pool_size}",
            ",".join(map(str, p.seeds)),
            ", ".join(v.name for v in p.methods),
            ", ".join(v.name for v in p.ablations) or "-",
        )
    console.print(t)


@bench_app.command("run")
def run(
    profile: ProfileOpt = "quick",
    data_root: Annotated[
        Path | None,
        typer.Option(help="PolypGen folder (default ../shared/data/polypgen or $DSFEDMED_POLYPGEN)"),
    ] = None,
    results_dir: ResultsOpt = REPO / "bench" / "results",
    work_dir: WorkOpt = None,
    only: Annotated[str, typer.Option(help="comma-separated variant names to run (default all)")] = "",
    fresh: Annotated[
        bool, typer.Option(help="forget earlier runs of this profile (default: resume)")
    ] = False,
) -> None:
    """Run every method and seed of a profile (resuming where an earlier call stopped), then write
    ``<profile>.json``, ``<profile>.md`` and the plots."""
    _flwr_env()
    from bench.report import aggregate, write_results
    from bench.runner import BenchRunner, measure_inference

    p = _profile(profile)
    work = (work_dir or REPO / "bench" / "work" / p.name).resolve()
    if fresh and (work / "runs.jsonl").exists():
        (work / "runs.jsonl").unlink()
    root = (data_root or default_polypgen_root()) if p.data == "polypgen" else None
    runner = BenchRunner(
        p,
        root,
        work,
        log=lambda m: console.print(f"[bold cyan]bench[/] {m}"),
        only=set(filter(None, only.split(","))) or None,
    )
    with stop_children_on_sigterm():  # a stopped bench stops its SuperLink and sites by PID
        records = runner.run()
    console.print("[bold cyan]bench[/] measuring inference time (batch 1, CPU)")
    timing = measure_inference(p)
    res = aggregate(p, records, timing, runner.split_sizes)
    paths = write_results(res, results_dir.resolve())
    _print_table(res)
    for k, v in paths.items():
        console.print(f"{k}: {v}")


@bench_app.command("report")
def report(profile: ProfileOpt = "quick", results_dir: ResultsOpt = REPO / "bench" / "results") -> None:
    """Print a results file as a table (no runs)."""
    path = results_dir / f"{_profile(profile).name}.json"
    if not path.is_file():
        raise typer.BadParameter(f"{path} does not exist; run `dsfedmed bench run --profile {profile}` first")
    _print_table(json.loads(path.read_text()))


def _print_table(res: dict) -> None:
    t = Table(
        "method",
        "Dice test",
        "Dice held-out",
        "MB total",
        "site ms",
        "FM ms",
        "s",
        title=f"bench {res['profile']}",
    )
    for name, m in res["methods"].items():
        if "dice_test_mean" not in m:
            t.add_row(name, m.get("status", "?"), "", "", "", "", "")
            continue
        std = m.get("dice_test_mean_std")
        t.add_row(
            name,
            f"{m['dice_test_mean']:.3f}" + (f" ± {std:.3f}" if std is not None else ""),
            "n/a" if m["dice_holdout"] is None else f"{m['dice_holdout']:.3f}",
            f"{m['bytes_total'] / 1e6:.2f}",
            f"{m['site_infer_ms']:.1f}",
            "-" if m["fm_infer_ms"] is None else f"{m['fm_infer_ms']:.0f}",
            f"{m['seconds_total']:.0f}",
        )
    console.print(t)
    for b in res.get("bar", []):
        mark = "[green]met[/]" if b["met"] else "[red]missed[/]"
        console.print(f"  {mark} {b['claim']}: {b['value']} (target {b['target']}, margin {b['by']:+})")
