"""Ablation: how much of the White-Black gap disappears when one component is removed from both prompts.

A component is zero-ablated (activation set to 0) or mean-ablated (set to its mean over every position of the
pair prompts) at every column of both rows of each pair, and the gap E_white - E_black is measured again.
Score = (baseline gap - ablated gap), averaged over pairs and multiplied by the sign of the mean gap, so a
positive score means the component carries the bias (removing it shrinks the gap), as for the other methods.
Components are batched like activation patching: each pair's two rows are replicated R times, replica r
ablates component r.
"""

from __future__ import annotations

from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from workbench.components import Component, ModelShape, mean_activations
from workbench.localize.pairs import PairedInputs
from workbench.localize.patching import component_chunks, one_kind, replace_rows_hook
from workbench.localize.scores import ComponentScores
from workbench.metric import expected_log_answer, forward


def pair_means(bridge, inputs: PairedInputs, names: list[str]) -> dict[str, Tensor]:
    """Mean activation of each hook over every prompt token of every pair (White and Black)."""
    batches = []
    for batch in inputs.batches:
        end = batch.rows.prompt_end
        batches.append((batch.rows.input_ids[:, :end], batch.rows.attention_mask[:, 0, end - 1, :end].long()))
    return mean_activations(bridge, batches, names)


def _ablation_hooks(chunk: list[Component], rows_per_replica: int, width: int,
                    means: dict[str, Tensor] | None, device) -> list:
    """Replica r (rows r*rows_per_replica ...) gets chunk[r] replaced by 0 or its mean at every column."""
    groups: dict[str, list[tuple[int, int]]] = {}
    for replica, component in enumerate(chunk):
        groups.setdefault(component.hook_name, []).append((replica, component.index))
    hooks = []
    for name, items in groups.items():
        replica = torch.tensor([r for r, _ in items], device=device).repeat_interleave(rows_per_replica)
        index = torch.tensor([i for _, i in items], device=device).repeat_interleave(rows_per_replica)
        rows = replica * rows_per_replica + torch.arange(rows_per_replica, device=device).repeat(len(items))
        value = _replacement(name, index, means)
        where = torch.ones((len(rows), width), dtype=torch.bool, device=device)
        hooks.append((name, replace_rows_hook(rows, index, value, where)))
    return hooks


def _replacement(name: str, index: Tensor, means: dict[str, Tensor] | None) -> Float[Tensor, "..."]:
    """0, or each row's component mean broadcastable over columns ([m, 1] or [m, 1, d_head])."""
    if means is None:
        return torch.zeros((), device=index.device)
    return means[name].to(index.device)[index].unsqueeze(1)


def ablation_scores(
    bridge, inputs: PairedInputs, components: list[Component], mode: Literal["zero", "mean"] = "zero",
    max_rows: int = 64, progress: bool = True,
) -> ComponentScores:
    """Gap removed by ablating each given component (one kind) in both prompts of every pair; others NaN."""
    kind = one_kind(components)
    shape = ModelShape.of(bridge)
    names = sorted({c.hook_name for c in components})
    means = pair_means(bridge, inputs, names) if mode == "mean" else None
    totals = torch.zeros(len(components))
    position = {c: k for k, c in enumerate(components)}
    n_steps = sum(len(component_chunks(components, 2 * b.n, max_rows)) for b in inputs.batches)
    with tqdm(total=n_steps, desc=f"{mode} ablation", disable=not progress, leave=False) as bar, torch.no_grad():
        for batch in inputs.batches:
            width = batch.rows.input_ids.shape[1]
            for chunk in component_chunks(components, 2 * batch.n, max_rows):
                rows = batch.both(len(chunk))
                hooks = _ablation_hooks(chunk, 2 * batch.n, width, means, rows.input_ids.device)
                with bridge.hooks(fwd_hooks=hooks):
                    values = expected_log_answer(forward(bridge, rows), rows).float().cpu()
                values = values.reshape(len(chunk), 2, batch.n)
                ablated_gap = values[:, 0] - values[:, 1]
                totals[[position[c] for c in chunk]] += (inputs.gap[batch.pair_ids] - ablated_gap).sum(1)
                bar.update(1)
    scores = torch.full((shape.n_layers, shape.count(kind)), torch.nan)
    for component, total in zip(components, totals):
        scores[component.layer, component.index] = total * inputs.orientation / len(inputs.pairs)
    metadata = {"pairs": len(inputs.pairs), "bias_type": inputs.contrast.name,
                "mean_gap": float(inputs.gap.mean()), "mode": mode,
                "scored": len(components), "units": "expected log answer"}
    return ComponentScores(f"{mode}_ablation", kind, scores, metadata)
