"""Tests for workbench.localize.heads and workbench.localize.wanda on tiny Llamas with planted circuits.

Planted embedding directions (hidden size 64, character tokenizer; the other embedding entries are the
random init): dim 0 = 1 for every token (a constant the planted query reads), dim 1 = 1 on the marker
characters "Q" (in the Black names) and "Z" (in the White names), dim 2 = 1 on "Q" only, dim 3 = 1 on "Z"
only, dim 4 = 1 on both. Dims 1-4 are 0 for every other token.
"""

import pytest
import torch

from workbench.components import Component
from workbench.loaded import model_info
from workbench.localize.heads import greedy_head_pruning, head_attention_scores
from workbench.localize.wanda import (
    linear_modules,
    load_selection,
    save_selection,
    selection_overlap,
    wanda_input_norms,
    wanda_selection,
)
from workbench.models import weight_hash
from workbench.prune.plan import zeroed_weights
from workbench.readout.prompts import Prompt, render_all
from workbench.testing.tiny import tiny_llama

BLACK_NAMES = ["DeQuan", "Qiana"]
WHITE_NAMES = ["Zack", "Zoe"]
D_HEAD = 16
SLOW_ROTARY_DIM = 7  # the rotary pair with the lowest frequency: q.k barely depends on the distance
V_PROJ = "model.layers.0.self_attn.v_proj"


def make_prompt(name: str, race: str) -> Prompt:
    text = f"I want to buy a car from {name}. How much should I offer?"
    return Prompt("purchase", "car", name, f"{race}_men", race, "man", text, "dollars", "$")


PROMPTS = [make_prompt(n, "black") for n in BLACK_NAMES] + [make_prompt(n, "white") for n in WHITE_NAMES]


@torch.no_grad()
def plant_embeddings(model, tokenizer) -> None:
    """The marker directions of the module docstring."""
    embedding = model.model.embed_tokens.weight
    embedding[:, 0] = 1.0
    embedding[:, 1:5] = 0.0
    q, z = tokenizer.convert_tokens_to_ids(["Q", "Z"])
    embedding[[q, z], 1] = 1.0
    embedding[q, 2] = 1.0
    embedding[z, 3] = 1.0
    embedding[[q, z], 4] = 1.0


@torch.no_grad()
def plant_head(model, layer: int, head: int, strength: float = 2.0) -> None:
    """Query = the constant dim, key = the marker dim, so the head attends to "Q"/"Z" from everywhere."""
    attention = model.model.layers[layer].self_attn
    kv_head = head // (model.config.num_attention_heads // model.config.num_key_value_heads)
    attention.q_proj.weight[head * D_HEAD : (head + 1) * D_HEAD] = 0.0
    attention.q_proj.weight[head * D_HEAD + SLOW_ROTARY_DIM, 0] = strength
    attention.k_proj.weight[kv_head * D_HEAD : (kv_head + 1) * D_HEAD] = 0.0
    attention.k_proj.weight[kv_head * D_HEAD + SLOW_ROTARY_DIM, 1] = strength


@torch.no_grad()
def plant_value_columns(model) -> None:
    """Large layer-0 value weights on the Black-only, White-only and shared marker dims."""
    model.model.layers[0].self_attn.v_proj.weight[:, 2:5] = 10.0


def plant(model, tokenizer, head: tuple[int, int] | None = None) -> None:
    plant_embeddings(model, tokenizer)
    plant_value_columns(model)
    if head is not None:
        plant_head(model, *head)


def planted_model():
    model, tokenizer = tiny_llama(seed=0)
    plant(model, tokenizer)
    return model, tokenizer


def bridge_of(make_tiny_bridge, head: tuple[int, int] | None = None):
    """A fresh tiny bridge with the planted embeddings and value columns, and the planted head if given."""
    bridge = make_tiny_bridge()
    plant(bridge.original_model, model_info(bridge).tokenizer, head)
    return bridge


def answers_of(tokenizer, text: str = "120"):
    return [tokenizer(text, add_special_tokens=False)["input_ids"]] * len(PROMPTS)


@pytest.fixture(scope="module")
def plain_bridge(make_tiny_bridge):
    return bridge_of(make_tiny_bridge)


@pytest.fixture(scope="module")
def norms(plain_bridge):
    groups = {"black": PROMPTS[:2], "white": PROMPTS[2:]}
    answers = {g: answers_of(model_info(plain_bridge).tokenizer)[:2] for g in groups}
    return wanda_input_norms(plain_bridge, groups, answers, progress=False)


