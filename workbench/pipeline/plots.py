"""Plotly figures for the audit, localisation, pruning and generalisation results.

Every function takes a result table (the columns of workbench.audit.stats or of workbench.prune.generalize's
summary) or a score array and returns a go.Figure in one style (`TEMPLATE`): white background, one colour for
White names and one for Black names, colour-blind-safe (Okabe-Ito) colours otherwise. A figure that
shows bias says its scale (raw/log) and SMD method in its subtitle; they are read from the table's
`scale` and `method` (bias tables) or `smd_method` (pruning tables) columns, or passed as arguments.
Anomaly rates are fractions in [0, 1]; bias reductions are percentages. Pruning figures grey out the rows
with no reduction to show ("no bias to remove", "nothing pruned") and set every reduction next to the random
draws of the same kind and budget where the table has them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from jaxtyping import Float
from plotly.subplots import make_subplots

RACE_COLOURS = {"white": "#E69F00", "black": "#0072B2"}
RACE_LABELS = {"white": "White names", "black": "Black names"}
RACE_OFFSETS = {"white": -0.15, "black": 0.15}  # White above Black within a variation row
COLOURWAY = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000"]
DIVERGING = "RdBu"
SEQUENTIAL = "Viridis"
FONT = "Arial, 'Liberation Sans', 'DejaVu Sans', sans-serif"
ROW_PX = 26  # height per category row in forest-style figures

AXIS = dict(automargin=True, showline=True, linecolor="#444", gridcolor="#e5e5e5", ticks="outside")
TEMPLATE = go.layout.Template(
    layout=go.Layout(
        paper_bgcolor="white",
        plot_bgcolor="white",
        font=dict(family=FONT, size=14, color="#222"),
        title=dict(font=dict(size=19), x=0.0, xref="paper", xanchor="left",
                   subtitle=dict(font=dict(size=13, color="#555"))),
        colorway=COLOURWAY,
        margin=dict(l=80, r=30, t=100, b=60),
        hoverlabel=dict(font=dict(family=FONT, size=13)),
        legend=dict(bgcolor="rgba(255,255,255,0.8)"),
        xaxis=dict(AXIS, zeroline=False),
        yaxis=dict(AXIS, zerolinecolor="#999"),
    )
)


# ---------------------------------------------------------------- shared helpers

KIND_LABELS = {"mlp_neuron": "neurons", "attn_head": "heads"}


def _require(df: pd.DataFrame, columns: list[str]) -> None:
    """Raise ValueError when df is empty or lacks a column."""
    missing = sorted(set(columns) - set(df.columns))
    if missing:
        raise ValueError(f"missing columns: {missing}")
    if df.empty:
        raise ValueError("no rows to plot")


def _single(df: pd.DataFrame, column: str, given: str | None, what: str) -> str:
    """The one value of df[column] (or `given` when the column is absent); raise if none or several."""
    if column in df.columns and df[column].notna().any():
        values = df[column].dropna().unique()
        if len(values) > 1:
            raise ValueError(f"one {what} per figure, got {sorted(map(str, values))}")
        return str(values[0])
    if given is None:
        raise ValueError(f"say the {what}: add a '{column}' column or pass it as an argument")
    return given


def _scale_text(scale: str) -> str:
    """'scale: raw' or 'scale: log (sign·log1p|x|)'."""
    return "scale: log (sign·log1p|x|)" if scale == "log" else f"scale: {scale}"


def _bias_text(df: pd.DataFrame, method_column: str, scale: str | None, smd_method: str | None) -> str:
    """Subtitle naming the SMD method and the scale of a table that shows bias."""
    method = _single(df, method_column, smd_method, "SMD method")
    return f"SMD method: {method} · {_scale_text(_single(df, 'scale', scale, 'scale'))}"


def _style(fig: go.Figure, title: str, subtitle: str = "", height: int | None = None) -> go.Figure:
    """Apply the template, the title and subtitle, and the height."""
    fig.update_layout(template=TEMPLATE, title=dict(text=title, subtitle=dict(text=subtitle)), height=height)
    return fig


def _errors(df: pd.DataFrame, centre: str) -> dict:
    """Asymmetric error bars from ci_low/ci_high around a centre column."""
    return dict(
        type="data", symmetric=False, array=df["ci_high"] - df[centre], arrayminus=df[centre] - df["ci_low"],
        thickness=1.5, width=4,
    )


def _forest_height(counts: list[int]) -> int:
    """Figure height for stacked forest panels."""
    return 160 + ROW_PX * sum(max(c, 2) for c in counts) + 50 * len(counts)


# ---------------------------------------------------------------- audit


def group_means_figure(group_means_df: pd.DataFrame) -> go.Figure:
    """Mean answer of White and Black names per variation, with CIs; one panel per context.

    Uses the per-race rows (gender "all") of workbench.audit.stats.group_means.
    """
    _require(group_means_df, ["context", "variation", "race", "gender", "mean", "ci_low", "ci_high", "n_names"])
    scale = _single(group_means_df, "scale", None, "scale")
    rows = group_means_df[group_means_df["gender"] == "all"]
    contexts = sorted(rows["context"].unique())
    counts = [rows.loc[rows["context"] == c, "variation"].nunique() for c in contexts]
    height = _forest_height(counts) + 40 * len(contexts)
    fig = make_subplots(rows=len(contexts), cols=1, row_heights=[max(c, 1) for c in counts],
                        subplot_titles=contexts, vertical_spacing=min(0.3, 110 / height))
    for i, context in enumerate(contexts, start=1):
        part = rows[rows["context"] == context]
        variations = sorted(part["variation"].unique())
        for race, offset in RACE_OFFSETS.items():
            fig.add_trace(_group_trace(part[part["race"] == race], variations, race, offset, i == 1), row=i, col=1)
        fig.update_yaxes(tickvals=list(range(len(variations))), ticktext=variations, row=i, col=1)
    fig.update_yaxes(autorange="reversed", showgrid=False, zeroline=False)
    fig.update_xaxes(title_text=f"mean answer ({scale})", row=len(contexts), col=1)
    return _style(fig, "Mean answer by race of the name", _scale_text(scale) + " · 95% CI over names", height)


def _group_trace(part: pd.DataFrame, variations: list[str], race: str, offset: float, showlegend: bool) -> go.Scatter:
    """One race's means as horizontal points with error bars, nudged off its variation's row."""
    position = {v: i + offset for i, v in enumerate(variations)}
    return go.Scatter(
        x=part["mean"], y=part["variation"].map(position), mode="markers", name=RACE_LABELS[race],
        legendgroup=race, showlegend=showlegend, marker=dict(color=RACE_COLOURS[race], size=9),
        error_x=_errors(part, "mean"), customdata=part[["variation", "ci_low", "ci_high", "n_names"]],
        hovertemplate="%{customdata[0]}<br>mean %{x:.4g} [%{customdata[1]:.4g}, %{customdata[2]:.4g}]"
        "<br>%{customdata[3]} names<extra>" + RACE_LABELS[race] + "</extra>",
    )


def smd_figure(bias_df: pd.DataFrame) -> go.Figure:
    """Forest plot of the SMD per variation with CIs, a zero line, one coloured panel per context."""
    _require(bias_df, ["context", "variation", "smd", "ci_low", "ci_high"])
    subtitle = _bias_text(bias_df, "method", None, None) + " · 95% CI · SMD > 0: White names higher"
    contexts = sorted(bias_df["context"].unique())
    counts = [int((bias_df["context"] == c).sum()) for c in contexts]
    fig = make_subplots(rows=len(contexts), cols=1, row_heights=[max(c, 1) for c in counts], shared_xaxes=True,
                        subplot_titles=contexts, vertical_spacing=min(0.3, 70 / _forest_height(counts)))
    for i, context in enumerate(contexts, start=1):
        part = bias_df[bias_df["context"] == context]
        fig.add_trace(go.Scatter(
            x=part["smd"], y=part["variation"], mode="markers", name=context, showlegend=False,
            marker=dict(color=COLOURWAY[(i - 1) % len(COLOURWAY)], size=9), error_x=_errors(part, "smd"),
            customdata=part[["ci_low", "ci_high"]],
            hovertemplate="%{y}<br>SMD %{x:.3f} [%{customdata[0]:.3f}, %{customdata[1]:.3f}]<extra>"
            + context + "</extra>",
        ), row=i, col=1)
    fig.add_vline(x=0, line=dict(color="#444", width=1, dash="dot"), row="all", col=1)
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(title_text="SMD (White − Black)", row=len(contexts), col=1)
    return _style(fig, "Racial bias per variation (SMD)", subtitle, _forest_height(counts))


def context_summary_figure(summary_df: pd.DataFrame) -> go.Figure:
    """Mean |SMD| per context, without an interval (its bootstrap interval cannot cover a true 0); with a
    permutation null (columns null_mean, null_q95, p_adjusted, significant, as in
    `stats.significance_table(...).contexts`) also the noise floor, the adjusted p-value, and the contexts without a
    significant bias greyed; with the held-out signed bias (signed_bias, signed_ci_low, signed_ci_high) that bias
    with its 95 % interval, which is valid at 0."""
    _require(summary_df, ["context", "mean_abs_smd", "n_used"])
    df = summary_df.sort_values("context")
    tested = {"null_mean", "null_q95", "p_adjusted", "significant"} <= set(df.columns)
    colours = (np.where(df["significant"].fillna(False).astype(bool), COLOURWAY[0], GREY) if tested
               else COLOURWAY[0])
    fig = go.Figure(go.Bar(
        x=df["context"], y=df["mean_abs_smd"], marker_color=colours, customdata=df[["n_used"]], name="mean |SMD|",
        text=[f"p adj. {p:.2g}" for p in df["p_adjusted"]] if tested else None, textposition="outside",
        hovertemplate="%{x}<br>mean |SMD| %{y:.3f}<br>%{customdata[0]} variations<extra></extra>",
    ))
    subtitle = _bias_text(df, "method", None, None) + " · no interval for mean |SMD|"
    if tested:
        for column, label, symbol in [("null_mean", "noise floor: null mean", "line-ew"),
                                      ("null_q95", "noise floor: null 95th percentile", "line-ew-open")]:
            fig.add_trace(go.Scatter(
                x=df["context"], y=df[column], mode="markers", name=label,
                marker=dict(symbol=symbol, size=40, line=dict(width=3, color=COLOURWAY[1])),
                hovertemplate="%{x}<br>" + label + " %{y:.3f}<extra></extra>",
            ))
        subtitle += " · grey: not significant"
    if {"signed_bias", "signed_ci_low", "signed_ci_high"} <= set(df.columns):
        signed = df.drop(columns=["ci_low", "ci_high"], errors="ignore").rename(
            columns={"signed_ci_low": "ci_low", "signed_ci_high": "ci_high"})
        fig.add_trace(go.Scatter(
            x=df["context"], y=df["signed_bias"], mode="markers", name="held-out signed bias (95% CI)",
            marker=dict(symbol="diamond", size=12, color=COLOURWAY[3]), error_y=_errors(signed, "signed_bias"),
            customdata=signed[["ci_low", "ci_high"]],
            hovertemplate="%{x}<br>held-out signed bias %{y:.3f} [%{customdata[0]:.3f}, %{customdata[1]:.3f}]"
            "<extra></extra>",
        ))
        subtitle += " · ◆ held-out signed bias, 95% CI"
    fig.update_yaxes(title_text="mean |SMD| · signed bias", zeroline=True)
    fig.update_xaxes(title_text="context")
    return _style(fig, "Bias per context (mean |SMD| over variations) against its permutation noise floor"
                  if tested else "Bias per context (mean |SMD| over variations)", subtitle, 480)


# ---------------------------------------------------------------- localisation


def _colour_scale(scores: np.ndarray, mid_key: str) -> dict:
    """Diverging scale centred at 0 (under mid_key) when scores have both signs, sequential otherwise."""
    finite = scores[np.isfinite(scores)]
    if finite.size and finite.min() < 0 < finite.max():
        return {"colorscale": DIVERGING, "reversescale": True, mid_key: 0.0}
    return {"colorscale": SEQUENTIAL}


def head_heatmap(scores: Float[np.ndarray, "layer head"], title: str) -> go.Figure:
    """Layer x head heatmap of attention-head scores."""
    scores = np.asarray(scores, dtype=float)
    n_layers, n_heads = scores.shape
    fig = go.Figure(go.Heatmap(
        z=scores, x=np.arange(n_heads), y=np.arange(n_layers), colorbar=dict(title="score"),
        hovertemplate="L%{y}H%{x}: %{z:.4g}<extra></extra>", **_colour_scale(scores, "zmid"),
    ))
    fig.update_xaxes(title_text="head", showgrid=False, dtick=1 if n_heads <= 32 else None)
    fig.update_yaxes(title_text="layer", showgrid=False, dtick=1 if n_layers <= 32 else None)
    return _style(fig, title, height=max(380, 160 + 18 * n_layers))


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Per row, the column indices of the k largest |scores| (NaN last), largest first."""
    magnitude = np.where(np.isfinite(scores), np.abs(scores), -np.inf)
    return np.argsort(-magnitude, axis=1, kind="stable")[:, :k]


