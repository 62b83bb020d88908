"""Bias types with known answers: planted gender, race and Black-women effects are found in their contrasts and
not in the others, signs follow the reference side, the race rows are the race tables', the nulls respect their
strata, the gender SMD's CI covers, and the study writes and reports the tables.

The simulations draw many independent data sets at once, one per context of a single frame.
"""

import dataclasses

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from workbench.audit.bias_types import (
    BIAS_TYPE_COLUMNS,
    BIAS_TYPE_CONTEXT_COLUMNS,
    WHITE_MEN_MINUS_BLACK_MEN,
    REST_MINUS_BLACK_WOMEN,
    WHITE_MEN_MINUS_BLACK_WOMEN,
    CONTRASTS,
    GENDER,
    LOWEST_COLUMNS,
    WHITE_MEN_MINUS_WHITE_WOMEN,
    bias_type_table,
    contrasts_for,
    lowest_group_table,
)
from workbench.audit.stats import (
    RACE,
    RACE_SIDES,
    GroupMoments,
    adjust_pvalues,
    bias_table,
    contrast_table,
    group_means,
    name_moments,
    permutation_test,
    significance_table,
    smd_mixture,
)
from workbench.config import ConfigError, StudyConfig, load_config, to_dict
from workbench.pipeline import study
from workbench.pipeline.runstore import RunDir
from workbench.pipeline.study_report import bias_types_section
from workbench.readout.prompts import AUDIT_GROUPS
from workbench.testing.answer_model import draw_names

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

# A group effect is in POPULATION_SD units (workbench/testing/answer_model.py): between two groups with effects e_a
# and e_b the true mixture SMD is e_a - e_b.
GENDER_EFFECT = {"white_men": 1.0, "black_men": 1.0}  # men higher, no race effect
RACE_EFFECT = {"white_men": 1.0, "white_women": 1.0}  # White names higher, no gender effect
BLACK_WOMEN_EFFECT = {"black_women": -1.5}  # Black women lower, everyone else alike


