"""The ``scale`` benchmark: what the server costs per round as sites are added (issue: many sites).

5, 10, 25 and 50 phantom sites in Flower's simulation runtime on this machine, FedAvg and DSFedMed
(logits), small images and a small model, a few rounds, a phantom pool (no generator stage). Per
site count and method, from the run's own metrics rows (rounds 1..R):

- ``server_cpu_s_per_round``: CPU of the ServerApp's thread per round (waiting for sites costs
  none), and by stage (``server_cpu_s_by_stage``: select, send, aggregate, teacher, evaluate, and the
  previous round's record), from ``server_app/stage_clock.py``;
- ``server_seconds_per_round``: the round's wall time (sites included);
- ``server_peak_mb``: the ServerApp process's resident memory (``flwr-simulation``: the ServerApp is a
  thread in it, the ClientApps run in Ray workers): its high-water mark (the rows' ``server_maxrss_mb``)
  less its RSS when the strategy started (the summary's ``server_rss_baseline_mb``); units measured
  before the high-water mark was recorded used the largest round-end RSS (``server_peak_from``);
  ``simulation_process_growth_mb`` is the same process sampled from outside every 0.5 s, less its
  first sample (imports included);
- ``bytes_per_round_per_site``: both directions, rounds 1..R (one-off uploads such as the pool are in
  round 0 and reported apart as ``bytes_round0_per_site``);
- ``rounds``, ``dropped`` (replies that missed their deadline or sites absent, over the run).

The round deadline grows with the number of sites (each site's time is measured at the smallest
count and multiplied up, with room to spare), so no reply is dropped for the machine's slowness.
One unit per (method, sites), written as it finishes; the table rebuilds from the units.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from pathlib import Path

import psutil

from bench.data import REPO
from bench.flower_sim import flwr_run, simulation_superlink
from common.fileio import atomic_write_text

SITE_COUNTS = (5, 10, 25, 50)
METHODS = {"fedavg": {"method": "fedavg"}, "dsfedmed-logits": {"method": "dsfedmed", "exchange": "logits"}}
ROUNDS = 3
BASE = {
    "image-size": 32,
    "phantom-images-per-site": 8,
    "model": "unet",
    "local-epochs": 1,
    "batch-size": 4,
    "num-rounds": ROUNDS,
    "pool-source": "phantoms",
    "pool-size": 16,
    "logit-size": 16,
    "pool-score-epochs": 0,
    "fm-adapt-epochs": 1,
    "fm-epochs": 1,
    "tensorboard": False,
    "server-threads": 1,  # the ServerApp's torch work stays on its own thread, where it is measured
    "evaluate-every": 1,
}
SECONDS_PER_SITE = 6.0  # a generous bound on one site's train + evaluate here (2 cores shared)


def unit_config(method: str, sites: int, seed: int = 0) -> dict:
    return {
        **BASE,
        **METHODS[method],
        "seed": seed,
        "min-sites": 2,  # a drop is recorded, not fatal
        # every site's reply is waited for: sites run 2 at a time on this machine
        "round-timeout-s": 120.0 + SECONDS_PER_SITE * sites,
        "sampling-deadline-s": 120.0,
    }


class ProcessPeak:
    """Peak RSS of the ``flwr-simulation`` process below ``root`` (sampled every ``every_s``), less
    its first sample (the process before the run's own work)."""

    def __init__(self, root: int, every_s: float = 0.5):
        self.root, self.every_s = root, every_s
        self.first_kb: int | None = None
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        try:
            procs = psutil.Process(self.root).children(recursive=True)
        except psutil.Error:
            return
        for p in procs:
            try:
                if any("flwr-simulation" in part for part in p.cmdline()[:2]):
                    kb = p.memory_info().rss // 1024
                    self.first_kb = kb if self.first_kb is None else self.first_kb
                    self.peak_kb = max(self.peak_kb, kb)
            except psutil.Error:
                continue

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every_s)

    def __enter__(self) -> ProcessPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth_mb(self) -> float | None:
        return None if self.first_kb is None else (self.peak_kb - self.first_kb) / 1024.0


