"""Attribution patching: a first-order estimate of activation patching for every neuron and head at once.

Per batch of pairs: one forward on the White rows records `blocks.{l}.mlp.hook_post` and
`blocks.{l}.attn.hook_z` (only those hooks); one forward and backward on the Black rows gives the gradient of
the Black rows' expected log answer with respect to the same activations. A neuron's score for a pair is

    sum over patched Black columns t of grad_t * (carried_white_t - act_black_t)

(heads: summed over d_head too), the linear estimate of the metric change when the White activation is
patched into the Black run. The patched columns are those of the Black name and the aligned columns after it up
to the end of the prompt; `carried_white` is the White activation at the same aligned column and, on the name,
the White name span stretched onto the Black one (`PairBatch.carry`, defined in `workbench.localize.pairs`),
exactly what activation patching writes. The answer-leaf columns are not patched. Scores are averaged over
pairs and multiplied by the sign of the mean gap (E_white - E_black), so a positive score means the component
moves the Black answer toward the White one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from workbench.components import KINDS, ModelShape, activation_hook
from workbench.localize.metric import expected_log_answer, forward
from workbench.localize.pairs import SPANS, PairedInputs
from workbench.localize.scores import ComponentScores
from workbench.nnsight_backend import require_values_here


def hook_names(shape: ModelShape) -> list[str]:
    return [activation_hook(layer, kind) for kind in KINDS for layer in range(shape.n_layers)]


def _record(store: dict[str, Tensor], name: str):
    """A hook storing its activation under `name` (the alias asked for, not the bridge's canonical hook name)."""

    def hook(activation: Tensor, hook) -> Tensor:
        store[name] = activation
        return activation

    return hook


def run_recording(bridge, batch, names: list[str]) -> tuple[Float[Tensor, "batch seq vocab"], dict[str, Tensor]]:
    """Logits of a packed batch and the activations at the named hooks (graph kept if grad is enabled)."""
    require_values_here(bridge, "attribution and activation patching")
    store: dict[str, Tensor] = {}
    with bridge.hooks(fwd_hooks=[(name, _record(store, name)) for name in names]):
        logits = forward(bridge, batch)
    return logits, store


def column_effects(
    grad: Float[Tensor, "n seq c *d_head"], delta: Float[Tensor, "n seq c *d_head"]
) -> Float[Tensor, "n seq c"]:
    """grad * delta per column and component (summed over d_head for heads)."""
    product = grad.float() * delta.float()
    return product.sum(-1) if product.ndim == 4 else product


def attribution_by_span(
    bridge, inputs: PairedInputs, progress: bool = True, spans: Sequence[str] = SPANS
) -> dict[str, tuple[ComponentScores, ComponentScores]]:
    """Per patched span ("name": the name's columns, "suffix": the aligned columns after it), the attribution
    scores of every neuron and head from those columns alone (neurons, heads): one pass for all spans, and the
    spans' scores sum to `attribution_scores` over them (the spans' columns are disjoint)."""
    shape = ModelShape.of(bridge)
    names = hook_names(shape)
    totals = {span: {name: 0.0 for name in names} for span in spans}
    for batch in tqdm(inputs.batches, desc="attribution", disable=not progress, leave=False):
        black_rows = batch.black()
        with torch.no_grad():
            _, white = run_recording(bridge, batch.white(), names)
        with torch.enable_grad():
            logits, black = run_recording(bridge, black_rows, names)
            metric = expected_log_answer(logits, black_rows).sum()
            grads = torch.autograd.grad(metric, [black[name] for name in names])
        columns = {span: batch.patched([span])[:, :, None] for span in spans}
        for name, grad in zip(names, grads):
            effects = column_effects(grad, batch.carry(white[name], spans) - black[name].detach())
            for span in spans:
                totals[span][name] = totals[span][name] + (effects * columns[span]).sum((0, 1))
    scale = inputs.orientation / len(inputs.pairs)
    metadata = {"pairs": len(inputs.pairs), "bias_type": inputs.contrast.name,
                "mean_gap": float(inputs.gap.mean()), "orientation": inputs.orientation,
                "units": "expected log answer"}
    return {span: tuple(
        ComponentScores(
            "attribution", kind,
            torch.stack([totals[span][activation_hook(layer, kind)] for layer in range(shape.n_layers)]) * scale,
            {**metadata, "spans": [span]},
        )
        for kind in KINDS
    ) for span in spans}


def span_sum(parts: dict[str, tuple[ComponentScores, ComponentScores]]) -> tuple[ComponentScores, ComponentScores]:
    """The scores over all of `parts`' spans (neurons, heads): the sum of `attribution_by_span`'s parts."""
    spans = list(parts)
    summed = []
    for index, kind in enumerate(KINDS):
        scores = torch.stack([parts[span][index].scores for span in spans]).sum(0)
        summed.append(ComponentScores("attribution", kind, scores, {**parts[spans[0]][index].metadata, "spans": spans}))
    return tuple(summed)


def attribution_scores(
    bridge, inputs: PairedInputs, progress: bool = True, spans: Sequence[str] = SPANS
) -> tuple[ComponentScores, ComponentScores]:
    """Attribution-patching scores of every MLP neuron and every attention head (neurons, heads) over `spans`,
    the parts of the Black row patched ("name" and/or "suffix", see `workbench.localize.pairs`)."""
    return span_sum(attribution_by_span(bridge, inputs, progress, spans))