def simulate(seed, n_sets, per_group, effects, n_variations=1):
    """n_sets independent data sets (contexts s0000, ...) with per_group names per race x gender group and
    n_variations variations; the answers of group g's names are shifted by effects.get(g, 0) population SDs."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(list(AUDIT_GROUPS), per_group)
    values, weights = draw_names(rng, n_sets, groups.size, n_variations,
                                 np.array([effects.get(g, 0.0) for g in groups])[:, None])
    rows = [
        (f"s{s:04d}", f"v{k}", f"{g}-{i}", *AUDIT_GROUPS[g], values[s, i, k], weights[s, i, k])
        for s in range(n_sets) for i, g in enumerate(groups) for k in range(n_variations)
    ]
    return pd.DataFrame(rows, columns=["context", "variation", "name", "race", "gender", "values", "weights"])


def true_smd(contrast, effects):
    """The contrast's mixture SMD: the sides' mean effects over the pooled SD, where a side that mixes groups
    with different effects has the between-group variance on top of the population variance."""
    sides = [np.array([effects.get(g, 0.0) for g in side]) for side in (contrast.a, contrast.b)]
    pooled = np.mean([1 + side.var() for side in sides])
    return (sides[0].mean() - sides[1].mean()) / np.sqrt(pooled)


def test_contrasts_and_their_nulls():
    assert [c.name for c in CONTRASTS] == [
        "race", "gender", "white_men_minus_white_women", "white_men_minus_black_men", "white_men_minus_black_women",
        "rest_minus_black_women"]
    assert (RACE.a, RACE.b, RACE.shuffled, RACE.within) == (("white_men", "white_women"), ("black_men", "black_women"),
                                                            "race", "gender")
    assert (GENDER.a, GENDER.b, GENDER.shuffled, GENDER.within) == (("white_men", "black_men"),
                                                                    ("white_women", "black_women"), "gender", "race")
    for contrast in (WHITE_MEN_MINUS_WHITE_WOMEN, WHITE_MEN_MINUS_BLACK_MEN, WHITE_MEN_MINUS_BLACK_WOMEN):
        assert contrast.a == ("white_men",) and contrast.within is None
    assert REST_MINUS_BLACK_WOMEN.b == ("black_women",) and set(REST_MINUS_BLACK_WOMEN.a) == set(AUDIT_GROUPS) - {
        "black_women"}
    assert contrasts_for(["gender"]) == (RACE, GENDER)  # race always included
    assert contrasts_for(["intersectional", "race", "gender"]) == CONTRASTS
    with pytest.raises(ValueError):
        contrasts_for(["age"])


@pytest.mark.parametrize("method", ["mixture", "pooled_winsorized"])
def test_race_rows_are_the_race_tables(method):
    """The race bias type is significance_table's statistic: the same numbers, exactly."""
    df = simulate(0, 3, per_group=4, effects={"white_men": 0.8, "black_women": -0.5}, n_variations=2)
    df["valid_mass"] = np.where(df["name"].isin(["black_men-9", "white_women-5"]) & (df["variation"] == "v1"), 0.2, 0.9)
    options = dict(scale="log", method=method, n_boot=200, n_perm=300, seed=3, min_valid_mass=0.5)
    race = significance_table(df, **options)
    types = bias_type_table(df, **options)
    variations = types.variations[types.variations.bias_type == "race"].reset_index(drop=True)
    expected = race.variations.rename(columns={v: k for k, v in RACE_SIDES.items()})
    columns = [c for c in expected.columns if c in variations.columns and c not in ("p_adjusted", "significant")]
    assert len(columns) == len(expected.columns) - 4  # all but p_mwu, wasserstein and the family's adjustment
    pd.testing.assert_frame_equal(variations[columns], expected[columns], check_exact=True)
    assert "excluded (valid mass < 0.5): white_women-5, black_men-9" in set(variations.note)
    contexts = types.contexts[types.contexts.bias_type == "race"].reset_index(drop=True)
    same = [c for c in race.contexts.columns if c not in ("p_adjusted", "significant")]
    pd.testing.assert_frame_equal(contexts[same], race.contexts[same], check_exact=True)
    assert (types.variations.family == "all 36 tests: 6 bias types x variations").all()
    assert (types.contexts.family == "all 18 tests: 6 bias types x contexts").all()
    assert list(types.variations.columns) == BIAS_TYPE_COLUMNS
    assert list(types.contexts.columns) == BIAS_TYPE_CONTEXT_COLUMNS
    for table in types:  # one family per table: every bias type's rows together
        assert table.p_adjusted.tolist() == pytest.approx(adjust_pvalues(table.p_perm).tolist())
        assert (table.p_adjusted >= table.groupby("bias_type").p_perm.transform(adjust_pvalues) - 1e-12).all()


def test_contrasts_by_hand():
    """Gender = race with the race and gender columns swapped; Black women vs White men = race on those two
    groups' names; Black women vs the rest = the mixture SMD of the names' moments."""
    df = simulate(1, 2, per_group=4, effects={"white_men": 0.5, "black_men": 0.2, "black_women": -0.4},
                  n_variations=2)
    relabelled = df.assign(race=np.where(df.gender == "man", "white", "black"),
                           gender=np.where(df.race == "white", "man", "woman"))
    gender = contrast_table(df, GENDER, n_boot=10)
    assert gender.smd.to_numpy() == pytest.approx(bias_table(relabelled, n_boot=10).smd.to_numpy(), rel=1e-12)
    pair = df[df.name.str.startswith(("white_men", "black_women"))]
    by_race = bias_table(pair, n_boot=10)
    black_women = contrast_table(df, WHITE_MEN_MINUS_BLACK_WOMEN, n_boot=10)
    assert black_women.smd.to_numpy() == pytest.approx(by_race.smd.to_numpy(), rel=1e-12)
    assert black_women.mean_a.to_numpy() == pytest.approx(by_race.mean_white.to_numpy(), rel=1e-12)
    assert (black_women.n_a.tolist(), black_women.n_b.tolist()) == ([4] * 4, [4] * 4)
    moments = name_moments(df).query("context == 's0000' and variation == 'v1'")
    rest = moments[~moments.name.str.startswith("black_women")]
    bw = moments[moments.name.str.startswith("black_women")]
    by_hand = smd_mixture(GroupMoments.from_names(rest["mean"], rest["var"]),
                          GroupMoments.from_names(bw["mean"], bw["var"]))[0, 0]
    row = contrast_table(df, REST_MINUS_BLACK_WOMEN, n_boot=10).set_index(["context", "variation"]).loc[("s0000", "v1")]
    assert row.smd == pytest.approx(by_hand, rel=1e-12)
    assert (row.n_a, row.n_b, row.mean_b) == (12, 4, pytest.approx(bw["mean"].mean()))


