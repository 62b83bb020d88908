"""Pruning plans (which components to remove, and how), selection rules, and two ways to apply a plan.

- Hooks (`hooks_for`): reversible forward hooks on the TransformerBridge, for `bridge.hooks(fwd_hooks=...)`.
- Weight edits (`apply_weight_edits`): the same ablation written into the HF weights, so that a pruned model
  can be saved (`export_pruned`) and loaded by plain transformers. Both give the same logits.

Weight edits, per component (d = d_head, h = head index, i = neuron index):
- neuron, zero: column i of mlp.down_proj.weight (its only path to the residual stream).
- head, zero: columns h*d:(h+1)*d of self_attn.o_proj.weight (the head's input slice of W_O).
- head, query_zero: rows h*d:(h+1)*d of self_attn.q_proj.weight (and of its bias): a zero query gives uniform
  attention. Models with a query norm (Gemma 3) keep a zero query zero.
- mean (either kind): zero the slice as above and add slice @ mean_activation to the down_proj / o_proj bias.
  A constant added to the layer's output is exactly what replacing the activation by its mean does. Where
  the projection has no bias one is created (zeros plus the constant); see `export_pruned` for saving it.

Plans of weight-level methods (Wanda) name a `weight_selection` file instead of components: a safetensors
file mapping HF parameter names (or module names, meaning their weight, as workbench.localize.wanda writes
them) to flat indices of the entries to zero. Only weight edits can apply them.
"""

from __future__ import annotations

import datetime
import json
import math
import shutil
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import SimpleNamespace

import torch
from jaxtyping import Float, Int
from safetensors.torch import load_file, save
from torch import Tensor

from workbench.components import (
    ABLATION_MODES,
    KINDS,
    AblationMode,
    Component,
    Kind,
    ablation_hooks,
    activation_hook,
)
from workbench.errors import PlanError
from workbench.files import atomic_write
from workbench.models import weight_hash
from workbench.nnsight_backend import SHARED_WEIGHTS

RULES = ("top_k", "top_percentile", "set_difference", "intersection", "most_frequent")
REQUIRED = ("model", "model_hash", "components", "method", "selection", "ablation")
# A created bias is recorded in the originals with this empty tensor: restoring removes the bias again.
CREATED = torch.empty(0)


