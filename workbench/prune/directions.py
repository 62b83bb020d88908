"""Direction edits: remove a bias type's direction from the residual stream instead of pruning components.

A direction edit is a plan like a pruning plan. At each of its layers it changes the residual stream entering the
block (`blocks.{l}.hook_resid_pre`, every position) by one affine map

    x -> x - (x - bias) @ right.T @ left.T + shift        (left [d, r], right [r, d], bias and shift [d])

fitted on activations of White- and Black-name prompts (`collect_activations`: at the answer position, the prompt's
last token, or averaged over the name's tokens) of that layer:
- fit methods: `mean_difference` (the difference of the class means: TransformerLens's `mean_difference_basis`),
  `probe` (a logistic probe's weights, held out by name: TransformerLens's `fit_sparse_probe` with every feature,
  `probe_basis`), `leace` (the `concept-erasure` package's LEACE eraser, its own oblique affine map);
- interventions: `ace` (affine concept editing, Karvonen & Marks 2025: project out the direction and add back the
  neutral value, the midpoint of the class means; LEACE's eraser is this form with its own projection and the data
  mean), `projection` (project it out: bias 0), `steering` (add `scale` times the White-minus-Black mean difference;
  a negative scale moves every name toward the Black mean).
The random control of an edit has the same form, layers and rank: a random orthonormal subspace (TransformerLens's
`random_basis`) with the same neutral value (ace, leace: an ace edit), without (projection), or a random direction
of the same norm (steering). Its kind ("ace:random") is what `generalize.summarise` matches the draws on.

Every position is edited but the attention sink (`SINK_RATIO`). The residual edit has no exact weight edit: the
RMSNorm that reads the edited residual divides by its norm, so a projection does not fold into the next linear layer; the plans apply as reversible hooks (`DirectionPlan.hooks`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor
from transformer_lens.tools.analysis.interchange import mean_difference_basis, probe_basis, random_basis
from transformer_lens.tools.analysis.sparse_probing import fit_sparse_probe

from workbench.batching import chunks, left_pad, model_device, pad_id
from workbench.errors import PlanError
from workbench.files import atomic_write
from workbench.loaded import model_info
from workbench.nnsight_backend import require_values_here
from workbench.prune.plan import current_versions, load_tensors, read_plan_json, save_tensors
from workbench.readout.prompts import Prompt, PromptSet, render_all

FitMethod = Literal["mean_difference", "probe", "leace"]
Intervention = Literal["ace", "projection", "steering"]
FitPosition = Literal["answer", "name"]
FIT_METHODS: tuple[FitMethod, ...] = get_args(FitMethod)
INTERVENTIONS: tuple[Intervention, ...] = get_args(Intervention)
FIT_POSITIONS: tuple[FitPosition, ...] = get_args(FitPosition)
FIT_SETS = ("selection", "synthetic")
RANDOM = "random"
KEYS = ["context", "variation", "name", "race", "gender"]
SINK_RATIO = 20.0
"""Positions whose residual norm exceeds this multiple of the median over the batch's positions are left unedited:
the attention sink (the first token, 150x the others' norm at SmolLM2's middle layers) carries a large component
along any direction, and resetting it broke the model (one rank-1 ace edit at layer 15: KL 1.9 nats on neutral
text, 0.03 with the sink left alone)."""


def control_kind(kind: str) -> str:
    """The kind of the random draws a kind is compared with: itself for components, "<form>:random" for a direction
    edit (a LEACE edit's control is an ace edit)."""
    if ":" not in kind:
        return kind
    form, method = kind.split("@")[0].split(":")
    return f"ace:{RANDOM}" if method == "leace" else f"{form}:{RANDOM}"


def resid_hook(layer: int) -> str:
    """The hook point a direction edit changes: the residual stream entering block `layer`."""
    return f"blocks.{layer}.hook_resid_pre"


# ------------------------------------------------------------------------------------------------- activations


@dataclass
class Activations:
    """The residual stream entering every block, per prompt (rows of `prompts`), at the answer position and
    averaged over the name's tokens."""

    prompts: pd.DataFrame  # KEYS, one row per prompt
    answer: Float[Tensor, "prompt layer d_model"]
    name: Float[Tensor, "prompt layer d_model"]

    def at(self, position: FitPosition) -> Float[Tensor, "prompt layer d_model"]:
        if position not in FIT_POSITIONS:
            raise PlanError(f"fit position must be one of {FIT_POSITIONS}, not {position!r}")
        return self.answer if position == "answer" else self.name

    def rows(self, units: list[tuple[str, str]] | None = None, names=None) -> "Activations":
        """The prompts of the given (context, variation) cells and names (None: all)."""
        keep = np.ones(len(self.prompts), dtype=bool)
        if units is not None:
            cells = set(units)
            keep &= np.array([(c, v) in cells for c, v in zip(self.prompts.context, self.prompts.variation)])
        if names is not None:
            keep &= self.prompts.name.isin(set(names)).to_numpy()
        index = torch.from_numpy(np.flatnonzero(keep))
        return Activations(self.prompts[keep].reset_index(drop=True), self.answer[index], self.name[index])


def collect_activations(bridge, prompts: PromptSet, hooks: list | None = None, system_prompt: str | None = None,
                        batch_size: int = 8) -> Activations:
    """`Activations` of the prompts as the read-out renders them; `hooks` (an edit) in force while recording
    (the recorded value at a layer is the residual after that layer's own edit)."""
    require_values_here(bridge, "fitting a direction edit")
    tokenizer = model_info(bridge).tokenizer
    listed = list(prompts)
    rendered = render_all(listed, tokenizer, system_prompt=system_prompt)
    n_layers = bridge.cfg.n_layers
    names = [resid_hook(layer) for layer in range(n_layers)]
    store: dict[str, Tensor] = {}

    def recorder(name: str):
        def record(activation: Tensor, hook) -> Tensor:
            store[name] = activation.detach()
            return activation

        return record

    answer, name = [], []
    for part in chunks(len(rendered), batch_size):
        ids, mask = left_pad([r.input_ids for r in rendered[part]], pad_id(tokenizer), model_device(bridge))
        with torch.inference_mode(), bridge.hooks(fwd_hooks=(hooks or []) + [(n, recorder(n)) for n in names]):
            bridge(ids, attention_mask=mask)
        stacked = torch.stack([store[n] for n in names], dim=2).float().cpu()  # [batch, pos, layer, d]
        width = ids.shape[1]
        for row, r in enumerate(rendered[part]):
            offset = width - len(r.input_ids)
            answer.append(stacked[row, -1])
            name.append(stacked[row, offset + r.name_span[0]: offset + r.name_span[1]].mean(0))
    frame = pd.DataFrame([{k: getattr(p, k) for k in KEYS} for p in listed], columns=KEYS)
    return Activations(frame, torch.stack(answer), torch.stack(name))


def synthetic_prompts(names: list, templates: list[str]) -> PromptSet:
    """Karvonen & Marks' simple set: each name (NameEntry) in each neutral template ("{name}" placeholder)."""
    return PromptSet(Prompt("synthetic", f"template {i}", e.name, e.group, e.race, e.gender,
                            template.format(name=e.name), "number", "")
                     for i, template in enumerate(templates) for e in names)


# ------------------------------------------------------------------------------------------------------- edits


@dataclass
class LayerEdit:
    """x -> x - (x - bias) @ right.T @ left.T + shift (rank r = right's rows; r = 0 for a steering vector)."""

    left: Float[Tensor, "d_model rank"]
    right: Float[Tensor, "rank d_model"]
    bias: Float[Tensor, " d_model"]
    shift: Float[Tensor, " d_model"]

    def __call__(self, x: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch d_model"]:
        left, right, bias, shift = (t.to(x) for t in (self.left, self.right, self.bias, self.shift))
        return x - ((x - bias) @ right.T) @ left.T + shift


def _unit_basis(direction: Float[Tensor, " d_model"]) -> Float[Tensor, "d_model 1"]:
    return (direction / direction.norm())[:, None]


def fit_layer(x: Float[Tensor, "n d_model"], white: Bool[Tensor, " n"], method: FitMethod,
              intervention: Intervention, scale: float = -1.0, groups=None, seed: int = 0) -> LayerEdit:
    """One layer's edit fitted on activations `x` labelled White (True) or Black; `groups` (name ids) hold the
    probe's test split out by name."""
    x = x.float()
    mean_white, mean_black = x[white].mean(0), x[~white].mean(0)
    neutral = (mean_white + mean_black) / 2
    zero = torch.zeros_like(neutral)
    none = (torch.zeros(len(neutral), 0), torch.zeros(0, len(neutral)), zero)
    if intervention == "steering":
        return LayerEdit(*none, scale * (mean_white - mean_black))
    if torch.equal(x, x[:1].expand_as(x)):
        return LayerEdit(*none, zero)  # every prompt alike here (the embedding of a shared last token): no direction
    if method == "leace":
        from concept_erasure import LeaceFitter

        if intervention != "ace":
            raise PlanError("LEACE is an affine eraser: use it with intervention 'ace'")
        fitter = LeaceFitter(x.shape[1], 1, dtype=torch.float64)
        fitter.update(x.double(), white.double()[:, None])
        eraser = fitter.eraser
        return LayerEdit(eraser.proj_left.float(), eraser.proj_right.float(), eraser.bias.float(), zero)
    if method == "mean_difference":
        basis = mean_difference_basis(x, white.tolist())
    elif method == "probe":
        probe = fit_sparse_probe(x, white, k=x.shape[1], groups=groups, seed=seed, test_fraction=0.25,
                                 l2_strength=1e-2)
        weights = torch.zeros(x.shape[1], dtype=torch.float64)
        weights[probe.selected_features] = probe.coefficients
        basis = probe_basis(weights[None])
    else:
        raise PlanError(f"fit method must be one of {FIT_METHODS}, not {method!r}")
    return LayerEdit(basis, basis.T.contiguous(), neutral if intervention == "ace" else zero, zero)


@dataclass
class DirectionPlan:
    """Which direction edit, fitted on what, applied at which layers of which model (see the module)."""

    model: str
    model_hash: str
    method: str  # a FitMethod, or "random" for a control
    intervention: str
    layers: list[int]
    fitted_on: str = "selection"  # "selection": the study's selection names; "synthetic": neutral templates
    fit_position: str = "answer"
    bias_type: str = "race"
    scale: float | None = None  # steering only
    seed: int | None = None  # random controls: the draw's seed
    edits: str | None = None  # safetensors file of the per-layer maps (left/right/bias/shift per layer)
    versions: dict[str, str] = field(default_factory=current_versions)
    maps: dict[int, LayerEdit] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        checks = [
            (self.method in FIT_METHODS + (RANDOM,), f"field 'method' must be one of {FIT_METHODS + (RANDOM,)}"),
            (self.intervention in INTERVENTIONS, f"field 'intervention' must be one of {INTERVENTIONS}"),
            (self.method != "leace" or self.intervention == "ace", "LEACE is an affine eraser: intervention 'ace'"),
            (isinstance(self.layers, list) and self.layers and all(isinstance(i, int) and i >= 0
                                                                    for i in self.layers),
             "field 'layers' must be a non-empty list of layer numbers"),
            (self.fitted_on in FIT_SETS, f"field 'fitted_on' must be one of {FIT_SETS}"),
            (self.fit_position in FIT_POSITIONS, f"field 'fit_position' must be one of {FIT_POSITIONS}"),
            (self.intervention != "steering" or isinstance(self.scale, (int, float)),
             "a steering plan needs a numeric 'scale'"),
        ]
        for ok, message in checks:
            if not ok:
                raise PlanError(f"direction plan: {message}")

    @property
    def kind(self) -> str:
        """The edit's kind in the study's tables: "<intervention>:<method>" (controls: "<form>:random")."""
        synthetic = "@synthetic" if self.fitted_on == "synthetic" and self.method != RANDOM else ""
        return f"{self.intervention}:{self.method}{synthetic}"

    @property
    def size(self) -> int:
        """Directions edited: rank x layers (a steering vector counts one per layer)."""
        if self.intervention == "steering":
            return len(self.layers)
        return sum(m.right.shape[0] for m in self.maps.values()) or len(self.layers)

    def hooks(self) -> list[tuple[str, callable]]:
        """Reversible forward hooks, for `bridge.hooks(fwd_hooks=...)`."""
        missing = [layer for layer in self.layers if layer not in self.maps]
        if missing:
            raise PlanError(f"direction plan has no fitted map for layer(s) {missing}: fit it or load its edits file")
        return [(resid_hook(layer), _edit_hook(self.maps[layer])) for layer in self.layers]

    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("maps")
        return data

    def save(self, path: str | Path) -> Path:
        """The plan as JSON and its maps as `<stem>.safetensors` beside it."""
        path = Path(path)
        tensors = {f"{part}/{layer}": getattr(m, part).clone() for layer, m in self.maps.items()
                   for part in ("left", "right", "bias", "shift")}
        target = save_tensors(path.with_suffix(".safetensors"), tensors)
        data = self.to_json() | {"edits": target.name}
        return atomic_write(path, json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "DirectionPlan":
        path = Path(path)
        data = read_plan_json(path, "direction plan")
        known = {f.name for f in fields(cls)} - {"maps"}
        if sorted(set(data) - known):
            raise PlanError(f"{path}: a direction plan is a JSON object with fields {sorted(known)}")
        missing = [k for k in ("model", "model_hash", "method", "intervention", "layers") if k not in data]
        if missing:
            raise PlanError(f"{path}: missing required field(s) {', '.join(missing)}")
        try:
            plan = cls(**data)
        except (PlanError, TypeError) as error:
            raise PlanError(f"{path}: {error}") from error
        if plan.edits:
            tensors = load_tensors(path.parent / plan.edits, "edits")
            plan.maps = {layer: LayerEdit(*(tensors[f"{part}/{layer}"] for part in ("left", "right", "bias",
                                                                                    "shift")))
                         for layer in plan.layers if f"left/{layer}" in tensors}
        return plan


def _edit_hook(edit: LayerEdit):
    def hook(activation: Tensor, hook) -> Tensor:
        norms = activation.norm(dim=-1, keepdim=True)
        sink = norms > SINK_RATIO * norms.flatten().median()
        return torch.where(sink, activation, edit(activation))

    return hook


def fit_plan(bridge, activations: Activations, method: FitMethod, intervention: Intervention,
             layers: list[int] | None = None, fit_position: FitPosition = "answer", fitted_on: str = "selection",
             scale: float = -1.0, seed: int = 0, bias_type: str = "race") -> DirectionPlan:
    """A direction plan fitted on `activations` (White against Black) at each of `layers` (None: all)."""
    layers = list(range(bridge.cfg.n_layers)) if layers is None else list(layers)
    white = torch.tensor((activations.prompts.race == "white").to_numpy())
    if white.all() or not white.any():
        raise PlanError("fitting a direction needs prompts of both White and Black names")
    groups = torch.tensor(pd.factorize(activations.prompts.name)[0])
    x = activations.at(fit_position)
    info = model_info(bridge)
    plan = DirectionPlan(info.name, info.weight_hash, method, intervention, layers, fitted_on, fit_position,
                         bias_type, scale if intervention == "steering" else None)
    plan.maps = {layer: fit_layer(x[:, layer], white, method, intervention, scale, groups, seed) for layer in layers}
    return plan


def random_plan(plan: DirectionPlan, seed: int) -> DirectionPlan:
    """The random control of a fitted plan: the same form, layers and rank in a random subspace (see the module)."""
    maps = {}
    for layer, m in plan.maps.items():
        d, rank = m.left.shape[0], m.right.shape[0]
        draw_seed = int(np.random.default_rng([seed, layer]).integers(2**31))
        if rank == 0:
            direction = torch.randn(d, generator=torch.Generator().manual_seed(draw_seed))
            maps[layer] = replace(m, shift=direction / direction.norm() * m.shift.norm())
            continue
        basis = random_basis(d, rank, draw_seed).float()
        neutral = torch.zeros(d) if plan.intervention == "projection" else m.bias
        maps[layer] = LayerEdit(basis, basis.T.contiguous(), neutral, m.shift)
    control = replace(plan, method=RANDOM, intervention="ace" if plan.method == "leace" else plan.intervention,
                      seed=seed, edits=None)
    control.maps = maps
    return control


def shuffled_labels(activations: Activations, seed: int = 0) -> Activations:
    """The activations with race labels permuted across names (each name keeps one label): a fit that must fail."""
    names = activations.prompts.drop_duplicates("name")[["name", "race"]]
    permuted = dict(zip(names.name, np.random.default_rng(seed).permutation(names.race.to_numpy())))
    return replace(activations, prompts=activations.prompts.assign(race=activations.prompts.name.map(permuted)))


def recognition_auc(activations: Activations, layer: int, position: FitPosition = "name", seed: int = 0,
                    repeats: int = 3) -> float:
    """Can the group of a name be read off the activations? The held-out ROC AUC of a logistic probe for White
    against Black at `layer`, its test names never seen in training (TransformerLens's `fit_sparse_probe`, every
    feature, grouped by name), averaged over `repeats` seeded splits; 0.5 is chance."""
    from transformer_lens.tools.analysis.sparse_probing import SparseProbeConvergenceError

    x = activations.at(position)[:, layer]
    white = torch.tensor((activations.prompts.race == "white").to_numpy())
    groups = torch.tensor(pd.factorize(activations.prompts.name)[0])
    aucs = []
    for repeat in range(repeats):
        try:
            probe = fit_sparse_probe(x, white, k=x.shape[1], groups=groups, seed=seed + repeat, test_fraction=0.3,
                                     l2_strength=1e-2)
        except SparseProbeConvergenceError:
            continue
        aucs.append(probe.metrics.roc_auc)
    return float(np.nanmean(aucs)) if aucs else float("nan")
