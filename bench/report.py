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

FM_METHODS = ("fedfm", "fedfm-decoder", "dsfedmed-logits", "dsfedmed-weights")
GEN_METHODS = ("dsfedmed-logits", "dsfedmed-weights")  # their pool comes from site generators


def _stats(vals: list) -> tuple[float | None, float | None]:
    v = [float(x) for x in vals if x is not None and np.isfinite(x)]
    if not v:
        return None, None
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else None)


AT_FLOOR_MARGIN = 0.05  # Dice@0.5 within this of the best floor: the method has not learned
FLOOR_KEYS = ("untrained", "all-foreground", "all-background", "fm-zero-shot")


def generator_bytes(records: list[dict]) -> float | None:
    """The one-off generator exchange (every site uploads its diffusion generator), measured by the
    server as the bytes of the pool stage's ``train.generator`` messages (both ways). Every DSFedMed
    run of a profile reuses that pool, so every one is charged for it."""
    pool = next((r for r in records if r.get("variant") == "pool-stage"), None)
    if pool is None:
        return None
    kinds = pool.get("bytes_by_kind") or {}
    return float(kinds["generator"]) if "generator" in kinds else None


def _floors_table(floors: dict | None) -> dict:
    if not floors:
        return {}
    out = {}
    for name in (*FLOOR_KEYS, "oracle-fm-mask-box"):
        f = floors.get(name)
        if not f:
            continue
        out[name] = {
            k: f.get(k)
            for k in (
                "dice05_test_mean",
                "iou05_test_mean",
                "dice_test_mean",
                "dice05_holdout",
                "dice_holdout",
                "dice05_test_per_site",
                "how",
                "per_seed_dice05_test_mean",
            )
            if f.get(k) is not None
        }
    return out