EXPECTED = {  # planted effect -> (contrasts that must be significant, contrasts with no true effect)
    "gender": (GENDER_EFFECT, ["gender"], ["race", "white_men_minus_black_men"]),
    "race": (RACE_EFFECT, ["race"], ["gender", "white_men_minus_white_women"]),
    "black women": (BLACK_WOMEN_EFFECT, ["rest_minus_black_women", "white_men_minus_black_women"],
                    ["white_men_minus_white_women", "white_men_minus_black_men"]),
}


@pytest.mark.parametrize("planted", list(EXPECTED))
def test_a_planted_effect_is_significant_in_its_contrasts_only(planted):
    """One study at the default design (8 names per group, 3 variations; true SMD 1 in the gender or race
    contrast, 16 names a side, and 1.5 in the Black-women contrasts, whose smaller side has 8): after Holm over
    every bias type x variation (and over every bias type x context), the planted contrasts are significant in
    their context and in at least 2 of their 3 variations, the contrasts without an effect nowhere, and the SMDs of
    contrasts with a true effect have its sign. (A study can still show a false positive: the family controls
    its error rate at 5 %; seed 20 is one without.)"""
    effects, significant, null = EXPECTED[planted]
    df = simulate(20, 1, per_group=8, effects=effects, n_variations=3)
    variations, contexts = bias_type_table(df, n_boot=300, n_perm=1000, seed=1)
    for name in significant:  # Holm over all 18 variation tests: each planted type in 2 of its 3 variations
        assert variations[variations.bias_type == name].significant.sum() >= 2, name
        assert contexts[contexts.bias_type == name].significant.all(), name
    for name in null:
        assert not variations[variations.bias_type == name].significant.any(), name
        assert not contexts[contexts.bias_type == name].significant.any(), name
    truth = variations.bias_type.map({c.name: true_smd(c, effects) for c in CONTRASTS})
    planted_rows = truth.abs() > 0.3
    assert (np.sign(variations.smd[planted_rows]) == np.sign(truth[planted_rows])).all()


@pytest.mark.parametrize("planted", list(EXPECTED))
def test_rejection_rates_over_many_studies(planted):
    """200 data sets of one variation at the default design: the planted contrasts reject (p_perm <= 0.05)
    almost always, the contrasts without an effect at their 5 % level (within a 99.9 % binomial bound)."""
    effects, significant, null = EXPECTED[planted]
    df = simulate(30, 200, per_group=8, effects=effects)
    contrasts = {c.name: c for c in CONTRASTS}
    for name in significant + null:
        rejected = (permutation_test(df, n_perm=200, seed=2, contrast=contrasts[name]).variations.p_perm <= 0.05).sum()
        if name in significant:
            assert rejected >= 190, name
        else:
            assert rejected <= sps.binom.ppf(0.999, 200, 0.05), name


def test_signs_follow_the_reference_side():
    """Men higher: the gender SMD (men - women) and its CI are positive, and swapping the sides negates it; Black
    women lower: rest_minus_black_women and white_men_minus_black_women are positive (the reference is higher)."""
    df = simulate(3, 1, per_group=8, effects={"white_men": 1.0, "black_men": 1.0, "black_women": -1.0},
                  n_variations=2)
    table = bias_type_table(df, n_boot=300, n_perm=500).variations.set_index(["bias_type", "variation"])
    for name in ("gender", "rest_minus_black_women", "white_men_minus_black_women"):
        rows = table.loc[name]
        assert (rows.smd > 0).all() and (rows.mean_a > rows.mean_b).all(), name
    assert (table.loc["gender"].ci_low > 0).all()
    assert (table.loc["gender", ["side_a", "side_b"]] == ["men", "women"]).all().all()
    swapped = dataclasses.replace(GENDER, a=GENDER.b, b=GENDER.a)
    flipped = contrast_table(df, swapped, n_boot=300)
    assert flipped.smd.to_numpy() == pytest.approx(-table.loc["gender"].smd.to_numpy(), rel=1e-12)
    assert (flipped.ci_high < 0).all()
    assert flipped.mean_a.to_numpy() == pytest.approx(table.loc["gender"].mean_b.to_numpy())


