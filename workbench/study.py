"""The study's stages as functions over a config and a run directory (cached by input hash, resumable).

audit -> localise -> generalise (prune + evaluate) -> report. Each stage writes its tables (parquet),
scores (safetensors + JSON) and figures (HTML, PNG where a browser exists) into the run directory.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from importlib import metadata
from pathlib import Path

import pandas as pd
import torch

from workbench.audit import run_audit
from workbench.config import ConfigError, StudyConfig, load_config, to_dict
from workbench.models import load_model
from workbench.prune import model_hash
from workbench.prompts import PromptSet, load_names
from workbench.readout import ExactReadoutConfig, SamplingConfig
from workbench.runstore import RunDir
from workbench.stats import bias_table, context_summary, group_means

__all__ = ["RunDir", "run_study"]

ANSWER_TABLE_FORMAT = 2
"""Version of the answer table's columns: bump it when they change, so cached audits are recomputed."""


def config_from_args(args) -> StudyConfig:
    """The config file's values, with the command line's overrides."""
    config = load_config(getattr(args, "config", None))
    if getattr(args, "model", None):
        config.model = args.model
    if getattr(args, "contexts", None):
        config.audit.contexts = list(args.contexts)
    if getattr(args, "names_per_group", None) is not None:
        if args.names_per_group < 1:
            raise ConfigError(f"--names-per-group (names_per_group) must be at least 1, got {args.names_per_group}")
        config.audit.names_per_group = args.names_per_group
    if getattr(args, "methods", None):
        config.localize.methods = list(args.methods)
    return config


def load_bridge(config: StudyConfig):
    return load_model(config.model)


def names_subset(per_group: int) -> list[str]:
    """The first `per_group` names of each race x gender group."""
    if per_group < 1:
        raise ValueError(f"names_per_group must be at least 1, got {per_group}")
    chosen: dict[str, list[str]] = {}
    for entry in load_names():
        chosen.setdefault(entry.group, [])
        if len(chosen[entry.group]) < per_group:
            chosen[entry.group].append(entry.name)
    return [name for group in chosen.values() for name in group]


def audit_prompts(config: StudyConfig, prompts_csv: str | None = None) -> PromptSet:
    if prompts_csv:
        return PromptSet.from_audit_csv(prompts_csv)
    return PromptSet.build(
        config.audit.contexts,
        names=names_subset(config.audit.names_per_group),
        variations=config.audit.variations or None,
        instruction_suffix=config.audit.instruction_suffix,
    )


def exact_settings(config: StudyConfig) -> ExactReadoutConfig:
    r = config.readout
    return ExactReadoutConfig(threshold=r.threshold, max_branches=r.max_branches, max_tokens=r.max_tokens,
                              max_completions=r.max_completions, batch_size=r.batch_size)


def model_identity(bridge) -> dict:
    if not hasattr(bridge, "workbench_hash"):
        bridge.workbench_hash = model_hash(bridge)
    return {"model": bridge.workbench_name, "weight_hash": bridge.workbench_hash}


def _prompt_key(prompts: PromptSet) -> list[str]:
    return [f"{p.context}|{p.variation}|{p.name}|{p.text}|{p.answer_prefix}" for p in prompts]


def audit_stage(run: RunDir, config: StudyConfig, bridge, prompts: PromptSet, readout: str = "exact",
                n_samples: int = 100) -> pd.DataFrame:
    """Answers of every prompt and the bias tables (cached)."""
    sampling = SamplingConfig(n_samples=n_samples, seed=config.seed)
    inputs = {"table_format": ANSWER_TABLE_FORMAT, "model": model_identity(bridge), "prompts": _prompt_key(prompts),
              "readout": readout,
              "exact": dataclasses.asdict(exact_settings(config)), "sampling": dataclasses.asdict(sampling),
              "system_prompt": config.audit.system_prompt, "stats": dataclasses.asdict(config.audit)}
    outputs = ["tables/answers.parquet", "tables/bias.parquet", "tables/context_summary.parquet",
               "tables/group_means.parquet", "audit_summary.json"]

    def compute() -> None:
        started = time.perf_counter()
        answers = run_audit(bridge, prompts, readout=readout, exact=exact_settings(config), sampling=sampling,
                            system_prompt=config.audit.system_prompt or None)
        seconds = time.perf_counter() - started
        write_bias_tables(run, config, answers)
        run.write_table("tables/answers.parquet", answers)
        summary = run.read_table("tables/context_summary.parquet")
        run.write_json("audit_summary.json", {"seconds": seconds, "prompts": len(prompts), "readout": readout,
                                              "mean_valid_mass": float(answers.valid_mass.mean()),
                                              "mean_unexplored_mass": float(answers.unexplored_mass.mean()),
                                              "mean_abs_smd": summary.to_dict(orient="records")})

    run.cached("audit", inputs, outputs, compute)
    return run.read_table("tables/answers.parquet")


