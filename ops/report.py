"""A report of one federated run (``dsfedmed report RUN_DIR``), as self-contained HTML and Markdown.

Built from the server's run directory (``server_app/rundir.py``): ``config.json`` (run config and
site profiles), ``metrics.jsonl`` (one row per round, written by ``DeadlineFedAvg._log_row``; DSFedMed
rows add ``selection``, ``fm_distill_loss``, ``pool_sent_whole``, and round 0 the pool's id, size
and score), ``summary.json`` (final test scores, holdout, traffic, time), ``pool.png`` and
``pool_score.json``. ``metrics.jsonl`` and ``summary.json`` are required; every other piece is
optional and its section says so when it is missing.

The HTML file embeds its images as ``data:`` URIs and its CSS inline: no script, no external asset,
so it can be mailed or archived as one file. The Markdown version writes its PNGs next to itself.

Site-only section: with a site's node config (or state dir), the report also shows that site's own
validation images with its own trained model's prediction. Those are private images: that report
is written under another name, says at the top and in the section that it is for the site's
operator only, and nothing of it leaves the machine.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from ops.document import (
    Details,
    Document,
    Figure,
    Note,
    Para,
    Section,
    Table,
    render_html,
    render_markdown,
)


class ReportError(RuntimeError):
    """The run directory (or the site's data/model) cannot be used; the message names the file."""


# --- reading the run directory --------------------------------------------------------------------


@dataclass
class RunData:
    path: Path
    rows: list[dict]
    summary: dict
    run_config: dict
    profiles: dict
    pool_score: dict | None
    notes: list[str]


def _read_json_file(path: Path, required: bool) -> tuple[Any, str | None]:
    """(data, problem); a required file that is missing or corrupt raises ReportError."""
    if not path.is_file():
        msg = f"{path} not found"
        if required:
            raise ReportError(msg)
        return None, msg
    try:
        return json.loads(path.read_text()), None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        msg = f"{path} is not valid JSON ({exc})"
        if required:
            raise ReportError(msg) from None
        return None, msg


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        raise ReportError(f"{path} not found: is {path.parent} a run directory (server_app/rundir.py)?")
    rows = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path} cannot be read: {exc}") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ReportError(f"{path} is corrupt: line {i} is not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("round"), int):
            raise ReportError(f"{path} is corrupt: line {i} is not a round's metrics object")
        if not isinstance(row.get("sites", {}), dict):
            raise ReportError(f"{path} is corrupt: line {i} has 'sites' that is not an object")
        rows.append(row)
    return sorted(rows, key=lambda r: r["round"])


def load_run(run_dir: Path) -> RunData:
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise ReportError(f"run directory not found: {run_dir}")
    rows = _read_metrics(run_dir / "metrics.jsonl")
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise ReportError(
            f"{summary_path} not found: the run has not finished (or {run_dir} is not a run directory)"
        )
    summary, _ = _read_json_file(summary_path, required=True)
    if not isinstance(summary, dict):
        raise ReportError(f"{summary_path} is corrupt: it holds no JSON object")
    notes = []
    config, problem = _read_json_file(run_dir / "config.json", required=False)
    if problem:
        notes.append(f"run config unavailable: {problem}")
    config = config if isinstance(config, dict) else {}
    pool_score, problem = _read_json_file(run_dir / "pool_score.json", required=False)
    if problem and (run_dir / "pool_score.json").exists():
        notes.append(f"pool score unavailable: {problem}")
    return RunData(
        run_dir.resolve(),
        rows,
        summary,
        config.get("run_config") or {},
        config.get("site_profiles") or {},
        pool_score if isinstance(pool_score, dict) else None,
        notes,
    )


# --- formatting -----------------------------------------------------------------------------------


def _num(x: Any, digits: int = 3) -> str:
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}" if abs(x) >= 10_000 else str(x)
    if isinstance(x, float):
        return f"{x:.{digits}f}" if np.isfinite(x) else "n/a"
    return "n/a" if x is None else str(x)


def _bytes(n: Any) -> str:
    if not isinstance(n, int | float):
        return "n/a"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _seconds(s: Any) -> str:
    if not isinstance(s, int | float):
        return "n/a"
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def _sites(run: RunData) -> list[str]:
    named = run.summary.get("sites") or []
    seen = {s for r in run.rows for s in r.get("sites", {})} | set(run.summary.get("test") or {})
    return sorted(set(named) | seen)


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