def test_gender_null_shuffles_within_race():
    """Gender confounded with race (6 of 8 White names men, 6 of 8 Black names women) and only a race effect:
    gender labels shuffled within race keep each side's race mix, so the large observed gender SMD is no
    evidence of a gender effect."""
    df = simulate(4, 200, per_group=4, effects=RACE_EFFECT)
    swap = df["name"].isin(["white_women-4", "white_women-5", "black_men-8", "black_men-9"])
    df["gender"] = np.where(swap, np.where(df["gender"] == "man", "woman", "man"), df["gender"])
    perm = permutation_test(df, n_perm=200, contrast=GENDER)
    assert perm.variations.smd.mean() > 0.3
    assert (perm.variations.p_perm <= 0.05).sum() <= sps.binom.ppf(0.999, 200, 0.05)


def test_gender_ci_covers_the_true_smd():
    """200 data sets at the default design (8 names per group: 16 men, 16 women), true gender SMDs 0.5 and 0.
    Coverage of the 95 % studentised bootstrap CI measured on exactly these data sets (n_boot 500): 98.0 % and
    95.0 % (percentile bootstrap: 96.0 % and 92.0 %); on 400 other data sets 95.0 % and 95.5 %."""
    df = simulate(40, 200, per_group=8, effects={"white_men": 0.5, "black_men": 0.5})
    null = simulate(41, 200, per_group=8, effects={})
    for frame, truth in ((df, 0.5), (null, 0.0)):
        table = contrast_table(frame, GENDER, n_boot=500, seed=1)
        coverage = ((table.ci_low <= truth) & (truth <= table.ci_high)).mean()
        assert coverage >= 0.93


def test_lowest_group_and_the_finding():
    """Black women lower in every context: they are the lowest group, and the one-sided test of the 2024 audit's
    finding is significant after Holm over the contexts; Black women higher: the one-sided test is not."""
    lower = simulate(5, 3, per_group=8, effects=BLACK_WOMEN_EFFECT, n_variations=2)
    table = lowest_group_table(lower, n_boot=300, n_perm=500)
    assert list(table.columns) == LOWEST_COLUMNS
    assert table.variation.tolist() == ["v0", "v1", "all"] * 3
    per_context = table[table.variation == "all"]
    assert (per_context.lowest == "black_women").all() and per_context.black_women_lowest.all()
    assert per_context.significant.all() and (per_context.smd > 0).all()
    assert per_context.p_adjusted.tolist() == pytest.approx(adjust_pvalues(per_context.p_below_each).tolist())
    assert (per_context.p_below_each >= per_context.p_one_sided).all()  # below each is harder than below the pool
    assert (per_context.family == "Black women below each group, one-sided: 3 contexts").all()
    groups = group_means(lower, n_boot=10).query("gender != 'all'").set_index(["context", "variation", "race",
                                                                                  "gender"])["mean"]
    first = table.iloc[0]
    assert first.mean_black_women == pytest.approx(groups[("s0000", "v0", "black", "woman")])
    assert per_context.iloc[0].mean_white_men == pytest.approx(
        np.mean([groups[("s0000", v, "white", "man")] for v in ("v0", "v1")]))
    variations = bias_type_table(lower, [REST_MINUS_BLACK_WOMEN], n_boot=300, n_perm=500).variations
    by_variation = table[table.variation != "all"].reset_index(drop=True)
    assert by_variation[["smd", "ci_low", "ci_high"]].to_numpy() == pytest.approx(
        variations[["smd", "ci_low", "ci_high"]].to_numpy())  # the contrast's numbers at the same seed
    assert (by_variation.p_one_sided <= variations.p_perm).all()  # one-sided, in the observed direction

    higher = simulate(5, 3, per_group=8, effects={"black_women": 1.0}, n_variations=2)
    per_context = lowest_group_table(higher, n_boot=300, n_perm=500).query("variation == 'all'")
    assert (per_context.p_one_sided > 0.9).all() and not per_context.significant.any()
    assert not per_context.black_women_lowest.any()


