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


RUNNING_EXAMPLE = "notebooks on the running example"
LONGEST_FIRST = (RUNNING_EXAMPLE, "test_spike_in_smol.py", "notebook 07", "test_cli.py", "test_capability.py",
                 "test_engine.py")
"""The groups that take longest, longest first (on the 2-core machine: notebooks 01-06 about 11-13 min, the
spike-in module about 6 min, notebook 07 about 3 min, these files 1-3 min each): the scheduler hands them out
before the others, so that the long ones do not start last and the two workers end together."""


def xdist_group(nodeid: str) -> str:
    """The worker group of a test, from its node id: its file's name; the notebooks' executions on the running
    example (01-06) one group, 07 its own."""
    path, _, name = nodeid.partition("::")
    if name.startswith("test_notebook_executes_and_checks_match["):
        return "notebook 07" if "07_directions" in name else RUNNING_EXAMPLE
    return path.rsplit("/", 1)[-1]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Any test that uses the real model carries the `integration` marker (select with -m integration), and every
    test the `xdist_group` marker of `xdist_group`.

    Under pytest-xdist (`scripts/test.sh` runs `-n 2 --dist loadgroup`) the tests of one file run in one worker, so
    that a module's fixtures are computed once. The notebooks on the running example (01-06) execute in order in one
    worker, so that the first reads the example's prompts and the others find them in the read-out cache; 07 runs
    wherever there is room. The scheduler (`pytest_xdist_make_scheduler`) groups by `xdist_group` of the node id:
    xdist 3.8 groups by the marker through the node id, which pytest 9 no longer lets it rewrite, so on these
    versions every test would be a group of its own."""
    for item in items:
        if "smol_bridge" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)
        item.add_marker(pytest.mark.xdist_group(xdist_group(item.nodeid)))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadgroup` with the groups of `xdist_group`, handing out those of LONGEST_FIRST first, in that order,
    then the others in xdist's order (most tests first); a worker is given its next group when it starts the last
    test of those it has (xdist: the last two), so that the long groups' workers do not hold a group back."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    def rank(scope: str) -> int:
        return LONGEST_FIRST.index(scope) if scope in LONGEST_FIRST else len(LONGEST_FIRST)

    class LongestFirst(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_group(nodeid)

        def _assign_work_unit(self, node) -> None:
            self.workqueue.move_to_end(min(self.workqueue, key=rank), last=False)
            super()._assign_work_unit(node)

        def _reschedule(self, node) -> None:
            if not self.workqueue or self._pending_of(self.assigned_work[node]) <= 1:
                super()._reschedule(node)

    return LongestFirst(config, log)


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
