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

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ops.document import Document, Note, render_html, render_markdown
from ops.report_exchange import pool_section, selection_section, traffic_section
from ops.report_results import dice_section, final_section, problems_section, run_section
from ops.run_data import ReportError, RunData, load_run

__all__ = ["ReportError", "RunData", "SiteOptions", "build_report", "load_run", "write_report"]


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
        run_section(run),
        final_section(run),
        dice_section(run, prefix),
        traffic_section(run, prefix),
        selection_section(run),
        problems_section(run),
        pool_section(run, prefix),
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
