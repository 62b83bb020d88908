"""The generalisation study: prune on one prompt set, measure the bias on another.

Scores come from attribution patching on every variation's White/Black pairs (neurons and heads), and from
the paper's Wanda weight scores per context. A pruning is then chosen for a *source* and evaluated on a
*target*:
- prompt: source = one variation, target = the same variation (the paper's prompt-specific pruning);
- leave_one_out: source = the other variations of the same context, target = the held-out variation;
- cross_context: source = a whole context, target = every context (the full matrix; its diagonal is
  context-level pruning evaluated in-sample).
Components common to several variations are chosen as in the paper: heads are the k most frequent among the
variations' top-k lists; neurons are the intersection of the variations' top-k lists ("intersection") or, as
an option, the k most frequent ("most_frequent"). Pruned components are zeroed by weight edits (a neuron's
down-projection column, a head's W_O slice or, for query-zeroing, its W_Q rows), which give the same logits as
the ablation hooks at no run-time cost, and are restored afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pandas as pd
from tqdm.auto import tqdm

from workbench.anomaly import inlier_ratio, invalid_rate
from workbench.audit import answers_frame, read_answers
from workbench.components import Component, ModelShape
from workbench.localize.attribution import attribution_scores
from workbench.localize.pairs import build_pairs
from workbench.localize.scores import ComponentScores
from workbench.prompts import PromptSet
from workbench.prune import PruningPlan, intersection, most_frequent, pruned_weights
from workbench.readout import ExactReadoutConfig
from workbench.stats import bias_reduction

KINDS = ("mlp_neuron", "attn_head")


@dataclass
class Pruning:
    """What to remove: components (hook ablation) or, for Wanda, a weight selection."""

    label: str
    kind: str  # "mlp_neuron", "attn_head" or "wanda"
    components: list[Component]
    apply: Callable[[], object] | None = None  # a context manager factory for weight-level pruning

    @contextmanager
    def active(self, bridge, ablation: str, head_ablation: str) -> Iterator[None]:
        if self.apply is not None:
            with self.apply():
                yield
            return
        mode = head_ablation if self.kind == "attn_head" else ablation
        if not self.components:
            yield
            return
        # zeroing as a weight edit gives the same logits as the ablation hook, without the hook's cost
        plan = PruningPlan(model=bridge.workbench_name, model_hash=getattr(bridge, "workbench_hash", "unknown"),
                           components=self.components, method=self.label, selection={"rule": "top_k"},
                           ablation=mode)
        with pruned_weights(bridge, plan):
            yield


def variation_scores(bridge, prompts: PromptSet, n_leaves: int, readout: ExactReadoutConfig,
                     progress: bool = True, distributions: dict | None = None,
                     ) -> dict[tuple[str, str], dict[str, ComponentScores]]:
    """Attribution scores of every neuron and head, per (context, variation).

    `distributions` ((context, variation, name) -> AnswerDistribution) reuses the audit's read-out."""
    scores = {}
    units = [(c, v) for c in prompts.contexts() for v in prompts.variations(c)]
    for context, variation in tqdm(units, desc="attribution per variation", disable=not progress):
        subset = prompts.filter(context=context, variations=[variation])
        inputs = build_pairs(bridge, subset, n_leaves=n_leaves, readout=readout, progress=False,
                             distributions=distributions)
        neurons, heads = attribution_scores(bridge, inputs, progress=False)
        scores[(context, variation)] = {"mlp_neuron": neurons, "attn_head": heads}
    return scores


def common_components(lists: list[list[Component]], kind: str, k: int, neuron_rule: str) -> list[Component]:
    """The paper's rule for components shared by several prompts."""
    if kind == "mlp_neuron" and neuron_rule == "intersection":
        return intersection(lists)
    return most_frequent(lists, k)