def top_neurons_figure(
    scores: Float[np.ndarray, "layer d_mlp"], k: int = 10, title: str = "Top neurons"
) -> go.Figure:
    """For each layer, the k neurons with the largest |score|: layer on x, score on y, hover L{l}N{i}."""
    scores = np.asarray(scores, dtype=float)
    index = _top_k(scores, k)
    layers = np.repeat(np.arange(scores.shape[0]), index.shape[1])
    neurons = index.ravel()
    values = scores[layers, neurons]
    fig = go.Figure(go.Scatter(
        x=layers, y=values, mode="markers", text=[f"L{l}N{n}" for l, n in zip(layers, neurons)],
        hovertemplate="%{text}: %{y:.4g}<extra></extra>",
        marker=dict(size=8, color=values, colorbar=dict(title="score"), line=dict(width=0.5, color="#333"),
                    **_colour_scale(values, "cmid")),
    ))
    fig.add_hline(y=0, line=dict(color="#444", width=1, dash="dot"))
    fig.update_xaxes(title_text="layer", dtick=1 if scores.shape[0] <= 32 else None)
    fig.update_yaxes(title_text="score")
    return _style(fig, title, f"top {index.shape[1]} neurons per layer by |score|", 480)


# ---------------------------------------------------------------- pruning and generalisation


