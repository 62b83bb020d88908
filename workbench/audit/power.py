"""Power of the study's tests, from an audit: what a design can detect, and how to spend a compute budget on it.

Variance components (`variance_components`, per context and variation, on the study's scale): a name's expected
answer m_i (the mean of its answer distribution) varies between the names of one race x gender group with variance
between_var (pooled within the four groups, which the null's shuffles within gender keep apart); the mixture SD of
the SMD's denominator is sd. In SMD units a name is z_i = m_i / sd, and the race difference of the z's over n names
per group (2n per race) has sampling variance between_var / sd^2 * (1/(2n) + 1/(2n)) = between_var / (sd^2 n). The
read-out's Monte Carlo noise is part of between_var (each name is read out once).

Tests (`context_power`), the SMD estimates of a context's K variations approximated as normal with the covariance
of the z's across variations (the same names answer every variation):
- per variation, two-sided at alpha / n_variation_tests (Holm's first step, so at least this power): the minimum
  detectable SMD (MDE) at the given power is (z_{1 - alpha'/2} + z_{power}) * SE;
- per context, the study's test of mean |SMD| over the variations at alpha / n_context_tests: its null is mean |X|
  with X ~ N(0, Sigma), its power at a bias d (every variation shifted by d SMD in one direction) is
  P(mean |N(d, Sigma)| > null quantile), computed by Monte Carlo and solved for the MDE by bisection (common
  random numbers, so the power is monotone in d); the held-out signed bias is tested as its mean.
The MDE matches the permutation test's simulated power on the shipped answer model (tests/audit/test_power.py).

A bias type (`contrast_power`) is sized the same way: its two sides stand for the two races (the between-name
variance still pooled within the four race x gender groups), and the SE of a difference between sides of k_a and
k_b groups of n names is that of the race test at n / (1/k_a + 1/k_b) names per group. An approximation: its
permutation null shuffles other labels than the race test's, and only the race test is checked by simulation.

A reduction (`minimum_detectable_reduction`) is a difference of signed SMDs with a bootstrap interval: the
smallest removed bias its test detects is (z_{1 - alpha/2} + z_{power}) * SE, with SE from the interval.

Allocation (`allocation`): per read-out setting, its seconds per prompt and Monte Carlo variance (measured by
reading out a few prompts again, `workbench.pipeline.power.readout_noise`); the names per group a budget buys, and
the SE per variation that results: SE^2 = (true between-name variance + Monte Carlo variance) / (sd^2 n).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from jaxtyping import Float
from scipy import stats as sps

from workbench.audit.stats import GROUP_OF, Contrast, Method, Scale, _prepare

POWER = 0.8
MC_DRAWS = 100_000
MAX_MDE = 64.0
"""A bias the mean |SMD| test does not detect with the given power below this many SDs is reported as undetectable."""
COMPONENT_COLUMNS = ["context", "variation", "n_names", "per_group", "sd", "between_var", "within_var",
                     "se_smd"]
CONTEXT_POWER_COLUMNS = ["context", "n_variations", "per_group", "alpha", "n_tests", "se_mean_smd",
                         "mde_variation", "mde_mean_abs", "mde_signed", "power_at_0.2", "power_at_0.4"]


def _z_table(answers: pd.DataFrame, scale: Scale, method: Method, min_valid_mass: float) -> pd.DataFrame:
    """One row per (context, variation, name) of the valid rows: race, gender, m (expected answer), var, group (the
    race x gender group, or the answers' own `stratum` column where they have one)."""
    rows = _prepare(answers, scale, method, min_valid_mass)
    rows = rows[rows.valid]
    group = rows.stratum if "stratum" in rows else rows.race + "_" + rows.gender  # stratum: `contrast_power`'s
    return rows[["context", "variation", "name", "race", "gender", "mean", "var"]].assign(group=group)


def _pooled_within_group(values: pd.DataFrame, groups: pd.Series) -> np.ndarray:
    """The covariance matrix of the columns of `values` (names x variations) pooled within the groups."""
    centred = values - values.groupby(groups.values).transform("mean")
    df = len(values) - groups.nunique()
    if df < 1:
        raise ValueError("the power analysis needs at least 2 names in some race x gender group")
    return (centred.T @ centred).to_numpy() / df


def variance_components(answers: pd.DataFrame, scale: Scale = "log", method: Method = "mixture",
                        min_valid_mass: float = 0.0) -> pd.DataFrame:
    """Per (context, variation): the names, the mixture SD (the mixture SMD's denominator), between_var (of the
    names' expected answers within race x gender groups), within_var (mean variance of a name's own answers) and
    the SE of its SMD at the audit's names."""
    z = _z_table(answers, scale, method, min_valid_mass)
    records = []
    for (context, variation), rows in z.groupby(["context", "variation"], sort=False):
        between = float(_pooled_within_group(rows[["mean"]], rows.group)[0, 0])
        by_race = rows.groupby("race")
        variances = by_race["var"].mean() + by_race["mean"].var(ddof=0)
        sd = float(np.sqrt(variances.mean()))
        n = by_race.size()
        records.append({"context": context, "variation": variation, "n_names": len(rows),
                        "per_group": len(rows) / 4, "sd": sd, "between_var": between,
                        "within_var": float(rows["var"].mean()),
                        "se_smd": (np.sqrt(between * (1 / n.get("white", np.nan) + 1 / n.get("black", np.nan))) / sd
                                   if sd > 0 else np.nan)})
    return pd.DataFrame(records, columns=COMPONENT_COLUMNS)


def smd_covariance(answers: pd.DataFrame, context: str, per_group: float, scale: Scale = "log",
                   method: Method = "mixture", min_valid_mass: float = 0.0) -> tuple[list[str], np.ndarray]:
    """A context's variations and the covariance of their SMD estimates at per_group names per group (names with
    every variation valid; a variation whose answers have no spread, SD 0, has no SMD and is left out, as the
    audit leaves it out of the context's mean |SMD|)."""
    z = _z_table(answers[answers.context == context], scale, method, min_valid_mass)
    sd = variance_components(answers[answers.context == context], scale, method, min_valid_mass).set_index(
        "variation").sd
    sd = sd[sd > 0]
    wide = z[z.variation.isin(sd.index)].pivot_table(index=["name", "group"], columns="variation", values="mean",
                                                     sort=False).dropna()
    variations = list(wide.columns)
    scaled = wide / sd[variations].to_numpy()
    groups = pd.Series(wide.index.get_level_values("group"))
    return variations, _pooled_within_group(scaled.reset_index(drop=True), groups) / per_group


def mean_abs_mde(covariance: Float[np.ndarray, "k k"], per_group: float, alpha: float, power: float = POWER,
                 seed: int = 0) -> tuple[float, callable]:
    """The bias d (every variation shifted by d) that the permutation test of mean |SMD| at level alpha detects
    with the given power, and the power function d -> power. The estimates are N(d, covariance); the shuffled
    labels mix the races, so the null's covariance is the covariance plus (d^2 / 4) / per_group in every entry
    (the variance a race difference of d adds to the names' pooled spread)."""
    k = covariance.shape[0]
    rng = np.random.default_rng(seed)
    draws = rng.multivariate_normal(np.zeros(k), covariance, size=MC_DRAWS, method="eigh")
    null_draws = rng.multivariate_normal(np.zeros(k), covariance, size=MC_DRAWS, method="eigh")
    common = rng.standard_normal((MC_DRAWS, 1))

    def power_at(d: float) -> float:
        null = np.abs(null_draws + common * d / 2 / np.sqrt(per_group)).mean(axis=1)
        return float((np.abs(draws + d).mean(axis=1) > np.quantile(null, 1 - alpha)).mean())

    low, high = 0.0, 1.0
    while power_at(high) < power:
        high *= 2
        if high > MAX_MDE:  # with very few names the null's spread grows with d as fast as the bias: never detected
            return float("inf"), power_at
    for _ in range(30):
        middle = (low + high) / 2
        low, high = (middle, high) if power_at(middle) < power else (low, middle)
    return high, power_at


def normal_mde(se: float, alpha: float, power: float = POWER) -> float:
    """The two-sided z test's minimum detectable effect at level alpha and the given power."""
    return float((sps.norm.ppf(1 - alpha / 2) + sps.norm.ppf(power)) * se)


def context_power(answers: pd.DataFrame, per_group: float | None = None, alpha: float = 0.05,
                  n_context_tests: int | None = None, n_variation_tests: int | None = None, power: float = POWER,
                  scale: Scale = "log", method: Method = "mixture", min_valid_mass: float = 0.0) -> pd.DataFrame:
    """Per context: the SE of its mean SMD, the MDE of one variation's test, of the mean |SMD| test and of the
    signed-bias test at per_group names per group (None: the audit's), each at alpha over the number of tests
    (default: the audit's contexts, and its variations), and the mean |SMD| test's power at a bias of 0.2 and 0.4
    SMD."""
    components = variance_components(answers, scale, method, min_valid_mass)
    n_context_tests = n_context_tests or components.context.nunique()
    n_variation_tests = n_variation_tests or int(components.se_smd.notna().sum())  # SD 0: no SMD, no test
    records = []
    for context, rows in components.groupby("context", sort=False):
        n = per_group or float(rows.per_group.min())
        variations, covariance = smd_covariance(answers, context, n, scale, method, min_valid_mass)
        if not variations:
            continue
        level = alpha / n_context_tests
        mde, power_at = mean_abs_mde(covariance, n, level, power)
        se_mean = float(np.sqrt(covariance.mean()))
        records.append({
            "context": context, "n_variations": len(variations), "per_group": n, "alpha": alpha,
            "n_tests": n_context_tests, "se_mean_smd": se_mean,
            "mde_variation": normal_mde(float(np.sqrt(np.diag(covariance).max())), alpha / n_variation_tests, power),
            "mde_mean_abs": mde, "mde_signed": normal_mde(se_mean, level, power),
            "power_at_0.2": power_at(0.2), "power_at_0.4": power_at(0.4),
        })
    return pd.DataFrame(records, columns=CONTEXT_POWER_COLUMNS)


def contrast_power(answers: pd.DataFrame, contrast: Contrast, alpha: float = 0.05, n_context_tests: int | None = None,
                   scale: Scale = "log", method: Method = "mixture", min_valid_mass: float = 0.0) -> pd.DataFrame:
    """`context_power` of a bias type at the audit's names (see the module): the contrast's sides relabelled as
    the two races, each name keeping its own race x gender group for the between-name variance."""
    groups = pd.Series([GROUP_OF[pair] for pair in zip(answers.race, answers.gender)], index=answers.index)
    part = answers.assign(group=groups)[groups.isin(contrast.a + contrast.b)]
    sides = part.assign(race=np.where(part.group.isin(contrast.a), "white", "black"), stratum=part.group)
    per_group = float(part.groupby("group").name.nunique().min())
    effective = per_group / (1 / len(contrast.a) + 1 / len(contrast.b))
    table = context_power(sides, per_group=effective, alpha=alpha, n_context_tests=n_context_tests, scale=scale,
                          method=method, min_valid_mass=min_valid_mass)
    return table.assign(per_group=per_group).assign(bias_type=contrast.name)


def minimum_detectable_reduction(low: float, high: float, alpha: float = 0.05, power: float = POWER,
                                 ci: float = 0.95) -> float:
    """The smallest removed bias a test with this (1 - ci) interval detects at level alpha with the given power;
    the interval's SE is its width over 2 z_{(1 + ci) / 2}."""
    se = (high - low) / (2 * sps.norm.ppf((1 + ci) / 2))
    return normal_mde(se, alpha, power)


def allocation(components: pd.DataFrame, settings: pd.DataFrame, budget_seconds: float, max_per_group: int,
               n_variations: int, alpha: float, power: float = POWER) -> pd.DataFrame:
    """Per read-out setting (rows of `settings`: setting, seconds_per_prompt, mc_var (in the scale's units^2),
    current (bool, the audit's own)): the names per group the budget buys for the design's n_variations
    variations (capped at max_per_group), the SE of a variation's SMD and its MDE (median over the audit's
    variations), ranked from the smallest SE. The true between-name variance is the audit's between_var less
    the current setting's Monte Carlo variance."""
    current = settings[settings.current].iloc[0]
    true_var = np.maximum(components.between_var.to_numpy() - current.mc_var, 0.0)
    sd2 = components.sd.to_numpy() ** 2
    records = []
    for s in settings.itertuples():
        per_group = int(min(max_per_group, budget_seconds // (4 * n_variations * s.seconds_per_prompt)))
        se = float(np.median(np.sqrt((true_var + s.mc_var) / (sd2 * per_group)))) if per_group else np.inf
        records.append({"setting": s.setting, "seconds_per_prompt": s.seconds_per_prompt, "mc_sd": np.sqrt(s.mc_var),
                        "per_group": per_group, "minutes": 4 * per_group * n_variations * s.seconds_per_prompt / 60,
                        "se_smd": se, "mde_variation": normal_mde(se, alpha, power)})
    return pd.DataFrame(records).sort_values("se_smd", ignore_index=True)
