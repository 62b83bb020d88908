"""Spike-in positive controls: a race bias of known size planted through named components of a real model.

A plant is a weight edit, undone exactly afterwards (`Plant.planted`). From pairs of *feature names* (names of the
bundled list that the study does not use, `feature_prompts`) it estimates, at the prompt's last column, what a
component reads and where it writes:
- `write`: the unit direction of the residual stream at the component's output (after the MLP for a neuron,
  after attention for a head) along which the expected log answer rises fastest: the mean gradient of the
  leaf metric (`workbench.localize.metric`) over the feature pairs' rows;
- a neuron (layer l, index i) is rewritten into a race detector on its MLP input x (after the norm): gate row
  2 x_mean / |x_mean|^2 (silu(gate . x) is about silu(2) on the prompts), up row r / |r|^2 with r the mean
  White-minus-Black x, taken orthogonal to x_mean (so up . x is about 0 on average and rises by 1 from a Black to
  a White name), down column = scale / n * write (n: the plant's number of components). It keeps none of its old
  function (one neuron of a layer: a small change on neutral text, measured as `kl`);
- a head (layer l, query head h) keeps its weights and its W_O gains the rank-1 term scale / n * write u^T, u the
  mean White-minus-Black head output z (before W_O) orthogonal to the mean z, over its squared norm: the head
  writes the answer direction in proportion to the race signal it already carries (pick one that attends to the
  name: `workbench.localize.heads`);
- a distributed plant is the neuron plant over many neurons (e.g. 64 of one layer), each with 1/n of the scale:
  top-k pruning at a small budget can remove at most k/n of it.
The plant raises the answers of the side that the model already favours on the feature names (`direction`: +1 White,
-1 Black; White where there is no bias), so it adds to the bias the pipeline sees. The scale is calibrated (`calibrated_plant`) so that the
planted bias - the signed SMD of the leaf metric's answer distributions, spiked minus unspiked, at the unspiked
model's pooled SD (`stats.signed_reduction` of the spiked answers against the unspiked, in the plant's direction) -
on the feature names reaches the target. The leaves are the unspiked model's (`pairs.build_pairs`), held fixed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from workbench.audit.stats import bias_directions, random_comparison, signed_reduction
from workbench.components import Component, ModelShape, ablation_hooks
from workbench.errors import ConfigError
from workbench.loaded import model_info
from workbench.localize.attribution import run_recording
from workbench.localize.metric import expected_log_answer, forward, leaf_weights
from workbench.localize.pairs import PairedInputs
from workbench.localize.scores import ComponentScores
from workbench.prune.anomaly import kl_on_neutral
from workbench.prune.plan import _backup, _layer_module, _unwrap, restore_weights

PlantKind = Literal["neuron", "head", "distributed"]
PLANT_KINDS: tuple[PlantKind, ...] = get_args(PlantKind)
CALIBRATION_BOOT = 200  # the scale search's intervals; the achieved SMD gets the full bootstrap
LABEL = re.compile(r"^L(\d+)([NH])(\d+)(?:-(\d+))?$")


def parse_components(text: str) -> list[Component]:
    """Components written as in the reports, comma-separated: `L9H3`, `L12N400`, or a range `L12N0-63`."""
    components = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        match = LABEL.match(part)
        if not match:
            raise ConfigError(f"cannot read component {part!r}: write L<layer>H<head>, L<layer>N<neuron> or "
                              "L<layer>N<first>-<last>")
        layer, letter, first, last = match.groups()
        kind = "attn_head" if letter == "H" else "mlp_neuron"
        last = first if last is None else last
        if int(last) < int(first):
            raise ConfigError(f"component range {part!r} ends before it starts")
        components += [Component(int(layer), kind, i) for i in range(int(first), int(last) + 1)]
    if not components:
        raise ConfigError("no component to plant")
    return components


@dataclass(frozen=True)
class PlantSpec:
    """What to plant: the components (one kind), the target SMD and the plant's kind."""

    components: tuple[Component, ...]
    target_smd: float
    kind: PlantKind

    def __post_init__(self) -> None:
        kinds = {c.kind for c in self.components}
        expected = {"head": "attn_head", "neuron": "mlp_neuron", "distributed": "mlp_neuron"}[self.kind]
        if kinds != {expected}:
            words = "attention heads" if expected == "attn_head" else "MLP neurons"
            raise ConfigError(f"a {self.kind} plant needs {words} only, got "
                              f"{', '.join(c.label() for c in self.components)}")
        if self.kind == "distributed" and len(self.components) < 2:
            raise ConfigError("a distributed plant spreads over at least 2 neurons")
        if not self.target_smd > 0:
            raise ConfigError(f"target_smd must be positive, got {self.target_smd}")

    @classmethod
    def parse(cls, text: str, target_smd: float, kind: PlantKind | None = None) -> "PlantSpec":
        """From the command line's components; the kind is "head" for heads, "neuron" for one neuron and
        "distributed" for several, unless given."""
        components = tuple(parse_components(text))
        if kind is None:
            kind = ("head" if components[0].kind == "attn_head" else
                    "neuron" if len(components) == 1 else "distributed")
        if kind not in PLANT_KINDS:
            raise ConfigError(f"plant kind must be one of {PLANT_KINDS}, got {kind!r}")
        return cls(components, target_smd, kind)

    def labels(self) -> str:
        """The components as one short text (a range for a distributed plant's consecutive neurons)."""
        c = self.components
        if self.kind == "distributed" and [x.index for x in c] == list(range(c[0].index, c[-1].index + 1)) \
                and len({x.layer for x in c}) == 1:
            return f"L{c[0].layer}N{c[0].index}-{c[-1].index}"
        return ",".join(x.label() for x in c)


