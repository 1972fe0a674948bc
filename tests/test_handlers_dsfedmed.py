"""DSFedMed ClientApp handlers in-process: generator upload, distillation round, bad payloads."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client_app.app import ERR_PAYLOAD, app
from client_app.errors import local_detail
from common import protocol as P
from common.codec import decode_probs, to_array_record
from common.phantoms import phantom_site
from tests.support import DSFEDMED_HANDLER_RUN as RUN
from tests.support import phantom_pool_arrays, train_msg


@pytest.fixture
def ctx(tmp_path):
    def make(**run):
        return Context(
            run_id=11,
            node_id=3,
            node_config={"partition-id": 0, "num-partitions": 2, "state-dir": str(tmp_path / "state")},
            state=RecordDict(),
            run_config={**RUN, **run},
        )

    return make


def test_generator_reply_holds_weights_and_stats_only(task_identity, ctx):
    rep = app(
        Message(
            RecordDict({P.KEY_CONFIG: ConfigRecord({})}), dst_node_id=3, message_type=P.MSG_TRAIN_GENERATOR
        ),
        ctx(),
    )
    assert not rep.has_error(), rep.error.reason if rep.has_error() else ""
    assert set(rep.content.array_records) == {P.KEY_GENERATOR}
    stats = rep.content.config_records[P.KEY_GEN_STATS]
    assert stats["steps"] == 2 and np.isfinite(stats["mask_log_fg_mean"])


def test_logits_round_replies_with_compact_probs_only(task_identity, ctx):
    rep = app(train_msg([0, 2, 4]), ctx())
    assert not rep.has_error(), rep.error.reason if rep.has_error() else ""
    assert P.KEY_ARRAYS not in rep.content.array_records  # the site model stays at the site
    # the site answers on the whole pool (6 samples), so every sample has the sites' view
    probs = rep.content.array_records[P.KEY_SITE_PROBS][P.ARR_PROBS].numpy()
    assert probs.dtype == np.uint8 and probs.shape == (6, 1, 16, 16)
    decode_probs(probs, expected_n=6, expected_size=16)
    m = rep.content.metric_records[P.KEY_METRICS]
    # supervised on every pool sample (6 at batch 4: 2 steps), distillation gated to the 3 selected
    assert m["distill-steps"] == 2 and np.isfinite(m["distill-loss"])
    assert m[P.MET_STEPS] >= 1
    # the pool was cached: the next round refers to it by id only, and the model carried over
    rep2 = app(train_msg([1, 5], included="none"), ctx())
    assert not rep2.has_error(), rep2.error.reason if rep2.has_error() else ""
    assert rep2.content.array_records[P.KEY_SITE_PROBS][P.ARR_PROBS].numpy().shape == (6, 1, 16, 16)


def test_uncached_pool_is_an_error_the_server_can_act_on(task_identity, ctx):
    rep = app(train_msg([0], included="none", pool_id="never-sent"), ctx())
    # a code, not a text, tells the server to resend the pool
    assert (
        rep.has_error()
        and rep.error.code == P.ERR_NO_POOL
        and "not cached at this site" in local_detail(rep.error.reason)
    )


@pytest.mark.parametrize(
    "soft, needle",
    [
        (np.full((2, 1, 16, 16), np.nan, np.float16), "non-finite"),
        (np.zeros((2, 1, 8, 8), np.uint8), "16x16"),
        (np.zeros((3, 1, 16, 16), np.uint8), "for 2 samples"),
        (np.zeros((2, 1, 16, 16), np.float64), "uint8 or float16"),
    ],
)
def test_bad_soft_targets_are_rejected(task_identity, ctx, soft, needle):
    rep = app(train_msg([0, 1], soft=soft), ctx())
    assert rep.has_error() and needle in local_detail(rep.error.reason)


def test_bad_pool_is_rejected(task_identity, ctx):
    images, masks = phantom_pool_arrays()
    rep = app(train_msg([0], pool=(images.astype(np.float32), masks)), ctx())
    assert rep.has_error() and "uint8" in local_detail(rep.error.reason)
    rep = app(train_msg([0], pool=(images, masks * 7)), ctx())
    assert rep.has_error() and "masks" in local_detail(rep.error.reason)
    rep = app(train_msg([0], pool=(images[..., :20], masks[..., :20])), ctx())
    assert (
        rep.has_error()
        and "(N,3,S,S)" in local_detail(rep.error.reason)
        and "20" in local_detail(rep.error.reason)
    )


def test_pool_sent_at_generator_size_is_trained_on_at_image_size(task_identity, ctx, monkeypatch):
    """A generator pool travels at gen-size (4x fewer bytes than at image-size); the site resizes it
    with the server's own function, caches it as it came, and trains at image-size."""
    from client_app.state import SiteStore
    from client_app.trainer import SiteTrainer
    from common.transforms import resize_pairs

    seen = []
    real = SiteTrainer.train_with_distillation

    def spy(self, settings, images, masks, *a, **kw):
        seen.append((images.copy(), masks.copy()))
        return real(self, settings, images, masks, *a, **kw)

    monkeypatch.setattr(SiteTrainer, "train_with_distillation", spy)
    small = phantom_site(50, 6, 16)
    rep = app(train_msg([0, 3], pool=(small.images, small.masks), pool_id="g16"), ctx())
    assert not rep.has_error(), rep.error.reason if rep.has_error() else ""
    images, masks = seen[0]  # the whole pool: supervised on all, distillation on the selected two
    assert images.shape == (6, 3, 32, 32) and masks.shape == (6, 1, 32, 32)
    want_i, want_m = resize_pairs(small.images, small.masks, 32)
    np.testing.assert_array_equal(images, want_i)
    np.testing.assert_array_equal(masks, want_m)
    store = SiteStore(str(ctx().node_config["state-dir"]), 11, "phantom-0")
    cached_images, _ = store.load_pool("g16")
    assert cached_images.shape[-1] == 16  # cached as it travelled


