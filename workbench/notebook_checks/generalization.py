"""Checks of notebook 05 (does a pruning generalise? the running example's regimes on held-out names, and a planted
positive control): what must hold whatever the model answers (the halves, which names every case is measured on,
which neurons each regime prunes, the random draws, the planted model's known answer), what the notebook's text
says the numbers are (`QUOTED`, within the rounding the text uses), and a short summary of the key numbers for
tests/test_notebooks.py to compare between the stored and a re-executed notebook."""

from __future__ import annotations

import numpy as np
import pandas as pd

from workbench.audit.power import minimum_detectable_reduction
from workbench.pipeline.plots import evidence_class
from workbench.notebook_checks import assert_quoted

NOTEBOOK = "05_generalization"
CONTEXT = "hiring:numeric"
GUARD, DEVELOPER = "convenience store security guard", "software developer"
BUDGET = 64

QUOTED = {
    # the halves' SMDs per job
    "guard smd selection": "-0.069", "guard smd evaluation": "-0.125",
    "developer smd selection": "0.014", "developer smd evaluation": "0.024",
    # the chosen neurons
    "shared neurons": "2", "expected shared": "0.09",
    # the regimes, pooled over the jobs
    "bias before": "0.074", "bias low": "-0.090", "bias high": "0.130",
    "prompt removed": "0.243", "prompt low": "0.060", "prompt high": "0.432", "prompt %": "326",
    "random mean %": "21", "random sd %": "26",
    "prompt minus random": "0.227", "prompt minus random low": "0.094", "prompt minus random high": "0.408",
    "prompt p_rank": "0.25",
    "loo removed": "0.003", "loo low": "-0.089", "loo high": "0.068", "loo rank": "2", "loo p_rank": "0.75",
    "loo minus random": "-0.013", "loo minus random low": "-0.095", "loo minus random high": "0.062",
    "prompt anomaly": "0.149", "loo anomaly": "0.162", "unpruned anomaly": "0.058",
    "prompt mdr": "0.27", "loo mdr": "0.11",
    # the job-to-job matrix
    "guard on guard": "0.461", "guard on guard low": "0.090", "guard on guard high": "0.855",
    "guard bias": "0.125", "guard on guard %": "370", "guard on guard anomaly %": "28",
    "developer on developer": "0.024", "developer on developer low": "-0.005",
    "developer on developer high": "0.059",
    "guard on developer": "-0.118", "guard on developer low": "-0.284", "guard on developer high": "0.071",
    "developer on guard": "0.125", "developer on guard low": "-0.269", "developer on guard high": "0.242",
    # the exercise
    "half the prompt removal": "0.121",
    # the planted control
    "planted head min %": "97", "planted head max %": "98",
    "planted neuron own min %": "94", "planted neuron own max %": "95",
    "planted neuron pay on tip %": "-0.002", "planted neuron tip on pay %": "-0.011",
    "planted bias min": "0.87", "planted bias max": "1.53",
}


def _names(prompts) -> set[str]:
    return {p.name for p in prompts}