def regime_cases(regime: str, scores: dict[tuple[str, str], dict[str, ComponentScores]], budgets: dict[str, int],
                 neuron_rule: str) -> list[tuple[str, str, str, list[tuple[str, str]], Pruning]]:
    """(regime, source, target_context, target units, pruning) for every case of a regime."""
    cases = []
    contexts = sorted({c for c, _ in scores})
    for kind in KINDS:
        k = budgets[kind]
        top = {unit: s[kind].top(k) for unit, s in scores.items()}
        for context in contexts:
            units = [u for u in scores if u[0] == context]
            if regime == "prompt":
                for unit in units:
                    cases.append((regime, unit[1], context, [unit], Pruning(f"{unit[1]}", kind, top[unit])))
            elif regime == "leave_one_out":
                for unit in units:
                    others = [top[u] for u in units if u != unit]
                    chosen = common_components(others, kind, k, neuron_rule) if others else []
                    cases.append((regime, f"not {unit[1]}", context, [unit], Pruning(f"not {unit[1]}", kind, chosen)))
            elif regime == "cross_context":
                chosen = common_components([top[u] for u in units], kind, k, neuron_rule)
                for target in contexts:
                    target_units = [u for u in scores if u[0] == target]
                    cases.append((regime, context, target, target_units, Pruning(context, kind, chosen)))
            else:
                raise ValueError(f"unknown regime {regime!r}: use prompt, leave_one_out or cross_context")
    return cases


