"""The study's stages as functions over a config and a run directory (cached by input hash, resumable).

audit (with permutation p-values) -> attribution -> localise -> attribution on each fold's half of the names
-> generalise (prune on one half, measure on the other, next to random controls, for the significantly biased
contexts) -> report. Each stage writes its tables (parquet), scores (safetensors + JSON) and figures (HTML, PNG
where a browser exists) into the run directory.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import cached_property
from importlib import metadata
from pathlib import Path

import pandas as pd
import torch

from workbench.audit.bias_types import bias_type_table, contrasts_for, lowest_group_table
from workbench.audit.stats import BIAS_COLUMNS, SUMMARY_COLUMNS, group_means, mass_table, significance_table
from workbench.audit.table import run_audit
from workbench.components import KINDS
from workbench.config import ConfigError, StudyConfig, feature_names, load_config, narrow_contexts, study_names, to_dict
from workbench.loaded import cpu_kernels, model_info
from workbench.models import load_model
from workbench.pipeline.runstore import RunDir
from workbench.readout.engine import ExactReadoutConfig, SamplingConfig
from workbench.readout.prompts import PromptSet, name_probabilities

__all__ = ["RunDir", "run_study"]

ANSWER_TABLE_FORMAT = 6
"""Version of the columns of the audit's tables (answers and the tables derived from them): bump it when they
change, so cached audits are recomputed (5: answers outside their type's range count as invalid mass; 6: the
lowest group is "tie" where groups share the lowest mean)."""
AUDIT_TABLES = [f"tables/{name}.parquet" for name in ("bias", "context_summary", "significance",
                                                      "context_significance", "group_means", "mass", "bias_types",
                                                      "bias_type_contexts", "lowest_group")]


@dataclass(frozen=True)
class Audit:
    """The audit stage's results that later stages read: every prompt's answers, each context's significance
    and each bias type's significance per context."""

    answers: pd.DataFrame
    context_significance: pd.DataFrame
    bias_type_contexts: pd.DataFrame

    @cached_property
    def distributions(self) -> dict:
        """The answer distributions keyed by (context, variation, name)."""
        return audit_distributions(self.answers)


@contextmanager
def timed(timings: dict[str, float], step: str) -> Iterator[None]:
    """Record the wall time of the block as timings[step]."""
    clock = time.perf_counter()
    yield
    timings[step] = time.perf_counter() - clock


def config_from_args(args) -> StudyConfig:
    """The config file's values, with the command line's overrides."""
    config = load_config(getattr(args, "config", None))
    if getattr(args, "model", None):
        config.model = args.model
    if getattr(args, "backend", None):
        config.backend = args.backend
    if getattr(args, "contexts", None):
        narrow_contexts(config, args.contexts)
    if getattr(args, "names_per_group", None) is not None:
        if args.names_per_group < 1:
            raise ConfigError(f"--names-per-group (names_per_group) must be at least 1, got {args.names_per_group}")
        config.audit.names_per_group = args.names_per_group
    if getattr(args, "methods", None):
        config.localize.methods = list(args.methods)
    if getattr(args, "plant", None):
        config.spike_in.components = args.plant
    if getattr(args, "target_smd", None) is not None:
        config.spike_in.target_smd = args.target_smd
    return config


def load_bridge(config: StudyConfig):
    """The config's model on its backend, device (or device map) and dtype ('auto': CUDA in bfloat16 when
    available, else CPU float32)."""
    device = None if config.device == "auto" else config.device
    dtype = None if config.dtype == "auto" else getattr(torch, config.dtype)
    return load_model(config.model, device=device, dtype=dtype, backend=config.backend, remote=config.remote,
                      device_map=config.device_map)


def audit_prompts(config: StudyConfig, prompts_csv: str | None = None) -> PromptSet:
    """The audited prompts: the CSV table given (else the config's prompts_csv), or the config's contexts x
    variations x names."""
    prompts_csv = prompts_csv or config.audit.prompts_csv
    folder = config.prompts.folder or None
    if prompts_csv:
        return PromptSet.from_audit_csv(prompts_csv, folder)
    return PromptSet.build(
        config.audit.contexts,
        names=study_names(config),
        variations=config.audit.variations or None,
        instruction_suffix=config.audit.instruction_suffix,
        folder=folder,
    )


def exact_settings(config: StudyConfig) -> ExactReadoutConfig:
    """The study's read-out settings, its sampled completions seeded by the study's seed."""
    return dataclasses.replace(config.readout, seed=config.seed)


def model_identity(bridge) -> dict:
    """The model's name and weight hash (and the edits in force, such as a spike-in plant), the key of every
    cached stage."""
    info = model_info(bridge)
    identity = {"model": info.name, "weight_hash": info.weight_hash}
    return identity | ({"edits": info.edits} if info.edits else {})


def _prompt_key(prompts: PromptSet) -> list[str]:
    return [f"{p.context}|{p.variation}|{p.name}|{p.text}|{p.answer_prefix}" for p in prompts]


def audit_stage(run: RunDir, config: StudyConfig, bridge, prompts: PromptSet, readout: str = "exact",
                n_samples: int = 100) -> Audit:
    """Answers of every prompt (the "readout" stage, cached by the model, prompts and read-out settings only), then
    the bias tables with their significance and the answer mass (the "audit" stage, cached by the statistics'
    options too): changing a test's options recomputes the statistics, not the model's read-out."""
    r = config.readout
    sampling = SamplingConfig(n_samples=n_samples, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                              seed=config.seed)
    readout_inputs = {"table_format": ANSWER_TABLE_FORMAT, "model": model_identity(bridge),
                      "prompts": _prompt_key(prompts), "readout": readout,
                      "exact": dataclasses.asdict(exact_settings(config)), "sampling": dataclasses.asdict(sampling),
                      "system_prompt": config.audit.system_prompt, "names": config.audit.names,
                      "prompts_folder": config.prompts.folder}

    def read_out() -> None:
        started = time.perf_counter()
        answers = run_audit(bridge, prompts, readout=readout, exact=exact_settings(config), sampling=sampling,
                            system_prompt=config.audit.system_prompt or None)
        run.write_json("readout_timing.json", {"seconds": time.perf_counter() - started, "prompts": len(prompts)})
        run.write_table("tables/answers.parquet", with_name_probabilities(answers, config))

    def statistics() -> None:
        answers = run.read_table("tables/answers.parquet")
        write_bias_tables(run, config, answers)
        summary = run.read_table("tables/context_summary.parquet")
        run.write_json("audit_summary.json", {"seconds": run.read_json("readout_timing.json")["seconds"],
                                              "prompts": len(prompts), "readout": readout,
                                              "mean_valid_mass": float(answers.valid_mass.mean()),
                                              "mean_unexplored_mass": float(answers.unexplored_mass.mean()),
                                              "mass_by_race": mass_by_race(answers, config.audit.min_valid_mass),
                                              "mean_abs_smd": summary.to_dict(orient="records")})

    run.cached("readout", readout_inputs, ["tables/answers.parquet", "readout_timing.json"], read_out)
    run.cached("audit", {"stats": dataclasses.asdict(config.audit)}, [*AUDIT_TABLES, "audit_summary.json"],
               statistics, after=("readout",))
    return Audit(*(run.read_table(f"tables/{name}.parquet")
                   for name in ("answers", "context_significance", "bias_type_contexts")))