GREY = "#d9d9d9"


def _status(df: pd.DataFrame) -> pd.Series:
    """Why a row has no reduction to show: "no bias to remove" (column bias_to_remove false), "nothing pruned"
    (n_pruned_mean 0), or "" (both columns are optional)."""
    status = pd.Series("", index=df.index)
    if "n_pruned_mean" in df:
        status = status.mask(df["n_pruned_mean"] == 0, "nothing pruned")
    if "bias_to_remove" in df:
        status = status.mask(~df["bias_to_remove"].astype(bool), "no bias to remove")
    return status


def _random_text(df: pd.DataFrame) -> list[str]:
    """'<br>random 5 ± 3%' per row where the random draws' mean is known, else ''."""
    if "random_mean" not in df:
        return [""] * len(df)
    spread = df["random_sd"] if "random_sd" in df else pd.Series(np.nan, index=df.index)
    means = df["random_mean"].astype(float)
    return ["" if not np.isfinite(m) else f"<br>random {m:.0f}%" if not np.isfinite(sd) else
            f"<br>random {m:.0f} ± {sd:.0f}%" for m, sd in zip(means, spread.astype(float))]


def budget_curve_figure(
    sweep_df: pd.DataFrame, scale: str | None = None, smd_method: str | None = None
) -> go.Figure:
    """Bias reduction (%, with CI) and anomaly rate against the fraction of components pruned, one colour per
    kind, so neurons and heads compare at matched budgets.

    The random draws of the same kind and size (random_mean ± random_sd, optional columns) are a dashed line of
    the kind's colour; rows without a reduction ("no bias to remove", "nothing pruned": see `_status`) are grey
    crosses at 0."""
    _require(sweep_df, ["kind", "fraction", "reduction_pct", "ci_low", "ci_high", "anomaly_rate"])
    subtitle = _bias_text(sweep_df, "smd_method", scale, smd_method) + " · 95% CI · dashed: random components"
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.65, 0.35], vertical_spacing=0.08)
    df = sweep_df.assign(status=_status(sweep_df)).sort_values("fraction")
    for i, (kind, part) in enumerate(df.groupby("kind", sort=True)):
        colour = COLOURWAY[i % len(COLOURWAY)]
        shown, greyed = part[part["status"] == ""], part[part["status"] != ""]
        fig.add_trace(go.Scatter(
            x=shown["fraction"], y=shown["reduction_pct"], mode="lines+markers", name=str(kind), legendgroup=kind,
            line=dict(color=colour), error_y=_errors(shown, "reduction_pct"),
            customdata=shown[["ci_low", "ci_high"]],
            hovertemplate="%{x:.2%} pruned<br>reduction %{y:.0f}% [%{customdata[0]:.0f}, %{customdata[1]:.0f}]"
            "<extra>%{fullData.name}</extra>",
        ), row=1, col=1)
        if "random_mean" in part and part["random_mean"].notna().any():
            spread = part["random_sd"] if "random_sd" in part else None
            fig.add_trace(go.Scatter(
                x=part["fraction"], y=part["random_mean"], mode="lines+markers", name=f"{kind} · random",
                legendgroup=kind, line=dict(color=colour, dash="dash"), marker=dict(symbol="circle-open"),
                error_y=None if spread is None else dict(type="data", array=spread, thickness=1, width=3),
                hovertemplate="%{x:.2%} pruned at random<br>reduction %{y:.0f}%<extra>%{fullData.name}</extra>",
            ), row=1, col=1)
        if len(greyed):
            fig.add_trace(go.Scatter(
                x=greyed["fraction"], y=[0.0] * len(greyed), mode="markers", name=f"{kind} · no reduction",
                legendgroup=kind, marker=dict(color=GREY, symbol="x", size=10, line=dict(color="#777", width=1)),
                text=greyed["status"], hovertemplate="%{x:.2%} pruned: %{text}<extra>%{fullData.name}</extra>",
            ), row=1, col=1)
        fig.add_trace(go.Scatter(
            x=part["fraction"], y=part["anomaly_rate"], mode="lines+markers", name=str(kind), legendgroup=kind,
            showlegend=False, line=dict(color=colour),
            hovertemplate="%{x:.2%} pruned<br>anomaly %{y:.1%}<extra>%{fullData.name}</extra>",
        ), row=2, col=1)
    fig.add_hline(y=0, line=dict(color="#444", width=1, dash="dot"), row=1, col=1)
    fig.update_yaxes(title_text="bias reduction (%)", row=1, col=1)
    fig.update_yaxes(title_text="anomaly rate", tickformat=".0%", rangemode="tozero", row=2, col=1)
    fig.update_xaxes(title_text="fraction of components pruned", tickformat=".1%", row=2, col=1)
    return _style(fig, "Bias reduction against pruning budget", subtitle, 620)


