"""Synthetic pool: sources, storage, contact sheet, and reuse from pool-dir only when settings match."""

import numpy as np

from common.config import parse_run_config
from common.phantoms import write_phantom_site
from server_app import dsfedmed as ds
from server_app import pool_stage
from server_app.federation import Federation
from server_app.rundir import RunDirectory
from server_app.synthesis import Pool, contact_sheet, folder_pool, phantom_pool


def test_phantom_pool_save_load_and_id(tmp_path):
    pool = phantom_pool(6, 32, seed=0)
    assert pool.images.shape == (6, 3, 32, 32) and pool.masks.shape == (6, 1, 32, 32)
    back = Pool.load(pool.save(tmp_path / "p.npz"))
    assert back.pool_id == pool.pool_id and back.sources == pool.sources
    assert phantom_pool(6, 32, seed=1).pool_id != pool.pool_id
    assert contact_sheet(pool, tmp_path / "p.png").stat().st_size > 2_000


def test_generator_pool_is_made_and_kept_at_generator_size():
    """The pool is stored and sent at gen-size; resize_pairs brings it to image-size on both ends."""
    from common.generator import GeneratorConfig, build_unet
    from common.transforms import resize_pairs
    from server_app.synthesis import generator_pool

    cfg = GeneratorConfig(size=16, widths=(8, 16), norm_groups=4, sample_steps=2)
    state = {k: v.detach().numpy() for k, v in build_unet(cfg).state_dict().items()}
    stats = {"mask_log_fg_mean": -2.0, "mask_log_fg_std": 0.3}
    pool = generator_pool({"a": (state, stats), "b": (state, stats)}, cfg, 5, seed=0)
    assert pool.images.shape == (5, 3, 16, 16) and pool.masks.shape == (5, 1, 16, 16)
    assert pool.sources == ["a", "a", "a", "b", "b"]
    images, masks = resize_pairs(pool.images, pool.masks, 48)
    assert images.shape == (5, 3, 48, 48) and images.dtype == np.uint8
    assert set(np.unique(masks)) <= {0, 1}
    # foreground keeps its share of the image, and a matching size is a no-op
    np.testing.assert_allclose(masks.mean(), pool.masks.mean(), atol=0.05)
    assert resize_pairs(images, masks, 48)[0] is images


def test_folder_pool(tmp_path):
    write_phantom_site(tmp_path / "public", index=7, n=10, image_size=32)
    pool = folder_pool(str(tmp_path / "public"), 4, 32, seed=0)
    assert len(pool) == 4 and set(pool.sources) == {"folder"}


class _NoGrid:
    def get_node_ids(self):
        return []


def _strategy(tmp_path, name, **cfg):
    run = parse_run_config(
        {"method": "dsfedmed", "pool-source": "phantoms", "pool-size": 4, "image-size": 32, **cfg}
    )
    return ds.DSFedMedStrategy(run, Federation(_NoGrid()), RunDirectory(tmp_path / name))


def test_pool_dir_is_reused_only_with_matching_settings(tmp_path, monkeypatch):
    calls = []
    real = pool_stage.phantom_pool

    def counting(*a, **k):
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(pool_stage, "phantom_pool", counting)
    pool_dir = str(tmp_path / "pools")
    first = _strategy(tmp_path, "r1", **{"pool-dir": pool_dir}).build_pool()
    second = _strategy(tmp_path, "r2", **{"pool-dir": pool_dir}).build_pool()
    assert len(calls) == 1 and second.pool_id == first.pool_id
    assert (tmp_path / "r2" / "pool.npz").is_file() and (tmp_path / "r2" / "pool.png").is_file()
    third = _strategy(tmp_path, "r3", **{"pool-dir": pool_dir, "seed": 5}).build_pool()
    assert len(calls) == 2 and third.pool_id != first.pool_id
    np.testing.assert_array_equal(Pool.load(tmp_path / "pools" / "pool.npz").images, third.images)


def test_when_every_site_refuses_its_generator_the_pool_falls_back(tmp_path, monkeypatch):
    """A site policy may refuse the generator upload; with no generator at all the federation runs
    on the fallback source (never cached as if it were the generator pool), or stops if told to."""
    import pytest

    from server_app.federation import Exchange, FederationStopped

    refused = Exchange(errors={"h0": "policy allow-generator-upload: this site does not send ..."})

    def strategy(name, **cfg):
        s = _strategy(tmp_path, name, **{"pool-source": "generator", "gen-size": 16, **cfg})
        monkeypatch.setattr(s.fed, "send", lambda msgs, timeout: refused)
        return s

    pool_dir = tmp_path / "pools"
    pool = strategy("r1", **{"pool-dir": str(pool_dir)}).build_pool()
    assert pool.meta["fallback"] == "phantoms" and "h0" in pool.meta["generator_errors"]
    assert pool.images.shape == (4, 3, 16, 16) and (tmp_path / "r1" / "pool.npz").is_file()
    assert not (pool_dir / "pool.npz").exists()
    with pytest.raises(FederationStopped, match="no usable generator.*allow-generator-upload"):
        strategy("r2", **{"pool-fallback": "stop"}).build_pool()
