"""Report sections on what the run exchanged: traffic by kind and site, DSFedMed's selection, and
the synthetic pool."""

from __future__ import annotations

import numpy as np

from ops.document import Figure, Note, Para, Section, Table
from ops.run_data import RunData, nbytes, num, png, seconds_text


def traffic_plot(run: RunData) -> bytes:
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
    return png(fig)


def traffic_section(run: RunData, prefix: str) -> Section:
    sec = Section("traffic", "Traffic per round")
    if not run.rows:
        sec.blocks.append(Note("metrics.jsonl holds no rounds yet"))
        return sec
    sec.blocks.append(Figure(f"{prefix}traffic.png", traffic_plot(run), "Bytes per round, both directions"))
    sites = sorted({s for r in run.rows for s in (r.get("bytes_per_site") or {})})
    rows = []
    for r in run.rows:
        per = r.get("bytes_per_site") or {}
        rows.append(
            [
                str(r["round"]),
                nbytes(r.get("bytes_down")),
                nbytes(r.get("bytes_up")),
                seconds_text(r.get("seconds")),
                *(f"{nbytes(per[s]['down'])} / {nbytes(per[s]['up'])}" if s in per else "-" for s in sites),
            ]
        )
    tot_d = sum(r.get("bytes_down") or 0 for r in run.rows)
    tot_u = sum(r.get("bytes_up") or 0 for r in run.rows)
    rows.append(["all rounds", nbytes(tot_d), nbytes(tot_u), "", *("" for _ in sites)])
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
                f"{nbytes(s.get('bytes_down_total'))} down, {nbytes(s.get('bytes_up_total'))} up, "
                f"{nbytes(s.get('bytes_total'))} in total."
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


def selection_section(run: RunData) -> Section:
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
                *(num(sel.get(k), 4) for k in known),
                *(num(sel.get(k), 4) for k in extra),
                num(r.get("fm_distill_loss"), 4),
                num(r.get("pool_sent_whole")),
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


def pool_section(run: RunData, prefix: str) -> Section:
    sec = Section("pool", "Synthetic pool")
    if run.summary.get("method") not in (None, "dsfedmed"):
        sec.blocks.append(Note(f"No synthetic pool: method {run.summary.get('method')}."))
        return sec
    pool = run.summary.get("pool") or {}
    if pool:
        rows = [
            ["id", str(pool.get("id", "n/a"))],
            ["samples", num(pool.get("size"))],
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
                num(v.get("dice_pool")),
                num(v.get("dice_real")),
                num(v.get("n_pool"), 0),
                num(v.get("n_real"), 0),
            ]
            for site, v in sorted((score.get("sites") or {}).items())
        ]
        rows.append(["mean", num(score.get("dice_pool_mean")), num(score.get("dice_real_mean")), "", ""])
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
