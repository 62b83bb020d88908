"""Bias statistics: the SMD between White- and Black-name answers, with CIs from resampling names and
permutation p-values from shuffling race labels across names; the same for any `Contrast` between name groups
(`contrast_table`, `contrast_significance`, `directional_test`; the bias types are in workbench.audit.bias_types).

Input: a DataFrame with one row per (context, variation, name) and columns context, variation, name,
race ("white"/"black"), gender ("man"/"woman"), values and weights (float arrays of equal length;
weights are non-negative and are normalised within a row). Non-finite values are dropped and counted
(`n_nonfinite`); a row left with no weight is invalid: it is excluded and counted (`n_invalid`).
Valid-mass rule: where the frame has a `valid_mass` column (the absolute probability of a numeric
answer), rows with valid_mass < min_valid_mass are invalid too, and the bias table's note names them;
the rest are normalised as above. `mass_table` reports the valid, invalid and unexplored mass.

SMD methods (positive SMD = White answers higher; for a contrast: side a's answers higher):
- "mixture": the paper's pooled-sample SMD in its infinite-sample limit. Each group is the
  equal-weight mixture of its names' answer distributions; SMD = (m_W - m_B) / sqrt((v_W + v_B) / 2).
- "pooled_winsorized": the reproduction's variant. Values are winsorised at the 5 % / 95 % quantiles
  of the pooled mixture of all names of the variation, and the denominator is the df-weighted pooled
  SD sqrt(((n_W - 1) v_W + (n_B - 1) v_B) / (n_W + n_B - 2)), n = number of names. The winsorising
  limits are fixed at their full-sample values in the bootstrap and the permutations.
Scales: "raw" values, or "log" = sign(x) * log1p(|x|), applied before anything else.

Inference (names are the units; a context's names are shared by its variations, so every bootstrap
replicate and every permutation applies to all variations of a context at once):
- CIs ("studentized", the default): bootstrap-t. Names are resampled within race; each replicate's
  statistic is studentised by its delta-method SE (from each name's influence on the statistic), and
  the quantiles of t* set the interval around the estimate. "percentile" is the plain percentile
  bootstrap, which under-covers with few names (88-91 % for a nominal 95 % at 8 names per race, 91-93 %
  at 16; bootstrap-t 94-95 % at both, see tests/audit/test_stats_inference.py).
- p-values: race labels are shuffled across names within gender (`permutation_test`), and adjusted for
  the number of tests with Holm or Benjamini-Hochberg (`adjust_pvalues`, `significance_table`).
- A contrast compares the names of some race x gender groups (side a, the reference) with those of others
  (side b): only its names enter its SMD (and, for "pooled_winsorized", its winsorising limits), the bootstrap
  resamples names within each side, and the null shuffles the side labels within the contrast's strata. The race
  contrast (`RACE`) is the statistic above, number for number.
- mean |SMD| over a context's variations is biased upwards (|.| of noise is positive): its CI says how
  large the bias is when it is clearly non-zero; whether it is non-zero is for the permutation noise
  floor (`null_mean`, `null_q95`) and p-value to say.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args

import numpy as np
import pandas as pd
from jaxtyping import Float
from scipy import stats as sps

from workbench.readout.prompts import AUDIT_GROUPS, GENDERS, RACES

Scale = Literal["raw", "log"]
Method = Literal["mixture", "pooled_winsorized"]
CIMethod = Literal["studentized", "percentile"]
Correction = Literal["holm", "bh"]
SCALES: tuple[Scale, ...] = get_args(Scale)
METHODS: tuple[Method, ...] = get_args(Method)
CI_METHODS: tuple[CIMethod, ...] = get_args(CIMethod)
CORRECTIONS: tuple[Correction, ...] = get_args(Correction)
GROUP_OF = {pair: group for group, pair in AUDIT_GROUPS.items()}  # (race, gender) -> "white_men", ...
REQUIRED_COLUMNS = ("context", "variation", "name", "race", "gender", "values", "weights")
MASS_NAMES = ("valid_mass", "invalid_mass", "unexplored_mass")
WINSOR_QUANTILES = (0.05, 0.95)
ZERO_VARIANCE_RTOL = 1e-10
TIE_RTOL = 1e-9  # a shuffle's statistic counts as "as extreme" within this relative tolerance
KEYS = ["context", "variation"]

BIAS_COLUMNS = [
    "context", "variation", "smd", "ci_low", "ci_high", "n_white", "n_black", "n_invalid",
    "n_nonfinite", "mean_white", "mean_black", "p_mwu", "wasserstein", "note", "scale", "method",
]
SUMMARY_COLUMNS = [
    "context", "mean_abs_smd", "ci_low", "ci_high", "n_variations", "n_used", "scale", "method",
]
GROUP_COLUMNS = [
    "context", "variation", "race", "gender", "mean", "ci_low", "ci_high", "n_names", "n_invalid",
    "scale",
]
MOMENT_COLUMNS = [
    "context", "variation", "name", "race", "gender", "mean", "var", "n_values", "n_nonfinite",
    "valid",
]
CONTRAST_COLUMNS = [
    "context", "variation", "smd", "ci_low", "ci_high", "n_a", "n_b", "n_invalid", "n_nonfinite", "mean_a",
    "mean_b", "note", "scale", "method",
]
RACE_SIDES = {"n_a": "n_white", "n_b": "n_black", "mean_a": "mean_white", "mean_b": "mean_black"}
DIRECTIONAL_COLUMNS = ["context", "variation", "smd", "ci_low", "ci_high", "p_greater"]
MASS_COLUMNS = ["context", "variation", "race", *MASS_NAMES, "n_names"]
SIGNIFICANCE_COLUMNS = ["p_perm", "p_adjusted", "correction", "significant"]
FLOOR_COLUMNS = ["null_mean", "null_q95", "above_floor"]

Matrix = Float[np.ndarray, "rep variation"]


@dataclass(frozen=True)
class Contrast:
    """A bias type: the SMD between the names of the groups on side a (the reference) and those on side b.

    Groups are keys of workbench.readout.prompts.AUDIT_GROUPS ("white_men", ...). SMD = (mean_a - mean_b) / pooled SD:
    positive = the reference side's names get higher numbers. The permutation null shuffles the side labels (the
    `shuffled` label: "race", "gender" or "group") across the contrast's names within each level of `within`
    ("race", "gender", or None for one stratum).
    """

    name: str
    a: tuple[str, ...]
    b: tuple[str, ...]
    labels: tuple[str, str]  # the sides' names in notes and reports
    shuffled: str
    within: str | None

    def sides(self, race, gender) -> tuple[np.ndarray, np.ndarray]:
        """Per name: is it on side a, is it on side b."""
        groups = [GROUP_OF.get(pair) for pair in zip(race, gender)]
        return np.array([g in self.a for g in groups], bool), np.array([g in self.b for g in groups], bool)


RACE = Contrast("race", ("white_men", "white_women"), ("black_men", "black_women"), ("white", "black"), "race",
                "gender")


# ---------------------------------------------------------------- per-row preparation


def signed_log(values: Float[np.ndarray, "*shape"]) -> Float[np.ndarray, "*shape"]:
    """sign(x) * log1p(|x|): the "log" scale of the audit, the metric and the answer table."""
    return np.sign(values) * np.log1p(np.abs(values))


def transform(values: Float[np.ndarray, " n"], scale: Scale) -> Float[np.ndarray, " n"]:
    """Apply the scale: identity for "raw", `signed_log` for "log"."""
    if scale == "raw":
        return values
    return signed_log(values)


def _clean_row(values, weights, scale: Scale) -> tuple[np.ndarray, np.ndarray, int]:
    """Drop non-finite entries, apply the scale, normalise weights; return (x, p, n_dropped)."""
    values = np.asarray(values, dtype=float)
    weights = np.asarray(weights, dtype=float)
    finite = np.isfinite(values) & np.isfinite(weights)
    keep = finite & (weights > 0)
    x, w = transform(values[keep], scale), weights[keep]
    return x, w / w.sum() if w.size else w, int((~finite).sum())


def _with_moments(rows: pd.DataFrame) -> pd.DataFrame:
    """Add each row's mean and variance under its normalised weights (NaN when invalid)."""
    rows = rows.copy()
    means = [float(p @ x) if x.size else np.nan for x, p in zip(rows["x"], rows["p"])]
    rows["mean"] = means
    rows["var"] = [
        float(p @ (x - m) ** 2) if x.size else np.nan for x, p, m in zip(rows["x"], rows["p"], means)
    ]
    return rows