# --- sections -------------------------------------------------------------------------------------


def _run_section(run: RunData) -> Section:
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
        ["training sites", ", ".join(_sites(run)) or "n/a"],
        ["held-out site", str(c.get("holdout-site") or "none")],
        ["rounds (completed of configured)", rounds],
        ["data", str(c.get("data-root") or "built-in phantom sites")],
        ["image size", f"{c['image-size']} px" if "image-size" in c else "n/a"],
        ["seed", _num(c.get("seed"))],
        ["wall time", _seconds(s.get("wall_seconds"))],
    ]
    if method == "dsfedmed":
        rows[5:5] = [
            [
                "foundation model",
                f"{s.get('fm') or c.get('fm', 'n/a')} ({_num(s.get('fm_params'))} parameters)",
            ],
            [
                "synthetic pool",
                f"{c.get('pool-source', 'n/a')}, {_num((s.get('pool') or {}).get('size') or c.get('pool-size'))} samples",
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
                    _num(p.get("n-train")),
                    _num(p.get("n-val")),
                    _num(p.get("n-test")),
                    _num(p.get("n-skipped")),
                    str(p.get("model", "n/a")),
                    _num(p.get("model-params")),
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


def _dice_plot(run: RunData) -> bytes | None:
    from server_app.plots import plot_dice

    if not any(r.get("dice_mean") is not None for r in run.rows):
        return None
    buf = io.BytesIO()
    title = f"{run.summary.get('method', '')} / {run.summary.get('model', '')}".strip(" /")
    plot_dice(run.rows, buf, title or "validation Dice")  # type: ignore[arg-type]
    return buf.getvalue()


def _dice_section(run: RunData, prefix: str) -> Section:
    sec = Section("dice", "Validation Dice per round")
    sites = sorted({s for r in run.rows for s in r.get("sites", {})})
    if not run.rows:
        sec.blocks.append(Note("metrics.jsonl holds no rounds yet"))
        return sec
    png = _dice_plot(run)
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
            cells.append(_num(r["sites"].get(site, {}).get("dice")))
        cells += [_num(r.get("dice_mean")), _num(r.get("iou_mean"))]
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
            [str(r["round"]), *(_num(r["sites"].get(s, {}).get("train_loss")) for s in sites)]
            for r in run.rows
            if r["round"] > 0
        ]
        sec.blocks.append(Table(["round", *sites], loss_rows, "Local training loss per site"))
    return sec


def _traffic_plot(run: RunData) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in run.rows]
    down = np.array([r.get("bytes_down") or 0 for r in run.rows], float) / 1e3
    up = np.array([r.get("bytes_up") or 0 for r in run.rows], float) / 1e3
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    x = np.arange(len(rounds))
    ax.bar(x - 0.2, down, 0.4, label="server to sites")
    ax.bar(x + 0.2, up, 0.4, label="sites to server")
    ax.set_xticks(x, [str(r) for r in rounds])
    ax.set_xlabel("round (0 = set-up: profiles, pool, first evaluation)")
    ax.set_ylabel("kB (all sites)")
    if len(down) and max(down.max(), up.max()) > 50 * max(np.median(np.r_[down, up]), 1e-9):
        ax.set_yscale("log")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    ax.set_title("Traffic per round")
    fig.tight_layout()
    return _png(fig)


