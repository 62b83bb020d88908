
import numpy as np
import pandas as pd
import pytest

from workbench.audit.stats import (
    BIAS_COLUMNS,
    GROUP_COLUMNS,
    SUMMARY_COLUMNS,
    GroupMoments,
    bias_table,
    context_summary,
    group_means,
    name_moments,
    smd_mixture,
)

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")


def row(name, race, values, weights=None, variation="v", context="c", gender="man"):
    values = np.asarray(values, dtype=float)
    if weights is None:
        weights = np.full(values.size, 1 / max(values.size, 1))
    weights = np.asarray(weights, dtype=float)
    return dict(context=context, variation=variation, name=name, race=race, gender=gender, values=values,
                weights=weights)


def sampled_frame(rng, n_names, shift, n_samples=50, variations=("v",), spread=1.0, name_sd=1.0):
    """Names with normal samples; White names' means are shifted by `shift`."""
    rows = []
    for race, offset in (("white", shift), ("black", 0.0)):
        for i in range(n_names):
            centre = offset + rng.normal(0, name_sd)
            for variation in variations:
                gender = "man" if i % 2 else "woman"
                rows.append(row(f"{race}{i}", race, rng.normal(centre, spread, n_samples), variation=variation,
                                gender=gender))
    return pd.DataFrame(rows)


def pooled_smd(white, black, ddof):
    return (white.mean() - black.mean()) / np.sqrt((white.var(ddof=ddof) + black.var(ddof=ddof)) / 2)


def test_mixture_equals_pooled_sample_smd_on_explicit_samples():
    df = sampled_frame(np.random.default_rng(0), n_names=6, shift=0.7, n_samples=2000)
    white = np.concatenate(df.loc[df.race == "white", "values"].to_list())
    black = np.concatenate(df.loc[df.race == "black", "values"].to_list())
    smd = bias_table(df, n_boot=10).smd.iloc[0]
    assert smd == pytest.approx(pooled_smd(white, black, ddof=0), rel=1e-9)
    assert smd == pytest.approx(pooled_smd(white, black, ddof=1), rel=1e-3)


def test_exact_distributions_match_many_samples():
    rng = np.random.default_rng(1)
    rows, samples = [], {"white": [], "black": []}
    for race, offset in (("white", 1.0), ("black", 0.0)):
        for i in range(5):
            support = offset + rng.normal(0, 2, 6)
            probs = rng.dirichlet(np.ones(6)) * 0.8  # valid mass below 1: normalised per row
            rows.append(row(f"{race}{i}", race, support, probs))
            samples[race].append(rng.choice(support, 40_000, p=probs / probs.sum()))
    exact = bias_table(pd.DataFrame(rows), n_boot=10).smd.iloc[0]
    sampled = pooled_smd(np.concatenate(samples["white"]), np.concatenate(samples["black"]), ddof=1)
    assert exact == pytest.approx(sampled, abs=0.02)


def test_names_means_only_would_inflate_smd():
    df = sampled_frame(np.random.default_rng(2), n_names=10, shift=1.0, spread=3.0)
    moments = name_moments(df)
    white, black = (moments.loc[moments.race == race, "mean"].to_numpy() for race in ("white", "black"))
    means_only = pooled_smd(white, black, ddof=0)
    mixture = bias_table(df, n_boot=10).smd.iloc[0]
    assert abs(mixture) < 0.5 * abs(means_only)
    by_hand = smd_mixture(
        GroupMoments.from_names(white, moments.loc[moments.race == "white", "var"]),
        GroupMoments.from_names(black, moments.loc[moments.race == "black", "var"]),
    )
    assert by_hand[0, 0] == pytest.approx(mixture)


