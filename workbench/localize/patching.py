"""Activation patching: the exact effect of giving one component its White activation in the Black run.

For each chosen component (all heads, or the top neurons of attribution patching) and each pair, the
component's activation in the Black row is replaced by the White row's at the aligned columns (after the name
up to the end of the prompt) and on the name, where the Black name span gets the White name span stretched onto
its length (`PairBatch.carry`: the same definition attribution patching differentiates, see
`workbench.localize.pairs`), and the change of the Black row's expected log answer is measured. Components are
batched: the Black rows are replicated R times and replica r patches component r, all in one forward (the hook
indexes by batch row). Scores are averaged over pairs and multiplied by the sign of the mean gap
(E_white - E_black): positive = moves Black toward White. Unscored components are NaN.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from workbench.components import Component, ModelShape
from workbench.localize.attribution import run_recording
from workbench.localize.metric import BlockStart, LeafBatch, expected_log_answer, forward
from workbench.localize.pairs import SPANS, PairBatch, PairedInputs
from workbench.localize.scores import ComponentScores, agreement


def replace_rows_hook(
    rows: Int[Tensor, " m"], index: Int[Tensor, " m"], replacement: Float[Tensor, "..."],
    where: Bool[Tensor, "m seq"],
) -> Callable:
    """A hook setting component index[k] of batch row rows[k] to replacement[k] at the columns where[k].

    `replacement` broadcasts against [m, seq] (neurons) or [m, seq, d_head] (heads).
    """

    def hook(activation: Tensor, hook) -> Tensor:
        current = activation[rows, :, index]
        mask = where[..., None] if current.ndim == 3 else where
        activation = activation.clone()
        activation[rows, :, index] = torch.where(mask, replacement.to(activation.dtype), current)
        return activation

    return hook


def component_chunks(components: list[Component], rows_per_component: int, max_rows: int) -> list[list[Component]]:
    """Consecutive groups of components, as many per forward as fit in `max_rows` rows."""
    size = max(1, max_rows // rows_per_component)
    return [components[i : i + size] for i in range(0, len(components), size)]


def block_inputs(bridge, batch: LeafBatch) -> Float[Tensor, "layers batch seq d_model"]:
    """The residual stream entering every block for the packed rows (no gradient; hooks active apply)."""
    names = [f"blocks.{k}.hook_resid_pre" for k in range(bridge.cfg.n_layers)]
    with torch.no_grad():
        recorded = run_recording(bridge, batch, names)[1]
    return torch.stack([recorded[name] for name in names])


def chunk_start(starts: Float[Tensor, "layers rows seq d_model"], chunk: list[Component]) -> BlockStart:
    """Where the forward of a chunk's replicas resumes: the first block any of its components sits in, from
    the rows' recorded residual (`block_inputs`) repeated once per component."""
    layer = min(c.layer for c in chunk)
    return layer, starts[layer].repeat(len(chunk), 1, 1)


def one_kind(components: list[Component]) -> str:
    kinds = {c.kind for c in components}
    if len(kinds) != 1:
        raise ValueError(f"score one kind of component at a time, got {sorted(kinds)}")
    return kinds.pop()


def replica_hooks(
    chunk: list[Component], rows_per_replica: int, device,
    fill: Callable[[str, Int[Tensor, " m"], Int[Tensor, " m"]], tuple[Tensor, Bool[Tensor, "m seq"]]],
) -> list:
    """Hooks by which replica r (rows r*rows_per_replica ...) replaces chunk[r]'s activation.

    `fill(hook_name, index, within)` gives, for the rows of one hook's components (component `index`, row
    `within` of its replica), the replacement and the columns it applies at (see `replace_rows_hook`).
    """
    groups: dict[str, list[tuple[int, int]]] = {}
    for replica, component in enumerate(chunk):
        groups.setdefault(component.hook_name, []).append((replica, component.index))
    hooks = []
    for name, items in groups.items():
        replica = torch.tensor([r for r, _ in items], device=device).repeat_interleave(rows_per_replica)
        index = torch.tensor([i for _, i in items], device=device).repeat_interleave(rows_per_replica)
        within = torch.arange(rows_per_replica, device=device).repeat(len(items))
        replacement, where = fill(name, index, within)
        hooks.append((name, replace_rows_hook(replica * rows_per_replica + within, index, replacement, where)))
    return hooks


