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
    seeds: Annotated[
        str, typer.Option(help="comma-separated seeds to run now (default the profile's; e.g. 0 first)")
    ] = "",
    fresh: Annotated[
        bool, typer.Option(help="forget earlier units of this profile (default: resume)")
    ] = False,
    floors: Annotated[
        bool, typer.Option(help="compute the floors unit (untrained, constant, FM zero-shot) first")
    ] = True,
) -> None:
    """Run every method and seed of a profile as resumable units (one JSON file per method and
    seed under ``<results-dir>/units/<profile>/``, written as each finishes), then rebuild
    ``<profile>.json``, ``<profile>.md`` and the plots from whatever units exist."""
    _flwr_env()
    from bench.report import aggregate, write_results
    from bench.runner import BenchRunner, measure_inference

    p = _profile(profile)
    work = (work_dir or REPO / "bench" / "work" / p.name).resolve()
    units = (results_dir / "units" / p.name).resolve()
    if fresh and units.is_dir():
        for f in units.glob("*.json"):
            f.unlink()
    root = (data_root or default_polypgen_root()) if p.data == "polypgen" else None
    runner = BenchRunner(
        p,
        root,
        work,
        log=lambda m: console.print(f"[bold cyan]bench[/] {m}"),
        only=set(filter(None, only.split(","))) or None,
        units_dir=units,
        seeds={int(s) for s in seeds.split(",") if s.strip()} or None,
    )
    with stop_children_on_sigterm():  # a stopped bench stops its SuperLink and sites by PID
        floor_rows = runner.run_floors(with_fm=p.meaningful) if floors else runner.load_floors()
        records = runner.run()
    console.print("[bold cyan]bench[/] measuring inference time (batch 1, CPU)")
    timing = measure_inference(p)
    res = aggregate(p, records, timing, runner.split_sizes, floor_rows)
    paths = write_results(res, results_dir.resolve())
    _print_table(res)
    for k, v in paths.items():
        console.print(f"{k}: {v}")


@bench_app.command("report")
def report(
    profile: ProfileOpt = "quick",
    results_dir: ResultsOpt = REPO / "bench" / "results",
    data_root: Annotated[
        Path | None,
        typer.Option(help="PolypGen folder (for the split sizes; default ../shared/data/polypgen)"),
    ] = None,
    rebuild: Annotated[
        bool, typer.Option(help="rebuild the results from the unit files first (no training runs)")
    ] = True,
    readme: Annotated[
        Path | None, typer.Option(help="also regenerate this README's results block for the profile")
    ] = None,
) -> None:
    """Rebuild ``<profile>.json``/``.md`` and the plots from whatever unit files exist (an
    interrupted benchmark's partial table), then print it."""
    p = _profile(profile)
    path = results_dir / f"{p.name}.json"
    units = (results_dir / "units" / p.name).resolve()
    if rebuild and units.is_dir():
        from bench.report import aggregate, write_results
        from bench.runner import BenchRunner, measure_inference

        root = (data_root or default_polypgen_root()) if p.data == "polypgen" else None
        runner = BenchRunner(p, root, REPO / "bench" / "work" / p.name, log=lambda m: None, units_dir=units)
        runner.split_sizes = None
        runner.base_config()  # the fixed split (its sizes go into the results)
        old = json.loads(path.read_text()) if path.is_file() else {}
        timing = old.get("inference") or measure_inference(p)
        res = aggregate(p, runner.current_records(), timing, runner.split_sizes, runner.load_floors())
        write_results(res, results_dir.resolve())
    if not path.is_file():
        raise typer.BadParameter(f"{path} does not exist; run `dsfedmed bench run --profile {profile}` first")
    res = json.loads(path.read_text())
    _print_table(res)
    if readme is not None:
        from bench.report import update_readme

        if not update_readme(readme, res):
            raise typer.BadParameter(f"{readme} has no '<!-- bench:{p.name}:start/end -->' markers")
        console.print(f"README block for {p.name} regenerated in {readme}")