def test_below_the_pool_is_not_below_each_group():
    """Black men lowest and Black women nearly as low (1.5 and 1.2 SD below the White groups): below the pool
    of the other three (p_one_sided small) but not below Black men, so the finding's test (p_below_each, the
    largest of the three pairwise one-sided p-values) is not significant; it would be if the pool were tested."""
    frame = simulate(5, 3, per_group=16, effects={"black_men": -1.5, "black_women": -1.2}, n_variations=3)
    per_context = lowest_group_table(frame, n_boot=300, n_perm=500).query("variation == 'all'")
    assert (per_context.lowest == "black_men").all() and not per_context.black_women_lowest.any()
    assert (adjust_pvalues(per_context.p_one_sided) < 0.05).all()
    assert (per_context.p_below_each > 0.2).all() and not per_context.significant.any()


def test_config_bias_types(tmp_path):
    assert StudyConfig().audit.bias_types == ["race", "gender", "intersectional"]
    path = tmp_path / "study.toml"
    path.write_text('[audit]\nbias_types = ["gender"]\n')
    assert contrasts_for(load_config(path).audit.bias_types) == (RACE, GENDER)
    path.write_text('[audit]\nbias_types = ["age"]\n')
    with pytest.raises(ConfigError, match="bias_types"):
        load_config(path)


def test_study_writes_and_reports_the_bias_type_tables(tmp_path):
    answers = simulate(6, 2, per_group=3, effects=BLACK_WOMEN_EFFECT, n_variations=2).assign(valid_mass=0.9)
    config = StudyConfig(seed=5)
    config.audit = dataclasses.replace(config.audit, n_boot=50, n_perm=100, bias_types=["race", "gender"])
    run = RunDir(tmp_path / "run")
    study.write_bias_tables(run, config, answers)
    run.write_table("tables/answers.parquet", answers)
    types = run.read_table("tables/bias_types.parquet")
    assert list(types.bias_type.unique()) == ["race", "gender"]
    assert len(run.read_table("tables/bias_type_contexts.parquet")) == 4
    assert len(run.read_table("tables/lowest_group.parquet")) == 6
    race = run.read_table("tables/significance.parquet")
    assert types[types.bias_type == "race"].smd.tolist() == race.smd.tolist()
    figures = {}
    section = bias_types_section(run, to_dict(config), figures, {"purchase": "$"})
    assert section["heading"] == "Bias types" and set(figures) == {"bias_types_forest", "four_group_means"}
    forest = " ".join(str(label) for trace in figures["bias_types_forest"].data for label in (trace.y or []))
    assert "white minus black" in forest and "men minus women" in forest  # contrasts read a minus b
    texts = " ".join(table[2] for table in section["tables"])
    power = next(table[1] for table in section["tables"] if table[0].startswith("Power of each bias type"))
    assert set(power.bias_type) == {"race", "gender"} and (power.n_tests == 4).all()
    for text in ("Estimand", "positive = the reference side_a", "gender labels shuffled within race (gender)",
                 "Holm", "p_one_sided", "p_below_each", "Black women lower"):
        assert text in texts, text


def test_lowest_is_a_tie_when_groups_share_the_lowest_mean():
    """With a numeric anchor every name can give the same answer: no group is lowest."""
    from workbench.audit.bias_types import _lowest

    means = pd.DataFrame({"mean_white_men": [1.0, 2.0, np.nan], "mean_white_women": [1.0, 3.0, np.nan],
                          "mean_black_men": [1.0, 1.5, np.nan], "mean_black_women": [1.0, 4.0, np.nan]})
    assert list(_lowest(means)) == ["tie", "black_men", ""]