@dataclass
class PlantDirections:
    """Per component what it reads (neuron: up row, d_model; head: u, d_head) and, neurons only, its gate row;
    per component the unit write direction (d_model)."""

    reads: dict[Component, Float[Tensor, " d"]]
    gates: dict[Component, Float[Tensor, " d_model"]]
    writes: dict[Component, Float[Tensor, " d_model"]]


def _read_hook(component: Component) -> str:
    return f"blocks.{component.layer}.mlp.hook_in" if component.kind == "mlp_neuron" else component.hook_name


def _write_hook(component: Component) -> str:
    point = "hook_resid_post" if component.kind == "mlp_neuron" else "hook_resid_mid"
    return f"blocks.{component.layer}.{point}"


def _orthogonal(vector: Float[Tensor, " d"], to: Float[Tensor, " d"]) -> Float[Tensor, " d"]:
    return vector - (vector @ to) / (to @ to) * to


def estimate_directions(bridge, inputs: PairedInputs, components: list[Component]) -> PlantDirections:
    """What each component reads and where it writes (see the module), from the pairs' last prompt column."""
    read_names = sorted({_read_hook(c) for c in components})
    write_names = sorted({_write_hook(c) for c in components})
    sums: dict[str, dict[str, Tensor]] = {"white": {}, "black": {}, "grad": {}}
    rows = 0
    for batch in inputs.batches:
        both = batch.both()
        last = both.prompt_end - 1
        with torch.enable_grad():
            logits, store = run_recording(bridge, both, read_names + write_names)
            metric = expected_log_answer(logits, both).nansum()
            grads = torch.autograd.grad(metric, [store[name] for name in write_names])
        for name in read_names:
            values = store[name][:, last].detach().float()
            sums["white"][name] = sums["white"].get(name, 0) + values[: batch.n].sum(0)
            sums["black"][name] = sums["black"].get(name, 0) + values[batch.n :].sum(0)
        for name, grad in zip(write_names, grads):
            sums["grad"][name] = sums["grad"].get(name, 0) + grad[:, last].float().sum(0)
        rows += batch.n
    reads, gates, writes = {}, {}, {}
    for c in components:
        white, black = sums["white"][_read_hook(c)] / rows, sums["black"][_read_hook(c)] / rows
        if c.kind == "attn_head":
            white, black = white[c.index], black[c.index]
        mean = (white + black) / 2
        race = _orthogonal(white - black, mean)
        reads[c] = (race / (race @ race)).cpu()
        if c.kind == "mlp_neuron":
            gates[c] = (2 * mean / (mean @ mean)).cpu()
        write = sums["grad"][_write_hook(c)]
        writes[c] = (write / write.norm()).cpu()
    return PlantDirections(reads, gates, writes)


