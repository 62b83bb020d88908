"""Inference with known answers: valid-mass rule, permutation p-values, multiplicity, CI coverage, and where a
bias reduction comes from.

The simulations draw many independent data sets at once, one per context of a single frame, so that one call
of the function under test covers all of them.
"""

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from workbench.audit.stats import (
    BIAS_COLUMNS,
    MASS_COLUMNS,
    SIGNIFICANCE_COLUMNS,
    SUMMARY_COLUMNS,
    _context_arrays,
    _mean_abs_statistic,
    _prepare,
    _reduction_statistic,
    _smd_statistic,
    adjust_pvalues,
    bias_reduction,
    bias_table,
    context_summary,
    group_means,
    mass_table,
    name_moments,
    permutation_test,
    significance_table,
)
from workbench.testing.answer_model import draw_names

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

def simulate(seed, n_sets, per_group, true_smd):
    """n_sets independent data sets (contexts s0000, ...), per_group names per race x gender group, one
    variation v{k} per entry of true_smd (the true mixture SMD of that variation; workbench/testing/answer_model.py)."""
    rng = np.random.default_rng(seed)
    true_smd = np.atleast_1d(np.asarray(true_smd, dtype=float))
    n_names = 4 * per_group
    races = np.repeat(["white", "black"], 2 * per_group)
    genders = np.tile(np.repeat(["man", "woman"], per_group), 2)
    values, weights = draw_names(rng, n_sets, n_names, true_smd.size,
                                 np.where(races == "white", 1.0, 0.0)[:, None] * true_smd)
    rows = [
        (f"s{s:04d}", f"v{k}", f"{races[i]}-{genders[i]}-{i}", races[i], genders[i], values[s, i, k],
         weights[s, i, k])
        for s in range(n_sets) for i in range(n_names) for k in range(true_smd.size)
    ]
    return pd.DataFrame(rows, columns=["context", "variation", "name", "race", "gender", "values", "weights"])


def coverage(table, truth):
    return float(((table.ci_low <= truth) & (truth <= table.ci_high)).mean())


# ---------------------------------------------------------------- valid-mass rule


def with_masses(df, low=("black-man-8", "black-woman-12"), low_mass=0.3):
    valid = np.where(df["name"].isin(low) & (df["variation"] == "v0"), low_mass, 0.9)
    return df.assign(valid_mass=valid, invalid_mass=0.95 - valid, unexplored_mass=0.05)


def test_low_valid_mass_rows_are_excluded_counted_and_named():
    df = with_masses(simulate(0, 2, per_group=4, true_smd=[0.5, 0.0]))
    low = df["valid_mass"] < 0.5
    table = bias_table(df, min_valid_mass=0.5, n_boot=50).set_index(["context", "variation"])
    dropped = bias_table(df[~low], n_boot=50).set_index(["context", "variation"])
    assert table.smd.to_numpy() == pytest.approx(dropped.smd.to_numpy())
    assert table.loc[("s0000", "v0"), "note"] == "excluded (valid mass < 0.5): black-man-8, black-woman-12"
    assert table.loc[("s0000", "v0"), ["n_black", "n_invalid"]].tolist() == [6, 2]
    assert table.loc[("s0000", "v1"), ["n_black", "n_invalid", "note"]].tolist() == [8, 0, ""]

    kept = bias_table(df, n_boot=50).set_index(["context", "variation"])
    assert kept.loc[("s0000", "v0"), ["n_black", "n_invalid", "note"]].tolist() == [8, 0, ""]
    assert kept.loc[("s0000", "v0"), "smd"] != pytest.approx(table.loc[("s0000", "v0"), "smd"])

    summary = context_summary(df, min_valid_mass=0.5, n_boot=50)
    assert summary.mean_abs_smd.tolist() == pytest.approx(context_summary(df[~low], n_boot=50).mean_abs_smd.tolist())
    groups = group_means(df, min_valid_mass=0.5, n_boot=20).set_index(["context", "variation", "race", "gender"])
    assert groups.loc[("s0000", "v0", "black", "all"), ["n_names", "n_invalid"]].tolist() == [6, 2]
    after = df.assign(values=[v - 0.3 * (r == "white") for v, r in zip(df["values"], df["race"])])
    reduction = bias_reduction(df, after, min_valid_mass=0.5, n_boot=50)
    reference = bias_reduction(df[~low], after[~low], n_boot=50)
    assert reduction.reduction_pct.tolist() == pytest.approx(reference.reduction_pct.tolist())


