"""Aggregate benchmark runs over seeds into ``<profile>.json``, ``<profile>.md`` and plots, and
judge the issue's bar (the paper's claims) with the seed spread in view."""

from __future__ import annotations

import json
import platform
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from bench.profiles import METHOD_NOTES, Profile
from common.fileio import atomic_write_text
from server_app.rundir import json_safe

FED_MB_METHODS = ("fedavg", "fedfm", "fedfm-decoder", "dsfedmed-logits", "dsfedmed-weights")
FM_METHODS = ("fedfm", "fedfm-decoder", "dsfedmed-logits", "dsfedmed-weights")
GEN_METHODS = ("dsfedmed-logits", "dsfedmed-weights")  # their pool comes from site generators


def _stats(vals: list) -> tuple[float | None, float | None]:
    v = [float(x) for x in vals if x is not None and np.isfinite(x)]
    if not v:
        return None, None
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else None)


def generator_bytes(records: list[dict], gen_variants: set[str]) -> float | None:
    """The one-off generator exchange (every site uploads its diffusion generator) that every
    DSFedMed run of a profile shares through the reused pool: the pool stage's round-0 traffic
    minus a reusing DSFedMed run's round 0 (both also hold profiling and the round-0 evaluation)."""
    pool = next((r for r in records if r.get("variant") == "pool-stage"), None)
    if pool is None:
        return None
    metrics = Path(pool.get("run_dir", "")) / "metrics.jsonl"
    reusing = [
        r["curve"][0]["bytes_cum"]
        for r in records
        if r["status"] == "completed" and r.get("variant") in gen_variants and r.get("curve")
    ]
    if not metrics.is_file() or not reusing:
        return None
    row0 = json.loads(metrics.read_text().splitlines()[0])
    return float(row0["bytes_down"] + row0["bytes_up"] - np.median(reusing))


