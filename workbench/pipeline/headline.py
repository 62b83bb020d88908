"""The report's first section: the study's questions answered in one sentence each, with the number, its interval
and its control (is there a bias, where, could the design see one, was the localisation checked, did pruning beat
random, does it generalise, at what cost, and how the direction edits and the positive control did)."""

from __future__ import annotations

import pandas as pd

from workbench.audit.power import minimum_detectable_reduction
from workbench.pipeline.runstore import RunDir

KIND_WORDS = {"mlp_neuron": "neurons", "attn_head": "heads"}


def _ci(value: float, low: float, high: float, digits: int = 3) -> str:
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _covers_zero(low: float, high: float) -> bool:
    return bool(pd.isna(low) or pd.isna(high) or low <= 0 <= high)


def _what(kind: str, size) -> str:
    """'Pruning the top 64 neurons', 'The ace:mean_difference edit'."""
    if kind in KIND_WORDS:
        return f"Pruning the top {int(size)} {KIND_WORDS[kind]}"
    return f"The {kind} edit"


def bias_answer(contexts: pd.DataFrame, correction: str) -> str:
    """Is there a bias above its noise floor, after correction; and its held-out signed size."""
    significant = contexts[contexts.significant.astype(bool)]
    parts = []
    for row in contexts.sort_values("p_adjusted").itertuples():
        signed = _ci(row.signed_bias, row.signed_ci_low, row.signed_ci_high)
        parts.append(f"{row.context}: mean |SMD| {row.mean_abs_smd:.3f} against a noise floor of {row.null_mean:.3f} "
                     f"(permutation p {row.p_perm:.3f}, {correction} {row.p_adjusted:.3f}), held-out signed bias "
                     f"{signed}")
    shown = parts[:4] + ([f"{len(parts) - 4} more in the audit's table"] if len(parts) > 4 else [])
    verdict = (f"**Yes, in {len(significant)} of {len(contexts)} context(s)**" if len(significant)
               else f"**No context's bias is above its noise floor** after {correction} over {len(contexts)}")
    text = f"Is there a race bias? {verdict}: " + "; ".join(shown) + "."
    if len(significant) and all(_covers_zero(r.signed_ci_low, r.signed_ci_high) for r in significant.itertuples()):
        text += (" The signed bias's interval covers 0: the bias is above noise in size, but its direction is not "
                 "the same in every variation and half of the names.")
    return text


def where_answer(bias: pd.DataFrame, correction: str) -> str:
    """The variation with the largest |SMD|, and how many are significant after correction."""
    measured = bias.dropna(subset=["smd"])
    if not len(measured):
        return "Where? No variation has an SMD (every name's answer mass is below the valid-mass rule)."
    top = measured.loc[measured.smd.abs().idxmax()]
    n_significant = int(measured.significant.astype(bool).sum())
    return (f"Where? The largest is {top.context}/{top.variation}: SMD {_ci(top.smd, top.ci_low, top.ci_high)} "
            f"({correction} p {top.p_adjusted:.3f} over {len(measured)} variations; positive = White names get "
            f"higher numbers); {n_significant} of {len(measured)} variations are significant on their own.")


def power_answer(power: pd.DataFrame | None, contexts: pd.DataFrame, per_group: int) -> str:
    """Could this design have seen a bias: the smallest it finds with 80 % power, next to what it measured."""
    if power is None or "mde_mean_abs" not in power:
        return ""
    rows = power.merge(contexts[["context", "mean_abs_smd"]], on="context")
    parts = [f"{row.context}: {row.mde_mean_abs:.3f} (mean |SMD|; signed {row.mde_signed:.3f}), where it measured "
             f"{row.mean_abs_smd:.3f}" for row in rows.itertuples()]
    return (f"Could the design see one? At {per_group} names per group the smallest bias found with 80 % power is "
            + "; ".join(parts[:4]) + ".")


