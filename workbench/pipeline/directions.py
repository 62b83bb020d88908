"""The direction stage: direction edits beside pruning in the same regimes, and one anomaly panel for both.

Each configured edit ([directions] edits, fitted_on) is fitted per regime source on each fold's selection names
(or once on the synthetic set) and evaluated on the fold's evaluation names, like the pruning of the generalize
stage, next to random edits of the same form (`generalize.summarise`'s rank test and mean difference). The
prunings enter the cross_context regime here when the generalize stage did not run it, so that the side-by-side
table has every regime for both families. The panel (`panel_rows`) measures, for the context-level version of
every intervention on fold 0 (its cross_context source): KL and perplexity on neutral text, the capability suite,
recognition of the name's group (a probe held out by name, and asking the model) and the spill-over onto gender
bias."""

from __future__ import annotations

import dataclasses

import pandas as pd
from tqdm.auto import tqdm

from workbench.audit.bias_types import GENDER
from workbench.audit.stats import RACE
from workbench.components import KINDS
from workbench.config import StudyConfig
from workbench.pipeline.runstore import RunDir
from workbench.prune import generalize
from workbench.prune.anomaly import kl_on_neutral, perplexity
from workbench.prune.capability import capability_items, capability_panel, recognition_by_asking
from workbench.prune.cross_type import cross_type_matrix
from workbench.prune.directions import (
    Activations, collect_activations, control_kind, fit_plan, recognition_auc, synthetic_prompts,
)
from workbench.readout.prompts import PromptSet, load_names

PANEL_COLUMNS = [
    "intervention", "kind", "context", "size", "kl_on_neutral", "perplexity_ratio", "capability_before",
    "capability_after", "n_capability_items", "probe_layer", "probe_auc_before", "probe_auc_after",
    "asking_accuracy_before", "asking_accuracy_after", "asking_auc_before", "asking_auc_after",
]


def synthetic_names(config: StudyConfig) -> list:
    """Name-bank entries not among the study's names: `synthetic_names_per_group` per group, in rank order."""
    from workbench.config import study_names

    used = set(study_names(config))
    chosen, counts = [], {}
    for entry in load_names(source="bank"):
        if entry.name not in used and counts.get(entry.group, 0) < config.directions.synthetic_names_per_group:
            chosen.append(entry)
            counts[entry.group] = counts.get(entry.group, 0) + 1
    return chosen


def fitter(bridge, config: StudyConfig, spec: str, activations: Activations, synthetic: Activations | None):
    """fit(source cells, selection names) -> the edit `spec` fitted there (synthetic: one fit for every source)."""
    spec, _, fitted_on = spec.partition("@")
    fitted_on = fitted_on or "selection"
    intervention, method = spec.split(":")
    s = config.directions
    options = dict(layers=s.layers or None, fit_position=s.fit_position, fitted_on=fitted_on,
                   scale=s.steering_scale, seed=config.seed)
    once = {}

    def fit(sources, names):
        if fitted_on == "synthetic":
            if "plan" not in once:
                once["plan"] = fit_plan(bridge, synthetic, method, intervention, **options)
            return once["plan"]
        return fit_plan(bridge, activations.rows(sources, names), method, intervention, **options)

    return fit


def direction_cases(bridge, config: StudyConfig, prompts: PromptSet, folds: list | None, activations: Activations,
                    synthetic: Activations | None) -> list:
    """Every configured edit in every [directions] regime, cross-fitted over the name folds."""
    units = [(c, v) for c in prompts.contexts() for v in prompts.variations(c)]
    splits = folds or [(prompts, prompts)]
    cases = []
    for spec in config.directions.edits:
        fit = fitter(bridge, config, spec, activations, synthetic)
        for regime in config.directions.regimes:
            for fold, (selection, evaluation) in enumerate(splits):
                names = {p.name for p in selection}
                made = generalize.edit_cases(regime, units, lambda sources: fit(sources, names))
                cases += generalize.held_out(made, evaluation, fold) if folds else made
    return cases