def write_bias_tables(run: RunDir, config: StudyConfig, answers: pd.DataFrame) -> None:
    a = config.audit
    options = dict(scale=a.scale, method=a.method, n_boot=a.n_boot, seed=config.seed)
    run.write_table("tables/bias.parquet", bias_table(answers, **options))
    run.write_table("tables/context_summary.parquet", context_summary(answers, **options))
    run.write_table("tables/group_means.parquet", group_means(answers, scale=a.scale, n_boot=a.n_boot,
                                                              seed=config.seed))


def audit_figures(run: RunDir) -> list[dict]:
    """The audit's plotly figures (self-contained HTML, PNG where a browser exists) in <run>/figures."""
    from workbench import plots
    from workbench.report import save_figure

    figures = {"audit_smd": plots.smd_figure(run.read_table("tables/bias.parquet")),
               "audit_group_means": plots.group_means_figure(run.read_table("tables/group_means.parquet"))}
    return [save_figure(figure, run.path("figures"), stem) for stem, figure in figures.items()]


def audit_summary_text(run: RunDir) -> str:
    """The audit's headline tables as plain text."""
    bias = run.read_table("tables/bias.parquet")
    summary = run.read_table("tables/context_summary.parquet")
    columns = ["context", "variation", "smd", "ci_low", "ci_high", "mean_white", "mean_black", "n_invalid"]
    return (bias[columns].round(3).to_string(index=False) + "\n\n"
            + summary.round(3).to_string(index=False))


def manifest(config: StudyConfig, bridge, timings: dict) -> dict:
    packages = ["torch", "transformers", "transformer-lens", "numpy", "pandas", "biasprune-workbench"]
    return {
        "config": to_dict(config),
        "model": model_identity(bridge),
        "versions": {p: _version(p) for p in packages},
        "python": platform.python_version(),
        "device": str(next(bridge.parameters()).device),
        "threads": torch.get_num_threads(),
        "seed": config.seed,
        "timings_s": timings,
    }


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def write_config(run: RunDir, config: StudyConfig) -> None:
    run.write_text("config.json", json.dumps(to_dict(config), indent=2))


# ---------------------------------------------------------------- localisation

KIND_NAMES = ("mlp_neuron", "attn_head")


def _variation_stem(context: str, variation: str, kind: str) -> str:
    safe = "".join(ch if ch.isalnum() else "_" for ch in variation)
    return f"scores/variations/{context}/{safe}_{kind}"


def attribution_stage(run: RunDir, config: StudyConfig, bridge, prompts: PromptSet) -> None:
    """Attribution patching of every neuron and head on each variation's pairs (cached)."""
    from workbench import generalize

    units = [(c, v) for c in prompts.contexts() for v in prompts.variations(c)]
    inputs_key = {"model": model_identity(bridge), "prompts": _prompt_key(prompts),
                  "n_leaves": config.localize.n_leaves, "readout": dataclasses.asdict(config.readout)}
    outputs = [f"{_variation_stem(c, v, k)}.json" for c, v in units for k in KIND_NAMES]
    outputs.append("attribution_timings.json")

    def compute() -> None:
        clock = time.perf_counter()
        scores = generalize.variation_scores(bridge, prompts, config.localize.n_leaves, exact_settings(config),
                                             distributions=audit_distributions(run.read_table(
                                                 "tables/answers.parquet")))
        for (context, variation), by_kind in scores.items():
            for kind, value in by_kind.items():
                value.save(run.path(_variation_stem(context, variation, kind)))
        run.write_json("attribution_timings.json", {"seconds": time.perf_counter() - clock, "units": len(units)})

    run.cached("attribution", inputs_key, outputs, compute)