def test_mass_table():
    df = with_masses(simulate(0, 1, per_group=1, true_smd=[0.0, 0.0]), low=("black-man-2",))
    table = mass_table(df).set_index(["context", "variation", "race"])
    assert list(mass_table(df).columns) == MASS_COLUMNS
    assert table.loc[("s0000", "v0", "black"), ["valid_mass", "invalid_mass", "n_names"]].tolist() == pytest.approx(
        [0.6, 0.35, 2])
    assert table.loc[("s0000", "all", "black"), ["valid_mass", "unexplored_mass", "n_names"]].tolist() == pytest.approx(
        [0.75, 0.05, 2])
    assert table.loc[("s0000", "all", "white"), "valid_mass"] == pytest.approx(0.9)
    assert table.index.get_level_values("variation").tolist() == ["v0", "v0", "v1", "v1", "all", "all"]
    missing = mass_table(df.drop(columns=["unexplored_mass", "invalid_mass"]))
    assert missing.unexplored_mass.isna().all() and missing.invalid_mass.isna().all()
    assert missing.valid_mass.notna().all()


# ---------------------------------------------------------------- multiplicity


def test_adjust_pvalues_by_hand():
    p = [0.01, 0.04, 0.03, 0.005]
    # Holm: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04; running max 0.02, 0.03, 0.06, 0.06
    assert adjust_pvalues(p, "holm") == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # BH: sorted times 4/1, 4/2, 4/3, 4/4 = 0.02, 0.02, 0.04, 0.04; running min from the top: the same
    assert adjust_pvalues(p, "bh") == pytest.approx([0.02, 0.04, 0.04, 0.02])
    # NaN stays NaN and does not count in m; adjusted values are capped at 1
    holm = adjust_pvalues([0.2, np.nan, 0.6, 0.01], "holm")
    assert np.isnan(holm[1]) and holm[[0, 2, 3]] == pytest.approx([0.4, 0.6, 0.03])
    assert adjust_pvalues([0.5, 0.9], "holm") == pytest.approx([1.0, 1.0])
    assert adjust_pvalues([0.02, 0.03, 0.5], "bh") == pytest.approx([0.045, 0.045, 0.5])
    with pytest.raises(ValueError):
        adjust_pvalues(p, "bonferroni")


# ---------------------------------------------------------------- permutation null


def test_permutation_pvalues_are_uniform_under_the_null():
    """400 data sets without a race effect: P(p <= a) = a up to the permutation grid (about 5 % at 0.05)."""
    perm = permutation_test(simulate(1, 400, per_group=4, true_smd=[0.0, 0.0]), n_perm=200, seed=3)
    low, high = sps.binom.interval(0.998, 400, 0.05)
    for p in (perm.variations.query("variation == 'v0'").p_perm, perm.contexts.p_perm):
        assert low <= (p <= 0.05).sum() <= high
        assert sps.kstest(p, "uniform").pvalue > 0.01
    floor = perm.contexts
    assert (floor.mean_abs_smd - floor.null_mean).mean() == pytest.approx(0.0, abs=0.02)
    assert low <= (floor.mean_abs_smd > floor.null_q95).sum() <= high
    assert ((0 < floor.null_mean) & (floor.null_mean < floor.null_q95)).all()


def test_permutation_pvalue_is_small_for_a_planted_effect():
    perm = permutation_test(simulate(2, 20, per_group=8, true_smd=[1.5, 0.0]), n_perm=500, seed=1)
    by_variation = perm.variations.set_index("variation")
    assert (by_variation.loc["v0", "p_perm"] < 0.01).all()
    assert by_variation.loc["v1", "p_perm"].median() > 0.2
    assert (perm.contexts.p_perm < 0.01).all()
    assert (perm.contexts.mean_abs_smd > perm.contexts.null_q95).all()
    assert perm.variations.p_perm.min() >= 1 / 501


def test_shuffles_stay_within_gender():
    """Race confounded with gender (7 of 8 White names men, 7 of 8 Black names women) and only a gender effect:
    within-gender shuffles keep each group's gender mix, so the large observed SMD is no evidence of race."""
    df = simulate(4, 200, per_group=4, true_smd=[0.0])
    white_woman = df["race"].eq("white") & df["gender"].eq("woman")
    black_man = df["race"].eq("black") & df["gender"].eq("man")
    swap = (white_woman | black_man) & df["name"].str.endswith(("-4", "-5", "-6", "-8", "-9", "-10"))
    df["gender"] = np.where(swap, np.where(df["gender"] == "man", "woman", "man"), df["gender"])
    df["values"] = [v + 3.0 * (g == "man") for v, g in zip(df["values"], df["gender"])]
    perm = permutation_test(df, n_perm=200)
    assert perm.variations.smd.mean() > 0.5
    assert (perm.variations.p_perm <= 0.05).sum() <= sps.binom.ppf(0.999, 200, 0.05)


