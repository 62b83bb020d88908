"""Bias statistics: the SMD between White- and Black-name answers, with CIs from resampling names.

Input: a DataFrame with one row per (context, variation, name) and columns context, variation, name,
race ("white"/"black"), gender ("man"/"woman"), values and weights (float arrays of equal length;
weights are non-negative and are normalised within a row). Non-finite values are dropped and counted
(`n_nonfinite`); a row left with no weight is invalid: it is excluded and counted (`n_invalid`).

SMD methods (positive SMD = White answers higher):
- "mixture": the paper's pooled-sample SMD in its infinite-sample limit. Each group is the
  equal-weight mixture of its names' answer distributions; SMD = (m_W - m_B) / sqrt((v_W + v_B) / 2).
- "pooled_winsorized": the reproduction's variant. Values are winsorised at the 5 % / 95 % quantiles
  of the pooled mixture of all names of the variation, and the denominator is the df-weighted pooled
  SD sqrt(((n_W - 1) v_W + (n_B - 1) v_B) / (n_W + n_B - 2)), n = number of names. The winsorising
  limits are fixed at their full-sample values in the bootstrap.
Scales: "raw" values, or "log" = sign(x) * log1p(|x|), applied before anything else.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from jaxtyping import Float
from scipy import stats as sps

Scale = Literal["raw", "log"]
Method = Literal["mixture", "pooled_winsorized"]
SCALES = ("raw", "log")
METHODS = ("mixture", "pooled_winsorized")
RACES = ("white", "black")
REQUIRED_COLUMNS = ("context", "variation", "name", "race", "gender", "values", "weights")
WINSOR_QUANTILES = (0.05, 0.95)
ZERO_VARIANCE_RTOL = 1e-10
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

Matrix = Float[np.ndarray, "rep variation"]


# ---------------------------------------------------------------- per-row preparation


def transform(values: Float[np.ndarray, " n"], scale: Scale) -> Float[np.ndarray, " n"]:
    """Apply the scale: identity for "raw", sign(x) * log1p(|x|) for "log"."""
    if scale == "raw":
        return values
    return np.sign(values) * np.log1p(np.abs(values))


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


def _prepare(df: pd.DataFrame, scale: Scale, method: Method = "mixture") -> pd.DataFrame:
    """Validate the input and add columns x, p, n_values, n_nonfinite, valid, mean, var."""
    _check_input(df, scale, method)
    rows = df.reset_index(drop=True).copy()
    cleaned = [_clean_row(v, w, scale) for v, w in zip(rows["values"], rows["weights"])]
    rows["x"] = [c[0] for c in cleaned]
    rows["p"] = [c[1] for c in cleaned]
    rows["n_nonfinite"] = [c[2] for c in cleaned]
    rows["n_values"] = [c[0].size for c in cleaned]
    rows["valid"] = rows["n_values"] > 0
    return _with_moments(rows)


def _check_input(df: pd.DataFrame, scale: Scale, method: Method) -> None:
    """Raise ValueError when the input breaks the data contract."""
    missing = set(REQUIRED_COLUMNS) - set(df.columns)
    if missing:
        raise ValueError(f"missing columns: {sorted(missing)}")
    if scale not in SCALES or method not in METHODS:
        raise ValueError(f"scale must be one of {SCALES}, method one of {METHODS}")
    if not df["race"].isin(RACES).all():
        raise ValueError(f"race must be one of {RACES}")
    if df.duplicated(["context", "variation", "name"]).any():
        raise ValueError("more than one row per (context, variation, name)")


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
    n_white: int
    n_black: int
    centre: Float[np.ndarray, " variation"]
    mean: Float[np.ndarray, "name variation"]  # centred, 0 where invalid
    second: Float[np.ndarray, "name variation"]  # var + centred mean^2, 0 where invalid
    valid: Float[np.ndarray, "name variation"]


def _context_arrays(rows: pd.DataFrame) -> _Context:
    """Pivot one context's rows (with moments) into names x variations arrays."""
    white = sorted(rows.loc[rows["race"] == "white", "name"].unique())
    black = sorted(rows.loc[rows["race"] == "black", "name"].unique())
    variations = sorted(rows["variation"].unique())

    def pivot(column: str) -> pd.DataFrame:
        table = rows.pivot(index="name", columns="variation", values=column)
        return table.reindex(index=white + black, columns=variations)

    valid = pivot("valid").eq(True)
    means = pivot("mean").where(valid)
    centre = means.median().fillna(0.0)
    centred = (means - centre).fillna(0.0)
    second = (pivot("var").where(valid).fillna(0.0) + centred**2).to_numpy(float)
    return _Context(
        variations, len(white), len(black), centre.to_numpy(float), centred.to_numpy(float), second,
        valid.to_numpy(float),
    )


def _group_moments(counts: Float[np.ndarray, "rep name"], ctx: _Context) -> GroupMoments:
    """Mixture moments for each replicate; counts[r, i] = how often name i is drawn in replicate r."""
    return _moments_from_sums(counts @ ctx.valid, counts @ ctx.mean, counts @ ctx.second)


