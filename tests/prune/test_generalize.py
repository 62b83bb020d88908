"""The generalisation engine on planted tiny models (workbench.testing.planted), whose right answers are known.

- two contexts, each with its own bias neuron: pruning learned on one context removes that context's bias and
  leaves the other's (the cross-context decay);
- two variations whose Black names carry different markers, each moved by its own head (no distractors): the
  share of the bias a pruning removes is known from the per-variation SMDs, and held-out names see no effect of
  a head chosen on the other names;
- matched budgets, rank aggregation, the intersection rule's count and the "nothing pruned" row;
- random controls: seeded draws of the same kind and size, beaten by the planted pruning and not by a random one.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch

from workbench.audit.stats import bias_table
from workbench.audit.table import run_audit
from workbench.components import Component, ModelShape
from workbench.localize.scores import ComponentScores
from workbench.models import wrap
from workbench.prune import generalize
from workbench.prune.generalize import Case, Pruning
from workbench.readout.engine import ExactReadoutConfig
from workbench.readout.prompts import PromptSet
from workbench.testing.planted import BLACK_NAMES, WHITE_NAMES, Z_NAMES, planted_model, planted_prompts

READOUT = ExactReadoutConfig(max_tokens=2)
STATS = dict(scale="log", method="mixture", n_boot=50, seed=0)
ONE_EACH = {"mlp_neuron": 1, "attn_head": 1}
GAP = 0.15  # "3" and "7" both keep mass, so every group's answers have a spread


pytestmark = pytest.mark.usefixtures("one_thread")


def cell(summary: pd.DataFrame, **key) -> pd.Series:
    """The one summary row matching every given column value."""
    rows = summary[pd.concat([summary[k] == v for k, v in key.items()], axis=1).all(axis=1)]
    assert len(rows) == 1, f"{len(rows)} rows match {key}"
    return rows.iloc[0]


def flag(value) -> bool | None:
    """A nullable boolean cell as True, False or None (NA)."""
    return None if pd.isna(value) else bool(value)


def audited(model, prompts: PromptSet):
    """The planted model as a bridge, and its answers to the prompts."""
    bridge = wrap(model.model, model.tokenizer, "tiny-planted")
    return bridge, run_audit(bridge, prompts, exact=READOUT, progress=False)


# ============================================================================================ two contexts


@pytest.fixture(scope="module")
def two_contexts():
    """Context "tip"'s bias runs through neuron L1N7, context "pay"'s through L2N5 (one head feeds both)."""
    model = planted_model(pay_neuron=(2, 5), noise=0.3, answer_gap=GAP)
    prompts = planted_prompts(("lamp",), contexts=("tip", "pay"))
    bridge, baseline = audited(model, prompts)
    scores = generalize.variation_scores(bridge, prompts, 5, READOUT, progress=False)
    return model, bridge, prompts, baseline, scores


@pytest.fixture(scope="module")
def two_context_summary(two_contexts):
    _, bridge, prompts, baseline, scores = two_contexts
    neurons = {"mlp_neuron": 1}
    cases = [c for c in generalize.regime_cases("cross_context", scores, ONE_EACH) if c.kind == "mlp_neuron"]
    cases += generalize.random_cases(ModelShape.of(bridge), prompts, neurons, n_draws=3, seed=0)
    control = generalize.random_cases(ModelShape.of(bridge), prompts, neurons, n_draws=1, seed=1)
    cases += [Case("control", "random", c.target, c.units, c.pruning, c.budget) for c in control]
    summary, _ = generalize.evaluate(bridge, prompts, baseline, cases, READOUT, STATS, progress=False)
    return summary, cases


def test_planted_two_context_pruning_decays_across_contexts(two_contexts, two_context_summary):
    model, _, _, baseline, _ = two_contexts
    summary, cases = two_context_summary
    assert (bias_table(baseline, **STATS).smd < -0.3).all()  # Black names answer higher in both contexts
    chosen = {c.source: c.pruning.components for c in cases if c.regime == "cross_context"}
    assert chosen == {"tip": [model.neuron], "pay": [model.pay_neuron]}
    for source in ("tip", "pay"):
        other = "pay" if source == "tip" else "tip"
        same = cell(summary, regime="cross_context", source=source, target=source)
        across = cell(summary, regime="cross_context", source=source, target=other)
        assert same.reduction_pct > 85 and same.ci_low > 80
        assert abs(across.reduction_pct) < 3 and across.bias_after == pytest.approx(across.bias_before, rel=0.03)
        assert across.bias_before == pytest.approx(cell(summary, regime="cross_context", source=other,
                                                         target=other).bias_before)


def test_planted_pruning_beats_random_and_a_random_pruning_does_not(two_contexts, two_context_summary):
    """The planted neuron outranks every random draw of its size on the same names (rank 0, p_rank 1/4 with 3
    draws, a paired difference above 0); a random pruning and the other context's neuron do not. With 3 draws
    there is no better_than_random verdict (it needs 19)."""
    model = two_contexts[0]
    summary, cases = two_context_summary
    drawn = {tuple(c.pruning.components) for c in cases if c.regime == "random"}
    controls = {tuple(c.pruning.components) for c in cases if c.regime == "control"}
    assert len(drawn) == 3 and len(controls) == 1 and not controls & drawn
    assert not {(model.neuron,), (model.pay_neuron,)} & (drawn | controls)
    for target in ("tip", "pay"):
        planted = cell(summary, regime="cross_context", source=target, target=target)
        control = cell(summary, regime="control", target=target)
        draws = summary[(summary.regime == "random") & (summary.target == target)]
        assert len(draws) == 3 and planted.n_random == 3
        assert planted.random_mean == pytest.approx(draws.reduction_pct.mean())
        assert planted.random_sd == pytest.approx(draws.reduction_pct.std())
        assert abs(planted.random_mean) < 3
        assert planted["rank"] == 0 and planted.p_rank == pytest.approx(0.25) and planted.difference_low > 0
        assert abs(control.removed_minus_random) < 0.01 and control.removed < 0.1 * planted.removed
        assert draws.p_rank.isna().all() and summary.better_than_random.isna().all()
        across = cell(summary, regime="cross_context", source="pay" if target == "tip" else "tip", target=target)
        assert across["rank"] > 0 and abs(across.removed_minus_random) < 0.01  # the other context's neuron: nothing


def test_better_than_random_is_a_holm_corrected_rank_test_from_19_draws():
    """better_than_random: p_rank_holm <= alpha over every cell with a rank test from at least 19 draws; fewer
    draws give no verdict (NA), and the random draws themselves none."""
    rows = [{"regime": "prompt", "p_rank": p, "n_random": n} for p, n in ((0.05, 19), (0.01, 99), (0.25, 3))]
    rows.append({"regime": "random", "p_rank": float("nan"), "n_random": float("nan")})
    table = generalize.with_random_tests(pd.DataFrame(rows))
    assert table.p_rank_holm.iloc[:2].tolist() == pytest.approx([0.05, 0.02])  # Holm over the 2 tested cells
    assert [flag(x) for x in table.better_than_random] == [True, True, None, None]
    alone = generalize.with_random_tests(pd.DataFrame(rows[:1] * 2))  # two cells at p = 0.05: Holm says 0.1
    assert [flag(x) for x in alone.better_than_random] == [False, False]


def test_random_controls_are_seeded_and_match_kind_and_size(two_contexts):
    model, bridge, prompts, _, _ = two_contexts
    shape = ModelShape.of(bridge)
    budgets = {"mlp_neuron": 4, "attn_head": 2}
    cases = generalize.random_cases(shape, prompts, budgets, n_draws=3, seed=0)
    again = generalize.random_cases(shape, prompts, budgets, n_draws=3, seed=0)
    other = generalize.random_cases(shape, prompts, budgets, n_draws=3, seed=1)
    assert [c.pruning.components for c in cases] == [c.pruning.components for c in again]
    assert [c.pruning.components for c in cases] != [c.pruning.components for c in other]
    assert len(cases) == 2 * 3 * 2  # kinds x draws x targets
    draws = {}
    for case in cases:
        components = case.pruning.components
        assert case.regime == "random" and case.budget == budgets[case.kind] == len(set(components))
        assert all(c.kind == case.kind and c in shape.all(case.kind) for c in components)
        assert case.units == [(case.target, "lamp")]
        draws.setdefault((case.kind, case.draw), set()).add(tuple(components))
    assert all(len(same) == 1 for same in draws.values())  # one draw prunes the same set on every target
    neuron_sets = [s.pop() for (kind, _), s in draws.items() if kind == "mlp_neuron"]
    assert len(set(neuron_sets)) == 3 and all(set(s) != {model.neuron, model.pay_neuron} for s in neuron_sets)


def test_budget_sweep_keeps_its_fraction_in_a_field(two_contexts):
    _, bridge, prompts, baseline, scores = two_contexts
    sweep = generalize.budget_sweep(bridge, prompts, baseline, scores, "tip", [0.05], READOUT, STATS, "zero",
                                    "zero", n_draws=2)
    assert sorted(sweep.budget_fraction) == [0.0, 0.0, 0.05, 0.05]
    pruned = sweep[sweep.budget_fraction == 0.05].set_index("kind")
    assert pruned.budget.to_dict() == {k: generalize.budget_for(bridge, k, 0.05) for k in generalize.KINDS}
    assert (pruned.n_pruned == pruned.budget).all() and pruned.random_mean.notna().all()
    assert pruned.loc["mlp_neuron", "reduction_pct"] > 80  # 2 neurons: the planted one is among them
    unpruned = sweep[sweep.budget == 0]
    assert unpruned.reduction_pct.isna().all() and (unpruned.note == "nothing pruned").all()


# ============================================================================================ known shares


@pytest.fixture(scope="module")
def marked():
    """No distractors; variation "lamp"'s Black names carry Q (head L0H1), "desk"'s carry Z (head L0H2)."""
    model = planted_model(z_head=(0, 2), noise=0.0, answer_gap=GAP)
    prompts = PromptSet([*planted_prompts(("lamp",), white=WHITE_NAMES[:2], black=BLACK_NAMES[:2]),
                         *planted_prompts(("desk",), white=WHITE_NAMES[:2], black=Z_NAMES[:2])])
    bridge, baseline = audited(model, prompts)
    return model, bridge, prompts, baseline


def test_reduction_is_the_known_share_of_the_bias(marked):
    model, bridge, prompts, baseline = marked
    scores = generalize.variation_scores(bridge, prompts, 5, READOUT, progress=False)
    assert [scores[("tip", v)]["attn_head"].top(1) for v in ("lamp", "desk")] == [[model.head], [model.z_head]]
    cases = [c for regime in ("prompt", "leave_one_out") for c in generalize.regime_cases(regime, scores, ONE_EACH)
             if c.kind == "attn_head"]
    both = [("tip", "lamp"), ("tip", "desk")]
    cases.append(Case("q_head", "lamp", "tip", both, Pruning("attn_head", [model.head]), 1))
    summary, after = generalize.evaluate(bridge, prompts, baseline, cases, READOUT, STATS, progress=False)
    smd = bias_table(baseline, **STATS).set_index("variation").smd.abs()
    for row in summary.itertuples():
        assert row.bias_before == pytest.approx(smd.mean())
    # each variation pruned with its own head: no bias left; with the other variation's head: untouched
    assert cell(summary, regime="prompt").reduction_pct == pytest.approx(100, abs=1e-6)
    loo = cell(summary, regime="leave_one_out")
    assert loo.reduction_pct == pytest.approx(0, abs=1e-3) and loo.bias_after == pytest.approx(smd.mean())
    # the Q head on both variations removes lamp's share of the bias and none of desk's
    share = cell(summary, regime="q_head")
    assert share.reduction_pct == pytest.approx(100 * smd["lamp"] / smd.sum(), abs=1e-3)
    assert share.bias_after == pytest.approx(smd["desk"] / 2, rel=1e-4)
    assert 40 < share.reduction_pct < 60
    assert len(after) == sum(4 * len(c.units) for c in cases)
    assert (after.n_pruned == 1).all()
    keys = ["context", "variation", "name"]
    untouched = after[after.regime == "leave_one_out"].merge(baseline, on=keys, suffixes=("", "_before"))
    assert untouched.expected.to_numpy() == pytest.approx(untouched.expected_before.to_numpy(), abs=1e-4)


def test_held_out_names_are_not_helped_by_a_head_chosen_on_other_names(marked):
    """Qin's bias runs through one head, Zin's through another: a head chosen on one half's names removes
    nothing on the other half (evaluating on the selection half instead would remove all of it), while the
    neuron both heads feed generalises to the held-out names."""
    model, bridge, _, _ = marked
    prompts = planted_prompts(("lamp",), white=WHITE_NAMES[:2], black=(BLACK_NAMES[0], Z_NAMES[0]))
    baseline = run_audit(bridge, prompts, exact=READOUT, progress=False)
    folds = generalize.name_folds(prompts, seed=0)
    names = [[{p.name for p in half} for half in fold] for fold in folds]
    assert names[0] == names[1][::-1] and not names[0][0] & names[0][1]
    assert names[0][0] | names[0][1] == {"Ben", "Al", "Qin", "Zin"}
    assert all(len(half & {"Qin", "Zin"}) == 1 for half in names[0])  # one Black name per half
    assert generalize.name_folds(prompts, seed=0)[0][0].prompts == folds[0][0].prompts
    fold_scores = [generalize.variation_scores(bridge, selection, 5, READOUT, progress=False)
                   for selection, _ in folds]
    cases = generalize.cross_fit_cases("prompt", folds, fold_scores, ONE_EACH)
    for case in cases:
        selection, evaluation = folds[case.fold]
        assert set(case.names) == {p.name for p in evaluation} and not set(case.names) & {p.name for p in selection}
        if case.kind == "attn_head":
            black = ({p.name for p in selection} & {"Qin", "Zin"}).pop()
            assert case.pruning.components == [model.head if black == "Qin" else model.z_head]
    summary, after = generalize.evaluate(bridge, prompts, baseline, cases, READOUT, STATS, progress=False)
    for _, part in after.groupby("kind"):
        assert sorted(part.name) == sorted(baseline.name)  # the evaluation halves hold every name once
    heads, neurons = (cell(summary, kind=k) for k in ("attn_head", "mlp_neuron"))
    assert flag(heads.held_out) and flag(neurons.held_out)
    assert heads.reduction_pct == pytest.approx(0, abs=0.01)
    assert neurons.reduction_pct > 90
    swapped = [Case(c.regime, c.source, c.target, c.units, c.pruning, c.budget,
                    names=tuple(p.name for p in folds[c.fold][0]), fold=c.fold) for c in cases]
    in_sample, _ = generalize.evaluate(bridge, prompts, baseline, swapped, READOUT, STATS, progress=False)
    assert cell(in_sample, kind="attn_head").reduction_pct == pytest.approx(100, abs=1e-6)


# ============================================================================================ selection rules


def scores_of(kind: str, *rankings: list[int], width: int = 4) -> list[ComponentScores]:
    """Score lists over 2 layers x `width` components, each ranking the given flat indices first."""
    lists = []
    for ranking in rankings:
        values = torch.zeros(2 * width)
        values[ranking] = torch.arange(len(ranking), 0, -1, dtype=torch.float32)
        lists.append(ComponentScores("attribution", kind, values.view(2, width)))
    return lists


def flat(*indices: int, kind: str = "mlp_neuron", width: int = 4) -> list[Component]:
    return [Component(i // width, kind, i % width) for i in indices]


def test_rank_aggregation_counts_top_k_then_mean_rank():
    one = scores_of("mlp_neuron", [5, 2, 7, 0])
    assert generalize.rank_aggregate(one, 3) == one[0].top(3) == flat(5, 2, 7)
    # 2 is in both top-2, 5 and 0 in one each: 5's mean rank (0 + 2) / 2 beats 0's (3 + 1) / 2
    lists = scores_of("mlp_neuron", [5, 2, 1, 0], [2, 0, 5, 1])
    assert generalize.rank_aggregate(lists, 2) == flat(2, 5)
    assert generalize.rank_aggregate(lists, 3) == flat(2, 5, 0)  # 0 ranks (3 + 1) / 2, 1 ranks (2 + 3) / 2
    # the count comes first: 0 tops two of three lists (mean rank 7 / 3), 1 tops one (mean rank 2 / 3)
    first, last = torch.tensor([[3.0, 2, 1, 0], [0] * 4]), torch.tensor([[-1.0, 2, 1, 0], [0] * 4])
    lists = [ComponentScores("attribution", "mlp_neuron", v) for v in (first, first, last)]
    assert generalize.rank_aggregate(lists, 1) == flat(0)
    unscored = scores_of("attn_head", [1, 2], width=2)[0]
    unscored.scores[1] = float("nan")
    assert generalize.rank_aggregate([unscored], 4) == flat(1, 0, kind="attn_head", width=2)


def unit_scores(neurons: dict[tuple[str, str], list[int]]) -> dict:
    """Per-unit scores whose neuron rankings are given and whose head rankings are arbitrary."""
    heads = scores_of("attn_head", [3, 1, 0], [0, 1, 2], [2, 3, 1])
    return {unit: {"mlp_neuron": scores_of("mlp_neuron", ranking)[0], "attn_head": heads[i % 3]}
            for i, (unit, ranking) in enumerate(neurons.items())}


def test_every_regime_prunes_the_budget_and_intersection_its_own_count():
    scores = unit_scores({("a", "x"): [0, 1, 2], ("a", "y"): [3, 4, 5], ("a", "z"): [0, 4, 6],
                          ("b", "x"): [7, 1, 0], ("b", "w"): [7, 2, 1]})
    budgets = {"mlp_neuron": 2, "attn_head": 2}
    for regime in generalize.REGIMES:
        cases = generalize.regime_cases(regime, scores, budgets)
        assert cases and all(c.pruning.size == c.budget == 2 for c in cases)
    paper = generalize.regime_cases("cross_context", scores, budgets, neuron_rule="intersection")
    by_source = {c.source: c.pruning for c in paper if c.target == "a" and c.kind == "mlp_neuron"}
    assert by_source["a"].components == [] and by_source["b"].components == flat(7)  # {0,1}&{3,4}&{0,4}; {7,1}&{7,2}
    assert all(len(c.pruning.components) == 2 for c in paper if c.kind == "attn_head")
    with pytest.raises(ValueError, match="unknown neuron rule"):
        generalize.regime_cases("prompt", scores, budgets, neuron_rule="most_often")


def test_nothing_pruned_is_an_explicit_row_and_intersection_reports_its_count(marked):
    _, bridge, prompts, baseline = marked
    scores = unit_scores({("tip", "lamp"): [0, 1, 2], ("tip", "desk"): [2, 3, 4]})
    intersected = generalize.regime_cases("cross_context", scores, {"mlp_neuron": 3, "attn_head": 1},
                                          neuron_rule="intersection")
    empty = generalize.regime_cases("cross_context", scores, {"mlp_neuron": 2, "attn_head": 1},
                                    neuron_rule="intersection")
    cases = [c for c in intersected if c.kind == "mlp_neuron"] + [c for c in empty if c.kind == "mlp_neuron"]
    assert [c.pruning.size for c in cases] == [1, 0]
    summary, after = generalize.evaluate(bridge, prompts, baseline, cases, READOUT, STATS, progress=False)
    counted, nothing = cell(summary, budget=3), cell(summary, budget=2)
    assert counted.n_pruned_mean == 1 and counted.note == "" and math.isfinite(counted.reduction_pct)
    assert nothing.n_pruned_mean == 0 and nothing.note == "nothing pruned"
    assert math.isnan(nothing.reduction_pct) and math.isnan(nothing.bias_after) and math.isnan(nothing.ci_low)
    assert nothing.bias_before == pytest.approx(counted.bias_before) and nothing.bias_before > 0.3
    assert pd.isna(nothing.better_than_random)
    assert len(after) == 2 * len(baseline) and set(after.n_pruned) == {0, 1}


def test_batched_prunings_equal_one_pruning_at_a_time(two_contexts):
    """read_pruned (each batch row its own pruning, as hooks) gives the distributions of applying each pruning
    alone as weight edits; it fails if a row gets another row's pruning."""
    model, bridge, prompts, _, _ = two_contexts
    prunings = [Pruning("mlp_neuron", [model.neuron]), Pruning("attn_head", [model.head]),
                Pruning("mlp_neuron", [Component(2, "mlp_neuron", 5), Component(0, "mlp_neuron", 1)]),
                Pruning("attn_head", [model.head])]
    subsets = [prompts, prompts.filter(context="tip"), prompts, prompts.filter(context="pay")]
    readout = dataclasses.replace(READOUT, batch_size=3)  # batches mix prunings and prompts
    for head_ablation in ("zero", "query_zero"):
        batched = generalize.read_pruned(bridge, subsets, prunings, readout, head_ablation=head_ablation,
                                         progress=False)
        for subset, pruning, table in zip(subsets, prunings, batched):
            with pruning.active(bridge, "zero", head_ablation):
                alone = run_audit(bridge, subset, exact=readout, progress=False)
            assert (table.name.tolist(), table.variation.tolist()) == (alone.name.tolist(), alone.variation.tolist())
            for got, want in zip(table.itertuples(), alone.itertuples()):
                assert np.allclose(got.values, want.values) and np.allclose(got.weights, want.weights, atol=1e-6)
    unpruned = run_audit(bridge, prompts, exact=readout, progress=False)
    assert not np.allclose(batched[0].log_expected, unpruned.log_expected)  # the pruning does something