@dataclass
class Plant:
    """A spec with its directions and scale; `planted(bridge)` applies it for a `with` block."""

    spec: PlantSpec
    directions: PlantDirections
    scale: float
    direction: float = 1.0  # +1: White answers raised, -1: Black answers raised
    achieved_smd: float = float("nan")
    achieved_low: float = float("nan")
    achieved_high: float = float("nan")
    kl: float = float("nan")
    steps: list[tuple[float, float]] = field(default_factory=list)  # (scale, planted SMD) tried by calibration

    def apply(self, bridge, scale: float | None = None) -> dict[str, Tensor]:
        """Write the plant into the weights; the originals it replaced (for `restore_weights`)."""
        hf = _unwrap(bridge)
        scale = self.scale if scale is None else scale
        share = self.direction * scale / len(self.spec.components)
        originals: dict[str, Tensor] = {}
        with torch.no_grad():
            for c in self.spec.components:
                read, write = self.directions.reads[c], self.directions.writes[c]
                if c.kind == "mlp_neuron":
                    for path, row in (("mlp.gate_proj", self.directions.gates[c]), ("mlp.up_proj", read)):
                        name, module = _layer_module(hf, c.layer, path)
                        _backup(originals, hf, f"{name}.weight")
                        module.weight[c.index] = row.to(module.weight)
                    name, module = _layer_module(hf, c.layer, "mlp.down_proj")
                    _backup(originals, hf, f"{name}.weight")
                    module.weight[:, c.index] = (share * write).to(module.weight)
                else:
                    name, module = _layer_module(hf, c.layer, "self_attn.o_proj")
                    _backup(originals, hf, f"{name}.weight")
                    d = read.shape[0]
                    block = module.weight[:, c.index * d : (c.index + 1) * d]
                    block += (share * torch.outer(write, read)).to(block)
        return originals

    @contextmanager
    def planted(self, bridge, scale: float | None = None) -> Iterator[None]:
        """The plant in force for the block (and named in `model_info(bridge).edits`); undone exactly after."""
        edits = model_info(bridge).edits
        edit = {"spike_in": self.spec.labels(), "kind": self.spec.kind,
                "scale": float(self.scale if scale is None else scale), "direction": self.direction}
        originals = self.apply(bridge, scale)
        edits.append(edit)
        try:
            yield
        finally:
            edits.remove(edit)
            restore_weights(bridge, originals)

    def save(self, path) -> None:
        """The directions (tensors) with the scale and calibration (metadata) as one safetensors file."""
        d = self.directions
        tensors = {f"{part}/{c.label()}": v.contiguous() for part, values in
                   (("reads", d.reads), ("gates", d.gates), ("writes", d.writes)) for c, v in values.items()}
        scalars = {"scale": self.scale, "direction": self.direction, "kl": self.kl, "steps": self.steps,
                   "achieved": [self.achieved_smd, self.achieved_low, self.achieved_high]}
        save_file(tensors, str(path), metadata={"plant": json.dumps(scalars)})

    @classmethod
    def load(cls, path, spec: PlantSpec) -> "Plant":
        """A plant saved by `save` for this spec."""
        by_label = {c.label(): c for c in spec.components}
        parts: dict[str, dict] = {"reads": {}, "gates": {}, "writes": {}}
        with safe_open(str(path), "pt") as saved:
            scalars = json.loads(saved.metadata()["plant"])
            for key in saved.keys():
                part, label = key.split("/")
                parts[part][by_label[label]] = saved.get_tensor(key)
        return cls(spec, PlantDirections(parts["reads"], parts["gates"], parts["writes"]), scalars["scale"],
                   scalars["direction"], *scalars["achieved"], scalars["kl"], [tuple(x) for x in scalars["steps"]])

    def record(self) -> dict:
        """The plant as the run's manifest keeps it."""
        return {"kind": self.spec.kind, "direction": "White higher" if self.direction > 0 else "Black higher",
                "components": self.spec.labels(), "n_components": len(self.spec.components),
                "target_smd": self.spec.target_smd, "scale": self.scale, "achieved_smd": self.achieved_smd,
                "achieved_ci": [self.achieved_low, self.achieved_high], "kl_on_neutral": self.kl,
                "calibration_steps": [list(step) for step in self.steps],
                "estimand": "signed SMD of the leaf metric's answer distributions (log scale, mixture SMD), spiked "
                            "minus unspiked, at the unspiked pooled SD, in the plant's direction; on the feature names"}


