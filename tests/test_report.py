"""`dsfedmed report RUN_DIR` on a real run directory (tests/fixtures/report-run, copied from a real
run: a fresh tiny simulation takes 70 s to minutes on 2 shared cores) and a site's real state."""

from __future__ import annotations

import base64
import io
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cli.main import app

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FIXTURE = Path(__file__).parent / "fixtures" / "report-run"
SITES = ("phantom-0", "phantom-1")
SECTIONS = {"run", "final", "dice", "traffic", "selection", "problems", "pool"}
RUN_ID = 3680060487948603096  # the Flower run id of the fixture's run


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_torch_thread):
    """(run dir, the sites' state dir, {site: validation Dice of its model}).

    Each site's model is trained briefly here on the site's own data (the run's config and split)
    and kept where its ClientApp keeps it: ``<state>/run-<id>/<site>/model.pt`` + ``model.json``,
    next to the run's cached pool."""
    from client_app.state import SiteStore
    from client_app.trainer import SiteTrainer, TrainSettings
    from common.config import NodeConfig, RunConfig, parse_run_config
    from common.sites import load_site

    base = tmp_path_factory.mktemp("report")
    run_dir = shutil.copytree(FIXTURE, base / "run")
    raw = json.loads((run_dir / "config.json").read_text())["run_config"]
    known = {f.alias or n for n, f in RunConfig.model_fields.items()}  # as the report reads it
    cfg = parse_run_config({k: v for k, v in raw.items() if k in known})
    pool_id = json.loads((run_dir / "summary.json").read_text())["pool"]["id"]
    val_dice = {}
    for k, name in enumerate(SITES):
        torch.manual_seed(k)
        site, split = load_site(cfg, NodeConfig(partition_id=k))
        tr = SiteTrainer(site, split, "unet", torch.device("cpu"))
        tr.train(TrainSettings(epochs=3, batch_size=4, learning_rate=0.01, augment=False, seed=k))
        val_dice[name] = tr.evaluate("val")["dice"]
        store = SiteStore(str(base / "state"), RUN_ID, name)
        meta = {
            "model": "unet",
            "in-channels": 3,
            "image-size": 32,
            "run-id": RUN_ID,
            "site": name,
            "round": 2,
        }
        store.save_model(tr.get_weights(), meta)
        (store.dir / f"pool-{pool_id}.npz").write_bytes(b"")  # the pool the site cached in this run
    return run_dir, base / "state", val_dice


def _report(*args: str):
    return CliRunner().invoke(app, ["report", *args], env={"COLUMNS": "200"})


class _Page(HTMLParser):
    """Sections (id -> text), table rows (first cells), image sources, and anything external."""

    def __init__(self):
        super().__init__()
        self.sections: dict[str, str] = {}
        self.rows: list[list[str]] = []
        self.section_rows: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self.external: list[str] = []
        self._section: str | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self._section = a.get("id")
            self.sections[self._section] = ""
            self.section_rows[self._section] = []
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(a["src"])
        if tag in ("script", "link", "iframe") or any(
            k in ("src", "href") and v and not v.startswith(("data:", "#")) for k, v in attrs
        ):
            self.external.append(f"<{tag} {attrs}>")

    def handle_endtag(self, tag):
        if tag == "section":
            self._section = None
        elif tag in ("td", "th") and self._row is not None and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            if self._section is not None:
                self.section_rows[self._section].append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._section is not None:
            self.sections[self._section] += data


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text())
    page.close()
    return page


def _png(data: bytes) -> Image.Image:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def _decode(src: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:40]
    return _png(base64.b64decode(src[len(prefix) :]))


def _copy_run(run_dir: Path, dest: Path, skip: tuple[str, ...] = ()) -> Path:
    """The run directory's small files (not the checkpoints), less ``skip``."""
    dest.mkdir(parents=True)
    for p in run_dir.iterdir():
        if p.is_file() and p.name not in skip:
            shutil.copy2(p, dest / p.name)
    return dest