def evaluate(bridge, prompts: PromptSet, baseline: pd.DataFrame, cases, readout: ExactReadoutConfig,
             stats_options: dict, ablation: str = "zero", head_ablation: str = "zero",
             progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Bias before/after, reduction with CI and anomaly for every (regime, source, target, kind).

    Returns the summary table and the per-prompt answers of every pruned model.
    """
    answers_after: list[pd.DataFrame] = []
    for regime, source, target, units, pruning in tqdm(cases, desc="pruned evaluations", disable=not progress):
        subset = _units(prompts, units)
        with pruning.active(bridge, ablation, head_ablation):
            answers = answers_frame(subset, read_answers(bridge, subset, exact=readout, progress=False))
        answers_after.append(answers.assign(regime=regime, source=source, target=target, kind=pruning.kind,
                                            n_pruned=len(pruning.components)))
    after = pd.concat(answers_after, ignore_index=True)
    return summarise(after, baseline, stats_options), after


def summarise(after: pd.DataFrame, baseline: pd.DataFrame, stats_options: dict) -> pd.DataFrame:
    """One row per (regime, kind, source-set, target context): the prompt and leave-one-out regimes pool their
    per-variation prunings into one context-level number (mean |SMD| over the context's variations)."""
    rows = []
    for (regime, kind, target), group in after.groupby(["regime", "kind", "target"], sort=True):
        sources = [None] if regime in ("prompt", "leave_one_out") else sorted(group.source.unique())
        for source in sources:
            part = group if source is None else group[group.source == source]
            before = _matching(baseline, part)
            reduction = bias_reduction(before, part, **stats_options).iloc[0]
            inliers = inlier_ratio(before, part)
            rows.append({
                "regime": regime, "kind": kind, "source": source if source is not None else "each variation",
                "target": target, "bias_before": reduction.bias_before, "bias_after": reduction.bias_after,
                "reduction_pct": reduction.reduction_pct, "ci_low": reduction.ci_low, "ci_high": reduction.ci_high,
                "n_pruned_mean": float(part.n_pruned.mean()),
                "anomaly_rate": float(inliers.anomaly_rate.mean()),
                "baseline_anomaly_rate": float(inlier_ratio(before, before).anomaly_rate.mean()),
                "invalid_rate": invalid_rate(part)["invalid_rate"],
            })
    return pd.DataFrame(rows)


def _units(prompts: PromptSet, units: list[tuple[str, str]]) -> PromptSet:
    keep = set(units)
    return PromptSet([p for p in prompts if (p.context, p.variation) in keep])


def _matching(baseline: pd.DataFrame, part: pd.DataFrame) -> pd.DataFrame:
    keys = ["context", "variation", "name"]
    return baseline.merge(part[keys].drop_duplicates(), on=keys)


def budget_for(bridge, kind: str, fraction: float) -> int:
    """Components of a kind in a fraction of the model (at least one)."""
    shape = ModelShape.of(bridge)
    return max(1, round(fraction * shape.n_layers * shape.count(kind)))


def wanda_for(bridge, prompts: PromptSet, settings) -> dict:
    """The paper's Wanda selection (top tau_B of the Black scores minus top tau_W of the White) for prompts."""
    from workbench.localize import wanda

    groups = {race: [p for p in prompts if p.race == race] for race in ("black", "white")}
    norms = wanda.wanda_input_norms(bridge, groups, progress=False)
    return wanda.wanda_selection(bridge, norms["black"], norms["white"], settings.wanda_tau_black,
                                 settings.wanda_tau_white)


def wanda_cases(bridge, prompts: PromptSet, settings) -> list:
    """Cross-context cases for the paper's Wanda weights: a selection per source context, every target."""
    cases = []
    contexts = prompts.contexts()
    for source in contexts:
        selection = wanda_for(bridge, prompts.filter(context=source), settings)
        pruning = Pruning(source, "wanda", [], apply=_weights_zeroed(bridge, selection))
        for target in contexts:
            units = [(target, v) for v in prompts.variations(target)]
            cases.append(("cross_context", source, target, units, pruning))
    return cases


def _weights_zeroed(bridge, selection):
    from workbench.localize import wanda

    @contextmanager
    def apply():
        originals = wanda.apply_selection(bridge, selection)
        try:
            yield
        finally:
            wanda.restore(bridge, originals)

    return apply


def context_level(scores: dict[tuple[str, str], dict[str, ComponentScores]], context: str, kind: str,
                  k: int) -> list[Component]:
    """The top-k components by attribution score averaged over a context's variations."""
    stacked = [s[kind].scores for (c, _), s in scores.items() if c == context]
    mean = sum(stacked) / len(stacked)
    return ComponentScores("attribution_mean", kind, mean).top(k)


def budget_sweep(bridge, prompts: PromptSet, baseline: pd.DataFrame, scores, context: str,
                 fractions: list[float], readout: ExactReadoutConfig, stats_options: dict, ablation: str,
                 head_ablation: str) -> pd.DataFrame:
    """Bias and anomaly on `context` after pruning a growing fraction of neurons or heads (context-level
    selection: the top components of the mean attribution score), for matched-budget comparison."""
    from workbench.stats import context_summary

    units = [(context, v) for v in prompts.variations(context)]
    cases = []
    for fraction in fractions:
        for kind in KINDS:
            chosen = context_level(scores, context, kind, budget_for(bridge, kind, fraction))
            cases.append(("sweep", f"{fraction:g}", context, units, Pruning(f"{fraction:g}", kind, chosen)))
    summary, after = evaluate(bridge, prompts, baseline, cases, readout, stats_options, ablation, head_ablation)
    rows = []
    for row in summary.itertuples():
        part = after[(after.kind == row.kind) & (after.source == row.source)]
        bias = context_summary(part, **stats_options).iloc[0]
        rows.append({"kind": row.kind, "method": "attribution", "budget": int(part.n_pruned.iloc[0]),
                     "budget_fraction": float(row.source), "mean_abs_smd": bias.mean_abs_smd,
                     "ci_low": bias.ci_low, "ci_high": bias.ci_high, "reduction_pct": row.reduction_pct,
                     "anomaly_rate": row.anomaly_rate, "invalid_rate": row.invalid_rate})
    before = context_summary(_matching(baseline, after), **stats_options).iloc[0]
    for kind in KINDS:
        rows.append({"kind": kind, "method": "attribution", "budget": 0, "budget_fraction": 0.0,
                     "mean_abs_smd": before.mean_abs_smd, "ci_low": before.ci_low, "ci_high": before.ci_high,
                     "reduction_pct": 0.0, "anomaly_rate": float(summary.baseline_anomaly_rate.iloc[0]),
                     "invalid_rate": invalid_rate(_matching(baseline, after))["invalid_rate"]})
    return pd.DataFrame(rows).sort_values(["kind", "budget_fraction"]).reset_index(drop=True)


def context_overlap(scores, budgets: dict[str, int]) -> pd.DataFrame:
    """Jaccard overlap of the context-level top-k components between every pair of contexts."""
    contexts = sorted({c for c, _ in scores})
    rows = []
    for kind in KINDS:
        chosen = {c: set(context_level(scores, c, kind, budgets[kind])) for c in contexts}
        for a in contexts:
            for b in contexts:
                union = chosen[a] | chosen[b]
                rows.append({"kind": kind, "source": a, "target": b,
                             "jaccard": len(chosen[a] & chosen[b]) / len(union) if union else float("nan")})
    return pd.DataFrame(rows)