def smd_mixture(white: GroupMoments, black: GroupMoments) -> Matrix:
    """The paper's SMD (infinite-sample limit): (m_W - m_B) / sqrt((v_W + v_B) / 2)."""
    return _standardise(white, black, (white.var + black.var) / 2)


def smd_pooled_winsorized(white: GroupMoments, black: GroupMoments) -> Matrix:
    """The reproduction's SMD: df-weighted pooled SD over names (pass moments of winsorised data)."""
    dof = white.n + black.n - 2
    pooled = _safe_div((white.n - 1) * white.var + (black.n - 1) * black.var, dof)
    return _standardise(white, black, pooled)


def _standardise(white: GroupMoments, black: GroupMoments, pooled_var: Matrix) -> Matrix:
    """Mean difference over sqrt(pooled_var); NaN where the variance is (numerically) zero."""
    reference = ZERO_VARIANCE_RTOL * (white.second + black.second)
    usable = pooled_var > reference
    return _safe_div(white.mean - black.mean, np.sqrt(np.where(usable, pooled_var, 0.0)))


_SMD = {"mixture": smd_mixture, "pooled_winsorized": smd_pooled_winsorized}


# ---------------------------------------------------------------- bootstrap


def _resample_counts(rng: np.random.Generator, n_boot: int, n: int) -> Float[np.ndarray, "rep n"]:
    """How often each of n names is drawn when resampling n names with replacement, per replicate."""
    if n == 0:
        return np.zeros((n_boot, 0))
    picks = rng.integers(0, n, size=(n_boot, n)) + n * np.arange(n_boot)[:, None]
    return np.bincount(picks.ravel(), minlength=n_boot * n).reshape(n_boot, n).astype(float)