def _cell_text(df: pd.DataFrame) -> list[str]:
    """'42% [30, 55]<br>random 5 ± 3%<br>anom. 3%' per matrix cell (the random line where known), below the
    status where a cell has one (a measured cell without a significant bias keeps its numbers, greyed)."""
    return [
        "<br>".join(filter(None, [status, f"{r:.0f}% [{lo:.0f}, {hi:.0f}]{rand}<br>anom. {a:.0%}"
                                  if np.isfinite(r) else "" if status else "n/a"]))
        for r, lo, hi, rand, a, status in zip(df["reduction_pct"].astype(float), df["ci_low"], df["ci_high"],
                                              _random_text(df), df["anomaly_rate"], _status(df))
    ]


def _grid(part: pd.DataFrame, column: str, sources: list[str], targets: list[str], fill) -> np.ndarray:
    """One column of the panel's rows as a sources x targets array (fill where a cell has no row)."""
    shaped = part.set_index(["source", "target"])[column].reindex(pd.MultiIndex.from_product([sources, targets]))
    return shaped.fillna(fill).to_numpy(object).reshape(len(sources), len(targets))


def _matrix_traces(part: pd.DataFrame, sources: list[str], targets: list[str]) -> list[go.Heatmap]:
    """One source x target heatmap of reduction_pct with CI, random and anomaly text in each cell; cells with a
    status (`_status`) grey underneath, with the status as their text."""
    cells = part.assign(text=_cell_text(part), status=_status(part))
    cells = cells.assign(shown=cells["reduction_pct"].where(cells["status"] == ""),
                         greyed=np.where(cells["status"] != "", 1.0, np.nan))
    hover = "pruned for %{y}<br>evaluated on %{x}<br>%{text}<extra></extra>"
    traces = [go.Heatmap(
        z=_grid(cells, "shown", sources, targets, np.nan).astype(float), x=targets, y=sources,
        text=_grid(cells, "text", sources, targets, ""), texttemplate="%{text}", textfont=dict(size=12),
        coloraxis="coloraxis", hovertemplate=hover,
    )]
    if (cells["status"] != "").any():
        traces.insert(0, go.Heatmap(  # plotly writes no text on a cell whose value is missing: the grey layer does
            z=_grid(cells, "greyed", sources, targets, np.nan).astype(float), x=targets, y=sources,
            text=_grid(cells.assign(text=cells["text"].where(cells["status"] != "", "")), "text", sources, targets, ""),
            texttemplate="%{text}", textfont=dict(size=12, color="#444"),
            colorscale=[[0, GREY], [1, GREY]], showscale=False, hoverinfo="skip",
        ))
    return traces


