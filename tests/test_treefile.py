"""The coordinator's state on disk without pickle: what goes in comes back, what was tampered with
is refused, and a pickle is never loaded."""

from __future__ import annotations

import math
import os
import pickle
import random

import numpy as np
import pytest
import torch

from common.config import parse_run_config
from common.treefile import TreeFileError, load_tree, save_tree
from server_app.checkpoint import ResumeError, ServerState, load_state, save_state


def _optimiser_state() -> dict:
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.9, 0.99))
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    return opt.state_dict()


def test_round_trip_keeps_types_keys_and_values(tmp_path):
    opt = _optimiser_state()
    tree = {
        "opt": opt,
        "ensemble": torch.rand(3, 1, 4, 4),
        "known": np.array([True, False, True]),
        "ids": np.arange(5, dtype=np.int64),
        "np_rng": np.random.get_state(),
        "py_rng": random.getstate(),
        "scalar": np.float32(0.25),
        "nan": float("nan"),
        "none": None,
        "nested": [{"a": (1, "b")}, []],
        "looks_like_marker": {"__tuple__": [1]},
    }
    save_tree(tmp_path / "s.json", tree)
    back = load_tree(tmp_path / "s.json")
    assert set(back["opt"]["state"]) == set(opt["state"])  # int keys stay ints
    assert back["opt"]["param_groups"][0]["betas"] == (0.9, 0.99)
    for k, v in opt["state"][0].items():
        assert torch.equal(back["opt"]["state"][0][k], v)
    assert isinstance(back["ensemble"], torch.Tensor) and torch.equal(back["ensemble"], tree["ensemble"])
    assert isinstance(back["known"], np.ndarray) and back["known"].dtype == bool
    assert back["ids"].tolist() == [0, 1, 2, 3, 4]
    assert back["np_rng"][0] == "MT19937" and np.array_equal(back["np_rng"][1], tree["np_rng"][1])
    assert back["py_rng"] == tree["py_rng"]
    assert back["scalar"] == 0.25 and math.isnan(back["nan"]) and back["none"] is None
    assert back["nested"] == [{"a": (1, "b")}, []]
    assert back["looks_like_marker"] == {"__tuple__": [1]}
    # an optimiser accepts the restored state
    net = torch.nn.Linear(3, 2)
    torch.optim.AdamW(net.parameters(), lr=1e-3).load_state_dict(back["opt"])


def test_what_cannot_be_stored_without_pickle_is_refused(tmp_path):
    with pytest.raises(TypeError, match="state.x"):
        save_tree(tmp_path / "s.json", {"x": object()})
    with pytest.raises(TypeError, match="dtype object"):
        save_tree(tmp_path / "s.json", {"x": np.array([{}], dtype=object)})


def test_tampered_or_mismatched_arrays_are_refused(tmp_path):
    save_tree(tmp_path / "s.json", {"w": torch.ones(4)})
    raw = bytearray((tmp_path / "s.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (tmp_path / "s.safetensors").write_bytes(bytes(raw))
    with pytest.raises(TreeFileError, match="SHA-256 differs"):
        load_tree(tmp_path / "s.json")
    (tmp_path / "s.safetensors").unlink()
    with pytest.raises(TreeFileError, match="cannot be read"):
        load_tree(tmp_path / "s.json")
    (tmp_path / "s.json").write_text('{"format": "other"}')
    with pytest.raises(TreeFileError, match="not a dsfedmed state file"):
        load_tree(tmp_path / "s.json")


class _Boom:
    """Unpickling this would create a file: proof that a pickle was executed."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.makedirs, (self.target,))


def test_a_pickled_checkpoint_is_refused_and_never_executed(tmp_path):
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    marker = tmp_path / "pwned"
    (ck / "state.pt").write_bytes(pickle.dumps({"version": 1, "x": _Boom(str(marker))}))
    with pytest.raises(ResumeError, match="pickles are never loaded"):
        load_state(tmp_path)
    # a pickle dressed as the new format's arrays file is refused as well
    cfg = parse_run_config({"method": "fedavg"})
    st = ServerState(1, 7, "fedavg", cfg.to_flat(), [], {}, {}, 1.0, strategy={"w": torch.ones(2)})
    save_state(ck, st)
    (ck / "state.safetensors").write_bytes(pickle.dumps(_Boom(str(marker))))
    with pytest.raises(ResumeError, match="cannot be read"):
        load_state(tmp_path)
    assert not marker.exists()


def test_server_state_round_trip_restores_rng_and_strategy(tmp_path):
    cfg = parse_run_config({"method": "dsfedmed"})
    strategy = {"teacher": {"opt": _optimiser_state()}, "known": np.ones(4, dtype=bool), "pool_score": None}
    st = ServerState(3, 11, "dsfedmed", cfg.to_flat(), [{"round": 1, "dice": float("nan")}], {"a": 1}, {}, 2.5,
                     strategy=strategy)  # fmt: skip
    save_state(tmp_path / "checkpoints", st)
    back = load_state(tmp_path)
    assert back.round == 3 and back.state_key == 11 and back.run_config == cfg.to_flat()
    assert back.strategy["known"].dtype == bool and back.strategy["pool_score"] is None
    torch.manual_seed(5)
    expected = torch.rand(1)
    torch.manual_seed(5)
    save_state(tmp_path / "checkpoints", st)
    torch.rand(10)
    from server_app.checkpoint import restore_rng

    restore_rng(load_state(tmp_path).rng)
    assert torch.equal(torch.rand(1), expected)
