"""Property-based tests (hypothesis, derandomized: the same examples every run) of what parses
untrusted input: the probability codec, the array-record round trip, the protocol's payload checks
and the site-folder loader.  Each decoder either accepts exactly what the protocol allows or raises
its one documented error (``ValueError``/``PayloadInvalid``, ``SiteDataError``), never anything else.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from common.codec import (
    check_array_bytes,
    decode_array,
    decode_probs,
    encode_probs,
    from_array_record,
    to_array_record,
)
from common.data import SiteDataError, load_site_folder
from common.validation import PayloadInvalid, check_metrics, check_pool, check_weights, probs_record_limit

# PIL warns (and goes on) on damaged TIFF metadata that the random files are full of
pytestmark = pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")

SETTINGS = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=80,
    suppress_health_check=[HealthCheck.too_slow],
)
FOLDER_SETTINGS = settings(SETTINGS, max_examples=60)

DTYPES = st.sampled_from(
    [np.uint8, np.float16, np.float32, np.float64, np.int8, np.int16, np.int64, np.bool_, np.complex64]
)


def _any_array(dtype, max_dims=5, max_side=5):
    return hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_dims=max_dims, min_side=0, max_side=max_side))


@st.composite
def probs_candidates(draw):
    """Arrays the codec may be handed: mostly near-valid (N,1,S,S) uint8/float16, with wrong dtypes,
    shapes, NaN/inf and out-of-range values mixed in, and expected n/size that may not match."""
    if draw(st.booleans()):
        dtype = draw(st.sampled_from([np.uint8, np.float16]) | DTYPES)
        n, s = draw(st.sampled_from([1, 2, 3, 0])), draw(st.integers(1, 4))
        shape = (n, draw(st.sampled_from([1, 1, 1, 2])), s, draw(st.sampled_from([s, s, s + 1])))
        in_range = dtype == np.float16 and draw(st.integers(0, 3)) > 0
        if in_range:  # float16 probabilities on the 1/255 grid, like a real encoder's
            arr = (draw(hnp.arrays(np.uint8, shape)) / 255.0).astype(np.float16)
        else:
            arr = draw(hnp.arrays(dtype, shape))
        if in_range and arr.size and draw(st.booleans()):  # one bad value among good ones
            arr.flat[draw(st.integers(0, arr.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -0.5, 1.5]))
    else:
        arr = draw(_any_array(draw(DTYPES)))
    # expected n and size: mostly those of the array (so the other checks decide), sometimes others
    own_n = arr.shape[0] if arr.ndim else 0
    own_size = arr.shape[-1] if arr.ndim else 1
    n = draw(st.sampled_from([None, own_n, own_n]) | st.integers(0, 3))
    size = draw(st.sampled_from([None, own_size, own_size]) | st.integers(1, 4))
    return arr, n, size


def _valid_probs(arr, n, size) -> bool:
    if arr.dtype not in (np.uint8, np.float16) or arr.ndim != 4 or arr.shape[1] != 1:
        return False
    if n is not None and arr.shape[0] != n:
        return False
    if size is not None and arr.shape[-2:] != (size, size):
        return False
    if arr.dtype == np.float16:
        with np.errstate(invalid="ignore"):
            return bool(np.isfinite(arr).all() and (arr >= 0).all() and (arr <= 1).all())
    return True


@settings(SETTINGS, max_examples=250)
@given(probs_candidates())
def test_decode_probs_accepts_exactly_the_valid_arrays(case):
    arr, n, size = case
    valid = _valid_probs(arr, n, size)
    try:
        out = decode_probs(arr, n, size)
    except ValueError:
        assert not valid
        return
    assert valid
    assert out.dtype == torch.float32 and tuple(out.shape) == arr.shape
    assert torch.isfinite(out).all() and ((out >= 0) & (out <= 1)).all()


@SETTINGS
@given(
    st.integers(1, 3),
    st.integers(1, 6),
    st.sampled_from(["uint8", "float16"]),
    st.data(),
)
def test_encode_decode_round_trip_within_quantisation(n, s, dtype, data):
    probs = data.draw(
        hnp.arrays(np.float32, (n, 1, s, s), elements=st.floats(0, 1, width=32, allow_subnormal=False))
    )
    enc = encode_probs(torch.from_numpy(probs), s, dtype)
    assert enc.dtype == np.dtype(dtype) and enc.shape == probs.shape
    dec = decode_probs(enc, n, s).numpy()
    tol = 0.5 / 255 + 1e-6 if dtype == "uint8" else 2.0**-11 + 1e-7  # half a step of the encoding
    assert np.abs(dec - probs).max(initial=0) <= tol


@SETTINGS
@given(st.dictionaries(st.text(min_size=1, max_size=8), DTYPES.flatmap(_any_array), max_size=4))
def test_array_record_round_trip(state):
    back = from_array_record(to_array_record(state))
    assert set(back) == set(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype
        # Flower sends a 0-d array as shape (1,) (common.models.load_weights restores it)
        assert back[k].shape == (v.shape if v.ndim else (1,))
        np.testing.assert_array_equal(back[k].ravel(), v.ravel())


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


@SETTINGS
@given(st.binary(max_size=300), st.booleans(), st.integers(0, 200))
def test_decode_array_on_random_bytes_raises_only_payload_invalid(data, npy_prefix, cut):
    """Random bytes, or a real .npy cut short and padded with random bytes, as an Array's data."""
    if npy_prefix:
        real = _npy(np.arange(12, dtype=np.float32).reshape(3, 4))
        data = real[: min(cut, len(real))] + data
    array = Array("float32", (3, 4), "numpy.ndarray", data)
    try:
        out = decode_array(array, "probe")
    except PayloadInvalid as exc:
        assert "probe" in str(exc)
        return
    assert isinstance(out, np.ndarray)