def load_variation_scores(run: RunDir, prompts: PromptSet) -> dict:
    from workbench.localize.scores import ComponentScores

    return {(c, v): {k: ComponentScores.load(run.path(_variation_stem(c, v, k))) for k in KIND_NAMES}
            for c in prompts.contexts() for v in prompts.variations(c)}


def context_attribution(run: RunDir, context: str, kind: str):
    """Attribution over all of a context's pairs: the mean of its variations' scores (equal pairs each)."""
    from workbench.localize.scores import ComponentScores

    stems = sorted(run.path(f"scores/variations/{context}").glob(f"*_{kind}.json"))
    if not stems:
        raise ValueError(f"no attribution scores for context {context!r}: is it among the audited contexts?")
    loaded = [ComponentScores.load(stem.with_suffix("")) for stem in stems]
    mean = sum(s.scores for s in loaded) / len(loaded)
    return ComponentScores("attribution", kind, mean, {"variations": len(loaded), **loaded[0].metadata})


def localize_prompts(config: StudyConfig) -> PromptSet:
    return PromptSet.build([config.localize.context], names=names_subset(config.audit.names_per_group),
                           variations=config.audit.variations or None,
                           instruction_suffix=config.audit.instruction_suffix)


def audit_distributions(answers: pd.DataFrame) -> dict:
    """The audit's answer distributions keyed by (context, variation, name)."""
    from workbench.audit import distributions_from_frame

    keys = zip(answers.context, answers.variation, answers.name)
    return dict(zip(keys, distributions_from_frame(answers)))


