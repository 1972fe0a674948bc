"""Shared fixtures: Flower-free environment, tiny phantom sites on disk, Flower task identity."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.data import default_polypgen_root

# Nothing in the suite may phone home or install packages at run time.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]


POLYPGEN = default_polypgen_root()  # ../shared/data/polypgen or $DSFEDMED_POLYPGEN


def pytest_collection_modifyitems(config, items):
    """Tiers: every test that runs the real app through Flower processes (``integration``) or trains
    on the real hospitals (``realdata``) is also ``slow``; ``pytest -m "not slow"`` is the tier to run
    before every commit (the README states its time)."""
    for item in items:
        if item.get_closest_marker("integration") or item.get_closest_marker("realdata"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Each test session decodes site data into its own cache, never the user's."""
    cache = tmp_path_factory.getbasetemp() / "dsfedmed-cache"
    monkeypatch.setenv("DSFEDMED_CACHE_DIR", str(cache))


@pytest.fixture
def phantom_folder(tmp_path) -> Path:
    from common.phantoms import write_phantom_site

    return write_phantom_site(tmp_path / "site", index=0, n=12, image_size=32)


@pytest.fixture
def task_identity():
    """Building a Message outside a Flower runtime needs the process's task ids."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 0, 1
    yield TaskIdentity
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module (restored afterwards): on the test machine's shared cores the
    default thread pool makes small training steps many times slower."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def link(tmp_path_factory):
    """A simulation SuperLink for one test module, under a throw-away FLWR_HOME, stopped by PID."""
    from bench.flower_sim import simulation_superlink

    home = tmp_path_factory.mktemp("flwr-home")
    with simulation_superlink(home, REPO) as link:
        yield link


@pytest.fixture(scope="session")
def polypgen_split(tmp_path_factory) -> Path:
    """A split file capping each PolypGen hospital at 96 training, 24 validation and 48 test images
    (the run's own grouped split, cut), so that the real-data runs stay real and take less time."""
    from bench.data import write_capped_split

    out = tmp_path_factory.mktemp("polypgen-split") / "split.json"
    with pytest.MonkeyPatch.context() as mp:  # the session's private cache, never the user's
        mp.setenv("DSFEDMED_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "dsfedmed-cache"))
        write_capped_split(POLYPGEN, out, 64, (96, 24, 48))
    return out