def summarise(run_dir: Path, sites: int) -> dict:
    """A unit's figures from its run directory's metrics rows and summary."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    later = [r for r in rows if r["round"] >= 1]
    stages: dict[str, list[float]] = {}
    for r in later:
        for k, v in (r.get("server_cpu_s") or {}).items():
            stages.setdefault(k, []).append(v)
    return {
        "status": summary.get("status"),
        "rounds": len(later),
        "server_cpu_s_per_round": statistics.mean(r["server_cpu_s_total"] for r in later),
        "server_cpu_s_by_stage": {k: statistics.mean(v) for k, v in sorted(stages.items())},
        "server_seconds_per_round": statistics.mean(r["seconds"] for r in later),
        "bytes_per_round_per_site": statistics.mean((r["bytes_down"] + r["bytes_up"]) / sites for r in later),
        "bytes_round0_per_site": (rows[0]["bytes_down"] + rows[0]["bytes_up"]) / sites,
        "dropped": sum(len(r.get("dropped", [])) for r in rows),
        # the ServerApp's process, measured from inside: its largest end-of-round RSS less its RSS
        # when the strategy started (imports, the FM and the pool already loaded are not counted)
        "server_peak_mb": max(r.get("server_maxrss_mb", r["server_rss_mb"]) for r in rows)
        - summary["server_rss_baseline_mb"],
        "server_peak_from": "high-water mark" if "server_maxrss_mb" in rows[-1] else "round-end RSS",
        "server_rss_baseline_mb": summary["server_rss_baseline_mb"],
        # what the run learned, on the sites' test splits (the floors of the same splits beside it)
        "dice05_test_mean": summary.get("dice05_test_mean"),
        "dice_test_mean": summary.get("dice_test_mean"),
        "dice05_test_round0": summary.get("dice05_test_initial_mean"),
    }


def run_scale(work: Path, out_dir: Path, counts=SITE_COUNTS, methods=tuple(METHODS), log=print) -> dict:
    """Run every (method, sites) unit not yet in ``out_dir/units``; write scale.json and scale.md."""
    units = out_dir / "units" / "scale"
    units.mkdir(parents=True, exist_ok=True)
    with simulation_superlink(work / "flwr-home", REPO) as link:
        for sites in counts:
            for method in methods:
                path = units / f"{method}-n{sites}.json"
                if path.is_file():
                    continue
                cfg = {**unit_config(method, sites), "run-dir": str(work / "runs" / f"{method}-n{sites}")}
                log(f"scale: {method} with {sites} sites")
                t0 = time.time()
                with ProcessPeak(link.pid) as mem:
                    res = flwr_run(link, REPO, cfg, sites, timeout_s=3600)
                rec = {
                    "method": method,
                    "sites": sites,
                    "flower_status": res.status,
                    "seconds_total": time.time() - t0,
                }
                if res.status == "finished:completed":
                    rec.update(summarise(Path(cfg["run-dir"]), sites))
                rec["simulation_process_growth_mb"] = mem.growth_mb  # sampled from outside, imports included
                atomic_write_text(path, json.dumps(rec, indent=1) + "\n")
    for sites in counts:
        scale_floors(sites, units, log)
    return write_results(out_dir)


def scale_floors(sites: int, units: Path, log=print) -> dict:
    """The floors of one site count's splits (untrained, all-foreground, all-background, FM zero-shot),
    computed once with the benchmark's own floor code (bench/floors.py) and kept beside the units."""
    from bench.floors import compute_floors
    from common.config import parse_run_config

    path = units / "floors" / f"n{sites}.json"
    if path.is_file():
        return json.loads(path.read_text())
    log(f"scale: floors of the {sites}-site splits")
    fl = compute_floors(parse_run_config(unit_config("fedavg", sites)), sites, (0,), with_fm=True, log=log)
    out = {
        k: fl[k]["dice05_test_mean"]
        for k in ("untrained", "all-foreground", "all-background", "fm-zero-shot")
    }
    out["best_floor"] = fl["best_floor"]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(out, indent=1) + "\n")
    return out


