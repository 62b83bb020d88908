"""The paper's weight-level (Wanda-style) scores and the Black-minus-White weight selection.

For each linear matrix W [d_out, d_in] of every layer (q, k, v, o, gate, up and down projections, found by
module name), and each group g of prompts: S_g[i, j] = |W[i, j]| * norm_g[j] with
norm_g[j] = sqrt(sum over prompts and tokens of x_j^2 / n_prompts), x the matrix's input on prompt + the
model's greedy answer. The inputs are read by forward hooks on the nn.Linear modules during one ordinary
forward pass, so every layer sees its real input (the authors' code fed every layer the embeddings, a bug not
copied here). Per matrix the selection is the top tau_B fraction of S_Black minus the top tau_W fraction of
S_White (set difference); those weights are zeroed.

Norms (vectors) are collected for all layers in one pass; score matrices are built one matrix at a time.
A selection maps each matrix name (the module path without TransformerBridge's `._original_component`) to
int64 flat indices into its weight. Files: `<stem>.safetensors` (int32 flat indices per matrix name) and
`<stem>.json` (metadata, matrix shapes and counts).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from safetensors.torch import load_file, save
from torch import Tensor, nn
from tqdm.auto import tqdm

from workbench.batching import chunks, left_pad, model_device, pad_id
from workbench.files import atomic_write
from workbench.loaded import model_info
from workbench.localize.heads import greedy_answers
from workbench.nnsight_backend import require_values_here
from workbench.readout.prompts import Prompt, render_all

SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WRAPPER = "._original_component"


def hf_model(model) -> nn.Module:
    """The HF model behind a TransformerBridge (or the model itself)."""
    return getattr(model, "original_model", model)


def linear_modules(model) -> dict[str, nn.Linear]:
    """The projection matrices of every layer, by module path without the bridge's wrapper segments."""
    found = {}
    for name, module in hf_model(model).named_modules():
        clean = name.replace(WRAPPER, "")
        if isinstance(module, nn.Linear) and clean.rsplit(".", 1)[-1] in SUFFIXES:
            found[clean] = module
    return found


def _square_sum_hook(sums: dict[str, Tensor], name: str, mask_holder: list[Tensor]):
    """A forward hook adding the squared input of a linear layer over the real (unpadded) positions."""

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        x = inputs[0].float()
        real = mask_holder[0].to(x)[..., None]
        sums[name] = sums.get(name, 0) + (x.square() * real).sum(dim=(0, 1))

    return hook


@torch.inference_mode()
def input_square_sums(bridge, sequences: Sequence[Sequence[int]], batch_size: int = 8,
                      progress: bool = True) -> dict[str, Float[Tensor, " d_in"]]:
    """Sum over sequences and tokens of each projection's squared input, from ordinary forward passes."""
    require_values_here(bridge, "Wanda's input norms")
    sums: dict[str, Tensor] = {}
    mask_holder: list[Tensor] = []
    modules = linear_modules(bridge)
    handles = [m.register_forward_hook(_square_sum_hook(sums, n, mask_holder)) for n, m in modules.items()]
    try:
        for part in tqdm(list(chunks(len(sequences), batch_size)), desc="wanda norms", disable=not progress,
                         leave=False):
            ids, mask = left_pad(sequences[part], pad_id(model_info(bridge).tokenizer), model_device(bridge))
            mask_holder[:] = [mask]
            bridge(ids, attention_mask=mask)
    finally:
        for handle in handles:
            handle.remove()
    return sums


