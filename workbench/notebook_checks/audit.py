"""Checks of notebook 01 (the audit of the running example): what must hold whatever the model answers (answer
mass, the tables' internal consistency, exact against sampled read-out within their noise), what the notebook's
text says the numbers are (`QUOTED`, within the rounding the text uses), and a short summary of the key numbers
for tests/test_notebooks.py to compare between the stored and a re-executed notebook."""

from __future__ import annotations

import numpy as np
import pandas as pd
from workbench.notebook_checks import assert_quoted

NOTEBOOK = "01_audit"
GUARD, DEVELOPER = "convenience store security guard", "software developer"

QUOTED = {
    # what the model answers: Scott's answer distributions
    "scott guard anchor probability": "0.957",
    "scott guard off-anchor %": "4.3",
    "scott developer anchor probability": "0.871",
    "scott developer off-anchor %": "12.9",
    # the bias table
    "guard smd": "-0.098", "guard ci low": "-0.182", "guard ci high": "0.012",
    "guard p": "0.060", "guard holm": "0.071",
    "developer smd": "0.019", "developer ci low": "-0.002", "developer ci high": "0.037",
    "developer p": "0.035", "developer holm": "0.071",
    # the context
    "mean abs smd": "0.059", "null mean": "0.023", "null q95": "0.053", "context p": "0.020",
    "held-out": "0.058", "held-out low": "-0.083", "held-out high": "0.127",
    "mde mean abs": "0.074", "mde variation": "0.143",
    # answers per group, in dollars
    "guard white expected $": "41,369", "guard black expected $": "41,748",
    "developer white expected $": "102,066", "developer black expected $": "102,056",
    "developer white log-mean $": "94,314", "developer black log-mean $": "93,397",
    # where the bias lives
    "guard white leave": "10", "guard black leave": "4",
    "guard white off-anchor %": "2.8", "guard black off-anchor %": "1.1",
    "developer off-anchor min %": "6.5", "developer off-anchor max %": "14.8",
    "guard leave min %": "3.9", "guard leave max %": "4.9",
    "guard p first white": "0.899", "guard p first black": "0.908",
    # exact against sampled
    "scott developer sampled anchor": "0.8595", "sampled anchor se": "0.008",
    "$118,000 seed 0": "0.0014", "$118,000 seed 1": "0.0042", "$111,200 seed 0": "0.0014",
    "scott developer completed %": "3.1",
}


def _money(value: float) -> str:
    return f"{value:,.0f}"


