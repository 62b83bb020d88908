"""The generalisation study: prune on one prompt set, measure the bias on another.

Scores come from attribution patching on every variation's White/Black pairs (neurons and heads), and from
the paper's Wanda weight scores per context. A pruning is chosen for a *source* and evaluated on a *target*
(one `Case` each):
- prompt: source = one variation, target = the same variation (the paper's prompt-specific pruning);
- leave_one_out: source = the other variations of the same context, target = the held-out variation;
- cross_context: source = a whole context, target = every context (the full matrix; its diagonal is
  context-level pruning evaluated in-sample);
- random: k components of the kind drawn at random (seeded draws), evaluated on every context: the control
  every reduction is compared with;
- sweep: a growing fraction of a context's components (`budget_sweep`).
Budgets are matched: every regime prunes the same number k of components per kind. A selection for several
source variations aggregates their rankings (`rank_aggregate`: the components in most of the sources' top-k,
then the best mean rank). The paper's rule for neurons, the intersection of the sources' top-k, is an option
(`neuron_rule="intersection"`) that prunes fewer; the summary reports the count. A case with nothing to prune
is reported as "nothing pruned" (no reduction), never as a 0 % reduction.
Held-out names (cross-fitting): `name_folds` halves each race x gender group's names; components chosen on one
half's pairs are evaluated on the other half, and the summary pools the two evaluation halves (every name once).
Pruned components are zeroed by weight edits (a neuron's down-projection column, a head's W_O slice or, for
query-zeroing, its W_Q rows), which give the same logits as the ablation hooks at no run-time cost, and are
restored afterwards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import get_args

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from workbench.audit.stats import RACE, Contrast, adjust_pvalues, context_summary, random_comparison, signed_reduction
from workbench.audit.table import answers_frame, read_answers
from workbench.batching import model_device
from workbench.components import KINDS, Component, ModelShape, keep_masks, row_ablation_hooks
from workbench.config import NeuronRule, Regime
from workbench.errors import ConfigError, PlanError
from workbench.loaded import model_info
from workbench.localize import wanda
from workbench.localize.attribution import attribution_by_span, span_sum
from workbench.localize.pairs import build_pairs
from workbench.localize.scores import ComponentScores
from workbench.prune.anomaly import inlier_ratio, invalid_rate
from workbench.prune.directions import DirectionPlan, control_kind, random_plan
from workbench.prune.plan import PruningPlan, intersection, pruned_weights, zeroed_weights
from workbench.readout.engine import ExactReadoutConfig
from workbench.readout.prompts import PromptSet

REGIMES: tuple[Regime, ...] = get_args(Regime)
RULES: tuple[NeuronRule, ...] = get_args(NeuronRule)
POOLED = ("prompt", "leave_one_out")  # regimes whose per-variation prunings make one row per context
NOTHING_PRUNED = "nothing pruned"
CASE_COLUMNS = ["regime", "kind", "held_out", "source", "target", "budget", "fraction", "draw"]
SUMMARY_COLUMNS = CASE_COLUMNS + [
    "n_pruned_mean", "n_folds", "n_names", "bias_before", "bias_ci_low", "bias_ci_high", "bias_after", "removed",
    "removed_low", "removed_high", "reduction_pct", "ci_low", "ci_high", "anomaly_rate", "baseline_anomaly_rate",
    "invalid_rate", "note", "n_random", "random_mean", "random_sd", "rank", "p_rank", "removed_minus_random",
    "difference_low", "difference_high", "p_rank_holm", "better_than_random",
]
MIN_DRAWS = 19
"""Random draws a calibrated comparison needs: with 19, the rank test's smallest p-value is 1 / 20 = 0.05."""

Scores = dict[tuple[str, str], dict[str, ComponentScores]]


