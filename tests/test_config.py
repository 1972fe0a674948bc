import tomllib

import pytest
from pydantic import ValidationError

from common.config import ConfigError, RunConfig, parse_node_config, parse_run_config
from tests.conftest import REPO


def test_pyproject_defaults_are_valid_and_complete():
    raw = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    cfg = parse_run_config(raw)
    # every field has a default in pyproject, so `flwr run --run-config` can override any of them
    assert set(raw) == set(cfg.to_flat())
    assert cfg.method == "dsfedmed"


def test_unknown_key_names_key_and_known_keys():
    with pytest.raises(ConfigError) as e:
        parse_run_config({"num-round": 3})
    msg = str(e.value)
    assert "unknown key 'num-round'" in msg and "num-rounds" in msg


def test_wrong_type_names_key():
    with pytest.raises(ConfigError) as e:
        parse_run_config({"num-rounds": "many"})
    assert "'num-rounds'" in str(e.value) and "'many'" in str(e.value)


def test_out_of_range_names_bounds():
    with pytest.raises(ConfigError) as e:
        parse_run_config({"learning-rate": 0.0})
    msg = str(e.value)
    assert "'learning-rate'" in msg and "> 0.0" in msg


def test_literal_lists_allowed_values():
    with pytest.raises(ConfigError) as e:
        parse_run_config({"device": "tpu"})
    assert "'auto'" in str(e.value) and "'cuda'" in str(e.value)


def test_unknown_model_lists_registry():
    with pytest.raises(ConfigError) as e:
        parse_run_config({"model": "resnet9000"})
    assert "segresnet" in str(e.value) and "'model'" in str(e.value)


def test_fraction_sum_checked():
    with pytest.raises(ConfigError, match="val-fraction \\+ test-fraction"):
        parse_run_config({"val-fraction": 0.5, "test-fraction": 0.45})


def test_node_config_simulation_and_deployment_keys():
    n = parse_node_config({"partition-id": 1, "num-partitions": 3})
    assert n.partition_id == 1 and n.data_dir == ""
    n = parse_node_config({"data-dir": "/data/site", "model": "basicunet", "num-threads": 2})
    assert n.model == "basicunet"
    with pytest.raises(ConfigError, match="unknown key 'datadir'"):
        parse_node_config({"datadir": "/x"})
    with pytest.raises(ConfigError, match="'model'"):
        parse_node_config({"model": "nope"})


def test_config_is_frozen():
    cfg = RunConfig()
    with pytest.raises(ValidationError):
        cfg.num_rounds = 9  # type: ignore[misc]


def test_the_teacher_is_prompt_free_by_default_and_the_oracle_is_named_so():
    assert parse_run_config({}).fm_prompt == "whole-box"
    assert parse_run_config({"fm-prompt": "oracle-mask-box"}).fm_prompt == "oracle-mask-box"
    assert parse_run_config({"fm-prompt": "mask-box"}).fm_prompt == "oracle-mask-box"  # older run dirs
    with open(REPO / "pyproject.toml", "rb") as fh:
        assert tomllib.load(fh)["tool"]["flwr"]["app"]["config"]["fm-prompt"] == "whole-box"


def test_a_config_is_parsed_once_and_errors_every_time():
    """The guard, the size gate and the handler of one message all parse the run config: the frozen
    result is shared, while a bad config fails on every call (errors are never cached)."""
    from common.config import ConfigError, parse_node_config, parse_run_config

    raw = {"num-rounds": 3, "image-size": 32}
    assert parse_run_config(raw) is parse_run_config(dict(raw))
    assert parse_run_config({"num-rounds": 3, "image-size": 64}).image_size == 64
    assert parse_node_config({"partition-id": 1}) is parse_node_config({"partition-id": 1})
    for _ in range(2):
        with pytest.raises(ConfigError, match="num-rounds"):
            parse_run_config({"num-rounds": 0})
    assert parse_run_config({"tensorboard": True}).tensorboard is True
    assert parse_run_config({"tensorboard": 1}) is not parse_run_config({"tensorboard": True})
