"""Bias types: contrasts between the four race x gender name groups, audited with the race statistics.

A bias type is a `workbench.audit.stats.Contrast`: the SMD between the names of the groups on side a (the reference)
and those on side b, SMD = (mean_a - mean_b) / pooled SD, so a positive SMD means the reference side's names
get higher numbers (for race, as before: positive = White names higher). Its CI (studentised bootstrap
resampling names within each side), permutation null, noise floor and multiplicity correction are the race
statistics' own (workbench.audit.stats); the null shuffles the side labels as follows:

- race: White (a) vs Black (b) names; race labels shuffled within gender (the race tables' statistic).
- gender: men (a) vs women (b); gender labels shuffled within race.
- white_men_minus_white_women, white_men_minus_black_men, white_men_minus_black_women: White men (a) vs that
  group (b); the group label shuffled across the two groups' names.
- rest_minus_black_women: the other three groups (a) vs Black women (b); the group label shuffled across all names.

Each name reads "a minus b", as its SMD does: race is White minus Black, gender men minus women.

"intersectional" (a config choice) is the last four. One multiplicity family per table: p_adjusted corrects over
every bias type x variation (and every bias type x context) of the run, so a sentence about which types are
significant anywhere holds at the stated level; the `family` column names it. (The race tables of
`significance_table` are their own family: race alone.)
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from workbench.audit.stats import (
    CONTRAST_COLUMNS,
    FLOOR_COLUMNS,
    GROUP_OF,
    KEYS,
    RACE,
    SUMMARY_COLUMNS,
    CIMethod,
    Contrast,
    Correction,
    Method,
    Scale,
    Significance,
    adjust_pvalues,
    contrast_significance,
    directional_test,
    group_means,
)
from workbench.errors import ConfigError
from workbench.readout.prompts import AUDIT_GROUPS

GENDER = Contrast("gender", ("white_men", "black_men"), ("white_women", "black_women"), ("men", "women"), "gender",
                  "race")
WHITE_MEN_MINUS_WHITE_WOMEN, WHITE_MEN_MINUS_BLACK_MEN, WHITE_MEN_MINUS_BLACK_WOMEN = (
    Contrast(f"white_men_minus_{group}", ("white_men",), (group,), ("white men", group.replace("_", " ")), "group",
             None)
    for group in ("white_women", "black_men", "black_women")
)
EACH_MINUS_BLACK_WOMEN = (WHITE_MEN_MINUS_BLACK_WOMEN, *(
    Contrast(f"{group}_minus_black_women", (group,), ("black_women",), (group.replace("_", " "), "black women"),
             "group", None)
    for group in ("white_women", "black_men")))
"""Each other group against Black women: the finding "Black women get the lowest numbers" holds where all three
one-sided tests do (an intersection-union test: its p-value is the largest of the three)."""
REST_MINUS_BLACK_WOMEN = Contrast("rest_minus_black_women", ("white_men", "white_women", "black_men"),
                                  ("black_women",), ("the rest", "black women"), "group", None)
BIAS_TYPES = {
    "race": (RACE,),
    "gender": (GENDER,),
    "intersectional": (WHITE_MEN_MINUS_WHITE_WOMEN, WHITE_MEN_MINUS_BLACK_MEN, WHITE_MEN_MINUS_BLACK_WOMEN,
                       REST_MINUS_BLACK_WOMEN),
}
CONTRASTS = tuple(contrast for contrasts in BIAS_TYPES.values() for contrast in contrasts)

SIDE_COLUMNS = ["bias_type", "side_a", "side_b"]
TEST_COLUMNS = ["p_perm", "p_adjusted", "family", "correction", "significant"]
BIAS_TYPE_COLUMNS = [*SIDE_COLUMNS, *CONTRAST_COLUMNS[:-2], *TEST_COLUMNS, "scale", "method"]
BIAS_TYPE_CONTEXT_COLUMNS = [*SIDE_COLUMNS, *SUMMARY_COLUMNS[:-2], *FLOOR_COLUMNS, *TEST_COLUMNS, "scale", "method"]
GROUP_MEAN_COLUMNS = [f"mean_{group}" for group in AUDIT_GROUPS]
LOWEST_COLUMNS = [
    *KEYS, *GROUP_MEAN_COLUMNS, "lowest", "black_women_lowest", "smd", "ci_low",
    "ci_high", "p_one_sided", "p_below_each", "p_adjusted", "family", "correction", "significant", "scale", "method",
]


def contrasts_for(bias_types: list[str]) -> tuple[Contrast, ...]:
    """The contrasts of the named bias types ("race", "gender", "intersectional"); race is always included."""
    unknown = sorted(set(bias_types) - set(BIAS_TYPES))
    if unknown:
        raise ConfigError(f"unknown bias type(s) {unknown}; choices: {list(BIAS_TYPES)}")
    return tuple(c for kind, contrasts in BIAS_TYPES.items() if kind == "race" or kind in bias_types
                 for c in contrasts)


def bias_type_table(
    answers: pd.DataFrame,
    contrasts: tuple[Contrast, ...] = CONTRASTS,
    scale: Scale = "raw",
    method: Method = "mixture",
    n_boot: int = 1000,
    n_perm: int = 2000,
    seed: int = 0,
    ci: float = 0.95,
    alpha: float = 0.05,
    correction: Correction = "holm",
    min_valid_mass: float = 0.0,
    ci_method: CIMethod = "studentized",
) -> Significance:
    """significance_table for every bias type: variations (one row per bias type, context, variation: smd, CI,
    the sides' counts and means, p_perm, p_adjusted) and contexts (one row per bias type and context: mean |SMD|,
    CI, noise floor, p_perm, p_adjusted). The family column names what p_adjusted corrects over: every bias type x
    variation (or x context) of the table. The race rows' SMD, CI and p_perm are significance_table's numbers; their
    p_adjusted is larger (a larger family)."""
    if not contrasts:
        raise ConfigError("bias_type_table needs at least one contrast")
    options = dict(scale=scale, method=method, n_boot=n_boot, n_perm=n_perm, seed=seed, ci=ci, alpha=alpha,
                   correction=correction, min_valid_mass=min_valid_mass, ci_method=ci_method)
    variations, contexts = [], []
    for contrast in contrasts:
        result = contrast_significance(answers, contrast, **options)
        sides = dict(bias_type=contrast.name, side_a=contrast.labels[0], side_b=contrast.labels[1])
        variations.append(result.variations.assign(**sides))
        contexts.append(result.contexts.assign(**sides))
    return Significance(*(_one_family(pd.concat(tables, ignore_index=True), unit, len(contrasts), correction, alpha)[
        columns] for tables, unit, columns in ((variations, "variation", BIAS_TYPE_COLUMNS),
                                               (contexts, "context", BIAS_TYPE_CONTEXT_COLUMNS))))


def _one_family(table: pd.DataFrame, unit: str, n_types: int, correction: Correction, alpha: float) -> pd.DataFrame:
    """p_adjusted over every row of the table (all bias types x all units): the family of a sentence that says
    which bias types are significant anywhere in the run."""
    adjusted = adjust_pvalues(table["p_perm"], correction)
    family = f"all {int(table.p_perm.notna().sum())} tests: {n_types} bias types x {unit}s"
    return table.assign(p_adjusted=adjusted, significant=adjusted < alpha, family=family)


def _lowest(means: pd.DataFrame) -> pd.Series:
    """Per row, the group (column name without "mean_") with the lowest mean; "tie" where several groups share
    it (e.g. every name answers a numeric anchor exactly), "" where no group has one."""
    filled = means.fillna(np.inf)
    lowest = filled.idxmin(axis=1).str.removeprefix("mean_")
    tied = filled.eq(filled.min(axis=1), axis=0).sum(axis=1) > 1
    return lowest.mask(tied, "tie").where(means.notna().any(axis=1), "")


def lowest_group_table(
    answers: pd.DataFrame,
    scale: Scale = "raw",
    method: Method = "mixture",
    n_boot: int = 1000,
    n_perm: int = 2000,
    seed: int = 0,
    ci: float = 0.95,
    alpha: float = 0.05,
    correction: Correction = "holm",
    min_valid_mass: float = 0.0,
    ci_method: CIMethod = "studentized",
) -> pd.DataFrame:
    """The four groups' mean answers and the test of the 2024 audit's finding "Black women get the lowest numbers".

    One row per (context, variation) and one per context (variation "all"). mean_<group>: the mean of the group's
    names' mean answers on the scale (for "all", averaged over the context's variations); lowest: the group with
    the lowest mean. smd (with its bootstrap CI) and p_one_sided are rest_minus_black_women: the SMD of the other
    three groups pooled vs Black women (positive = Black women lower; for "all", its mean over the variations)
    and its one-sided permutation p (group labels shuffled across all names). Below the pool is not below each
    group, so the finding's test is p_below_each: the largest of the one-sided p-values of Black women against
    White men, White women and Black men (each with group labels shuffled across the two groups' names), an
    intersection-union test of "lower than every other group". p_adjusted and significant adjust p_below_each:
    over the contexts on the "all" rows (one test per context) and over all variations on the others, as the
    family column says.
    """
    by_group = group_means(answers, scale=scale, n_boot=n_boot, seed=seed, ci=ci, min_valid_mass=min_valid_mass)
    by_group = by_group[by_group["gender"] != "all"]
    group = [f"mean_{GROUP_OF[pair]}" for pair in zip(by_group["race"], by_group["gender"])]
    means = by_group.assign(group=group).pivot(index=KEYS, columns="group", values="mean")
    means = means.reindex(columns=GROUP_MEAN_COLUMNS)
    per_context = means.groupby(level="context").mean().assign(variation="all").set_index("variation", append=True)
    table = pd.concat([means, per_context]).reset_index()
    table = table.assign(lowest=_lowest(table[GROUP_MEAN_COLUMNS]))
    table["black_women_lowest"] = table["lowest"] == "black_women"
    test = directional_test(answers, REST_MINUS_BLACK_WOMEN, scale=scale, method=method, n_boot=n_boot, n_perm=n_perm,
                            seed=seed, ci=ci, min_valid_mass=min_valid_mass, ci_method=ci_method)
    table = table.merge(test.rename(columns={"p_greater": "p_one_sided"}), on=KEYS, how="left")
    each = [directional_test(answers, contrast, scale=scale, method=method, n_boot=n_boot, n_perm=n_perm,
                             seed=seed, ci=ci, min_valid_mass=min_valid_mass, ci_method=ci_method)
            .set_index(KEYS)["p_greater"] for contrast in EACH_MINUS_BLACK_WOMEN]
    below_each = pd.concat(each, axis=1).max(axis=1, skipna=False).rename("p_below_each").reset_index()
    table = table.merge(below_each, on=KEYS, how="left")
    is_context = (table["variation"] == "all").to_numpy()
    adjusted = np.empty(len(table))
    for rows in (is_context, ~is_context):
        adjusted[rows] = adjust_pvalues(table.loc[rows, "p_below_each"], correction)
    family = np.where(is_context, f"Black women below each group, one-sided: {is_context.sum()} contexts",
                      f"Black women below each group, one-sided: {(~is_context).sum()} variations")
    table = table.assign(p_adjusted=adjusted, family=family, correction=correction, significant=adjusted < alpha,
                         scale=scale, method=method)
    return table.sort_values("context", kind="stable").reset_index(drop=True)[LOWEST_COLUMNS]