def refresh_units(work: Path, out_dir: Path) -> int:
    """Re-read every finished unit's figures from its run directory (when it is still in ``work``):
    units written before a figure was added get it without a new run."""
    n = 0
    for path in sorted((out_dir / "units" / "scale").glob("*.json")):
        rec = json.loads(path.read_text())
        run_dir = work / "runs" / f"{rec['method']}-n{rec['sites']}"
        if rec.get("flower_status") == "finished:completed" and (run_dir / "summary.json").is_file():
            rec.update(summarise(run_dir, rec["sites"]))
            atomic_write_text(path, json.dumps(rec, indent=1) + "\n")
            n += 1
    return n


def write_results(out_dir: Path) -> dict:
    """scale.json and scale.md (and scale.png) from whatever units exist."""
    recs = sorted(
        (json.loads(p.read_text()) for p in (out_dir / "units" / "scale").glob("*.json")),
        key=lambda r: (r["method"], r["sites"]),
    )
    floors = {
        int(p.stem[1:]): json.loads(p.read_text())
        for p in (out_dir / "units" / "scale" / "floors").glob("n*.json")
    }
    for r in recs:
        fl = floors.get(r["sites"])
        if fl and r.get("dice05_test_mean") is not None:
            r["at_floor"] = r["dice05_test_mean"] - fl["best_floor"]["dice05_test_mean"] < 0.05
    res = {
        "profile": "scale",
        "floors": {str(k): v for k, v in sorted(floors.items())},
        "scale": {
            "rounds": ROUNDS,
            **{k: BASE[k] for k in ("image-size", "model", "pool-size", "logit-size")},
        },
        "machine": {
            "cpus": psutil.cpu_count(),
            "note": "2 cores shared with other work: wall times are inflated",
        },
        "rows": recs,
        "growth_5_to_50": _growth(recs),
    }
    atomic_write_text(out_dir / "scale.json", json.dumps(res, indent=1) + "\n")
    atomic_write_text(out_dir / "scale.md", render(res))
    try:
        plot(recs, out_dir / "scale.png")
    except Exception as exc:  # noqa: BLE001 - a plot must not lose the table
        print(f"could not draw scale.png: {exc}")
    return res


def _growth(recs: list[dict]) -> dict:
    out = {}
    for method in sorted({r["method"] for r in recs}):
        by = {r["sites"]: r for r in recs if r["method"] == method and r.get("status") == "completed"}
        lo, hi = min(by, default=None), max(by, default=None)
        if lo is None or lo == hi:
            continue
        a, b = by[lo], by[hi]
        out[method] = {
            "sites": [lo, hi],
            "server_cpu_ratio": b["server_cpu_s_per_round"] / max(a["server_cpu_s_per_round"], 1e-9),
            "memory_ratio": (b["server_peak_mb"] or 0) / max(a["server_peak_mb"] or 0, 1e-9),
            "sampled_memory_ratio": (b.get("simulation_process_growth_mb") or 0)
            / max(a.get("simulation_process_growth_mb") or 0, 1e-9),
            "bytes_per_site_change": b["bytes_per_round_per_site"] / a["bytes_per_round_per_site"] - 1,
            "sites_ratio": hi / lo,
        }
    return out