def _traffic_section(run: RunData, prefix: str) -> Section:
    sec = Section("traffic", "Traffic per round")
    if not run.rows:
        sec.blocks.append(Note("metrics.jsonl holds no rounds yet"))
        return sec
    sec.blocks.append(Figure(f"{prefix}traffic.png", _traffic_plot(run), "Bytes per round, both directions"))
    sites = sorted({s for r in run.rows for s in (r.get("bytes_per_site") or {})})
    rows = []
    for r in run.rows:
        per = r.get("bytes_per_site") or {}
        rows.append(
            [
                str(r["round"]),
                _bytes(r.get("bytes_down")),
                _bytes(r.get("bytes_up")),
                _seconds(r.get("seconds")),
                *(f"{_bytes(per[s]['down'])} / {_bytes(per[s]['up'])}" if s in per else "-" for s in sites),
            ]
        )
    tot_d = sum(r.get("bytes_down") or 0 for r in run.rows)
    tot_u = sum(r.get("bytes_up") or 0 for r in run.rows)
    rows.append(["all rounds", _bytes(tot_d), _bytes(tot_u), "", *("" for _ in sites)])
    sec.blocks.append(
        Table(
            ["round", "down", "up", "time", *(f"{s} down / up" for s in sites)],
            rows,
            "Bytes counted from the serialised messages; down = server to sites",
        )
    )
    s = run.summary
    if "bytes_total" in s:
        sec.blocks.append(
            Para(
                f"Whole run (includes the final test evaluation, which has no row above): "
                f"{_bytes(s.get('bytes_down_total'))} down, {_bytes(s.get('bytes_up_total'))} up, "
                f"{_bytes(s.get('bytes_total'))} in total."
            )
        )
    return sec


_SELECTION_COLUMNS = (
    ("rule", "rule"),
    ("n_candidates", "candidates"),
    ("n_selected", "selected"),
    ("fm_only", "FM term only"),
    ("score_mean_selected", "score (selected)"),
    ("fm_loss_mean_selected", "FM loss (selected)"),
    ("fm_loss_mean_all", "FM loss (all)"),
    ("kl_mean_selected", "KL (selected)"),
    ("kl_mean_all", "KL (all)"),
)


def _selection_section(run: RunData) -> Section:
    sec = Section("selection", "Selection of synthetic samples")
    rows = [r for r in run.rows if isinstance(r.get("selection"), dict)]
    if not rows:
        method = run.summary.get("method", "this method")
        sec.blocks.append(Note(f"No selection statistics: {method} runs do not select synthetic samples."))
        return sec
    known = [k for k, _ in _SELECTION_COLUMNS]
    extra = sorted({k for r in rows for k in r["selection"]} - set(known))
    header = ["round", *(h for _, h in _SELECTION_COLUMNS), *extra, "FM distill loss", "pool sent whole"]
    table = []
    for r in rows:
        sel = r["selection"]
        table.append(
            [
                str(r["round"]),
                *(_num(sel.get(k), 4) for k in known),
                *(_num(sel.get(k), 4) for k in extra),
                _num(r.get("fm_distill_loss"), 4),
                _num(r.get("pool_sent_whole")),
            ]
        )
    sec.blocks.append(
        Table(header, table, "Learnability-guided selection per round (server_app/selection.py)")
    )
    sec.blocks.append(
        Para(
            "score = lambda * (-FM loss on the synthetic mask) + (1 - lambda) * symmetric KL between the FM "
            "and the sites' ensemble; rounds with 'FM term only' had no ensemble yet. Samples not yet seen "
            "by the sites count with zero disagreement."
        )
    )
    return sec


def _problems_section(run: RunData) -> Section:
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


def _pool_section(run: RunData, prefix: str) -> Section:
    sec = Section("pool", "Synthetic pool")
    if run.summary.get("method") not in (None, "dsfedmed"):
        sec.blocks.append(Note(f"No synthetic pool: method {run.summary.get('method')}."))
        return sec
    pool = run.summary.get("pool") or {}
    if pool:
        rows = [
            ["id", str(pool.get("id", "n/a"))],
            ["samples", _num(pool.get("size"))],
            ["source", str(pool.get("source") or run.run_config.get("pool-source", "n/a"))],
        ]
        gens = pool.get("generators") or {}
        if gens:
            rows.append(["generators from", ", ".join(sorted(gens))])
        sec.blocks.append(Table(["pool", ""], rows))
    sheet = run.path / "pool.png"
    if sheet.is_file():
        sec.blocks.append(
            Figure(
                f"{prefix}pool.png",
                sheet.read_bytes(),
                "Contact sheet of the synthetic pool",
                "Synthetic images with their masks (the pool the sites distil on).",
            )
        )
    else:
        sec.blocks.append(Note("pool.png not present in the run directory: no contact sheet."))
    score = run.pool_score or pool.get("score")
    if score:
        rows = [
            [
                site,
                _num(v.get("dice_pool")),
                _num(v.get("dice_real")),
                _num(v.get("n_pool"), 0),
                _num(v.get("n_real"), 0),
            ]
            for site, v in sorted((score.get("sites") or {}).items())
        ]
        rows.append(["mean", _num(score.get("dice_pool_mean")), _num(score.get("dice_real_mean")), "", ""])
        sec.blocks.append(
            Table(
                ["site", "Dice, trained on pool", "Dice, trained on real", "pool images", "real images"],
                rows,
                f"Pool quality: validation Dice of a site model trained {score.get('epochs', '?')} epoch(s) "
                "on the pool alone, against as many of the site's real images (pool_score.json)",
            )
        )
        for site, why in (score.get("errors") or {}).items():
            sec.blocks.append(Note(f"{site} could not score the pool: {why}", "warning"))
    else:
        sec.blocks.append(Note("pool_score.json not present (run config pool-score-epochs = 0)."))
    return sec