def aggregate(
    profile: Profile,
    records: list[dict],
    timing: dict,
    split_sizes: dict | None,
    floors: dict | None = None,
) -> dict:
    variants = {v.name: v for v in profile.variants()}
    gen_bytes = generator_bytes(records)
    floor_rows = _floors_table(floors)
    best_floor = (floors or {}).get("best_floor")
    methods: dict[str, dict] = {}
    for name, v in variants.items():
        recs = [r for r in records if r.get("variant") == name and r["status"] == "completed"]
        by_seed = {r["seed"]: r for r in recs}  # the latest record per seed
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
        for key in (
            "dice05_test_round0",
            "dice05_test_mean",
            "iou05_test_mean",
            "dice_test_mean",
            "iou_test_mean",
            "dice05_holdout",
            "iou05_holdout",
            "dice_holdout",
            "iou_holdout",
        ):
            vals = [r.get(key) for r in recs]
            entry[key], entry[f"{key}_std"] = _stats(vals)
            fin = [x for x in vals if x is not None]
            entry[f"{key}_range"] = [min(fin), max(fin)] if fin else None
        sites = sorted({s for r in recs for s in r["test"]})
        for metric in ("dice05", "dice", "iou05"):
            per, per_std = {}, {}
            for s in sites:
                per[s], per_std[s] = _stats([r["test"][s].get(metric) for r in recs if s in r["test"]])
            entry[f"{metric}_test_per_site"] = per
            if metric == "dice05":
                entry["dice05_test_per_site_std"] = per_std
        entry["holdout_site"] = profile.holdout
        if v.method == "local":
            entry["holdout_note"] = "a site that never trains has no local model"
        if v.method == "dsfedmed-logits":
            entry["holdout_note"] = (
                "the held-out site trains its model on the synthetic pool with the run's final "
                "targets only (what a hospital joining late gets); never on its own labels"
            )
        if best_floor and entry["dice05_test_mean"] is not None:
            entry["at_floor"] = entry["dice05_test_mean"] < best_floor["dice05_test_mean"] + AT_FLOOR_MARGIN
        # optimiser steps per site over the whole run (mean over seeds; private and distillation apart)
        for key in ("steps_private_per_site", "steps_distill_per_site"):
            per_site = sorted({s for r in recs for s in (r.get(key) or {})})
            entry[key] = {s: float(np.mean([(r.get(key) or {}).get(s, 0) for r in recs])) for s in per_site}
        rounds = recs[0]["rounds"]
        n_sites = recs[0]["n_sites"]
        entry["bytes_total"] = float(np.mean([r["bytes_total"] for r in recs]))
        entry["bytes_down_total"] = float(np.mean([r["bytes_down"] for r in recs]))
        entry["bytes_up_total"] = float(np.mean([r["bytes_up"] for r in recs]))
        kinds = sorted({k for r in recs for k in (r.get("bytes_by_kind") or {})})
        entry["bytes_by_kind"] = {
            k: float(np.mean([(r.get("bytes_by_kind") or {}).get(k, 0) for r in recs])) for k in kinds
        }
        one_off = gen_bytes if v.method in GEN_METHODS and gen_bytes else 0.0
        if v.method in GEN_METHODS:
            # the runs reuse the pool stage's pool: its generator uploads are part of every run's cost
            entry["bytes_generators_one_off"] = gen_bytes
            entry["bytes_total_excluding_generators"] = entry["bytes_total"]
            entry["bytes_total"] += one_off
            entry["bytes_up_total"] += one_off
            entry["bytes_by_kind"]["generator"] = entry["bytes_by_kind"].get("generator", 0.0) + one_off
        entry["bytes_per_round_per_site"] = entry["bytes_total"] / max(rounds, 1) / max(n_sites, 1)
        fm_site = v.method.startswith("fedfm")
        entry["site_infer_ms"] = timing["fm_infer_ms"] if fm_site else timing["site_infer_ms"]
        entry["fm_infer_ms"] = timing["fm_infer_ms"] if v.method in FM_METHODS else None
        entry["seconds_total"], entry["seconds_total_std"] = _stats([r["seconds_total"] for r in recs])
        entry["seconds_per_unit"] = [round(r["seconds_total"], 1) for r in recs]
        entry["server_seconds_per_round"], _ = _stats([r["server_seconds_per_round"] for r in recs])
        if v.kind == "flower" and any(r.get("peak_rss_scope") != "process tree" for r in recs):
            entry["peak_rss_mb"] = None
            entry["peak_rss_note"] = "not measured: these runs summed the SuperLink's process group only"
        else:
            entry["peak_rss_mb"] = float(max(r["peak_rss_mb"] for r in recs))
        entry["rounds"], entry["n_sites"] = rounds, n_sites
        extras = [r.get("extra", {}).get("fm_eval") for r in recs if r.get("extra", {}).get("fm_eval")]
        if extras:
            for k in sorted({k for e in extras for k in e}):
                entry[k], entry[f"{k}_std"] = _stats([e.get(k) for e in extras])
        teach = [r["extra"]["teacher_rounds"] for r in recs if r.get("extra", {}).get("teacher_rounds")]
        if teach:  # the sites' validation Dice@0.5 of the teacher as each teacher round received it
            entry["teacher_val_dice05_received"] = [
                _stats([float(np.mean(list(t[i]["val_dice05_received"].values())))
                        for t in teach if i < len(t) and t[i]["val_dice05_received"]])[0]
                for i in range(max(len(t) for t in teach))
            ]  # fmt: skip
        # the mean curve over seeds: validation Dice and cumulative bytes per round
        n_r = min(len(r["curve"]) for r in recs)
        entry["curve"] = [
            {
                "round": recs[0]["curve"][i]["round"],
                "dice_mean": _stats([r["curve"][i]["dice_mean"] for r in recs])[0],
                "dice05_mean": _stats([r["curve"][i].get("dice05_mean") for r in recs])[0],
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
        "meaningful": profile.meaningful,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": _cpus()},
        "scale": profile.scale(),
        "data": {
            "dataset": "PolypGen (real, 6 hospitals)" if profile.data == "polypgen" else "built-in phantoms",
            "sites": sorted(split_sizes) if split_sizes else None,
            "held_out_site": profile.holdout,
            "split": "fixed for every method and seed (grouped by video, seed 0)"
            + (", capped per site" if profile.caps else ", every pair"),
            "split_sizes": split_sizes,
        },
        "metrics": {
            "dice05_iou05": "the headline: per image at threshold 0.5, averaged over a site's images, "
            "then over sites (test = each training site's test split), then mean/std/range over seeds; "
            "an empty prediction on an empty mask scores 1, any prediction on an empty mask 0",
            "dice_iou": "the paper's figure: the same, averaged over thresholds {0.1,0.3,0.5,0.7,0.9}",
            "holdout": "every pair of the held-out hospital, with what a hospital joining after the run "
            "gets and no labels of its own: FedAvg's global model; for DSFedMed (logits) a model the "
            "newcomer trains on the pool with the run's final targets; local has none",
            "floors": "best floor = max(untrained, all-foreground, all-background) on Dice@0.5 test; a "
            f"method within {AT_FLOOR_MARGIN} of it is marked at the floor; fm-zero-shot is the "
            "reference an FM-using method must beat; oracle rows use the true mask and are never floors",
            "steps": "optimiser steps per site over the run, private data and distillation apart "
            "(central: all steps of the pooled model)",
            "bytes": "all sites, both directions, whole run, counted from the serialised messages "
            "(replies after a deadline included as 'late'); DSFedMed runs reuse the pool stage's pool, "
            "so its one-off generator uploads (bytes_generators_one_off) are added to their bytes_total",
            "peak_rss_mb": "federated: summed RSS of the SuperLink process tree (server + all simulated "
            "sites on this one machine), max over seeds; in-process: the bench process",
            "gain": "a difference counts as a gain only if larger than the larger std of the two methods",
            "seconds": "wall time of each unit on this machine (2 CPU cores); units of this profile ran "
            "beside other units and test runs on the same cores, so a unit's seconds include that "
            "contention and are an upper bound, not a speed comparison",
        },
        "inference": timing,
        "floors": floor_rows,
        "best_floor": best_floor,
        "floors_seconds": (floors or {}).get("seconds_total"),
        "pool_stage_seconds": pool.get("seconds_total") if pool else None,
        "bytes_generators_one_off": gen_bytes,
        "methods": methods,
        "bar": judge(methods, best_floor) if profile.meaningful else [],
    }


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


def _gap_claim(claim: str, a: dict, b: dict, key: str, target: float) -> dict | None:
    if a.get(key) is None or b.get(key) is None:
        return None
    gap = 100 * (a[key] - b[key])
    spread = 100 * max(a.get(f"{key}_std") or 0.0, b.get(f"{key}_std") or 0.0)
    return {
        "claim": claim,
        "value": round(gap, 2),
        "target": target,
        "unit": "Dice points",
        "met": gap >= target and gap > spread,
        "by": round(gap - target, 2),
        "seed_spread": round(spread, 2),
        "exceeds_spread": abs(gap) > spread,
    }


def judge(methods: dict, best_floor: dict | None = None) -> list[dict]:
    """The issues' bars on Dice@0.5, each with its margin; a gap counts only beyond the seed spread."""
    out = []
    c = methods.get("central", {})
    if c.get("dice05_test_mean") is not None:
        v = c["dice05_test_mean"]
        out.append(
            {"claim": "central >= 0.50 Dice@0.5 (sites' test splits)", "value": round(v, 3),
             "target": 0.5, "unit": "Dice@0.5", "met": v >= 0.5, "by": round(v - 0.5, 3)}
        )  # fmt: skip
    if best_floor:
        target = best_floor["dice05_test_mean"] + 0.25
        for name in ("local", "fedavg"):
            m = methods.get(name, {})
            if m.get("dice05_test_mean") is None:
                continue
            v = m["dice05_test_mean"]
            out.append(
                {"claim": f"{name} >= best floor ({best_floor['name']}) + 0.25", "value": round(v, 3),
                 "target": round(target, 3), "unit": "Dice@0.5", "met": v >= target, "by": round(v - target, 3)}
            )  # fmt: skip
    d = methods.get("dsfedmed-logits", {})
    rivals = [m for m in ("fedavg", "fedavg-matched", "local") if methods.get(m, {}).get("dice05_test_mean")]
    if d.get("dice05_test_mean") is not None and rivals:
        best = max(rivals, key=lambda m: methods[m]["dice05_test_mean"])
        claim = _gap_claim(
            f"dsfedmed-logits >= {best} (best of fedavg, fedavg-matched, local) + 2 points (test)",
            d, methods[best], "dice05_test_mean", 2.0,
        )  # fmt: skip
        if claim:
            out.append(claim)
    fed_rivals = [m for m in ("fedavg", "fedavg-matched") if methods.get(m, {}).get("dice05_holdout")]
    if d.get("dice05_holdout") is not None and fed_rivals:
        best = max(fed_rivals, key=lambda m: methods[m]["dice05_holdout"])
        claim = _gap_claim(
            f"dsfedmed-logits >= {best} + 2 points (held-out hospital)",
            d,
            methods[best],
            "dice05_holdout",
            2.0,
        )
        if claim:
            out.append(claim)
    for other, target in (("fedavg", 0.10), ("fedfm-decoder", 0.10)):
        o = methods.get(other, {})
        if d.get("bytes_total") and o.get("bytes_total"):
            ratio = d["bytes_total"] / o["bytes_total"]
            claim = {
                "claim": f"dsfedmed-logits traffic <= {target:.0%} of {other} (generator uploads included)",
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
    if d.get("fm_dice05_test_adapted") is not None and d.get("fm_dice05_test_zero_shot") is not None:
        v, ref = d["fm_dice05_test_adapted"], d["fm_dice05_test_zero_shot"]
        out.append(
            {"claim": "the adapted FM (teacher before round 1) beats the zero-shot FM (test)",
             "value": round(v, 3), "target": round(ref, 3), "unit": "Dice@0.5", "met": v > ref,
             "by": round(v - ref, 3), "at_end": d.get("fm_dice05_test_end")}
        )  # fmt: skip
    f = methods.get("fedfm-decoder", {})
    if d.get("dice05_test_mean") is not None and f.get("dice05_test_mean") is not None:
        gap = d["dice05_test_mean"] - f["dice05_test_mean"]
        out.append(
            {"claim": "dsfedmed-logits within 5 points of fedfm-decoder (test)", "value": round(gap, 3),
             "target": -0.05, "unit": "Dice@0.5 difference", "met": gap >= -0.05, "by": round(gap + 0.05, 3)}
        )  # fmt: skip
    if d.get("site_infer_ms") and d.get("fm_infer_ms"):
        speed = d["fm_infer_ms"] / d["site_infer_ms"]
        out.append(
            {"claim": "site-model inference >= 8x faster than the FM", "value": round(speed, 1),
             "target": 8.0, "unit": "x", "met": speed >= 8.0, "by": round(speed - 8.0, 1)}
        )  # fmt: skip
    return out


def _fmt(v, std=None, rng=None) -> str:
    if v is None:
        return "n/a"
    s = f"{v:.3f}"
    if std is not None:
        s += f" ± {std:.3f}"
    if rng is not None and rng[0] != rng[1]:
        s += f" [{rng[0]:.3f}–{rng[1]:.3f}]"
    return s


def _mb(b) -> str:
    return "0" if not b else (f"{b / 1e6:.2f}" if b >= 1e5 else f"{b / 1e6:.4f}")


def _steps(d: dict) -> str:
    if not d:
        return "-"
    vals = list(d.values())
    return f"{min(vals):.0f}" if min(vals) == max(vals) else f"{min(vals):.0f}–{max(vals):.0f}"


def markdown(res: dict, plots: dict[str, str]) -> str:
    sc, data = res["scale"], res["data"]
    lines = [f"# Benchmark `{res['profile']}`: {res['description']}", ""]
    if not res.get("meaningful"):
        lines += [
            "**Mechanics only: numbers meaningless** (this profile checks the harness, not the methods).",
            "",
        ]
    lines += [
        f"Scale: {sc['image_size']} px, {sc['rounds']} rounds x {sc['local_epochs']} local epochs, "
        f"pool {sc['pool_size']} synthetic pairs, site model `{sc['models']['site']}`, FM `{sc['models']['fm']}`, "
        f"seeds {sc['seeds']}, split {data['split']} (val/test fractions {sc.get('split_fractions_val_test')}, "
        f"cap {sc['site_cap_train_val_test']}). Held-out hospital: {data['held_out_site']}. "
        f"Recipe (every method): {sc.get('recipe')}. Machine: {res['machine']['cpus']} CPUs. Created {res['created']}.",
        "",
        "Dice@0.5 is the headline (per image, empty prediction on an empty mask = 1); the paper's "
        "threshold-averaged Dice beside it. Methods: mean ± std [min–max] over seeds. "
        "Steps: optimiser steps per site over the run (min–max over sites), private + distillation.",
        "",
        "| row | seeds | Dice@0.5 test | IoU@0.5 test | Dice test (thr-avg) | Dice@0.5 held-out | Dice held-out (thr-avg) "
        "| steps private | steps distill | MB total | s per unit |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, f in res.get("floors", {}).items():
        label = f"*{name}* (oracle, not a floor)" if name.startswith("oracle") else f"*{name}* (floor)"
        if name == "fm-zero-shot":
            label = "*fm-zero-shot* (reference)"
        lines.append(
            f"| {label} | - | {_fmt(f.get('dice05_test_mean'))} | {_fmt(f.get('iou05_test_mean'))} "
            f"| {_fmt(f.get('dice_test_mean'))} | {_fmt(f.get('dice05_holdout'))} | {_fmt(f.get('dice_holdout'))} "
            "| 0 | 0 | 0 | - |"
        )
    for name, m in res["methods"].items():
        if "dice05_test_mean" not in m:
            lines.append(f"| {name} | {m['status']} | | | | | | | | | |")
            continue
        mark = " **at the floor**" if m.get("at_floor") else ""
        secs = ", ".join(f"{x:.0f}" for x in m.get("seconds_per_unit", []))
        lines.append(
            f"| {name}{mark} | {len(m['seeds'])} "
            f"| {_fmt(m['dice05_test_mean'], m['dice05_test_mean_std'], m.get('dice05_test_mean_range'))} "
            f"| {_fmt(m['iou05_test_mean'], m.get('iou05_test_mean_std'))} "
            f"| {_fmt(m['dice_test_mean'], m.get('dice_test_mean_std'))} "
            f"| {_fmt(m['dice05_holdout'], m.get('dice05_holdout_std'))} | {_fmt(m['dice_holdout'], m.get('dice_holdout_std'))} "
            f"| {_steps(m.get('steps_private_per_site', {}))} | {_steps(m.get('steps_distill_per_site', {}))} "
            f"| {_mb(m['bytes_total'])}"
            + (
                f" ({_mb(m['bytes_total_excluding_generators'])} without generators)"
                if m.get("bytes_generators_one_off")
                else ""
            )
            + f" | {secs} |"
        )
    if res.get("best_floor"):
        bf = res["best_floor"]
        lines += ["", f"Best floor: `{bf['name']}` at {bf['dice05_test_mean']:.3f} Dice@0.5 (test mean)."]
    sites = sorted(
        {s for m in res["methods"].values() for s in m.get("dice05_test_per_site", {})}
        | {s for f in res.get("floors", {}).values() for s in f.get("dice05_test_per_site", {})}
    )
    if sites:
        lines += [
            "",
            "Dice@0.5 per site, test split (floors per site matter: C4 has 81 polyp-free frames):",
            "",
            "| row | " + " | ".join(sites) + " |",
            "|---|" + "---|" * len(sites),
        ]
        for name, f in res.get("floors", {}).items():
            lines.append(
                f"| *{name}* | "
                + " | ".join(_fmt(f.get("dice05_test_per_site", {}).get(s)) for s in sites)
                + " |"
            )
        for name, m in res["methods"].items():
            if "dice05_test_per_site" in m:
                lines.append(
                    f"| {name} | " + " | ".join(_fmt(m["dice05_test_per_site"].get(s)) for s in sites) + " |"
                )
    teachers = [(n, m) for n, m in res["methods"].items() if m.get("fm_dice05_test_adapted") is not None]
    if teachers:
        lines += ["", "The teacher (the FM, prompt-free) on the sites' test splits / the held-out hospital, "
                  "Dice@0.5: zero-shot, after its adaptation before round 1 (pool, then the sites where "
                  "fm-site-rounds > 0), at the end; and the sites' validation Dice@0.5 of the teacher as "
                  "each teacher round received it (the first: after the pool only):", "",
                  "| method | zero-shot | adapted | end | held-out: zero-shot / adapted / end | val. by teacher round |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for n, m in teachers:
            held = " / ".join(_fmt(m.get(f"fm_dice05_holdout_{k}")) for k in ("zero_shot", "adapted", "end"))
            val = ", ".join(_fmt(v) for v in m.get("teacher_val_dice05_received", [])) or "-"
            lines.append(
                f"| {n} | {_fmt(m.get('fm_dice05_test_zero_shot'))} | {_fmt(m.get('fm_dice05_test_adapted'), m.get('fm_dice05_test_adapted_std'))} "
                f"| {_fmt(m.get('fm_dice05_test_end'), m.get('fm_dice05_test_end_std'))} | {held} | {val} |"
            )
    kinds_rows = [(n, m["bytes_by_kind"]) for n, m in res["methods"].items() if m.get("bytes_by_kind")]
    if kinds_rows:
        kinds = sorted({k for _, d in kinds_rows for k in d})
        lines += ["", "Traffic by message kind, MB (whole run, both ways):", "",
                  "| method | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]  # fmt: skip
        for n, d in kinds_rows:
            lines.append(f"| {n} | " + " | ".join(_mb(d.get(k, 0)) for k in kinds) + " |")
    if res["bar"]:
        lines += [
            "",
            "## The bar",
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
    for key, text in res["metrics"].items():
        lines.append(f"- {key}: {text}.")
    for name, m in res["methods"].items():
        bits = [m.get("note", "")]
        if m.get("overrides"):
            bits.append(f"overrides {m['overrides']}")
        if m.get("holdout_note"):
            bits.append(f"held-out: {m['holdout_note']}")
        if m.get("failures"):
            bits.append(f"failed runs: {m['failures']}")
        lines.append(f"- **{name}**: " + "; ".join(b for b in bits if b))
    inf = res["inference"]
    lines.append(
        f"- Inference: site model `{inf['site_model']}` ({inf['site_params']:,} parameters) {inf['site_infer_ms']:.2f} ms, "
        f"FM `{inf['fm']}` ({inf['fm_params']:,} parameters) {inf['fm_infer_ms']:.0f} ms; {inf['how']}."
    )
    if res.get("floors_seconds"):
        lines.append(f"- Floors unit: {res['floors_seconds']:.0f} s (FM embeddings computed once, cached).")
    if res.get("pool_stage_seconds"):
        lines.append(
            f"- Pool stage (site generators, sampling, FM embeddings; once): {res['pool_stage_seconds']:.0f} s."
        )
    if res.get("bytes_generators_one_off"):
        lines.append(
            f"- One-off generator exchange (measured: train.generator messages): "
            f"{_mb(res['bytes_generators_one_off'])} MB, charged to every DSFedMed run."
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
        c = [p for p in e.get("curve", []) if p.get("dice05_mean") is not None]
        if c:
            ax.plot([p["round"] for p in c], [p["dice05_mean"] for p in c], marker="o", label=m)
    for k, (fname, f) in enumerate(res.get("floors", {}).items()):
        if f.get("dice05_test_mean") is not None and not fname.startswith("oracle"):
            ax.axhline(f["dice05_test_mean"], ls=":", lw=1, color=f"C{7 + k % 3}", label=f"{fname} (test)")
    ax.set_xlabel("round (0 = before training)")
    ax.set_ylabel("validation Dice@0.5, mean over sites and seeds")
    ax.set_title(f"bench {name}: Dice per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    rounds_png = out_dir / f"{name}-dice-rounds.png"
    fig.savefig(rounds_png)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.8, 4.2), dpi=110)
    for m, e in res["methods"].items():
        c = [p for p in e.get("curve", []) if p.get("dice05_mean") is not None and p["bytes_cum"] > 0]
        if c:
            ax.plot([p["bytes_cum"] / 1e6 for p in c], [p["dice05_mean"] for p in c], marker="o", label=m)
    ax.set_xscale("log")
    ax.set_xlabel("cumulative traffic, MB (all sites, both directions; log scale)")
    ax.set_ylabel("validation Dice@0.5, mean over sites and seeds")
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


README_START = "<!-- bench:{profile}:start -->"
README_END = "<!-- bench:{profile}:end -->"


def readme_block(res: dict) -> str:
    """The README's results table for a profile, generated from its results file (never typed)."""
    sc = res["scale"]
    bf = res.get("best_floor") or {}
    lines = [
        f"**`{res['profile']}`** ([table](bench/results/{res['profile']}.md), "
        f"[json](bench/results/{res['profile']}.json)): {res['description']}; recipe {sc.get('recipe')}. "
        "Dice@0.5 on the sites' test splits and on the held-out hospital (mean ± std over seeds; "
        "threshold-averaged Dice in brackets); floors in italics.",
        "",
        "| row | seeds | Dice@0.5 test | Dice@0.5 held-out | MB, whole run |",
        "|---|---|---|---|---|",
    ]
    for name, f in res.get("floors", {}).items():
        lines.append(
            f"| *{name}* | - | {_fmt(f.get('dice05_test_mean'))} ({_fmt(f.get('dice_test_mean'))}) "
            f"| {_fmt(f.get('dice05_holdout'))} | 0 |"
        )
    for name, m in res["methods"].items():
        if "dice05_test_mean" not in m:
            lines.append(f"| {name} | {m.get('status', 'not run')} | | | |")
            continue
        mark = " (**at the floor**)" if m.get("at_floor") else ""
        lines.append(
            f"| `{name}`{mark} | {len(m['seeds'])} | {_fmt(m['dice05_test_mean'], m.get('dice05_test_mean_std'))} "
            f"({_fmt(m['dice_test_mean'])}) | {_fmt(m['dice05_holdout'], m.get('dice05_holdout_std'))} "
            f"| {_mb(m['bytes_total'])} |"
        )
    if bf:
        lines += ["", f"Best floor: `{bf['name']}` {bf['dice05_test_mean']:.3f}."]
    if res.get("bar"):
        lines += ["", "| bar | value | target | met |", "|---|---|---|---|"]
        for b in res["bar"]:
            lines.append(
                f"| {b['claim']} | {b['value']} | {b['target']} | {'yes' if b['met'] else '**no**'} |"
            )
    return "\n".join(lines)


def update_readme(readme: Path, res: dict) -> bool:
    """Replace the block between the profile's markers in the README; False if it has none."""
    text = readme.read_text()
    start, end = README_START.format(profile=res["profile"]), README_END.format(profile=res["profile"])
    if start not in text or end not in text:
        return False
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    atomic_write_text(readme, head + start + "\n" + readme_block(res) + "\n" + end + tail)
    return True