def render(res: dict) -> str:
    lines = [
        "# Benchmark `scale`: the server's cost per round as sites are added",
        "",
        f"Phantom sites in Flower's simulation runtime, {ROUNDS} rounds, {BASE['image-size']} px, model "
        f"`{BASE['model']}`, pool {BASE['pool-size']} (phantoms). {res['machine']['note']}.",
        "Server CPU is the ServerApp thread's own (waiting for sites excluded); memory is the ServerApp "
        "process's largest end-of-round RSS less its RSS when the strategy started.",
        "",
        "| method | sites | server CPU s / round | wall s / round | peak MB (in-process) | process MB (sampled) "
        "| bytes / round / site | dropped |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        if r.get("status") != "completed":
            lines.append(f"| {r['method']} | {r['sites']} | {r.get('flower_status')} | | | | |")
            continue
        peak = (
            "n/a"
            if r["server_peak_mb"] is None
            else f"{r['server_peak_mb']:.0f} ({r.get('server_peak_from', 'round-end RSS')})"
        )
        sampled = r.get("simulation_process_growth_mb")
        lines.append(
            f"| {r['method']} | {r['sites']} | {r['server_cpu_s_per_round']:.2f} | {r['server_seconds_per_round']:.1f} "
            f"| {peak} | {'n/a' if sampled is None else f'{sampled:.0f}'} "
            f"| {r['bytes_per_round_per_site'] / 1e3:.1f} kB | {r['dropped']} |"
        )
    lines += ["", "Server CPU per round by stage (s):", ""]
    stages = sorted({k for r in res["rows"] for k in r.get("server_cpu_s_by_stage", {})})
    lines += ["| method | sites | " + " | ".join(stages) + " |", "|---|---|" + "---|" * len(stages)]
    for r in res["rows"]:
        st = r.get("server_cpu_s_by_stage", {})
        lines.append(
            f"| {r['method']} | {r['sites']} | "
            + " | ".join(f"{st[k]:.3f}" if k in st else "" for k in stages)
            + " |"
        )
    lines += [
        "",
        "What the runs learned, Dice@0.5 on the sites' test splits (threshold-averaged in brackets), with the "
        "floors of the same splits. The profile measures cost: 3 rounds at 32 px on 8 phantom images per "
        "site are not meant to learn much, and a row within 0.05 of the best floor is marked *at the floor*.",
        "",
        "| method | sites | Dice@0.5 test | round 0 | untrained | all-foreground | all-background | FM zero-shot |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        fl = res["floors"].get(str(r["sites"]), {})
        d = r.get("dice05_test_mean")
        mark = " *at the floor*" if r.get("at_floor") else ""
        dice = "n/a" if d is None else f"{d:.3f} ({r.get('dice_test_mean') or float('nan'):.3f}){mark}"
        r0 = r.get("dice05_test_round0")
        lines.append(
            f"| {r['method']} | {r['sites']} | {dice} | {'n/a' if r0 is None else f'{r0:.3f}'} | "
            + " | ".join(
                "n/a" if fl.get(k) is None else f"{fl[k]:.3f}"
                for k in ("untrained", "all-foreground", "all-background", "fm-zero-shot")
            )
            + " |"
        )
    if res["growth_5_to_50"]:
        lines += ["", "Growth from the fewest to the most sites:", ""]
        for m, g in res["growth_5_to_50"].items():
            lines.append(
                f"- {m}: {g['sites'][0]} -> {g['sites'][1]} sites (x{g['sites_ratio']:.0f}): server CPU per round "
                f"x{g['server_cpu_ratio']:.1f}, memory x{g['memory_ratio']:.1f} (sampled process x{g['sampled_memory_ratio']:.1f}), "
                f"bytes per site per round "
                f"{g['bytes_per_site_change']:+.1%}"
            )
    return "\n".join(lines) + "\n"


def plot(recs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for method in sorted({r["method"] for r in recs}):
        rs = [r for r in recs if r["method"] == method and r.get("status") == "completed"]
        xs = [r["sites"] for r in rs]
        axes[0].plot(xs, [r["server_cpu_s_per_round"] for r in rs], marker="o", label=method)
        axes[1].plot(xs, [r["server_peak_mb"] or 0 for r in rs], marker="o", label=method)
    axes[0].set(xlabel="sites", ylabel="server CPU s / round", title="ServerApp thread CPU")
    axes[1].set(xlabel="sites", ylabel="MB", title="simulation process peak (growth)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