def _prepare(
    df: pd.DataFrame, scale: Scale, method: Method = "mixture", min_valid_mass: float = 0.0,
    contrast: Contrast = RACE,
) -> pd.DataFrame:
    """Validate the input, keep the contrast's names, add columns x, p, n_values, n_nonfinite, low_mass, valid,
    mean, var."""
    _check_input(df, scale, method)
    side_a, side_b = contrast.sides(df["race"], df["gender"])
    rows = df[side_a | side_b].reset_index(drop=True).copy()
    cleaned = [_clean_row(v, w, scale) for v, w in zip(rows["values"], rows["weights"])]
    rows["x"] = [c[0] for c in cleaned]
    rows["p"] = [c[1] for c in cleaned]
    rows["n_nonfinite"] = [c[2] for c in cleaned]
    rows["n_values"] = [c[0].size for c in cleaned]
    if "valid_mass" in rows:
        rows["low_mass"] = rows["valid_mass"].astype(float) < min_valid_mass
    else:
        rows["low_mass"] = False
    rows["valid"] = (rows["n_values"] > 0) & ~rows["low_mass"]
    return _with_moments(rows)


def _check_input(df: pd.DataFrame, scale: Scale, method: Method) -> None:
    """Raise ValueError when the input breaks the data contract."""
    missing = set(REQUIRED_COLUMNS) - set(df.columns)
    if missing:
        raise ValueError(f"missing columns: {sorted(missing)}")
    if scale not in SCALES or method not in METHODS:
        raise ValueError(f"scale must be one of {SCALES}, method one of {METHODS}")
    if not df["race"].isin(RACES).all() or not df["gender"].isin(GENDERS).all():
        raise ValueError(f"race must be one of {RACES}, gender one of {GENDERS}")
    if df.duplicated(["context", "variation", "name"]).any():
        raise ValueError("more than one row per (context, variation, name)")


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    """Raise ValueError unless value is one of choices."""
    if value not in choices:
        raise ValueError(f"{what} must be one of {choices}, not {value!r}")


def _weighted_quantile(x: np.ndarray, w: np.ndarray, q: float) -> float:
    """The smallest value whose cumulative weight reaches q (up to rounding), as numpy's inverted_cdf."""
    order = np.argsort(x)
    cumulative = np.cumsum(w[order])
    index = np.searchsorted(cumulative / cumulative[-1], q - 1e-9)
    return float(x[order][min(index, x.size - 1)])


def _winsorize(rows: pd.DataFrame) -> pd.DataFrame:
    """Clip each row's values at the quantiles of its variation's pooled equal-weight mixture."""
    limits = {}
    for key, group in rows[rows["valid"]].groupby(KEYS):
        x = np.concatenate(group["x"].to_list())
        w = np.concatenate(group["p"].to_list())
        limits[key] = [_weighted_quantile(x, w, q) for q in WINSOR_QUANTILES]
    keys = zip(rows["context"], rows["variation"])
    clipped = [np.clip(x, *limits[key]) if key in limits else x for x, key in zip(rows["x"], keys)]
    return _with_moments(rows.assign(x=clipped))


def name_moments(df: pd.DataFrame, scale: Scale = "raw") -> pd.DataFrame:
    """Per row: mean and variance of the normalised answer distribution (NaN for invalid rows)."""
    return _prepare(df, scale)[MOMENT_COLUMNS]


def mass_table(df: pd.DataFrame) -> pd.DataFrame:
    """Mean valid, invalid and unexplored answer mass and the number of names per (context, variation,
    race), then per (context, race) over all variations (variation "all"); a missing column gives NaN."""
    masses = df.reindex(columns=[*KEYS, "race", "name", *MASS_NAMES])
    masses[list(MASS_NAMES)] = masses[list(MASS_NAMES)].astype(float)
    aggregate = {**{m: (m, "mean") for m in MASS_NAMES}, "n_names": ("name", "nunique")}
    tables = [part.groupby([*KEYS, "race"], sort=True).agg(**aggregate).reset_index()
              for part in (masses, masses.assign(variation="all"))]
    table = pd.concat(tables, ignore_index=True).sort_values("context", kind="stable")
    return table.reset_index(drop=True)[MASS_COLUMNS]


# ---------------------------------------------------------------- group moments and SMDs


def _safe_div(a, b):
    """a / b, NaN wherever b is not positive."""
    a, b = np.broadcast_arrays(np.asarray(a, dtype=float), np.asarray(b, dtype=float))
    return np.divide(a, b, out=np.full(a.shape, np.nan), where=b > 0)


@dataclass(frozen=True)
class GroupMoments:
    """Moments of a group's equal-weight mixture over (possibly resampled) names."""

    n: Matrix  # number of names with a valid answer
    mean: Matrix  # mixture mean (centred)
    var: Matrix  # mixture variance: mean within-name variance + variance of name means (ddof 0)
    second: Matrix  # centred second moment, the reference for "zero variance"

    @classmethod
    def from_names(cls, means, variances) -> GroupMoments:
        """One group's moments (arrays of shape (1, 1)) from its names' means and variances."""
        means, variances = np.asarray(means, dtype=float), np.asarray(variances, dtype=float)
        sums = (means.size, means.sum(), (variances + means**2).sum())
        return _moments_from_sums(*(np.full((1, 1), float(total)) for total in sums))


def _moments_from_sums(n: Matrix, mean_sum: Matrix, second_sum: Matrix) -> GroupMoments:
    """Mixture moments from the number of names and the sums of their means and second moments."""
    mean, second = _safe_div(mean_sum, n), _safe_div(second_sum, n)
    return GroupMoments(n, mean, np.maximum(second - mean**2, 0.0), second)


@dataclass(frozen=True)
class _Context:
    """One context's names x variations arrays; White names come first."""

    variations: list[str]
    race: np.ndarray  # (name,)
    gender: np.ndarray  # (name,)
    centre: Float[np.ndarray, " variation"]
    mean: Float[np.ndarray, "name variation"]  # centred, 0 where invalid
    var: Float[np.ndarray, "name variation"]  # within-name variance, 0 where invalid
    second: Float[np.ndarray, "name variation"]  # var + centred mean^2, 0 where invalid
    valid: Float[np.ndarray, "name variation"]


def _context_arrays(rows: pd.DataFrame) -> _Context:
    """Pivot one context's rows (with moments) into names x variations arrays."""
    white = sorted(rows.loc[rows["race"] == "white", "name"].unique())
    black = sorted(rows.loc[rows["race"] == "black", "name"].unique())
    variations = sorted(rows["variation"].unique())
    at = pd.Index(white + black).get_indexer(rows["name"]), pd.Index(variations).get_indexer(rows["variation"])

    def pivot(values: pd.Series, fill) -> np.ndarray:
        table = np.full((len(white) + len(black), len(variations)), fill, dtype=values.dtype)
        table[at] = values.to_numpy()
        return table

    valid = pivot(rows["valid"], False)
    means = np.where(valid, pivot(rows["mean"], np.nan), np.nan)
    centre = pd.DataFrame(means).median().fillna(0.0).to_numpy(float)
    centred = np.where(valid, means - centre, 0.0)
    within = np.where(valid, pivot(rows["var"], np.nan), 0.0)
    race, gender = (np.empty(len(white) + len(black), dtype=object) for _ in range(2))
    race[at[0]], gender[at[0]] = rows["race"].to_numpy(), rows["gender"].to_numpy()
    return _Context(
        variations, race, gender, centre, centred, within, within + centred**2, valid.astype(float),
    )


def _group_moments(counts: Float[np.ndarray, "rep name"], ctx: _Context) -> GroupMoments:
    """Mixture moments for each replicate; counts[r, i] = how often name i is drawn in replicate r."""
    return _moments_from_sums(counts @ ctx.valid, counts @ ctx.mean, counts @ ctx.second)