def test_the_same_shuffle_applies_to_all_variations():
    df = simulate(5, 3, per_group=4, true_smd=[0.3])
    twin = pd.concat([df, df.assign(variation="v1")], ignore_index=True)
    perm = permutation_test(twin, n_perm=300).variations
    assert perm[perm.variation == "v0"].p_perm.tolist() == perm[perm.variation == "v1"].p_perm.tolist()


def test_holm_controls_the_familywise_error_rate():
    """150 studies of 8 null variations each: Holm keeps P(any rejection) at 5 %, unadjusted tests do not."""
    perm = permutation_test(simulate(6, 150, per_group=4, true_smd=np.zeros(8)), n_perm=200, seed=2).variations
    any_raw = perm.groupby("context").p_perm.min() <= 0.05
    any_holm = perm.groupby("context").p_perm.apply(lambda p: (adjust_pvalues(p, "holm") <= 0.05).any())
    assert any_raw.mean() > 0.15  # 23 % measured
    assert any_holm.sum() <= sps.binom.ppf(0.995, 150, 0.05)


def test_significance_table_adjusts_across_all_tests():
    df = simulate(7, 3, per_group=4, true_smd=[1.5, 0.0])
    result = significance_table(df, n_boot=100, n_perm=300, correction="bh", alpha=0.1)
    variations, contexts = result
    assert list(variations.columns) == BIAS_COLUMNS + SIGNIFICANCE_COLUMNS
    assert variations.smd.tolist() == pytest.approx(bias_table(df, n_boot=100).smd.tolist())
    assert variations.p_adjusted.tolist() == pytest.approx(adjust_pvalues(variations.p_perm, "bh").tolist())
    assert (variations.significant == (variations.p_adjusted < 0.1)).all()
    assert (variations.correction == "bh").all()
    assert set(SUMMARY_COLUMNS + SIGNIFICANCE_COLUMNS + ["null_mean", "null_q95", "above_floor"]) == set(
        contexts.columns)
    assert contexts.above_floor.tolist() == pytest.approx((contexts.mean_abs_smd - contexts.null_mean).tolist())
    assert contexts.p_adjusted.tolist() == pytest.approx(adjust_pvalues(contexts.p_perm, "bh").tolist())


# ---------------------------------------------------------------- CIs that cover