def aggregate(profile: Profile, records: list[dict], timing: dict, split_sizes: dict | None) -> dict:
    variants = {v.name: v for v in profile.variants()}
    gen_bytes = generator_bytes(records, {n for n, v in variants.items() if v.method in GEN_METHODS})
    methods: dict[str, dict] = {}
    for name, v in variants.items():
        recs = [r for r in records if r.get("variant") == name and r["status"] == "completed"]
        # the latest record per seed (a re-run replaces an earlier one)
        by_seed = {r["seed"]: r for r in recs}
        recs = [by_seed[s] for s in sorted(by_seed)]
        failed = [r for r in records if r.get("variant") == name and r["status"] != "completed"]
        if not recs:
            methods[name] = {
                "status": "not run" if not failed else "failed",
                "failures": [f["details"][:300] for f in failed],
            }
            continue
        entry: dict = {
            "method": v.method,
            "seeds": [r["seed"] for r in recs],
            "note": v.note or METHOD_NOTES.get(v.method, ""),
        }
        if v.overrides:
            entry["overrides"] = v.overrides
        for key in ("dice_test_mean", "iou_test_mean"):
            entry[key], entry[f"{key}_std"] = _stats([r[key] for r in recs])
        sites = sorted({s for r in recs for s in r["test"]})
        per, per_std, iou_per = {}, {}, {}
        for s in sites:
            per[s], per_std[s] = _stats([r["test"][s]["dice"] for r in recs if s in r["test"]])
            iou_per[s], _ = _stats([r["test"][s]["iou"] for r in recs if s in r["test"]])
        entry["dice_test_per_site"], entry["dice_test_per_site_std"] = per, per_std
        entry["iou_test_per_site"] = iou_per
        entry["dice_holdout"], entry["dice_holdout_std"] = _stats([r["dice_holdout"] for r in recs])
        entry["iou_holdout"], entry["iou_holdout_std"] = _stats([r["iou_holdout"] for r in recs])
        entry["holdout_site"] = profile.holdout
        if v.method == "local":
            entry["holdout_note"] = "a site that never trains has no local model"
        if v.method == "dsfedmed-logits":
            entry["holdout_note"] = (
                "the held-out site trains its model on the synthetic pool with the final FM's soft "
                "targets only (what a hospital joining late gets); never on its own labels"
            )
        rounds = recs[0]["rounds"]
        n_sites = recs[0]["n_sites"]
        entry["bytes_total"] = float(np.mean([r["bytes_total"] for r in recs]))
        entry["bytes_down_total"] = float(np.mean([r["bytes_down"] for r in recs]))
        entry["bytes_up_total"] = float(np.mean([r["bytes_up"] for r in recs]))
        one_off = gen_bytes if v.method in GEN_METHODS and gen_bytes else 0.0
        if v.method in GEN_METHODS:
            # the runs reuse the pool stage's pool: its generator uploads are part of every run's cost
            entry["bytes_generators_one_off"] = gen_bytes
            entry["bytes_total_excluding_generators"] = entry["bytes_total"]
            entry["bytes_total"] += one_off
            entry["bytes_up_total"] += one_off
        entry["bytes_per_round_per_site"] = entry["bytes_total"] / max(rounds, 1) / max(n_sites, 1)
        fm_site = v.method.startswith("fedfm")
        entry["site_infer_ms"] = timing["fm_infer_ms"] if fm_site else timing["site_infer_ms"]
        entry["fm_infer_ms"] = timing["fm_infer_ms"] if v.method in FM_METHODS else None
        entry["seconds_total"], entry["seconds_total_std"] = _stats([r["seconds_total"] for r in recs])
        entry["server_seconds_per_round"], _ = _stats([r["server_seconds_per_round"] for r in recs])
        if v.kind == "flower" and any(r.get("peak_rss_scope") != "process tree" for r in recs):
            # measured before the process-tree fix: the SuperLink alone, not the sites; not reported
            entry["peak_rss_mb"] = None
            entry["peak_rss_note"] = "not measured: these runs summed the SuperLink's process group only"
        else:
            entry["peak_rss_mb"] = float(max(r["peak_rss_mb"] for r in recs))
        entry["rounds"], entry["n_sites"] = rounds, n_sites
        # the mean curve over seeds: validation Dice and cumulative bytes per round
        n_r = min(len(r["curve"]) for r in recs)
        entry["curve"] = [
            {
                "round": recs[0]["curve"][i]["round"],
                "dice_mean": _stats([r["curve"][i]["dice_mean"] for r in recs])[0],
                "bytes_cum": float(np.mean([r["curve"][i]["bytes_cum"] for r in recs])) + one_off,
            }
            for i in range(n_r)
        ]
        if failed:
            entry["failures"] = [f["details"][:300] for f in failed]
        methods[name] = entry
    pool = next((r for r in records if r.get("variant") == "pool-stage"), None)
    return {
        "profile": profile.name,
        "description": profile.description,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": _cpus()},
        "scale": profile.scale(),
        "data": {
            "dataset": "PolypGen (real, 6 hospitals)" if profile.data == "polypgen" else "built-in phantoms",
            "sites": sorted(split_sizes) if split_sizes else None,
            "held_out_site": profile.holdout,
            "split": "fixed for every method and seed (grouped by video, seed 0), capped per site",
            "split_sizes": split_sizes,
        },
        "metrics": {
            "dice_iou": "threshold-averaged over {0.1,0.3,0.5,0.7,0.9}; test = each training site's test "
            "split, mean over sites, then mean/std over seeds; holdout = every pair of the held-out site",
            "bytes": "all sites, both directions, whole run (profiling, generators, pool, rounds, "
            "evaluation); DSFedMed runs reuse the pool stage's pool, so its one-off generator uploads "
            "(bytes_generators_one_off) are added to their bytes_total",
            "peak_rss_mb": "federated: summed RSS of the SuperLink process tree (server + all simulated "
            "sites on this one machine), max over seeds; in-process: the bench process",
        },
        "inference": timing,
        "pool_stage_seconds": pool.get("seconds_total") if pool else None,
        "bytes_generators_one_off": gen_bytes,
        "methods": methods,
        "bar": judge(methods),
    }


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