def bias_types_answer(types: pd.DataFrame | None) -> str:
    """Which bias types are significant in the larger family of every bias type x context."""
    if types is None or not len(types):
        return ""
    correction, family = types.correction.iloc[0], types.family.iloc[0]
    significant = types[types.significant.astype(bool)]
    listed = "; ".join(f"{r.bias_type} ({r.side_a} minus {r.side_b}) in {r.context}, mean |SMD| {r.mean_abs_smd:.3f}, "
                       f"p {r.p_adjusted:.3f}" for r in significant.itertuples()) or "none"
    race = types[types.bias_type == "race"]
    own = (f" (race's own test in this family: p {race.p_adjusted.min():.3f})" if len(race) and not
           race.significant.astype(bool).any() else "")
    return f"Bias types, {correction} over {family}: significant: {listed}{own}."


def localisation_answer(calibration: pd.DataFrame | None, skipped: list[str] | None) -> str:
    if skipped:
        return (f"Localisation and pruning: **skipped** ({', '.join(skipped)}), since no context's bias is "
                "significant after correction; `[localize] always = true` runs them.")
    if calibration is None or not len(calibration):
        return ""
    parts = [f"{KIND_WORDS.get(r.kind, r.kind)} Spearman {r.spearman:.2f} over {r.n_compared}, top-50 overlap "
             f"{r.overlap_50:.2f}" for r in calibration.itertuples()]
    return (f"Is the localisation checked? Attribution against activation patching on the same "
            f"{int(calibration.pairs.iloc[0])} pair(s): " + "; ".join(parts) + ".")


REGIME_SHORT = {"prompt": "in-prompt", "leave_one_out": "leave-one-out", "cross_context": "cross-context"}


def _removal(row) -> str:
    """'0.137 [-0.021, 0.285]', with the share where its interval is narrower than 100 points."""
    text = _ci(row.removed, row.removed_low, row.removed_high)
    if pd.notna(row.ci_low) and pd.notna(row.ci_high) and row.ci_high - row.ci_low < 100:
        text += f" ({_ci(row.reduction_pct, row.ci_low, row.ci_high, 0)} %)"
    return text


def _verdict(rows: pd.DataFrame) -> str:
    """Which regimes' removals are apart from the random draws'."""
    if rows.better_than_random.notna().any():
        better = rows.regime[rows.better_than_random.astype("boolean").fillna(False)]
        rule = "rank test against the draws, Holm"
    else:
        better = rows.regime[rows.difference_low > 0]
        rule = "the difference's interval above 0; no rank test below 19 draws"
    where = ", ".join(REGIME_SHORT[r] for r in better) or "nowhere"
    return f"better than random ({rule}): {where}"


def removal_answers(table: pd.DataFrame) -> list[str]:
    """Per intervention: the bias removed on held-out names in each regime (specific to general), against the
    random draws of its form and the smallest removal the design detects."""
    rows = table[table.regime.isin(list(REGIME_SHORT)) & table.removed.notna()]
    if "bias_to_remove" in rows:
        rows = rows[rows.bias_to_remove.astype("boolean").fillna(False)]
    if (rows.regime == "cross_context").any() and (rows.source != rows.target)[rows.regime == "cross_context"].any():
        rows = rows[(rows.regime != "cross_context") | (rows.source != rows.target)]
    lines = []
    for kind, part in rows.groupby("kind", sort=False):
        part = part.assign(order=part.regime.map(list(REGIME_SHORT).index)).sort_values("order")
        first = part.iloc[0]
        size = first.budget if pd.notna(first.budget) else first.n_pruned_mean
        if part.removed.nunique() == 1 and len(part) > 1:  # one fit for every regime (the synthetic set)
            part = part.iloc[:1].assign(regime="prompt")
            removals = f"{_removal(first)} in every regime (one fit)"
        else:
            removals = "; ".join(f"{REGIME_SHORT[r.regime]} {_removal(r)}" for r in part.itertuples())
        differences = ", ".join(f"{REGIME_SHORT[r.regime]} {_ci(r.removed_minus_random, r.difference_low, r.difference_high)}"
                                for r in part.itertuples() if pd.notna(r.removed_minus_random))
        detectable = [minimum_detectable_reduction(r.removed_low, r.removed_high) for r in part.itertuples()]
        line = f"{_what(kind, size)} removes {removals} of a bias of {first.bias_before:.3f}"
        if differences:
            line += (f"; {int(first.n_random)} random draws of its form remove {first.random_mean:.0f} % on average, "
                     f"the difference is {differences}: {_verdict(part)}")
        floor = f"{min(detectable):.2f}" + (f"-{max(detectable):.2f}" if max(detectable) - min(detectable) >= 0.005 else "")
        lines.append(line + f". No removal below {floor} could be told from none here (80 % power).")
    return lines