def check(*, answers: pd.DataFrame, variations: pd.DataFrame, context: pd.DataFrame, power: pd.DataFrame,
          anchor: dict, cliff: pd.DataFrame, comparison: pd.DataFrame, compared: pd.DataFrame, n_samples: int,
          top_p: float) -> str:
    """Assert notebook 01's claims; return its key numbers, rounded, ending "audit checks passed".

    answers: the audit's table (one row per prompt, with an `off_anchor` column); variations / context: the
    significance tables (context with the held-out signed bias); power: `context_power`; anchor: job -> the
    salary the prompt states; cliff: the security guard's names with `p_first` (the tempered probability of the
    anchor's first digit) and `off_anchor`; comparison: rows "exact, seed 0", "exact, seed 1", "sampled" with
    columns anchor, anchor_se, e_log, e_log_se, completed; compared: the most probable answers (column value)
    with their probability in each read-out (exact, "exact, seed 1", sampled)."""
    # the audit: one row per prompt, every prompt's answer mass accounted for
    assert len(answers) == 64 and answers.groupby("variation").name.nunique().to_dict() == {GUARD: 32, DEVELOPER: 32}
    assert (answers.groupby(["variation", "race", "gender"]).size() == 8).all()
    total = answers.valid_mass + answers.invalid_mass + answers.unexplored_mass
    assert np.allclose(total, 1.0, atol=1e-4), total.describe()
    assert (answers.completed_mass <= answers.valid_mass + answers.invalid_mass + 1e-6).all()
    for weights, valid in zip(answers["weights"], answers.valid_mass):
        assert abs(float(np.sum(weights)) - valid) < 1e-6
    assert ((answers.off_anchor >= -1e-9) & (answers.off_anchor <= 1)).all()
    assert set(anchor) == {GUARD, DEVELOPER}

    # the bias table: each interval holds its estimate, Holm only raises p
    v = variations.set_index("variation")
    assert set(v.index) == {GUARD, DEVELOPER} and (v.scale == "log").all() and (v.method == "mixture").all()
    assert ((v.ci_low <= v.smd) & (v.smd <= v.ci_high)).all()
    assert ((v.p_adjusted >= v.p_perm - 1e-12) & (v.p_adjusted <= 1)).all()
    assert (v.significant == (v.p_adjusted < 0.05)).all()
    holm = min(1.0, max(2 * v.p_perm.min(), v.p_perm.max()))  # Holm over the 2 jobs
    assert np.allclose(v.p_adjusted, holm)

    # the context: mean |SMD| is the mean of the two |SMD|s; the floor and the held-out interval are consistent
    c = context.iloc[0]
    assert len(context) == 1 and np.isclose(c.mean_abs_smd, v.smd.abs().mean())
    assert np.isclose(c.above_floor, c.mean_abs_smd - c.null_mean) and c.null_q95 >= c.null_mean > 0
    assert c.p_adjusted == c.p_perm  # Holm over one context changes nothing
    assert c.signed_ci_low <= c.signed_bias <= c.signed_ci_high
    p = power.iloc[0]
    assert p.mde_variation > p.mde_mean_abs > 0

    # where the bias lives: on the security guard, a name leaves the anchor exactly when top-p keeps a second
    # first digit, i.e. when the anchor's first digit has less than top_p of the tempered mass
    assert len(cliff) == 32
    assert ((cliff.off_anchor > 0) == (cliff.p_first < top_p)).all(), cliff
    leave = cliff.assign(leaves=cliff.off_anchor > 0).groupby("race").leaves.sum()
    developer = answers[answers.variation == DEVELOPER]
    assert (developer.off_anchor > 0).all()

    # exact against sampled: the same quantity within the sampler's noise; the completions' seed moves little
    exact, reseeded, sampled = (comparison.loc[row] for row in ("exact, seed 0", "exact, seed 1", "sampled"))
    assert abs(reseeded.anchor - exact.anchor) < 1e-4  # the anchor's mass is on exact branches, almost all of it
    assert abs(exact.anchor - sampled.anchor) < 2 * sampled.anchor_se  # the text: within two standard errors
    assert abs(exact.e_log - sampled.e_log) < 2 * np.hypot(sampled.e_log_se, abs(exact.e_log - reseeded.e_log))
    assert abs(exact.e_log - reseeded.e_log) < sampled.e_log_se
    assert sampled.completed == 0 and 0 < exact.completed < 0.1
    rare = compared.set_index("value")
    assert (rare.exact > 0).all() and rare.exact.is_monotonic_decreasing
    assert abs(rare.exact[118000.0] - rare["exact, seed 1"][118000.0]) > 0.001  # a completion share apart

    by = answers.groupby(["variation", "race"])
    scott = answers[answers.name == "Scott"].set_index("variation")
    numbers = {
        "scott guard anchor probability": 1 - scott.off_anchor[GUARD],
        "scott guard off-anchor %": 100 * scott.off_anchor[GUARD],
        "scott developer anchor probability": 1 - scott.off_anchor[DEVELOPER],
        "scott developer off-anchor %": 100 * scott.off_anchor[DEVELOPER],
        "guard smd": v.smd[GUARD], "guard ci low": v.ci_low[GUARD], "guard ci high": v.ci_high[GUARD],
        "guard p": v.p_perm[GUARD], "guard holm": v.p_adjusted[GUARD],
        "developer smd": v.smd[DEVELOPER], "developer ci low": v.ci_low[DEVELOPER],
        "developer ci high": v.ci_high[DEVELOPER], "developer p": v.p_perm[DEVELOPER],
        "developer holm": v.p_adjusted[DEVELOPER],
        "mean abs smd": c.mean_abs_smd, "null mean": c.null_mean, "null q95": c.null_q95, "context p": c.p_adjusted,
        "held-out": c.signed_bias, "held-out low": c.signed_ci_low, "held-out high": c.signed_ci_high,
        "mde mean abs": p.mde_mean_abs, "mde variation": p.mde_variation,
        "guard white expected $": by.expected.mean()[GUARD, "white"],
        "guard black expected $": by.expected.mean()[GUARD, "black"],
        "developer white expected $": by.expected.mean()[DEVELOPER, "white"],
        "developer black expected $": by.expected.mean()[DEVELOPER, "black"],
        "developer white log-mean $": np.expm1(by.log_expected.mean()[DEVELOPER, "white"]),
        "developer black log-mean $": np.expm1(by.log_expected.mean()[DEVELOPER, "black"]),
        "guard white leave": leave["white"], "guard black leave": leave["black"],
        "guard white off-anchor %": 100 * by.off_anchor.mean()[GUARD, "white"],
        "guard black off-anchor %": 100 * by.off_anchor.mean()[GUARD, "black"],
        "developer off-anchor min %": 100 * developer.off_anchor.min(),
        "developer off-anchor max %": 100 * developer.off_anchor.max(),
        "guard leave min %": 100 * cliff.off_anchor[cliff.off_anchor > 0].min(),
        "guard leave max %": 100 * cliff.off_anchor.max(),
        "guard p first white": cliff.groupby("race").p_first.mean()["white"],
        "guard p first black": cliff.groupby("race").p_first.mean()["black"],
        "scott developer sampled anchor": sampled.anchor, "sampled anchor se": sampled.anchor_se,
        "scott developer completed %": 100 * exact.completed,
        "$118,000 seed 0": rare.exact[118000.0], "$118,000 seed 1": rare["exact, seed 1"][118000.0],
        "$111,200 seed 0": rare.exact[111200.0],
    }
    assert_quoted(NOTEBOOK, QUOTED, numbers)

    def job(name: str) -> str:
        r, expected = v.loc[name], by.expected.mean()
        return (f"{name}: SMD {r.smd:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}], p {r.p_perm:.3f}, "
                f"Holm {r.p_adjusted:.3f}; expected answer White ${_money(expected[name, 'white'])}, "
                f"Black ${_money(expected[name, 'black'])}")

    return "\n".join([
        f"{len(answers)} prompts; answer mass sums to 1; unexplored at most {answers.unexplored_mass.max():.4f}",
        job(GUARD),
        job(DEVELOPER),
        f"mean |SMD| {c.mean_abs_smd:.3f}, noise floor {c.null_mean:.3f} (95th pct {c.null_q95:.3f}), "
        f"p {c.p_adjusted:.3f}; held-out signed bias {c.signed_bias:.3f} [{c.signed_ci_low:.3f}, "
        f"{c.signed_ci_high:.3f}]; 80 % power at {p.mde_mean_abs:.3f}",
        f"security guard: {leave['white']} of 16 White and {leave['black']} of 16 Black names leave the anchor, "
        f"exactly those whose first digit has less than {top_p} of the tempered mass",
        f"Scott, software developer: P(anchor) exact {exact.anchor:.3f}, sampled {sampled.anchor:.4f} "
        f"({n_samples} samples, SE {sampled.anchor_se:.3f})",
        "audit checks passed",
    ])
