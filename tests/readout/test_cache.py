"""The read-out cache: the same call on the same weights is read back unchanged without running the model; any
change of weights, hooks, settings or prompts is computed afresh."""

import numpy as np
import pytest
import torch

from workbench.components import Component
from workbench.loaded import model_info
from workbench.prune.plan import PruningPlan, pruned_weights
from workbench.readout import cache
from workbench.readout.engine import ExactReadoutConfig, exact_distributions

PROMPTS = ["Price: $", "A car costs $"]
CONFIG = ExactReadoutConfig(max_tokens=3)


@pytest.fixture
def bridge(make_tiny_bridge, tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_READOUT_CACHE", str(tmp_path))
    return make_tiny_bridge(seed=3)


def _ids(bridge):
    tokenizer = model_info(bridge).tokenizer
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in PROMPTS]


def _same(a, b) -> bool:
    return all(np.array_equal(x.values, y.values) and np.array_equal(x.probs, y.probs) and x.texts == y.texts
               and x.invalid_mass == y.invalid_mass and x.unexplored_mass == y.unexplored_mass
               and x.completed_mass == y.completed_mass for x, y in zip(a, b, strict=True))


def _forbid_forward(bridge, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the model ran")
    monkeypatch.setattr(bridge, "forward", fail)


def test_the_same_call_is_read_back_without_running_the_model(bridge, tmp_path, monkeypatch):
    first = exact_distributions(bridge, _ids(bridge), CONFIG, progress=False)
    assert len(list(tmp_path.rglob("*.json"))) == 1
    _forbid_forward(bridge, monkeypatch)
    assert _same(exact_distributions(bridge, _ids(bridge), CONFIG, progress=False), first)
    with pytest.raises(AssertionError, match="the model ran"):  # another seed is another call
        exact_distributions(bridge, _ids(bridge), ExactReadoutConfig(max_tokens=3, seed=1), progress=False)
    with pytest.raises(AssertionError, match="the model ran"):  # so is another order of the prompts
        exact_distributions(bridge, _ids(bridge)[::-1], CONFIG, progress=False)


def test_edited_or_hooked_models_are_read_afresh_and_not_stored(bridge, tmp_path):
    ids = _ids(bridge)
    unedited = exact_distributions(bridge, ids, CONFIG, progress=False)
    plan = PruningPlan(model="tiny", model_hash="", components=[Component(1, "attn_head", h) for h in range(4)],
                       method="test", selection={"rule": "top_k"}, ablation="zero")
    with pruned_weights(bridge, plan):
        assert cache.entry_path(bridge, ids, CONFIG) is None
        pruned = exact_distributions(bridge, ids, CONFIG, progress=False)
    zero_mlp = [("blocks.0.hook_mlp_out", lambda x, hook: x * 0)]
    with bridge.hooks(fwd_hooks=zero_mlp):
        assert cache.entry_path(bridge, ids, CONFIG) is None
        hooked = exact_distributions(bridge, ids, CONFIG, progress=False)
    assert not _same(pruned, unedited) and not _same(hooked, unedited)
    assert len(list(tmp_path.rglob("*.json"))) == 1  # the unedited call only
    assert _same(exact_distributions(bridge, ids, CONFIG, progress=False), unedited)  # restored: a hit again


def test_weights_changed_in_place_outside_the_edit_contexts_change_the_key(bridge):
    ids = _ids(bridge)
    before = exact_distributions(bridge, ids, CONFIG, progress=False)
    weight = bridge.original_model.model.layers[0].mlp.down_proj.weight
    original = weight.detach().clone()
    with torch.no_grad():
        weight.mul_(3.0)
    changed = exact_distributions(bridge, ids, CONFIG, progress=False)
    with torch.no_grad():
        weight.copy_(original)
    assert not _same(changed, before)
    assert _same(exact_distributions(bridge, ids, CONFIG, progress=False), before)


def test_off_stores_nothing_and_a_broken_entry_is_computed_again(bridge, tmp_path, monkeypatch):
    ids = _ids(bridge)
    first = exact_distributions(bridge, ids, CONFIG, progress=False)
    entry = cache.entry_path(bridge, ids, CONFIG)
    entry.write_text("{not json")
    assert _same(exact_distributions(bridge, ids, CONFIG, progress=False), first)
    monkeypatch.setenv("WORKBENCH_READOUT_CACHE", "off")
    assert cache.entry_path(bridge, ids, CONFIG) is None