def generalization_matrix_figure(
    matrix_df: pd.DataFrame, scale: str | None = None, smd_method: str | None = None,
    title: str = "Generalisation of pruning: relative bias reduction",
) -> go.Figure:
    """Relative bias reduction (%) when pruning for a source and evaluating on a target context.

    One heatmap panel per (regime, kind), sharing a colour scale centred at 0; each cell shows the reduction,
    its CI, the random draws' reduction at the same kind and budget (columns random_mean, random_sd, optional)
    and the anomaly rate. Random draws and the budget sweep are not panels; where the table has held-out rows
    (column held_out) only those are shown. Cells with "no bias to remove" or "nothing pruned" are grey.
    """
    _require(matrix_df, ["source", "target", "reduction_pct", "ci_low", "ci_high", "anomaly_rate", "regime",
                         "kind"])
    subtitle = _bias_text(matrix_df, "smd_method", scale, smd_method) + " · cell: reduction [95% CI], anomaly"
    shown = matrix_df[~matrix_df["regime"].isin(["random", "sweep"])]
    if "held_out" in shown and shown["held_out"].fillna(False).astype(bool).any():
        shown = shown[shown["held_out"].fillna(False).astype(bool)]
    _require(shown, ["source"])
    panels = list(shown.groupby(["regime", "kind"], sort=True))
    sources, targets = sorted(shown["source"].unique()), sorted(shown["target"].unique())
    titles = [f"{regime}<br>{KIND_LABELS.get(kind, kind)}" for (regime, kind), _ in panels]
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=titles,
                        shared_yaxes=True, horizontal_spacing=0.04)
    for i, (_, part) in enumerate(panels, start=1):
        for trace in _matrix_traces(part, sources, targets):
            fig.add_trace(trace, row=1, col=i)
        fig.update_xaxes(title_text="evaluated on", row=1, col=i)
    # colours saturate at +-100 %: a cell with almost no bias before pruning can show huge relative changes
    values = shown["reduction_pct"].where(_status(shown) == "").to_numpy(float)
    limit = min(100.0, float(np.nanmax(np.abs(values), initial=1.0)))
    fig.update_layout(coloraxis=dict(colorscale=DIVERGING, cmid=0.0, cmin=-limit, cmax=limit,
                                     colorbar=dict(title="reduction %")))
    fig.update_yaxes(title_text="pruned for", autorange="reversed", row=1, col=1)
    fig.update_yaxes(autorange="reversed")
    width = 220 + len(panels) * (130 * len(targets) + 40)
    fig.update_layout(width=max(width, 700), margin=dict(t=170))  # room for the two-line panel titles
    return _style(fig, title, subtitle, 310 + 90 * len(sources))