def wanda_input_norms(bridge, prompts_by_group: Mapping[str, Sequence[Prompt]],
                      answers: Mapping[str, Sequence[Sequence[int]]] | None = None,
                      system_prompt: str | None = None, max_new_tokens: int = 10, batch_size: int = 8,
                      progress: bool = True) -> dict[str, dict[str, Float[Tensor, " d_in"]]]:
    """Per group and matrix: sqrt(sum over prompts and tokens of x_j^2 / n_prompts), on prompt + answer.

    `answers[group]` gives the answer token ids per prompt; otherwise the model's greedy answers are used.
    """
    norms = {}
    for group, prompts in prompts_by_group.items():
        rendered = render_all(list(prompts), model_info(bridge).tokenizer, system_prompt)
        group_answers = answers[group] if answers is not None else greedy_answers(
            bridge, rendered, max_new_tokens, progress=progress)
        sequences = [list(r.input_ids) + list(a) for r, a in zip(rendered, group_answers)]
        sums = input_square_sums(bridge, sequences, batch_size, progress)
        norms[group] = {name: (total / len(sequences)).sqrt().cpu() for name, total in sums.items()}
    return norms


def top_fraction(scores: Float[Tensor, "d_out d_in"], tau: float) -> Bool[Tensor, "d_out d_in"]:
    """The round(tau * size) highest scores of a matrix."""
    flat = scores.flatten()
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[torch.topk(flat, round(tau * flat.numel()), sorted=False).indices] = True
    return mask.view_as(scores)


@torch.inference_mode()
def matrix_selection(weight: Float[Tensor, "d_out d_in"], norm_black: Float[Tensor, " d_in"],
                     norm_white: Float[Tensor, " d_in"], tau_black: float, tau_white: float) -> Int[Tensor, " n"]:
    """Flat indices of the top tau_B of |W| * norm_black that are not in the top tau_W of |W| * norm_white."""
    magnitude = weight.detach().float().abs()
    black = top_fraction(magnitude * norm_black.to(magnitude)[None, :], tau_black)
    black &= ~top_fraction(magnitude * norm_white.to(magnitude)[None, :], tau_white)
    return torch.nonzero(black.flatten()).flatten().cpu()


def wanda_selection(model, norms_black: Mapping[str, Tensor], norms_white: Mapping[str, Tensor],
                    tau_black: float = 0.15, tau_white: float = 0.15,
                    progress: bool = False) -> dict[str, Int[Tensor, " n"]]:
    """The selected weights of every matrix (int64 flat indices), one matrix scored at a time."""
    modules = linear_modules(model)
    return {
        name: matrix_selection(modules[name].weight, norms_black[name], norms_white[name], tau_black, tau_white)
        for name in tqdm(list(modules), desc="wanda selection", disable=not progress, leave=False)
    }


def save_selection(selection: Mapping[str, Tensor], path_stem: str | Path, model=None,
                   metadata: dict | None = None) -> None:
    """Write `<stem>.safetensors` (int32 flat indices) and `<stem>.json` (metadata, counts, shapes)."""
    stem = Path(path_stem)
    if any(int(i.max()) >= 2**31 for i in selection.values() if i.numel()):
        raise ValueError("a flat index does not fit in int32")
    atomic_write(stem.with_suffix(".safetensors"),
                 save({name: i.to(torch.int32).contiguous() for name, i in selection.items()}))
    info = {"metadata": metadata or {}, "counts": {name: int(i.numel()) for name, i in selection.items()}}
    if model is not None:
        info["shapes"] = {name: list(m.weight.shape) for name, m in linear_modules(model).items()}
    atomic_write(stem.with_suffix(".json"), json.dumps(info, indent=2))


def load_selection(path_stem: str | Path) -> tuple[dict[str, Int[Tensor, " n"]], dict]:
    """The selection (int64 flat indices) and the JSON information written by `save_selection`."""
    stem = Path(path_stem)
    indices = load_file(str(stem.with_suffix(".safetensors")))
    info = json.loads(stem.with_suffix(".json").read_text())
    return {name: i.to(torch.int64) for name, i in indices.items()}, info


def selection_overlap(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    """Jaccard index of two selections over (matrix, flat index) pairs."""
    shared = union = 0
    for name in set(a) | set(b):
        left = a[name].numpy() if name in a else np.empty(0, dtype=np.int64)
        right = b[name].numpy() if name in b else np.empty(0, dtype=np.int64)
        common = len(np.intersect1d(left, right, assume_unique=True))
        shared += common
        union += len(left) + len(right) - common
    return shared / union if union else 1.0