def localize_stage(run: RunDir, config: StudyConfig, bridge) -> dict:
    """Score every neuron and head with each method on the localisation context; save scores and agreement."""
    from workbench.generalize import wanda_for
    from workbench.localize import ablation, heads, pairs, patching, wanda
    from workbench.localize.scores import agreement

    settings = config.localize
    prompts = localize_prompts(config)
    inputs_key = {"model": model_identity(bridge), "prompts": _prompt_key(prompts),
                  "localize": dataclasses.asdict(settings), "readout": dataclasses.asdict(config.readout)}
    stems = ["attribution_neurons", "attribution_heads", "patching_neurons", "patching_heads", "ablation_neurons",
             "ablation_heads", "head_attention", "wanda_selection"]
    outputs = [f"scores/{stem}.json" for stem in stems if _method_of(stem) in settings.methods]
    outputs += ["tables/localize_agreement.parquet", "localize_timings.json"]

    def compute() -> None:
        timings: dict[str, float] = {}
        clock = time.perf_counter()
        chosen = PromptSet([p for pair in prompts.pairs()[: settings.patch_pairs] for p in pair])
        few = pairs.build_pairs(bridge, chosen, n_leaves=settings.n_leaves, readout=exact_settings(config),
                                progress=False,
                                distributions=audit_distributions(run.read_table("tables/answers.parquet")))
        timings[f"pairs for patching and ablation ({len(few.pairs)}: leaves + baseline)"] = (
            time.perf_counter() - clock)
        timings["attribution (all neurons and heads, per variation)"] = run.read_json(
            "attribution_timings.json")["seconds"]
        neurons, head_scores = (context_attribution(run, settings.context, kind) for kind in KIND_NAMES)
        neurons.save(run.path("scores/attribution_neurons"))
        head_scores.save(run.path("scores/attribution_heads"))
        agreements = []
        if "patching" in settings.methods:
            clock = time.perf_counter()
            patched_neurons, stats_n = patching.patch_top(bridge, few, neurons, settings.patch_top_neurons)
            timings[f"patching ({settings.patch_top_neurons} neurons)"] = time.perf_counter() - clock
            clock = time.perf_counter()
            all_heads = _all(bridge, "attn_head")
            patched_heads = patching.patching_scores(bridge, few, all_heads)
            timings["patching (all heads)"] = time.perf_counter() - clock
            patched_neurons.save(run.path("scores/patching_neurons"))
            patched_heads.save(run.path("scores/patching_heads"))
            agreements.append({"a": "patching", "b": "attribution", "kind": "mlp_neuron", **stats_n})
            agreements.append({"a": "patching", "b": "attribution", "kind": "attn_head",
                               **agreement(patched_heads, head_scores, top=len(all_heads))})
        if "ablation" in settings.methods:
            clock = time.perf_counter()
            ablated_heads = ablation.ablation_scores(bridge, few, _all(bridge, "attn_head"))
            ablated_neurons = ablation.ablation_scores(bridge, few, neurons.top(settings.patch_top_neurons,
                                                                                absolute=True))
            timings["zero ablation (all heads + top neurons)"] = time.perf_counter() - clock
            ablated_heads.save(run.path("scores/ablation_heads"))
            ablated_neurons.save(run.path("scores/ablation_neurons"))
            agreements.append({"a": "zero_ablation", "b": "attribution", "kind": "attn_head",
                               **agreement(ablated_heads, head_scores, top=ablated_heads.scores.numel())})
            agreements.append({"a": "zero_ablation", "b": "attribution", "kind": "mlp_neuron",
                               **agreement(ablated_neurons, neurons, top=settings.patch_top_neurons)})
        if "heads" in settings.methods:
            clock = time.perf_counter()
            attention = heads.head_attention_scores(bridge, list(prompts))
            timings["head attention to the name"] = time.perf_counter() - clock
            attention.save(run.path("scores/head_attention"))
            agreements.append({"a": "head_attention", "b": "attribution", "kind": "attn_head",
                               **agreement(attention, head_scores, top=attention.scores.numel())})
        if "wanda" in settings.methods:
            clock = time.perf_counter()
            selection = wanda_for(bridge, prompts, settings)
            wanda.save_selection(selection, run.path("scores/wanda_selection"), model=bridge,
                                 metadata={"tau_black": settings.wanda_tau_black,
                                           "tau_white": settings.wanda_tau_white})
            timings["wanda (norms + streamed selection)"] = time.perf_counter() - clock
        run.write_table("tables/localize_agreement.parquet", pd.DataFrame(agreements))
        run.write_json("localize_timings.json", timings)

    run.cached("localize", inputs_key, outputs, compute)
    return run.read_json("localize_timings.json")


def _method_of(stem: str) -> str:
    return {"head_attention": "heads", "wanda_selection": "wanda"}.get(stem, stem.split("_")[0])


def _all(bridge, kind: str):
    from workbench.components import ModelShape

    return ModelShape.of(bridge).all(kind)


# ---------------------------------------------------------------- generalisation

def generalize_stage(run: RunDir, config: StudyConfig, bridge, prompts: PromptSet) -> None:
    """Attribution per variation, then the regimes, the Wanda matrix and the budget sweep (cached)."""
    from workbench import generalize

    settings = config.generalize
    baseline = run.read_table("tables/answers.parquet")
    stats_options = dict(scale=config.audit.scale, method=config.audit.method, n_boot=config.audit.n_boot,
                         seed=config.seed)
    inputs_key = {"model": model_identity(bridge), "prompts": _prompt_key(prompts),
                  "generalize": dataclasses.asdict(settings), "readout": dataclasses.asdict(config.readout),
                  "localize": dataclasses.asdict(config.localize), "stats": stats_options}
    outputs = ["tables/generalization.parquet", "tables/sweep.parquet", "tables/overlap.parquet",
               "generalize_timings.json"]

    def compute() -> None:
        timings = {}
        scores = load_variation_scores(run, prompts)
        budgets = {"mlp_neuron": settings.neuron_budget, "attn_head": settings.head_budget}
        cases = [case for regime in settings.regimes
                 for case in generalize.regime_cases(regime, scores, budgets, settings.neuron_rule)]
        clock = time.perf_counter()
        cases += generalize.wanda_cases(bridge, prompts, config.localize) if "cross_context" in settings.regimes else []
        timings["wanda per context"] = time.perf_counter() - clock
        clock = time.perf_counter()
        matrix, _ = generalize.evaluate(bridge, prompts, baseline, cases, exact_settings(config), stats_options,
                                        settings.ablation, settings.head_ablation)
        timings["pruned evaluations"] = time.perf_counter() - clock
        clock = time.perf_counter()
        sweep = generalize.budget_sweep(bridge, prompts, baseline, scores, config.localize.context,
                                        settings.sweep_fractions, exact_settings(config), stats_options,
                                        settings.ablation, settings.head_ablation)
        timings["budget sweep"] = time.perf_counter() - clock
        run.write_table("tables/generalization.parquet", matrix.assign(scale=config.audit.scale,
                                                                        smd_method=config.audit.method))
        run.write_table("tables/sweep.parquet", sweep.assign(scale=config.audit.scale,
                                                              smd_method=config.audit.method))
        run.write_table("tables/overlap.parquet", generalize.context_overlap(scores, budgets))
        run.write_json("generalize_timings.json", timings)

    run.cached("generalize", inputs_key, outputs, compute)