@dataclass
class Pruning:
    """What to remove: components of one kind, or (kind "wanda") selected weights as flat indices per matrix."""

    kind: str  # "mlp_neuron", "attn_head", "wanda", or a direction edit's kind ("ace:mean_difference")
    components: list[Component] = field(default_factory=list)
    weights: dict[str, Int[Tensor, " n"]] | None = None
    edit: DirectionPlan | None = None

    @property
    def size(self) -> int:
        """How many components (or Wanda weights, or directions) are removed."""
        if self.edit is not None:
            return self.edit.size
        if self.weights is not None:
            return sum(int(indices.numel()) for indices in self.weights.values())
        return len(self.components)

    @contextmanager
    def active(self, bridge, ablation: str, head_ablation: str) -> Iterator[None]:
        """The bridge with the pruning applied as weight edits (a direction edit: as hooks), restored on exit."""
        if self.edit is not None:
            with bridge.hooks(fwd_hooks=self.edit.hooks()):
                yield
            return
        if self.weights is not None:
            with zeroed_weights(bridge, self.weights):
                yield
            return
        plan = PruningPlan(model=model_info(bridge).name, model_hash=model_info(bridge).weight_hash,
                           components=self.components, method="generalize", selection={"rule": "top_k"},
                           ablation=head_ablation if self.kind == "attn_head" else ablation)
        with pruned_weights(bridge, plan):
            yield


@dataclass
class Case:
    """One pruned evaluation: `pruning`, chosen for `source`, evaluated on the `units` of context `target`."""

    regime: str
    source: str  # a variation (prompt), "not <variation>" (leave_one_out), a context, "random <draw>"
    target: str
    units: list[tuple[str, str]]  # the evaluated (context, variation) cells
    pruning: Pruning
    budget: int | None = None  # components asked for (None for Wanda: its selection is a weight fraction)
    fraction: float | None = None  # budget sweep: the budget as a fraction of the kind's components
    draw: int | None = None  # random control: which seeded draw
    names: tuple[str, ...] | None = None  # the evaluated names (None: all)
    fold: int | None = None  # cross-fitting: the fold whose selection half chose the pruning

    @property
    def kind(self) -> str:
        return self.pruning.kind

    @property
    def held_out(self) -> bool:
        """Whether the evaluated names were left out of the selection (cross-fitting)."""
        return self.fold is not None


# ---------------------------------------------------------------- selection

def variation_scores(bridge, prompts: PromptSet, n_leaves: int, readout: ExactReadoutConfig,
                     progress: bool = True, distributions: dict | None = None, contrast: Contrast = RACE,
                     directions: pd.DataFrame | None = None, name_span: bool = False) -> Scores:
    """Attribution scores of every neuron and head, per (context, variation), on the prompts' own pairs of the
    bias type `contrast` (race: White/Black pairs); with `name_span`, also each kind's part from the name's
    columns (kinds "mlp_neuron_name", "attn_head_name": `attribution_by_span`, the same pass).

    `distributions` ((context, variation, name) -> AnswerDistribution) reuses the audit's read-out. `directions`
    (context, variation, sign; `bias_directions` of these names' answers) orients each variation's scores toward
    the bias that the removal is measured in; a variation without one (sign 0) is oriented by its pairs' mean gap."""
    signs = {} if directions is None else {(r.context, r.variation): float(r.sign) for r in directions.itertuples()
                                           if r.sign != 0}
    scores = {}
    units = [(c, v) for c in prompts.contexts() for v in prompts.variations(c)]
    for context, variation in tqdm(units, desc="attribution per variation", disable=not progress):
        subset = prompts.filter(context=context, variations=[variation])
        inputs = build_pairs(bridge, subset, n_leaves=n_leaves, readout=readout, progress=False,
                             distributions=distributions, contrast=contrast)
        if (context, variation) in signs:
            inputs = inputs.oriented(signs[(context, variation)])
        parts = attribution_by_span(bridge, inputs, progress=False)
        neurons, heads = span_sum(parts)
        scores[(context, variation)] = {"mlp_neuron": neurons, "attn_head": heads}
        if name_span:
            scores[(context, variation)] |= {f"{kind}_name": part for kind, part in zip(KINDS, parts["name"])}
    return scores