def leaf_answers(bridge, inputs: PairedInputs, hooks: list | None = None) -> pd.DataFrame:
    """Every prompt of the pairs with its leaf distribution (values on the signed-log scale, probabilities
    renormalised over the leaves): the answer table `workbench.audit.stats` reads (scale "raw")."""
    records = []
    with torch.no_grad(), bridge.hooks(fwd_hooks=hooks or []):
        for batch in inputs.batches:
            rows = batch.both()
            weights = leaf_weights(forward(bridge, rows), rows).float().cpu().numpy()
            leaf_row, values = rows.leaf_row.cpu().numpy(), rows.leaf_value.cpu().numpy()
            prompts = [inputs.pairs[i][0] for i in batch.pair_ids] + [inputs.pairs[i][1] for i in batch.pair_ids]
            for row, prompt in enumerate(prompts):
                mine = leaf_row == row
                records.append({"context": prompt.context, "variation": prompt.variation, "name": prompt.name,
                                "race": prompt.race, "gender": prompt.gender, "values": values[mine],
                                "weights": np.nan_to_num(weights[mine])})
    return pd.DataFrame(records)


def one_direction(answers: pd.DataFrame, sign: float) -> pd.DataFrame:
    """Directions frame: `sign` (+1: White higher) for every variation of the answers."""
    return answers[["context", "variation"]].drop_duplicates().assign(sign=float(sign)).reset_index(drop=True)


def bias_change(before: pd.DataFrame, after: pd.DataFrame, sign: float, n_boot: int = 1000, seed: int = 0
                ) -> pd.Series:
    """The bias in direction `sign` that `after` has more than `before`, at `before`'s pooled SD (one context):
    estimate and 95 % interval (bootstrap-t over names within race x gender); exactly 0 with the interval [0, 0]
    where the two give the same answers (a pruning that removed every planted component), which the bootstrap-t,
    dividing by a zero spread, would leave undefined."""
    if before[["name", "variation"]].equals(after[["name", "variation"]]) and all(
            np.array_equal(a, b) for a, b in zip(before.weights, after.weights)):
        return pd.Series({"value": 0.0, "low": 0.0, "high": 0.0})
    row = signed_reduction(before, after, one_direction(before, sign), "raw", "mixture", n_boot, seed).iloc[0]
    return pd.Series({"value": -row.removed, "low": -row.removed_high, "high": -row.removed_low})