def random_edit_controls(config: StudyConfig, prompts: PromptSet, cases: list) -> list:
    """`random_draws` random edits per control kind (and size), shaped after the first edit of that kind."""
    shapes = {}
    for case in cases:
        key = (control_kind(case.kind), case.pruning.size)
        shapes.setdefault(key, case.pruning.edit)
    return [control for _, plan in sorted(shapes.items(), key=lambda item: str(item[0]))
            for control in generalize.random_edit_cases(plan, prompts, config.directions.random_draws, config.seed)]


def pruning_cross_context(config: StudyConfig, prompts: PromptSet, folds: list | None, fold_scores: list | None,
                          scores: dict) -> list:
    """The prunings' cross_context cases (held out like the generalize stage's), for the side-by-side table."""
    budgets = {"mlp_neuron": config.generalize.neuron_budget, "attn_head": config.generalize.head_budget}
    rule = config.generalize.neuron_rule
    if folds is None:
        return generalize.regime_cases("cross_context", scores, budgets, rule)
    return generalize.cross_fit_cases("cross_context", folds, fold_scores, budgets, rule)


def panel_context(config: StudyConfig, prompts: PromptSet) -> str:
    """The context the panel's interventions are fitted on: the localisation context where it was audited."""
    contexts = prompts.contexts()
    return config.localize.context if config.localize.context in contexts else contexts[0]


def panel_interventions(cases: list, context: str) -> list[tuple[str, str, generalize.Pruning]]:
    """(label, panel kind, pruning) of each intervention's context-level version for `context` on fold 0 (its
    cross_context case with source = target = context), and of the first random draw of each form there (panel
    kind "<kind>:random" for a random pruning)."""
    chosen: dict[str, generalize.Pruning] = {}
    for case in cases:
        context_level = (case.regime == "cross_context" and case.fold in (0, None)
                         and case.source == case.target == context)
        first_draw = case.regime == "random" and case.draw == 0 and case.target == context
        kind = case.kind if case.regime != "random" or case.kind not in KINDS else f"{case.kind}:random"
        if (context_level or first_draw) and kind not in chosen:
            chosen[kind] = case.pruning
    return [(KIND_LABELS.get(kind, kind), kind, pruning) for kind, pruning in chosen.items()]


KIND_LABELS = {"mlp_neuron": "prune neurons", "attn_head": "prune heads", "mlp_neuron:random": "random neurons",
               "attn_head:random": "random heads"}


def panel_rows(bridge, config: StudyConfig, prompts: PromptSet, context: str, interventions: list, ablation: str,
               head_ablation: str, progress: bool = True) -> pd.DataFrame:
    """The anomaly panel (see the module), one row per intervention; a probe's AUC is at the name's tokens of the
    layer after the last edited one (the last layer when every layer is edited)."""
    items = capability_items(config.directions.capability_items_per_task, config.seed)
    names = prompts.to_frame().drop_duplicates("name")
    n_layers = bridge.cfg.n_layers
    layer = min(max(config.directions.layers or [n_layers - 1]) + 1, n_layers - 1)
    before = collect_activations(bridge, prompts)
    probe_before = recognition_auc(before, layer, seed=config.seed)
    base_perplexity = perplexity(bridge)
    rows = []
    for label, kind, pruning in tqdm(interventions, desc="anomaly panel", unit="intervention",
                                      disable=not progress):
        def edit(pruning=pruning):
            return pruning.active(bridge, ablation, head_ablation)

        with edit():
            after = collect_activations(bridge, prompts)
            edited_perplexity = perplexity(bridge)
        capability = capability_panel(bridge, items, edit=edit).set_index("task").loc["all"]
        asking = recognition_by_asking(bridge, names.name.tolist(), names.race.tolist(), edit=edit)
        rows.append({"intervention": label, "kind": kind, "context": context, "size": pruning.size,
                     "kl_on_neutral": kl_on_neutral(bridge, None, edit=edit),
                     "perplexity_ratio": edited_perplexity / base_perplexity,
                     "capability_before": capability.accuracy_before, "capability_after": capability.accuracy_after,
                     "n_capability_items": int(capability.n_items), "probe_layer": layer,
                     "probe_auc_before": probe_before, "probe_auc_after": recognition_auc(after, layer,
                                                                                        seed=config.seed),
                     "asking_accuracy_before": asking["accuracy_before"],
                     "asking_accuracy_after": asking["accuracy_after"], "asking_auc_before": asking["auc_before"],
                     "asking_auc_after": asking["auc_after"]})
    return pd.DataFrame(rows, columns=PANEL_COLUMNS)


