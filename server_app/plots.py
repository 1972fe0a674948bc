"""Plots people would rather look at than read: Dice per round per site."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_dice(rows: list[dict], out: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    sites = sorted({s for r in rows for s in r.get("sites", {})})
    for site in sites:
        xs = [r["round"] for r in rows if r.get("sites", {}).get(site, {}).get("dice") is not None]
        ys = [
            r["sites"][site]["dice"] for r in rows if r.get("sites", {}).get(site, {}).get("dice") is not None
        ]
        ax.plot(xs, ys, marker="o", label=site)
    xs = [r["round"] for r in rows if r.get("dice_mean") is not None]
    ys = [r["dice_mean"] for r in rows if r.get("dice_mean") is not None]
    ax.plot(xs, ys, color="black", linewidth=2.5, label="mean")
    ax.set_xlabel("round (0 = before training)")
    ax.set_ylabel("Dice (validation, thresholds 0.1-0.9)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
