"""A tiny Llama with a planted bias circuit: one attention head and one MLP neuron carry the whole name effect.

Names are synthetic; "Black" names contain the marker character "Q" (or "Z"), "White" names do not. Residual
directions 0-8 are reserved (random weights never read their embedding values nor write to them):

- every token embeds a constant direction CONST, "Q" adds MARKER, "Z" adds MARKER_Z, the answer prefixes "$"
  (context "tip") and "#" (context "pay") add DOLLAR, "#" also adds PAY, digits add DIGIT;
- the planted head (layer hb, query head h) attends from the "$" position to the "Q" token (query reads
  DOLLAR, key reads MARKER, on the lowest-frequency rotary dimension so position hardly matters), copies
  MARKER through its value and writes it to MOVED;
- the planted neuron (layer nl >= hb, index i) fires when MOVED is present (gate reads MOVED minus a
  threshold on CONST) and writes HIGH;
- the unembedding makes "$" predict "3" (mostly) or "7", HIGH shifts mass to "7", and a digit predicts the
  end of the number, so Black prompts answer higher.

`distributed=True` spreads the (answer-position) circuit: every query head of the planted head's layer moves the
marker (each with 1/n of the gain) and half the neurons of the planted neuron's layer, from the planted index on,
fire on it (each writing 1/n of HIGH), so no one head or neuron carries more than a small share of the bias, while
the residual stream carries all of it along one direction (MOVED) between the two layers.

`neuron_at="name"` moves the planted neuron onto the name instead (a circuit that writes a race feature at the
name and is read later): the neuron (layer nl < hb) fires on the "Q" token only (gate reads MARKER minus a
threshold on CONST) and writes NAMED there; the head then attends from "$" to NAMED, copies it through its
value and writes HIGH. At every other position the neuron is nearly silent (about -0.02, the same in White and
Black rows), so patching it anywhere but on the name changes nothing.

Two options split the (answer-position) circuit, for tests with known answers:
- `pay_neuron`: a second neuron carries the bias in the "pay" context (prompts answered after "#") and the first
  neuron is silenced there, so each context's bias runs through its own neuron;
- `z_head`: a second head (on another key/value head) moves the "Z" marker instead of "Q", so Q-names' and
  Z-names' bias run through different heads. With `gendered_prompts` "Q" marks race and "Z" gender (women's
  names carry it), so the race bias runs through the planted head and the gender bias through the Z head, and
  both through the shared neuron.

All other heads and neurons keep their random weights, scaled down (`noise`), as distractors with small effects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from workbench.components import Component
from workbench.readout.prompts import Prompt, PromptSet
from workbench.testing.tiny import tiny_llama

CONST, MARKER, DOLLAR, HIGH, MARKER_Z, DIGIT, MOVED, PAY, NAMED = range(9)
RESERVED = 9
ROTARY_SLOW = 7  # head dimension with the lowest rotary frequency (paired with 15 for d_head 16)
WHITE_NAMES = ("Ben", "Al", "Tod", "Bo")
BLACK_NAMES = ("Qin", "JaQ", "Qoqa", "Qa")
Z_NAMES = ("Zin", "JaZ", "Zoza", "Za")  # Black names whose marker only the `z_head` moves
QZ_NAMES = ("QiZ", "ZaQ", "QoZa", "QaZ")  # names with both markers (Black women in `gendered_prompts`)
GAIN_HEAD, GAIN_NEURON = 0.1, 0.03
GAIN_NAME_NEURON, GAIN_NAME_HEAD = 0.01, 0.2  # the name-position circuit (`neuron_at="name"`)
PAY_GATE = 3.0  # how far "#" moves a context-specific neuron's gate (wakes the pay neuron, silences the other)
TEMPLATES = {"tip": "Tip {name}.", "pay": "Pay {name}."}
PREFIXES = {"tip": "$", "pay": "#"}


@dataclass
class PlantedModel:
    model: LlamaForCausalLM
    tokenizer: PreTrainedTokenizerFast
    neuron: Component
    head: Component
    pay_neuron: Component | None = None
    z_head: Component | None = None


def planted_model(neuron: tuple[int, int] = (1, 7), head: tuple[int, int] = (0, 1), n_layers: int = 3,
                  d_mlp: int = 16, noise: float = 1.0, readout_noise: float = 0.3, seed: int = 0,
                  pay_neuron: tuple[int, int] | None = None, z_head: tuple[int, int] | None = None,
                  answer_gap: float = 0.4, neuron_at: Literal["answer", "name"] = "answer",
                  distributed: bool = False) -> PlantedModel:
    """A tiny Llama whose Black/White answer gap runs through the given head (layer, h) and neuron (layer, i);
    optionally a second neuron for the "pay" context and a second head for the Z-names (see the module).
    `answer_gap`: how much more "$" favours "3" over "7" (smaller: both answers keep mass under a sampler).
    `neuron_at`: "answer" (the neuron reads the head's output at "$") or "name" (it fires on the name's marker
    token and the head reads it there). `distributed`: the circuit spread over many heads and neurons (see the
    module); `head` and `neuron` are then the first of them."""
    if distributed and (neuron_at == "name" or pay_neuron or z_head):
        raise ValueError("a distributed plant is the answer-position circuit alone")
    heads = [head] + ([z_head] if z_head else [])
    neurons = [neuron] + ([pay_neuron] if pay_neuron else [])
    if neuron_at == "name":
        if pay_neuron or z_head:
            raise ValueError("the name-position neuron does not combine with pay_neuron or z_head")
        if neuron[0] >= head[0]:
            raise ValueError("the name-position neuron must sit before the planted head (it feeds the head)")
    elif max(h[0] for h in heads) > min(n[0] for n in neurons):
        raise ValueError("the planted heads must sit in the neurons' layers or earlier (they feed the neurons)")
    model, tokenizer = tiny_llama(seed, num_hidden_layers=n_layers, intermediate_size=d_mlp)
    if z_head and z_head[0] == head[0] and _kv_head(model, z_head[1]) == _kv_head(model, head[1]):
        raise ValueError("the Z head must not share its key/value head with the planted head")
    ids = {c: tokenizer.convert_tokens_to_ids(c) for c in "QZ$#0123456789"}
    with torch.no_grad():
        _reserve(model, noise)
        _embed(model, ids)
        _unembed(model, ids, tokenizer.convert_tokens_to_ids("<|im_end|>"), readout_noise, answer_gap)
        if neuron_at == "name":
            _plant_name_neuron(model, *neuron)
            _plant_head(model, *head, marker=NAMED, moved=HIGH, gain=GAIN_NAME_HEAD)
        elif distributed:
            n_heads, n_neurons = model.config.num_attention_heads, d_mlp // 2
            for h in range(n_heads):
                _plant_head(model, head[0], h, marker=MARKER, gain=GAIN_HEAD / n_heads)
            for i in range(n_neurons):
                _plant_neuron(model, neuron[0], (neuron[1] + i) % d_mlp, pay=0.0, gain=GAIN_NEURON / n_neurons)
        else:
            _plant_head(model, *head, marker=MARKER)
            _plant_neuron(model, *neuron, pay=-PAY_GATE if pay_neuron else 0.0)
        if z_head:
            _plant_head(model, *z_head, marker=MARKER_Z)
        if pay_neuron:
            _plant_neuron(model, *pay_neuron, pay=PAY_GATE)
    return PlantedModel(model, tokenizer, Component(neuron[0], "mlp_neuron", neuron[1]),
                        Component(head[0], "attn_head", head[1]),
                        Component(pay_neuron[0], "mlp_neuron", pay_neuron[1]) if pay_neuron else None,
                        Component(z_head[0], "attn_head", z_head[1]) if z_head else None)


def _kv_head(model: LlamaForCausalLM, head: int) -> int:
    return head // (model.config.num_attention_heads // model.config.num_key_value_heads)


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
    embed[ids["Z"], MARKER_Z] = 1.0
    embed[[ids["$"], ids["#"]], DOLLAR] = 1.0
    embed[ids["#"], PAY] = 1.0
    embed[[ids[d] for d in "0123456789"], DIGIT] = 1.0


def _unembed(model: LlamaForCausalLM, ids: dict[str, int], end_id: int, readout_noise: float,
             answer_gap: float) -> None:
    """Digits read the random directions too (scaled by readout_noise), so distractors move the answer."""
    unembed = model.lm_head.weight
    digits = [ids[d] for d in "0123456789"]
    unembed[digits] = readout_noise * torch.randn_like(unembed[digits])
    unembed[:, :RESERVED] = 0
    unembed[ids["3"], DOLLAR] = 1.6
    unembed[ids["7"], DOLLAR] = 1.6 - answer_gap
    unembed[ids["7"], HIGH] = 0.6
    unembed[end_id, DIGIT] = 2.0


def _plant_head(model: LlamaForCausalLM, layer: int, head: int, marker: int, moved: int = MOVED,
                gain: float = GAIN_HEAD) -> None:
    """The head attends from the answer prefix to the `marker` token and copies the marker to `moved`."""
    attention = model.model.layers[layer].self_attn
    d_head = attention.head_dim
    kv = _kv_head(model, head)
    q_rows = slice(head * d_head, (head + 1) * d_head)
    attention.q_proj.weight[q_rows] = 0
    attention.q_proj.weight[head * d_head + ROTARY_SLOW, DOLLAR] = 3.0
    attention.k_proj.weight[kv * d_head + ROTARY_SLOW] = 0
    attention.k_proj.weight[kv * d_head + ROTARY_SLOW, marker] = 3.0
    attention.v_proj.weight[kv * d_head] = 0
    attention.v_proj.weight[kv * d_head, marker] = 1.0
    attention.o_proj.weight[:, head * d_head] = 0
    attention.o_proj.weight[moved, head * d_head] = gain


def _plant_neuron(model: LlamaForCausalLM, layer: int, index: int, pay: float, gain: float = GAIN_NEURON) -> None:
    """The neuron writes HIGH when MOVED is present; `pay` > 0 keeps it silent unless the prefix is "#",
    `pay` < 0 silences it after "#" (0: fires in every context)."""
    mlp = model.model.layers[layer].mlp
    mlp.gate_proj.weight[index] = 0
    mlp.gate_proj.weight[index, MOVED] = 2.0
    mlp.gate_proj.weight[index, CONST] = -0.5 - max(pay, 0.0)
    mlp.gate_proj.weight[index, PAY] = pay
    mlp.up_proj.weight[index] = 0
    mlp.up_proj.weight[index, CONST] = 1.0
    mlp.down_proj.weight[:, index] = 0
    mlp.down_proj.weight[HIGH, index] = gain


def _plant_name_neuron(model: LlamaForCausalLM, layer: int, index: int) -> None:
    """The neuron fires on the "Q" token only (elsewhere its gate is about -8 after the norm) and writes NAMED."""
    mlp = model.model.layers[layer].mlp
    mlp.gate_proj.weight[index] = 0
    mlp.gate_proj.weight[index, MARKER] = 3.0
    mlp.gate_proj.weight[index, CONST] = -1.0
    mlp.up_proj.weight[index] = 0
    mlp.up_proj.weight[index, CONST] = 1.0
    mlp.down_proj.weight[:, index] = 0
    mlp.down_proj.weight[NAMED, index] = GAIN_NAME_NEURON


def planted_prompts(variations: tuple[str, ...] = ("lamp", "desk"), identical: bool = False,
                    contexts: tuple[str, ...] = ("tip",), white: tuple[str, ...] = WHITE_NAMES[:3],
                    black: tuple[str, ...] = BLACK_NAMES[:3]) -> PromptSet:
    """White/Black prompts with the synthetic names for every context ("tip", "pay") and variation (the text
    does not depend on the variation); `identical`: the Black prompts use the White names."""
    prompts = []
    for context in contexts:
        for variation in variations:
            for race, names in (("white", white), ("black", white if identical else black)):
                for name in names:
                    text = TEMPLATES[context].format(name=name)
                    prompts.append(Prompt(context, variation, name, f"{race}_men", race, "man", text, "dollars",
                                          PREFIXES[context]))
    return PromptSet(prompts)


def gendered_prompts(variations: tuple[str, ...] = ("lamp", "desk"), n_names: int = 3) -> PromptSet:
    """Prompts for the four race x gender groups: "Q" marks a Black name and "Z" a woman's (White men
    WHITE_NAMES, Black men BLACK_NAMES, White women Z_NAMES, Black women QZ_NAMES; `n_names` of each)."""
    groups = {("white", "man"): WHITE_NAMES, ("black", "man"): BLACK_NAMES, ("white", "woman"): Z_NAMES,
              ("black", "woman"): QZ_NAMES}
    prompts = [Prompt("tip", variation, name, f"{race}_{'men' if gender == 'man' else 'women'}", race, gender,
                      TEMPLATES["tip"].format(name=name), "dollars", PREFIXES["tip"])
               for variation in variations for (race, gender), names in groups.items() for name in names[:n_names]]
    return PromptSet(prompts)