def cost_answer(matrix: pd.DataFrame) -> str:
    """The anomaly rate of the chosen prunings next to the random draws' and the unpruned model's."""
    chosen = matrix[(matrix.regime == "prompt") & matrix.anomaly_rate.notna()]
    if not len(chosen):
        return ""
    random = matrix[matrix.regime == "random"].groupby("kind").anomaly_rate.mean()
    parts = [f"{KIND_WORDS.get(r.kind, r.kind)} {r.anomaly_rate:.2f}" + (
        f" (random {random[r.kind]:.2f})" if r.kind in random else "") for r in chosen.itertuples()]
    return (f"At what cost? Answer mass outside the unpruned model's 5-95 % range: " + ", ".join(parts)
            + f", against {chosen.baseline_anomaly_rate.iloc[0]:.2f} unpruned.")


def panel_answer(panel: pd.DataFrame | None) -> str:
    if panel is None or not len(panel):
        return ""
    parts = [f"{r.intervention}: KL {r.kl_on_neutral:.2f} nats, capability {r.capability_after:.2f}, asking AUC "
             f"{r.asking_auc_after:.2f}" for r in panel.itertuples()]
    first = panel.iloc[0]
    return (f"The anomaly panel (unedited: capability 1, asking AUC {first.asking_auc_before:.2f}, probe AUC "
            f"{first.probe_auc_before:.2f}): " + "; ".join(parts) + ".")


def spike_in_answers(table: pd.DataFrame | None) -> list[str]:
    if table is None:
        return []
    return [f"Positive control ({row.context}, {row.method.replace('_', ' ')}): the planted components rank "
            f"{row.ranks} (recall {row.recall:.2f} at {row.budget}); pruning the top {row.budget} removes "
            f"{row.plant_removed_pct:.0f} % of a planted {row.planted_smd:.3f} (left "
            f"{_ci(row.plant_left, row.plant_left_low, row.plant_left_high)}); "
            f"random prunings remove {row.random_mean:.3f} on average (p_rank {row.p_rank:.2f})."
            for row in table.itertuples()]


def _table(run: RunDir, name: str) -> pd.DataFrame | None:
    return run.read_table_if_present(f"tables/{name}.parquet")


def headline_section(run: RunDir, manifest: dict, power: pd.DataFrame | None) -> dict:
    """The report's "Answers" section from the run's tables (`power`: the audit's context power table)."""
    config = manifest["config"]
    a = config["audit"]
    contexts = run.read_table("tables/context_significance.parquet")
    lines = [bias_answer(contexts, a["correction"]),
             where_answer(run.read_table("tables/significance.parquet"), a["correction"]),
             power_answer(power, contexts, a["names_per_group"]),
             bias_types_answer(_table(run, "bias_type_contexts")),
             *spike_in_answers(_table(run, "spike_in")),
             localisation_answer(_table(run, "localize_calibration"), manifest.get("skipped"))]
    matrix = _table(run, "generalization")
    if matrix is not None:
        lines += removal_answers(matrix)
        lines.append(cost_answer(matrix))
    directions = _table(run, "directions")
    if directions is not None:
        edits = directions[~directions.kind.isin(list(KIND_WORDS))]
        lines += removal_answers(edits)
        lines.append(panel_answer(_table(run, "direction_panel")))
    estimand = (f"Every number is a {a['method']} SMD on the {a['scale']} scale (White minus Black unless named "
                "otherwise), removals on held-out names with 95 % intervals, next to random controls of the same "
                "form; the sections below give the tables, their estimands and the figures.")
    return {"heading": "Answers", "text": estimand + "\n\n" + "\n".join(f"- {line}" for line in lines if line)}