def _final_section(run: RunData) -> Section:
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
            _num(v.get("dice")),
            _num(v.get("iou")),
            _num(v.get("n")),
            _num((initial.get(site) or {}).get("dice")),
            str(models.get(site) or s.get("model", "n/a")),
        ]
        for site, v in sorted(test.items())
    ]
    rows.append(
        [
            "mean",
            _num(s.get("dice_test_mean")),
            _num(s.get("iou_test_mean")),
            "",
            _num(s.get("dice_test_initial_mean")),
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
                _num(hold.get("dice")),
                _num(hold.get("iou")),
                _num(hold.get("n")),
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
                    _bytes(s.get("bytes_down_total")),
                    _bytes(s.get("bytes_up_total")),
                    _bytes(s.get("bytes_total")),
                    _seconds(s.get("wall_seconds")),
                ]
            ],
        )
    )
    return sec


# --- the whole report -------------------------------------------------------------------------------


@dataclass
class SiteOptions:
    node_config: dict[str, Any]
    state_dir: Path | None = None
    run_id: int | None = None
    max_images: int = 8
    device: str = "auto"


def build_report(run: RunData, site: SiteOptions | None = None) -> tuple[Document, str]:
    """The document and the base name of its files (``report``, or ``report-site-<site>``)."""
    site_name, site_sec = (None, None)
    if site is not None:
        from ops.report_site import site_section

        site_name, site_sec = site_section(
            run, site.node_config, site.state_dir, site.run_id, site.max_images, site.device
        )
    base = "report" if site_name is None else "report-site-" + re.sub(r"[^A-Za-z0-9_.-]", "_", site_name)
    prefix = f"{base}-"
    sections = [
        _run_section(run),
        _final_section(run),
        _dice_section(run, prefix),
        _traffic_section(run, prefix),
        _selection_section(run),
        _problems_section(run),
        _pool_section(run, prefix),
    ]
    banner = None
    if site_sec is not None:
        sections.append(site_sec)
        banner = Note(
            f"Contains images of site {site_name}: for {site_name}'s operator only. Written locally; "
            "do not send or share this file outside the site. (Without the site option the report "
            "holds no site images.)",
            "private",
        )
    s = run.summary
    title = f"DSFedMed run report: {run.path.name}"
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    subtitle = (
        f"method {s.get('method', 'n/a')}, {s.get('rounds', 'n/a')} round(s), "
        f"status {s.get('status', 'unknown')}; report made {stamp}"
    )
    return Document(title, subtitle, sections, banner), base


def write_report(
    run_dir: Path, out_dir: Path | None = None, fmt: str = "both", site: SiteOptions | None = None
) -> list[Path]:
    """Write the report (``fmt``: html, md or both) and return the files written."""
    if fmt not in ("html", "md", "both"):
        raise ReportError(f"unknown format {fmt!r}; expected html, md or both")
    run = load_run(run_dir)
    doc, base = build_report(run, site)
    out_dir = Path(out_dir).expanduser() if out_dir else run.path / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if fmt in ("html", "both"):
        p = out_dir / f"{base}.html"
        p.write_text(render_html(doc))
        written.append(p)
    if fmt in ("md", "both"):
        text, files = render_markdown(doc)
        for name, data in files.items():
            (out_dir / name).write_bytes(data)
            written.append(out_dir / name)
        p = out_dir / f"{base}.md"
        p.write_text(text)
        written.append(p)
    return written