def test_weights_mode_returns_weights_and_no_probs(task_identity, ctx):
    import torch

    from common.models import build_model

    torch.manual_seed(0)
    w = {k: v.numpy() for k, v in build_model("unet").state_dict().items()}
    msg = train_msg([0, 1], included="selected")
    msg.content[P.KEY_ARRAYS] = to_array_record(w)
    rep = app(msg, ctx(exchange="weights"))
    assert not rep.has_error(), rep.error.reason if rep.has_error() else ""
    assert P.KEY_ARRAYS in rep.content.array_records and P.KEY_SITE_PROBS not in rep.content.array_records


def test_pool_score_reply_and_pool_cached(task_identity, ctx):
    images, masks = phantom_pool_arrays()
    msg = Message(
        RecordDict(
            {
                P.KEY_CONFIG: ConfigRecord({P.CFG_POOL_ID: "p9"}),
                P.KEY_POOL: to_array_record({P.ARR_IMAGES: images, P.ARR_MASKS: masks}),
            }
        ),
        dst_node_id=3,
        message_type=P.MSG_EVALUATE_POOL,
    )
    rep = app(msg, ctx(**{"pool-score-epochs": 1}))
    assert not rep.has_error(), rep.error.reason if rep.has_error() else ""
    m = rep.content.metric_records[P.KEY_METRICS]
    assert 0 <= m["dice-pool"] <= 1 and 0 <= m["dice-real"] <= 1 and m["n-pool"] == len(images)
    # the pool is now cached: a train round can refer to it by id
    rep = app(train_msg([0, 1], included="none", pool_id="p9"), ctx())
    assert not rep.has_error(), rep.error.reason if rep.has_error() else ""


def test_bootstrap_trains_on_pool_and_fm_only(task_identity, ctx, monkeypatch):
    """A held-out site's bootstrap never touches its own training data and sends no probabilities."""
    from client_app.state import SiteStore
    from client_app.trainer import SiteTrainer

    def no_private(*_a, **_k):
        raise AssertionError("bootstrap must not train on the site's private data")

    monkeypatch.setattr(SiteTrainer, "train", no_private)
    msg = train_msg(list(range(6)))
    msg.content.config_records[P.KEY_CONFIG][P.CFG_STAGE] = P.STAGE_BOOTSTRAP
    rep = app(msg, ctx(**{"holdout-epochs": 1}))
    assert not rep.has_error(), rep.error.reason if rep.has_error() else ""
    assert set(rep.content.array_records) == set()  # metrics only
    m = rep.content.metric_records[P.KEY_METRICS]
    assert m[P.MET_NUM_EXAMPLES] == 6 and m["distill-steps"] > 0
    assert SiteStore(str(ctx().node_config["state-dir"]), 11, "phantom-0").load_model() is not None


def test_bootstrap_refused_outside_logits_exchange(task_identity, ctx):
    msg = train_msg(list(range(6)))
    msg.content.config_records[P.KEY_CONFIG][P.CFG_STAGE] = P.STAGE_BOOTSTRAP
    rep = app(msg, ctx(exchange="weights"))
    assert (
        rep.has_error()
        and rep.error.code == ERR_PAYLOAD
        and "logits exchange only" in local_detail(rep.error.reason)
    )