def current_versions() -> dict[str, str]:
    """Versions of the libraries that define the numbers a plan was made with."""
    versions = {"torch": torch.__version__}
    for key, package in [("transformers", "transformers"), ("transformer_lens", "transformer-lens"),
                         ("workbench", "biasprune-workbench")]:
        try:
            versions[key] = version(package)
        except PackageNotFoundError:
            versions[key] = "not installed"
    return versions


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclass
class PruningPlan:
    """Which components (or weights) to remove from which model, how they were chosen, how to remove them."""

    model: str
    model_hash: str
    components: list[Component]
    method: str
    selection: dict
    ablation: AblationMode = "zero"
    scores: list[float] = field(default_factory=list)
    means: str | None = None  # safetensors file of mean activations per hook name (mean ablation)
    weight_selection: str | None = None  # safetensors file of flat indices per HF parameter name
    seed: int | None = None
    bias_type: str = "race"  # the contrast the components were chosen for (workbench.audit.bias_types)
    versions: dict[str, str] = field(default_factory=current_versions)
    created: str | None = field(default_factory=_now)

    def __post_init__(self) -> None:
        self.components = [c if isinstance(c, Component) else Component(**c) for c in self.components]
        _check_plan(self, "plan")

    def to_json(self) -> dict:
        data = asdict(self)
        data["components"] = [{"layer": c.layer, "kind": c.kind, "index": c.index} for c in self.components]
        return data

    def save(self, path: str | Path) -> Path:
        return atomic_write(Path(path), json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "PruningPlan":
        """Read a plan; relative `means` and `weight_selection` paths are taken from the plan's folder."""
        path = Path(path)
        data = read_plan_json(path, "pruning plan")
        _check_keys(data, path)
        data["components"] = _components_from_json(data["components"], path)
        for key in ("means", "weight_selection"):
            if isinstance(data.get(key), str) and not Path(data[key]).is_absolute():
                data[key] = str(path.parent / data[key])
        data.setdefault("versions", {})
        data.setdefault("created", None)
        try:
            return cls(**data)
        except (PlanError, TypeError, ValueError) as error:
            raise PlanError(f"{path}: {error}") from error


def read_plan_json(path: Path, what: str) -> dict:
    """A plan file's JSON object (PlanError naming the file when it is unreadable or not an object)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise PlanError(f"{path}: not a readable JSON {what} ({error})") from error
    if not isinstance(data, dict):
        raise PlanError(f"{path}: a {what} is a JSON object, found {type(data).__name__}")
    return data


def _check_keys(data: dict, path: Path) -> None:
    known = {f.name for f in fields(PruningPlan)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise PlanError(f"{path}: unknown field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(known))}")
    missing = [key for key in REQUIRED if key not in data]
    if missing:
        raise PlanError(f"{path}: missing required field(s) {', '.join(missing)}")


def _components_from_json(items, path: Path) -> list[Component]:
    if not isinstance(items, list):
        raise PlanError(f"{path}: field 'components' must be a list of {{layer, kind, index}} objects")
    components = []
    for position, item in enumerate(items):
        if not isinstance(item, dict) or set(item) != {"layer", "kind", "index"}:
            raise PlanError(f"{path}: components[{position}] must be an object with exactly layer, kind, index")
        if not all(isinstance(item[k], int) and not isinstance(item[k], bool) for k in ("layer", "index")):
            raise PlanError(f"{path}: components[{position}]: layer and index must be integers")
        components.append(Component(item["layer"], item["kind"], item["index"]))
    return components


def _check_plan(plan: PruningPlan, where: str) -> None:
    checks = [
        (isinstance(plan.model, str), "field 'model' must be a string"),
        (isinstance(plan.model_hash, str), "field 'model_hash' must be a string"),
        (isinstance(plan.method, str), "field 'method' must be a string"),
        (plan.ablation in ABLATION_MODES, f"field 'ablation' must be one of {ABLATION_MODES}, not {plan.ablation!r}"),
        (isinstance(plan.selection, dict) and plan.selection.get("rule") in RULES,
         f"field 'selection' must be an object whose 'rule' is one of {RULES}"),
        (isinstance(plan.scores, list) and all(isinstance(s, (int, float)) for s in plan.scores),
         "field 'scores' must be a list of numbers"),
        (len(plan.scores) in (0, len(plan.components)),
         f"field 'scores' has {len(plan.scores)} entries for {len(plan.components)} components (give one each, or none)"),
        (all(c.kind in KINDS for c in plan.components), f"field 'components': kind must be one of {KINDS}"),
        (all(c.layer >= 0 and c.index >= 0 for c in plan.components), "field 'components': negative layer or index"),
        (plan.ablation != "query_zero" or all(c.kind == "attn_head" for c in plan.components),
         "field 'ablation': query_zero applies to attention heads only"),
        (plan.means is None or isinstance(plan.means, str),
         "field 'means' must be a path or null"),
        (plan.weight_selection is None or isinstance(plan.weight_selection, str),
         "field 'weight_selection' must be a path or null"),
        (plan.seed is None or isinstance(plan.seed, int), "field 'seed' must be an integer or null"),
        (isinstance(plan.versions, dict), "field 'versions' must be an object"),
    ]
    for ok, message in checks:
        if not ok:
            raise PlanError(f"{where}: {message}")


# ---------------------------------------------------------------------------------------------- selection rules


def _ranked(scores: Float[Tensor, "..."]) -> Int[Tensor, " n"]:
    """Flat indices by descending score; ties keep the lower index first (deterministic)."""
    return torch.sort(scores.detach().flatten().float(), descending=True, stable=True).indices


def _to_components(flat: Int[Tensor, " k"], scores: Float[Tensor, "n_layers n_per_layer"], kind: Kind):
    n_per_layer = scores.shape[1]
    return [Component(int(i) // n_per_layer, kind, int(i) % n_per_layer) for i in flat]


def select_top_k(scores: Float[Tensor, "n_layers n_per_layer"], k: int, kind: Kind) -> list[Component]:
    """The k components with the highest scores, best first."""
    return _to_components(_ranked(scores)[:k], scores, kind)


def percentile_count(n: int, pct: float) -> int:
    """How many of n entries the top pct % holds (rounded down)."""
    return min(n, math.floor(n * pct / 100 + 1e-9))


def select_top_percentile(scores: Float[Tensor, "n_layers n_per_layer"], pct: float, kind: Kind) -> list[Component]:
    """The top pct % of components by score (over all layers together), best first."""
    return select_top_k(scores, percentile_count(scores.numel(), pct), kind)


def set_difference(keep: Sequence[Component], remove: Sequence[Component]) -> list[Component]:
    """Components of `keep` not in `remove`, in `keep`'s order."""
    removed = set(remove)
    return [c for c in keep if c not in removed]


def intersection(lists: Sequence[Sequence[Component]]) -> list[Component]:
    """Components present in every list, sorted by (layer, kind, index)."""
    if not lists:
        return []
    common = set(lists[0]).intersection(*map(set, lists[1:]))
    return sorted(common)


def most_frequent(lists: Sequence[Sequence[Component]], k: int) -> list[Component]:
    """The k components that occur in most lists; ties go to the lower (layer, kind, index)."""
    counts = Counter(c for components in lists for c in set(components))
    return sorted(counts, key=lambda c: (-counts[c], c))[:k]


def save_tensors(path: str | Path, tensors: dict[str, Tensor]) -> Path:
    """Save a means dict (or a weight selection) as safetensors (contiguous CPU copies)."""
    return atomic_write(Path(path), save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))