def _pool_weights(a: GroupMoments, b: GroupMoments, method: Method) -> tuple[Matrix, Matrix]:
    """Weights of the two group variances in the pooled variance: 1/2 each for "mixture",
    (n - 1) / (n_a + n_b - 2) for "pooled_winsorized" (NaN with two names or fewer)."""
    if method == "mixture":
        return np.full(a.n.shape, 0.5), np.full(b.n.shape, 0.5)
    dof = a.n + b.n - 2
    return _safe_div(a.n - 1, dof), _safe_div(b.n - 1, dof)


def _smd(a: GroupMoments, b: GroupMoments, method: Method) -> Matrix:
    """The method's SMD of group a vs group b: mean difference over the square root of the weighted pooled
    variance."""
    weight_a, weight_b = _pool_weights(a, b, method)
    return _standardise(a, b, weight_a * a.var + weight_b * b.var)


def smd_mixture(white: GroupMoments, black: GroupMoments) -> Matrix:
    """The paper's SMD (infinite-sample limit): (m_W - m_B) / sqrt((v_W + v_B) / 2)."""
    return _smd(white, black, "mixture")


def smd_pooled_winsorized(white: GroupMoments, black: GroupMoments) -> Matrix:
    """The reproduction's SMD: df-weighted pooled SD over names (pass moments of winsorised data)."""
    return _smd(white, black, "pooled_winsorized")


def _standardise(a: GroupMoments, b: GroupMoments, pooled_var: Matrix, difference: Matrix | None = None) -> Matrix:
    """Mean difference a - b (or the given difference) over sqrt(pooled_var); NaN where the variance is
    (numerically) zero."""
    reference = ZERO_VARIANCE_RTOL * (a.second + b.second)
    usable = pooled_var > reference
    difference = a.mean - b.mean if difference is None else difference
    return _safe_div(difference, np.sqrt(np.where(usable, pooled_var, 0.0)))


# ---------------------------------------------------------------- statistics with linear terms


@dataclass(frozen=True)
class _Statistic:
    """A statistic at the full sample (row 0) and at each bootstrap replicate (rows 1...), with each name's
    linear term: its delta-method influence on the statistic divided by its group's size, so that
    sum_i counts_i * linear_i^2 estimates the statistic's variance."""

    value: Float[np.ndarray, "rep k"]
    linear: Float[np.ndarray, "rep name k"]


def _smd_statistic(
    a_counts: Float[np.ndarray, "rep name"], b_counts: Float[np.ndarray, "rep name"], ctx: _Context,
    method: Method, numerator: Float[np.ndarray, "name variation"] | None = None,
) -> tuple[GroupMoments, GroupMoments, _Statistic]:
    """Moments of groups a and b and their SMD per replicate with its linear terms.

    SMD = D / sqrt(P), D = m_a - m_b, P = w_a v_a + w_b v_b. Name i of group g moves m_g by
    (m_i - m_g) / n_g and v_g by (v_i + (m_i - m_g)^2 - v_g) / n_g, hence
    linear_i = (+-(m_i - m_g) / sqrt(P) - SMD w_g / (2 P) (v_i + (m_i - m_g)^2 - v_g)) / n_g
    (the weights w_g are held fixed: a bootstrap replicate has as many names as the sample).
    With `numerator` (a value per name and variation, y_i), D is the difference of the groups' means of y instead
    (P stays ctx's): the fixed-scale change of a gap, y_i = m_i before - m_i after, divided by the unpruned SD.
    """
    a, b = _group_moments(a_counts, ctx), _group_moments(b_counts, ctx)
    weights = _pool_weights(a, b, method)
    pooled = weights[0] * a.var + weights[1] * b.var
    y = ctx.mean if numerator is None else np.where(ctx.valid > 0, numerator, 0.0)
    y_means = [_safe_div(counts @ y, group.n) for counts, group in ((a_counts, a), (b_counts, b))]
    smd = _standardise(a, b, pooled, y_means[0] - y_means[1])
    linear = np.zeros((*a_counts.shape, len(ctx.variations)))
    for sign, counts, group, weight, y_mean in zip((1, -1), (a_counts, b_counts), (a, b), weights, y_means):
        dev = ctx.mean - group.mean[:, None, :]
        spread = ctx.var + dev**2 - group.var[:, None, :]
        influence = (sign * _safe_div(y - y_mean[:, None, :], np.sqrt(pooled)[:, None, :])
                     - _safe_div(smd * weight, 2 * pooled)[:, None, :] * spread)
        member = (counts > 0)[:, :, None] & (ctx.valid > 0)
        linear += np.where(member, _safe_div(influence, group.n[:, None, :]), 0.0)
    return a, b, _Statistic(smd, linear)


def _row_mean(values: Float[np.ndarray, "rep variation"]) -> Float[np.ndarray, " rep"]:
    """Mean over the finite entries of each row (NaN when none)."""
    finite = np.isfinite(values)
    return _safe_div(np.where(finite, values, 0.0).sum(axis=1), finite.sum(axis=1))


def _mean_abs(smd: Float[np.ndarray, "rep variation"]) -> Float[np.ndarray, " rep"]:
    """Mean |SMD| over the finite entries of each row (NaN when none)."""
    return _row_mean(np.abs(smd))


def _mean_abs_statistic(smd: _Statistic, ci_method: CIMethod) -> _Statistic:
    """Mean |SMD| over the finite variations as the mean of s_k SMD_k, s = sign(SMD); its linear term is the
    mean of s_k times the SMD_k's terms.

    For "studentized", s is the sign of the full-sample estimate in every replicate: |.| is not smooth at 0,
    and a bootstrap-t of mean |SMD*| shifts the interval down wherever an SMD is within a few SEs of 0
    (90 % coverage at 8 names per race in tests/audit/test_stats_inference.py, 95 % with fixed signs). For
    "percentile", s = sign(SMD*): the replicates are mean |SMD*|, as before.
    """
    return _signed_mean(smd, np.sign(smd.value[:1] if ci_method == "studentized" else smd.value))


def _signed_mean(smd: _Statistic, signs: Float[np.ndarray, "rep variation"]) -> _Statistic:
    """Mean over the finite variations of s_k SMD_k per replicate (signs broadcast over the replicates); its
    linear term is the mean of s_k times the SMD_k's terms."""
    finite = np.isfinite(smd.value) & np.isfinite(signs)
    slope = _safe_div(np.where(finite, signs, 0.0), finite.sum(axis=1, keepdims=True))
    value = np.where(finite, smd.value * slope, 0.0).sum(axis=1, keepdims=True)
    terms = np.where(finite[:, None, :], smd.linear, 0.0)
    return _Statistic(np.where(finite.any(axis=1, keepdims=True), value, np.nan),
                      np.einsum("rnk,rk->rn", terms, slope)[:, :, None])


# ---------------------------------------------------------------- bootstrap


def _resample_counts(rng: np.random.Generator, n_boot: int, n: int) -> Float[np.ndarray, "rep n"]:
    """How often each of n names is drawn when resampling n names with replacement, per replicate."""
    if n == 0:
        return np.zeros((n_boot, 0))
    picks = rng.integers(0, n, size=(n_boot, n)) + n * np.arange(n_boot)[:, None]
    return np.bincount(picks.ravel(), minlength=n_boot * n).reshape(n_boot, n).astype(float)


def _stratified_counts(
    ctx: _Context, contrast: Contrast, n_boot: int, rng: np.random.Generator
) -> tuple[Float[np.ndarray, "rep name"], Float[np.ndarray, "rep name"]]:
    """Counts of side a's and side b's names (0 for the other side's names): row 0 all ones, then n_boot
    resamples with replacement within each race x gender group, so every replicate keeps the sample's mix of
    groups on each side (side b of "Black women vs the rest" stays a third each of its three groups)."""
    sides = contrast.sides(ctx.race, ctx.gender)
    groups = _strata(ctx)
    counts = []
    for side in sides:
        side_counts = np.zeros((n_boot + 1, side.size))
        side_counts[0, side] = 1.0
        for group in sorted(set(groups[side])):
            members = side & (groups == group)
            side_counts[1:, members] = _resample_counts(rng, n_boot, int(members.sum()))
        counts.append(side_counts)
    return counts[0], counts[1]