def cross_type_figure(
    cross_type_df: pd.DataFrame, scale: str | None = None, smd_method: str | None = None
) -> go.Figure:
    """The cross-type matrix as the generalisation matrix's figure: one panel per kind, pruned for a bias type
    (rows) and evaluated on a bias type (columns); a target type without a significant bias (column
    target_significant) is grey with the note "no bias to remove"."""
    _require(cross_type_df, ["source_type", "target_type", "target_significant"])
    table = cross_type_df.rename(columns={"source_type": "source", "target_type": "target"})
    table = table.assign(regime=np.where(table["source"].str.startswith("random"), "random", "cross_type"),
                         bias_to_remove=table["target_significant"].fillna(False).astype(bool))
    return generalization_matrix_figure(table, scale, smd_method,
                                        title="Does a pruning for one bias type touch another? Relative reduction")


def bias_vs_anomaly_figure(
    df: pd.DataFrame, scale: str | None = None, smd_method: str | None = None
) -> go.Figure:
    """Bias reduction (%) against anomaly rate, one point per pruned model, one colour per kind."""
    _require(df, ["label", "reduction_pct", "anomaly_rate", "kind"])
    subtitle = _bias_text(df, "smd_method", scale, smd_method) + " · one point per pruned model"
    fig = go.Figure()
    for kind, part in df.groupby("kind", sort=True):
        fig.add_trace(go.Scatter(
            x=part["anomaly_rate"], y=part["reduction_pct"], mode="markers", name=str(kind),
            text=part["label"], marker=dict(size=10, line=dict(width=0.5, color="#333")),
            hovertemplate="%{text}<br>reduction %{y:.1f}%<br>anomaly %{x:.1%}<extra>%{fullData.name}</extra>",
        ))
    fig.add_hline(y=0, line=dict(color="#444", width=1, dash="dot"))
    fig.update_xaxes(title_text="anomaly rate", tickformat=".0%", rangemode="tozero")
    fig.update_yaxes(title_text="bias reduction (%)")
    return _style(fig, "Bias reduction against anomaly rate", subtitle, 520)