def load_tensors(path: str | Path, what: str) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except (OSError, ValueError, RuntimeError) as error:
        raise PlanError(f"{path}: cannot read the plan's {what} file ({error})") from error


# --------------------------------------------------------------------------------------------------- applicators


def _plan_means(plan: PruningPlan, means: dict[str, Tensor] | None) -> dict[str, Tensor] | None:
    if plan.ablation != "mean" or means is not None:
        return means
    if plan.means is None:
        raise PlanError("a mean-ablation plan needs mean activations: pass `means` or set the plan's 'means' file")
    return load_tensors(plan.means, "means")


def hooks_for(plan: PruningPlan, means: dict[str, Tensor] | None = None) -> list[tuple[str, Callable]]:
    """Reversible forward hooks that apply a component plan, for `bridge.hooks(fwd_hooks=...)`."""
    if plan.weight_selection is not None:
        raise PlanError("a weight-selection (Wanda) plan has no activation hooks: use `pruned_weights` instead")
    return ablation_hooks(plan.components, plan.ablation, _plan_means(plan, means))


def _unwrap(model) -> torch.nn.Module:
    """The HF model of a TransformerBridge, or the HF model itself."""
    return getattr(model, "original_model", model)


def decoder_prefix(hf_model) -> str:
    """Module path of the decoder stack: 'model' (Llama, Qwen2, Gemma 3 text) or 'model.language_model'."""
    return "model.language_model" if hasattr(hf_model.model, "language_model") else "model"


def hf_module(hf_model, name: str) -> torch.nn.Module:
    """A submodule by its HF name; inside a TransformerBridge, the wrapped HF module rather than its wrapper."""
    module = hf_model.get_submodule(name) if name else hf_model
    while isinstance(getattr(module, "original_component", None), torch.nn.Module):
        module = module.original_component
    return module


def hf_tensor(hf_model, name: str) -> Tensor | None:
    """A parameter or buffer by its HF name (None for an absent bias)."""
    module_name, _, attribute = name.rpartition(".")
    return getattr(hf_module(hf_model, module_name), attribute, None)


def _layer_module(hf_model, layer: int, path: str) -> tuple[str, torch.nn.Linear]:
    name = f"{decoder_prefix(hf_model)}.layers.{layer}.{path}"
    return name, hf_module(hf_model, name)


def _head_dim(hf_model) -> int:
    config = getattr(hf_model.config, "text_config", None) or hf_model.config
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _edits(hf_model, component: Component, ablation: str) -> list[tuple[str, torch.nn.Linear, tuple]]:
    """(module name, module, weight index) of the slices a component's removal zeroes."""
    if component.kind == "mlp_neuron":
        name, module = _layer_module(hf_model, component.layer, "mlp.down_proj")
        return [(name, module, (slice(None), component.index))]
    d = _head_dim(hf_model)
    heads = slice(component.index * d, (component.index + 1) * d)
    if ablation == "query_zero":
        name, module = _layer_module(hf_model, component.layer, "self_attn.q_proj")
        return [(name, module, (heads, slice(None)))]
    name, module = _layer_module(hf_model, component.layer, "self_attn.o_proj")
    return [(name, module, (slice(None), heads))]


EDITED = "_workbench_edited_parameters"
"""On an HF model: how many parameters weight edits have backed up (`_backup`) and not yet restored."""


def weights_edited(model) -> bool:
    """Whether weight edits are in force (a pruning, a weight selection, a spike-in plant: every edit backs up the
    parameters it changes, and `restore_weights` puts them back)."""
    return getattr(_unwrap(model), EDITED, 0) > 0


