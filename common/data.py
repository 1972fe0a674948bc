"""Site data: an ``images/`` + ``masks/`` folder with matching file stems.

Loading validates every pair and reports problems per file (missing mask, unreadable or
truncated image, an entry named like an image that is not a regular file, a duplicate stem, size
mismatch, multi-channel or unexpected mask values, empty folder).  Whatever a decoder raises on a
damaged file becomes a report line, never an exception out of the loader: the loader raises
:class:`SiteDataError` only (missing or unlistable folder, empty folder, strict mode, nothing usable).
``strict=True`` fails on the first report; the default skips bad pairs and records them in the
:class:`DataReport`, which travels with the loaded arrays so operators can see what was dropped.

Images are converted to 3-channel RGB (grayscale is replicated, the source channel count is kept),
resized to ``image_size``x``image_size`` and stored as uint8; masks become {0,1} uint8 foreground
(any label > 0).  A decoded site is cached on disk (keyed by file names, sizes, mtimes and the
image size) because Flower may start a fresh ClientApp process for every message. Kept rather than
MONAI's datasets: ``PersistentDataset`` stores torch pickles, which the project never loads from
disk, and ``CacheDataset`` lives in one process's memory; this cache is a pickle-free ``.npz``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from common.fileio import atomic_savez

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
MAX_LABEL = 10  # masks may hold small integer labels 0..MAX_LABEL; foreground = label > 0
CACHE_VERSION = 2  # 2: entries that are not regular files and duplicate stems are reported


class SiteDataError(RuntimeError):
    """The site folder cannot be used (missing, empty, or bad files in strict mode)."""


@dataclass
class Problem:
    path: str
    reason: str


# the kinds of data problem a site reports by count (reasons start with one of these; what follows may
# name files, so only the kind leaves the site)
PROBLEM_KINDS = {
    "missing mask": "missing mask",
    "mask without image": "mask without image",
    "unreadable or truncated image": "unreadable or truncated image",
    "unreadable or truncated mask": "unreadable or truncated mask",
    "mask/image size mismatch": "mask and image sizes differ",
    "unexpected mask values": "unexpected mask values",
    "mask has": "mask channels that differ",
    "unsupported mask mode": "unsupported mask mode",
    "duplicate stem": "duplicate stem",
}


@dataclass
class DataReport:
    folder: str
    n_images: int = 0
    n_masks: int = 0
    n_loaded: int = 0
    problems: list[Problem] = field(default_factory=list)
    source_channels: list[int] = field(default_factory=list)

    def add(self, path: Path | str, reason: str) -> None:
        self.problems.append(Problem(str(path), reason))

    def summary(self, max_paths: int = 5) -> str:
        if not self.problems:
            return f"{self.folder}: {self.n_loaded} pairs loaded, no problems"
        by_reason: dict[str, list[str]] = {}
        for p in self.problems:
            by_reason.setdefault(p.reason.split(":")[0], []).append(p.path)
        parts = [
            f"{len(paths)} x {reason} (first: {', '.join(paths[:max_paths])})"
            for reason, paths in by_reason.items()
        ]
        return f"{self.folder}: {len(self.problems)} problem(s), {self.n_loaded} pairs loaded; " + "; ".join(
            parts
        )

    def counts(self) -> str:
        """The summary that may leave the site: counts by kind of problem, no folder, no file name
        (those stay in the site's own log, preflight and report)."""
        if not self.problems:
            return f"{self.n_loaded} pairs loaded, no problems"
        by_reason: dict[str, int] = {}
        for p in self.problems:
            kind = next((v for k, v in PROBLEM_KINDS.items() if p.reason.startswith(k)), "other problem")
            by_reason[kind] = by_reason.get(kind, 0) + 1
        kinds = "; ".join(f"{n} x {kind}" for kind, n in sorted(by_reason.items()))
        return f"{len(self.problems)} problem(s), {self.n_loaded} pairs loaded; {kinds}"

    def to_json(self) -> dict:
        return {
            "folder": self.folder,
            "n_images": self.n_images,
            "n_masks": self.n_masks,
            "n_loaded": self.n_loaded,
            "problems": [{"path": p.path, "reason": p.reason} for p in self.problems],
        }

    @classmethod
    def from_json(cls, d: dict) -> DataReport:
        r = cls(d["folder"], d["n_images"], d["n_masks"], d["n_loaded"])
        r.problems = [Problem(p["path"], p["reason"]) for p in d["problems"]]
        return r


@dataclass
class SiteArrays:
    """A site's decoded pairs: ``images`` (N,3,S,S) uint8, ``masks`` (N,1,S,S) uint8 in {0,1}."""

    name: str
    images: np.ndarray
    masks: np.ndarray
    stems: list[str]
    report: DataReport
    source_channels: int = 3

    def __len__(self) -> int:
        return len(self.stems)

    def subset(self, idx: list[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(idx, dtype=np.int64)
        return self.images[idx], self.masks[idx]


@dataclass
class _Listing:
    """A sub-folder's image files by stem, and the entries named like images that cannot be used,
    each with its reason: not a regular file (a directory, a broken link), or one of several files
    of the same stem (which of them pairs with the mask is ambiguous, so none does)."""

    files: dict[str, Path]
    odd: list[tuple[Path, str]]


def _list_files(folder: Path, kind: str) -> _Listing:
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:  # unreadable (permissions) or gone since the folder check
        raise SiteDataError(f"cannot list {folder}: {exc}") from None
    out, by_stem = _Listing({}, []), {}
    for p in entries:
        if p.name.startswith(".") or p.suffix.lower() not in IMAGE_EXTS:
            continue
        if not p.is_file():
            out.odd.append((p, f"unreadable or truncated {kind}: not a regular file"))
        else:
            by_stem.setdefault(p.stem, []).append(p)
    for stem, paths in by_stem.items():
        if len(paths) == 1:
            out.files[stem] = paths[0]
        else:
            names = ", ".join(q.name for q in paths)
            out.odd += [(q, f"duplicate stem {stem!r}: {names}") for q in paths]
    return out


def _why(exc: BaseException) -> str:
    """An exception as a report line: its message, or its type when it has none."""
    text = str(exc).strip()
    if isinstance(exc, UnidentifiedImageError | OSError | ValueError) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def read_image(path: Path) -> Image.Image:
    """Open and fully decode an image file (raises ``UnidentifiedImageError``/``OSError``)."""
    with Image.open(path) as im:
        im.load()  # forces full decode: truncated files fail here, not later
        return im.copy()


def _mask_array(im: Image.Image) -> np.ndarray:
    """A single-channel integer array, or ValueError saying why the mask is not usable."""
    if im.mode in ("L", "1", "P", "I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(im)
    elif im.mode in ("RGB", "RGBA", "LA"):
        a = np.asarray(im)
        chans = a[..., :3] if im.mode != "LA" else a[..., :1]
        if chans.shape[-1] > 1 and not (chans == chans[..., :1]).all():
            raise ValueError(f"mask has {chans.shape[-1]} channels with different values")
        arr = chans[..., 0]
    else:
        raise ValueError(f"unsupported mask mode {im.mode}")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or (arr != np.round(arr)).any():
            raise ValueError("unexpected mask values: non-integer values")
    arr = arr.astype(np.int64)
    vals = np.unique(arr)
    if vals.min() < 0:
        raise ValueError("unexpected mask values: negative labels")
    if set(vals.tolist()) <= {0, 255} or vals.max() <= MAX_LABEL:
        return (arr > 0).astype(np.uint8)
    shown = ", ".join(str(v) for v in vals[:8])
    raise ValueError(
        f"unexpected mask values: {len(vals)} distinct values ({shown}...), "
        f"expected {{0,255}}, {{0,1}} or labels 0..{MAX_LABEL}"
    )


def prepare_image(img: Image.Image, size: int) -> np.ndarray:
    """An image as the models see it: RGB, ``size``x``size``, (3,S,S) uint8. Training, evaluation
    and ``dsfedmed predict`` all go through this, so a model sees the same pixels everywhere."""
    img = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(img).transpose(2, 0, 1).copy()


def _resize_pair(img: Image.Image, mask01: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    m = Image.fromarray(mask01 * 255).resize((size, size), Image.Resampling.BILINEAR)
    return prepare_image(img, size), (np.asarray(m)[None] >= 128).astype(np.uint8)


def _fingerprint(folder: Path, files: list[Path], odd: list[Path], image_size: int) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}|{folder.resolve()}|{image_size}|{MAX_LABEL}".encode())
    for p in files:
        try:
            st = p.stat()
        except OSError as exc:  # removed (or made unreadable) between listing and now
            raise SiteDataError(f"site data in {folder} changed while it was read: {exc}") from None
        h.update(f"|{p.parent.name}/{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    for p in odd:
        h.update(f"|odd:{p.parent.name}/{p.name}".encode())
    return h.hexdigest()[:24]


def default_cache_dir() -> Path:
    env = os.environ.get("DSFEDMED_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dsfedmed"


def load_site_folder(
    folder: str | Path,
    image_size: int,
    *,
    strict: bool = False,
    name: str | None = None,
    cache_dir: str | Path | None = None,
) -> SiteArrays:
    """Load and validate a site folder; see the module docstring for the rules."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise SiteDataError(f"site data folder not found: {folder}")
    img_dir, mask_dir = folder / "images", folder / "masks"
    for d in (img_dir, mask_dir):
        if not d.is_dir():
            raise SiteDataError(f"site folder {folder} has no '{d.name}/' sub-folder")
    img_list, mask_list = _list_files(img_dir, "image"), _list_files(mask_dir, "mask")
    images, masks = img_list.files, mask_list.files
    if not images and not img_list.odd:
        raise SiteDataError(f"empty folder: no image files ({', '.join(IMAGE_EXTS)}) in {img_dir}")
    name = name or folder.name

    cache_file = None
    if cache_dir is not None:
        odd = [p for p, _ in img_list.odd + mask_list.odd]
        fp = _fingerprint(folder, list(images.values()) + list(masks.values()), odd, image_size)
        cache_file = Path(cache_dir) / f"site-{fp}-{'strict' if strict else 'skip'}.npz"
        if cache_file.is_file():
            try:
                with np.load(cache_file, allow_pickle=False) as z:
                    report = DataReport.from_json(json.loads(str(z["report"])))
                    return SiteArrays(
                        name,
                        z["images"],
                        z["masks"],
                        list(z["stems"]),
                        report,
                        int(z["source_channels"]),
                    )
            except Exception:  # a corrupt cache is rebuilt, never trusted
                cache_file.unlink(missing_ok=True)

    report = DataReport(str(folder), n_images=len(images), n_masks=len(masks))
    out_img, out_mask, stems, chans = [], [], [], []
    for p, why in img_list.odd + mask_list.odd:
        report.add(p, why)
    dup_images, dup_masks = (
        {p.stem for p, why in listing.odd if why.startswith("duplicate stem")}
        for listing in (img_list, mask_list)
    )
    for stem in sorted(set(masks) - set(images) - dup_images):
        report.add(masks[stem], "mask without image")
    for stem, ipath in images.items():
        mpath = masks.get(stem)
        if mpath is None:
            if stem not in dup_masks:  # else its masks are reported as duplicates
                report.add(ipath, "missing mask")
            continue
        try:
            img = read_image(ipath)
        except Exception as exc:  # noqa: BLE001 - a decoder may fail any way on a damaged file
            report.add(ipath, f"unreadable or truncated image: {_why(exc)}")
            continue
        try:
            mimg = read_image(mpath)
        except Exception as exc:  # noqa: BLE001
            report.add(mpath, f"unreadable or truncated mask: {_why(exc)}")
            continue
        if img.size != mimg.size:
            report.add(mpath, f"mask/image size mismatch: image {img.size}, mask {mimg.size}")
            continue
        try:
            m01 = _mask_array(mimg)
        except ValueError as exc:
            report.add(mpath, str(exc))
            continue
        try:
            a, m = _resize_pair(img, m01, image_size)
        except Exception as exc:  # noqa: BLE001 - e.g. an image mode PIL cannot convert to RGB
            report.add(ipath, f"unreadable or truncated image: cannot convert {img.mode} image: {_why(exc)}")
            continue
        chans.append(1 if img.mode in ("L", "I", "I;16", "F", "1", "LA") else 3)
        out_img.append(a)
        out_mask.append(m)
        stems.append(stem)
    report.n_loaded = len(stems)
    if strict and report.problems:
        raise SiteDataError("strict data check failed: " + report.summary())
    if not stems:
        err = SiteDataError("no usable image/mask pairs: " + report.summary())
        err.report = report  # every file's problem, for callers that list them (dsfedmed preflight)
        raise err
    src_ch = 1 if chans and max(chans) == 1 else 3
    site = SiteArrays(name, np.stack(out_img), np.stack(out_mask), stems, report, src_ch)
    if cache_file is not None:
        _write_cache(cache_file, site)
    return site


def _write_cache(path: Path, site: SiteArrays) -> None:
    atomic_savez(  # a concurrent reader sees the old or the new file
        path,
        images=site.images,
        masks=site.masks,
        stems=np.array(site.stems),
        report=np.array(json.dumps(site.report.to_json())),
        source_channels=np.array(site.source_channels),
    )
