"""Does a pruning for one bias type touch another? The cross-type matrix.

A bias type is a contrast between name groups (`workbench.audit.bias_types`: race, gender, the intersectional ones).
For each source type S and kind, the pruning for S is the top-k components by attribution on S's pairs
(`localize.pairs.contrast_pairs`: for gender a man's and a woman's name of the same race), averaged over the
context's variations (`generalize.context_level`). It is evaluated on every target type T: T's bias (mean |SMD|
of T's contrast over the context's variations) before and after, the reduction with its paired CI, next to
random draws of the same kind and size (`workbench.audit.stats.random_comparison`), and the Jaccard overlap of the
components chosen for S and for T. The diagonal is a type's own pruning; off the diagonal, a reduction says the
types share components.

Held out by default (the study's `name_folds`): the components are chosen on one half of the names and every
bias is measured on the other half, the two halves pooled. A pruning is read out once; every target type's
bias is computed from the same pruned answers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from workbench.audit.bias_types import CONTRASTS
from workbench.audit.stats import Contrast
from workbench.prune.generalize import (
    KINDS,
    Case,
    Pruning,
    Scores,
    context_level,
    held_out,
    summarise,
    with_random_tests,
)
from workbench.readout.prompts import PromptSet

REGIME = "cross_type"
CONTRAST_BY_NAME = {contrast.name: contrast for contrast in CONTRASTS}
MATRIX_COLUMNS = [
    "kind", "source_type", "target_type", "context", "held_out", "budget", "draw", "n_pruned_mean", "n_folds",
    "bias_before", "bias_ci_low", "bias_ci_high", "bias_after", "removed", "removed_low", "removed_high",
    "reduction_pct", "ci_low", "ci_high", "anomaly_rate", "invalid_rate", "note", "n_random", "random_mean",
    "random_sd", "rank", "p_rank", "removed_minus_random", "difference_low", "difference_high", "p_rank_holm",
    "better_than_random",
]


def contrasts_named(names: Sequence[str]) -> list[Contrast]:
    """The bias types (contrasts) of the given names, in that order."""
    unknown = [name for name in names if name not in CONTRAST_BY_NAME]
    if unknown:
        raise ValueError(f"unknown bias type(s) {unknown}: use {list(CONTRAST_BY_NAME)}")
    return [CONTRAST_BY_NAME[name] for name in names]


def type_cases(scores_by_type: dict[str, Scores], context: str, budgets: dict[str, int]) -> list[Case]:
    """For each source type and kind: its top-k components on the context (mean attribution over the context's
    variations, on the type's pairs), evaluated on every variation of the context."""
    cases = []
    for source, scores in scores_by_type.items():
        units = [u for u in scores if u[0] == context]
        if not units:
            raise ValueError(f"no attribution scores for context {context!r} and bias type {source!r}")
        for kind in KINDS:
            k = budgets[kind]
            cases.append(Case(REGIME, source, context, units, Pruning(kind, context_level(scores, context, kind, k)),
                              k))
    return cases


def cross_fit_type_cases(folds: list[tuple[PromptSet, PromptSet]], fold_scores: list[dict[str, Scores]],
                         context: str, budgets: dict[str, int]) -> list[Case]:
    """`type_cases` of each fold (scores on its selection half), evaluated on its evaluation half."""
    return [case for fold, ((_, evaluation), scores) in enumerate(zip(folds, fold_scores))
            for case in held_out(type_cases(scores, context, budgets), evaluation, fold)]


def cross_type_matrix(after: pd.DataFrame, baseline: pd.DataFrame, targets: Sequence[Contrast],
                      stats_options: dict, directions: dict[str, pd.DataFrame] | None = None,
                      alpha: float = 0.05) -> pd.DataFrame:
    """One row per (kind, source type or random draw, target type): the bias of the target type the pruning
    removed, in that type's direction on the selection names (`directions[type]`, per fold; None: in-sample),
    with its paired CIs, anomaly, and the rank test against the random draws at the same kind and size
    (`generalize.summarise` with the target type's contrast); better_than_random is Holm-corrected over every
    cell of the matrix."""
    frames = []
    for target in targets:
        fitted = None if directions is None else directions[target.name]
        summary = summarise(after, baseline, {**stats_options, "contrast": target}, fitted, alpha)
        frames.append(summary.assign(target_type=target.name))
    table = pd.concat(frames, ignore_index=True).rename(columns={"target": "context", "source": "source_type"})
    return with_random_tests(table, alpha)[MATRIX_COLUMNS]


def type_overlap(cases: list[Case]) -> pd.DataFrame:
    """Jaccard overlap of the components chosen for every two source types, per kind (mean over folds)."""
    chosen: dict[tuple[str, int | None, str], set] = {}
    for case in cases:
        if case.regime == REGIME:
            chosen[(case.kind, case.fold, case.source)] = set(case.pruning.components)
    rows = []
    for kind in KINDS:
        folds = sorted({f for k, f, _ in chosen if k == kind}, key=lambda f: -1 if f is None else f)
        types = list(dict.fromkeys(s for k, _, s in chosen if k == kind))
        for a in types:
            for b in types:
                values = [_jaccard(chosen[(kind, f, a)], chosen[(kind, f, b)]) for f in folds]
                rows.append({"kind": kind, "source_type": a, "target_type": b, "jaccard": float(np.mean(values)),
                             "folds": len(folds)})
    return pd.DataFrame(rows, columns=["kind", "source_type", "target_type", "jaccard", "folds"])


def _jaccard(a: set, b: set) -> float:
    union = a | b
    return len(a & b) / len(union) if union else float("nan")
