"""Checks of notebook 06 (the bias types of the running example in one family of tests, their power, the four
groups' means, and the cross-type matrix on a planted model): what must hold whatever the model answers (each
contrast reads "a minus b", the family and its Holm correction, the race rows against the race tables, the
dollars against the log-scale means, the planted matrix's known answer), what the notebook's text says the numbers
are (`QUOTED`, within the rounding the text uses), and a short summary of the key numbers for
tests/test_notebooks.py to compare between the stored and a re-executed notebook."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.stats as sps

from workbench.audit.bias_types import CONTRASTS
from workbench.audit.stats import adjust_pvalues, significance_table
from workbench.notebook_checks import assert_quoted
from workbench.pipeline.plots import evidence_class

NOTEBOOK = "06_bias_types"
CONTEXT = "hiring:numeric"
GUARD, DEVELOPER = "convenience store security guard", "software developer"
STATS = dict(scale="log", method="mixture", n_boot=1000, seed=0, min_valid_mass=0.5)
GROUPS = ("white_men", "white_women", "black_men", "black_women")

QUOTED = {
    # the four groups in dollars
    "guard white men $": "40,403", "guard black men $": "41,680",
    "developer white men $": "94,653", "developer black women $": "93,092",
    # the family of 12
    "smallest holm": "0.348", "white men minus black women developer p": "0.029",
    "race developer p": "0.035", "white men minus black men guard p": "0.041",
    "race guard smd": "-0.098", "race guard low": "-0.182", "race guard high": "0.012",
    "white men minus black men guard smd": "-0.149", "white men minus black men guard low": "-0.251",
    "white men minus black men guard high": "0.174",
    "race developer smd": "0.019", "race developer low": "-0.002", "race developer high": "0.037",
    "white men minus black women developer smd": "0.033",
    "gender guard smd": "0.027", "gender developer smd": "0.014",
    "rest minus black women developer smd": "0.021", "rest minus black women developer low": "0.007",
    "rest minus black women developer high": "0.034", "rest minus black women developer p": "0.060",
    # one family against within race; the context level
    "race within holm": "0.071", "race guard family holm": "0.540", "race developer family holm": "0.390",
    "race mean abs smd": "0.059", "race floor": "0.023", "race context p": "0.020", "race context holm": "0.120",
    "white men minus black men mean abs smd": "0.084", "white men minus black men context p": "0.025",
    "white men minus black men context holm": "0.125",
    # power
    "race mde": "0.172", "race mde rounded": "0.17", "gender mde": "0.171",
    "white men minus black men mde": "0.243", "white men minus black women mde": "0.247",
    "intersectional mde min": "0.20", "intersectional mde max": "0.25",
    "white men minus black men se": "0.035", "race se": "0.024",
    "race largest": "0.098", "white men minus black men largest": "0.149",
    # the lowest group
    "developer below pool p": "0.027", "developer below each p": "0.104", "developer below each holm": "0.209",
    # the exercise
    "white men minus black men guard holm": "0.41",
    # the planted matrix
    "planted head own min %": "97", "planted head own max %": "98", "planted head other %": "-47",
    "planted neuron min %": "91", "planted neuron max %": "92",
    "planted head gender on race % low": "-233", "planted head race on gender % low": "-240",
    "planted head other % high": "3", "planted head other removed": "-0.47",
}


def _money(value: float) -> str:
    return f"{value:,.0f}"


def check(*, answers: pd.DataFrame, types, dollars: pd.DataFrame, means: pd.DataFrame, power: pd.DataFrame,
          lowest: pd.DataFrame, within_race: pd.Series, planted, toy_cases: list, toy_matrix: pd.DataFrame) -> str:
    """Assert notebook 06's claims; return its key numbers, rounded, ending "bias-type checks passed".

    answers: the audit; types: `bias_type_table` (variations, contexts); dollars: the four groups' means and CIs
    in dollars per (job, group); means: `group_means` on the log scale; power: `contrast_power` per bias type with
    largest_abs_smd; lowest: `lowest_group_table`; within_race: Holm within race's two jobs; planted / toy_cases /
    toy_matrix: the planted cross-type matrix."""
    v, c = types.variations, types.contexts
    names = [contrast.name for contrast in CONTRASTS]
    # every bias type x job once, one family of 12 for the variations and of 6 for the contexts
    assert list(dict.fromkeys(v.bias_type)) == names and len(v) == 2 * len(names) and list(c.bias_type) == names
    assert (v.family == "all 12 tests: 6 bias types x variations").all()
    assert (c.family == "all 6 tests: 6 bias types x contexts").all()
    assert np.allclose(v.p_adjusted, adjust_pvalues(v.p_perm.to_numpy(), "holm"))
    assert np.allclose(c.p_adjusted, adjust_pvalues(c.p_perm.to_numpy(), "holm"))
    assert (v.p_adjusted >= v.p_perm - 1e-12).all() and (v.significant == (v.p_adjusted < 0.05)).all()
    assert ((v.ci_low <= v.smd) & (v.smd <= v.ci_high)).all()
    # "a minus b": each name reads as its SMD, whose sign is side a's mean minus side b's
    for contrast in CONTRASTS:
        a, b = (label.replace(" ", "_") for label in contrast.labels)
        assert contrast.name in ("race", "gender") or contrast.name == f"{a}_minus_{b}".replace("the_rest", "rest")
    assert (np.sign(v.smd) == np.sign(v.mean_a - v.mean_b)).all()
    # the race rows are the race tables' numbers (notebook 01), with the larger family's p_adjusted
    race = significance_table(answers, n_perm=2000, **STATS)
    r = v[v.bias_type == "race"].set_index("variation")
    own = race.variations.set_index("variation")
    assert np.allclose(r.smd, own.smd.reindex(r.index)) and np.allclose(r.p_perm, own.p_perm.reindex(r.index))
    assert np.allclose(within_race.to_numpy(), own.p_adjusted.reindex(r.index).to_numpy())
    assert np.isclose(c.set_index("bias_type").p_perm["race"], race.contexts.p_perm.iloc[0])

    # the four groups: the dollars back-transform the log-scale means; the means are those of each group's names
    four = means[means.gender != "all"]
    assert len(four) == 8 and (four.n_names == 8).all()
    back = np.sign(four["mean"]) * np.expm1(np.abs(four["mean"]))
    assert np.allclose(np.sort(back.to_numpy()), np.sort(dollars["mean"].to_numpy()))
    d = dollars["mean"].unstack("job")
    guard_range, developer_range = np.ptp(d["security guard"]), np.ptp(d["software developer"])
    assert 1200 < guard_range < 1400 and 1500 < developer_range < 1700  # "about $1,300" and "about $1,600"
    assert d["security guard"].idxmin() == "white_men" and d["security guard"].idxmax() == "black_men"
    assert d["software developer"].idxmax() == "white_men" and d["software developer"].idxmin() == "black_women"
    assert (d["security guard"] < 42_000).all() and (d["software developer"] < 105_000).all()
    # the groups' intervals overlap but for Black women's on the developer, below White men's and White women's
    apart = {(job, a, b) for job in d.columns for a in GROUPS for b in GROUPS if a < b
             and (dollars.loc[(job, a), "ci_high"] < dollars.loc[(job, b), "ci_low"]
                  or dollars.loc[(job, b), "ci_high"] < dollars.loc[(job, a), "ci_low"])}
    assert apart == {("software developer", "black_women", "white_men"),
                     ("software developer", "black_women", "white_women")}, apart

    # the pattern the text reads: on the guard every contrast with Black names on side b is negative, on the
    # developer positive; gender positive on both; three tests below 0.05 uncorrected, none after Holm
    by = v.set_index(["bias_type", "variation"]).smd
    black_b = ["race", "white_men_minus_black_men", "white_men_minus_black_women", "rest_minus_black_women"]
    assert all(by[(b, GUARD)] < 0 < by[(b, DEVELOPER)] for b in black_b)
    assert by[("gender", GUARD)] > 0 and by[("gender", DEVELOPER)] > 0
    assert (v.p_perm < 0.05).sum() == 3 and not v.significant.any() and not c.significant.any()
    # power: the intersectional contrasts (half the names a side) have larger SEs than race and gender
    p = power.set_index("bias_type")
    assert (p.loc[names[2:], "se_mean_smd"] > p.loc["race", "se_mean_smd"]).all()
    assert (p.largest_abs_smd < p.mde_variation).all()  # no observed SMD reaches the 80 %-power size
    # a bias of 0.1 SMD in a job (the guard's race SMD) would be missed more often than found
    z_alpha, z_power = sps.norm.ppf(1 - 0.05 / 24), sps.norm.ppf(0.8)
    se = p.loc["race", "mde_variation"] / (z_alpha + z_power)
    assert sps.norm.cdf(0.1 / se - z_alpha) < 0.5

    # the lowest group
    low = lowest.set_index("variation")
    assert list(low.lowest.reindex([GUARD, DEVELOPER, "all"])) == ["white_men", "black_women", "white_women"]
    group_means_all = low.loc["all", ["mean_white_men", "mean_white_women", "mean_black_men", "mean_black_women"]]
    assert np.sort(group_means_all.to_numpy(float))[1] - np.sort(group_means_all.to_numpy(float))[0] < 0.002
    assert not lowest.significant.any()

    # the planted matrix: race's head is the planted one, gender's the Z head, both choose the shared neuron
    chosen = {(case.kind, case.source, case.fold): case.pruning.components for case in toy_cases
              if case.regime == "cross_type"}
    for f in (0, 1):
        assert chosen[("attn_head", "race", f)] == [planted.head]
        assert chosen[("attn_head", "gender", f)] == [planted.z_head]
        assert chosen[("mlp_neuron", "race", f)] == chosen[("mlp_neuron", "gender", f)] == [planted.neuron]
    m = toy_matrix[~toy_matrix.source_type.str.startswith("random")].set_index(["kind", "source_type", "target_type"])
    heads, neurons = m.loc["attn_head"], m.loc["mlp_neuron"]
    own_heads = heads.loc[[("race", "race"), ("gender", "gender")]]
    other_heads = heads.loc[[("race", "gender"), ("gender", "race")]]
    assert (own_heads.removed_low > 0).all() and (other_heads.removed_high < 0).all()
    assert (neurons.removed_low > 0).all() and (m["rank"].loc["mlp_neuron"] == 0).all()
    # the colours, as the text reads them: own heads and every neuron cell blue, the other type's head orange
    assert (evidence_class(own_heads) == 3).all() and (evidence_class(neurons) == 3).all()
    assert (evidence_class(other_heads) == 1).all()
    worst = other_heads.loc[other_heads.reduction_pct.idxmin()]

    row = v.assign(job=v.variation.map({GUARD: "guard", DEVELOPER: "developer"})).set_index(["bias_type", "job"])
    ctx = c.set_index("bias_type")
    numbers = {
        "guard white men $": d.loc["white_men", "security guard"],
        "guard black men $": d.loc["black_men", "security guard"],
        "developer white men $": d.loc["white_men", "software developer"],
        "developer black women $": d.loc["black_women", "software developer"],
        "smallest holm": v.p_adjusted.min(),
        "white men minus black women developer p": row.loc[("white_men_minus_black_women", "developer"), "p_perm"],
        "race developer p": row.loc[("race", "developer"), "p_perm"],
        "white men minus black men guard p": row.loc[("white_men_minus_black_men", "guard"), "p_perm"],
        "race guard smd": row.loc[("race", "guard"), "smd"], "race guard low": row.loc[("race", "guard"), "ci_low"],
        "race guard high": row.loc[("race", "guard"), "ci_high"],
        "white men minus black men guard smd": row.loc[("white_men_minus_black_men", "guard"), "smd"],
        "white men minus black men guard low": row.loc[("white_men_minus_black_men", "guard"), "ci_low"],
        "white men minus black men guard high": row.loc[("white_men_minus_black_men", "guard"), "ci_high"],
        "race developer smd": row.loc[("race", "developer"), "smd"],
        "race developer low": row.loc[("race", "developer"), "ci_low"],
        "race developer high": row.loc[("race", "developer"), "ci_high"],
        "white men minus black women developer smd": row.loc[("white_men_minus_black_women", "developer"), "smd"],
        "gender guard smd": row.loc[("gender", "guard"), "smd"],
        "gender developer smd": row.loc[("gender", "developer"), "smd"],
        "rest minus black women developer smd": row.loc[("rest_minus_black_women", "developer"), "smd"],
        "rest minus black women developer low": row.loc[("rest_minus_black_women", "developer"), "ci_low"],
        "rest minus black women developer high": row.loc[("rest_minus_black_women", "developer"), "ci_high"],
        "rest minus black women developer p": row.loc[("rest_minus_black_women", "developer"), "p_perm"],
        "race within holm": within_race.max(),
        "race guard family holm": row.loc[("race", "guard"), "p_adjusted"],
        "race developer family holm": row.loc[("race", "developer"), "p_adjusted"],
        "race mean abs smd": ctx.loc["race", "mean_abs_smd"], "race floor": ctx.loc["race", "null_mean"],
        "race context p": ctx.loc["race", "p_perm"], "race context holm": ctx.loc["race", "p_adjusted"],
        "white men minus black men mean abs smd": ctx.loc["white_men_minus_black_men", "mean_abs_smd"],
        "white men minus black men context p": ctx.loc["white_men_minus_black_men", "p_perm"],
        "white men minus black men context holm": ctx.loc["white_men_minus_black_men", "p_adjusted"],
        "race mde": p.loc["race", "mde_variation"], "race mde rounded": p.loc["race", "mde_variation"],
        "gender mde": p.loc["gender", "mde_variation"],
        "white men minus black men mde": p.loc["white_men_minus_black_men", "mde_variation"],
        "white men minus black women mde": p.loc["white_men_minus_black_women", "mde_variation"],
        "intersectional mde min": p.loc[names[2:], "mde_variation"].min(),
        "intersectional mde max": p.loc[names[2:], "mde_variation"].max(),
        "white men minus black men se": p.loc["white_men_minus_black_men", "se_mean_smd"],
        "race se": p.loc["race", "se_mean_smd"],
        "race largest": p.loc["race", "largest_abs_smd"],
        "white men minus black men largest": p.loc["white_men_minus_black_men", "largest_abs_smd"],
        "developer below pool p": low.loc[DEVELOPER, "p_one_sided"],
        "developer below each p": low.loc[DEVELOPER, "p_below_each"],
        "developer below each holm": low.loc[DEVELOPER, "p_adjusted"],
        "white men minus black men guard holm": row.loc[("white_men_minus_black_men", "guard"), "p_adjusted"],
        "planted head own min %": own_heads.reduction_pct.min(), "planted head own max %": own_heads.reduction_pct.max(),
        "planted head other %": worst.reduction_pct, "planted neuron min %": neurons.reduction_pct.min(),
        "planted neuron max %": neurons.reduction_pct.max(),
        "planted head gender on race % low": heads.loc[("gender", "race"), "ci_low"],
        "planted head race on gender % low": heads.loc[("race", "gender"), "ci_low"],
        "planted head other % high": other_heads.ci_high.max(), "planted head other removed": worst.removed,
    }
    assert_quoted(NOTEBOOK, QUOTED, numbers)

    lines = [f"{name} ({row.loc[(name, 'guard'), 'side_a']} minus {row.loc[(name, 'guard'), 'side_b']}): "
             + "; ".join(f"{job} SMD {row.loc[(name, job), 'smd']:+.3f} [{row.loc[(name, job), 'ci_low']:+.3f}, "
                         f"{row.loc[(name, job), 'ci_high']:+.3f}], Holm (12 tests) {row.loc[(name, job), 'p_adjusted']:.3f}"
                         for job in ("guard", "developer"))
             for name in names]
    return "\n".join([
        *lines,
        f"context level (Holm over 6): race p {ctx.loc['race', 'p_perm']:.3f} -> {ctx.loc['race', 'p_adjusted']:.3f}",
        "four groups ($): " + "; ".join(f"{job}: " + ", ".join(f"{g} {_money(x)}" for g, x in d[job].items())
                                        for job in d.columns),
        "80 % power in the family at SMD " + ", ".join(f"{b} {x:.3f}" for b, x in p.mde_variation.items()),
        f"lowest group: guard {low.lowest[GUARD]}, developer {low.lowest[DEVELOPER]}; none significant",
        f"planted: own head {own_heads.reduction_pct.min():.0f}-{own_heads.reduction_pct.max():.0f} %, other head "
        f"{other_heads.reduction_pct.max():.0f} %, shared neuron {neurons.reduction_pct.min():.0f}-"
        f"{neurons.reduction_pct.max():.0f} %",
        "bias-type checks passed",
    ])