def judge(methods: dict) -> list[dict]:
    """The issue's bar, each with its margin; a Dice gap counts only where it exceeds the spread."""
    out = []
    d, f = methods.get("dsfedmed-logits", {}), methods.get("fedavg", {})
    for key, label in (("dice_test_mean", "test splits"), ("dice_holdout", "held-out site")):
        if d.get(key) is None or f.get(key) is None:
            continue
        gap = 100 * (d[key] - f[key])
        spread = 100 * max(d.get(f"{key}_std") or 0.0, f.get(f"{key}_std") or 0.0)
        out.append(
            {
                "claim": f"dsfedmed-logits Dice >= fedavg + 2 points ({label})",
                "value": round(gap, 2),
                "target": 2.0,
                "unit": "Dice points",
                "met": gap >= 2.0,
                "by": round(gap - 2.0, 2),
                "seed_spread": round(spread, 2),
                "exceeds_spread": abs(gap) > spread,
            }
        )
    for other, target in (("fedavg", 0.10), ("fedfm", 0.01)):
        o = methods.get(other, {})
        if d.get("bytes_total") and o.get("bytes_total"):
            ratio = d["bytes_total"] / o["bytes_total"]
            claim = {
                "claim": f"dsfedmed-logits traffic <= {target:.0%} of {other}",
                "value": round(ratio, 5),
                "target": target,
                "unit": "ratio of cumulative bytes",
                "met": ratio <= target,
                "by": round(target - ratio, 5),
            }
            if d.get("bytes_generators_one_off"):
                claim["value_excluding_generators"] = round(
                    d["bytes_total_excluding_generators"] / o["bytes_total"], 5
                )
            out.append(claim)
    if d.get("site_infer_ms") and d.get("fm_infer_ms"):
        speed = d["fm_infer_ms"] / d["site_infer_ms"]
        out.append(
            {
                "claim": "site-model inference >= 8x faster than the FM",
                "value": round(speed, 1),
                "target": 8.0,
                "unit": "x",
                "met": speed >= 8.0,
                "by": round(speed - 8.0, 1),
            }
        )
    return out


def _fmt(v, std=None, pct=False) -> str:
    if v is None:
        return "n/a"
    s = f"{v:.3f}"
    if std is not None:
        s += f" ± {std:.3f}"
    return s


def _mb(b) -> str:
    return "0" if not b else (f"{b / 1e6:.2f}" if b >= 1e5 else f"{b / 1e6:.4f}")


