"""The study's configuration: dataclasses with one docstring per field, loaded from TOML and validated.

Unknown keys, wrong types and malformed TOML are reported with the file and the field (or line).
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from workbench.audit.bias_types import BIAS_TYPES, CONTRASTS, contrasts_for
from workbench.audit.stats import CORRECTIONS, METHODS, SCALES
from workbench.errors import ConfigError, PromptDataError
from workbench.readout.engine import ExactReadoutConfig
from workbench.readout.prompts import NAME_SOURCES, known_contexts, max_names_per_group, names_beyond, names_subset

LocalizeMethod = Literal["attribution", "patching", "ablation", "heads", "wanda"]
Regime = Literal["prompt", "leave_one_out", "cross_context"]
NeuronRule = Literal["rank", "intersection"]


@dataclass
class PromptsSettings:
    folder: str = ""
    """A folder of prompt data with the files of the bundled prompts/ folder (names.toml, contexts.toml,
    scenarios.toml; path relative to the working directory); empty uses the bundled prompts/."""


@dataclass
class AuditSettings:
    contexts: list[str] = field(default_factory=lambda: ["purchase", "finance", "service", "activity"])
    """Contexts to audit: keys of the prompts folder's contexts.toml, or the 2024 audit's scenarios at a level of
    detail, "<scenario>:<level>" (its scenarios.toml), e.g. "purchase:low", "public office:numeric"."""
    variations: dict[str, list[str]] = field(default_factory=dict)
    """Variations to use per context (a context not listed uses all of its variations)."""
    prompts_csv: str = ""
    """A prompt table in the 2024 audit's CSV format (path, relative to the working directory) audited instead
    of the prompts built from 'contexts'; empty builds them (workbench.readout.prompts.PromptSet.from_audit_csv)."""
    names: str = "paper"
    """Where the first names come from: 'paper' (names.toml: the pruning study's 16 per group, in file order) or
    'bank' (name_bank.csv: names chosen from voter-file and SSA data, the Black and White groups matched on
    frequency, decade and typicality, in rank order; prompts/README.md)."""
    names_per_group: int = 6
    """First names taken from each race x gender group (16 max for 'paper', the bank's size per group for 'bank')."""
    names_offset: int = 0
    """Names skipped at the start of each group before the names_per_group taken: a screen on names 9-12 of the
    bank (offset 8) leaves names 1-8 fresh for the study that confirms it."""
    instruction_suffix: bool = True
    """Append the 2024 audit's 'Reply only with the number...' instruction."""
    system_prompt: str = ""
    """System prompt; empty keeps the chat template's default (SmolLM2 and Qwen inject one)."""
    scale: str = "log"
    """Scale of the SMD: 'log' (sign(x) log(1+|x|), robust to stray huge answers) or 'raw' (the paper's)."""
    method: str = "mixture"
    """SMD method: 'mixture' (the paper's SMD, infinite-sample limit) or 'pooled_winsorized'."""
    n_boot: int = 1000
    """Bootstrap replicates (names resampled within race)."""
    min_valid_mass: float = 0.5
    """A name whose numeric answers have less probability than this is left out of its variation's SMD (and
    named in the bias table's note), never renormalised."""
    n_perm: int = 2000
    """Permutations of the null (race labels shuffled across names within gender)."""
    correction: str = "holm"
    """Multiplicity correction of the permutation p-values: 'holm' (family-wise error) or 'bh' (false discovery
    rate), over the variations and, separately, over the contexts."""
    alpha: float = 0.05
    """Significance level of the adjusted p-values; only contexts significant at it are pruned for."""
    bias_types: list[str] = field(default_factory=lambda: ["race", "gender", "intersectional"])
    """Bias types audited with the race statistics (workbench.audit.bias_types): 'race', 'gender' (men vs women) and
    'intersectional' (White women, Black men and Black women each vs White men, Black women vs the rest); race
    is always included."""


@dataclass
class LocalizeSettings:
    context: str = "purchase"
    """Context whose pairs are used for the localisation figures and method comparison."""
    methods: list[str] = field(default_factory=lambda: ["attribution", "patching", "ablation", "heads", "wanda"])
    """Methods run in the localisation stage."""
    always: bool = False
    """Localise (and run the pruning stages) even when the audit finds no context's bias significant after
    correction; by default such a study says so in one line and skips them, since they would serve no pruning
    (a spike-in study always runs them)."""
    n_leaves: int = 12
    """Answer leaves in the differentiable metric."""
    patch_top_neurons: int = 100
    """Activation patching scores this many top neurons of attribution patching on the same pairs (and every
    head)."""
    patch_pairs: int = 4
    """Pairs used by activation patching and ablation (the costly methods); the localisation stage takes the first
    whose two answers both have spread (workbench.pipeline.study.patching_pairs), the spike-in check the first."""
    calibration_random_neurons: int = 100
    """Neurons drawn at random (beyond the top patch_top_neurons of attribution on the same pairs) that activation
    patching also scores, so that the calibration of attribution against patching (tables/localize_calibration,
    workbench.localize.calibration) sees neurons of every size, not only the top."""
    wanda_tau_black: float = 0.15
    """Wanda: fraction of each matrix's weights in the top of the Black-prompt scores."""
    wanda_tau_white: float = 0.15
    """Wanda: fraction of each matrix's weights in the top of the White-prompt scores (removed from the set)."""


@dataclass
class GeneralizeSettings:
    neuron_budget: int = 64
    """Neurons pruned in the generalisation matrix."""
    head_budget: int = 8
    """Heads pruned in the generalisation matrix."""
    sweep_fractions: list[float] = field(default_factory=lambda: [0.002, 0.01, 0.03])
    """Budget sweep on the localisation context: fractions of all neurons / heads pruned."""
    regimes: list[str] = field(default_factory=lambda: ["prompt", "leave_one_out", "cross_context"])
    """Regimes of the generalisation study (empty, with no sweep_fractions: no generalisation stage)."""
    ablation: str = "zero"
    """How pruned neurons are removed: 'zero' (mean ablation is available in workbench.prune.plan and the
    localisation methods, not in the generalisation study)."""
    head_ablation: str = "zero"
    """Removal of heads: 'zero' (output) or 'query_zero' (the paper's uniform attention)."""
    neuron_rule: str = "rank"
    """Neurons for several source variations: 'rank' (the k best by rank aggregation: every regime prunes k) or
    'intersection' (the paper: the intersection of their top-k lists, often fewer than k)."""
    random_draws: int = 19
    """Random controls: draws of k random components per kind and budget, measured on the same names next to every
    reduction; the rank test (better_than_random) needs at least 19 (its smallest p-value is 1 / (1 + draws)), and
    Holm over m cells needs about m / alpha - 1 to be able to say yes anywhere."""
    held_out: bool = True
    """Cross-fit over names: components chosen on one half of each group's names, every reduction measured on
    the other half (pooled over the two folds); false chooses and measures on the same names (in-sample)."""
    gate: str = "selection"
    """Which contexts are pruned: 'selection' (those whose bias is significant on the fold's selection half, the
    confirmatory design) or 'none' (every context, exploratory: the report says that no gate was applied)."""


@dataclass
class CrossTypeSettings:
    bias_types: list[str] = field(default_factory=list)
    """Bias types to localise and prune for, each pruning measured on every one of them: the cross-type matrix
    (contrast names of workbench.audit.bias_types: 'race', 'gender', 'white_men_minus_white_women',
    'white_men_minus_black_men', 'white_men_minus_black_women', 'rest_minus_black_women'); empty: no cross-type stage.
    Budgets, random draws, held-out names and ablation are [generalize]'s."""
    context: str = "purchase"
    """The audited context whose variations the components are chosen on and every bias is measured on."""


@dataclass
class DirectionsSettings:
    edits: list[str] = field(default_factory=list)
    """Direction edits to set beside pruning, "<intervention>:<method>" (workbench.prune.directions): interventions
    'ace', 'projection', 'steering'; fit methods 'mean_difference', 'probe', 'leace' (ace only); fitted on the
    fold's selection names of the source prompts (cross-fitted like pruning), or with "@synthetic" on Karvonen &
    Marks' synthetic set (names the study does not use, in neutral templates: one edit for every source);
    empty: no direction stage."""
    layers: list[int] = field(default_factory=list)
    """Layers whose residual stream is edited (every position but the attention sink); empty: every layer."""
    fit_position: str = "answer"
    """Where the direction is fitted: 'answer' (the prompt's last token) or 'name' (the mean over the name's tokens)."""
    steering_scale: float = -1.0
    """Steering edits add this multiple of the White-minus-Black mean difference (negative: toward the Black mean)."""
    regimes: list[str] = field(default_factory=lambda: ["prompt", "leave_one_out", "cross_context"])
    """Regimes the edits (and, for cross_context, the prunings too) are evaluated in."""
    random_draws: int = 4
    """Random edits of the same form, layers and rank per control kind, on every context (as [generalize])."""
    synthetic_names_per_group: int = 16
    """Synthetic fit: this many name-bank names of each group that the study does not use."""
    synthetic_templates: list[str] = field(default_factory=lambda: [
        "My name is {name}.", "{name} walked into the room.", "This is {name}'s desk.",
        "Yesterday I met {name} at the station.", "{name} wrote the report."])
    """Synthetic fit: neutral sentences with a {name} placeholder."""
    capability_items_per_task: int = 8
    """Anomaly panel: items per task of the generated capability suite (workbench.prune.capability)."""


@dataclass
class SpikeInSettings:
    components: str = ""
    """A positive control: components to plant a race bias of known size through before the study runs, written as
    in the report ("L14H3", "L14N100", a range "L14N0-63", comma-separated; workbench.spike_in); empty: no plant."""
    kind: str = ""
    """'neuron', 'head' or 'distributed' (a neuron plant spread over many neurons); empty: 'head' for heads,
    'neuron' for one neuron, 'distributed' for several."""
    target_smd: float = 0.4
    """The planted bias: signed mixture SMD of the leaf metric's answers (log scale), spiked minus unspiked, on the
    feature names (those after the study's names_per_group of each group), which the calibration reaches."""
    contexts: list[str] = field(default_factory=list)
    """Audited contexts whose feature prompts estimate and calibrate the plant and whose held-out names measure its
    recovery (tables/spike_in.parquet); empty: the localisation context. The plant is a weight edit and acts in
    every context."""


@dataclass
class StudyConfig:
    model: str = "smollm2-135m-instruct"
    """Bundled model name, local HF directory or hub name."""
    seed: int = 0
    """Seed of every random choice (bootstrap, sampling)."""
    device: str = "auto"
    """Where the model runs: 'auto' (CUDA when available, else the CPU), 'cpu', 'cuda' or 'cuda:N'."""
    dtype: str = "auto"
    """Model weights and activations: 'auto' (float32 on a CPU, bfloat16 on CUDA), 'float32' or 'bfloat16'."""
    backend: str = "bridge"
    """What runs the model: 'bridge' (a TransformerLens TransformerBridge) or 'nnsight' (nnsight's traces on the
    same HF model, locally or on NDIF: `workbench.nnsight_backend`)."""
    remote: bool | str = False
    """nnsight only: false runs here, true on NDIF (the model is NDIF's copy of the hub name in `model`), 'local'
    sends every trace through NDIF's serialisation and runs it here (the remote code path without a server)."""
    device_map: str | dict[str, str] = ""
    """Placement of the model's layers over devices (accelerate's big-model placement): '' (all on `device`), a
    preset ('auto', 'balanced', 'balanced_low_0', 'sequential') or a table of module name -> device ('cpu',
    'cuda:N', 'disk')."""
    readout: ExactReadoutConfig = field(default_factory=ExactReadoutConfig)
    """The exact read-out: the sampler whose limit is measured and the tree's settings (workbench.readout.engine)."""
    prompts: PromptsSettings = field(default_factory=PromptsSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    localize: LocalizeSettings = field(default_factory=LocalizeSettings)
    generalize: GeneralizeSettings = field(default_factory=GeneralizeSettings)
    cross_type: CrossTypeSettings = field(default_factory=CrossTypeSettings)
    spike_in: SpikeInSettings = field(default_factory=SpikeInSettings)
    directions: DirectionsSettings = field(default_factory=DirectionsSettings)


def load_config(path: str | Path | None) -> StudyConfig:
    """The default config, updated with a TOML file's values (validated)."""
    if path is None:
        return StudyConfig()
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as error:
        raise ConfigError(f"{path}: config file not found") from error
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: malformed TOML: {error}") from error
    config = _build(StudyConfig, data, f"{path}")
    validate(config, str(path))
    return config


DTYPES = {"auto", "float32", "bfloat16"}
BACKENDS = {"bridge", "nnsight"}
DEVICE_MAP_PRESETS = {"", "auto", "balanced", "balanced_low_0", "sequential"}
CHOICES = {
    ("audit", "scale"): set(SCALES),
    ("audit", "method"): set(METHODS),
    ("localize", "methods"): set(get_args(LocalizeMethod)),
    ("generalize", "regimes"): set(get_args(Regime)),
    ("generalize", "ablation"): {"zero"},  # of components.AblationMode, what the generalisation study supports
    ("generalize", "head_ablation"): {"zero", "query_zero"},
    ("generalize", "neuron_rule"): set(get_args(NeuronRule)),
    ("generalize", "gate"): {"selection", "none"},
    ("audit", "correction"): set(CORRECTIONS),
    ("audit", "bias_types"): set(BIAS_TYPES),
    ("audit", "names"): set(NAME_SOURCES),
    ("cross_type", "bias_types"): {contrast.name for contrast in CONTRASTS},
    ("spike_in", "kind"): {"", "neuron", "head", "distributed"},
    ("directions", "edits"): {f"{edit}{fit}" for edit in {f"{i}:{m}" for i in ("ace", "projection", "steering")
                                                           for m in ("mean_difference", "probe")} | {"ace:leace"}
                              for fit in ("", "@synthetic")},
    ("directions", "fit_position"): {"answer", "name"},
    ("directions", "regimes"): set(get_args(Regime)),
}
MAY_BE_EMPTY = {("generalize", "regimes"), ("cross_type", "bias_types"), ("directions", "edits")}
RANGES = {  # inclusive bounds
    ("readout", "temperature"): (0.0, 100.0),
    ("readout", "top_p"): (1e-6, 1.0),
    ("readout", "top_k"): (0, 1_000_000),
    ("readout", "max_decimals"): (0, 16),
    ("readout", "value_tolerance"): (0.0, 0.1),
    ("readout", "seed"): (0, 2**63 - 1),
    ("audit", "min_valid_mass"): (0.0, 1.0),
    ("readout", "threshold"): (1e-9, 1.0),
    ("readout", "max_branches"): (1, 10_000),
    ("readout", "max_completions"): (0, 10_000),
    ("readout", "completion_mass"): (0.0, 1.0),
    ("readout", "max_tokens"): (1, 64),
    ("readout", "batch_size"): (1, 4096),
    ("audit", "n_boot"): (1, 1_000_000),
    ("audit", "n_perm"): (1, 1_000_000),
    ("audit", "alpha"): (1e-6, 0.5),
    ("localize", "n_leaves"): (1, 1000),
    ("localize", "patch_top_neurons"): (1, 1_000_000),
    ("localize", "patch_pairs"): (1, 10_000),
    ("localize", "calibration_random_neurons"): (0, 1_000_000),
    ("localize", "wanda_tau_black"): (0.0, 1.0),
    ("localize", "wanda_tau_white"): (0.0, 1.0),
    ("generalize", "neuron_budget"): (1, 1_000_000),
    ("generalize", "head_budget"): (1, 100_000),
    ("generalize", "sweep_fractions"): (1e-9, 1.0),
    ("generalize", "random_draws"): (0, 1000),
    ("spike_in", "target_smd"): (1e-6, 10.0),
    ("directions", "random_draws"): (0, 1000),
    ("directions", "layers"): (0, 10_000),
    ("directions", "synthetic_names_per_group"): (1, 10_000),
    ("directions", "capability_items_per_task"): (1, 1000),
}


def narrow_contexts(config: StudyConfig, contexts: list[str]) -> None:
    """Audit only `contexts` (the command line's --contexts) and narrow what is keyed by context to match: the
    variations table and the spike-in's contexts keep their entries for these contexts; the localisation and
    cross-type contexts, when not among them, move to the first one."""
    config.audit.contexts = list(contexts)
    config.audit.variations = {c: v for c, v in config.audit.variations.items() if c in contexts}
    config.spike_in.contexts = [c for c in config.spike_in.contexts if c in contexts]
    if contexts and config.localize.context not in contexts:
        config.localize.context = contexts[0]
    if contexts and config.cross_type.context not in contexts:
        config.cross_type.context = contexts[0]


def validate(config: StudyConfig, where: str = "config") -> None:
    """Check every value against its allowed choices or range (ConfigError naming the field)."""
    if config.dtype not in DTYPES:
        raise ConfigError(f"{where}: field 'dtype' has {config.dtype!r}; allowed: {sorted(DTYPES)}")
    if config.backend not in BACKENDS:
        raise ConfigError(f"{where}: field 'backend' has {config.backend!r}; allowed: {sorted(BACKENDS)}")
    if config.remote not in (False, True, "local"):
        raise ConfigError(f"{where}: field 'remote' has {config.remote!r}; allowed: false, true, 'local'")
    if config.remote and config.backend != "nnsight":
        raise ConfigError(f"{where}: field 'remote' = {config.remote!r} needs backend = 'nnsight' "
                          "(the bridge runs here)")
    if isinstance(config.device_map, str) and config.device_map not in DEVICE_MAP_PRESETS:
        raise ConfigError(f"{where}: field 'device_map' has {config.device_map!r}; allowed: a table of module -> "
                          f"device, or one of {sorted(DEVICE_MAP_PRESETS)}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", config.device):
        raise ConfigError(f"{where}: field 'device' has {config.device!r}; allowed: 'auto', 'cpu', 'cuda', 'cuda:N'")
    for (table, key), allowed in CHOICES.items():
        value = getattr(getattr(config, table), key)
        values = value if isinstance(value, list) else [value]
        bad = [v for v in values if v not in allowed]
        if bad or not (values or (table, key) in MAY_BE_EMPTY):
            raise ConfigError(f"{where} [{table}]: field '{key}' has {bad or 'no value'}; allowed: {sorted(allowed)}")
    for (table, key), (low, high) in RANGES.items():
        value = getattr(getattr(config, table), key)
        for v in value if isinstance(value, list) else [value]:
            if not low <= v <= high:
                raise ConfigError(f"{where} [{table}]: field '{key}' = {v} is outside [{low}, {high}]")
    if not config.audit.contexts:
        raise ConfigError(f"{where} [audit]: field 'contexts' is empty")
    if config.prompts.folder and not Path(config.prompts.folder).is_dir():
        raise ConfigError(f"{where} [prompts]: field 'folder': no folder {config.prompts.folder!r}")
    try:
        known = known_contexts(config.prompts.folder or None)
    except PromptDataError as error:
        raise ConfigError(f"{where} [prompts]: {error}") from error
    try:
        most = max_names_per_group(config.prompts.folder or None, config.audit.names)
    except PromptDataError as error:
        raise ConfigError(f"{where} [prompts]: {error}") from error
    if not 1 <= config.audit.names_per_group <= most:
        raise ConfigError(f"{where} [audit]: field 'names_per_group' = {config.audit.names_per_group} is outside "
                          f"[1, {most}] (names = {config.audit.names!r} has {most} names per group)")
    if not 0 <= config.audit.names_offset <= most - config.audit.names_per_group:
        raise ConfigError(f"{where} [audit]: field 'names_offset' = {config.audit.names_offset} is outside "
                          f"[0, {most - config.audit.names_per_group}] (names = {config.audit.names!r} has {most} "
                          f"names per group and names_per_group is {config.audit.names_per_group})")
    unknown = [c for c in config.audit.contexts if c not in known]
    if unknown:
        raise ConfigError(f"{where} [audit]: field 'contexts': unknown context {unknown[0]!r}; known: {list(known)}")
    if config.audit.prompts_csv and not Path(config.audit.prompts_csv).is_file():
        raise ConfigError(f"{where} [audit]: field 'prompts_csv': no file {config.audit.prompts_csv!r}")
    extra = sorted(set(config.audit.variations) - set(config.audit.contexts))
    if extra:
        raise ConfigError(f"{where} [audit]: field 'variations' names context(s) {extra} not in 'contexts'")
    if config.cross_type.bias_types and config.cross_type.context not in config.audit.contexts:
        raise ConfigError(f"{where} [cross_type]: field 'context' = {config.cross_type.context!r} is not among the "
                          f"audited contexts {config.audit.contexts}")
    audited = {contrast.name for contrast in contrasts_for(config.audit.bias_types)}
    if missing := [t for t in config.cross_type.bias_types if t not in audited]:
        raise ConfigError(f"{where} [cross_type]: field 'bias_types' has {missing}, which [audit] bias_types "
                          f"{config.audit.bias_types} does not audit")
    if len(set(config.cross_type.bias_types)) != len(config.cross_type.bias_types):
        raise ConfigError(f"{where} [cross_type]: field 'bias_types' repeats a bias type")
    if config.spike_in.components:
        _validate_spike_in(config, where)


def _validate_spike_in(config: StudyConfig, where: str) -> None:
    from workbench.spike_in import PlantSpec

    spike = config.spike_in
    try:
        PlantSpec.parse(spike.components, spike.target_smd, spike.kind or None)
    except ConfigError as error:
        raise ConfigError(f"{where} [spike_in]: field 'components' = {spike.components!r}: {error}") from error
    if outside := [c for c in spike.contexts if c not in config.audit.contexts]:
        raise ConfigError(f"{where} [spike_in]: field 'contexts' has {outside}, not among the audited contexts "
                          f"{config.audit.contexts}")
    if not spike.contexts and config.localize.context not in config.audit.contexts:
        raise ConfigError(f"{where} [spike_in]: field 'contexts' is empty and the localisation context "
                          f"{config.localize.context!r} is not audited")
    try:
        feature_names(config)
    except ConfigError as error:
        raise ConfigError(f"{where} [spike_in]: the plant reads its feature from names the study does not use: "
                          f"{error}; lower [audit] names_per_group") from error


def study_names(config: StudyConfig) -> list[str]:
    """The study's first names: names_per_group of each group after its first names_offset, from the config's
    names source."""
    a = config.audit
    return names_subset(a.names_per_group, config.prompts.folder or None, a.names, a.names_offset)


def feature_names(config: StudyConfig) -> list[str]:
    """The spike-in plant's feature names: those after the study's names of each group, from the same source."""
    a = config.audit
    return names_beyond(a.names_offset + a.names_per_group, config.prompts.folder or None, a.names)


def _build(cls, data: dict, where: str):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    values = {}
    for key, value in data.items():
        hint = hints[key]
        location = f"{where}: field '{key}'"
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{location} must be a table [{key}]")
            values[key] = _build(hint, value, f"{where} [{key}]")
        else:
            values[key] = _check_type(value, hint, location)
    return cls(**values)


def _check_type(value, hint, location: str):
    origin = typing.get_origin(hint)
    if origin is types.UnionType:
        for option in typing.get_args(hint):
            try:
                return _check_type(value, option, location)
            except ConfigError:
                continue
        allowed = " or ".join(getattr(option, "__name__", str(option)) for option in typing.get_args(hint))
        raise ConfigError(f"{location} must be {allowed}, got {type(value).__name__} {value!r}")
    if origin is dict:
        key_type, value_type = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{location} must be a table of {key_type.__name__} -> list, got {value!r}")
        return {k: _check_type(v, value_type, f"{location}.{k}") for k, v in value.items()}
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{location} must be a list of {item_type.__name__}, got {value!r}")
        return [_check_type(v, item_type, location) for v in value]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{location} must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def to_dict(config: StudyConfig) -> dict:
    return dataclasses.asdict(config)
