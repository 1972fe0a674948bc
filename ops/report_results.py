"""Report sections on what the run achieved: the run's settings, final scores, the Dice curve,
and the problems met (errors, drops, late replies)."""

from __future__ import annotations

import io
import json

from ops.document import Details, Figure, Note, Para, Section, Table
from ops.run_data import RunData, nbytes, num, seconds_text, site_names


def run_section(run: RunData) -> Section:
    s, c = run.summary, run.run_config
    sec = Section("run", "Run")
    status = s.get("status", "unknown")
    if status != "completed":
        sec.blocks.append(
            Note(f"The run did not complete: status {status!r}. {s.get('reason', '')}", "warning")
        )
    method = s.get("method") or c.get("method", "n/a")
    models = s.get("site_models") or {}
    model = s.get("model") or c.get("model", "n/a")
    if models and len(set(models.values())) > 1:
        model = ", ".join(f"{k}={v}" for k, v in sorted(models.items()))
    rounds = f"{s.get('rounds', 'n/a')} of {c.get('num-rounds', 'n/a')}"
    rows = [
        ["run directory", str(run.path)],
        ["status", str(status)],
        ["method", str(method)],
        ["exchange", str(s.get("exchange") or c.get("exchange", "n/a")) if method == "dsfedmed" else "-"],
        ["site model", str(model)],
        ["training sites", ", ".join(site_names(run)) or "n/a"],
        ["held-out site", str(c.get("holdout-site") or "none")],
        ["rounds (completed of configured)", rounds],
        ["data", str(c.get("data-root") or "built-in phantom sites")],
        ["image size", f"{c['image-size']} px" if "image-size" in c else "n/a"],
        ["seed", num(c.get("seed"))],
        ["wall time", seconds_text(s.get("wall_seconds"))],
    ]
    if method == "dsfedmed":
        rows[5:5] = [
            [
                "foundation model",
                f"{s.get('fm') or c.get('fm', 'n/a')} ({num(s.get('fm_params'))} parameters)",
            ],
            [
                "synthetic pool",
                f"{c.get('pool-source', 'n/a')}, {num((s.get('pool') or {}).get('size') or c.get('pool-size'))} samples",
            ],
            [
                "selection",
                f"{c.get('selection-rule', 'n/a')} (lambda {c.get('selection-lambda', 'n/a')}, "
                f"rho {c.get('selection-rho', 'n/a')})",
            ],
        ]
    sec.blocks.append(Table(["setting", "value"], rows))
    for n in run.notes:
        sec.blocks.append(Note(n))
    if run.profiles:
        prof_rows = []
        for site, p in sorted(run.profiles.items()):
            prof_rows.append(
                [
                    site,
                    num(p.get("n-train")),
                    num(p.get("n-val")),
                    num(p.get("n-test")),
                    num(p.get("n-skipped")),
                    str(p.get("model", "n/a")),
                    num(p.get("model-params")),
                    str(p.get("device", "n/a")),
                ]
            )
        sec.blocks.append(
            Table(
                ["site", "train", "val", "test", "skipped", "model", "parameters", "device"],
                prof_rows,
                "Site profiles (what each site reported before training)",
            )
        )
        reports = [
            [site, str(p.get("data-report", ""))]
            for site, p in sorted(run.profiles.items())
            if p.get("data-report")
        ]
        if reports:
            sec.blocks.append(Details("Data checks per site", [Table(["site", "data check"], reports)]))
    if run.run_config:
        sec.blocks.append(
            Details(
                "Full run config",
                [
                    Table(
                        ["key", "value"],
                        [
                            [k, v if isinstance(v, str) and v else json.dumps(v)]
                            for k, v in run.run_config.items()
                        ],
                    )
                ],
            )
        )
    return sec


def dice_plot(run: RunData) -> bytes | None:
    from server_app.plots import plot_dice

    if not any(r.get("dice_mean") is not None for r in run.rows):
        return None
    buf = io.BytesIO()
    title = f"{run.summary.get('method', '')} / {run.summary.get('model', '')}".strip(" /")
    plot_dice(run.rows, buf, title or "validation Dice")  # type: ignore[arg-type]
    return buf.getvalue()