def test_sign_and_affine_invariance():
    df = sampled_frame(np.random.default_rng(3), n_names=8, shift=0.5)
    smd = bias_table(df, n_boot=10).smd.iloc[0]
    assert smd > 0
    swapped = df.assign(race=df.race.map({"white": "black", "black": "white"}))
    assert bias_table(swapped, n_boot=10).smd.iloc[0] == pytest.approx(-smd)
    scaled = df.assign(values=[3 * v + 1000 for v in df["values"]])
    assert bias_table(scaled, n_boot=10).smd.iloc[0] == pytest.approx(smd)


def test_unnormalised_weights_and_moments():
    df = pd.DataFrame([row("a", "white", [1.0, 3.0], [0.1, 0.3])])
    moments = name_moments(df).iloc[0]
    assert moments["mean"] == pytest.approx(2.5)
    assert moments["var"] == pytest.approx(0.25 * 2.25 + 0.75 * 0.25)


def test_ci_contains_point_and_narrows_with_more_names():
    widths = []
    for n_names in (8, 64):
        table = bias_table(sampled_frame(np.random.default_rng(4), n_names=n_names, shift=0.5), seed=1)
        first = table.iloc[0]
        assert first.ci_low <= first.smd <= first.ci_high
        widths.append(first.ci_high - first.ci_low)
    assert widths[1] < 0.6 * widths[0]


def test_planted_difference_is_detected():
    table = bias_table(sampled_frame(np.random.default_rng(5), n_names=16, shift=1.5))
    assert table.ci_low.iloc[0] > 0
    assert table.p_mwu.iloc[0] < 0.01


def test_null_case_mostly_includes_zero():
    covered = [
        (lambda t: t.ci_low.iloc[0] <= 0 <= t.ci_high.iloc[0])(
            bias_table(sampled_frame(np.random.default_rng(100 + i), n_names=16, shift=0.0), n_boot=300)
        )
        for i in range(20)
    ]
    assert sum(covered) >= 16


def test_same_name_resample_for_all_variations_of_a_context():
    df = sampled_frame(np.random.default_rng(6), n_names=10, shift=0.3)
    twin = pd.concat([df, df.assign(variation="w")], ignore_index=True)
    table = bias_table(twin, n_boot=200)
    assert table.ci_low.iloc[0] == table.ci_low.iloc[1]
    assert table.ci_high.iloc[0] == table.ci_high.iloc[1]


def test_zero_variance_gives_note_not_exception():
    df = pd.DataFrame([row(f"w{i}", "white", [5.0]) for i in range(3)] + [row(f"b{i}", "black", [5.0])
                                                                           for i in range(3)])
    for method in ("mixture", "pooled_winsorized"):
        first = bias_table(df, method=method, n_boot=50).iloc[0]
        assert np.isnan(first.smd) and first.note == "zero variance"


def test_no_valid_answers_for_black_and_nonfinite_values():
    rows = [row(f"w{i}", "white", [1.0, 2.0, np.nan]) for i in range(3)]
    rows += [row("b0", "black", []), row("b1", "black", [np.nan, np.inf])]
    first = bias_table(pd.DataFrame(rows), n_boot=50).iloc[0]
    assert np.isnan(first.smd) and first.note == "no valid answers for black"
    assert (first.n_white, first.n_black, first.n_invalid, first.n_nonfinite) == (3, 0, 2, 5)
    assert np.isnan(first.p_mwu) and np.isnan(first.mean_black)
    assert first.mean_white == pytest.approx(1.5)


def test_empty_rows_are_counted_and_excluded():
    df = sampled_frame(np.random.default_rng(7), n_names=5, shift=1.0)
    with_empty = pd.concat([df, pd.DataFrame([row("extra", "white", [])])], ignore_index=True)
    plain, counted = bias_table(df, n_boot=10).iloc[0], bias_table(with_empty, n_boot=10).iloc[0]
    assert counted.n_invalid == 1 and plain.n_invalid == 0
    assert counted.smd == pytest.approx(plain.smd)
    assert counted.n_white == 5


