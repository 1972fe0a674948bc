"""The report's document model (sections of paragraphs, notes, tables, figures) and its two
renderings: one self-contained HTML file (inline CSS, images as ``data:`` URIs, no script) and
Markdown with its PNGs beside it."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field

# --- the document model: sections of blocks, rendered to HTML and to Markdown --------------------


@dataclass
class Para:
    text: str


@dataclass
class Note:
    text: str
    kind: str = "note"  # note | warning | private


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Figure:
    name: str  # file name of the PNG next to the Markdown report
    png: bytes
    alt: str
    caption: str = ""


@dataclass
class Gallery:
    figures: list[Figure]


@dataclass
class Details:
    summary: str
    blocks: list


@dataclass
class Section:
    id: str
    title: str
    blocks: list = field(default_factory=list)


@dataclass
class Document:
    title: str
    subtitle: str
    sections: list[Section]
    banner: Note | None = None


# --- rendering --------------------------------------------------------------------------------------

_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;color:#1d2433;background:#f6f7f9}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{margin:0 0 4px 0;font-size:26px}.sub{color:#5b6578;margin:0 0 18px 0}
section{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:16px 20px;margin:0 0 18px 0}
h2{font-size:19px;margin:0 0 12px 0}
table{border-collapse:collapse;margin:8px 0 12px 0;font-size:13px}
th,td{border:1px solid #dde1e8;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef1f5}tr:nth-child(even) td{background:#fafbfc}
caption{caption-side:top;text-align:left;color:#5b6578;font-size:12px;padding:2px 0}
figure{margin:8px 0}figure img{max-width:100%;border:1px solid #dde1e8}
figcaption{color:#5b6578;font-size:12px}
.gallery{display:flex;flex-wrap:wrap;gap:10px}.gallery figure{margin:0}
.note{padding:8px 12px;border-radius:6px;margin:8px 0;background:#eef4ff;border-left:4px solid #5b8def}
.warning{background:#fff6e5;border-left-color:#e5a100}
.private{background:#fdecec;border-left-color:#d33;font-weight:600}
nav a{margin-right:12px;font-size:13px}details{margin:8px 0}summary{cursor:pointer;color:#34425c}
"""


def _html_block(b, out: list[str]) -> None:
    e = html.escape
    if isinstance(b, Para):
        out.append(f"<p>{e(b.text)}</p>")
    elif isinstance(b, Note):
        out.append(f'<div class="note {e(b.kind)}">{e(b.text)}</div>')
    elif isinstance(b, Table):
        out.append("<table>")
        if b.caption:
            out.append(f"<caption>{e(b.caption)}</caption>")
        out.append("<thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in b.header) + "</tr></thead><tbody>")
        for row in b.rows:
            out.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>")
        out.append("</tbody></table>")
    elif isinstance(b, Figure):
        data = base64.b64encode(b.png).decode("ascii")
        cap = f"<figcaption>{e(b.caption)}</figcaption>" if b.caption else ""
        out.append(f'<figure><img alt="{e(b.alt)}" src="data:image/png;base64,{data}">{cap}</figure>')
    elif isinstance(b, Gallery):
        out.append('<div class="gallery">')
        for f in b.figures:
            _html_block(f, out)
        out.append("</div>")
    elif isinstance(b, Details):
        out.append(f"<details><summary>{e(b.summary)}</summary>")
        for x in b.blocks:
            _html_block(x, out)
        out.append("</details>")
    else:  # pragma: no cover - a programming error
        raise TypeError(f"unknown block {b!r}")


def render_html(doc: Document) -> str:
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(doc.title)}</title><style>{_CSS}</style></head><body><main>",
        f"<h1>{e(doc.title)}</h1>",
        f'<p class="sub">{e(doc.subtitle)}</p>',
    ]
    if doc.banner:
        _html_block(doc.banner, out)
    out.append("<nav>" + "".join(f'<a href="#{e(s.id)}">{e(s.title)}</a>' for s in doc.sections) + "</nav>")
    for s in doc.sections:
        out.append(f'<section id="{e(s.id)}"><h2>{e(s.title)}</h2>')
        for b in s.blocks:
            _html_block(b, out)
        out.append("</section>")
    out.append("</main></body></html>\n")
    return "\n".join(out)


_MD_SPECIAL = "`*_[]#!~|"  # with [ ] escaped no link or image can form


def _md_text(text: str) -> str:
    """Any text in the Markdown report (site names, reasons, paths included) as literal text: every
    character Markdown or HTML would interpret is escaped, so a string from a site cannot add links,
    images, emphasis, headings, table cells or markup."""
    text = str(text).replace("\\", "\\\\").replace("\r", " ").replace("\n", " ")
    text = "".join(f"\\{c}" if c in _MD_SPECIAL else c for c in text)
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _md_para(text: str) -> str:
    """A paragraph's text: literal (:func:`_md_text`), and never a list item or a quote."""
    return re.sub(r"^(\s*)([-+]|\d+\.)", r"\1\\\2", _md_text(text))


def _md_cell(text: str) -> str:
    return _md_text(text)


def _md_block(b, out: list[str], files: dict[str, bytes]) -> None:
    if isinstance(b, Para):
        out += [_md_para(b.text), ""]
    elif isinstance(b, Note):
        label = {"warning": "Warning", "private": "Site only"}.get(b.kind, "Note")
        out += [f"> **{label}:** {_md_para(b.text)}", ""]
    elif isinstance(b, Table):
        if b.caption:
            out += [f"*{_md_text(b.caption)}*", ""]
        out.append("| " + " | ".join(_md_cell(h) or " " for h in b.header) + " |")
        out.append("|" + "|".join("---" for _ in b.header) + "|")
        out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
        out.append("")
    elif isinstance(b, Figure):
        files[b.name] = b.png
        out += [f"![{_md_text(b.alt)}]({b.name})", ""]
        if b.caption:
            out += [f"*{_md_text(b.caption)}*", ""]
    elif isinstance(b, Gallery):
        for f in b.figures:
            _md_block(f, out, files)
    elif isinstance(b, Details):
        out += [f"**{_md_text(b.summary)}**", ""]
        for x in b.blocks:
            _md_block(x, out, files)
    else:  # pragma: no cover
        raise TypeError(f"unknown block {b!r}")


def render_markdown(doc: Document) -> tuple[str, dict[str, bytes]]:
    """The Markdown text and the PNG files it links to (name -> bytes)."""
    out, files = [f"# {_md_text(doc.title)}", "", _md_para(doc.subtitle), ""], {}
    if doc.banner:
        _md_block(doc.banner, out, files)
    for s in doc.sections:
        out += [f"## {_md_text(s.title)}", ""]
        for b in s.blocks:
            _md_block(b, out, files)
    return "\n".join(out).rstrip() + "\n", files