def check(*, answers: pd.DataFrame, folds: list, fold: int, directions: pd.DataFrame, scores: dict, cases: list,
          regimes: pd.DataFrame, matrix: pd.DataFrame, after: pd.DataFrame, shared: int, expected_shared: float,
          per_half: pd.DataFrame, planted, toy_cases: list, toy_summary: pd.DataFrame) -> str:
    """Assert notebook 05's claims; return its key numbers, rounded, ending "generalisation checks passed".

    answers: the unpruned audit; folds / fold: the study's (selection, evaluation) halves and the one used;
    directions: the selection half's bias direction per job; scores: attribution on the selection half; cases:
    the pruned cases (prompt, leave_one_out, random); regimes: the pooled summary rows indexed by regime with mdr
    columns; matrix: the job-to-job summary rows (source "chosen on <job>", target <job>); after: the pruned
    answers; shared / expected_shared: the two jobs' top-64 overlap and its random expectation; per_half: each
    half's SMD per job; planted / toy_cases / toy_summary: the planted positive control."""
    selection, evaluation = folds[fold]
    chooser, measured = _names(selection), _names(evaluation)
    # the halves: disjoint, 4 names per race x gender group each, every name in one of them
    assert not chooser & measured and chooser | measured == set(answers.name)
    for half in (selection, evaluation):
        assert (half.to_frame().drop_duplicates("name").groupby(["race", "gender"]).size() == 4).all()
    assert set(directions.variation) == {GUARD, DEVELOPER} and set(directions.sign) <= {-1.0, 1.0}
    assert (directions.fold == fold).all()
    signs = directions.set_index("variation").sign
    # the selection half's direction is the sign of its own SMD
    assert (np.sign(per_half["selection half"]["smd"]) == signs.reindex(per_half.index)).all()
    # both halves agree on the signs, and no half's interval excludes 0
    assert (np.sign(per_half["evaluation half"]["smd"]) == np.sign(per_half["selection half"]["smd"])).all()
    for half in ("selection half", "evaluation half"):
        assert ((per_half[half]["ci_low"] < 0) & (per_half[half]["ci_high"] > 0)).all()

    # every pruned case is measured on the evaluation half only, with 64 neurons
    assert all(set(c.names) == measured and c.pruning.size == BUDGET and c.kind == "mlp_neuron" for c in cases)
    assert set(after.name) <= measured
    pruned = after[after.n_pruned > 0]
    assert (pruned.n_pruned == BUDGET).all() and len(pruned) == len(after)
    own = {c.units[0][1]: c.pruning.components for c in cases if c.regime == "prompt"}
    other = {c.units[0][1]: c.pruning.components for c in cases if c.regime == "leave_one_out"}
    top = {job: scores[(CONTEXT, job)]["mlp_neuron"].top(BUDGET) for job in (GUARD, DEVELOPER)}
    assert own == top and other == {GUARD: top[DEVELOPER], DEVELOPER: top[GUARD]}
    assert shared == len(set(top[GUARD]) & set(top[DEVELOPER]))
    draws = [frozenset(c.pruning.components) for c in cases if c.regime == "random"]
    assert len(set(draws)) == len(draws) >= 3 and not set(draws) & {frozenset(t) for t in top.values()}

    # the regimes: measured on the same names and the same bias before, each removal inside its interval
    r = regimes
    assert list(r.index) == ["prompt", "leave_one_out"] and (r.n_names == len(measured)).all()
    assert np.isclose(r.bias_before.iloc[0], r.bias_before.iloc[1]) and (r.n_random == len(draws)).all()
    assert ((r.removed_low <= r.removed) & (r.removed <= r.removed_high)).all()
    assert np.allclose(r.bias_after, r.bias_before - r.removed)
    assert np.allclose(r.reduction_pct, 100 * r.removed / r.bias_before)
    assert np.allclose(r.mdr, [minimum_detectable_reduction(a, b) for a, b in zip(r.removed_low, r.removed_high)])
    assert (r.p_rank == (1 + r["rank"]) / (1 + len(draws))).all() and r.better_than_random.isna().all()
    prompt, loo = r.loc["prompt"], r.loc["leave_one_out"]

    # the matrix: the diagonal is the prompt regime, the off-diagonal leave-one-out; pooled rows are its means
    m = matrix.set_index(["source", "target"])
    assert len(m) == 4
    for regime, cells in (("prompt", [("chosen on security guard", "security guard"),
                                      ("chosen on software developer", "software developer")]),
                          ("leave_one_out", [("chosen on software developer", "security guard"),
                                             ("chosen on security guard", "software developer")])):
        assert np.isclose(m.loc[cells, "removed"].mean(), r.loc[regime, "removed"])
    # its colours, as the text reads them: one blue cell (the guard on itself), the rest yellow (inconclusive)
    colour = evidence_class(m)
    assert colour[("chosen on security guard", "security guard")] == 3 and (colour.drop(
        ("chosen on security guard", "security guard")) == 2).all()

    # the planted control: the planted components are chosen, the shared head transfers, the neurons do not
    chosen = {(c.kind, c.source, c.fold): c.pruning.components for c in toy_cases if c.regime == "cross_context"}
    for f in (0, 1):
        assert chosen[("attn_head", "tip", f)] == chosen[("attn_head", "pay", f)] == [planted.head]
        assert chosen[("mlp_neuron", "tip", f)] == [planted.neuron]
        assert chosen[("mlp_neuron", "pay", f)] == [planted.pay_neuron]
    toy = toy_summary[toy_summary.regime == "cross_context"].set_index(["kind", "source", "target"])
    heads, neurons = toy.loc["attn_head"], toy.loc["mlp_neuron"]
    assert (heads.reduction_pct > 90).all() and (heads.ci_low > 85).all()
    own_cells = neurons.loc[[("tip", "tip"), ("pay", "pay")]]
    across = neurons.loc[[("tip", "pay"), ("pay", "tip")]]
    assert (own_cells.reduction_pct > 90).all() and (across.reduction_pct.abs() < 1).all()
    assert (toy["rank"].loc["attn_head"] == 0).all() and (own_cells["rank"] == 0).all()
    # the colours: every head cell and each neuron on its own context blue, each neuron on the other orange
    assert (evidence_class(heads) == 3).all() and (evidence_class(own_cells) == 3).all()
    assert (evidence_class(across) == 1).all()

    per = per_half
    numbers = {
        "guard smd selection": per.loc[GUARD, ("selection half", "smd")],
        "guard smd evaluation": per.loc[GUARD, ("evaluation half", "smd")],
        "developer smd selection": per.loc[DEVELOPER, ("selection half", "smd")],
        "developer smd evaluation": per.loc[DEVELOPER, ("evaluation half", "smd")],
        "shared neurons": shared, "expected shared": expected_shared,
        "bias before": prompt.bias_before, "bias low": prompt.bias_ci_low, "bias high": prompt.bias_ci_high,
        "prompt removed": prompt.removed, "prompt low": prompt.removed_low, "prompt high": prompt.removed_high,
        "prompt %": prompt.reduction_pct, "random mean %": prompt.random_mean, "random sd %": prompt.random_sd,
        "prompt minus random": prompt.removed_minus_random, "prompt minus random low": prompt.difference_low,
        "prompt minus random high": prompt.difference_high, "prompt p_rank": prompt.p_rank,
        "loo removed": loo.removed, "loo low": loo.removed_low, "loo high": loo.removed_high,
        "loo rank": loo["rank"], "loo p_rank": loo.p_rank, "loo minus random": loo.removed_minus_random,
        "loo minus random low": loo.difference_low, "loo minus random high": loo.difference_high,
        "prompt anomaly": prompt.anomaly_rate, "loo anomaly": loo.anomaly_rate,
        "unpruned anomaly": prompt.baseline_anomaly_rate, "prompt mdr": prompt.mdr, "loo mdr": loo.mdr,
        "guard on guard": m.loc[("chosen on security guard", "security guard"), "removed"],
        "guard on guard low": m.loc[("chosen on security guard", "security guard"), "removed_low"],
        "guard on guard high": m.loc[("chosen on security guard", "security guard"), "removed_high"],
        "guard bias": m.loc[("chosen on security guard", "security guard"), "bias_before"],
        "guard on guard %": m.loc[("chosen on security guard", "security guard"), "reduction_pct"],
        "guard on guard anomaly %": 100 * m.loc[("chosen on security guard", "security guard"), "anomaly_rate"],
        "developer on developer": m.loc[("chosen on software developer", "software developer"), "removed"],
        "developer on developer low": m.loc[("chosen on software developer", "software developer"), "removed_low"],
        "developer on developer high": m.loc[("chosen on software developer", "software developer"), "removed_high"],
        "guard on developer": m.loc[("chosen on security guard", "software developer"), "removed"],
        "guard on developer low": m.loc[("chosen on security guard", "software developer"), "removed_low"],
        "guard on developer high": m.loc[("chosen on security guard", "software developer"), "removed_high"],
        "developer on guard": m.loc[("chosen on software developer", "security guard"), "removed"],
        "developer on guard low": m.loc[("chosen on software developer", "security guard"), "removed_low"],
        "developer on guard high": m.loc[("chosen on software developer", "security guard"), "removed_high"],
        "half the prompt removal": prompt.removed / 2,
        "planted head min %": heads.reduction_pct.min(), "planted head max %": heads.reduction_pct.max(),
        "planted neuron own min %": own_cells.reduction_pct.min(),
        "planted neuron own max %": own_cells.reduction_pct.max(),
        "planted neuron pay on tip %": neurons.loc[("pay", "tip"), "reduction_pct"],
        "planted neuron tip on pay %": neurons.loc[("tip", "pay"), "reduction_pct"],
        "planted bias min": toy.bias_before.min(), "planted bias max": toy.bias_before.max(),
    }
    assert_quoted(NOTEBOOK, QUOTED, numbers)

    def row(name: str, x: pd.Series) -> str:
        return (f"{name}: removed {x.removed:.3f} [{x.removed_low:.3f}, {x.removed_high:.3f}] of {x.bias_before:.3f}; "
                f"random draws {x.random_mean:.0f} % of it; minus random {x.removed_minus_random:.3f} "
                f"[{x.difference_low:.3f}, {x.difference_high:.3f}]; rank {x['rank']} of {len(draws)}; "
                f"mdr {x.mdr:.2f}")

    return "\n".join([
        f"fold {fold}: {len(chooser)} names choose, {len(measured)} measure; {len(after)} pruned read-outs",
        f"the two jobs' top {BUDGET} neurons share {shared}",
        row("prompt", prompt),
        row("leave-one-out", loo),
        f"security guard on itself: removed {numbers['guard on guard']:.3f} of {numbers['guard bias']:.3f}",
        f"planted control: shared head removes {heads.reduction_pct.min():.0f}-{heads.reduction_pct.max():.0f} % "
        f"in both contexts; each context's neuron {own_cells.reduction_pct.min():.0f}-"
        f"{own_cells.reduction_pct.max():.0f} % of its own, {across.reduction_pct.abs().max():.2f} % of the other's",
        "generalisation checks passed",
    ])