def _group_counts(ctx: _Context, white: np.ndarray, black: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Embed per-race name counts into full-width (rep, name) count matrices."""
    reps = white.shape[0]
    zeros_white, zeros_black = np.zeros((reps, ctx.n_white)), np.zeros((reps, ctx.n_black))
    return np.hstack([white, zeros_black]), np.hstack([zeros_white, black])


@dataclass(frozen=True)
class _Estimate:
    """Point estimate and bootstrap replicates of the SMD for one context."""

    ctx: _Context
    white: GroupMoments  # point estimate, shape (1, variation)
    black: GroupMoments
    smd: Float[np.ndarray, " variation"]
    replicates: Float[np.ndarray, "rep variation"]


def _estimate(ctx: _Context, method: Method, n_boot: int, rng: np.random.Generator) -> _Estimate:
    """SMD per variation; each replicate resamples names within race, shared by all variations."""
    smd = _SMD[method]
    ones = _group_counts(ctx, np.ones((1, ctx.n_white)), np.ones((1, ctx.n_black)))
    white, black = (_group_moments(c, ctx) for c in ones)
    draws = _group_counts(
        ctx, _resample_counts(rng, n_boot, ctx.n_white), _resample_counts(rng, n_boot, ctx.n_black)
    )
    replicates = smd(*(_group_moments(c, ctx) for c in draws))
    return _Estimate(ctx, white, black, smd(white, black)[0], replicates)


def _estimates(
    rows: pd.DataFrame, method: Method, n_boot: int, seed: int
) -> Iterator[tuple[str, _Estimate]]:
    """Yield (context, estimate) for prepared rows in sorted context order, from one seeded generator."""
    if method == "pooled_winsorized":
        rows = _winsorize(rows)
    rng = np.random.default_rng(seed)
    for context, group in rows.groupby("context", sort=True):
        yield context, _estimate(_context_arrays(group), method, n_boot, rng)


def _percentile_ci(replicates: Float[np.ndarray, "rep k"], ci: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval per column over the finite replicates (NaN when there are none)."""
    tail = 100 * (1 - ci) / 2
    bounds = [
        np.percentile(col[np.isfinite(col)], [tail, 100 - tail]) if np.isfinite(col).any() else [np.nan] * 2
        for col in replicates.T
    ]
    bounds = np.asarray(bounds, dtype=float).reshape(-1, 2)
    return bounds[:, 0], bounds[:, 1]


# ---------------------------------------------------------------- tables


def _note(n_white: float, n_black: float, smd: float, method: Method, overflow: bool = False) -> str:
    """Why an SMD is missing, or "" when it is not."""
    if overflow and n_white and n_black:
        return "variance overflow: answers too large for the raw scale, use the log scale"
    if n_white == 0 and n_black == 0:
        return "no valid answers"
    if n_white == 0 or n_black == 0:
        return f"no valid answers for {'white' if n_white == 0 else 'black'}"
    if method == "pooled_winsorized" and n_white + n_black <= 2:
        return "too few names for pooled SD"
    return "zero variance" if np.isnan(smd) else ""


def _row_counts(rows: pd.DataFrame) -> pd.DataFrame:
    """Invalid rows and dropped non-finite values per (context, variation)."""
    counts = rows.assign(invalid=~rows["valid"]).groupby(KEYS)[["invalid", "n_nonfinite"]].sum()
    return counts.rename(columns={"invalid": "n_invalid"}).reset_index()


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


def _bias_rows(context: str, est: _Estimate, method: Method, ci: float) -> pd.DataFrame:
    """The bias table rows of one context."""
    low, high = _percentile_ci(est.replicates, ci)
    n_white, n_black = est.white.n[0], est.black.n[0]
    return pd.DataFrame({
        "context": context,
        "variation": est.ctx.variations,
        "smd": est.smd,
        "ci_low": low,
        "ci_high": high,
        "n_white": n_white.astype(int),
        "n_black": n_black.astype(int),
        "mean_white": est.white.mean[0] + est.ctx.centre,
        "mean_black": est.black.mean[0] + est.ctx.centre,
        "note": [_note(w, b, s, method, overflow)
                 for w, b, s, overflow in zip(n_white, n_black, est.smd, _overflowed(est))],
    })


def _overflowed(est: _Estimate) -> np.ndarray:
    """Variations whose second moments overflowed float64 (answers too large for the raw scale)."""
    return ~(np.isfinite(est.white.second[0]) & np.isfinite(est.black.second[0]))


def bias_table(
    df: pd.DataFrame,
    scale: Scale = "raw",
    method: Method = "mixture",
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> pd.DataFrame:
    """One row per (context, variation): SMD with bootstrap CI, counts, group means and tests.

    mean_white/mean_black are the method's group means (winsorised for "pooled_winsorized");
    p_mwu and wasserstein use the unwinsorised values on the chosen scale.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        rows = _prepare(df, scale, method)
        frames = [_bias_rows(c, est, method, ci) for c, est in _estimates(rows, method, n_boot, seed)]
    if not frames:
        return pd.DataFrame(columns=BIAS_COLUMNS)
    table = pd.concat(frames, ignore_index=True)
    table = table.merge(_row_counts(rows), on=KEYS).merge(_distribution_tests(rows), on=KEYS, how="left")
    return table.assign(scale=scale, method=method)[BIAS_COLUMNS]


def _mean_abs(smd: Float[np.ndarray, "rep variation"]) -> Float[np.ndarray, " rep"]:
    """Mean |SMD| over the finite entries of each row (NaN when none)."""
    finite = np.isfinite(smd)
    return _safe_div(np.where(finite, np.abs(smd), 0.0).sum(axis=1), finite.sum(axis=1))


def context_summary(
    df: pd.DataFrame,
    scale: Scale = "raw",
    method: Method = "mixture",
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> pd.DataFrame:
    """One row per context: mean |SMD| over its variations, CI from the same name resampling."""
    records = []
    for context, est in _estimates(_prepare(df, scale, method), method, n_boot, seed):
        low, high = _percentile_ci(_mean_abs(est.replicates)[:, None], ci)
        records.append({
            "context": context,
            "mean_abs_smd": _mean_abs(est.smd[None, :])[0],
            "ci_low": low[0],
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
    df: pd.DataFrame, scale: Scale = "raw", n_boot: int = 1000, seed: int = 0, ci: float = 0.95
) -> pd.DataFrame:
    """Mean of the names' expected values per (context, variation, race, gender) and per race.

    Race-level rows have gender "all". CIs resample names within each row's group.
    """
    rows = _prepare(df, scale)
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


def bias_reduction(
    before: pd.DataFrame,
    after: pd.DataFrame,
    scale: Scale = "raw",
    method: Method = "mixture",
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> pd.DataFrame:
    """Per context: mean |SMD| before and after pruning and the relative reduction in %, with paired CIs.

    Both tables must hold the same names and variations: each bootstrap replicate resamples the same names
    for both (same seed, same order), so the CI of the reduction reflects the pairing.
    """
    keys = ["context", "variation", "name"]
    if sorted(map(tuple, before[keys].values)) != sorted(map(tuple, after[keys].values)):
        raise ValueError("bias_reduction needs the same (context, variation, name) rows before and after")
    records = []
    paired = zip(_estimates(_prepare(before, scale, method), method, n_boot, seed),
                 _estimates(_prepare(after, scale, method), method, n_boot, seed))
    for (context, est_before), (_, est_after) in paired:
        point_before = _mean_abs(est_before.smd[None, :])[0]
        point_after = _mean_abs(est_after.smd[None, :])[0]
        rep_before, rep_after = _mean_abs(est_before.replicates), _mean_abs(est_after.replicates)
        reduction = 100 * _safe_div(rep_before - rep_after, rep_before)
        low, high = _percentile_ci(reduction[:, None], ci)
        records.append({
            "context": context,
            "bias_before": point_before,
            "bias_after": point_after,
            "reduction_pct": 100 * _safe_div(point_before - point_after, point_before),
            "ci_low": low[0],
            "ci_high": high[0],
            "n_variations": len(est_before.ctx.variations),
        })
    return pd.DataFrame(records).assign(scale=scale, method=method)
