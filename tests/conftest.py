"""Shared fixtures: deterministic seeds, tiny random Llama bridges, and the real SmolLM2 bridge."""

import os
import random

import numpy as np
import pytest
import torch

from workbench.models import load_model, wrap
from workbench.testing.tiny import tiny_llama

SMOL = "smollm2-135m-instruct"


@pytest.fixture(scope="session", autouse=True)
def _readout_cache(tmp_path_factory):
    """One read-out cache for the test session, shared by the xdist workers and the notebooks' kernels (they
    inherit the environment), never the user's: a clean run starts from nothing cached."""
    root = tmp_path_factory.getbasetemp()
    shared = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root
    previous = os.environ.get("WORKBENCH_READOUT_CACHE")
    os.environ["WORKBENCH_READOUT_CACHE"] = str(shared / "workbench-cache")
    yield
    if previous is None:
        os.environ.pop("WORKBENCH_READOUT_CACHE", None)
    else:
        os.environ["WORKBENCH_READOUT_CACHE"] = previous


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same random state (random, numpy, torch)."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def make_tiny_bridge():
    """A factory of fresh tiny bridges: `make_tiny_bridge(seed=0, name="tiny", **overrides)` wraps
    `tiny_llama(seed, **overrides)` (overrides of its Llama config) as a TransformerBridge named `name`."""

    def make(seed: int = 0, name: str = "tiny", **overrides):
        return wrap(*tiny_llama(seed, **overrides), name)

    return make


@pytest.fixture(scope="session")
def tiny_bridge(make_tiny_bridge):
    """A randomly initialised 2-layer Llama with a character-level tokenizer, wrapped as a TransformerBridge;
    one instance for the session (a test that needs its own builds it with `make_tiny_bridge`)."""
    return make_tiny_bridge(name="tiny-llama")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread: on a busy machine more threads mostly wait for each other (use
    with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smol_bridge():
    """The real SmolLM2-135M-Instruct (dequantised Q4_1) on CPU, float32; loaded once per session."""
    return load_model(SMOL, device="cpu", dtype=torch.float32)


def pytest_collection_modifyitems(config, items):
    """Any test that uses the real model carries the `integration` marker (select with -m integration).

    Under pytest-xdist (`scripts/test.sh` runs `-n 2 --dist loadgroup`) the tests of one file run in one worker, so
    that a module's fixtures are computed once. The notebooks on the running example (01-06) execute in order in one
    worker, so that the first reads the example's prompts and the others find them in the read-out cache; 07 runs
    wherever there is room."""
    for item in items:
        if "smol_bridge" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)
        if item.get_closest_marker("notebooks") is None:
            item.add_marker(pytest.mark.xdist_group(item.path.name))
        elif "07_directions" not in item.name:
            item.add_marker(pytest.mark.xdist_group("notebooks on the running example"))


@pytest.fixture
def write_variant(tmp_path):
    """A copy of a data file with one edit (the first occurrence of `old` replaced by `new`) in tmp_path."""

    def write(source, old: str, new: str, name: str):
        text = source.read_text()
        assert old in text
        path = tmp_path / name
        path.write_text(text.replace(old, new, 1))
        return path

    return write