@dataclass(frozen=True)
class _Estimate:
    """The SMD of one context at the full sample (row 0) and at the bootstrap replicates (rows 1...)."""

    ctx: _Context
    counts: Float[np.ndarray, "rep name"]  # row 0 all ones
    a: GroupMoments
    b: GroupMoments
    smd_stat: _Statistic

    @property
    def smd(self) -> Float[np.ndarray, " variation"]:
        """The full-sample SMD per variation."""
        return self.smd_stat.value[0]

    @property
    def replicates(self) -> Float[np.ndarray, "rep variation"]:
        """The bootstrap replicates of the SMD."""
        return self.smd_stat.value[1:]


def _estimate(
    ctx: _Context, contrast: Contrast, method: Method, n_boot: int, rng: np.random.Generator
) -> _Estimate:
    """The contrast's SMD per variation; each replicate resamples names within each race x gender group of each
    side (`_stratified_counts`), shared by all variations."""
    a_counts, b_counts = _stratified_counts(ctx, contrast, n_boot, rng)
    with np.errstate(over="ignore", invalid="ignore"):
        moments = _smd_statistic(a_counts, b_counts, ctx, method)
    return _Estimate(ctx, a_counts + b_counts, *moments)


def _contexts(rows: pd.DataFrame, method: Method) -> Iterator[tuple[str, _Context]]:
    """Yield (context, arrays) for prepared rows in sorted context order, winsorised for that method."""
    if method == "pooled_winsorized":
        rows = _winsorize(rows)
    for context, group in rows.groupby("context", sort=True):
        with np.errstate(over="ignore"):  # answers too large for the raw scale: reported in the notes
            ctx = _context_arrays(group)
        yield context, ctx


def _estimates(
    rows: pd.DataFrame, method: Method, n_boot: int, seed: int, contrast: Contrast = RACE
) -> Iterator[tuple[str, _Estimate]]:
    """Yield (context, estimate) for rows prepared for the contrast, in sorted context order, from one seeded
    generator."""
    rng = np.random.default_rng(seed)
    for context, ctx in _contexts(rows, method):
        yield context, _estimate(ctx, contrast, method, n_boot, rng)