def dice_section(run: RunData, prefix: str) -> Section:
    sec = Section("dice", "Validation Dice per round")
    sites = sorted({s for r in run.rows for s in r.get("sites", {})})
    if not run.rows:
        sec.blocks.append(Note("metrics.jsonl holds no rounds yet"))
        return sec
    png = dice_plot(run)
    if png:
        sec.blocks.append(
            Figure(
                f"{prefix}dice.png", png, "Validation Dice per round per site", "Round 0 is before training."
            )
        )
    rows = []
    for r in run.rows:
        cells = [str(r["round"])]
        for site in sites:
            cells.append(num(r["sites"].get(site, {}).get("dice")))
        cells += [num(r.get("dice_mean")), num(r.get("iou_mean"))]
        rows.append(cells)
    sec.blocks.append(
        Table(
            ["round", *sites, "mean Dice", "mean IoU"],
            rows,
            "Dice and IoU averaged over thresholds 0.1-0.9 on each site's validation split",
        )
    )
    if any(not r.get("sites") for r in run.rows):
        sec.blocks.append(Note("Rounds without scores had no validation (run config evaluate-every)."))
    if any("train_loss" in v for r in run.rows for v in r.get("sites", {}).values()):
        loss_rows = [
            [str(r["round"]), *(num(r["sites"].get(s, {}).get("train_loss")) for s in sites)]
            for r in run.rows
            if r["round"] > 0
        ]
        sec.blocks.append(Table(["round", *sites], loss_rows, "Local training loss per site"))
    return sec


def problems_section(run: RunData) -> Section:
    sec = Section("problems", "Dropped, absent and failing sites")
    rows = []
    for r in run.rows:
        dropped, absent, errors = r.get("dropped") or [], r.get("absent") or [], r.get("errors") or {}
        if dropped or absent or errors:
            rows.append(
                [
                    str(r["round"]),
                    ", ".join(map(str, dropped)) or "-",
                    ", ".join(map(str, absent)) or "-",
                    "; ".join(f"{k}: {v}" for k, v in errors.items()) or "-",
                ]
            )
    if rows:
        sec.blocks.append(
            Table(
                ["round", "dropped (no answer in time, or gone)", "absent (gone before asked)", "errors"],
                rows,
            )
        )
    else:
        sec.blocks.append(Para("Every site answered in every round: none dropped, none absent, no errors."))
    if run.summary.get("status") not in (None, "completed"):
        sec.blocks.append(Note(f"Why the run stopped: {run.summary.get('reason', 'n/a')}", "warning"))
    return sec


def final_section(run: RunData) -> Section:
    sec = Section("final", "Final results (test split)")
    s = run.summary
    test = s.get("test") or {}
    if not test:
        sec.blocks.append(Note(f"No final test scores: status {s.get('status', 'unknown')!r}.", "warning"))
        return sec
    initial = s.get("initial_test") or {}
    models = s.get("site_models") or {}
    rows = [
        [
            site,
            num(v.get("dice")),
            num(v.get("iou")),
            num(v.get("n")),
            num((initial.get(site) or {}).get("dice")),
            str(models.get(site) or s.get("model", "n/a")),
        ]
        for site, v in sorted(test.items())
    ]
    rows.append(
        [
            "mean",
            num(s.get("dice_test_mean")),
            num(s.get("iou_test_mean")),
            "",
            num(s.get("dice_test_initial_mean")),
            "",
        ]
    )
    hold = s.get("holdout")
    if isinstance(hold, dict):
        boot = hold.get("bootstrap") or {}
        how = f" (bootstrap: {boot.get('status')})" if boot else ""
        rows.append(
            [
                f"held out: {hold.get('site')}{how}",
                num(hold.get("dice")),
                num(hold.get("iou")),
                num(hold.get("n")),
                "",
                str(models.get(hold.get("site")) or s.get("model", "n/a")),
            ]
        )
    sec.blocks.append(
        Table(
            ["site", "test Dice", "test IoU", "images", "untrained Dice", "model"],
            rows,
            "Each site's model on its own test split (the held-out site: on all its images)",
        )
    )
    sec.blocks.append(
        Table(
            ["traffic down", "traffic up", "traffic total", "wall time"],
            [
                [
                    nbytes(s.get("bytes_down_total")),
                    nbytes(s.get("bytes_up_total")),
                    nbytes(s.get("bytes_total")),
                    seconds_text(s.get("wall_seconds")),
                ]
            ],
        )
    )
    return sec
