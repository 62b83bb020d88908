"""A tiny Llama with a planted bias circuit: one attention head and one MLP neuron carry the whole name effect.

Names are synthetic; "Black" names contain the marker character "Q", "White" names do not. Residual
directions 0-7 are reserved (random weights never read their embedding values nor write to them):

- every token embeds a constant direction CONST, "Q" adds MARKER, "$" adds DOLLAR, digits add DIGIT;
- the planted head (layer hb, query head h) attends from the "$" position to the "Q" token (query reads
  DOLLAR, key reads MARKER, on the lowest-frequency rotary dimension so position hardly matters), copies
  MARKER through its value and writes it to MOVED;
- the planted neuron (layer nl >= hb, index i) fires when MOVED is present (gate reads MOVED minus a
  threshold on CONST) and writes HIGH;
- the unembedding makes "$" predict "3" (mostly) or "7", HIGH shifts mass to "7", and a digit predicts the
  end of the number, so Black prompts answer higher.

All other heads and neurons keep their random weights, scaled down, as distractors with small effects.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from workbench.components import Component
from workbench.prompts import Prompt, PromptSet
from workbench.tiny import tiny_llama

CONST, MARKER, DOLLAR, HIGH, DIGIT, MOVED = 0, 1, 2, 3, 5, 6
RESERVED = 8
ROTARY_SLOW = 7  # head dimension with the lowest rotary frequency (paired with 15 for d_head 16)
WHITE_NAMES = ("Ben", "Al", "Tod")
BLACK_NAMES = ("Qin", "JaQ", "Qoqa")
GAIN_HEAD, GAIN_NEURON = 0.1, 0.03
TEMPLATE = "Tip {name}."


@dataclass
class PlantedModel:
    model: LlamaForCausalLM
    tokenizer: PreTrainedTokenizerFast
    neuron: Component
    head: Component


def planted_model(neuron: tuple[int, int] = (1, 7), head: tuple[int, int] = (0, 1), n_layers: int = 3,
                  d_mlp: int = 16, noise: float = 1.0, readout_noise: float = 0.3, seed: int = 0) -> PlantedModel:
    """A tiny Llama whose Black/White answer gap runs through the given head (layer, h) and neuron (layer, i)."""
    if head[0] > neuron[0]:
        raise ValueError("the planted head must sit in the neuron's layer or earlier (it feeds the neuron)")
    model, tokenizer = tiny_llama(seed, num_hidden_layers=n_layers, intermediate_size=d_mlp)
    ids = {c: tokenizer.convert_tokens_to_ids(c) for c in "Q$0123456789"}
    with torch.no_grad():
        _reserve(model, noise)
        _embed(model, ids)
        _unembed(model, ids, tokenizer.convert_tokens_to_ids("<|im_end|>"), readout_noise)
        _plant_head(model, *head)
        _plant_neuron(model, *neuron)
    return PlantedModel(model, tokenizer, Component(neuron[0], "mlp_neuron", neuron[1]),
                        Component(head[0], "attn_head", head[1]))


def _reserve(model: LlamaForCausalLM, noise: float) -> None:
    """Scale the random components down and keep them off the reserved directions (in and out)."""
    for layer in model.model.layers:
        for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                       layer.mlp.gate_proj, layer.mlp.up_proj):
            linear.weight[:, :RESERVED] = 0
        for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
            linear.weight.mul_(noise)
            linear.weight[:RESERVED] = 0


def _embed(model: LlamaForCausalLM, ids: dict[str, int]) -> None:
    embed = model.model.embed_tokens.weight
    embed[:, :RESERVED] = 0
    embed[:, CONST] = 1.0
    embed[ids["Q"], MARKER] = 1.0
    embed[ids["$"], DOLLAR] = 1.0
    embed[[ids[d] for d in "0123456789"], DIGIT] = 1.0


def _unembed(model: LlamaForCausalLM, ids: dict[str, int], end_id: int, readout_noise: float) -> None:
    """Digits read the random directions too (scaled by readout_noise), so distractors move the answer."""
    unembed = model.lm_head.weight
    digits = [ids[d] for d in "0123456789"]
    unembed[digits] = readout_noise * torch.randn_like(unembed[digits])
    unembed[:, :RESERVED] = 0
    unembed[ids["3"], DOLLAR] = 1.6
    unembed[ids["7"], DOLLAR] = 1.2
    unembed[ids["7"], HIGH] = 0.6
    unembed[end_id, DIGIT] = 2.0


def _plant_head(model: LlamaForCausalLM, layer: int, head: int) -> None:
    attention = model.model.layers[layer].self_attn
    d_head = attention.head_dim
    kv = head // (model.config.num_attention_heads // model.config.num_key_value_heads)
    q_rows = slice(head * d_head, (head + 1) * d_head)
    attention.q_proj.weight[q_rows] = 0
    attention.q_proj.weight[head * d_head + ROTARY_SLOW, DOLLAR] = 3.0
    attention.k_proj.weight[kv * d_head + ROTARY_SLOW] = 0
    attention.k_proj.weight[kv * d_head + ROTARY_SLOW, MARKER] = 3.0
    attention.v_proj.weight[kv * d_head] = 0
    attention.v_proj.weight[kv * d_head, MARKER] = 1.0
    attention.o_proj.weight[:, head * d_head] = 0
    attention.o_proj.weight[MOVED, head * d_head] = GAIN_HEAD


def _plant_neuron(model: LlamaForCausalLM, layer: int, index: int) -> None:
    mlp = model.model.layers[layer].mlp
    mlp.gate_proj.weight[index] = 0
    mlp.gate_proj.weight[index, MOVED] = 2.0
    mlp.gate_proj.weight[index, CONST] = -0.5
    mlp.up_proj.weight[index] = 0
    mlp.up_proj.weight[index, CONST] = 1.0
    mlp.down_proj.weight[:, index] = 0
    mlp.down_proj.weight[HIGH, index] = GAIN_NEURON


def planted_prompts(variations: tuple[str, ...] = ("lamp", "desk"), identical: bool = False) -> PromptSet:
    """White/Black prompts with the synthetic names (`identical`: the Black prompts use the White names)."""
    prompts = []
    for variation in variations:
        for race, names in (("white", WHITE_NAMES), ("black", WHITE_NAMES if identical else BLACK_NAMES)):
            for name in names:
                text = TEMPLATE.format(name=name, variation=variation)
                prompts.append(Prompt("tip", variation, name, f"{race}_men", race, "man", text, "dollars", "$"))
    return PromptSet(prompts)