def _backup(originals: dict[str, Tensor], hf_model, name: str) -> None:
    """Keep a parameter's original before an edit (every weight edit passes here); refused on shared weights."""
    if getattr(hf_model, SHARED_WEIGHTS, False):
        raise PlanError(f"cannot edit {name}: a remote nnsight model's weights are NDIF's, shared and read-only; "
                        "remove components with activation hooks instead (a plan without a weight selection)")
    if name not in originals:
        parameter = hf_tensor(hf_model, name)
        originals[name] = CREATED if parameter is None else parameter.detach().clone()
        setattr(hf_model, EDITED, getattr(hf_model, EDITED, 0) + 1)


def _mean_of(component: Component, means: dict[str, Tensor]) -> Float[Tensor, " width"]:
    hook = activation_hook(component.layer, component.kind)
    if hook not in means:
        raise PlanError(f"mean ablation of {component.label()} needs the mean activation of {hook}")
    return means[hook][component.index]


def _add_to_bias(module: torch.nn.Linear, shift: Float[Tensor, " out"]) -> None:
    if module.bias is None:
        module.bias = torch.nn.Parameter(torch.zeros(module.out_features, dtype=module.weight.dtype,
                                                     device=module.weight.device), requires_grad=False)
    module.bias.add_(shift.to(module.bias))