@pytest.mark.parametrize("layer, head", [(0, 1), (1, 2)])
def test_planted_head_ranks_first(layer, head, make_tiny_bridge):
    bridge = bridge_of(make_tiny_bridge, (layer, head))
    scores = head_attention_scores(bridge, PROMPTS, progress=False)
    assert scores.scores.shape == (2, 4)
    assert scores.top(1) == [Component(layer, "attn_head", head)]
    others = scores.scores.clone()
    others[layer, head] = 0.0
    assert scores.scores[layer, head] > 1.5 > 3 * others.max()


@pytest.mark.parametrize("removal", ["query_zero", "zero"])
def test_greedy_pruning_removes_then_moves_on(removal, make_tiny_bridge):
    planted = Component(1, "attn_head", 2)
    bridge = bridge_of(make_tiny_bridge, (1, 2))
    heads, history = greedy_head_pruning(bridge, PROMPTS, steps=2, removal=removal, progress=False)
    assert heads[0] == planted and heads[1] != planted and len(history) == 2
    if removal == "query_zero":
        assert history[1].score(planted) < 0.3 * history[0].score(planted)


def test_rendered_name_span_holds_the_marker(plain_bridge):
    tokenizer = model_info(plain_bridge).tokenizer
    for prompt, rendered in zip(PROMPTS, render_all(PROMPTS, tokenizer)):
        start, end = rendered.name_span
        assert tokenizer.decode(rendered.input_ids[start:end]) == prompt.name


def test_wanda_selects_black_only_column(plain_bridge, norms):
    rows = linear_modules(plain_bridge)[V_PROJ].weight.shape[0]
    column = lambda j: {i * 64 + j for i in range(rows)}  # noqa: E731
    exact = wanda_selection(plain_bridge, norms["black"], norms["white"], tau_black=1 / 32, tau_white=1 / 32)
    assert set(exact[V_PROJ].tolist()) == column(2)
    default = wanda_selection(plain_bridge, norms["black"], norms["white"])
    chosen = set(default[V_PROJ].tolist())
    assert column(2) <= chosen and not chosen & (column(3) | column(4))
    assert set(default) == set(linear_modules(plain_bridge)) and len(default) == 14


def test_norms_are_propagated(norms):
    model, tokenizer = planted_model()
    text = render_all(PROMPTS[:2], tokenizer)
    answer = answers_of(tokenizer)[0]
    with torch.no_grad():
        embedded = [model.model.embed_tokens(torch.tensor(r.input_ids + answer)) for r in text]
        for layer in (0, 1):
            norm = model.model.layers[layer].input_layernorm
            fed = (sum(norm(e).square().sum(0) for e in embedded) / len(embedded)).sqrt()
            propagated = norms["black"][f"model.layers.{layer}.self_attn.v_proj"]
            close = torch.allclose(propagated, fed, rtol=1e-4, atol=1e-5)
            assert close if layer == 0 else not close


def test_apply_restore_and_files(plain_bridge, norms, tmp_path):
    selection = wanda_selection(plain_bridge, norms["black"], norms["white"])
    ids = torch.tensor([render_all(PROMPTS[:1], model_info(plain_bridge).tokenizer)[0].input_ids])
    before_hash = weight_hash(plain_bridge.original_model)
    with torch.no_grad():
        before = plain_bridge(ids)
        with zeroed_weights(plain_bridge, selection):
            assert float(linear_modules(plain_bridge)[V_PROJ].weight[:, 2].abs().sum()) == 0.0
            pruned = plain_bridge(ids)
        after = plain_bridge(ids)
    assert not torch.allclose(before, pruned)
    assert weight_hash(plain_bridge.original_model) == before_hash
    assert torch.equal(before, after)
    save_selection(selection, tmp_path / "sel", plain_bridge, {"tau_black": 0.15})
    loaded, info = load_selection(tmp_path / "sel")
    assert info["metadata"] == {"tau_black": 0.15} and info["shapes"][V_PROJ] == [32, 64]
    assert all(torch.equal(loaded[n], selection[n]) for n in selection)
    assert selection_overlap(selection, loaded) == 1.0
    half = {n: i[: len(i) // 2] for n, i in selection.items()}
    expected = sum(map(len, half.values())) / sum(map(len, selection.values()))
    assert selection_overlap(selection, half) == pytest.approx(expected)