COSTS = {"kl_on_neutral": "KL on neutral text (nats)", "capability_lost": "capability lost (share)",
         "probe_auc_after": "race probe AUC after"}


def removal_vs_cost_figure(panel: pd.DataFrame, scale: str | None = None, smd_method: str | None = None
                           ) -> go.Figure:
    """Bias removed (SMD, with its 95 % interval) against three anomaly costs, one point per intervention: the
    context-level pruning or edit on held-out names next to its random control."""
    _require(panel, ["intervention", "removed", "removed_low", "removed_high", *COSTS])
    fig = make_subplots(rows=1, cols=len(COSTS), shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=list(COSTS.values()))
    palette = px.colors.qualitative.Dark24
    for i, row in enumerate(panel.itertuples()):
        for col, cost in enumerate(COSTS, start=1):
            fig.add_trace(go.Scatter(
                x=[getattr(row, cost)], y=[row.removed], mode="markers", name=row.intervention,
                legendgroup=row.intervention, showlegend=col == 1,
                marker=dict(size=11, color=palette[i % len(palette)],
                            symbol="x" if "random" in row.intervention else "circle"),
                error_y=dict(type="data", symmetric=False, array=[row.removed_high - row.removed],
                             arrayminus=[row.removed - row.removed_low], thickness=1.2, width=3),
                hovertemplate=f"{row.intervention}<br>removed %{{y:.3f}}<br>{cost} %{{x:.3f}}<extra></extra>"), 1, col)
    fig.add_hline(y=0, line=dict(color="#444", width=1, dash="dot"))
    if "bias_before" in panel and panel.bias_before.notna().any():
        fig.add_hline(y=float(panel.bias_before.dropna().iloc[0]), line=dict(color="#b22", width=1, dash="dash"),
                      annotation_text="all of the bias", annotation_position="top left")
    fig.update_yaxes(title_text="bias removed (SMD)", row=1, col=1)
    subtitle = (_bias_text(panel, "smd_method", scale, smd_method) + " · held-out names (x: a random draw)"
                " · probe 0.5 = chance")
    return _style(fig, "Bias removed against anomaly cost: pruning and direction edits", subtitle, 520)
