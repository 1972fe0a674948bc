"""Preflight: a site's data folder, read with the loader the ClientApp uses (its per-file problem
report, mask value sets, class balance, source sizes); nothing is written to the site's cache."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from common.config import NodeConfig
from ops.checks import MAX_FILE_ROWS, Check, Status

# --- site data -------------------------------------------------------------------------------


def _problem_rows(report: Any, status: Status, check: str) -> list[Check]:
    rows = [Check(check, status, f"{p.path}: {p.reason}") for p in report.problems[:MAX_FILE_ROWS]]
    more = len(report.problems) - MAX_FILE_ROWS
    if more > 0:
        rows.append(Check(check, status, f"{report.folder}: {more} more file(s) with problems not listed"))
    return rows


def _mask_value_sets(folder: Path, stems: list[str], label: str) -> Check:
    """How many masks hold exactly {0, 255}, {0, 1}, one value only, or something else (soft edges
    from resizing or JPEG, several labels): the loader takes any label > 0 as foreground, so other
    sets are allowed but worth a look."""
    import numpy as np
    from PIL import Image

    from common.data import IMAGE_EXTS

    masks = {
        p.stem: p
        for p in (folder / "masks").iterdir()
        if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")
    }
    kinds: Counter[str] = Counter()
    for stem in stems:
        try:
            with Image.open(masks[stem]) as im:
                values = set(np.unique(np.asarray(im.convert("L"))).tolist())
        except (KeyError, OSError):
            continue
        if values <= {0, 255} and len(values) == 2:
            kinds["{0,255}"] += 1
        elif values <= {0, 1} and len(values) == 2:
            kinds["{0,1}"] += 1
        elif len(values) == 1:
            kinds["one value"] += 1
        else:
            kinds["other value sets"] += 1
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(kinds.items()))
    notes = []
    if kinds["other value sets"]:
        notes.append(
            f"{kinds['other value sets']} mask(s) hold values other than {{0,255}} or {{0,1}} (soft edges "
            "or several labels; any value > 0 counts as foreground)"
        )
    if kinds["{0,255}"] and kinds["{0,1}"]:
        notes.append("mixed encodings {0,255} and {0,1}")
    if notes:
        return Check(f"{label} mask values", "warn", f"{folder}/masks: {'; '.join(notes)} ({counts})")
    return Check(f"{label} mask values", "ok", f"{folder}/masks: {counts or 'none read'}")


def check_data_folder(folder: str | Path, image_size: int, label: str = "data") -> list[Check]:
    """Load ``folder`` (``images/`` + ``masks/``) exactly as the site will, and report pairs,
    skipped files (one row each), class balance and the source image sizes."""
    import numpy as np
    from PIL import Image

    from common.data import IMAGE_EXTS, SiteDataError, load_site_folder

    folder = Path(folder).expanduser()
    try:
        site = load_site_folder(folder, image_size, strict=False, cache_dir=None)
    except SiteDataError as exc:
        rows = [Check(label, "fail", str(exc))]
        report = getattr(exc, "report", None)
        if report is not None:
            rows += _problem_rows(report, "fail", f"{label} file")
        return rows
    rep, n = site.report, len(site)
    grey = ", grayscale sources" if site.source_channels == 1 else ""
    if rep.problems:
        rows = [
            Check(
                label,
                "warn",
                f"{folder}: {n} pair(s) loaded, {len(rep.problems)} file(s) skipped "
                f"({rep.n_images} image(s), {rep.n_masks} mask(s)){grey}",
            )
        ]
        rows += _problem_rows(rep, "warn", f"{label} file")
    else:
        rows = [Check(label, "ok", f"{folder}: {n} pair(s) loaded, no problems{grey}")]

    fg = site.masks.reshape(n, -1).mean(axis=1, dtype=np.float64)
    empty = int((fg == 0).sum())
    msg = (
        f"{folder}: mean foreground fraction {fg.mean():.3f} at {image_size}x{image_size}, "
        f"{empty} of {n} mask(s) empty ({empty / n:.0%})"
    )
    median = float(np.median(fg))
    if empty == n:
        rows.append(Check(f"{label} balance", "warn", msg + "; every mask is empty: nothing to learn"))
    elif median > 0.5:
        rows.append(
            Check(
                f"{label} balance",
                "warn",
                msg + f"; median foreground fraction {median:.2f} > 0.5: the masks are likely inverted "
                "(foreground must be the lesion, label > 0)",
            )
        )
    elif empty / n > 0.5 or fg.mean() < 0.005:
        rows.append(Check(f"{label} balance", "warn", msg + "; very little foreground"))
    else:
        rows.append(Check(f"{label} balance", "ok", msg))
    rows.append(_mask_value_sets(folder, site.stems, label))

    files = {
        p.stem: p
        for p in sorted((folder / "images").iterdir())
        if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")
    }
    sizes: Counter[tuple[int, int]] = Counter()
    for stem in site.stems:
        with Image.open(files[stem]) as im:  # header only: no decode
            sizes[im.size] += 1
    ws, hs = [w for w, _ in sizes], [h for _, h in sizes]

    def span(v: list[int]) -> str:
        return f"{min(v)}-{max(v)}" if min(v) != max(v) else str(v[0])

    msg = (
        f"{folder}/images: {len(sizes)} distinct size(s), width {span(ws)} x height {span(hs)} px; "
        f"resized to {image_size}x{image_size}"
    )
    if min(ws + hs) < image_size:
        msg += f" (images under {image_size} px are upsampled)"
    rows.append(Check(f"{label} sizes", "ok", msg))
    return rows


def check_site_data(node: NodeConfig, image_size: int) -> list[Check]:
    if node.data_dir:
        return check_data_folder(node.data_dir, image_size)
    if node.phantom_id is not None:
        return [Check("data", "ok", f"built-in phantom site {node.phantom_id} (no data folder)")]
    return [
        Check(
            "data",
            "fail",
            "the node config sets no data-dir: set data-dir to this site's folder with images/ and masks/",
        )
    ]