def markdown(res: dict, plots: dict[str, str]) -> str:
    sc, data = res["scale"], res["data"]
    lines = [
        f"# Benchmark `{res['profile']}`: {res['description']}",
        "",
        f"Scale: {sc['image_size']} px, {sc['rounds']} rounds x {sc['local_epochs']} local epochs, "
        f"pool {sc['pool_size']} synthetic pairs (generators {sc['generator_seconds_per_site']:.0f} s per site), "
        f"site model `{sc['models']['site']}`, FM `{sc['models']['fm']}`, seeds {sc['seeds']}, "
        f"per-site cap (train, val, test) {sc['site_cap_train_val_test']}. Held-out site: {data['held_out_site']}. "
        f"Machine: {res['machine']['cpus']} CPUs. Created {res['created']}.",
        "",
        "Dice/IoU: threshold-averaged, mean ± std over seeds. MB: all sites, both directions, whole run; "
        "for DSFedMed including the one-off generator uploads (excluding them in brackets).",
        "",
        "| method | Dice test | IoU test | Dice held-out | MB total | kB/round/site | site ms/img | FM ms/img | s total | peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in res["methods"].items():
        if "dice_test_mean" not in m:
            lines.append(f"| {name} | {m['status']} | | | | | | | | |")
            continue
        fm_ms = "-" if m["fm_infer_ms"] is None else f"{m['fm_infer_ms']:.0f}"
        lines.append(
            f"| {name}{'' if len(m['seeds']) > 1 else ' (1 seed)'} | {_fmt(m['dice_test_mean'], m['dice_test_mean_std'])} "
            f"| {_fmt(m['iou_test_mean'], m['iou_test_mean_std'])} | {_fmt(m['dice_holdout'], m['dice_holdout_std'])} "
            f"| {_mb(m['bytes_total'])}"
            + (
                f" ({_mb(m['bytes_total_excluding_generators'])})"
                if m.get("bytes_generators_one_off")
                else ""
            )
            + f" | {m['bytes_per_round_per_site'] / 1e3:.1f} "
            f"| {m['site_infer_ms']:.1f} | {fm_ms} "
            f"| {m['seconds_total']:.0f} | {'n/a' if m['peak_rss_mb'] is None else format(m['peak_rss_mb'], '.0f')} |"
        )
    sites = sorted({s for m in res["methods"].values() for s in m.get("dice_test_per_site", {})})
    if sites:
        lines += [
            "",
            "Test Dice per site (mean over seeds):",
            "",
            "| method | " + " | ".join(sites) + " |",
            "|---|" + "---|" * len(sites),
        ]
        for name, m in res["methods"].items():
            if "dice_test_per_site" in m:
                lines.append(
                    f"| {name} | " + " | ".join(_fmt(m["dice_test_per_site"].get(s)) for s in sites) + " |"
                )
    if res["bar"]:
        lines += [
            "",
            "## The bar (from the paper's claims)",
            "",
            "| claim | value | target | met | margin | note |",
            "|---|---|---|---|---|---|",
        ]
        for b in res["bar"]:
            note = ""
            if "value_excluding_generators" in b:
                note = f"{b['value_excluding_generators']} without the one-off generator uploads"
            if "exceeds_spread" in b:
                note = f"seed spread {b['seed_spread']} points; " + (
                    "gap exceeds it" if b["exceeds_spread"] else "gap within the spread: no difference"
                )
            lines.append(
                f"| {b['claim']} | {b['value']} {b['unit']} | {b['target']} | {'yes' if b['met'] else 'no'} | {b['by']:+} | {note} |"
            )
    lines += ["", "## Notes", ""]
    for name, m in res["methods"].items():
        bits = [m.get("note", "")]
        if m.get("overrides"):
            bits.append(f"overrides {m['overrides']}")
        if m.get("holdout_note"):
            bits.append(f"held-out: {m['holdout_note']}")
        if m.get("peak_rss_note"):
            bits.append(f"peak memory {m['peak_rss_note']}")
        if m.get("failures"):
            bits.append(f"failed runs: {m['failures']}")
        lines.append(f"- **{name}**: " + "; ".join(b for b in bits if b))
    inf = res["inference"]
    lines += [
        f"- Inference: site model `{inf['site_model']}` ({inf['site_params']:,} parameters) {inf['site_infer_ms']:.2f} ms, "
        f"FM `{inf['fm']}` ({inf['fm_params']:,} parameters) {inf['fm_infer_ms']:.0f} ms; {inf['how']}.",
    ]
    if res.get("pool_stage_seconds"):
        lines.append(
            f"- Pool stage (site generators, sampling, FM embeddings; once for all DSFedMed runs): {res['pool_stage_seconds']:.0f} s."
        )
    if res.get("bytes_generators_one_off"):
        lines.append(
            f"- One-off generator exchange (every training site uploads its diffusion generator once): "
            f"{_mb(res['bytes_generators_one_off'])} MB, counted in every DSFedMed run's total."
        )
    lines += [""] + [f"![{k}]({v})" for k, v in plots.items()] + [""]
    return "\n".join(lines)


def plot(res: dict, out_dir: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = res["profile"]
    fig, ax = plt.subplots(figsize=(6.8, 4.2), dpi=110)
    for m, e in res["methods"].items():
        c = [p for p in e.get("curve", []) if p["dice_mean"] is not None]
        if c:
            ax.plot([p["round"] for p in c], [p["dice_mean"] for p in c], marker="o", label=m)
    ax.set_xlabel("round (0 = before training)")
    ax.set_ylabel("validation Dice, mean over sites and seeds")
    ax.set_title(f"bench {name}: Dice per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    rounds_png = out_dir / f"{name}-dice-rounds.png"
    fig.savefig(rounds_png)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.8, 4.2), dpi=110)
    for m, e in res["methods"].items():
        c = [p for p in e.get("curve", []) if p["dice_mean"] is not None and p["bytes_cum"] > 0]
        if c:
            ax.plot([p["bytes_cum"] / 1e6 for p in c], [p["dice_mean"] for p in c], marker="o", label=m)
    ax.set_xscale("log")
    ax.set_xlabel("cumulative traffic, MB (all sites, both directions; log scale)")
    ax.set_ylabel("validation Dice, mean over sites and seeds")
    ax.set_title(f"bench {name}: Dice against traffic")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    mb_png = out_dir / f"{name}-dice-mb.png"
    fig.savefig(mb_png)
    plt.close(fig)
    return {"Dice per round": rounds_png.name, "Dice against cumulative MB": mb_png.name}


def write_results(res: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = plot(res, out_dir)
    js = out_dir / f"{res['profile']}.json"
    md = out_dir / f"{res['profile']}.md"
    atomic_write_text(js, json.dumps(json_safe(res), indent=1) + "\n")
    atomic_write_text(md, markdown(res, plots))
    return {"json": js, "markdown": md, **{k: out_dir / v for k, v in plots.items()}}