@SETTINGS
@given(probs_candidates(), st.integers(0, 3), st.integers(1, 4))
def test_byte_bound_never_rejects_a_valid_probabilities_record(case, n, size):
    arr = case[0]
    record = ArrayRecord({"probs": Array(arr)})
    try:
        check_array_bytes(record, probs_record_limit(n, size), "probe")
    except PayloadInvalid:
        assert not _valid_probs(arr, n, size)


@st.composite
def weights_case(draw):
    names = draw(st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, max_size=4, unique=True))
    reference = {k: draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3)) for k in names}
    state = {}
    for k, shape in reference.items():
        if draw(st.integers(0, 9)) == 0:
            continue  # missing
        if draw(st.integers(0, 5)) == 0:
            shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3))
        state[k] = draw(hnp.arrays(draw(DTYPES), shape))
    if draw(st.integers(0, 9)) == 0:
        state["extra"] = np.zeros(1, np.float32)
    return state, reference


@SETTINGS
@given(weights_case())
def test_check_weights_accepts_exactly_fitting_finite_real_weights(case):
    state, reference = case
    valid = set(state) == set(reference) and all(
        v.shape == tuple(reference[k])
        and v.dtype.kind in "biuf"
        and (v.dtype.kind != "f" or np.isfinite(v).all())
        for k, v in state.items()
    )
    try:
        check_weights(state, reference, "the probe model")
    except PayloadInvalid:
        assert not valid
        return
    assert valid


VALUES = st.one_of(
    st.integers(-5, 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=3),
    st.none(),
)


@SETTINGS
@given(st.dictionaries(st.sampled_from(["n", "loss", "dice", "x"]), VALUES, max_size=4))
def test_check_metrics_accepts_exactly_the_valid_records(record):
    def ok(k):
        v = record.get(k)
        return (
            isinstance(v, int | float)
            and not isinstance(v, bool)
            and np.isfinite(v)
            and (k != "n" or (v > 0 and float(v).is_integer()))
            and (k != "dice" or 0 <= v <= 1)
        )

    valid = ok("n") and ok("dice") and ok("loss")
    try:
        out = check_metrics(record, ("n", "dice", "loss"), counts=("n",), positive=("n",), unit=("dice",))
    except PayloadInvalid:
        assert not valid
        return
    assert valid and set(out) == {"n", "dice", "loss"}


@st.composite
def pool_case(draw):
    n, s = draw(st.integers(0, 3)), draw(st.sampled_from([4, 8, 9]))
    img_shape = draw(st.sampled_from([(n, 3, s, s), (n, 1, s, s), (n, 3, s, s + 1), (n, 3, s)]))
    mask_shape = draw(st.sampled_from([(n, 1, s, s), (n, 1, s, s), (n, 3, s, s), (n + 1, 1, s, s)]))
    images = draw(hnp.arrays(draw(st.sampled_from([np.uint8, np.uint8, np.float32])), img_shape))
    mask_dtype = draw(st.sampled_from([np.uint8, np.uint8, np.bool_, np.float32]))
    top = draw(st.sampled_from([1, 1, 255]))
    elements = st.integers(0, top) if mask_dtype == np.uint8 else None
    masks = draw(hnp.arrays(mask_dtype, mask_shape, elements=elements))
    return images, masks, draw(st.none() | st.integers(0, 4))


@SETTINGS
@given(pool_case())
def test_check_pool_accepts_exactly_uint8_pairs_with_binary_masks(case):
    images, masks, max_n = case
    valid = (
        images.dtype == np.uint8
        and images.ndim == 4
        and images.shape[1] == 3
        and images.shape[2] == images.shape[3] >= 8
        and masks.dtype == np.uint8
        and masks.shape == (images.shape[0], 1, *images.shape[2:])
        and masks.max(initial=0) <= 1
        and (max_n is None or len(images) <= max_n)
    )
    try:
        check_pool(images, masks, max_n=max_n)
    except PayloadInvalid:
        assert not valid
        return
    assert valid