def test_report_html_and_markdown(run, tmp_path):
    run_dir, _, _ = run
    out = tmp_path / "rep"
    res = _report(str(run_dir), "--out", str(out))
    assert res.exit_code == 0, res.output
    page = _parse(out / "report.html")
    assert set(page.sections) == SECTIONS  # no site section without the site option
    assert page.external == []  # self-contained: no script, stylesheet or remote image
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    by_first = {r[0]: r for r in page.section_rows["final"] if r}
    for site in SITES:  # the final table: test Dice per site, as in summary.json
        assert by_first[site][1] == f"{summary['test'][site]['dice']:.3f}"
    assert by_first["mean"][1] == f"{summary['dice_test_mean']:.3f}"
    # Dice per round per site, traffic per round, selection per round
    for r in rows:
        dice_row = next(x for x in page.section_rows["dice"] if x[0] == str(r["round"]))
        assert dice_row[1:3] == [f"{r['sites'][s]['dice']:.3f}" for s in SITES]
    assert "n_selected" not in page.sections["selection"]  # columns have readable names
    sel_rows = page.section_rows["selection"][1:]
    assert len(sel_rows) == 2 and all(x[3] == "4" for x in sel_rows)  # 4 of 8 selected
    assert "phantom-0 down / up" in page.sections["traffic"]
    assert "Every site answered" in page.sections["problems"]
    assert "Pool quality" in page.sections["pool"]
    assert "litemedsam" in page.sections["run"] and "logits" in page.sections["run"]
    # every embedded image decodes as a PNG: Dice plot, traffic plot, pool contact sheet
    assert len(page.images) == 3
    for src in page.images:
        assert _decode(src).size[0] > 100
    md = (out / "report.md").read_text()
    links = [line[line.index("](") + 2 : -1] for line in md.splitlines() if line.startswith("![")]
    assert len(links) == 3
    for name in links:
        _png((out / name).read_bytes())
    assert "## Final results (test split)" in md and "| phantom-1 |" in md


def test_format_option_and_default_out(run, tmp_path):
    run_dir, _, _ = run
    copy = _copy_run(run_dir, tmp_path / "run")
    res = _report(str(copy), "--format", "md")
    assert res.exit_code == 0, res.output
    assert (copy / "report" / "report.md").is_file() and not (copy / "report" / "report.html").exists()
    res = _report(str(copy), "--format", "pdf")
    assert res.exit_code == 2 and "--format" in res.output


def test_missing_optional_pieces_are_noted(run, tmp_path):
    run_dir, _, _ = run
    copy = _copy_run(run_dir, tmp_path / "run", skip=("pool.png", "pool_score.json", "config.json"))
    res = _report(str(copy), "--out", str(tmp_path / "rep"), "--format", "html")
    assert res.exit_code == 0, res.output
    page = _parse(tmp_path / "rep" / "report.html")
    assert "pool.png not present" in page.sections["pool"]
    assert "Pool quality" in page.sections["pool"]  # from summary.json's copy of the pool score
    assert "config.json not found" in page.sections["run"]
    assert len(page.images) == 2


def test_missing_summary_or_corrupt_metrics_exit_2(run, tmp_path):
    run_dir, _, _ = run
    no_summary = _copy_run(run_dir, tmp_path / "a", skip=("summary.json",))
    res = _report(str(no_summary))
    assert res.exit_code == 2 and "summary.json" in res.output and "not found" in res.output
    corrupt = _copy_run(run_dir, tmp_path / "b")
    with open(corrupt / "metrics.jsonl", "a") as fh:
        fh.write('{"round": 3, "sites": {"phantom-0": {"dice": 0.5\n')
    res = _report(str(corrupt))
    assert res.exit_code == 2 and "metrics.jsonl" in res.output and "line 4" in res.output
    no_metrics = _copy_run(run_dir, tmp_path / "c", skip=("metrics.jsonl",))
    res = _report(str(no_metrics))
    assert res.exit_code == 2 and "metrics.jsonl" in res.output
    bad_summary = _copy_run(run_dir, tmp_path / "d")
    (bad_summary / "summary.json").write_text("{not json")
    res = _report(str(bad_summary))
    assert res.exit_code == 2 and "summary.json" in res.output
    assert not any((tmp_path / d / "report").exists() for d in "abcd")


def test_site_only_section_with_the_site_option(run, tmp_path):
    run_dir, state, val_dice = run
    out = tmp_path / "rep"
    res = _report(
        str(run_dir),
        "--out",
        str(out),
        "--site-node-config",
        f"partition-id=0 state-dir='{state}'",
    )
    assert res.exit_code == 0, res.output
    assert "operator only" in res.output
    assert not (out / "report.html").exists()  # the private report has its own name
    page = _parse(out / "report-site-phantom-0.html")
    assert set(page.sections) == SECTIONS | {"site"}
    text = page.sections["site"]
    assert "phantom-0's operator only" in text and "not sent anywhere" in text
    assert "model.pt" in text and "phantom-1" not in text
    # the site's own model on the run's validation split: the Dice its trainer measures there
    assert f"Dice (thresholds 0.1-0.9) {val_dice['phantom-0']:.3f}" in text
    n_val = json.loads((run_dir / "config.json").read_text())["site_profiles"]["phantom-0"]["n-val"]
    overlays = page.images[3:]
    assert len(overlays) == n_val
    for src in overlays:
        assert _decode(src).mode == "RGB"
    md = (out / "report-site-phantom-0.md").read_text()
    assert md.count("](report-site-phantom-0-val-") == n_val
    assert "**Site only:**" in md.split("## Run")[0]  # the banner comes first


