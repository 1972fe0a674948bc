"""The fedfm baseline at a site: the FM itself is trained and its weights (or decoder) travel."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client_app.app import app
from client_app.errors import local_detail
from common import protocol as P
from common.codec import from_array_record, to_array_record
from common.foundation import PromptFreeSegmenter, load_foundation_model

RUN = {
    "method": "fedfm",
    "image-size": 32,
    "phantom-images-per-site": 8,
    "local-epochs": 1,
    "fm-batch-size": 2,
    "fm-local-steps": 1,
    "augment": False,
}


def _ctx(**run):
    return Context(
        run_id=5,
        node_id=3,
        node_config={"partition-id": 0, "num-partitions": 2},
        state=RecordDict(),
        run_config={**RUN, **run},
    )


@pytest.fixture(scope="module")
def decoder_weights():
    fm = PromptFreeSegmenter(load_foundation_model("litemedsam"), "decoder")
    return {k: v.numpy() for k, v in fm.exchanged_module.state_dict().items()}


def test_exchanged_module_is_all_weights_or_decoder():
    fm = load_foundation_model("litemedsam", freeze_encoder=False)
    everything = PromptFreeSegmenter(fm, "all").exchanged_module.state_dict()
    decoder = PromptFreeSegmenter(fm, "decoder").exchanged_module.state_dict()
    assert len(everything) > len(decoder) and any(k.startswith("image_encoder.") for k in everything)
    assert not any(k.startswith("image_encoder.") for k in decoder)
    with pytest.raises(ValueError, match="'all' or 'decoder'"):
        PromptFreeSegmenter(fm, "encoder")


def test_fedfm_decoder_round_trains_one_step_and_returns_decoder(task_identity, decoder_weights):
    cfg = ConfigRecord({P.CFG_ROUND: 1})
    msg = Message(
        RecordDict({P.KEY_ARRAYS: to_array_record(decoder_weights), P.KEY_CONFIG: cfg}),
        dst_node_id=3,
        message_type=P.MSG_TRAIN,
    )
    rep = app(msg, _ctx(**{"fm-trainable": "decoder"}))
    assert not rep.has_error(), rep.error.reason if rep.has_error() else ""
    m = rep.content.metric_records[P.KEY_METRICS]
    assert m["steps"] == 1  # fm-local-steps caps the CPU cost
    new = from_array_record(rep.content.array_records[P.KEY_ARRAYS])
    assert set(new) == set(decoder_weights)
    changed = [k for k in new if not np.array_equal(new[k], decoder_weights[k])]
    assert changed, "one optimiser step must move the decoder"

    ev = Message(
        RecordDict(
            {
                P.KEY_ARRAYS: rep.content.array_records[P.KEY_ARRAYS],
                P.KEY_CONFIG: ConfigRecord({P.CFG_SPLIT: "test"}),
            }
        ),
        dst_node_id=3,
        message_type=P.MSG_EVALUATE,
    )
    er = app(ev, _ctx(**{"fm-trainable": "decoder"}))
    assert not er.has_error(), er.error.reason if er.has_error() else ""
    res = er.content.metric_records[P.KEY_METRICS]
    assert 0.0 <= res[P.MET_DICE] <= 1.0 and res[P.MET_NUM_EXAMPLES] > 0


def test_fedfm_refuses_weights_of_another_part(task_identity, decoder_weights):
    """Decoder weights sent to a site that trains all of the FM do not fit: a clear error reply."""
    msg = Message(
        RecordDict(
            {P.KEY_ARRAYS: to_array_record(decoder_weights), P.KEY_CONFIG: ConfigRecord({P.CFG_ROUND: 1})}
        ),
        dst_node_id=3,
        message_type=P.MSG_TRAIN,
    )
    rep = app(msg, _ctx(**{"fm-trainable": "all"}))
    assert rep.has_error() and "do not fit" in local_detail(rep.error.reason)


def test_embedding_cache_embeds_each_image_once_and_decodes_like_the_fm(tmp_path):
    """fedfm-decoder and the FM floors: the frozen encoder runs once per image, ever (a later run,
    seed or process reuses the file); a damaged entry is recomputed; the cached model's logits are
    the prompt-free FM's (float16 embeddings: within a small tolerance)."""
    import torch

    from common.fm_cache import CachedPromptFreeSegmenter, EmbeddingCache

    fm = load_foundation_model("litemedsam")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    cache = EmbeddingCache(tmp_path, "litemedsam", "bundled", 256)
    first = cache.embeddings(fm, images)
    assert cache.computed == 2 and first.shape == (2, 256, 64, 64)
    again = EmbeddingCache(tmp_path, "litemedsam", "bundled", 256)
    assert torch.equal(again.embeddings(fm, images), first) and again.computed == 0
    assert EmbeddingCache(tmp_path, "litemedsam", "other-weights", 256).key(images[0]) != cache.key(images[0])
    again.path(again.key(images[1])).write_bytes(b"not an array")
    assert torch.equal(again.embeddings(fm, images), first) and again.computed == 1

    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    cached = CachedPromptFreeSegmenter(fm, again)
    with torch.no_grad():
        direct = PromptFreeSegmenter(fm, "decoder")(x)
        via_cache = cached(x)
    assert via_cache.shape == direct.shape == (2, 1, 32, 32)
    assert torch.allclose(via_cache, direct, atol=0.05)
    assert again.computed == 1  # the model read the cache, it did not embed again
    assert set(cached.exchanged_module.state_dict()) == set(fm.decoder.state_dict())