# ---------------------------------------------------------------- the whole study

def run_study(config: StudyConfig, out: Path, figures_dir: Path | None = Path("figures")) -> Path:
    """audit -> localise -> generalise -> report, resuming from the run directory's finished stages."""
    from workbench.study_report import write_study_report

    run = RunDir(out)
    write_config(run, config)
    torch.manual_seed(config.seed)
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    bridge = load_bridge(config)
    timings["load model"] = time.perf_counter() - clock
    prompts = audit_prompts(config)
    for name, stage in [("audit", lambda: audit_stage(run, config, bridge, prompts)),
                        ("attribution", lambda: attribution_stage(run, config, bridge, prompts)),
                        ("localize", lambda: localize_stage(run, config, bridge)),
                        ("generalize", lambda: generalize_stage(run, config, bridge, prompts))]:
        clock = time.perf_counter()
        stage()
        timings[name] = time.perf_counter() - clock
    info = manifest(config, bridge, timings)
    run.write_json("manifest.json", info)
    clock = time.perf_counter()
    report = write_study_report(run, info, figures_dir)
    info["timings_s"]["report"] = time.perf_counter() - clock
    run.write_json("manifest.json", info)
    return report


def prune_command(config: StudyConfig, bridge, plan_path: Path, out: Path, export: bool = False) -> Path:
    """Apply a saved pruning plan: bias and anomaly before and after on the config's prompts; optional export."""
    from workbench.anomaly import anomaly_report
    from workbench.prune import PlanError, PruningPlan, export_pruned, hooks_for, pruned_weights
    from workbench.stats import bias_reduction

    plan = PruningPlan.load(plan_path)
    if plan.model_hash != model_identity(bridge)["weight_hash"]:
        raise PlanError(f"{plan_path}: the plan was made for a model with weight hash {plan.model_hash[:16]}..., "
                        f"not {config.model} ({model_identity(bridge)['weight_hash'][:16]}...)")
    run = RunDir(out)
    prompts = audit_prompts(config)
    before = audit_stage(run, config, bridge, prompts)
    hooks = [] if plan.weight_selection else hooks_for(plan)
    context = pruned_weights(bridge, plan) if plan.weight_selection else bridge.hooks(fwd_hooks=hooks)
    with context:
        after = run_audit(bridge, prompts, exact=exact_settings(config))
    a = config.audit
    reduction = bias_reduction(before, after, scale=a.scale, method=a.method, n_boot=a.n_boot, seed=config.seed)
    run.write_table("tables/pruned_answers.parquet", after)
    run.write_table("tables/pruned_bias_reduction.parquet", reduction)
    report = anomaly_report(bridge, hooks or None, before, after)
    if plan.weight_selection:
        from workbench.anomaly import perplexity

        with pruned_weights(bridge, plan):
            report.update(kl=None, perplexity_pruned=perplexity(bridge))
    run.write_json("pruned_anomaly.json", report)
    if export:
        export_pruned(bridge, bridge.workbench_tokenizer, plan, run.path("pruned_model"))
    return run.root
