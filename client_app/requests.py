"""What a request refers to, for the handlers in :mod:`client_app.app`: the synthetic pool a
DSFedMed request sends or names (cached at the site between rounds), and the validation a train
request may ask for (``evaluate-in-train``, already held to the site's evaluate policy by the guard)."""

from __future__ import annotations

from flwr.app import ConfigRecord, Message

from client_app.errors import PayloadError, PoolMissing
from client_app.state import SiteStore
from client_app.trainer import SiteTrainer
from common import protocol as P
from common.codec import check_pool_record
from common.transforms import resize_pairs
from common.validation import PayloadInvalid, check_pool


def pool_arrays(
    msg: Message, store: SiteStore, pool_id: str, selected: list[int] | None, included: str, size: int
):
    """The synthetic pairs a request refers to (``selected`` None = the whole pool) at ``size``; a
    whole pool that arrives is cached (at the size it travelled at) for later rounds, which then
    refer to it by id. The pool travels at the size it was made at and is resized here exactly as
    the server resizes it."""
    if included in ("all", "selected"):
        if P.KEY_POOL not in msg.content.array_records:
            raise PayloadError(
                f"message says the pool is included ({included}) but has no '{P.KEY_POOL}' record"
            )
        # its byte size was bounded by _check_request; here its arrays, shapes and mask values
        images, masks = check_pool_record(msg.content.array_records[P.KEY_POOL])
        if included == "selected":
            if selected is None or len(images) != len(selected):
                raise PayloadError(
                    f"{len(images)} pool images sent for {len(selected or [])} selected samples"
                )
            return resize_pairs(images, masks, size)
        store.save_pool(pool_id, images, masks)
    else:
        cached = store.load_pool(pool_id)
        if cached is None:
            raise PoolMissing(
                f"synthetic pool {pool_id} is not cached at this site; the server must resend it"
            )
        images, masks = cached
        try:  # a damaged copy on disk is as good as none: the server resends the pool
            check_pool(images, masks, what=f"cached pool {pool_id}")
        except PayloadInvalid as exc:
            raise PoolMissing(
                f"synthetic pool {pool_id} is not cached at this site ({exc}); the server must resend it"
            ) from None
    if selected is None:
        return resize_pairs(images, masks, size)
    if max(selected, default=-1) >= len(images) or min(selected, default=0) < 0:
        raise PayloadError(f"a selected index is outside the pool of {len(images)} samples")
    return resize_pairs(images[selected], masks[selected], size)


def own_validation(tr: SiteTrainer, cfg: ConfigRecord) -> dict[str, float]:
    """With ``evaluate-in-train``: the trained model's validation scores for the train reply,
    ``val-`` prefixed (the site guard has already applied the site's evaluate policy to the request;
    only the validation split may be asked for this way)."""
    split = cfg.get(P.CFG_EVALUATE_SPLIT)
    if split is None:
        return {}
    if split != "val":
        raise PayloadError(f"a train request may ask for validation on 'val' only, not {split!r}")
    res = tr.evaluate("val")
    keys = {
        "dice": P.MET_DICE,
        "iou": P.MET_IOU,
        "dice05": P.MET_DICE05,
        "iou05": P.MET_IOU05,
        "n": P.MET_NUM_EXAMPLES,
    }
    return {P.MET_VAL_PREFIX + name: float(res[k]) for k, name in keys.items()}