def stats_options(config: StudyConfig) -> dict:
    """The options every bias statistic of the study is computed with."""
    a = config.audit
    return dict(scale=a.scale, method=a.method, n_boot=a.n_boot, seed=config.seed, min_valid_mass=a.min_valid_mass)


def write_bias_tables(run: RunDir, config: StudyConfig, answers: pd.DataFrame) -> None:
    """The bias per variation and per context with permutation p-values (adjusted as configured), the group
    means and the answer mass; the same statistics for the configured bias types, and the lowest group."""
    a = config.audit
    options = stats_options(config)
    tests = dict(n_perm=a.n_perm, alpha=a.alpha, correction=a.correction)
    significance = significance_table(answers, **tests, **options)
    run.write_table("tables/bias.parquet", significance.variations[BIAS_COLUMNS])
    run.write_table("tables/context_summary.parquet", significance.contexts[SUMMARY_COLUMNS])
    run.write_table("tables/significance.parquet", significance.variations)
    run.write_table("tables/context_significance.parquet", with_held_out_bias(significance.contexts, answers, config))
    run.write_table("tables/group_means.parquet", group_means(answers, scale=a.scale, n_boot=a.n_boot,
                                                              seed=config.seed, min_valid_mass=a.min_valid_mass))
    run.write_table("tables/mass.parquet", mass_table(answers))
    bias_types = bias_type_table(answers, contrasts_for(a.bias_types), **tests, **options)
    run.write_table("tables/bias_types.parquet", bias_types.variations)
    run.write_table("tables/bias_type_contexts.parquet", bias_types.contexts)
    run.write_table("tables/lowest_group.parquet", lowest_group_table(answers, **tests, **options))


def with_name_probabilities(answers: pd.DataFrame, config: StudyConfig) -> pd.DataFrame:
    """The answer table with each name's probabilities from the name bank's source data (NAME_PROBABILITY_COLUMNS
    of workbench.readout.prompts; NaN where that data lacks the name, as for names of a prompts CSV)."""
    table = name_probabilities(config.audit.names, config.prompts.folder or None)
    return answers.merge(table, on=["name", "group"], how="left", validate="many_to_one")


def with_held_out_bias(contexts: pd.DataFrame, answers: pd.DataFrame, config: StudyConfig) -> pd.DataFrame:
    """The context table with each context's held-out signed bias: the names halved as the pruning study halves
    them (`name_folds`), each half's SMDs taken in the direction the other half's names give and averaged over the
    variations and halves (signed_bias, with an interval valid at 0: benchmarks/coverage.py). NaN where a group
    has fewer than 2 names."""
    from workbench.audit.stats import bias_directions, signed_reduction
    from workbench.prune.generalize import name_halves

    a = config.audit
    try:
        groups = answers.assign(group=answers.race + "_" + answers.gender).groupby("group").name.unique()
        halves = name_halves({group: list(names) for group, names in groups.items()}, config.seed)
    except ConfigError:
        return contexts.assign(signed_bias=float("nan"), signed_ci_low=float("nan"), signed_ci_high=float("nan"))
    fold_of = {name: fold for fold, half in enumerate(halves[::-1]) for name in half}  # fold f evaluates half 1 - f
    directions = pd.concat([bias_directions(answers[answers.name.isin(half)], a.scale, a.method, a.min_valid_mass)
                            .assign(fold=fold) for fold, half in enumerate(halves)], ignore_index=True)
    held_out = signed_reduction(answers, answers.assign(fold=answers.name.map(fold_of)), directions,
                                **stats_options(config))
    columns = {"bias_before": "signed_bias", "bias_ci_low": "signed_ci_low", "bias_ci_high": "signed_ci_high"}
    return contexts.merge(held_out[["context", *columns]].rename(columns=columns), on="context", how="left")


def mass_by_race(answers: pd.DataFrame, min_valid_mass: float) -> dict:
    """Per race: mean valid, invalid and unexplored answer mass, and the prompts below the valid-mass rule."""
    table = answers.assign(below_min_valid_mass=answers.valid_mass < min_valid_mass).groupby("race").agg(
        valid_mass=("valid_mass", "mean"), invalid_mass=("invalid_mass", "mean"),
        unexplored_mass=("unexplored_mass", "mean"), below_min_valid_mass=("below_min_valid_mass", "sum"),
        prompts=("name", "size"))
    return {race: {k: int(v) if k in ("below_min_valid_mass", "prompts") else float(v) for k, v in row.items()}
            for race, row in table.to_dict(orient="index").items()}


def audit_figures(run: RunDir) -> list[dict]:
    """The audit's plotly figures (self-contained HTML, PNG where a browser exists) in <run>/figures."""
    from workbench.pipeline import plots
    from workbench.pipeline.report import save_figures

    figures = {"audit_smd": plots.smd_figure(run.read_table("tables/bias.parquet")),
               "audit_group_means": plots.group_means_figure(run.read_table("tables/group_means.parquet"))}
    return list(save_figures(figures, run.path("figures")).values())


def audit_summary_text(run: RunDir) -> str:
    """The audit's headline tables as plain text."""
    bias = run.read_table("tables/significance.parquet")
    summary = run.read_table("tables/context_significance.parquet")
    columns = ["context", "variation", "smd", "ci_low", "ci_high", "p_adjusted", "significant", "mean_white",
               "mean_black", "n_invalid"]
    context_columns = ["context", "mean_abs_smd", "ci_low", "ci_high", "null_mean", "null_q95", "p_adjusted",
                       "significant"]
    return (bias[columns].round(3).to_string(index=False) + "\n\n"
            + summary[context_columns].round(3).to_string(index=False)
            + f"\n\np_adjusted: permutation p-values, {'/'.join(bias.correction.unique())}-adjusted")


def manifest(config: StudyConfig, bridge, timings: dict) -> dict:
    packages = ["torch", "transformers", "transformer-lens", "nnsight", "numpy", "pandas", "biasprune-workbench"]
    return {
        "config": to_dict(config),
        "model": model_identity(bridge),
        "backend": backend_record(config, bridge),
        "versions": {p: _version(p) for p in packages},
        "python": platform.python_version(),
        "device": str(next(bridge.parameters()).device),
        "threads": torch.get_num_threads(),
        "cpu_kernels": cpu_kernels(),
        "seed": config.seed,
        "timings_s": timings,
        "peak_memory_gib": peak_memory_gib(),
    }