def _print_table(res: dict) -> None:
    t = Table(
        "row",
        "Dice@0.5 test",
        "Dice@0.5 held-out",
        "Dice test (thr-avg)",
        "MB total",
        "s per unit",
        title=f"bench {res['profile']}" + ("" if res.get("meaningful") else " (mechanics only)"),
    )
    for name, f in res.get("floors", {}).items():
        t.add_row(
            f"[dim]{name}[/]",
            _num(f.get("dice05_test_mean")),
            _num(f.get("dice05_holdout")),
            _num(f.get("dice_test_mean")),
            "0",
            "-",
        )
    for name, m in res["methods"].items():
        if "dice05_test_mean" not in m:
            t.add_row(name, m.get("status", "?"), "", "", "", "")
            continue
        std = m.get("dice05_test_mean_std")
        t.add_row(
            name + (" [red](at the floor)[/]" if m.get("at_floor") else ""),
            _num(m["dice05_test_mean"]) + (f" ± {std:.3f}" if std is not None else ""),
            _num(m["dice05_holdout"]),
            _num(m["dice_test_mean"]),
            f"{m['bytes_total'] / 1e6:.2f}",
            ", ".join(f"{x:.0f}" for x in m.get("seconds_per_unit", [])),
        )
    console.print(t)
    for b in res.get("bar", []):
        mark = "[green]met[/]" if b["met"] else "[red]missed[/]"
        console.print(f"  {mark} {b['claim']}: {b['value']} (target {b['target']}, margin {b['by']:+})")


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


@bench_app.command("startup")
def startup(
    repeats: Annotated[int, typer.Option(help="runs per figure (the median is reported)")] = 3,
    out: Annotated[Path, typer.Option(help="where the JSON goes")] = REPO
    / "bench"
    / "results"
    / "startup.json",
) -> None:
    """CPU a ClientApp message pays before its handler: the floor (torch + Flower + MONAI), a cold
    process per message (Flower's subprocess mode), and a fork of the warm site launcher."""
    from bench.startup import main as measure

    res = measure(out, repeats)
    console.print(
        f"floor {res['floor_cpu_s']:.2f} s, cold {res['clientapp_cold_cpu_s']:.2f} s "
        f"(+{res['clientapp_cold_overhead_cpu_s']:.2f} s over the floor), warm {res['clientapp_warm_cpu_s']:.2f} s "
        f"CPU per message; load average {res['load_average_at_start'][0]:.1f} on {res['cpu_count']} CPUs -> {out}"
    )


@bench_app.command("scale")
def scale(
    sites: Annotated[list[int], typer.Option("--sites", help="site counts to run (repeat)")] = [],  # noqa: B006
    method: Annotated[
        list[str], typer.Option("--method", help="fedavg and/or dsfedmed-logits (repeat)")
    ] = [],  # noqa: B006
    work_dir: Annotated[Path, typer.Option(help="run directories and the SuperLink's home")] = REPO
    / "bench"
    / "work"
    / "scale",
    results_dir: Annotated[Path, typer.Option(help="scale.json/.md/.png and units/scale/")] = REPO
    / "bench"
    / "results",
    report_only: Annotated[bool, typer.Option(help="rebuild the table from the units, run nothing")] = False,
) -> None:
    """Server CPU, memory and bytes per round with 5, 10, 25 and 50 phantom sites (FedAvg and DSFedMed);
    finished units are kept and skipped."""
    from bench.scale import METHODS, SITE_COUNTS, refresh_units, run_scale, write_results

    _flwr_env()
    bad = [m for m in method if m not in METHODS]
    if bad:
        raise typer.BadParameter(
            f"unknown method(s) {bad}; choose from {sorted(METHODS)}", param_hint="--method"
        )
    with stop_children_on_sigterm():
        if report_only:
            refresh_units(work_dir, results_dir)
            res = write_results(results_dir)
        else:
            res = run_scale(
                work_dir,
                results_dir,
                tuple(sites) or SITE_COUNTS,
                tuple(method) or tuple(METHODS),
                console.print,
            )
    console.print((results_dir / "scale.md").read_text())
    console.print(f"json: {results_dir / 'scale.json'} ({len(res['rows'])} unit(s))")