def test_log_scale_changes_the_answer_on_heavy_tails():
    rng = np.random.default_rng(8)
    rows = [row(f"w{i}", "white", rng.lognormal(5.3, 0.3, 100)) for i in range(8)]
    rows += [row(f"b{i}", "black", rng.lognormal(5.0, 0.3, 100)) for i in range(7)]
    rows += [row("b7", "black", [1e6, *rng.lognormal(5.0, 0.3, 99)])]
    raw, log = (bias_table(pd.DataFrame(rows), scale=s, n_boot=10).iloc[0] for s in ("raw", "log"))
    assert raw.smd < 0.3 and log.smd > 0.6
    assert (raw.scale, log.scale) == ("raw", "log")


def test_pooled_winsorized_by_hand():
    rng = np.random.default_rng(9)
    df = sampled_frame(rng, n_names=4, shift=0.8, n_samples=40)
    df.loc[0, "values"][0] = 1e4  # an outlier that winsorising must tame
    pooled = np.concatenate(df["values"].to_list())
    low, high = np.quantile(pooled, [0.05, 0.95], method="inverted_cdf")
    white, black = (np.clip(np.concatenate(df.loc[df.race == r, "values"].to_list()), low, high)
                    for r in ("white", "black"))
    pooled_sd = np.sqrt((3 * white.var() + 3 * black.var()) / 6)
    first = bias_table(df, method="pooled_winsorized", n_boot=10).iloc[0]
    assert first.smd == pytest.approx((white.mean() - black.mean()) / pooled_sd)
    assert first.method == "pooled_winsorized"


def test_pooled_needs_more_than_two_names():
    df = pd.DataFrame([row("w", "white", [1.0, 2.0]), row("b", "black", [0.0, 1.0])])
    first = bias_table(df, method="pooled_winsorized", n_boot=10).iloc[0]
    assert np.isnan(first.smd) and first.note == "too few names for pooled SD"


def test_context_summary_matches_bias_table():
    rng = np.random.default_rng(10)
    df = pd.concat([
        sampled_frame(rng, n_names=8, shift=0.5, variations=("a", "b", "c")),
        sampled_frame(rng, n_names=8, shift=-0.5, variations=("d", "e")).assign(context="d"),
    ], ignore_index=True)
    table, summary = bias_table(df, n_boot=200), context_summary(df, n_boot=200)
    assert list(summary.columns) == SUMMARY_COLUMNS
    assert list(table.columns) == BIAS_COLUMNS
    expected = table.assign(abs_smd=table.smd.abs()).groupby("context").abs_smd.mean()
    assert summary.set_index("context").mean_abs_smd.to_dict() == pytest.approx(expected.to_dict())
    assert (summary.ci_low <= summary.mean_abs_smd).all() and (summary.mean_abs_smd <= summary.ci_high).all()
    assert summary.n_variations.tolist() == [3, 2]


def test_group_means():
    rows = [row(f"w{i}", "white", [10.0 * i], gender=g) for i, g in enumerate(["man", "man", "woman"])]
    rows += [row("b0", "black", [1.0]), row("b1", "black", [])]
    table = group_means(pd.DataFrame(rows), n_boot=100).set_index(["race", "gender"])
    assert list(table.reset_index()[GROUP_COLUMNS[:4]].columns) == GROUP_COLUMNS[:4]
    assert table.loc[("white", "all"), "mean"] == pytest.approx(10.0)
    assert table.loc[("white", "man"), "mean"] == pytest.approx(5.0)
    assert table.loc[("black", "man"), ["n_names", "n_invalid"]].tolist() == [1, 1]
    assert table.loc[("white", "all"), "ci_low"] <= 10.0 <= table.loc[("white", "all"), "ci_high"]


def test_invalid_input_raises():
    with pytest.raises(ValueError):
        bias_table(pd.DataFrame([row("x", "asian", [1.0])]))
    with pytest.raises(ValueError):
        bias_table(pd.DataFrame([row("x", "white", [1.0])]), scale="sqrt")
    with pytest.raises(ValueError):
        bias_table(pd.DataFrame([row("x", "white", [1.0])]), ci_method="bca")