def calibrated_plant(bridge, spec: PlantSpec, features: PairedInputs, direction: float | None = None,
                     tolerance: float = 0.1, max_steps: int = 12, n_boot: int = 1000) -> Plant:
    """Estimate the plant's directions on the feature pairs and set its scale by secant steps so that the planted
    SMD on them is within `tolerance` x target of the target and its 95 % interval covers the target; its KL on
    neutral text. `direction`: +1 raises White answers, -1 Black ones (None: the side the model favours).

    Raises ConfigError when a component is not in the model or the target is not reached (the components cannot
    carry that much bias)."""
    shape = ModelShape.of(bridge)
    for c in spec.components:
        if not (0 <= c.layer < shape.n_layers and 0 <= c.index < shape.count(c.kind)):
            raise ConfigError(f"cannot plant {c.label()}: the model has {shape.n_layers} layers of "
                              f"{shape.count(c.kind)} {'heads' if c.kind == 'attn_head' else 'neurons'}")
    base = leaf_answers(bridge, features)
    if direction is None:
        direction = -1.0 if bias_directions(base, "raw", "mixture").sign.mean() < 0 else 1.0
    plant = Plant(spec, estimate_directions(bridge, features, list(spec.components)), 1.0, direction=direction)
    target = spec.target_smd

    def planted_smd(scale: float) -> pd.Series:
        with plant.planted(bridge, scale):
            change = bias_change(base, leaf_answers(bridge, features), plant.direction, CALIBRATION_BOOT)
        plant.steps.append((scale, float(change.value)))
        return change

    def reached(change: pd.Series) -> bool:
        return abs(change.value - target) <= tolerance * target and change.low <= target <= change.high

    scale, change = 1.0, planted_smd(1.0)
    previous = (0.0, 0.0)
    for _ in range(max_steps):
        if reached(change):
            break
        slope = (change.value - previous[1]) / (scale - previous[0])
        proposal = scale + (target - change.value) / slope if np.isfinite(slope) and slope > 0 else scale * 10
        previous = (scale, float(change.value))
        scale = float(np.clip(proposal, scale / 10, scale * 10))
        change = planted_smd(scale)
    if not reached(change):
        tried = ", ".join(f"{s:.3g} -> {v:.3f}" for s, v in plant.steps)
        raise ConfigError(f"the {spec.kind} plant {spec.labels()} did not reach SMD {target} (scale -> SMD: {tried})")
    plant.scale = scale
    with plant.planted(bridge):
        achieved = bias_change(base, leaf_answers(bridge, features), plant.direction, n_boot)
    plant.achieved_smd, plant.achieved_low, plant.achieved_high = (float(achieved[k]) for k in ("value", "low", "high"))
    plant.kl = kl_on_neutral(bridge, None, edit=lambda: plant.planted(bridge))
    return plant


# ---------------------------------------------------------------- recovery: ranks, recall and the bias removed

SPIKE_IN_COLUMNS = [
    "plant", "components", "n_planted", "target_smd", "scale", "kl_on_neutral", "method", "budget", "ranks",
    "best_rank", "recall", "planted_smd", "planted_low", "planted_high", "truth_removed", "truth_low",
    "truth_high", "removed", "removed_low", "removed_high", "removed_pct_of_truth", "plant_left", "plant_left_low",
    "plant_left_high", "plant_removed_pct", "n_random", "random_mean", "random_max", "rank", "p_rank", "difference",
    "difference_low", "difference_high", "n_names",
]


def planted_ranks(scores: ComponentScores, planted: list[Component], budget: int) -> dict:
    """Each planted component's rank in the scores (1 = highest; NaN if unscored) and the recall at the budget
    (share of the planted components among the top `budget`)."""
    flat = torch.nan_to_num(scores.scores.flatten(), nan=-torch.inf)
    order = torch.argsort(flat, descending=True, stable=True)
    position = torch.empty_like(order)
    position[order] = torch.arange(1, len(order) + 1)
    width = scores.scores.shape[1]
    ranks = [int(position[c.layer * width + c.index]) if torch.isfinite(scores.scores[c.layer, c.index])
             else np.nan for c in planted]
    chosen = set(scores.top(budget))
    return {"ranks": " ".join(str(r) for r in ranks[:8]) + (" ..." if len(ranks) > 8 else ""),
            "best_rank": float(np.nanmin(ranks)) if np.isfinite(ranks).any() else np.nan,
            "recall": sum(c in chosen for c in planted) / len(planted)}


