"""Node and run configs as the operator's commands read them: exactly as Flower does
(``flower-supernode --node-config``, ``flwr run --run-config``), then validated by
:mod:`common.config`."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from common.config import ConfigError, RunConfig, parse_run_config


def read_node_config(text: str = "", file: str | Path | None = None) -> dict[str, Any]:
    """A node config as Flower reads ``--node-config``: ``key=value`` pairs, or a TOML file."""
    from flwr.common.config import parse_config_args

    if text and file:
        raise ValueError("give --node-config or --node-config-file, not both")
    if file:
        path = Path(file).expanduser()
        if not path.is_file():
            raise ValueError(f"node config file {path} does not exist")
        try:
            with open(path, "rb") as fh:
                return tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"node config file {path} is not valid TOML: {exc}") from None
    if not text:
        return {}
    try:
        return parse_config_args([text])
    except Exception as exc:  # noqa: BLE001 - Flower raises click exceptions with the reason
        raise ValueError(f"node config {text!r}: {getattr(exc, 'message', exc)}") from None


def run_config_defaults(app_dir: str | Path | None = None) -> dict[str, Any]:
    """``[tool.flwr.app.config]`` of the app's pyproject.toml when there is one (what ``flwr run``
    starts from), else {} so that RunConfig's own defaults (the same values) apply."""
    if app_dir is None:
        return {}
    pyproject = Path(app_dir) / "pyproject.toml"
    if not pyproject.is_file():
        return {}
    with open(pyproject, "rb") as fh:
        return dict(tomllib.load(fh).get("tool", {}).get("flwr", {}).get("app", {}).get("config", {}))


def read_run_config(overrides: str = "", app_dir: str | Path | None = None) -> RunConfig:
    """The run config as the ServerApp will see it: pyproject defaults + ``--run-config`` overrides."""
    from flwr.common.config import parse_config_args

    try:
        raw = parse_config_args([overrides]) if overrides else {}
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"run config {overrides!r}: {getattr(exc, 'message', exc)}") from None
    return parse_run_config({**run_config_defaults(app_dir), **raw})