def stage_cases(bridge, config: StudyConfig, prompts: PromptSet, folds: list | None, scores: dict | None,
                fold_scores: list | None) -> list:
    """Every edit case (fitted per regime source and fold), its random controls, and the prunings' cross_context
    cases with theirs (when the prunings' scores exist)."""
    from workbench.components import ModelShape
    from workbench.pipeline.study import random_controls

    settings = config.directions
    activations = collect_activations(bridge, prompts, system_prompt=config.audit.system_prompt or None)
    synthetic = (collect_activations(bridge, synthetic_prompts(synthetic_names(config), settings.synthetic_templates))
                 if any(spec.endswith("@synthetic") for spec in settings.edits) else None)
    edits = direction_cases(bridge, config, prompts, folds, activations, synthetic)
    cases = edits + random_edit_controls(config, prompts, edits)
    if "cross_context" in settings.regimes and scores is not None:
        prunings = pruning_cross_context(config, prompts, folds, fold_scores, scores)
        cases += prunings + random_controls(ModelShape.of(bridge), prompts, prunings, config.generalize.random_draws,
                                            config.seed)
    return cases


def directions_stage(run: RunDir, config: StudyConfig, bridge, prompts: PromptSet, audit, scores: dict | None,
                     fold_scores: list | None) -> None:
    """Two cached stages: "directions" (the edits in the regimes, the prunings' cross_context cases, their random
    controls and the bias-type spill-over: tables/directions.parquet, tables/direction_types.parquet) and
    "direction_panel" (the anomaly panel, tables/direction_panel.parquet, with one plan per context-level edit
    under plans/directions/)."""
    from workbench.pipeline.study import (
        _prompt_key, exact_settings, held_out_folds, model_identity, selection_directions, stats_options,
    )

    settings, gen = config.directions, config.generalize
    folds = held_out_folds(config, prompts)
    stats = stats_options(config)
    inputs_key = {"model": model_identity(bridge), "prompts": _prompt_key(prompts),
                  "directions": dataclasses.asdict(settings), "generalize": dataclasses.asdict(gen),
                  "readout": dataclasses.asdict(exact_settings(config)), "stats": stats}

    def evaluate() -> None:
        cases = stage_cases(bridge, config, prompts, folds, scores, fold_scores)
        directions = selection_directions(config, audit.answers, folds)
        summary, after = generalize.evaluate(bridge, prompts, audit.answers, cases, exact_settings(config), stats,
                                             gen.ablation, gen.head_ablation, directions=directions,
                                             alpha=config.audit.alpha)
        run.write_table("tables/directions.parquet",
                        summary.assign(scale=config.audit.scale, smd_method=config.audit.method))
        crossed = after[after.regime.isin(["cross_context", "random"])]
        types = cross_type_matrix(crossed, audit.answers, [RACE, GENDER], stats, None, config.audit.alpha)
        run.write_table("tables/direction_types.parquet", types)

    def panel() -> None:
        context = panel_context(config, prompts)
        interventions = panel_interventions(stage_cases(bridge, config, prompts, folds, scores, fold_scores), context)
        for _, _, pruning in interventions:
            if pruning.edit is not None and pruning.edit.method != "random":
                pruning.edit.save(run.path(f"plans/directions/{pruning.kind.replace(':', '_').replace('@', '_')}"
                                           ".json"))
        run.write_table("tables/direction_panel.parquet",
                        panel_rows(bridge, config, prompts, context, interventions, gen.ablation, gen.head_ablation))

    after_stages = ("audit", "attribution", *(("attribution_folds",) if folds is not None else ()))
    run.cached("directions", inputs_key, ["tables/directions.parquet", "tables/direction_types.parquet"], evaluate,
               after=after_stages)
    run.cached("direction_panel", inputs_key, ["tables/direction_panel.parquet"], panel, after=after_stages)