def spike_in_rows(bridge, plant: Plant, evaluation: PairedInputs, scores: dict[str, ComponentScores],
                  budget: int, n_draws: int = 19, seed: int = 0, n_boot: int = 1000) -> pd.DataFrame:
    """Per localisation method (`scores`: method -> scores of the plant's kind on the selection names, computed
    on the spiked model): the planted components' ranks and recall at the budget, and on the evaluation names
    - `removed`: the bias that pruning its top `budget` removes from the spiked model (the plant's and any the model
      had), next to the truth (what removing the plant removes) and `n_draws` random prunings of the same size, all
      at the spiked model's pooled SD in the plant's direction;
    - `plant_left`: the planted bias the pruned model still carries (spiked and pruned minus unspiked and pruned,
      at the latter's pooled SD), and `plant_removed_pct` = 100 (1 - plant_left / planted_smd): how much of the
      plant itself the pruning removed, whatever else it removed."""
    from workbench.prune.generalize import random_prunings

    planted = list(plant.spec.components)
    kind = planted[0].kind
    unspiked = leaf_answers(bridge, evaluation)
    unspiked_pruned = {method: leaf_answers(bridge, evaluation, ablation_hooks(s.top(budget)))
                       for method, s in scores.items()}
    with plant.planted(bridge):
        spiked = leaf_answers(bridge, evaluation)
        pruned = {method: leaf_answers(bridge, evaluation, ablation_hooks(s.top(budget)))
                  for method, s in scores.items()}
        draws = [leaf_answers(bridge, evaluation, ablation_hooks(p))
                 for p in random_prunings(ModelShape.of(bridge), kind, budget, n_draws, seed)]
    directions = one_direction(spiked, plant.direction)
    planted_smd = bias_change(unspiked, spiked, plant.direction, n_boot, seed)
    truth = signed_reduction(spiked, unspiked, directions, "raw", "mixture", n_boot, seed).iloc[0]
    random_removed = [signed_reduction(spiked, d, directions, "raw", "mixture", 10, seed).removed.iloc[0]
                      for d in draws]  # point estimates only: the bootstrap size does not change them
    rows = []
    for method, s in scores.items():
        removal = signed_reduction(spiked, pruned[method], directions, "raw", "mixture", n_boot, seed).iloc[0]
        versus = random_comparison(spiked, pruned[method], draws, directions, "raw", "mixture", n_boot, seed).iloc[0]
        left = bias_change(unspiked_pruned[method], pruned[method], plant.direction, n_boot, seed)
        rows.append({
            "plant": plant.spec.kind, "components": plant.spec.labels(), "n_planted": len(planted),
            "target_smd": plant.spec.target_smd, "scale": plant.scale, "kl_on_neutral": plant.kl, "method": method,
            "budget": budget, **planted_ranks(s, planted, budget),
            "planted_smd": planted_smd.value, "planted_low": planted_smd.low, "planted_high": planted_smd.high,
            "truth_removed": truth.removed, "truth_low": truth.removed_low, "truth_high": truth.removed_high,
            "removed": removal.removed, "removed_low": removal.removed_low, "removed_high": removal.removed_high,
            "removed_pct_of_truth": 100 * removal.removed / truth.removed, "plant_left": left.value,
            "plant_left_low": left.low, "plant_left_high": left.high,
            "plant_removed_pct": 100 * (1 - left.value / planted_smd.value), "n_random": versus.n_random,
            "random_mean": versus.random_mean, "random_max": float(np.max(random_removed)), "rank": versus["rank"],
            "p_rank": versus.p_rank, "difference": versus.difference, "difference_low": versus.difference_low,
            "difference_high": versus.difference_high, "n_names": spiked.name.nunique(),
        })
    return pd.DataFrame(rows, columns=SPIKE_IN_COLUMNS)