# --- the site-folder loader ----------------------------------------------------------------------

MODES = ["L", "RGB", "RGBA", "LA", "P", "1", "I", "I;16", "F", "CMYK"]
TIFF_MODES = ("I", "I;16", "F", "CMYK")  # modes PNG cannot hold


def _encode(im: Image.Image, mode: str) -> tuple[bytes, str]:
    buf = io.BytesIO()
    fmt = "TIFF" if mode in TIFF_MODES else "PNG"
    im.save(buf, format=fmt)
    return buf.getvalue(), ".tif" if fmt == "TIFF" else ".png"


@st.composite
def site_files(draw):
    """Up to 5 stems, each with an image and a mask: a real image of a random mode and content, or
    random bytes, a file cut short, or nothing; masks binary, labelled, many-valued or arbitrary
    images, mostly at the image's size."""
    files = {}
    for i in range(draw(st.integers(0, 5))):
        w, h = draw(st.integers(1, 12)), draw(st.integers(1, 12))
        for sub in ("images", "masks"):
            kind = draw(st.sampled_from(["good"] * 9 + ["bytes", "cut", "none"]))
            if kind == "none":
                continue
            if kind == "bytes":
                files[f"{sub}/s{i}.png"] = draw(st.binary(max_size=64))
                continue
            mode = draw(st.sampled_from(MODES))
            if sub == "masks" and draw(st.integers(0, 7)) == 0:  # a mask of another size
                w, h = draw(st.integers(1, 12)), draw(st.integers(1, 12))
            if sub == "masks" and draw(st.integers(0, 5)) > 0:
                values = draw(st.sampled_from([[0, 255], [0, 1], [0, 3], [0], list(range(20))]))
                arr = draw(hnp.arrays(np.uint8, (h, w), elements=st.sampled_from(values)))
                mode = mode if mode in ("L", "RGB", "I") else "L"
                im = Image.fromarray(arr).convert(mode)
            else:
                seed = draw(st.integers(0, 2**16))
                arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
                im = Image.fromarray(arr).convert(mode)
            data, ext = _encode(im, mode)
            if kind == "cut":
                data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
            files[f"{sub}/s{i}{ext}"] = data
    return files


def _load(files: dict[str, bytes], size: int, strict: bool):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        for sub in ("images", "masks"):
            (root / sub).mkdir()
        for rel, data in files.items():
            (root / rel).write_bytes(data)
        return load_site_folder(root, size, strict=strict), root


@FOLDER_SETTINGS
@given(site_files(), st.sampled_from([8, 16]))
def test_loader_skip_mode_returns_only_valid_pairs_or_site_data_error(files, size):
    try:
        site, _ = _load(files, size, strict=False)
    except SiteDataError:
        event("site data error")
        return
    n = len(site.stems)
    event(f"{n} pair(s) loaded, {len(site.report.problems)} problem(s)")
    assert n > 0 and site.report.n_loaded == n
    assert site.images.shape == (n, 3, size, size) and site.images.dtype == np.uint8
    assert site.masks.shape == (n, 1, size, size) and site.masks.dtype == np.uint8
    assert set(np.unique(site.masks).tolist()) <= {0, 1}
    # every image file is either loaded or reported, never silently dropped
    reported = {Path(p.path).stem for p in site.report.problems}
    image_stems = {Path(rel).stem for rel in files if rel.startswith("images/")}
    assert image_stems <= set(site.stems) | reported


@FOLDER_SETTINGS
@given(site_files())
def test_loader_strict_mode_is_all_or_site_data_error(files):
    try:
        site, _ = _load(files, 8, strict=True)
    except SiteDataError as exc:
        assert str(exc)
        event("site data error")
        return
    event("all loaded")
    assert not site.report.problems and len(site.stems) == len(
        {Path(r).stem for r in files if r.startswith("images/")}
    )


@pytest.mark.parametrize("mode", MODES)
def test_every_image_mode_with_a_binary_mask_loads(tmp_path, mode):
    """The property tests draw these modes; each one, with a good mask, must give a usable pair."""
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    arr = np.random.default_rng(0).integers(0, 255, (10, 12, 3), dtype=np.uint8)
    data, ext = _encode(Image.fromarray(arr).convert(mode), mode)
    (tmp_path / "images" / f"a{ext}").write_bytes(data)
    m = np.zeros((10, 12), np.uint8)
    m[2:6, 3:8] = 255
    Image.fromarray(m).save(tmp_path / "masks" / "a.png")
    site = load_site_folder(tmp_path, 8)
    assert site.stems == ["a"] and site.masks.sum() > 0