def _ranks(scores: Float[Tensor, "n_layers n_per_layer"]) -> Int[Tensor, "n_layers n_per_layer"]:
    """Each component's place in the ranking by score (0: highest; unscored components last, as in `top`)."""
    flat = torch.nan_to_num(scores.flatten(), nan=-torch.inf)
    order = torch.argsort(flat, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel())
    return ranks.view_as(scores)


def rank_aggregate(scores: list[ComponentScores], k: int) -> list[Component]:
    """The k components in most of the score lists' top-k, ties broken by the best mean rank over the full
    lists, then by (layer, index); a component no list scored is never chosen. One list gives its top-k."""
    ranks = torch.stack([_ranks(s.scores) for s in scores]).double()
    finite = torch.stack([torch.isfinite(s.scores) for s in scores])
    count = ((ranks < k) & finite).sum(0)
    key = count * (ranks[0].numel() + 1.0) - ranks.mean(0)  # the count first, then the mean rank
    scored = finite.any(0)
    key = key.masked_fill(~scored, -torch.inf).flatten()
    order = torch.argsort(key, descending=True, stable=True)[: min(k, int(scored.sum()))]
    width = ranks.shape[-1]
    return [Component(int(i) // width, scores[0].kind, int(i) % width) for i in order]


def common_components(scores: list[ComponentScores], kind: str, k: int, neuron_rule: str = "rank"
                      ) -> list[Component]:
    """The components pruned for one or several source prompts: `rank_aggregate` (k of them); for neurons with
    neuron_rule="intersection", the paper's intersection of the sources' top-k (often fewer than k)."""
    if neuron_rule not in RULES:
        raise ConfigError(f"unknown neuron rule {neuron_rule!r}: use one of {RULES}")
    if not scores:
        return []
    if kind == "mlp_neuron" and neuron_rule == "intersection":
        return intersection([s.top(k) for s in scores])
    return rank_aggregate(scores, k)


# ---------------------------------------------------------------- cases

def regime_cases(regime: str, scores: Scores, budgets: dict[str, int], neuron_rule: str = "rank") -> list[Case]:
    """Every case of a regime (prompt, leave_one_out or cross_context) for each kind at its budget k."""
    return [Case(regime, source, target, evaluated, _pruning(scores, sources, kind, budgets[kind], neuron_rule),
                 budgets[kind])
            for kind in KINDS for source, target, evaluated, sources in regime_sources(regime, list(scores))]


def regime_sources(regime: str, units: list[tuple[str, str]]
                   ) -> list[tuple[str, str, list[tuple[str, str]], list[tuple[str, str]]]]:
    """The regime's (source label, target context, evaluated cells, source cells) for the (context, variation)
    cells `units`: one per variation (prompt: itself; leave_one_out: the context's other variations) or, for
    cross_context, one per (source context, target context)."""
    if regime not in REGIMES:
        raise ConfigError(f"unknown regime {regime!r}: use one of {REGIMES}")
    contexts = sorted({c for c, _ in units})
    rows = []
    for context in contexts:
        own = [u for u in units if u[0] == context]
        if regime == "prompt":
            rows += [(u[1], context, [u], [u]) for u in own]
        elif regime == "leave_one_out":
            rows += [(f"not {u[1]}", context, [u], [o for o in own if o != u]) for u in own]
        else:
            rows += [(context, target, [u for u in units if u[0] == target], own) for target in contexts]
    return rows


def _pruning(scores: Scores, sources: list[tuple[str, str]], kind: str, k: int, neuron_rule: str) -> Pruning:
    return Pruning(kind, common_components([scores[u][kind] for u in sources], kind, k, neuron_rule))


def random_cases(shape: ModelShape, prompts: PromptSet, budgets: dict[str, int], n_draws: int = 3,
                 seed: int = 0) -> list[Case]:
    """Random controls: for each kind in `budgets`, `n_draws` draws of k components of that kind (uniform,
    without replacement, from one generator per seed, kind and k), each evaluated on every context of `prompts`."""
    cases = []
    for kind, k in budgets.items():
        for draw, components in enumerate(random_prunings(shape, kind, k, n_draws, seed)):
            cases += [Case("random", f"random {draw}", target, [(target, v) for v in prompts.variations(target)],
                           Pruning(kind, components), k, draw=draw) for target in prompts.contexts()]
    return cases


def edit_cases(regime: str, units: list[tuple[str, str]], fit: Callable[[list[tuple[str, str]]], DirectionPlan]
               ) -> list[Case]:
    """A regime's cases for a direction edit: `fit(source cells)` gives the edit (one fit per source)."""
    fitted: dict[tuple, DirectionPlan] = {}
    cases = []
    for source, target, evaluated, sources in regime_sources(regime, units):
        key = tuple(sources)
        if key not in fitted:
            fitted[key] = fit(sources)
        cases.append(Case(regime, source, target, evaluated, Pruning(fitted[key].kind, edit=fitted[key])))
    return cases


def random_edit_cases(plan: DirectionPlan, prompts: PromptSet, n_draws: int, seed: int = 0) -> list[Case]:
    """Random controls of a direction edit (`directions.random_plan`, seeded draws), each on every context."""
    cases = []
    for draw in range(n_draws):
        control = random_plan(plan, seed * 1000 + draw)
        cases += [Case("random", f"random {draw}", target, [(target, v) for v in prompts.variations(target)],
                       Pruning(control.kind, edit=control), draw=draw) for target in prompts.contexts()]
    return cases


def random_prunings(shape: ModelShape, kind: str, k: int, n_draws: int, seed: int = 0) -> list[list[Component]]:
    """`n_draws` uniform draws of k components of a kind without replacement, sorted, from one generator per
    seed, kind and k."""
    pool = shape.all(kind)
    rng = np.random.default_rng([seed, KINDS.index(kind), k])
    return [sorted(pool[i] for i in rng.choice(len(pool), size=k, replace=False)) for _ in range(n_draws)]


def name_halves(names_by_group: dict[str, list[str]], seed: int = 0) -> tuple[set[str], set[str]]:
    """Two halves of the names: each group's names are shuffled (seeded) and halved (the first half has the
    smaller share where a group's count is odd)."""
    rng = np.random.default_rng(seed)
    halves: tuple[set[str], set[str]] = (set(), set())
    for group in sorted(names_by_group):
        names = sorted(set(names_by_group[group]))
        if len(names) < 2:
            raise ConfigError(f"group {group!r} has {len(names)} name(s): cross-fitting needs at least 2 per group")
        shuffled = [names[i] for i in rng.permutation(len(names))]
        halves[0].update(shuffled[: len(names) // 2])
        halves[1].update(shuffled[len(names) // 2:])
    return halves


def name_folds(prompts: PromptSet, seed: int = 0) -> list[tuple[PromptSet, PromptSet]]:
    """Two (selection, evaluation) splits of the prompts by name (`name_halves` of each race x gender group); the
    second split swaps the halves, so the evaluation halves hold every name once."""
    groups: dict[str, list[str]] = {}
    for p in prompts:
        groups.setdefault(p.group, []).append(p.name)
    first, second = (prompts.filter(names=half) for half in name_halves(groups, seed))
    return [(first, second), (second, first)]


def held_out(cases: list[Case], evaluation: PromptSet, fold: int) -> list[Case]:
    """The cases restricted to the names of `evaluation` (names their selection did not see), marked `fold`."""
    names = tuple(sorted({p.name for p in evaluation}))
    return [dataclasses.replace(case, names=names, fold=fold) for case in cases]


def cross_fit_cases(regime: str, folds: list[tuple[PromptSet, PromptSet]], fold_scores: list[Scores],
                    budgets: dict[str, int], neuron_rule: str = "rank") -> list[Case]:
    """A regime's cases cross-fitted over `name_folds`: fold i's components come from `fold_scores[i]`
    (`variation_scores` on its selection half) and are evaluated on its evaluation half."""
    if len(folds) != len(fold_scores):
        raise ValueError(f"{len(folds)} folds but {len(fold_scores)} score sets")
    return [case for fold, ((_, evaluation), scores) in enumerate(zip(folds, fold_scores))
            for case in held_out(regime_cases(regime, scores, budgets, neuron_rule), evaluation, fold)]


def wanda_for(bridge, prompts: PromptSet, settings) -> dict:
    """The paper's Wanda selection (top tau_B of the Black scores minus top tau_W of the White) for prompts."""
    groups = {race: [p for p in prompts if p.race == race] for race in ("black", "white")}
    norms = wanda.wanda_input_norms(bridge, groups, progress=False)
    return wanda.wanda_selection(bridge, norms["black"], norms["white"], settings.wanda_tau_black,
                                 settings.wanda_tau_white)


def wanda_cases(bridge, prompts: PromptSet, settings) -> list[Case]:
    """Cross-context cases for the paper's Wanda weights: a selection per source context, every target."""
    cases = []
    contexts = prompts.contexts()
    for source in contexts:
        pruning = Pruning("wanda", weights=wanda_for(bridge, prompts.filter(context=source), settings))
        cases += [Case("cross_context", source, target, [(target, v) for v in prompts.variations(target)], pruning)
                  for target in contexts]
    return cases


# ---------------------------------------------------------------- evaluation

def evaluate(bridge, prompts: PromptSet, baseline: pd.DataFrame, cases: list[Case], readout: ExactReadoutConfig,
             stats_options: dict, ablation: str = "zero", head_ablation: str = "zero",
             progress: bool = True, directions: pd.DataFrame | None = None, alpha: float = 0.05
             ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The summary table (`summarise`) and the per-prompt answers of every case's pruned model
    (`pruned_answers`)."""
    after = pruned_answers(bridge, prompts, baseline, cases, readout, ablation, head_ablation, progress)
    return summarise(after, baseline, stats_options, directions, alpha), after


def pruned_answers(bridge, prompts: PromptSet, baseline: pd.DataFrame, cases: list[Case],
                   readout: ExactReadoutConfig, ablation: str = "zero", head_ablation: str = "zero",
                   progress: bool = True) -> pd.DataFrame:
    """The answer table of every case's pruned model on its evaluated prompts, with the case's columns.

    On an accelerator, component prunings run together (`read_pruned`: each batch row carries its own
    pruning); on a CPU each pruning runs alone as weight edits, which is faster there (larger batches pad more
    and the masks cost more than edited weights: benchmarks/pruned_evaluation.py). Wanda weight selections
    always run one at a time as weight edits. A pruning or edit read alone has its prompts batched by the size of
    their unedited trees (`tree_sizes`), so that a level pads less. A case with nothing to prune is not run: its
    answers are the baseline's, with n_pruned 0."""
    subsets = [_evaluated(prompts, case) for case in cases]
    together = model_device(bridge).type != "cpu"
    batched = [i for i, case in enumerate(cases)
               if together and case.pruning.size and case.pruning.weights is None and case.pruning.edit is None]
    answers = dict(zip(batched, read_pruned(bridge, [subsets[i] for i in batched],
                                            [cases[i].pruning for i in batched], readout, ablation,
                                            head_ablation, progress)))
    frames = []
    alone = [i for i, case in enumerate(cases) if i not in answers and case.pruning.size]
    bar = tqdm(total=sum(len(subsets[i]) for i in alone), desc="pruned read-outs", unit="prompt",
               disable=not progress or not alone)
    for i, (case, subset) in enumerate(zip(cases, subsets)):
        if i not in answers:
            if case.pruning.size:
                with case.pruning.active(bridge, ablation, head_ablation):
                    answers[i] = answers_frame(subset, read_answers(bridge, subset, exact=readout, progress=False,
                                                                    sizes=tree_sizes(baseline, subset)))
                bar.update(len(subset))
            else:
                answers[i] = _matching(baseline, subset.to_frame())
        frames.append(answers[i].assign(regime=case.regime, kind=case.kind, held_out=case.held_out,
                                        source=case.source, target=case.target, budget=case.budget,
                                        fraction=case.fraction, draw=case.draw, fold=case.fold,
                                        n_pruned=case.pruning.size))
    bar.close()
    return pd.concat(frames, ignore_index=True).astype(
        {"budget": "Int64", "fraction": "float64", "draw": "Int64", "fold": "Int64"})


def read_pruned(bridge, subsets: list[PromptSet], prunings: list[Pruning], readout: ExactReadoutConfig,
                ablation: str = "zero", head_ablation: str = "zero", progress: bool = True) -> list[pd.DataFrame]:
    """The answer table of each prompt set under its component pruning, all in shared batches: every row of a
    batch ablates its own pruning's components (`components.row_ablation_hooks`). Rows are ordered by prompt,
    so that a prompt's prunings share a batch (their read-out trees are alike, which keeps padding low).
    Equal to reading each pruning's prompts alone with `Pruning.active` (benchmarks/run.py checks it)."""
    if any(p.weights is not None for p in prunings):
        raise PlanError("read_pruned takes component prunings; Wanda weight selections run as weight edits")
    modes = [head_ablation if p.kind == "attn_head" else ablation for p in prunings]
    if unsupported := sorted(set(modes) - {"zero", "query_zero"}):
        raise PlanError(f"batched pruning supports zero and query_zero ablation, not {unsupported}")
    rows = sorted(((prompt.text, i, j) for i, subset in enumerate(subsets) for j, prompt in enumerate(subset)),
                  key=lambda row: (row[0], row[1]))
    owners = [i for _, i, _ in rows]

    def row_hooks(part: slice) -> list:
        hooks = []
        for mode in sorted(set(modes)):
            chosen = [prunings[i].components if modes[i] == mode else [] for i in owners[part]]
            hooks += row_ablation_hooks(keep_masks(chosen, mode), mode)
        return hooks

    ordered = PromptSet(subsets[i].prompts[j] for _, i, j in rows)
    distributions = read_answers(bridge, ordered, exact=readout, progress=progress, row_hooks=row_hooks)
    placed: list[list] = [[None] * len(subset) for subset in subsets]
    for (_, i, j), distribution in zip(rows, distributions):
        placed[i][j] = distribution
    return [answers_frame(subset, found) for subset, found in zip(subsets, placed)]


def summarise(after: pd.DataFrame, baseline: pd.DataFrame, stats_options: dict,
              directions: pd.DataFrame | None = None, alpha: float = 0.05) -> pd.DataFrame:
    """One row per case key (CASE_COLUMNS): the bias removed on the target (`signed_reduction`: fixed direction,
    unpruned scale, paired CIs), anomaly, and the calibrated comparison with the random draws.

    `directions` (context, variation, sign, and fold for cross-fitted cases): the direction of each variation's
    bias on the names that chose the pruning (`workbench.audit.stats.bias_directions` of each fold's selection
    half); None takes it from the baseline of the evaluated names (in-sample). The prompt and leave-one-out regimes
    pool their per-variation prunings into one row per context (source "each variation"); held-out cases pool
    their folds, so the row covers every evaluated name once. Prompts a case pruned nothing for are left out of
    the reduction and named in `note`; a row with nothing pruned at all has no reduction (NaN) and the note
    "nothing pruned". Each reduction is set against the random draws of the same kind, target and size on the
    same names (`workbench.audit.stats.random_comparison`, `with_random_tests`)."""
    after = after.assign(source=after.source.where(~after.regime.isin(POOLED), "each variation"))
    groups = {key: part for key, part in after.groupby(CASE_COLUMNS, sort=True, dropna=False)}
    draws: dict[tuple, list[pd.DataFrame]] = {}
    for key, part in groups.items():
        row = dict(zip(CASE_COLUMNS, key))
        if row["regime"] == "random" and (part.n_pruned > 0).all():
            draws.setdefault((control_kind(row["kind"]), row["target"], float(part.n_pruned.mean())), []).append(part)
    rows = [_summary_row(dict(zip(CASE_COLUMNS, key)), part, baseline, stats_options, directions, draws)
            for key, part in groups.items()]
    table = pd.DataFrame(rows).reindex(columns=SUMMARY_COLUMNS)
    return with_random_tests(table, alpha).astype({"budget": "Int64", "fraction": "float64", "draw": "Int64",
                                                   "n_random": "Int64", "rank": "Int64"})


def _summary_row(key: dict, part: pd.DataFrame, baseline: pd.DataFrame, stats_options: dict,
                 directions: pd.DataFrame | None, draws: dict) -> dict:
    before = _matching(baseline, part)
    row = {**key, "n_pruned_mean": float(part.n_pruned.mean()),
           "baseline_anomaly_rate": float(inlier_ratio(before, before).anomaly_rate.mean())}
    pruned = part[part.n_pruned > 0]
    if pruned.empty:
        keys = ["context", "variation", "name"]
        folded = before.merge(part[[*keys, "fold"]], on=keys) if "fold" in part else before
        unpruned = signed_reduction(before, folded, directions, **stats_options).iloc[0]
        return {**row, **unpruned[["n_folds", "n_names", "bias_before", "bias_ci_low", "bias_ci_high"]].to_dict(),
                "note": NOTHING_PRUNED}
    before = _matching(baseline, pruned)
    reduction = signed_reduction(before, pruned, directions, **stats_options).iloc[0]
    left_out = len(part) - len(pruned)
    row |= {**reduction[["n_folds", "n_names", "bias_before", "bias_ci_low", "bias_ci_high", "bias_after", "removed",
                         "removed_low", "removed_high", "reduction_pct", "ci_low", "ci_high"]].to_dict(),
            "anomaly_rate": float(inlier_ratio(before, pruned).anomaly_rate.mean()),
            "invalid_rate": invalid_rate(pruned)["invalid_rate"],
            "note": f"{NOTHING_PRUNED} for {left_out} of {len(part)} prompts (left out)" if left_out else ""}
    controls = draws.get((control_kind(key["kind"]), key["target"], row["n_pruned_mean"]), [])
    if key["regime"] != "random" and controls:
        comparison = random_comparison(before, pruned, controls, directions, **stats_options).iloc[0]
        scale = 100 / reduction.bias_before if reduction.bias_before else np.nan
        row |= {"n_random": comparison.n_random, "random_mean": scale * comparison.random_mean,
                "random_sd": scale * comparison.random_sd, "rank": comparison["rank"], "p_rank": comparison.p_rank,
                "removed_minus_random": comparison.difference, "difference_low": comparison.difference_low,
                "difference_high": comparison.difference_high}
    return row


def with_random_tests(table: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """The table with p_rank_holm (Holm over every row with a rank test: the cells the "better than random" claim
    is made for) and better_than_random: p_rank_holm <= alpha, from at least MIN_DRAWS draws (NA with fewer, where
    no test was run, and for the random draws themselves). The rank test is exact: P(p_rank <= alpha) <= alpha
    when the chosen pruning is one more random draw."""
    tested = table.p_rank.notna() & (table.n_random.fillna(0) >= MIN_DRAWS)
    holm = np.full(len(table), np.nan)
    holm[tested.to_numpy()] = adjust_pvalues(table.loc[tested, "p_rank"].to_numpy(float), "holm")
    better = pd.Series(holm <= alpha, index=table.index).astype("boolean")
    return table.assign(p_rank_holm=holm, better_than_random=better.where(tested, pd.NA))


def _evaluated(prompts: PromptSet, case: Case) -> PromptSet:
    units = set(case.units)
    return PromptSet(p for p in prompts if (p.context, p.variation) in units
                     and (case.names is None or p.name in case.names))


def tree_sizes(baseline: pd.DataFrame, prompts: PromptSet) -> list[int]:
    """The number of distinct answers the unedited model gave each prompt (0 where the baseline lacks it): a
    pruned or edited model's read-out tree of a prompt is usually as large, so it batches alike prompts together."""
    sizes = {(row.context, row.variation, row.name): len(row.values) for row in baseline.itertuples()}
    return [sizes.get((p.context, p.variation, p.name), 0) for p in prompts]


def _matching(baseline: pd.DataFrame, part: pd.DataFrame) -> pd.DataFrame:
    keys = ["context", "variation", "name"]
    return baseline.merge(part[keys].drop_duplicates(), on=keys)


# ---------------------------------------------------------------- budgets

def budget_for(bridge, kind: str, fraction: float) -> int:
    """Components of a kind in a fraction of the model (at least one)."""
    shape = ModelShape.of(bridge)
    return max(1, round(fraction * shape.n_layers * shape.count(kind)))


def context_mean(scores: Scores, context: str, kind: str) -> Float[Tensor, "n_layers n_per_layer"]:
    """A kind's attribution scores averaged over a context's variations."""
    stacked = [s[kind].scores for (c, _), s in scores.items() if c == context]
    return sum(stacked) / len(stacked)


def context_level(scores: Scores, context: str, kind: str, k: int) -> list[Component]:
    """The top-k components by attribution score averaged over a context's variations."""
    return ComponentScores("attribution_mean", kind, context_mean(scores, context, kind)).top(k)


def budget_sweep(bridge, prompts: PromptSet, baseline: pd.DataFrame, scores: Scores, context: str,
                 fractions: list[float], readout: ExactReadoutConfig, stats_options: dict, ablation: str,
                 head_ablation: str, n_draws: int = 0, seed: int = 0) -> pd.DataFrame:
    """Bias and anomaly on `context` after pruning a growing fraction of neurons or heads (context-level
    selection: the top components of the mean attribution score), for matched-budget comparison; with
    `n_draws`, random controls of the same sizes (random_mean, random_sd, better_than_random as in
    `summarise`). The row with budget 0 is the unpruned model (reduction NaN, note "nothing pruned")."""
    shape = ModelShape.of(bridge)
    target = prompts.filter(context=context)
    units = [(context, v) for v in target.variations(context)]
    cases, budgets = [], set()
    for fraction in fractions:
        for kind in KINDS:
            k = budget_for(bridge, kind, fraction)
            pruning = Pruning(kind, context_level(scores, context, kind, k))
            cases.append(Case("sweep", context, context, units, pruning, k, fraction=fraction))
            budgets.add((kind, k))
    cases += [case for kind, k in sorted(budgets) for case in random_cases(shape, target, {kind: k}, n_draws, seed)]
    summary, after = evaluate(bridge, prompts, baseline, cases, readout, stats_options, ablation, head_ablation,
                              progress=False)
    rows = []
    for row in summary[summary.regime == "sweep"].itertuples():
        part = after[(after.regime == "sweep") & (after.kind == row.kind) & (after.fraction == row.fraction)]
        bias = context_summary(part, **stats_options).iloc[0]
        rows.append({"kind": row.kind, "method": "attribution", "budget": int(row.budget),
                     "budget_fraction": row.fraction, "n_pruned": row.n_pruned_mean,
                     "mean_abs_smd": bias.mean_abs_smd, "ci_low": bias.ci_low, "ci_high": bias.ci_high,
                     "reduction_pct": row.reduction_pct, "anomaly_rate": row.anomaly_rate,
                     "invalid_rate": row.invalid_rate, "random_mean": row.random_mean, "random_sd": row.random_sd,
                     "better_than_random": row.better_than_random, "note": row.note})
    before_answers = _matching(baseline, target.to_frame())
    before = context_summary(before_answers, **stats_options).iloc[0]
    for kind in KINDS:
        rows.append({"kind": kind, "method": "attribution", "budget": 0, "budget_fraction": 0.0, "n_pruned": 0.0,
                     "mean_abs_smd": before.mean_abs_smd, "ci_low": before.ci_low, "ci_high": before.ci_high,
                     "reduction_pct": np.nan, "anomaly_rate": float(summary.baseline_anomaly_rate.iloc[0]),
                     "invalid_rate": invalid_rate(before_answers)["invalid_rate"], "random_mean": np.nan,
                     "random_sd": np.nan, "better_than_random": pd.NA, "note": NOTHING_PRUNED})
    table = pd.DataFrame(rows).astype({"better_than_random": "boolean"})
    return table.sort_values(["kind", "budget_fraction"]).reset_index(drop=True)


def context_overlap(scores: Scores, budgets: dict[str, int]) -> pd.DataFrame:
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
