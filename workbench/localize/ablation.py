"""Ablation: how much of the White-Black gap disappears when one component is removed from both prompts.

A component is zero-ablated (activation set to 0) or mean-ablated (set to its mean over every position of the
pair prompts) at every column of both rows of each pair, and the gap E_white - E_black is measured again.
Score = (baseline gap - ablated gap), averaged over pairs and multiplied by the sign of the mean gap, so a
positive score means the component carries the bias (removing it shrinks the gap), as for the other methods.
Components are batched like activation patching: each pair's two rows are replicated R times, replica r
ablates component r.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from workbench.components import Component, mean_activations
from workbench.localize.metric import expected_log_answer, forward
from workbench.localize.pairs import PairBatch, PairedInputs
from workbench.localize.patching import block_inputs, chunk_start, component_sweep, replica_hooks
from workbench.localize.scores import ComponentScores


def pair_means(bridge, inputs: PairedInputs, names: list[str]) -> dict[str, Tensor]:
    """Mean activation of each hook over every prompt token of every pair (White and Black)."""
    batches = []
    for batch in inputs.batches:
        end = batch.rows.prompt_end
        batches.append((batch.rows.input_ids[:, :end], batch.rows.attention_mask[:, 0, end - 1, :end].long()))
    return mean_activations(bridge, batches, names)


def ablation_scores(
    bridge, inputs: PairedInputs, components: list[Component], mode: Literal["zero", "mean"] = "zero",
    max_rows: int = 64, progress: bool = True,
) -> ComponentScores:
    """Gap removed by ablating each given component (one kind) in both prompts of every pair; others NaN."""
    means = pair_means(bridge, inputs, sorted({c.hook_name for c in components})) if mode == "mean" else None

    def effects(batch: PairBatch) -> Callable[[list[Component]], Float[Tensor, "chunk n"]]:
        width = batch.rows.input_ids.shape[1]
        starts = block_inputs(bridge, batch.both())

        def ablate(name: str, index: Tensor, within: Tensor) -> tuple[Tensor, Tensor]:
            where = torch.ones((len(within), width), dtype=torch.bool, device=index.device)
            return _replacement(name, index, means), where

        def effect(chunk: list[Component]) -> Float[Tensor, "chunk n"]:
            rows = batch.both(len(chunk))
            with bridge.hooks(fwd_hooks=replica_hooks(chunk, 2 * batch.n, rows.input_ids.device, ablate)):
                values = expected_log_answer(forward(bridge, rows, chunk_start(starts, chunk)), rows).float().cpu()
            values = values.reshape(len(chunk), 2, batch.n)
            return inputs.gap[batch.pair_ids] - (values[:, 0] - values[:, 1])

        return effect

    kind, scores = component_sweep(bridge, inputs, components, 2, effects, f"{mode} ablation", max_rows, progress)
    metadata = {"pairs": len(inputs.pairs), "bias_type": inputs.contrast.name,
                "mean_gap": float(inputs.gap.mean()), "mode": mode,
                "scored": len(components), "units": "expected log answer"}
    return ComponentScores(f"{mode}_ablation", kind, scores, metadata)


def _replacement(name: str, index: Tensor, means: dict[str, Tensor] | None) -> Float[Tensor, "..."]:
    """0, or each row's component mean broadcastable over columns ([m, 1] or [m, 1, d_head])."""
    if means is None:
        return torch.zeros((), device=index.device)
    return means[name].to(index.device)[index].unsqueeze(1)
