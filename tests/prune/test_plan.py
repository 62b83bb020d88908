"""Pruning plans, selection rules, hook and weight-edit applicators, and export (workbench.prune.plan)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from workbench.batching import left_pad
from workbench.components import Component, mean_activations
from workbench.loaded import model_info
from workbench.models import weight_hash, wrap
from workbench.prune.plan import (
    PlanError,
    PruningPlan,
    apply_weight_edits,
    export_pruned,
    hf_tensor,
    hooks_for,
    model_hash,
    intersection,
    most_frequent,
    pruned_weights,
    restore_weights,
    save_tensors,
    select_top_k,
    select_top_percentile,
    set_difference,
)
from workbench.testing.tiny import tiny_llama

N, H = "mlp_neuron", "attn_head"
NEURONS = [Component(0, N, 3), Component(1, N, 70), Component(1, N, 5)]
HEADS = [Component(0, H, 1), Component(1, H, 3), Component(1, H, 0)]


@pytest.fixture(scope="module")
def bridge(make_tiny_bridge):
    return make_tiny_bridge()


@pytest.fixture(scope="module")
def biased_bridge(make_tiny_bridge):
    """Query, key, value and output projections with biases (exercises the q bias under query_zero)."""
    return make_tiny_bridge(attention_bias=True, seed=1)


def batch(bridge, texts=("The price is $12.", "Hello there, how much?")):
    tokenizer = model_info(bridge).tokenizer
    return left_pad([[tokenizer.bos_token_id, *tokenizer.encode(t)] for t in texts], tokenizer.pad_token_id)


def plan_of(components, ablation="zero", **extra) -> PruningPlan:
    settings = dict(method="test", selection={"rule": "top_k", "k": len(components)}, ablation=ablation)
    return PruningPlan(model="tiny", model_hash="x", components=components, **{**settings, **extra})


def logits(bridge, ids, mask):
    with torch.inference_mode():
        return bridge(ids, attention_mask=mask)


def means_of(bridge):
    names = [f"blocks.{l}.{h}" for l in range(2) for h in ("mlp.hook_post", "attn.hook_z")]
    return mean_activations(bridge, [batch(bridge)], names)


CASES = [("zero", NEURONS), ("zero", HEADS), ("zero", NEURONS + HEADS), ("query_zero", HEADS),
         ("mean", NEURONS + HEADS)]


@pytest.mark.parametrize("which", ["bridge", "biased_bridge"])
@pytest.mark.parametrize("ablation, components", CASES)
def test_hooks_equal_weight_edits(request, which, ablation, components):
    bridge = request.getfixturevalue(which)
    ids, mask = batch(bridge)
    plan, means = plan_of(components, ablation), means_of(bridge)
    before, base = weight_hash(bridge.original_model), logits(bridge, ids, mask)
    with bridge.hooks(fwd_hooks=hooks_for(plan, means)):
        hooked = logits(bridge, ids, mask)
    assert weight_hash(bridge.original_model) == before
    assert torch.equal(logits(bridge, ids, mask), base)
    assert (hooked - base).abs().max() > 1e-4
    originals = apply_weight_edits(bridge.original_model, plan, means)
    edited = logits(bridge, ids, mask)
    with torch.inference_mode():
        edited_hf = bridge.original_model(ids, attention_mask=mask).logits
    restore_weights(bridge.original_model, originals)
    assert (edited - hooked).abs().max() < 1e-5
    assert (edited_hf - hooked).abs().max() < 1e-5
    assert weight_hash(bridge.original_model) == before
    assert torch.equal(logits(bridge, ids, mask), base)


def test_mean_plan_reads_means_file(bridge, tmp_path):
    ids, mask = batch(bridge)
    means = means_of(bridge)
    plan = plan_of(NEURONS + HEADS, "mean", means=str(save_tensors(tmp_path / "means.safetensors", means)))
    with bridge.hooks(fwd_hooks=hooks_for(plan)):
        hooked = logits(bridge, ids, mask)
    with pruned_weights(bridge, plan):
        edited = logits(bridge, ids, mask)
    assert (edited - hooked).abs().max() < 1e-5
    with pytest.raises(PlanError, match="mean activations"):
        hooks_for(plan_of(NEURONS, "mean"))


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_export_loads_with_transformers(bridge, tmp_path, ablation):
    ids, mask = batch(bridge)
    plan, means = plan_of(NEURONS + HEADS, ablation), means_of(bridge)
    before = weight_hash(bridge.original_model)
    with pruned_weights(bridge, plan, means):
        expected = logits(bridge, ids, mask)
    out = export_pruned(bridge, model_info(bridge).tokenizer, plan, tmp_path / "pruned", means=means)
    assert weight_hash(bridge.original_model) == before
    assert not bridge.original_model.config.mlp_bias
    loaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    with torch.inference_mode():
        got = loaded(ids, attention_mask=mask).logits
    real = mask.bool()  # the bridge zeroes the logits of padding positions, plain HF does not
    assert (got[real] - expected[real]).abs().max() < 1e-5
    saved = PruningPlan.load(out / "pruning_plan.json")
    assert saved.components == plan.components
    assert (ablation == "mean") == (saved.means is not None)


def test_weight_selection_plan(bridge, tmp_path):
    ids, mask = batch(bridge)
    name = "model.layers.1.mlp.down_proj.weight"
    weight = hf_tensor(bridge, name)
    selection = {name: torch.arange(0, weight.numel(), 7), "model.layers.0.self_attn.o_proj": torch.tensor([0, 5])}
    path = save_tensors(tmp_path / "selection.safetensors", selection)
    plan = plan_of([], method="wanda", weight_selection=str(path),
                   selection={"rule": "set_difference", "tau_black": 10, "tau_white": 10})
    before = weight_hash(bridge.original_model)
    with pytest.raises(PlanError, match="no activation hooks"):
        hooks_for(plan)
    with pruned_weights(bridge, plan):
        assert (weight.detach().view(-1)[selection[name]] == 0).all()
        assert (hf_tensor(bridge, "model.layers.0.self_attn.o_proj.weight").view(-1)[[0, 5]] == 0).all()
        pruned = logits(bridge, ids, mask)
    assert weight_hash(bridge.original_model) == before
    assert not torch.equal(pruned, logits(bridge, ids, mask))


def test_model_hash_ignores_bridge_wrapping():
    model, tokenizer = tiny_llama(seed=2)
    before = weight_hash(model)
    assert model_hash(model) == before
    assert model_hash(wrap(model, tokenizer, "tiny")) == before


def test_plan_round_trip(tmp_path):
    plan = plan_of(HEADS, "query_zero", scores=[0.5, 0.25, 0.125], seed=3)
    loaded = PruningPlan.load(plan.save(tmp_path / "plan.json"))
    assert loaded == plan
    assert set(json.loads((tmp_path / "plan.json").read_text())["versions"]) == {
        "torch", "transformers", "transformer_lens", "workbench"}


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.pop("ablation"), "missing required field.*ablation"),
        (lambda d: d.update(colour="red"), "unknown field.*colour"),
        (lambda d: d.update(ablation="blur"), "'ablation'"),
        (lambda d: d.update(scores=[1.0]), "'scores'"),
        (lambda d: d["components"].append({"layer": 0, "kind": "neuron", "index": 1}), "kind"),
        (lambda d: d["components"].append({"layer": 0, "index": 1}), r"components\[3\]"),
        (lambda d: d.update(selection={"rule": "best"}), "'selection'"),
    ],
)
def test_bad_plan_names_file_and_field(tmp_path, edit, message):
    data = plan_of(HEADS).to_json()
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match=message) as error:
        PruningPlan.load(path)
    assert str(path) in str(error.value)


def test_unreadable_plan(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(PlanError, match="broken.json"):
        PruningPlan.load(path)


def test_selection_rules():
    scores = torch.tensor([[0.1, 0.9, 0.3], [0.8, 0.2, 0.9]])
    assert select_top_k(scores, 3, N) == [Component(0, N, 1), Component(1, N, 2), Component(1, N, 0)]
    assert select_top_percentile(scores, 50, H) == [Component(0, H, 1), Component(1, H, 2), Component(1, H, 0)]
    assert select_top_percentile(scores, 34, H) == [Component(0, H, 1), Component(1, H, 2)]
    a, b, c = Component(0, H, 0), Component(1, H, 1), Component(2, H, 2)
    assert set_difference([c, a, b], [a]) == [c, b]
    assert intersection([[c, a, b], [b, c], [c, b, a]]) == [b, c]
    assert intersection([]) == []
    assert most_frequent([[c, a], [c, b], [c, b], [a]], 2) == [c, a]
