"""`dsfedmed predict`: a site segments a folder with its own trained model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from client_app.state import SiteStore
from client_app.trainer import SiteTrainer, TrainSettings
from common.data import load_site_folder
from common.phantoms import phantom_site, write_phantom_site
from common.splits import make_splits

SIZE = 32
RUN_ID = 5

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _invoke(*args: str):
    return CliRunner().invoke(app, ["predict", *args], env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_torch_thread):
    """A site model trained briefly on phantom-0 and saved as the ClientApp saves it."""
    torch.manual_seed(0)
    site = phantom_site(0, 16, SIZE, seed=0)
    split = make_splits(site.stems, seed=0, site=site.name, val_fraction=0.15, test_fraction=0.2)
    tr = SiteTrainer(site, split, "unet", torch.device("cpu"))
    tr.train(TrainSettings(epochs=2, batch_size=4, learning_rate=0.01, augment=False, seed=0))
    state = tmp_path_factory.mktemp("state")
    meta = {
        "model": "unet",
        "in-channels": 3,
        "image-size": SIZE,
        "run-id": RUN_ID,
        "site": site.name,
        "round": 2,
    }
    SiteStore(str(state), RUN_ID, site.name).save_model(tr.get_weights(), meta)
    return state, tr


@pytest.fixture
def images(tmp_path) -> Path:
    """Phantom images at 48 px (not the model's size), plus a grayscale image of another shape."""
    folder = write_phantom_site(tmp_path / "site", index=0, n=3, image_size=48, seed=7) / "images"
    gray = (np.random.default_rng(0).random((40, 56)) * 255).astype(np.uint8)
    Image.fromarray(gray, mode="L").save(folder / "gray.jpg")
    return folder


def test_predict_writes_masks_at_original_size_and_overlays(trained, images, tmp_path):
    state, _ = trained
    out = tmp_path / "out"
    res = _invoke(
        "--images", str(images), "--out", str(out), "--state-dir", str(state), "--site", "phantom-0"
    )
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["model"] == "unet" and summary["image_size"] == SIZE and summary["run_id"] == RUN_ID
    assert summary["n_images"] == 4 and summary["failed"] == []
    for entry in summary["images"]:
        src = Image.open(images / entry["file"])
        mask = Image.open(out / entry["mask"])
        ov = Image.open(out / entry["overlay"])
        assert mask.size == src.size == (entry["width"], entry["height"]) and ov.size == src.size
        m = np.asarray(mask)
        assert mask.mode == "L" and set(np.unique(m)) <= {0, 255}
        assert entry["foreground_fraction"] == pytest.approx((m > 0).mean())
        assert ov.mode == "RGB"
    assert (out / "gray_mask.png").is_file() and Image.open(out / "gray_mask.png").size == (56, 40)


def test_predict_sees_images_exactly_as_training_did(trained, tmp_path):
    """At the model's own size, predict's masks equal the trainer's own prediction on the loaded site."""
    state, tr = trained
    folder = write_phantom_site(tmp_path / "site", index=0, n=4, image_size=SIZE, seed=3)
    out = tmp_path / "out"
    res = _invoke(
        "--images",
        str(folder / "images"),
        "--out",
        str(out),
        "--state-dir",
        str(state),
        "--site",
        "phantom-0",
    )
    assert res.exit_code == 0, res.output
    loaded = load_site_folder(folder, SIZE)
    probs = tr.predict_probs(loaded.images)
    for k, stem in enumerate(loaded.stems):
        ours = np.asarray(Image.open(out / f"{stem}_mask.png")) > 0
        assert (ours == (probs[k, 0].numpy() >= 0.5)).all(), stem


def test_corrupt_image_is_listed_and_exit_code_is_1(trained, images, tmp_path):
    state, _ = trained
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not a png at all")
    (images / "notes.txt").write_text("ignored: not an image")
    out = tmp_path / "out"
    res = _invoke(
        "--images", str(images), "--out", str(out), "--state-dir", str(state), "--site", "phantom-0"
    )
    assert res.exit_code == 1, res.output
    assert "broken.png" in res.output
    summary = json.loads((out / "predictions.json").read_text())
    assert [f["file"] for f in summary["failed"]] == ["broken.png"]
    assert summary["n_images"] == 4  # the readable ones were still segmented
    assert not (out / "broken_mask.png").exists()


def test_weights_file_and_checkpoint_format(trained, images, tmp_path):
    """--weights takes a site's model.pt (model.json next to it) or a server checkpoint."""
    from server_app.rundir import RunDirectory

    state, tr = trained
    model_pt = state / f"run-{RUN_ID}" / "phantom-0" / "model.pt"
    res = _invoke("--images", str(images), "--out", str(tmp_path / "a"), "--weights", str(model_pt))
    assert res.exit_code == 0, res.output
    rd = RunDirectory(tmp_path / "run")
    rd.write_json("config.json", {"run_config": {"model": "unet", "image-size": SIZE}})
    ckpt = rd.save_checkpoint("global_final.pt", tr.get_weights(), {"round": 2, "model": "unet"})
    res = _invoke("--images", str(images), "--out", str(tmp_path / "b"), "--weights", str(ckpt))
    assert res.exit_code == 0, res.output
    a = np.asarray(Image.open(tmp_path / "a" / "gray_mask.png"))
    b = np.asarray(Image.open(tmp_path / "b" / "gray_mask.png"))
    assert (a == b).all()
    assert json.loads((tmp_path / "b" / "predictions.json").read_text())["image_size"] == SIZE


def test_wrong_weights_exit_2(trained, images, tmp_path):
    state, _ = trained
    out = str(tmp_path / "out")
    res = _invoke("--images", str(images), "--out", out, "--weights", str(tmp_path / "missing.pt"))
    assert res.exit_code == 2 and "missing.pt" in res.output
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not torch")
    res = _invoke("--images", str(images), "--out", out, "--weights", str(junk))
    assert res.exit_code == 2 and "junk.pt" in res.output
    model_pt = state / f"run-{RUN_ID}" / "phantom-0" / "model.pt"
    res = _invoke("--images", str(images), "--out", out, "--weights", str(model_pt), "--model", "segresnet")
    assert res.exit_code == 2 and "do not fit model 'segresnet'" in res.output
    res = _invoke("--images", str(images), "--out", out, "--state-dir", str(state), "--site", "nowhere")
    assert res.exit_code == 2 and "phantom-0" in res.output  # names the sites it has
    res = _invoke("--images", str(images), "--out", out)
    assert res.exit_code == 2 and "--weights" in res.output
    assert not (tmp_path / "out" / "predictions.json").exists()


def test_latest_run_is_picked_unless_run_id_given(trained, images, tmp_path):
    state, tr = trained
    src = state / f"run-{RUN_ID}" / "phantom-0"
    newer = SiteStore(str(tmp_path / "state"), 9, "phantom-0")
    older = SiteStore(str(tmp_path / "state"), 3, "phantom-0")
    for store, rid in ((older, 3), (newer, 9)):
        store.save_model(tr.get_weights(), {**json.loads((src / "model.json").read_text()), "run-id": rid})
    os.utime(older.model_path, (1e9, 1e9))
    res = _invoke(
        "--images",
        str(images),
        "--out",
        str(tmp_path / "o"),
        "--state-dir",
        str(tmp_path / "state"),
        "--site",
        "phantom-0",
    )
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "o" / "predictions.json").read_text())["run_id"] == 9
    res = _invoke(
        "--images",
        str(images),
        "--out",
        str(tmp_path / "o"),
        "--state-dir",
        str(tmp_path / "state"),
        "--site",
        "phantom-0",
        "--run-id",
        "3",
    )
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "o" / "predictions.json").read_text())["run_id"] == 3