def backend_record(config: StudyConfig, bridge) -> dict:
    """What ran the model: the backend, where (remote or not, the layers' devices) and, on NDIF, nnsight's
    comparison of the local and the server's packages (`nnsight.compare()`)."""
    devices = sorted({str(p.device) for p in bridge.parameters()})
    record = {"name": model_info(bridge).backend, "remote": config.remote, "device_map": config.device_map,
              "parameter_devices": devices}
    if config.remote is True:
        import nnsight

        try:
            comparison = nnsight.compare()
            record["ndif_versions"] = {"python_matches": comparison.python_matches,
                                       "mismatches": comparison.mismatches,
                                       "critical_mismatches": comparison.critical_mismatches}
        except Exception as error:  # the comparison asks NDIF: its failure is recorded, not fatal
            record["ndif_versions"] = {"error": f"{type(error).__name__}: {error}"}
    return record


def peak_memory_gib() -> dict[str, float]:
    """This process's peak resident memory and, on CUDA, the peak memory torch allocated on the GPU (GiB)."""
    peak = {"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # ru_maxrss is in KiB on Linux
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["cuda"] = torch.cuda.max_memory_allocated() / 2**30
    return {key: round(value, 2) for key, value in peak.items()}


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def write_config(run: RunDir, config: StudyConfig) -> None:
    run.write_text("config.json", json.dumps(to_dict(config), indent=2))


# ---------------------------------------------------------------- localisation


NAME_PARTS = ("mlp_neuron_name", "attn_head_name")
"""The attribution stage's part of each kind's scores from the name's columns (the rest: after the name)."""
ATTRIBUTION_ON_NAME = ("attribution_neurons_name", "attribution_heads_name")
"""The localisation stage's files (under scores/) of those parts, averaged over the localisation context."""


def _file_name(text: str) -> str:
    """A context or variation as a file name: letters and digits kept, anything else "_"."""
    return "".join(ch if ch.isalnum() else "_" for ch in text)


def _variation_stem(context: str, variation: str, kind: str, root: str = "scores") -> str:
    return f"{root}/variations/{_file_name(context)}/{_file_name(variation)}_{kind}"


def attribution_stage(run: RunDir, config: StudyConfig, bridge, prompts: PromptSet, audit: Audit) -> dict:
    """Attribution patching of every neuron and head on each variation's pairs (cached): scores by (context,
    variation) and kind."""
    from workbench.prune import generalize

    units = [(c, v) for c in prompts.contexts() for v in prompts.variations(c)]
    inputs_key = {"model": model_identity(bridge), "prompts": _prompt_key(prompts),
                  "n_leaves": config.localize.n_leaves, "readout": dataclasses.asdict(config.readout)}
    outputs = [f"{_variation_stem(c, v, k)}.json" for c, v in units for k in (*KINDS, *NAME_PARTS)]
    outputs.append("attribution_timings.json")

    def compute() -> None:
        clock = time.perf_counter()
        scores = generalize.variation_scores(bridge, prompts, config.localize.n_leaves, exact_settings(config),
                                             distributions=audit.distributions, name_span=True)
        for (context, variation), by_kind in scores.items():
            for kind, value in by_kind.items():
                value.save(run.path(_variation_stem(context, variation, kind)))
        run.write_json("attribution_timings.json", {"seconds": time.perf_counter() - clock, "units": len(units)})

    run.cached("attribution", inputs_key, outputs, compute, after=("readout",))
    return load_variation_scores(run, prompts)


def load_variation_scores(run: RunDir, prompts: PromptSet, root: str = "scores", kinds: tuple = KINDS) -> dict:
    from workbench.localize.scores import ComponentScores

    return {(c, v): {k: ComponentScores.load(run.path(_variation_stem(c, v, k, root))) for k in kinds}
            for c in prompts.contexts() for v in prompts.variations(c)}


def held_out_folds(config: StudyConfig, prompts: PromptSet) -> list | None:
    """The (selection, evaluation) halves of the names (seeded by the study), or None for in-sample pruning."""
    from workbench.prune.generalize import name_folds

    if not config.generalize.held_out:
        return None
    try:
        return name_folds(prompts, config.seed)
    except ValueError as error:
        raise ConfigError(f"[generalize] held_out: {error}; use names_per_group >= 2 or held_out = false") from error


def fold_attribution_stage(run: RunDir, config: StudyConfig, bridge, prompts: PromptSet,
                           audit: Audit) -> list[dict] | None:
    """Attribution per variation on each fold's selection half of the names only, oriented by the direction of
    each variation's bias on that half (`selection_directions`; cached); None without folds."""
    from workbench.prune import generalize

    folds = held_out_folds(config, prompts)
    if folds is None:
        return None
    roots = [f"scores/folds/{fold}" for fold in range(len(folds))]
    units = [(c, v) for c in prompts.contexts() for v in prompts.variations(c)]
    inputs_key = {"model": model_identity(bridge), "selections": [_prompt_key(s) for s, _ in folds],
                  "n_leaves": config.localize.n_leaves, "readout": dataclasses.asdict(exact_settings(config)),
                  "oriented_by": "selection directions",
                  "directions": {k: getattr(config.audit, k) for k in ("scale", "method", "min_valid_mass")}}
    outputs = [f"{_variation_stem(c, v, k, root)}.json" for root in roots for c, v in units for k in KINDS]

    def compute() -> None:
        directions = selection_directions(config, audit.answers, folds)
        for fold, (root, (selection, _)) in enumerate(zip(roots, folds)):
            scores = generalize.variation_scores(bridge, selection, config.localize.n_leaves, exact_settings(config),
                                                 distributions=audit.distributions,
                                                 directions=directions[directions.fold == fold])
            for (context, variation), by_kind in scores.items():
                for kind, value in by_kind.items():
                    value.save(run.path(_variation_stem(context, variation, kind, root)))

    run.cached("attribution_folds", inputs_key, outputs, compute, after=("audit",))
    return [load_variation_scores(run, prompts, root) for root in roots]


def context_attribution(attribution: dict, context: str, kind: str):
    """Attribution over all of a context's pairs: the mean of its variations' scores (equal pairs each)."""
    from workbench.localize.scores import ComponentScores
    from workbench.prune.generalize import context_mean

    scored = [by_kind[kind] for (c, _), by_kind in attribution.items() if c == context]
    if not scored:
        raise ConfigError(f"no attribution scores for context {context!r}: is it among the audited contexts?")
    variations = [s.metadata for s in scored]
    metadata = {"context": context, "variations": len(variations),
                "pairs": sum(m["pairs"] for m in variations),
                "mean_gap": sum(m["mean_gap"] for m in variations) / len(variations),
                **{key: variations[0][key] for key in ("bias_type", "spans", "units")}}
    return ComponentScores("attribution", scored[0].kind, context_mean(attribution, context, kind), metadata)


def localize_prompts(config: StudyConfig) -> PromptSet:
    folder = config.prompts.folder or None
    return PromptSet.build([config.localize.context], names=study_names(config),
                           variations=config.audit.variations or None,
                           instruction_suffix=config.audit.instruction_suffix, folder=folder)


def audit_distributions(answers: pd.DataFrame) -> dict:
    """The audit's answer distributions keyed by (context, variation, name)."""
    from workbench.audit.table import distributions_from_frame

    keys = zip(answers.context, answers.variation, answers.name)
    return dict(zip(keys, distributions_from_frame(answers)))


LOCALIZE_OUTPUTS = {
    "attribution": ["attribution_neurons", "attribution_heads"],
    "patching": ["patching_neurons", "patching_heads"],
    "ablation": ["ablation_neurons", "ablation_heads"],
    "heads": ["head_attention"],
    "wanda": ["wanda_selection"],
}
"""The score files (under scores/) each localisation method writes."""


def localize_stage(run: RunDir, config: StudyConfig, bridge, audit: Audit, attribution: dict) -> dict:
    """Score every neuron and head with each method on the localisation context; save scores and agreement.

    `attribution`: the attribution stage's scores by (context, variation) and kind, averaged here over the
    context's variations; patching and ablation re-score the top neurons and every head on a few pairs."""
    from workbench.localize import pairs

    settings = config.localize
    prompts = localize_prompts(config)
    inputs_key = {"model": model_identity(bridge), "prompts": _prompt_key(prompts),
                  "localize": dataclasses.asdict(settings), "readout": dataclasses.asdict(config.readout)}
    outputs = [f"scores/{stem}.json" for method in LOCALIZE_OUTPUTS if method in settings.methods
               for stem in LOCALIZE_OUTPUTS[method]]
    outputs += ["tables/localize_agreement.parquet", "localize_timings.json",
                *(f"scores/{stem}.json" for stem in ATTRIBUTION_ON_NAME)]
    outputs += ["tables/localize_calibration.parquet"] if "patching" in settings.methods else []

    def compute() -> None:
        timings: dict[str, float] = {}
        neurons, head_scores = (context_attribution(attribution, settings.context, kind) for kind in KINDS)
        neurons.save(run.path("scores/attribution_neurons"))
        head_scores.save(run.path("scores/attribution_heads"))
        on_name = load_variation_scores(run, prompts, kinds=NAME_PARTS)
        for kind, stem in zip(NAME_PARTS, ATTRIBUTION_ON_NAME):
            context_attribution(on_name, settings.context, kind).save(run.path(f"scores/{stem}"))
        with timed(timings, f"pairs for patching and ablation (up to {settings.patch_pairs}: leaves + baseline)"):
            chosen = PromptSet([p for pair in patching_pairs(prompts, audit.distributions, settings.patch_pairs)
                                for p in pair])
            few = pairs.build_pairs(bridge, chosen, n_leaves=settings.n_leaves, readout=exact_settings(config),
                                    progress=False, distributions=audit.distributions)
        agreements, calibration = [], []
        if "patching" in settings.methods:
            patched, same_pairs = _patching(run, bridge, few, neurons, head_scores, settings, config.seed, timings)
            agreements += patched
            calibration.append(same_pairs)
        if "ablation" in settings.methods:
            agreements += _ablation(run, bridge, few, neurons, head_scores, settings.patch_top_neurons, timings)
        if {"patching", "ablation"} <= set(settings.methods):
            calibration.append(_patching_against_pruning(run))
        if calibration:
            run.write_table("tables/localize_calibration.parquet", pd.concat(calibration, ignore_index=True))
        if "heads" in settings.methods:
            agreements += _head_attention(run, bridge, prompts, head_scores, timings)
        if "wanda" in settings.methods:
            with timed(timings, "wanda (norms + streamed selection)"):
                _wanda_selection(run, bridge, prompts, settings)
        run.write_table("tables/localize_agreement.parquet", pd.DataFrame(agreements))
        run.write_json("localize_timings.json", timings)

    run.cached("localize", inputs_key, outputs, compute, after=("readout", "attribution"))
    return run.read_json("localize_timings.json")


def patching_pairs(prompts: PromptSet, distributions: dict, n: int) -> list[tuple]:
    """The first n (White, Black) pairs whose two answers both have spread, then the others: a name whose answer
    is one number under the sampler (top-p keeps a single token at every level) has a zero gradient and no
    patching effect, so a pair holding one cannot check attribution against patching."""
    def spread(prompt) -> bool:
        probs = distributions[(prompt.context, prompt.variation, prompt.name)].probs
        return bool(probs.max() < (1 - 1e-9) * probs.sum())

    ordered = sorted(prompts.pairs(), key=lambda pair: not all(spread(p) for p in pair))  # stable
    return ordered[:n]


def _patching(run: RunDir, bridge, few, neurons, head_scores, settings, seed: int,
              timings: dict) -> tuple[list[dict], pd.DataFrame]:
    """Activation patching on the few pairs of every head and of the neurons that attribution on the same pairs
    ranks highest plus a random sample; agreement with attribution over all pairs, and the same-pair calibration
    (`calibrate_attribution`)."""
    from workbench.localize.attribution import attribution_scores
    from workbench.localize.calibration import calibrate_attribution
    from workbench.localize.scores import agreement

    with timed(timings, "attribution on the patching pairs"):
        same_pairs = attribution_scores(bridge, few, progress=False)
    top, extra = settings.patch_top_neurons, settings.calibration_random_neurons
    with timed(timings, f"patching (all heads, {top} + {extra} random neurons)"):
        calibration, (patched_neurons, patched_heads) = calibrate_attribution(bridge, few, same_pairs, top, extra,
                                                                               seed)
    patched_neurons.save(run.path("scores/patching_neurons"))
    patched_heads.save(run.path("scores/patching_heads"))
    return [{"a": "patching", "b": "attribution", "kind": "mlp_neuron",
             **agreement(patched_neurons, neurons, top=top + extra)},
            {"a": "patching", "b": "attribution", "kind": "attn_head",
             **agreement(patched_heads, head_scores, top=patched_heads.scores.numel())}], calibration


def _patching_against_pruning(run: RunDir) -> pd.DataFrame:
    """Calibration rows (reference "zero_ablation"): how far the patching score is from the intervention pruning
    makes (zero ablation at every position of both prompts), on the same pairs."""
    from workbench.localize.calibration import calibration_row
    from workbench.localize.scores import ComponentScores

    return pd.DataFrame([calibration_row(ComponentScores.load(run.path(f"scores/patching_{kind}")),
                                         ComponentScores.load(run.path(f"scores/ablation_{kind}")))
                         for kind in ("neurons", "heads")])


def _ablation(run: RunDir, bridge, few, neurons, head_scores, top_neurons: int, timings: dict) -> list[dict]:
    """Zero ablation of every head and of the top neurons by attribution; agreement with attribution."""
    from workbench.localize import ablation
    from workbench.localize.scores import agreement

    with timed(timings, "zero ablation (all heads + top neurons)"):
        ablated_heads = ablation.ablation_scores(bridge, few, _all(bridge, "attn_head"))
        ablated_neurons = ablation.ablation_scores(bridge, few, neurons.top(top_neurons, absolute=True))
    ablated_heads.save(run.path("scores/ablation_heads"))
    ablated_neurons.save(run.path("scores/ablation_neurons"))
    return [{"a": "zero_ablation", "b": "attribution", "kind": "attn_head",
             **agreement(ablated_heads, head_scores, top=ablated_heads.scores.numel())},
            {"a": "zero_ablation", "b": "attribution", "kind": "mlp_neuron",
             **agreement(ablated_neurons, neurons, top=top_neurons)}]


def _head_attention(run: RunDir, bridge, prompts: PromptSet, head_scores, timings: dict) -> list[dict]:
    """Each head's attention to the name; agreement with attribution."""
    from workbench.localize import heads
    from workbench.localize.scores import agreement

    with timed(timings, "head attention to the name"):
        attention = heads.head_attention_scores(bridge, list(prompts))
    attention.save(run.path("scores/head_attention"))
    return [{"a": "head_attention", "b": "attribution", "kind": "attn_head",
             **agreement(attention, head_scores, top=attention.scores.numel())}]


def _wanda_selection(run: RunDir, bridge, prompts: PromptSet, settings) -> None:
    """Wanda's weight selection (Black-prompt minus White-prompt top scores) saved with its thresholds."""
    from workbench.localize import wanda
    from workbench.prune.generalize import wanda_for

    selection = wanda_for(bridge, prompts, settings)
    wanda.save_selection(selection, run.path("scores/wanda_selection"), model=bridge,
                         metadata={"tau_black": settings.wanda_tau_black, "tau_white": settings.wanda_tau_white})


def _all(bridge, kind: str):
    from workbench.components import ModelShape

    return ModelShape.of(bridge).all(kind)


# ---------------------------------------------------------------- generalisation

def selection_halves(answers: pd.DataFrame, folds: list | None) -> list[tuple[int | None, pd.DataFrame]]:
    """(fold, the answers of the fold's selection names) per fold; without folds one (None, all answers)."""
    if folds is None:
        return [(None, answers)]
    return [(fold, answers[answers.name.isin({p.name for p in selection})]) for fold, (selection, _) in enumerate(folds)]


def selection_gate(config: StudyConfig, answers: pd.DataFrame, folds: list | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """What each fold's selection names say, and nothing else does (no winner's curse): per fold and context, the
    context's bias test on the selection half (permutation p, corrected over the contexts as configured: the gate
    that decides whether the context has a bias to remove), and per variation the direction of its bias there
    (`selection_directions`). Without folds (in-sample) one "fold" of all names (fold NA)."""
    a = config.audit
    options = stats_options(config)
    gates = []
    for fold, part in selection_halves(answers, folds):
        tested = significance_table(part, n_perm=a.n_perm, alpha=a.alpha, correction=a.correction, **options).contexts
        gates.append(tested[["context", "mean_abs_smd", "null_mean", "p_perm", "p_adjusted", "correction",
                             "significant"]].assign(fold=fold, n_names=part.name.nunique()))
    return pd.concat(gates, ignore_index=True).astype({"fold": "Int64"}), selection_directions(config, answers, folds)


def selection_directions(config: StudyConfig, answers: pd.DataFrame, folds: list | None) -> pd.DataFrame:
    """Per fold (NA without folds) and variation, the direction of the bias on the fold's selection names
    (`bias_directions`): the removal is measured in it, and the fold's attribution scores are oriented by it."""
    from workbench.audit.stats import bias_directions

    a = config.audit
    return pd.concat([bias_directions(part, a.scale, a.method, a.min_valid_mass).assign(fold=fold)
                      for fold, part in selection_halves(answers, folds)], ignore_index=True).astype({"fold": "Int64"})


def generalize_stage(run: RunDir, config: StudyConfig, bridge, prompts: PromptSet, audit: Audit, scores: dict,
                     fold_scores: list[dict] | None) -> None:
    """The regimes, the Wanda matrix and the budget sweep with their random controls (cached).

    Held out by default: on each fold, the gate (does the context have a bias to remove?), the direction of each
    variation's bias and the components all come from the fold's selection half (`selection_gate`, `fold_scores`),
    and the bias removed is measured on its evaluation half against that half's own unpruned answers; the rows
    pool the folds that passed the gate (n_folds). In-sample (`fold_scores` None) everything uses all names.
    Cells whose target passed the gate on no fold are rows with the note "no bias to remove"."""
    from workbench.components import ModelShape
    from workbench.pipeline.study_report import regime_summary
    from workbench.prune import generalize

    settings = config.generalize
    baseline = audit.answers
    folds = held_out_folds(config, prompts)
    gate, directions = selection_gate(config, baseline, folds)
    opened = gate if settings.gate == "none" else gate[gate.significant]
    passed = {(None if pd.isna(row.fold) else int(row.fold), row.context) for row in opened.itertuples()}
    stats = stats_options(config)
    inputs_key = {"model": model_identity(bridge), "prompts": _prompt_key(prompts),
                  "generalize": dataclasses.asdict(settings), "readout": dataclasses.asdict(exact_settings(config)),
                  "localize": dataclasses.asdict(config.localize), "stats": stats,
                  "tests": [config.audit.n_perm, config.audit.alpha, config.audit.correction],
                  "passed": sorted(passed, key=str)}
    outputs = ["tables/generalization.parquet", "tables/sweep.parquet", "tables/regime_summary.parquet",
               "tables/overlap.parquet", "tables/gate.parquet", "generalize_timings.json"]

    def compute() -> None:
        timings = {}
        budgets = {"mlp_neuron": settings.neuron_budget, "attn_head": settings.head_budget}

        def cross_fit(make) -> list:
            """make(scores, selection prompts) -> cases; held out: each fold's cases on its evaluation half."""
            if folds is None:
                return make(scores, prompts)
            return [case for fold, ((selection, evaluation), chosen) in enumerate(zip(folds, fold_scores))
                    for case in generalize.held_out(make(chosen, selection), evaluation, fold)]

        def gated(case) -> bool:
            return (case.fold, case.target) in passed

        cases = [case for regime in settings.regimes for case in cross_fit(
            lambda chosen, _: generalize.regime_cases(regime, chosen, budgets, settings.neuron_rule))]
        with timed(timings, "wanda per context"):
            if "cross_context" in settings.regimes and passed:
                cases += cross_fit(lambda _, selection: generalize.wanda_cases(bridge, selection, config.localize))
        cases += cross_fit(lambda chosen, _: sweep_cases(bridge, chosen, config.localize.context,
                                                         settings.sweep_fractions))
        evaluated = [case for case in cases if gated(case)]
        evaluated += random_controls(ModelShape.of(bridge), prompts, evaluated, settings.random_draws, config.seed)
        with timed(timings, "pruned evaluations"):
            summary, after = (generalize.evaluate(bridge, prompts, baseline, evaluated, exact_settings(config), stats,
                                                  settings.ablation, settings.head_ablation, directions=directions,
                                                  alpha=config.audit.alpha)
                              if evaluated else (None, None))
        read = 0 if after is None else int((after.n_pruned > 0).sum())
        timings[f"pruned evaluations ({len(evaluated)} cases, {read} prompts read out)"] = timings.pop(
            "pruned evaluations")
        with timed(timings, "regime summary"):
            skipped = no_bias_rows([case for case in cases if not gated(case)], gate, summary)
            table = (pd.concat([t for t in (summary, skipped) if t is not None], ignore_index=True)
                     .reindex(columns=generalize.SUMMARY_COLUMNS)
                     .sort_values(generalize.CASE_COLUMNS, ignore_index=True)
                     .astype({"budget": "Int64", "draw": "Int64", "n_random": "Int64", "rank": "Int64",
                              "better_than_random": "boolean"}))
            table = table.assign(bias_to_remove=table.target.isin({c for _, c in passed}), scale=config.audit.scale,
                                 smd_method=config.audit.method)
            headline = regime_summary(after, baseline, stats, directions)
        run.write_table("tables/generalization.parquet", table[table.regime != "sweep"].reset_index(drop=True))
        run.write_table("tables/sweep.parquet", table[table.regime == "sweep"].reset_index(drop=True))
        run.write_table("tables/regime_summary.parquet", headline.assign(scale=config.audit.scale,
                                                                         smd_method=config.audit.method))
        run.write_table("tables/overlap.parquet", generalize.context_overlap(scores, budgets))
        run.write_table("tables/gate.parquet", gate)
        run.write_json("generalize_timings.json", timings)

    run.cached("generalize", inputs_key, outputs, compute,
               after=("audit", "attribution", *(("attribution_folds",) if folds is not None else ())))


def sweep_cases(bridge, scores: dict, context: str, fractions: list[float]) -> list:
    """The budget sweep: the top fraction of each kind by the context's mean attribution score, on the context."""
    from workbench.prune.generalize import Case, Pruning, budget_for, context_level

    units = [u for u in scores if u[0] == context]
    return [Case("sweep", context, context, units, Pruning(kind, context_level(scores, context, kind, k)), k,
                 fraction=fraction)
            for fraction in fractions for kind in KINDS for k in [budget_for(bridge, kind, fraction)]]


def random_controls(shape, prompts: PromptSet, cases: list, n_draws: int, seed: int) -> list:
    """Random draws at every (kind, budget) among the cases, each evaluated on those cases' targets."""
    from workbench.prune.generalize import random_cases

    targets: dict[tuple[str, int], set[str]] = {}
    for case in cases:
        if case.budget is not None:
            targets.setdefault((case.kind, case.budget), set()).add(case.target)
    return [case for (kind, k), chosen in sorted(targets.items())
            for case in random_cases(shape, prompts.filter(context=chosen), {kind: k}, n_draws, seed)]


NO_BIAS = "no bias to remove"


def no_bias_rows(cases: list, gate: pd.DataFrame, evaluated: pd.DataFrame | None) -> pd.DataFrame | None:
    """Summary rows (not evaluated) for the case keys whose target passed the gate on no fold: the selection
    halves' mean |SMD| (averaged over the folds) and the note "no bias to remove"."""
    from workbench.prune.generalize import CASE_COLUMNS, POOLED

    if not cases:
        return None
    rows = pd.DataFrame([{"regime": c.regime, "kind": c.kind, "held_out": c.held_out, "target": c.target,
                          "source": "each variation" if c.regime in POOLED else c.source, "budget": c.budget,
                          "fraction": c.fraction, "draw": c.draw, "n_pruned": c.pruning.size} for c in cases])
    table = (rows.groupby(CASE_COLUMNS, sort=True, dropna=False).n_pruned.mean().rename("n_pruned_mean")
             .reset_index().astype({"budget": "Int64", "fraction": "float64", "draw": "Int64"}))
    if evaluated is not None:  # a key evaluated on some fold is that fold's row, not a "no bias" row
        done = evaluated[CASE_COLUMNS].astype(table[CASE_COLUMNS].dtypes.to_dict())
        table = table.merge(done.assign(_done=True), on=CASE_COLUMNS, how="left")
        table = table[table._done.isna()].drop(columns="_done")
    if table.empty:
        return None
    bias = gate.groupby("context").mean_abs_smd.mean()
    return table.assign(bias_before=table.target.map(bias), note=NO_BIAS)


# ---------------------------------------------------------------- bias types

def cross_type_stage(run: RunDir, config: StudyConfig, bridge, prompts: PromptSet, audit: Audit) -> None:
    """The cross-type matrix (workbench.prune.cross_type): for each configured bias type, neurons and heads chosen by
    attribution on that type's pairs of the context (on each fold's selection half when held out), every pruning
    measured on every type's bias, next to random draws at the same budgets, with the Jaccard overlap of the
    chosen components; also each type's scores and pruning plans on all names (cached)."""
    from workbench.components import ModelShape
    from workbench.localize.scores import ComponentScores
    from workbench.prune import cross_type, generalize

    settings, g = config.cross_type, config.generalize
    contrasts = cross_type.contrasts_named(settings.bias_types)
    subset = prompts.filter(context=settings.context)
    folds = held_out_folds(config, subset)
    budgets = {"mlp_neuron": g.neuron_budget, "attn_head": g.head_budget}
    stats = stats_options(config)
    inputs_key = {"model": model_identity(bridge), "prompts": _prompt_key(subset),
                  "cross_type": dataclasses.asdict(settings), "generalize": dataclasses.asdict(g),
                  "readout": dataclasses.asdict(exact_settings(config)), "n_leaves": config.localize.n_leaves,
                  "stats": stats}
    stems = [f"{c.name}_{kind}" for c in contrasts for kind in KINDS]
    outputs = ["tables/cross_type.parquet", "tables/cross_type_overlap.parquet", "cross_type_timings.json",
               *(f"scores/bias_types/{stem}.json" for stem in stems), *(f"plans/{stem}.json" for stem in stems)]

    def compute() -> None:
        timings = {}
        baseline = audit.answers

        def scores_by_type(names: PromptSet) -> dict:
            return {c.name: generalize.variation_scores(bridge, names, config.localize.n_leaves, exact_settings(config),
                                                        distributions=audit.distributions, contrast=c)
                    for c in contrasts}

        with timed(timings, f"attribution per bias type ({len(contrasts)} types)"):
            everyone = scores_by_type(subset)
            for name, scores in everyone.items():
                for kind in KINDS:
                    mean = ComponentScores("attribution", kind, generalize.context_mean(scores, settings.context, kind),
                                           {"bias_type": name, "context": settings.context, "variations": len(scores)})
                    mean.save(run.path(f"scores/bias_types/{name}_{kind}"))
                    plan_for_type(bridge, mean.top(budgets[kind]), settings.context, name, g).save(
                        run.path(f"plans/{name}_{kind}.json"))
            if folds is None:
                cases = cross_type.type_cases(everyone, settings.context, budgets)
            else:
                cases = cross_type.cross_fit_type_cases(folds, [scores_by_type(s) for s, _ in folds],
                                                        settings.context, budgets)
        cases += generalize.random_cases(ModelShape.of(bridge), subset, budgets, g.random_draws, config.seed)
        with timed(timings, f"pruned evaluations ({len(cases)} prunings)"):
            after = generalize.pruned_answers(bridge, subset, baseline, cases, exact_settings(config), g.ablation,
                                              g.head_ablation)
        matrix = cross_type.cross_type_matrix(after, baseline, contrasts, stats,
                                              type_directions(baseline, contrasts, folds, config), config.audit.alpha)
        tested = audit.bias_type_contexts.rename(
            columns={"bias_type": "target_type", "p_adjusted": "target_p_adjusted",
                     "significant": "target_significant"})
        matrix = matrix.merge(tested[["target_type", "context", "target_p_adjusted", "target_significant"]],
                              on=["target_type", "context"], how="left")
        run.write_table("tables/cross_type.parquet", matrix.assign(scale=config.audit.scale,
                                                                   smd_method=config.audit.method))
        run.write_table("tables/cross_type_overlap.parquet", cross_type.type_overlap(cases))
        run.write_json("cross_type_timings.json", timings)

    run.cached("cross_type", inputs_key, outputs, compute, after=("audit",))


def type_directions(answers: pd.DataFrame, contrasts: list, folds: list | None, config: StudyConfig) -> dict:
    """Per bias type: the direction of each variation's bias on each fold's selection half (all names, fold NA,
    when in-sample), in which its removed bias is measured."""
    from workbench.audit.stats import bias_directions

    a = config.audit
    return {c.name: pd.concat([bias_directions(part, a.scale, a.method, a.min_valid_mass, c).assign(fold=fold)
                               for fold, part in selection_halves(answers, folds)], ignore_index=True)
            .astype({"fold": "Int64"})
            for c in contrasts}


def plan_for_type(bridge, components: list, context: str, bias_type: str, settings):
    """The pruning plan of a bias type: its top-k components of one kind on the context (all names)."""
    from workbench.prune.plan import PruningPlan

    identity = model_identity(bridge)
    kind = components[0].kind
    return PruningPlan(model=identity["model"], model_hash=identity["weight_hash"], components=components,
                       method="attribution", selection={"rule": "top_k", "k": len(components), "context": context},
                       ablation=settings.head_ablation if kind == "attn_head" else settings.ablation,
                       bias_type=bias_type)


# ---------------------------------------------------------------- the whole study

def plant_contexts(config: StudyConfig) -> list[str]:
    return config.spike_in.contexts or [config.localize.context]


def plant_stage(run: RunDir, config: StudyConfig, bridge):
    """The spike-in plant of the config (None without one): its directions estimated and its scale calibrated on
    the feature names (those after the study's names of each group, `config.feature_names`) of the plant's contexts, on
    the unspiked model (cached: spike_in/plant.safetensors and the record spike_in/plant.json)."""
    from workbench.localize.pairs import build_pairs
    from workbench.spike_in import Plant, PlantSpec, calibrated_plant

    spike = config.spike_in
    if not spike.components:
        return None
    spec = PlantSpec.parse(spike.components, spike.target_smd, spike.kind or None)
    folder = config.prompts.folder or None
    contexts = plant_contexts(config)
    features = PromptSet.build(contexts, names=feature_names(config),
                               variations={c: config.audit.variations[c] for c in contexts
                                           if c in config.audit.variations} or None,
                               instruction_suffix=config.audit.instruction_suffix, folder=folder)
    inputs_key = {"model": model_identity(bridge), "spike_in": dataclasses.asdict(spike),
                  "prompts": _prompt_key(features), "n_leaves": config.localize.n_leaves,
                  "readout": dataclasses.asdict(exact_settings(config)), "n_boot": config.audit.n_boot}

    def compute() -> None:
        pairs = build_pairs(bridge, features, n_leaves=config.localize.n_leaves, readout=exact_settings(config),
                            progress=False)
        plant = calibrated_plant(bridge, spec, pairs, n_boot=config.audit.n_boot)
        plant.save(run.path("spike_in/plant.safetensors"))
        run.write_json("spike_in/plant.json", plant.record() | {"feature_names": sorted({p.name for p in features}),
                                                                 "contexts": contexts})

    run.cached("spike_in_plant", inputs_key, ["spike_in/plant.safetensors", "spike_in/plant.json"], compute)
    return Plant.load(run.path("spike_in/plant.safetensors"), spec)


def spike_in_stage(run: RunDir, config: StudyConfig, bridge, prompts: PromptSet, audit: Audit, plant) -> None:
    """Does the study's localisation find the plant and its pruning remove it? Per plant context: the study's
    attribution (fold 0's selection half, oriented by its bias directions) and activation patching (its first
    `patch_pairs` pairs; all heads, or attribution's top `patch_top_neurons` neurons) on the spiked model; their
    top budget pruned and measured on fold 0's evaluation half next to random draws (`spike_in.spike_in_rows`):
    tables/spike_in.parquet. Run on the unspiked bridge (it plants and undoes the plant itself). Without folds
    the selection and evaluation names are the same (in-sample, said in the table)."""
    from workbench.localize.pairs import build_pairs
    from workbench.localize.patching import patching_scores
    from workbench.prune.generalize import variation_scores
    from workbench.spike_in import spike_in_rows

    folds = held_out_folds(config, prompts)
    selection, evaluation = folds[0] if folds else (prompts, prompts)
    kind = plant.spec.components[0].kind
    budget = config.generalize.head_budget if kind == "attn_head" else config.generalize.neuron_budget
    readout = exact_settings(config)
    inputs_key = {"model": model_identity(bridge), "selection": _prompt_key(selection),
                  "evaluation": _prompt_key(evaluation), "localize": dataclasses.asdict(config.localize),
                  "budget": budget, "draws": config.generalize.random_draws, "stats": stats_options(config)}

    def compute() -> None:
        directions = selection_directions(config, audit.answers, folds)
        directions = directions[directions.fold == 0] if folds else directions
        tables = []
        for context in plant_contexts(config):
            chosen = selection.filter(context=context)
            with plant.planted(bridge):
                by_variation = variation_scores(bridge, chosen, config.localize.n_leaves, readout, progress=False,
                                                distributions=audit.distributions, directions=directions)
                attribution = context_attribution(by_variation, context, kind)
                sign = float(directions[directions.context == context].sign.mean())
                few = build_pairs(bridge, PromptSet([p for pair in chosen.pairs()[: config.localize.patch_pairs]
                                                     for p in pair]),
                                  n_leaves=config.localize.n_leaves, readout=readout, progress=False,
                                  distributions=audit.distributions)
                few = few.oriented(1.0 if sign > 0 else -1.0) if sign else few  # sign 0: the pairs' gap
                candidates = (_all(bridge, kind) if kind == "attn_head"
                              else attribution.top(config.localize.patch_top_neurons, absolute=True))
                scores = {"attribution": attribution,
                          "activation_patching": patching_scores(bridge, few, candidates, progress=False)}
            evaluated = build_pairs(bridge, evaluation.filter(context=context), n_leaves=config.localize.n_leaves,
                                    readout=readout, progress=False, distributions=audit.distributions)
            tables.append(spike_in_rows(bridge, plant, evaluated, scores, budget, config.generalize.random_draws,
                                        config.seed, config.audit.n_boot).assign(context=context))
        table = pd.concat(tables, ignore_index=True).assign(held_out=folds is not None,
                                                           patch_pairs=config.localize.patch_pairs)
        run.write_table("tables/spike_in.parquet", table)

    run.cached("spike_in", inputs_key, ["tables/spike_in.parquet"], compute, after=("spike_in_plant", "audit"))


STAGES = ("audit", "attribution", "localize", "attribution on fold halves", "generalize", "directions",
          "cross_type")
"""The study's stages in order; each takes the results of the earlier ones it needs."""
FOR_A_BIAS = ("attribution", "localize", "attribution on fold halves", "generalize", "directions")
"""The stages that serve the pruning of a bias the audit found (skipped by `run_study` when it finds none)."""


def _directions_stage(*args) -> None:
    from workbench.pipeline.directions import directions_stage

    directions_stage(*args)


def no_bias_to_remove(audit: Audit) -> bool:
    """Whether the audit finds no context's bias significant after its correction."""
    return not audit.context_significance.significant.any()


def run_stages(run: RunDir, config: StudyConfig, bridge, prompts: PromptSet,
               stages: tuple[str, ...] = STAGES, skip_without_bias: bool = False) -> dict[str, float]:
    """Run the named stages in study order (skipping those the config does not ask for, see `wanted`, and with
    `skip_without_bias` those of FOR_A_BIAS when `no_bias_to_remove`), each given the earlier stages' results;
    the seconds of each stage run."""
    timings: dict[str, float] = {}
    results: dict[str, object] = {}
    steps = {
        "audit": lambda: audit_stage(run, config, bridge, prompts),
        "attribution": lambda: attribution_stage(run, config, bridge, prompts, results["audit"]),
        "localize": lambda: localize_stage(run, config, bridge, results["audit"], results["attribution"]),
        "attribution on fold halves": lambda: fold_attribution_stage(run, config, bridge, prompts, results["audit"]),
        "generalize": lambda: generalize_stage(run, config, bridge, prompts, results["audit"],
                                               results["attribution"], results["attribution on fold halves"]),
        "directions": lambda: _directions_stage(run, config, bridge, prompts, results["audit"],
                                                results.get("attribution"), results.get("attribution on fold halves")),
        "cross_type": lambda: cross_type_stage(run, config, bridge, prompts, results["audit"]),
    }
    for name in STAGES:
        if skip_without_bias and name in FOR_A_BIAS and no_bias_to_remove(results["audit"]):
            continue
        if name in stages and wanted(config, name):
            with timed(timings, name):
                results[name] = steps[name]()
    return timings


def run_study(config: StudyConfig, out: Path, figures_dir: Path | None = Path("figures")) -> Path:
    """audit -> localise -> generalise -> report, resuming from the run directory's finished stages."""
    from workbench.pipeline.study_report import write_study_report

    run = RunDir(out)
    write_config(run, config)
    torch.manual_seed(config.seed)
    timings: dict[str, float] = {}
    prompts = audit_prompts(config)
    held_out_folds(config, prompts)  # a design that cannot be cross-fitted stops before the model is loaded
    with timed(timings, "load model"):
        bridge = load_bridge(config)
    with timed(timings, "spike-in plant"):
        plant = plant_stage(run, config, bridge)
    skip = not plant and not config.localize.always
    with plant.planted(bridge) if plant else nullcontext():
        timings |= run_stages(run, config, bridge, prompts, skip_without_bias=skip)
        info = manifest(config, bridge, timings)
        audit = audit_stage(run, config, bridge, prompts)  # cached: read back
    if skip and no_bias_to_remove(audit):
        info["skipped"] = [name for name in FOR_A_BIAS if wanted(config, name)]
    if plant:
        with timed(info["timings_s"], "spike-in recovery"):
            spike_in_stage(run, config, bridge, prompts, audit, plant)
        info["spike_in"] = run.read_json("spike_in/plant.json")
    run.write_json("manifest.json", info)
    with timed(info["timings_s"], "report"):
        report = write_study_report(run, info, figures_dir)
    run.write_json("manifest.json", info)
    return report


def wanted(config: StudyConfig, stage: str) -> bool:
    """Whether the config asks for a stage: generalisation needs regimes or a sweep, direction edits edits, the
    cross-type matrix bias types, folds only feed them."""
    generalizing = bool(config.generalize.regimes or config.generalize.sweep_fractions)
    return {"generalize": generalizing, "attribution on fold halves": generalizing or bool(config.directions.edits),
            "directions": bool(config.directions.edits),
            "cross_type": bool(config.cross_type.bias_types)}.get(stage, True)


def prune_command(config: StudyConfig, bridge, plan_path: Path, out: Path, export: bool = False) -> Path:
    """Apply a saved pruning plan: bias and anomaly before and after on the config's prompts; optional export."""
    from workbench.audit.stats import signed_reduction
    from workbench.prune.anomaly import anomaly_report
    from workbench.prune.plan import PlanError, PruningPlan, export_pruned, hooks_for, pruned_weights

    plan = PruningPlan.load(plan_path)
    if plan.model_hash != model_identity(bridge)["weight_hash"]:
        raise PlanError(f"{plan_path}: the plan was made for a model with weight hash {plan.model_hash[:16]}..., "
                        f"not {config.model} ({model_identity(bridge)['weight_hash'][:16]}...)")
    run = RunDir(out)
    prompts = audit_prompts(config)
    before = audit_stage(run, config, bridge, prompts).answers
    hooks = [] if plan.weight_selection else hooks_for(plan)
    context = pruned_weights(bridge, plan) if plan.weight_selection else bridge.hooks(fwd_hooks=hooks)
    with context:
        after = run_audit(bridge, prompts, exact=exact_settings(config))
    reduction = signed_reduction(before, after, None, **stats_options(config))  # in-sample direction
    run.write_table("tables/pruned_answers.parquet", after)
    run.write_table("tables/pruned_bias_reduction.parquet", reduction)
    report = anomaly_report(bridge, hooks or None, before, after)
    if plan.weight_selection:
        from workbench.prune.anomaly import perplexity

        with pruned_weights(bridge, plan):
            report.update(kl=None, perplexity_pruned=perplexity(bridge))
    run.write_json("pruned_anomaly.json", report)
    if export:
        export_pruned(bridge, model_info(bridge).tokenizer, plan, run.path("pruned_model"))
    return run.root