def side_by_side(generalization: pd.DataFrame | None, directions: pd.DataFrame) -> pd.DataFrame:
    """One row per intervention and regime (prompt, leave_one_out, cross_context on its own context): the bias
    removed with its CI, reduction %, the random draws' mean and the removal minus random with its CI."""
    frames = [t for t in (generalization, directions) if t is not None and not t.empty]
    table = pd.concat(frames, ignore_index=True)
    table = table[(table.regime != "random") & (table.regime != "sweep") & table.removed.notna()]
    table = table[(table.regime != "cross_context") | (table.source == table.target)]
    table = table.drop_duplicates(["regime", "kind", "target"], keep="last")
    table = table.assign(intervention=table.kind.map(lambda k: KIND_LABELS.get(k, k)))
    columns = ["intervention", "kind", "regime", "target", "n_pruned_mean", "n_names", "bias_before", "removed",
               "removed_low", "removed_high", "reduction_pct", "ci_low", "ci_high", "random_mean",
               "removed_minus_random", "difference_low", "difference_high", "n_random", "anomaly_rate"]
    order = {k: i for i, k in enumerate(KINDS)}
    return (table.assign(_order=table.kind.map(lambda k: order.get(k, len(order))))
            .sort_values(["_order", "kind", "regime"]).reindex(columns=columns).reset_index(drop=True))


def panel_with_removal(panel: pd.DataFrame, directions: pd.DataFrame, types: pd.DataFrame) -> pd.DataFrame:
    """The panel with each intervention's race bias removed on the panel's context (bias_before; removed,
    removed_low/high: the context-level case pooled over the folds, or the random form's first draw), its gender
    spill-over (gender_removed, gender_low/high, and gender_random: the mean over the form's random draws) and
    capability_lost (1 - capability_after)."""
    if panel.empty:
        return panel.assign(bias_before=[], removed=[], removed_low=[], removed_high=[], gender_removed=[],
                            gender_low=[], gender_high=[], gender_random=[], capability_lost=[])
    context = panel.context.iloc[0]

    def source_and_kind(kind: str) -> tuple[str, str]:
        if kind.endswith(":random"):
            base = kind.rsplit(":", 1)[0]
            return "random 0", base if base in KINDS else kind
        return context, kind

    race = directions[(directions.target == context)
                      & ((directions.regime == "cross_context") & (directions.source == context)
                         | (directions.regime == "random") & (directions.draw == 0))]
    race = race.set_index(["source", "kind"])
    gender = types[(types.target_type == GENDER.name) & (types.context == context)]
    spill = gender.set_index(["source_type", "kind"])
    random_gender = gender[gender.source_type.str.startswith("random")].groupby("kind").removed.mean()
    keys = [source_and_kind(k) for k in panel.kind]

    def pick(frame: pd.DataFrame, column: str) -> list[float]:
        return [float(frame[column].get(key, float("nan"))) for key in keys]

    return panel.assign(
        bias_before=pick(race, "bias_before"), removed=pick(race, "removed"), removed_low=pick(race, "removed_low"),
        removed_high=pick(race, "removed_high"),
        gender_removed=pick(spill, "removed"), gender_low=pick(spill, "removed_low"),
        gender_high=pick(spill, "removed_high"),
        gender_random=[float(random_gender.get(control_kind(kind), float("nan"))) for _, kind in keys],
        capability_lost=1 - panel.capability_after)