def _percentile_ci(replicates: Float[np.ndarray, "rep k"], ci: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval per column over the finite replicates (NaN when there are none)."""
    tail = 100 * (1 - ci) / 2
    bounds = [
        np.percentile(col[np.isfinite(col)], [tail, 100 - tail]) if np.isfinite(col).any() else [np.nan] * 2
        for col in replicates.T
    ]
    bounds = np.asarray(bounds, dtype=float).reshape(-1, 2)
    return bounds[:, 0], bounds[:, 1]


def _interval(
    stat: _Statistic, counts: Float[np.ndarray, "rep name"], ci: float, ci_method: CIMethod,
    strata: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """CI per column of a statistic: percentile, or bootstrap-t with t* = (replicate - estimate) / SE*,
    SE^2 = sum_i counts_i (linear_i - its stratum's mean)^2, the variance of a bootstrap that resamples within
    `strata` (one label per name; None: one stratum). Replicates with SE* = 0 are dropped (only ever a
    degenerate statistic, e.g. one that no name moves)."""
    _check_choice(ci_method, CI_METHODS, "ci_method")
    point, replicates = stat.value[0], stat.value[1:]
    if ci_method == "percentile":
        return _percentile_ci(replicates, ci)
    linear = stat.linear if strata is None else stat.linear.copy()
    for stratum in [] if strata is None else pd.unique(strata):
        members = strata == stratum
        weight = counts[:, members, None]
        mean = _safe_div((weight * linear[:, members]).sum(axis=1), weight.sum(axis=1))
        linear[:, members] -= np.where(weight > 0, mean[:, None, :], 0.0)
    with np.errstate(over="ignore", invalid="ignore"):
        se = np.sqrt(np.einsum("rn,rnk->rk", counts, linear**2))
        t_low, t_high = _percentile_ci(_safe_div(replicates - point, se[1:]), ci)
        return point - t_high * se[0], point - t_low * se[0]


def _strata(ctx: _Context) -> np.ndarray:
    """Each name's race x gender group: the strata the bootstrap resamples within."""
    return np.array([GROUP_OF.get(pair, "") for pair in zip(ctx.race, ctx.gender)], dtype=object)


# ---------------------------------------------------------------- tables


def _note(
    n_a: float, n_b: float, smd: float, method: Method, labels: tuple[str, str], overflow: bool = False
) -> str:
    """Why an SMD is missing, or "" when it is not; labels name the sides."""
    if overflow and n_a and n_b:
        return "variance overflow: answers too large for the raw scale, use the log scale"
    if n_a == 0 and n_b == 0:
        return "no valid answers"
    if n_a == 0 or n_b == 0:
        return f"no valid answers for {labels[0] if n_a == 0 else labels[1]}"
    if method == "pooled_winsorized" and n_a + n_b <= 2:
        return "too few names for pooled SD"
    return "zero variance" if np.isnan(smd) else ""


def _row_counts(rows: pd.DataFrame) -> pd.DataFrame:
    """Invalid rows and dropped non-finite values per (context, variation)."""
    counts = rows.assign(invalid=~rows["valid"]).groupby(KEYS)[["invalid", "n_nonfinite"]].sum()
    return counts.rename(columns={"invalid": "n_invalid"}).reset_index()


def _excluded_names(rows: pd.DataFrame, min_valid_mass: float) -> pd.DataFrame:
    """"excluded (valid mass < x): names" per (context, variation) that has rows below the valid mass."""
    low = rows[rows["low_mass"]].groupby(KEYS, sort=False)["name"].agg(", ".join)
    text = f"excluded (valid mass < {min_valid_mass:g}): " + low
    return text.rename("excluded").reset_index()


def _distribution_tests(rows: pd.DataFrame) -> pd.DataFrame:
    """Mann-Whitney U on the names' means and the Wasserstein distance between group mixtures."""
    records = []
    for (context, variation), group in rows[rows["valid"]].groupby(KEYS):
        white, black = (group[group["race"] == race] for race in RACES)
        record = {"context": context, "variation": variation, "p_mwu": np.nan, "wasserstein": np.nan}
        if len(white) and len(black):
            record["p_mwu"] = sps.mannwhitneyu(white["mean"], black["mean"]).pvalue
            record["wasserstein"] = sps.wasserstein_distance(
                np.concatenate(white["x"].to_list()), np.concatenate(black["x"].to_list()),
                np.concatenate(white["p"].to_list()), np.concatenate(black["p"].to_list()),
            )
        records.append(record)
    return pd.DataFrame(records, columns=[*KEYS, "p_mwu", "wasserstein"]).astype(
        {"p_mwu": float, "wasserstein": float})


def _bias_rows(
    context: str, est: _Estimate, contrast: Contrast, method: Method, ci: float, ci_method: CIMethod
) -> pd.DataFrame:
    """The contrast table rows of one context."""
    low, high = _interval(est.smd_stat, est.counts, ci, ci_method, _strata(est.ctx))
    smd = est.smd
    n_a, n_b = est.a.n[0], est.b.n[0]
    return pd.DataFrame({
        "context": context,
        "variation": est.ctx.variations,
        "smd": smd,
        "ci_low": low,
        "ci_high": high,
        "n_a": n_a.astype(int),
        "n_b": n_b.astype(int),
        "mean_a": est.a.mean[0] + est.ctx.centre,
        "mean_b": est.b.mean[0] + est.ctx.centre,
        "note": [_note(na, nb, s, method, contrast.labels, overflow)
                 for na, nb, s, overflow in zip(n_a, n_b, smd, _overflowed(est))],
    })


def _overflowed(est: _Estimate) -> np.ndarray:
    """Variations whose second moments overflowed float64 (answers too large for the raw scale)."""
    return ~(np.isfinite(est.a.second[0]) & np.isfinite(est.b.second[0]))


def _contrast_rows(
    rows: pd.DataFrame, contrast: Contrast, method: Method, n_boot: int, seed: int, ci: float,
    min_valid_mass: float, ci_method: CIMethod,
) -> pd.DataFrame:
    """contrast_table's rows (without scale and method) from rows prepared for the contrast."""
    frames = [_bias_rows(c, est, contrast, method, ci, ci_method)
              for c, est in _estimates(rows, method, n_boot, seed, contrast)]
    if not frames:
        return pd.DataFrame(columns=CONTRAST_COLUMNS[:-2])
    table = pd.concat(frames, ignore_index=True).merge(_row_counts(rows), on=KEYS)
    table = table.merge(_excluded_names(rows, min_valid_mass), on=KEYS, how="left")
    notes = zip(table["note"], table["excluded"].fillna(""))
    table["note"] = ["; ".join(filter(None, parts)) for parts in notes]
    return table[CONTRAST_COLUMNS[:-2]]


def contrast_table(
    df: pd.DataFrame,
    contrast: Contrast = RACE,
    scale: Scale = "raw",
    method: Method = "mixture",
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    min_valid_mass: float = 0.0,
    ci_method: CIMethod = "studentized",
) -> pd.DataFrame:
    """One row per (context, variation): the contrast's SMD with bootstrap CI, the sides' counts (n_a, n_b) and
    group means (mean_a, mean_b), and the contrast's names that are invalid or below min_valid_mass (n_invalid,
    note). For RACE these are bias_table's numbers."""
    with np.errstate(over="ignore", invalid="ignore"):
        rows = _prepare(df, scale, method, min_valid_mass, contrast)
        table = _contrast_rows(rows, contrast, method, n_boot, seed, ci, min_valid_mass, ci_method)
    return table.assign(scale=scale, method=method)[CONTRAST_COLUMNS]


def bias_table(
    df: pd.DataFrame,
    scale: Scale = "raw",
    method: Method = "mixture",
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    min_valid_mass: float = 0.0,
    ci_method: CIMethod = "studentized",
) -> pd.DataFrame:
    """One row per (context, variation): SMD with bootstrap CI, counts, group means and tests.

    mean_white/mean_black are the method's group means (winsorised for "pooled_winsorized");
    p_mwu and wasserstein use the unwinsorised values on the chosen scale. Rows below min_valid_mass
    (see the module docstring) are counted in n_invalid and named in the note.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        rows = _prepare(df, scale, method, min_valid_mass)
        table = _contrast_rows(rows, RACE, method, n_boot, seed, ci, min_valid_mass, ci_method)
    if table.empty:
        return pd.DataFrame(columns=BIAS_COLUMNS)
    table = table.rename(columns=RACE_SIDES).merge(_distribution_tests(rows), on=KEYS, how="left")
    return table.assign(scale=scale, method=method)[BIAS_COLUMNS]


def context_summary(
    df: pd.DataFrame,
    scale: Scale = "raw",
    method: Method = "mixture",
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    min_valid_mass: float = 0.0,
    ci_method: CIMethod = "studentized",
    contrast: Contrast = RACE,
) -> pd.DataFrame:
    """One row per context: mean |SMD| (of the contrast, race by default) over its variations, CI from the same
    name resampling.

    The CI (its lower end clipped at 0) is for a clearly non-zero bias: near zero mean |SMD| is biased
    upwards, and the permutation noise floor (`permutation_test`) is the reference there.
    """
    records = []
    rows = _prepare(df, scale, method, min_valid_mass, contrast)
    for context, est in _estimates(rows, method, n_boot, seed, contrast):
        stat = _mean_abs_statistic(est.smd_stat, ci_method)
        low, high = _interval(stat, est.counts, ci, ci_method, _strata(est.ctx))
        records.append({
            "context": context,
            "mean_abs_smd": stat.value[0, 0],
            "ci_low": np.maximum(low[0], 0.0),
            "ci_high": high[0],
            "n_variations": len(est.ctx.variations),
            "n_used": int(np.isfinite(est.smd).sum()),
        })
    return pd.DataFrame(records, columns=SUMMARY_COLUMNS[:-2]).assign(scale=scale, method=method)


def _mean_with_ci(
    means: np.ndarray, rng: np.random.Generator, n_boot: int, ci: float
) -> tuple[float, float, float]:
    """Mean of the names' means and its percentile CI from resampling names."""
    if means.size == 0:
        return np.nan, np.nan, np.nan
    replicates = means[rng.integers(0, means.size, size=(n_boot, means.size))].mean(axis=1)
    low, high = _percentile_ci(replicates[:, None], ci)
    return float(means.mean()), low[0], high[0]


def group_means(
    df: pd.DataFrame,
    scale: Scale = "raw",
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    min_valid_mass: float = 0.0,
) -> pd.DataFrame:
    """Mean of the names' expected values per (context, variation, race, gender) and per race.

    Race-level rows have gender "all". CIs resample names within each row's group. Rows below
    min_valid_mass are counted in n_invalid.
    """
    rows = _prepare(df, scale, min_valid_mass=min_valid_mass)
    rng = np.random.default_rng(seed)
    by_race = rows.assign(gender="all")
    records = []
    for (context, variation, race, gender), group in pd.concat([rows, by_race]).groupby(
        [*KEYS, "race", "gender"], sort=True
    ):
        means = group.loc[group["valid"], "mean"].to_numpy(float)
        mean, low, high = _mean_with_ci(means, rng, n_boot, ci)
        records.append({
            "context": context, "variation": variation, "race": race, "gender": gender, "mean": mean,
            "ci_low": low, "ci_high": high, "n_names": means.size,
            "n_invalid": int((~group["valid"]).sum()),
        })
    return pd.DataFrame(records, columns=GROUP_COLUMNS[:-1]).assign(scale=scale)


# ---------------------------------------------------------------- bias removed at a fixed scale

DIRECTION_COLUMNS = ["context", "variation", "sign"]
REDUCTION_COLUMNS = [
    "context", "n_folds", "n_names", "n_variations", "bias_before", "bias_ci_low", "bias_ci_high", "bias_after",
    "removed", "removed_low", "removed_high", "reduction_pct", "ci_low", "ci_high", "gap_before", "gap_after",
    "sd_before", "sd_after", "scale", "method",
]
COMPARISON_COLUMNS = [
    "context", "n_random", "removed", "random_mean", "random_sd", "rank", "p_rank", "difference", "difference_low",
    "difference_high",
]


def bias_directions(df: pd.DataFrame, scale: Scale = "raw", method: Method = "mixture", min_valid_mass: float = 0.0,
                    contrast: Contrast = RACE) -> pd.DataFrame:
    """The direction of each (context, variation)'s bias: sign of its SMD (+1: side a, e.g. White names, higher;
    0 where the SMD is 0 or undefined). Fitted on selection names, it fixes the sign that the bias removed is
    measured in on other names, so that no |.| of noise enters (`signed_reduction`)."""
    rows = _prepare(df, scale, method, min_valid_mass, contrast)
    frames = []
    for context, ctx in _contexts(rows, method):
        a_counts, b_counts = (side[None].astype(float) for side in contrast.sides(ctx.race, ctx.gender))
        with np.errstate(over="ignore", invalid="ignore"):
            smd = _smd_statistic(a_counts, b_counts, ctx, method)[2].value[0]
        frames.append(pd.DataFrame({"context": context, "variation": ctx.variations,
                                    "sign": np.nan_to_num(np.sign(smd))}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=DIRECTION_COLUMNS)


@dataclass(frozen=True)
class _FoldStatistics:
    """One fold's signed statistics (rows: full sample, then bootstrap replicates): the bias before in the fixed
    direction and the bias each pruning removed at the unpruned scale, with the fold's counts and strata."""

    before: _Statistic
    removed: list[_Statistic]
    counts: Float[np.ndarray, "rep name"]
    strata: np.ndarray


@dataclass(frozen=True)
class _Removal:
    """One context's statistics over its folds (disjoint names) and the means over the folds of the gaps and
    SDs (before, then after each pruning)."""

    folds: list[_FoldStatistics]
    n_variations: int
    gaps: Float[np.ndarray, " table"]
    sds: Float[np.ndarray, " table"]

    def pooled(self, select) -> _Statistic:
        """The mean over the folds of select(fold) (a statistic), its linear terms side by side (names disjoint)."""
        stats = [select(fold) for fold in self.folds]
        n = len(stats)
        return _Statistic(sum(s.value for s in stats) / n, np.concatenate([s.linear for s in stats], axis=1) / n)

    def interval(self, select, ci: float, ci_method: CIMethod) -> tuple[float, float]:
        """The interval of the mean over the folds of select(fold): the mean of the folds' own intervals. Each
        fold's direction comes from the other fold's names, which correlates the folds' estimates (positively);
        the mean of their intervals is as wide as perfect correlation allows, so it covers whatever the
        correlation (an interval for independent folds covered 88-93 % for 95 %: benchmarks/coverage.py)."""
        bounds = np.array([[b[0] for b in _interval(select(f), f.counts, ci, ci_method, f.strata)]
                           for f in self.folds])
        return float(bounds[:, 0].mean()), float(bounds[:, 1].mean())

    @property
    def n_names(self) -> int:
        return int(sum(f.counts[0].sum() for f in self.folds))


def _fold_of(after: pd.DataFrame) -> pd.Series:
    """Each row's cross-fitting fold (0 for every row when the table has no fold column)."""
    if "fold" not in after:
        return pd.Series(0, index=after.index)
    return after["fold"].astype("Int64").fillna(0).astype(int)


def _sign_matrix(directions: pd.DataFrame, fold: int, context: str, variations: list[str]) -> np.ndarray:
    """The directions of a context's variations in one fold (the fold's own rows where the table has folds),
    NaN where none is given; a row of shape (1, variation)."""
    rows = directions[directions.context == context]
    if "fold" in rows:
        rows = rows[rows["fold"].astype("Int64").fillna(fold) == fold]
    signs = rows.drop_duplicates("variation", keep="last").set_index("variation")["sign"]
    values = signs.reindex(variations).to_numpy(float)
    return np.where(values == 0, np.nan, values)[None]


@dataclass(frozen=True)
class _FoldPart:
    """One fold's unsigned statistics of one context: the SMD per variation, each pruning's removed gap per
    variation (at the unpruned SD), the resampling counts, the groups' gaps and pooled SDs at the full sample
    (before, then each pruning), and each name's stratum."""

    smd: _Statistic
    removed: list[_Statistic]
    counts: Float[np.ndarray, "rep name"]
    gaps: Float[np.ndarray, "table variation"]
    sds: Float[np.ndarray, "table variation"]
    strata: np.ndarray


def _fold_part(rows_before: pd.DataFrame, rows_after: list[pd.DataFrame], contrast: Contrast, method: Method,
               n_boot: int, rng: np.random.Generator) -> _FoldPart:
    """One fold's unsigned statistics of one context, on one set of stratified bootstrap replicates."""
    with np.errstate(over="ignore"):
        before, afters = _context_arrays(rows_before), [_context_arrays(rows) for rows in rows_after]
    a_counts, b_counts = _stratified_counts(before, contrast, n_boot, rng)
    with np.errstate(over="ignore", invalid="ignore"):
        smd = _smd_statistic(a_counts, b_counts, before, method)[2]
        removed = [_smd_statistic(a_counts, b_counts, before, method, numerator=before.mean - after.mean)[2]
                   for after in afters]
        gaps, sds = [], []
        for ctx in (before, *afters):
            a_full, b_full = _group_moments(a_counts[:1], ctx), _group_moments(b_counts[:1], ctx)
            weight_a, weight_b = _pool_weights(a_full, b_full, method)
            gaps.append((a_full.mean - b_full.mean)[0])
            sds.append(np.sqrt(weight_a * a_full.var + weight_b * b_full.var)[0])
    return _FoldPart(smd, removed, a_counts + b_counts, np.array(gaps), np.array(sds), _strata(before))


def _signed_part(part: _FoldPart, signs: Float[np.ndarray, "rep variation"]
                 ) -> tuple[_FoldStatistics, np.ndarray, np.ndarray]:
    """A fold's statistics in the given directions, and the mean signed gap and pooled SD over the variations
    with a direction (before, then each pruning)."""
    used = np.isfinite(signs[0])
    with np.errstate(over="ignore", invalid="ignore"):
        gaps = (part.gaps * signs[:1])[:, used].mean(axis=1) if used.any() else np.full(len(part.gaps), np.nan)
        sds = part.sds[:, used].mean(axis=1) if used.any() else np.full(len(part.sds), np.nan)
        statistics = _FoldStatistics(_signed_mean(part.smd, signs), [_signed_mean(r, signs) for r in part.removed],
                                     part.counts, part.strata)
    return statistics, gaps, sds


def _finite_mean(values: Float[np.ndarray, "fold table"]) -> Float[np.ndarray, " table"]:
    """The mean over the folds of the finite entries per column (NaN where none is)."""
    finite = np.isfinite(values)
    return _safe_div(np.where(finite, values, 0.0).sum(axis=0), finite.sum(axis=0))


def _removals(before: pd.DataFrame, afters: list[pd.DataFrame], directions: pd.DataFrame, scale: Scale,
              method: Method, n_boot: int, seed: int, min_valid_mass: float, contrast: Contrast
              ) -> Iterator[tuple[str, _Removal]]:
    """Per context: the statistics of `signed_reduction` for every after-table, on one set of bootstrap
    replicates (so that prunings measured on the same names are paired). A name counts where it is valid before
    and after every pruning; the after-tables' fold column (if any) assigns names to folds."""
    keys = ["context", "variation", "name"]
    order = sorted(map(tuple, before[keys].values))
    for after in afters:
        if sorted(map(tuple, after[keys].values)) != order:
            raise ValueError("a bias reduction needs the same (context, variation, name) rows before and after")
    folds = _fold_of(afters[0]).set_axis(pd.MultiIndex.from_frame(afters[0][keys]))
    prepared = [_prepare(t, scale, method, min_valid_mass, contrast).set_index(keys, drop=False)
                for t in (before, *afters)]
    valid = np.logical_and.reduce([p["valid"].reindex(prepared[0].index).to_numpy() for p in prepared])
    prepared = [p.reindex(prepared[0].index).assign(valid=valid).reset_index(drop=True) for p in prepared]
    if method == "pooled_winsorized":
        prepared = [_winsorize(p) for p in prepared]
    fold = folds.reindex(pd.MultiIndex.from_frame(prepared[0][keys])).to_numpy()
    rng = np.random.default_rng(seed)
    for context in sorted(prepared[0]["context"].unique()):
        in_context = (prepared[0]["context"] == context).to_numpy()
        fold_ids = sorted(set(fold[in_context]))
        parts = []
        for f in fold_ids:
            rows = [p[in_context & (fold == f)] for p in prepared]
            parts.append(_fold_part(rows[0], rows[1:], contrast, method, n_boot, rng))
        known = sorted(prepared[0].loc[in_context, "variation"].unique())
        signs = [_sign_matrix(directions, f, context, known) for f in fold_ids]
        statistics, gaps, sds = zip(*(_signed_part(part, sign) for part, sign in zip(parts, signs)))
        yield context, _Removal(list(statistics), int(max(np.isfinite(sign[0]).sum() for sign in signs)),
                                _finite_mean(np.array(gaps)), _finite_mean(np.array(sds)))


def _fieller(numerator: _Statistic, denominator: _Statistic, ci: float) -> tuple[float, float]:
    """Fieller's interval for the ratio numerator / denominator of two paired statistics, from their
    delta-method variances and covariance: the ratios r with (N - r D)^2 <= z^2 Var(N - r D). Unbounded (NaN,
    NaN) when the denominator is not clearly non-zero (D^2 <= z^2 Var D)."""
    z = sps.norm.ppf(0.5 + ci / 2)
    n, d = numerator.value[0, 0], denominator.value[0, 0]
    ln, ld = numerator.linear[0, :, 0], denominator.linear[0, :, 0]
    var_n, var_d, cov = ln @ ln, ld @ ld, ln @ ld
    a = d**2 - z**2 * var_d
    b = n * d - z**2 * cov
    c = n**2 - z**2 * var_n
    discriminant = b**2 - a * c
    if not np.isfinite(a) or a <= 0 or discriminant < 0:
        return np.nan, np.nan
    root = np.sqrt(discriminant)
    return (b - root) / a, (b + root) / a


def signed_reduction(
    before: pd.DataFrame,
    after: pd.DataFrame,
    directions: pd.DataFrame | None = None,
    scale: Scale = "raw",
    method: Method = "mixture",
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    min_valid_mass: float = 0.0,
    ci_method: CIMethod = "studentized",
    contrast: Contrast = RACE,
) -> pd.DataFrame:
    """Per context: the bias a pruning removed, in a fixed direction and at the unpruned scale.

    For each variation k with direction s_k (`directions`: context, variation, sign, optionally per fold; fitted
    on the selection names by `bias_directions`, or on `before` itself when None, which is in-sample):
    bias_before = mean_k s_k (m_a - m_b)_before / SD_before (the signed SMD: no |.|, so no noise floor and an
    interval valid at 0), removed = mean_k s_k [(m_a - m_b)_before - (m_a - m_b)_after] / SD_before (in SMD
    units: a pruning that only spreads the answers removes 0; one that closes the gap removes bias_before),
    bias_after = bias_before - removed, reduction_pct = 100 removed / bias_before with Fieller's interval (NaN
    ends: bias_before is not clearly non-zero, so no ratio is bounded). Intervals of bias_before and removed:
    bootstrap over names within race x gender groups (bootstrap-t by default); no replicate is dropped.
    With a fold column in `after`, each fold's names use that fold's directions and the statistics are means over
    the folds (their names disjoint). gap_* and sd_* decompose the change: the signed gap and the pooled SD.
    """
    directions = bias_directions(before, scale, method, min_valid_mass, contrast) if directions is None else directions
    records = []
    for context, r in _removals(before, [after], directions, scale, method, n_boot, seed, min_valid_mass, contrast):
        before, removed = r.pooled(lambda f: f.before), r.pooled(lambda f: f.removed[0])
        with np.errstate(over="ignore", invalid="ignore"):
            bias_low, bias_high = r.interval(lambda f: f.before, ci, ci_method)
            low, high = r.interval(lambda f: f.removed[0], ci, ci_method)
            pct_low, pct_high = _fieller(removed, before, ci)
        b, d = before.value[0, 0], removed.value[0, 0]
        records.append({
            "context": context, "n_folds": len(r.folds), "n_names": r.n_names,
            "n_variations": r.n_variations, "bias_before": b, "bias_ci_low": bias_low,
            "bias_ci_high": bias_high, "bias_after": b - d, "removed": d, "removed_low": low,
            "removed_high": high, "reduction_pct": 100 * d / b if b else np.nan, "ci_low": 100 * pct_low,
            "ci_high": 100 * pct_high, "gap_before": r.gaps[0], "gap_after": r.gaps[1], "sd_before": r.sds[0],
            "sd_after": r.sds[1],
        })
    return pd.DataFrame(records, columns=REDUCTION_COLUMNS[:-2]).assign(scale=scale, method=method)


def random_comparison(
    before: pd.DataFrame,
    chosen: pd.DataFrame,
    draws: list[pd.DataFrame],
    directions: pd.DataFrame | None = None,
    scale: Scale = "raw",
    method: Method = "mixture",
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    min_valid_mass: float = 0.0,
    ci_method: CIMethod = "studentized",
    contrast: Contrast = RACE,
) -> pd.DataFrame:
    """Per context: the chosen pruning's removed bias (`signed_reduction`) against random prunings of the same
    kind and size measured on the same names, folds and directions.

    rank: how many draws remove at least as much (ties count against the chosen pruning); p_rank = (1 + rank) /
    (1 + n_random), the exact p-value of "the chosen pruning is one more random draw" (uniform over the ranks
    under exchangeability; its smallest value is 1 / (1 + n_random)). difference = removed - mean of the draws'
    removed, with a paired bootstrap interval over the same names (every pruning on the same replicates)."""
    if not draws:
        raise ValueError("random_comparison needs at least one random draw")
    keys = ["context", "variation", "name"]
    fold = chosen[keys].assign(fold=_fold_of(chosen))
    draws = [d.drop(columns="fold", errors="ignore").merge(fold, on=keys) for d in draws]
    directions = bias_directions(before, scale, method, min_valid_mass, contrast) if directions is None else directions
    records = []
    for context, r in _removals(before, [chosen, *draws], directions, scale, method, n_boot, seed, min_valid_mass,
                                contrast):
        def difference(fold: _FoldStatistics) -> _Statistic:
            own, others = fold.removed[0], fold.removed[1:]
            return _Statistic(own.value - sum(o.value for o in others) / len(others),
                              own.linear - sum(o.linear for o in others) / len(others))

        own = r.pooled(lambda f: f.removed[0]).value[0, 0]
        values = np.array([r.pooled(lambda f, i=i: f.removed[i]).value[0, 0] for i in range(1, len(draws) + 1)])
        with np.errstate(over="ignore", invalid="ignore"):
            low, high = r.interval(difference, ci, ci_method)
        rank = int((values >= own - TIE_RTOL * abs(own)).sum())
        records.append({
            "context": context, "n_random": len(values), "removed": own,
            "random_mean": values.mean(), "random_sd": values.std(ddof=1) if len(values) > 1 else np.nan,
            "rank": rank, "p_rank": (1 + rank) / (1 + len(values)) if np.isfinite(own) else np.nan,
            "difference": own - values.mean(), "difference_low": low, "difference_high": high,
        })
    return pd.DataFrame(records, columns=COMPARISON_COLUMNS)


# ---------------------------------------------------------------- permutation null and multiplicity


class Permutation(NamedTuple):
    """permutation_test's result: per (context, variation) and per context."""

    variations: pd.DataFrame  # context, variation, smd, p_perm
    contexts: pd.DataFrame  # context, mean_abs_smd, p_perm, null_mean, null_q95, n_perm


class Significance(NamedTuple):
    """significance_table's (contrast_significance's) result: the bias (contrast) table and the context summary
    with p-values."""

    variations: pd.DataFrame
    contexts: pd.DataFrame


def _shuffled_sides(
    ctx: _Context, contrast: Contrast, n_perm: int, rng: np.random.Generator
) -> Float[np.ndarray, "perm name"]:
    """Side-a membership (0/1) of the contrast's names: row 0 the real labels, then n_perm shuffles of the labels
    across names within each level of contrast.within (for race: race labels within gender)."""
    labels = np.tile(contrast.sides(ctx.race, ctx.gender)[0], (n_perm + 1, 1))
    strata = getattr(ctx, contrast.within) if contrast.within else np.zeros(labels.shape[1])
    for stratum in pd.unique(strata):
        same = strata == stratum
        labels[1:, same] = rng.permuted(labels[1:, same], axis=1)
    return labels.astype(float)


def _permuted_smd(
    ctx: _Context, contrast: Contrast, method: Method, n_perm: int, rng: np.random.Generator
) -> Float[np.ndarray, "perm variation"]:
    """The contrast's SMD per variation under the real labels (row 0) and n_perm shuffles (rows 1...), one
    shuffle for all variations; ctx holds the contrast's names only, so side b is everyone not on side a."""
    side_a = _shuffled_sides(ctx, contrast, n_perm, rng)
    with np.errstate(over="ignore", invalid="ignore"):
        return _smd(_group_moments(side_a, ctx), _group_moments(1 - side_a, ctx), method)


def _permutation_p(
    observed: Float[np.ndarray, " k"], null: Float[np.ndarray, "perm k"], two_sided: bool = True
) -> np.ndarray:
    """p per column: (1 + #{|null| >= |observed|}) / (1 + n_perm), or with null >= observed when one-sided
    (alternative: larger values); NaN where observed is NaN."""
    if two_sided:
        extreme = np.abs(null) >= np.abs(observed) * (1 - TIE_RTOL)
    else:
        extreme = null >= observed - np.abs(observed) * TIE_RTOL
    return np.where(np.isfinite(observed), (1 + extreme.sum(axis=0)) / (1 + null.shape[0]), np.nan)


def permutation_test(
    df: pd.DataFrame,
    scale: Scale = "raw",
    method: Method = "mixture",
    n_perm: int = 2000,
    seed: int = 0,
    min_valid_mass: float = 0.0,
    contrast: Contrast = RACE,
) -> Permutation:
    """Permutation null of the SMD: race labels shuffled across names within gender (or the contrast's labels
    within its strata), the same shuffle for all variations of a context. Per (context, variation): smd and
    two-sided p_perm; per context: mean |SMD|, its p_perm, and the noise floor (null_mean, null_q95: mean and
    95th percentile of the shuffles' mean |SMD|)."""
    rows = _prepare(df, scale, method, min_valid_mass, contrast)
    rng = np.random.default_rng(seed)
    variations, contexts = [], []
    for context, ctx in _contexts(rows, method):
        smd = _permuted_smd(ctx, contrast, method, n_perm, rng)
        mean_abs = _mean_abs(smd)
        null = mean_abs[1:][np.isfinite(mean_abs[1:])]
        variations.append(pd.DataFrame({"context": context, "variation": ctx.variations, "smd": smd[0],
                                        "p_perm": _permutation_p(smd[0], smd[1:])}))
        contexts.append({
            "context": context, "mean_abs_smd": mean_abs[0],
            "p_perm": _permutation_p(mean_abs[:1], mean_abs[1:, None])[0],
            "null_mean": null.mean() if null.size else np.nan,
            "null_q95": np.quantile(null, 0.95) if null.size else np.nan,
            "n_perm": n_perm,
        })
    variation_columns = [*KEYS, "smd", "p_perm"]
    context_columns = ["context", "mean_abs_smd", "p_perm", "null_mean", "null_q95", "n_perm"]
    return Permutation(
        pd.concat(variations, ignore_index=True) if variations else pd.DataFrame(columns=variation_columns),
        pd.DataFrame(contexts, columns=context_columns),
    )


def directional_test(
    df: pd.DataFrame,
    contrast: Contrast,
    scale: Scale = "raw",
    method: Method = "mixture",
    n_boot: int = 1000,
    n_perm: int = 2000,
    seed: int = 0,
    ci: float = 0.95,
    min_valid_mass: float = 0.0,
    ci_method: CIMethod = "studentized",
) -> pd.DataFrame:
    """One-sided test that side a's names get higher numbers than side b's: per (context, variation) the
    contrast's SMD, and per context (variation "all") its mean SMD over the finite variations, each with its
    bootstrap CI and one-sided permutation p_greater (shuffles as in permutation_test: the smd, CI and shuffles
    are those of contrast_table and permutation_test at the same seed)."""
    rows = _prepare(df, scale, method, min_valid_mass, contrast)
    boot_rng, perm_rng = np.random.default_rng(seed), np.random.default_rng(seed)
    frames = []
    for context, ctx in _contexts(rows, method):
        est = _estimate(ctx, contrast, method, n_boot, boot_rng)
        shuffled = _permuted_smd(ctx, contrast, method, n_perm, perm_rng)
        mean = _signed_mean(est.smd_stat, np.ones((1, len(ctx.variations))))
        mean_null = _row_mean(shuffled)
        for variation, stat, null in ((ctx.variations, est.smd_stat, shuffled), (["all"], mean, mean_null[:, None])):
            with np.errstate(over="ignore", invalid="ignore"):
                low, high = _interval(stat, est.counts, ci, ci_method, _strata(est.ctx))
            frames.append(pd.DataFrame({
                "context": context, "variation": variation, "smd": stat.value[0], "ci_low": low, "ci_high": high,
                "p_greater": _permutation_p(null[0], null[1:], two_sided=False),
            }))
    if not frames:
        return pd.DataFrame(columns=DIRECTIONAL_COLUMNS)
    return pd.concat(frames, ignore_index=True)[DIRECTIONAL_COLUMNS]


def adjust_pvalues(p, method: Correction = "holm") -> np.ndarray:
    """Multiplicity-adjusted p-values over the finite entries of p (NaN stays NaN, m = number finite).

    "holm": Holm's step-down, p_(i) -> max_{j <= i} min(1, (m - j + 1) p_(j)); controls the family-wise
    error rate. "bh": Benjamini-Hochberg, p_(i) -> min_{j >= i} min(1, m p_(j) / j); controls the false
    discovery rate.
    """
    _check_choice(method, CORRECTIONS, "correction")
    p = np.asarray(p, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    finite = np.isfinite(p)
    order = np.argsort(p[finite])
    ranked, rank = p[finite][order], np.arange(1, order.size + 1)
    if method == "holm":
        steps = np.maximum.accumulate((order.size - rank + 1) * ranked)
    else:
        steps = np.minimum.accumulate((order.size * ranked / rank)[::-1])[::-1]
    values = np.empty(order.size)
    values[order] = np.minimum(steps, 1.0)
    adjusted[finite] = values
    return adjusted


def _with_adjusted(table: pd.DataFrame, correction: Correction, alpha: float) -> pd.DataFrame:
    """Add p_adjusted over all rows of the table, the correction's name and significant (p_adjusted < alpha)."""
    adjusted = adjust_pvalues(table["p_perm"], correction)
    return table.assign(p_adjusted=adjusted, correction=correction, significant=adjusted < alpha)


def _significance(
    variations: pd.DataFrame, df: pd.DataFrame, contrast: Contrast, n_perm: int, alpha: float,
    correction: Correction, options: dict, bootstrap: dict,
) -> Significance:
    """A contrast's per-variation table with permutation p-values adjusted over all its rows, and its context
    summary with the noise floor and p-values adjusted over the contexts."""
    permuted = permutation_test(df, n_perm=n_perm, seed=bootstrap["seed"], contrast=contrast, **options)
    variations = variations.merge(permuted.variations[[*KEYS, "p_perm"]], on=KEYS, how="left")
    summary = context_summary(df, contrast=contrast, **bootstrap, **options).merge(
        permuted.contexts[["context", "null_mean", "null_q95", "p_perm"]], on="context", how="left")
    summary["above_floor"] = summary["mean_abs_smd"] - summary["null_mean"]
    contexts = _with_adjusted(summary, correction, alpha)
    context_columns = [*SUMMARY_COLUMNS[:-2], *FLOOR_COLUMNS, *SIGNIFICANCE_COLUMNS, "scale", "method"]
    return Significance(_with_adjusted(variations, correction, alpha), contexts[context_columns])


def significance_table(
    df: pd.DataFrame,
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
    """The bias table and the context summary with permutation p-values, adjusted across all rows.

    variations: bias_table's columns + p_perm, p_adjusted (over all variations x contexts tested),
    correction, significant. contexts: context_summary's columns + null_mean, null_q95,
    above_floor = mean_abs_smd - null_mean, p_perm, p_adjusted (over the contexts), correction, significant.
    """
    options = dict(scale=scale, method=method, min_valid_mass=min_valid_mass)
    bootstrap = dict(n_boot=n_boot, seed=seed, ci=ci, ci_method=ci_method)
    variations, contexts = _significance(
        bias_table(df, **bootstrap, **options), df, RACE, n_perm, alpha, correction, options, bootstrap)
    return Significance(variations[BIAS_COLUMNS + SIGNIFICANCE_COLUMNS], contexts)


def contrast_significance(
    df: pd.DataFrame,
    contrast: Contrast = RACE,
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
    """significance_table for any contrast: contrast_table's columns + p_perm, p_adjusted (over all its
    variations x contexts), correction, significant; and its context summary as significance_table's."""
    options = dict(scale=scale, method=method, min_valid_mass=min_valid_mass)
    bootstrap = dict(n_boot=n_boot, seed=seed, ci=ci, ci_method=ci_method)
    variations, contexts = _significance(
        contrast_table(df, contrast, **bootstrap, **options), df, contrast, n_perm, alpha, correction, options,
        bootstrap)
    return Significance(variations[CONTRAST_COLUMNS + SIGNIFICANCE_COLUMNS], contexts)