def test_linear_terms_are_the_derivatives_in_the_name_counts():
    """The delta-method terms behind the bootstrap-t are d statistic / d (count of name i): check them against
    central differences for the SMD, mean |SMD| and the reduction between two frames with the same names."""
    before = simulate(8, 1, per_group=3, true_smd=[0.6, -0.4, 0.1])
    after = before.assign(values=[v - 0.5 * (r == "white") for v, r in zip(before["values"], before["race"])])
    contexts = [_context_arrays(_prepare(frame, "raw")) for frame in (before, after)]
    white = (contexts[0].race == "white").astype(float)
    n = white.size

    def statistics(counts):
        smds = [_smd_statistic(counts * white, counts * (1 - white), ctx, "mixture")[2] for ctx in contexts]
        biases = [_mean_abs_statistic(smd, "studentized") for smd in smds]
        return smds[0], biases[0], _reduction_statistic(*biases)

    step = 1e-6
    bumped = statistics(np.ones((2 * n, n)) + step * np.vstack([np.eye(n), -np.eye(n)]))
    for exact, moved in zip(statistics(np.ones((1, n))), bumped):
        numeric = (moved.value[:n] - moved.value[n:]) / (2 * step)
        assert exact.linear[0] == pytest.approx(numeric, rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("per_group", [4, 8])
def test_ci_covers_the_true_smd(per_group):
    """400 data sets, 8 or 16 names per race, true SMDs 0, 0.5 and -0.8 (and mean |SMD| 0.65 over the last two).

    Coverage of the 95 % CI measured on exactly these data sets (n_boot 500), SMD 0 / 0.5 / -0.8 and mean |SMD|:
    8 names per race:  percentile 87.8 / 91.3 / 88.5 % and 90.0 %; bootstrap-t (default) 94.3 / 93.8 / 95.3 %
                       and 95.0 % (a bootstrap-t of mean |SMD*| without the estimate's signs: 90.3 %).
    16 names per race: percentile 91.5 / 93.3 / 91.5 % and 92.3 %; bootstrap-t 94.3 / 95.0 / 93.3 % and 95.8 %
                       (without fixed signs: 93.3 %).
    The bootstrap-t intervals are about 15 % (8 names) and 6 % (16 names) wider than the percentile ones.
    """
    truths = [0.0, 0.5, -0.8]
    df = simulate(100 + per_group, 400, per_group, truths)
    table = bias_table(df, n_boot=500, seed=1)
    for k, truth in enumerate(truths):
        assert coverage(table[table.variation == f"v{k}"], truth) >= 0.93
    summary = context_summary(df[df.variation != "v0"], n_boot=500, seed=1)
    assert coverage(summary, np.mean(np.abs(truths[1:]))) >= 0.93


def test_percentile_option_keeps_the_old_intervals():
    """ci_method="percentile" reproduces the previous implementation (numbers recorded from it, same seeds)."""
    df = simulate(9, 1, per_group=3, true_smd=[0.6, -0.2])
    table = bias_table(df, n_boot=200, ci_method="percentile")
    assert table[["ci_low", "ci_high"]].to_numpy().ravel() == pytest.approx(
        [-0.5241149559200293, 1.0707685409244778, -0.323177237313752, 0.5627222467444905], rel=1e-9)
    summary = context_summary(df, n_boot=200, ci_method="percentile")
    assert summary[["ci_low", "ci_high"]].to_numpy().ravel() == pytest.approx(
        [0.04223716435352224, 0.7593959562276331], rel=1e-9)
    before, gap_halved, _ = planted_pair()
    reduction = bias_reduction(before, gap_halved, n_boot=200, ci_method="percentile")
    assert reduction[["reduction_pct", "ci_low", "ci_high"]].to_numpy().ravel() == pytest.approx(
        [50.0, 40.6959670389166, 64.5048357024131], rel=1e-9)


# ---------------------------------------------------------------- where a reduction comes from


def planted_pair(seed=10):
    """A raw-scale frame with a clear bias, the same with the White-Black gap halved (White answers moved
    down by half the gap), and the same with each group's answers spread twice as far about the group mean."""
    before = simulate(seed, 1, per_group=8, true_smd=[1.2, -1.0])
    means = name_moments(before).groupby(["variation", "race"])["mean"]
    group_mean = means.transform("mean").to_numpy()
    by_group = means.mean().unstack()
    gap = (by_group["white"] - by_group["black"]).loc[before["variation"]].to_numpy()
    white = before["race"].eq("white").to_numpy()
    gap_halved = before.assign(values=[v - w * g / 2 for v, w, g in zip(before["values"], white, gap)])
    spread = before.assign(values=[m + 2 * (v - m) for v, m in zip(before["values"], group_mean)])
    return before, gap_halved, spread


def test_reduction_from_a_halved_gap():
    before, gap_halved, _ = planted_pair()
    row = bias_reduction(before, gap_halved, n_boot=300).iloc[0]
    assert row.reduction_pct == pytest.approx(50.0)
    assert row.bias_after == pytest.approx(row.bias_before / 2)
    assert row.gap_after == pytest.approx(row.gap_before / 2)
    assert row.sd_after == pytest.approx(row.sd_before)
    assert row.spread_share == pytest.approx(0.0, abs=1e-9) and not row.mostly_spread
    assert 0 < row.ci_low < 50 < row.ci_high < 100


def test_reduction_from_a_doubled_spread():
    before, _, spread = planted_pair()
    row = bias_reduction(before, spread, n_boot=300).iloc[0]
    assert row.reduction_pct == pytest.approx(50.0)
    assert row.gap_after == pytest.approx(row.gap_before)
    assert row.sd_after == pytest.approx(2 * row.sd_before)
    assert row.spread_share == pytest.approx(1.0) and row.mostly_spread


def test_a_closed_gap_is_all_gap():
    before, gap_halved, _ = planted_pair()
    closed = gap_halved.assign(values=[2 * h - b for h, b in zip(gap_halved["values"], before["values"])])
    row = bias_reduction(before, closed, n_boot=100).iloc[0]
    assert row.reduction_pct == pytest.approx(100.0)
    assert row.gap_after == pytest.approx(0.0, abs=1e-9)
    assert row.spread_share == pytest.approx(0.0, abs=1e-9) and not row.mostly_spread


def test_swapped_before_and_after_is_an_increase():
    before, gap_halved, _ = planted_pair()
    row = bias_reduction(gap_halved, before, n_boot=300).iloc[0]
    assert row.reduction_pct == pytest.approx(-100.0)
    assert row.bias_after == pytest.approx(2 * row.bias_before)
    assert row.gap_before == pytest.approx(row.gap_after / 2)
    assert row.ci_low < -100 < row.ci_high < 0
    assert not row.mostly_spread