def apply_weight_edits(hf_model, plan: PruningPlan, means: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Write a plan into the weights; returns the original parameters it touched (for `restore_weights`)."""
    hf_model = _unwrap(hf_model)
    means = _plan_means(plan, means)
    originals: dict[str, Tensor] = {}
    with torch.no_grad():
        for component in plan.components:
            for name, module, index in _edits(hf_model, component, plan.ablation):
                _backup(originals, hf_model, f"{name}.weight")
                if plan.ablation == "mean":
                    _backup(originals, hf_model, f"{name}.bias")
                    mean = _mean_of(component, means).to(device=module.weight.device, dtype=torch.float32)
                    columns = module.weight[index].float().reshape(module.out_features, -1)
                    _add_to_bias(module, columns @ mean.reshape(-1))
                module.weight[index] = 0
                if plan.ablation == "query_zero" and module.bias is not None:
                    _backup(originals, hf_model, f"{name}.bias")
                    module.bias[index[0]] = 0
        if plan.weight_selection is not None:
            _zero_selection(hf_model, load_tensors(plan.weight_selection, "weight selection"), originals)
    return originals


def _selected_parameter(hf_model, name: str) -> tuple[str, Tensor]:
    """A selection key is a parameter name, or a module name standing for its weight (localize.wanda files)."""
    for candidate in (name, f"{name}.weight"):
        try:
            tensor = hf_tensor(hf_model, candidate)
        except AttributeError:
            continue
        if isinstance(tensor, Tensor):
            return candidate, tensor
    raise PlanError(f"weight selection names {name!r}, which is not a parameter (or module with a weight) here")


def _zero_selection(hf_model, selection: Mapping[str, Int[Tensor, " n"]], originals: dict[str, Tensor]) -> None:
    """Zero a weight selection (flat indices per matrix) in place, backing up each touched parameter."""
    for key, flat in selection.items():
        name, parameter = _selected_parameter(hf_model, key)
        _backup(originals, hf_model, name)
        parameter.view(-1)[flat.to(parameter.device).long()] = 0


def restore_weights(hf_model, originals: dict[str, Tensor]) -> None:
    """Undo `apply_weight_edits` exactly (created biases are removed again)."""
    hf_model = _unwrap(hf_model)
    with torch.no_grad():
        for name, original in originals.items():
            module_name, _, attribute = name.rpartition(".")
            if original is CREATED:
                setattr(hf_module(hf_model, module_name), attribute, None)
            else:
                hf_tensor(hf_model, name).copy_(original)
    setattr(hf_model, EDITED, max(0, getattr(hf_model, EDITED, 0) - len(originals)))


@contextmanager
def pruned_weights(model, plan: PruningPlan, means: dict[str, Tensor] | None = None) -> Iterator[None]:
    """Apply a plan as weight edits for the duration of a `with` block (works through a bridge too)."""
    originals = apply_weight_edits(model, plan, means)
    try:
        yield
    finally:
        restore_weights(model, originals)


@contextmanager
def zeroed_weights(model, selection: Mapping[str, Int[Tensor, " n"]]) -> Iterator[None]:
    """Zero a weight selection (flat indices per matrix, e.g. `localize.wanda`'s) for a `with` block."""
    originals: dict[str, Tensor] = {}
    with torch.no_grad():
        _zero_selection(_unwrap(model), selection, originals)
    try:
        yield
    finally:
        restore_weights(model, originals)


# ------------------------------------------------------------------------------------------------------- export

BIAS_GROUPS = {  # config flag -> the linear layers (per decoder layer) whose bias it switches on
    "attention_bias": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    "mlp_bias": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
}


def _created_groups(originals: dict[str, Tensor]) -> set[str]:
    created = [name for name, value in originals.items() if value is CREATED]
    return {flag for flag, paths in BIAS_GROUPS.items() for name in created
            if any(name.endswith(f"{path}.bias") for path in paths)}


def _express_biases(hf_model, flags: set[str], originals: dict[str, Tensor]) -> None:
    """Switch on the config flags of created biases and give every layer the zero biases the flag implies."""
    config = getattr(hf_model.config, "text_config", None) or hf_model.config
    for flag in flags:
        if not hasattr(config, flag) or config.model_type not in ("llama", "gemma3_text", "gemma3"):
            raise PlanError(
                f"mean ablation needs a bias that {config.model_type} checkpoints cannot express (no '{flag}'): "
                "export with zero ablation, or apply the plan with hooks"
            )
        for layer in range(config.num_hidden_layers):
            for path in BIAS_GROUPS[flag]:
                name, module = _layer_module(hf_model, layer, path)
                if module.bias is None:
                    _backup(originals, hf_model, f"{name}.bias")
                    _add_to_bias(module, torch.zeros(module.out_features))


def export_pruned(model, tokenizer, plan: PruningPlan, out_dir: str | Path,
                  means: dict[str, Tensor] | None = None) -> Path:
    """Save the pruned model (safetensors, loadable by AutoModelForCausalLM) and its plan; the model is restored.

    A mean-ablation edit that created a bias is saved by switching on the config's bias flag
    (attention_bias / mlp_bias) with zero biases for the other projections it covers, where the
    architecture has such a flag (Llama, Gemma 3); other architectures raise a PlanError.
    The plan's means and weight-selection files are copied beside it.
    """
    hf_model, out_dir = _unwrap(model), Path(out_dir)
    originals = apply_weight_edits(hf_model, plan, means)
    config = getattr(hf_model.config, "text_config", None) or hf_model.config
    flags = {flag: getattr(config, flag, None) for flag in _created_groups(originals)}
    try:
        _express_biases(hf_model, set(flags), originals)
        for flag in flags:
            setattr(config, flag, True)
        skeleton = _skeleton(hf_model)
        skeleton.save_pretrained(out_dir, state_dict=canonical_state_dict(hf_model, skeleton))
    finally:
        for flag, value in flags.items():
            setattr(config, flag, value)
        restore_weights(hf_model, originals)
    tokenizer.save_pretrained(out_dir)
    _save_plan_beside(plan, out_dir, means)
    return out_dir


def _skeleton(hf_model) -> torch.nn.Module:
    """An empty (meta-device) model of the same class and config: the canonical parameter names."""
    with torch.device("meta"):
        return type(hf_model)(hf_model.config)


def canonical_state_dict(model, skeleton: torch.nn.Module | None = None) -> dict[str, Tensor]:
    """The HF state dict under its HF names, also for a model wrapped by a TransformerBridge.

    Wrapping renames and duplicates the entries of `hf_model.state_dict()`, which save_pretrained refuses
    and which changes `models.weight_hash`; this view does not.
    """
    hf_model = _unwrap(model)
    skeleton = skeleton or _skeleton(hf_model)
    return {name: hf_tensor(hf_model, name).detach() for name in skeleton.state_dict()}


def model_hash(model) -> str:
    """`models.weight_hash` of the canonical HF state dict: the same before and after bridge wrapping."""
    state = canonical_state_dict(model)
    return weight_hash(SimpleNamespace(state_dict=lambda: state))


def _save_plan_beside(plan: PruningPlan, out_dir: Path, means: dict[str, Tensor] | None) -> None:
    data = plan.to_json()
    for key in ("means", "weight_selection"):
        target = out_dir / f"plan_{key}.safetensors"
        if key == "means" and means is not None and plan.ablation == "mean":
            data[key] = save_tensors(target, means).name
        elif data[key] is not None:
            shutil.copyfile(data[key], target)
            data[key] = target.name
    atomic_write(out_dir / "pruning_plan.json", json.dumps(data, indent=2) + "\n")