def test_site_section_of_a_weights_run_uses_the_global_checkpoint(run, tmp_path):
    """FedAvg (and weights exchange): the site's model is the federation's final global model."""
    from client_app.state import SiteStore
    from server_app.rundir import RunDirectory

    run_dir, state, _ = run
    copy = _copy_run(run_dir, tmp_path / "run")
    cfg = json.loads((copy / "config.json").read_text())
    cfg["run_config"]["method"] = "fedavg"
    (copy / "config.json").write_text(json.dumps(cfg))
    weights = next(state.glob("run-*/phantom-1/model.pt"))
    rid = int(weights.parent.parent.name.removeprefix("run-"))
    RunDirectory(copy).save_checkpoint(
        "global_final.pt", SiteStore(str(state), rid, "phantom-1").load_model(), {"round": 2, "model": "unet"}
    )
    res = _report(
        str(copy), "--out", str(tmp_path / "rep"), "--format", "html", "--site-node-config", "partition-id=1"
    )
    assert res.exit_code == 0, res.output
    text = _parse(tmp_path / "rep" / "report-site-phantom-1.html").sections["site"]
    assert "final global model" in text and "global_final.pt" in text
    # no checkpoint: a clear error naming it
    (copy / "checkpoints" / "global_final.pt").unlink()
    res = _report(str(copy), "--out", str(tmp_path / "rep2"), "--site-node-config", "partition-id=1")
    assert res.exit_code == 2 and "global_final.pt" in res.output


def test_site_option_errors_are_clear(run, tmp_path):
    run_dir, state, _ = run
    res = _report(
        str(run_dir),
        "--out",
        str(tmp_path / "r"),
        "--site-node-config",
        "partition-id=0 state-dir='/nowhere'",
    )
    assert res.exit_code == 2 and "/nowhere" in res.output
    # the state dir alone: it holds two sites, so the report asks which
    res = _report(str(run_dir), "--out", str(tmp_path / "r"), "--site-state", str(state))
    assert res.exit_code == 2 and "phantom-0" in res.output and "site-name" in res.output
    # ... and with the site named, finds its images (a phantom site) and its model there
    res = _report(
        str(run_dir),
        "--out",
        str(tmp_path / "r"),
        "--site-state",
        str(state),
        "--site-node-config",
        "site-name='phantom-1'",
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r" / "report-site-phantom-1.html").is_file()


def test_stopped_run_with_dropped_and_failing_sites(run, tmp_path):
    """A run that stopped: the problems per round, the reason, and no final table."""
    run_dir, _, _ = run
    copy = _copy_run(run_dir, tmp_path / "run")
    rows = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
    rows[2].update(
        dropped=["phantom-1"],
        absent=["phantom-1"],
        errors={"phantom-0": "rejected train reply: no 'probs' record"},
    )
    (copy / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    reason = "round 3: 0 usable train repl(ies), min-sites is 2"
    (copy / "summary.json").write_text(
        json.dumps(
            {"status": "stopped", "reason": reason, "method": "dsfedmed", "rounds": 2, "bytes_total": 1}
        )
    )
    res = _report(str(copy), "--out", str(tmp_path / "rep"), "--format", "html")
    assert res.exit_code == 0, res.output
    page = _parse(tmp_path / "rep" / "report.html")
    row = next(r for r in page.section_rows["problems"] if r[0] == "2")
    assert row[1:] == ["phantom-1", "phantom-1", "phantom-0: rejected train reply: no 'probs' record"]
    assert reason in page.sections["problems"] and reason in page.sections["run"]
    assert "No final test scores" in page.sections["final"]


def test_markdown_report_renders_site_strings_literally():
    """A site name or reason carrying Markdown or HTML (links, images, markup, table pipes, list or
    heading starts) is shown as text in every kind of block, never interpreted."""
    from ops.document import Details, Document, Figure, Note, Para, Section, Table, render_markdown

    evil = "C1 [click](http://x) ![i](http://y) <script>alert(1)</script> **b** | `c` # h"
    doc = Document(
        evil,
        "- " + evil,
        [
            Section(
                "a",
                evil,
                [
                    Para("1. " + evil),
                    Note(evil, "warning"),
                    Table(["site"], [[evil]], caption=evil),
                    Figure("f.png", b"png", evil, caption=evil),
                    Details(evil, [Para(evil)]),
                ],
            )
        ],
    )
    text, _ = render_markdown(doc)
    for bad in ("[click]", "![i]", "<script>", "**b**", "`c`", "| `c`"):
        assert bad not in text, bad
    assert "\\[click\\]" in text and "&lt;script&gt;" in text and "\\*\\*b\\*\\*" in text
    assert not any(line.startswith(("- ", "1. ")) for line in text.splitlines())
    body = [line for line in text.splitlines() if line.startswith("| C1")]
    assert len(body) == 1 and body[0].count(" | ") == 0  # one cell: the pipe is escaped