def component_sweep(
    bridge, inputs: PairedInputs, components: list[Component], rows_per_pair: int,
    effects: Callable[[PairBatch], Callable[[list[Component]], Float[Tensor, "chunk n"]]], desc: str,
    max_rows: int = 64, progress: bool = True,
) -> tuple[str, Float[Tensor, "layers count"]]:
    """The engine of activation patching and ablation: each component's effect, summed over pairs.

    For each batch of pairs, `effects(batch)` gives a function measuring a chunk of components at once (replica r
    intervenes on chunk[r], `rows_per_pair` rows per pair); the sums are oriented by the sign of the mean gap and
    averaged over pairs. Components are swept in layer order, so that a chunk's forward can resume at its first
    layer (`chunk_start`). Returns the kind and a [layers, count] score matrix, NaN where not scored.
    """
    kind = one_kind(components)
    components = sorted(components)
    shape = ModelShape.of(bridge)
    totals = torch.zeros(len(components))
    position = {c: k for k, c in enumerate(components)}
    n_steps = sum(len(component_chunks(components, rows_per_pair * b.n, max_rows)) for b in inputs.batches)
    with tqdm(total=n_steps, desc=desc, disable=not progress, leave=False) as bar, torch.no_grad():
        for batch in inputs.batches:
            effect = effects(batch)
            for chunk in component_chunks(components, rows_per_pair * batch.n, max_rows):
                totals[[position[c] for c in chunk]] += effect(chunk).sum(1)
                bar.update(1)
    scores = torch.full((shape.n_layers, shape.count(kind)), torch.nan)
    for component, total in zip(components, totals):
        scores[component.layer, component.index] = total * inputs.orientation / len(inputs.pairs)
    return kind, scores


def patching_scores(
    bridge, inputs: PairedInputs, components: list[Component], max_rows: int = 64, progress: bool = True,
    spans: Sequence[str] = SPANS,
) -> ComponentScores:
    """Activation-patching score of each given component (one kind); all others NaN.

    `spans`: the parts of the Black row patched, "name" and/or "suffix" (see `workbench.localize.pairs`).
    """
    names = sorted({c.hook_name for c in components})

    def effects(batch: PairBatch) -> Callable[[list[Component]], Float[Tensor, "chunk n"]]:
        white = run_recording(bridge, batch.white(), names)[1]
        carried = {name: batch.carry(value, spans) for name, value in white.items()}
        where = batch.patched(spans)
        starts = block_inputs(bridge, batch.black())

        def carry(name: str, index: Tensor, source: Tensor) -> tuple[Tensor, Tensor]:
            return carried[name][source, :, index], where[source]

        def effect(chunk: list[Component]) -> Float[Tensor, "chunk n"]:
            rows = batch.black(len(chunk))
            with bridge.hooks(fwd_hooks=replica_hooks(chunk, batch.n, where.device, carry)):
                patched = expected_log_answer(forward(bridge, rows, chunk_start(starts, chunk)), rows).float().cpu()
            return patched.reshape(len(chunk), batch.n) - inputs.black_metric[batch.pair_ids]

        return effect

    kind, scores = component_sweep(bridge, inputs, components, 1, effects, "activation patching", max_rows,
                                   progress)
    metadata = {"pairs": len(inputs.pairs), "bias_type": inputs.contrast.name,
                "mean_gap": float(inputs.gap.mean()), "orientation": inputs.orientation, "scored": len(components),
                "spans": list(spans), "units": "expected log answer"}
    return ComponentScores("activation_patching", kind, scores, metadata)


def patch_top(
    bridge, inputs: PairedInputs, attribution: ComponentScores, n: int, max_rows: int = 64, progress: bool = True,
    spans: Sequence[str] = SPANS,
) -> tuple[ComponentScores, dict]:
    """Activation-patch the top-n components of an attribution run (by |score|); the scores and agreement."""
    patched = patching_scores(bridge, inputs, attribution.top(n, absolute=True), max_rows, progress, spans)
    return patched, agreement(patched, attribution, top=n)
