"""Plotly figures for the audit, localisation, pruning and generalisation results.

Every function takes a result table (the columns of workbench.audit.stats or of workbench.prune.generalize's
summary) or a score array and returns a go.Figure in one style (`TEMPLATE`): white background, one colour for
White names and one for Black names, colour-blind-safe (Okabe-Ito) colours otherwise. A figure that
shows bias says its scale (raw/log) and SMD method in its subtitle; they are read from the table's
`scale` and `method` (bias tables) or `smd_method` (pruning tables) columns, or passed as arguments.
Anomaly rates are fractions in [0, 1]; bias reductions are percentages. Grey means one thing in every figure:
not measured (NaN, an unpatched head, a cell with "no bias to remove" or "nothing pruned" and no reduction), and
the figure says so. Matrix cells are coloured by where their 95 % CI lies, not by the point estimate, and set
next to the random draws of the same kind and budget where the table has them. Answers can be shown on their
own axis, in their unit (`units`: context -> "$", "%", ...), log-scale values back-transformed.
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
PALE = "#A6CEE3"
"""A measured value that is not significant (grey is kept for "not measured")."""
DIVERGING = "RdBu"
SEQUENTIAL = "Viridis"
FONT = "Arial, 'Liberation Sans', 'DejaVu Sans', sans-serif"
ROW_PX = 26  # height per category row in forest-style figures
GREY = "#d9d9d9"  # the one meaning of grey: not measured (NaN, not patched, no bias to remove)

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


SUBTITLE_LINE = 95
"""Characters per subtitle line: longer subtitles break at their " · " separators, so that an 800 px PNG shows
them whole."""


def _wrapped(subtitle: str) -> str:
    """The subtitle with a line break before each " · " part that would run past SUBTITLE_LINE characters."""
    lines = [""]
    for part in subtitle.split(" · "):
        if lines[-1] and len(lines[-1]) + 3 + len(part) > SUBTITLE_LINE:
            lines.append(part)
        else:
            lines[-1] = f"{lines[-1]} · {part}" if lines[-1] else part
    return "<br>".join(lines)


def _style(fig: go.Figure, title: str, subtitle: str = "", height: int | None = None) -> go.Figure:
    """Apply the template, the title and (wrapped) subtitle, and the height."""
    wrapped = _wrapped(subtitle)
    extra = 20 * wrapped.count("<br>")  # each further subtitle line pushes the plot down
    fig.update_layout(template=TEMPLATE, title=dict(text=title, subtitle=dict(text=wrapped)),
                      height=height + extra if height else None, margin=dict(t=100 + extra))
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


# ---------------------------------------------------------------- answers on their own axis

GROUP_STYLES = {  # (race, gender): label, colour, offset within a variation row
    ("white", "man"): ("White men", "#E69F00", -0.27), ("white", "woman"): ("White women", "#D55E00", -0.09),
    ("black", "man"): ("Black men", "#0072B2", 0.09), ("black", "woman"): ("Black women", "#56B4E9", 0.27),
}
ANSWER_UNITS = {"dollars": "$", "percent": "%", "hours": "hours", "probability": "probability",
                "rank": "101 − rank"}
BACK_TRANSFORM = "log-scale values back-transformed: sign(y)·(e^|y| − 1)"


def answer_value(values: Float[np.ndarray, " n"], scale: str) -> Float[np.ndarray, " n"]:
    """Values of the audit's scale as answers: sign(y)(exp|y| - 1) on the log scale, unchanged on the raw one."""
    values = np.asarray(values, dtype=float)
    return np.sign(values) * np.expm1(np.abs(values)) if scale == "log" else values


def format_answer(value: float, unit: str = "") -> str:
    """'$41,300', '12.5%', '3.25 hours' or 'n/a'."""
    if not np.isfinite(value):
        return "n/a"
    number = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return {"$": f"${number}", "%": f"{number}%"}.get(unit, f"{number} {unit}".strip())


def _unit_axis(unit: str | None, what: str, scale: str) -> dict:
    """x-axis title and tick affixes: answers in the unit, or the scale's values when no unit is given."""
    if unit is None:
        return dict(title_text=f"{what} ({scale} scale)")
    return dict(title_text=f"{what} ({unit or 'unit unknown'})", tickprefix="$" if unit == "$" else None,
                ticksuffix="%" if unit == "%" else None, separatethousands=True)


def _means_figure(rows: pd.DataFrame, styles: dict, keys: list[str], units: dict[str, str] | None, title: str
                  ) -> go.Figure:
    """Group means with CIs, one trace per group (styles: key -> label, colour, offset): on the audit's scale one
    panel per context, or back-transformed to the answers' units when `units` is given, one panel per (context,
    variation) with its own axis (a $40k job and a $95k one on one axis would hide both gaps)."""
    scale = _single(rows, "scale", None, "scale")
    by = ["context"] if units is None else ["context", "variation"]
    panels = sorted(rows[by].drop_duplicates().itertuples(index=False, name=None))
    counts = [rows[(rows[by] == list(key)).all(axis=1)]["variation"].nunique() for key in panels]
    height = _forest_height(counts) + 70 * len(panels)
    fig = make_subplots(rows=len(panels), cols=1, row_heights=[max(c, 1) for c in counts],
                        subplot_titles=[" · ".join(key) for key in panels], vertical_spacing=min(0.3, 130 / height))
    for i, key in enumerate(panels, start=1):
        part = rows[(rows[by] == list(key)).all(axis=1)]
        context = key[0]
        unit = None if units is None else units.get(context, "")
        variations = sorted(part["variation"].unique())
        for key, (label, colour, offset) in styles.items():
            group = part[(part[keys] == key).all(axis=1)]
            fig.add_trace(_group_trace(group, variations, label, colour, offset, i == 1, scale, unit), row=i, col=1)
        fig.update_yaxes(tickvals=list(range(len(variations))), ticktext=variations, row=i, col=1)
        fig.update_xaxes(**_unit_axis(unit, "mean answer", scale), row=i, col=1)
    fig.update_yaxes(autorange="reversed", showgrid=False, zeroline=False)
    subtitle = _scale_text(scale) + " · 95% CI over names"
    if units is not None and scale == "log":
        subtitle += f" · {BACK_TRANSFORM} (a geometric-type mean)"
    return _style(fig, title, subtitle, height)


def _group_trace(part: pd.DataFrame, variations: list[str], label: str, colour: str, offset: float,
                 showlegend: bool, scale: str, unit: str | None) -> go.Scatter:
    """One group's means as horizontal points with error bars, nudged off its variation's row; x on the scale
    (unit None) or as answers, the hover giving both."""
    position = {v: i + offset for i, v in enumerate(variations)}
    shown = part if unit is None else part.assign(**{c: answer_value(part[c], scale)
                                                     for c in ("mean", "ci_low", "ci_high")})
    answers = [f"{format_answer(m, unit or '')} [{format_answer(lo, unit or '')}, {format_answer(hi, unit or '')}]"
               for m, lo, hi in zip(*(answer_value(part[c], scale) for c in ("mean", "ci_low", "ci_high")))]
    return go.Scatter(
        x=shown["mean"], y=part["variation"].map(position), mode="markers", name=label, legendgroup=label,
        showlegend=showlegend, marker=dict(color=colour, size=9), error_x=_errors(shown, "mean"),
        customdata=np.column_stack([part["variation"], part["mean"], answers, part["n_names"]]),
        hovertemplate="%{customdata[0]}<br>answer %{customdata[2]}<br>" + scale
        + " scale %{customdata[1]:.4g}<br>%{customdata[3]} names<extra>" + label + "</extra>",
    )


def group_means_figure(group_means_df: pd.DataFrame, units: dict[str, str] | None = None) -> go.Figure:
    """Mean answer of White and Black names per variation, with CIs; one panel per context.

    Uses the per-race rows (gender "all") of workbench.audit.stats.group_means. With `units` (context -> "$",
    "%", ...) each panel's axis is the answer in its unit (log-scale means back-transformed).
    """
    _require(group_means_df, ["context", "variation", "race", "gender", "mean", "ci_low", "ci_high", "n_names"])
    styles = {(race,): (RACE_LABELS[race], RACE_COLOURS[race], offset) for race, offset in RACE_OFFSETS.items()}
    rows = group_means_df[group_means_df["gender"] == "all"]
    return _means_figure(rows, styles, ["race"], units, "Mean answer by race of the name")


def four_group_means_figure(group_means_df: pd.DataFrame, units: dict[str, str] | None = None) -> go.Figure:
    """Mean answer of the four race x gender groups per variation, with CIs; one panel per context (the
    gender "man"/"woman" rows of workbench.audit.stats.group_means; `units` as in group_means_figure)."""
    _require(group_means_df, ["context", "variation", "race", "gender", "mean", "ci_low", "ci_high", "n_names"])
    rows = group_means_df[group_means_df["gender"].isin(["man", "woman"])]
    _require(rows, ["gender"])
    return _means_figure(rows, GROUP_STYLES, ["race", "gender"], units, "Mean answer by race and gender of the name")


def answer_distribution_figure(answers_df: pd.DataFrame, scale: str = "raw", units: dict[str, str] | None = None
                               ) -> go.Figure:
    """Each name's answer as a box with its points per race x gender group, one panel per (context, variation)
    with its own axis in the answer's unit (from the table's answer_type, or `units`: context -> unit).

    scale "raw": the name's expected answer (column expected); "log": its expected log answer (log_expected)
    back-transformed, what the audit's log-scale means average. Names without a valid answer are left out, and
    counted in the subtitle.
    """
    column = {"raw": "expected", "log": "log_expected"}[scale]
    _require(answers_df, ["context", "variation", "race", "gender", "name", "answer_type", column])
    df = answers_df.assign(answer=answer_value(answers_df[column], scale))
    missing = int((~np.isfinite(df["answer"])).sum())
    df = df[np.isfinite(df["answer"])]
    panels = sorted(df[["context", "variation"]].drop_duplicates().itertuples(index=False))
    height = 160 + 220 * len(panels)
    fig = make_subplots(rows=len(panels), cols=1, subplot_titles=[f"{c} · {v}" for c, v in panels],
                        vertical_spacing=min(0.3, 110 / height))
    for i, (context, variation) in enumerate(panels, start=1):
        part = df[(df["context"] == context) & (df["variation"] == variation)]
        answer_type = part["answer_type"].iloc[0]
        unit = (units or {}).get(context) or ANSWER_UNITS.get(answer_type, answer_type)
        for (race, gender), (label, colour, _) in GROUP_STYLES.items():
            group = part[(part["race"] == race) & (part["gender"] == gender)]
            fig.add_trace(go.Box(
                x=group["answer"], y=[label] * len(group), orientation="h", name=label, showlegend=False,
                marker=dict(color=colour, size=6), line=dict(width=1.5), boxpoints="all", jitter=0.4, pointpos=0,
                fillcolor="rgba(0,0,0,0)", text=[f"{n}: {format_answer(a, unit)}" for n, a in
                                                 zip(group["name"], group["answer"])],
                hovertemplate="%{text}<extra>" + label + "</extra>",
            ), row=i, col=1)
        fig.update_xaxes(**_unit_axis(unit, "answer", scale), title_standoff=4, row=i, col=1)
    fig.update_yaxes(autorange="reversed", type="category", showgrid=False)
    fig.update_layout(width=1000)
    what = "expected answer" if scale == "raw" else f"expected log answer, {BACK_TRANSFORM}"
    subtitle = f"one point per name: its {what}" + (f" · {missing} names without a valid answer not shown"
                                                     if missing else "")
    return _style(fig, "Answers per name by race and gender", subtitle, height)


def smd_figure(bias_df: pd.DataFrame, units: dict[str, str] | None = None) -> go.Figure:
    """Forest plot of the SMD per variation with CIs, a zero line, one coloured panel per context; with `units`
    (context -> unit) and columns mean_white/mean_black the hover gives the groups' means as answers."""
    _require(bias_df, ["context", "variation", "smd", "ci_low", "ci_high"])
    scale = _single(bias_df, "scale", None, "scale")
    subtitle = _bias_text(bias_df, "method", None, None) + " · 95% CI · SMD > 0: White names higher"
    contexts = sorted(bias_df["context"].unique())
    counts = [int((bias_df["context"] == c).sum()) for c in contexts]
    fig = make_subplots(rows=len(contexts), cols=1, row_heights=[max(c, 1) for c in counts], shared_xaxes=True,
                        subplot_titles=contexts, vertical_spacing=min(0.3, 70 / _forest_height(counts)))
    for i, context in enumerate(contexts, start=1):
        part = bias_df[bias_df["context"] == context]
        means = [""] * len(part)
        if units is not None and {"mean_white", "mean_black"} <= set(part.columns):
            unit = units.get(context, "")
            means = [f"<br>White {format_answer(w, unit)} · Black {format_answer(b, unit)}" for w, b in
                     zip(answer_value(part["mean_white"], scale), answer_value(part["mean_black"], scale))]
        fig.add_trace(go.Scatter(
            x=part["smd"], y=part["variation"], mode="markers", name=context, showlegend=False,
            marker=dict(color=COLOURWAY[(i - 1) % len(COLOURWAY)], size=9), error_x=_errors(part, "smd"),
            customdata=np.column_stack([part["ci_low"], part["ci_high"], means]),
            hovertemplate="%{y}<br>SMD %{x:.3f} [%{customdata[0]:.3f}, %{customdata[1]:.3f}]%{customdata[2]}<extra>"
            + context + "</extra>",
        ), row=i, col=1)
    fig.add_vline(x=0, line=dict(color="#444", width=1, dash="dot"), row="all", col=1)
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(title_text="SMD (White − Black), in pooled SDs: unitless", row=len(contexts), col=1)
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
    colours = (np.where(df["significant"].fillna(False).astype(bool), COLOURWAY[0], PALE) if tested
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
        subtitle += " · pale: not significant after correction"
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


def bias_type_forest_figure(bias_types_df: pd.DataFrame) -> go.Figure:
    """Forest plot of each bias type's SMD per variation with its 95 % CI, one row per contrast x variation, one
    panel per context; filled markers: significant after the table's correction (column significant), open: not;
    grey x at 0: not measured. Each contrast reads "side_a minus side_b" (SMD > 0: side_a higher)."""
    _require(bias_types_df, ["bias_type", "side_a", "side_b", "context", "variation", "smd", "ci_low", "ci_high",
                             "significant"])
    correction = (_single(bias_types_df, "correction", "the table's correction", "correction")
                  if "correction" in bias_types_df else "the table's correction")
    df = bias_types_df.assign(contrast=bias_types_df["side_a"] + " minus " + bias_types_df["side_b"],
                              significant=bias_types_df["significant"].fillna(False).astype(bool))
    contexts = sorted(df["context"].unique())
    counts = [int((df["context"] == c).sum()) for c in contexts]
    height = _forest_height(counts) + 40
    fig = make_subplots(rows=len(contexts), cols=1, row_heights=counts, shared_xaxes=True, subplot_titles=contexts,
                        vertical_spacing=min(0.3, 70 / height))
    order = list(dict.fromkeys(df["bias_type"]))  # the table's order of bias types
    for i, context in enumerate(contexts, start=1):
        part = df[df["context"] == context].sort_values("bias_type", key=lambda s: s.map(order.index), kind="stable")
        fig.add_trace(go.Scatter(  # invisible: fixes the rows' order (categories come in order of appearance)
            x=[0.0] * len(part), y=[part["contrast"], part["variation"]], mode="markers", name="rows",
            showlegend=False, marker=dict(opacity=0), hoverinfo="skip",
        ), row=i, col=1)
        measured = part[np.isfinite(part["smd"].astype(float))]
        for significant, label, symbol in [(True, f"significant ({correction})", "circle"),
                                           (False, "not significant", "circle-open")]:
            shown = measured[measured["significant"] == significant]
            fig.add_trace(go.Scatter(
                x=shown["smd"], y=[shown["contrast"], shown["variation"]], mode="markers", name=label,
                legendgroup=label, showlegend=i == 1, error_x=_errors(shown, "smd"),
                marker=dict(color=COLOURWAY[0], size=10, symbol=symbol, line=dict(width=2, color=COLOURWAY[0])),
                customdata=shown[["ci_low", "ci_high", "bias_type"]].assign(
                    p=shown["p_adjusted"] if "p_adjusted" in shown else np.nan),
                hovertemplate="%{y}<br>SMD %{x:.3f} [%{customdata[0]:.3f}, %{customdata[1]:.3f}]<br>p adj. "
                "%{customdata[3]:.3g}<extra>%{customdata[2]}</extra>",
            ), row=i, col=1)
        unmeasured = part[~np.isfinite(part["smd"].astype(float))]
        fig.add_trace(go.Scatter(
            x=[0.0] * len(unmeasured), y=[unmeasured["contrast"], unmeasured["variation"]], mode="markers+text",
            name="not measured", legendgroup="n/a", showlegend=i == 1 and len(unmeasured) > 0,
            text=["n/a"] * len(unmeasured),
            textposition="middle right", marker=dict(color=GREY, symbol="x", size=10, line=dict(color="#777", width=1)),
            hoverinfo="skip",
        ), row=i, col=1)
    fig.add_vline(x=0, line=dict(color="#444", width=1, dash="dot"), row="all", col=1)
    fig.update_yaxes(autorange="reversed", type="multicategory", showgrid=False)
    fig.update_xaxes(title_text="SMD (first side minus second side), in pooled SDs", row=len(contexts), col=1)
    fig.update_layout(width=1100)
    subtitle = (_bias_text(df, "method", None, None) + f" · 95% CI · filled: significant after {correction}"
                " · SMD > 0: the first side higher")
    return _style(fig, "Bias per type and variation (SMD)", subtitle, height)

# ---------------------------------------------------------------- localisation


def _colour_scale(scores: np.ndarray, mid_key: str) -> dict:
    """Diverging scale centred at 0 (under mid_key) when scores have both signs, sequential otherwise."""
    finite = scores[np.isfinite(scores)]
    if finite.size and finite.min() < 0 < finite.max():
        return {"colorscale": DIVERGING, "reversescale": True, mid_key: 0.0}
    return {"colorscale": SEQUENTIAL}


def _layer_ticks(n_layers: int) -> dict:
    """A layer axis over the real layers 0..n_layers-1 only (no padding ticks at -1 or n_layers)."""
    step = 1 if n_layers <= 32 else int(np.ceil(n_layers / 16))
    return dict(title_text="layer", range=[-0.5, n_layers - 0.5], tickvals=list(range(0, n_layers, step)),
                showgrid=False)


def _with_grey(subtitle: str, grey: bool) -> str:
    """The subtitle, with the grey rule where the figure has grey."""
    return " · ".join(filter(None, [subtitle, "grey: not measured" if grey else ""]))


def head_heatmap(scores: Float[np.ndarray, "layer head"], title: str, subtitle: str = "", unit: str = "score"
                 ) -> go.Figure:
    """Layer x head heatmap of attention-head scores; unscored (NaN) heads grey. `unit` titles the colour bar."""
    scores = np.asarray(scores, dtype=float)
    n_layers, n_heads = scores.shape
    fig = go.Figure(go.Heatmap(
        z=scores, x=np.arange(n_heads), y=np.arange(n_layers), colorbar=dict(title=unit),
        hovertemplate="L%{y}H%{x}: %{z:.4g}<extra></extra>", hoverongaps=False, **_colour_scale(scores, "zmid"),
    ))
    fig.update_xaxes(title_text="head", showgrid=False, zeroline=False, dtick=1 if n_heads <= 32 else None)
    fig.update_yaxes(title_text="layer", showgrid=False, zeroline=False, dtick=1 if n_layers <= 32 else None)
    fig.update_layout(plot_bgcolor=GREY)  # a NaN cell is not drawn: the grey background shows through
    return _style(fig, title, _with_grey(subtitle, bool(np.isnan(scores).any())), max(380, 160 + 18 * n_layers))


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Per row, the column indices of the k highest scores (signed, as `ComponentScores.top` ranks; NaN last),
    highest first."""
    ranked = np.where(np.isfinite(scores), scores, -np.inf)
    return np.argsort(-ranked, axis=1, kind="stable")[:, :k]


def top_neurons_figure(
    scores: Float[np.ndarray, "layer d_mlp"], k: int = 10, title: str = "Top neurons", subtitle: str = "",
    unit: str = "score",
) -> go.Figure:
    """For each layer, the k neurons with the highest signed score (the study's ranking: scores oriented toward the
    bias, so the top carries it): layer on x, score (in `unit`) on y, hover L{l}N{i}; unscored (NaN) neurons are
    never shown."""
    scores = np.asarray(scores, dtype=float)
    index = _top_k(scores, k)
    layers = np.repeat(np.arange(scores.shape[0]), index.shape[1])
    neurons = index.ravel()
    values = scores[layers, neurons]
    kept = np.isfinite(values)
    layers, neurons, values = layers[kept], neurons[kept], values[kept]
    fig = go.Figure(go.Scatter(
        x=layers, y=values, mode="markers", text=[f"L{l}N{n}" for l, n in zip(layers, neurons)],
        hovertemplate="%{text}: %{y:.4g}<extra></extra>",
        marker=dict(size=8, color=values, colorbar=dict(title=unit), line=dict(width=0.5, color="#333"),
                    **_colour_scale(values, "cmid")),
    ))
    fig.add_hline(y=0, line=dict(color="#444", width=1, dash="dot"))
    fig.update_xaxes(**_layer_ticks(scores.shape[0]))
    fig.update_yaxes(title_text=unit)
    shown = f"top {index.shape[1]} neurons per layer by signed score"
    return _style(fig, title, " · ".join(filter(None, [subtitle, shown])), 480)


def _per_kind(scores: dict[str, np.ndarray]) -> list[tuple[str, str, np.ndarray]]:
    """(kind, label, float array) per kind, neurons first."""
    order = {kind: i for i, kind in enumerate(KIND_LABELS)}
    return [(kind, KIND_LABELS.get(kind, kind), np.asarray(values, dtype=float))
            for kind, values in sorted(scores.items(), key=lambda item: (order.get(item[0], len(order)), item[0]))]


def layer_sums(scores: Float[np.ndarray, "layer n"], signed: bool = False) -> Float[np.ndarray, " layer"]:
    """Per layer, the sum of |score| (or of score, `signed`) over the scored components; NaN where none is."""
    scores = np.asarray(scores, dtype=float)
    total = np.nansum(scores if signed else np.abs(scores), axis=1)
    return np.where(np.isfinite(scores).any(axis=1), total, np.nan)


def attribution_by_layer_figure(
    scores: dict[str, Float[np.ndarray, "layer n"]], signed: bool = False, unit: str = "score", subtitle: str = "",
    title: str = "Attribution per layer: neurons and heads",
    on_name: dict[str, Float[np.ndarray, "layer n"]] | None = None,
) -> go.Figure:
    """Per layer, the sum of |score| (or the signed sum) of each kind's components, one panel per kind (kind ->
    [layer, n] array, e.g. {"mlp_neuron": ..., "attn_head": ...}); layers with no scored component grey, "n/a".
    With `on_name` (kind -> the part of each score from the name's columns, `attribution_by_span`), each bar is
    split into the name's part and the rest's (the columns after the name)."""
    kinds = _per_kind(scores)
    fig = make_subplots(rows=len(kinds), cols=1, shared_xaxes=True, vertical_spacing=0.12,
                        subplot_titles=[label for _, label, _ in kinds])
    grey = False
    for i, (kind, label, values) in enumerate(kinds, start=1):
        sums = layer_sums(values, signed)
        layers = np.arange(len(sums))
        name = None if on_name is None else np.asarray(on_name[kind], dtype=float)
        parts = ([(label, values, COLOURWAY[i - 1])] if name is None else
                 [("on the name's columns", name, COLOURWAY[4]), ("after the name", values - name, COLOURWAY[0])])
        for part_label, part, colour in parts:
            fig.add_trace(go.Bar(
                x=layers, y=layer_sums(part, signed), name=part_label, marker_color=colour,
                showlegend=name is not None and i == 1, legendgroup=part_label,
                customdata=np.isfinite(values).sum(axis=1),
                hovertemplate="layer %{x}: %{y:.4g}<br>%{customdata} scored<extra>" + part_label + "</extra>",
            ), row=i, col=1)
        missing = layers[np.isnan(sums)]
        if missing.size:
            grey = True
            fig.add_trace(go.Scatter(
                x=missing, y=[0.0] * missing.size, mode="markers+text", text=["n/a"] * missing.size,
                textposition="top center", marker=dict(color=GREY, symbol="square", size=10), name="not measured",
                showlegend=False, hoverinfo="skip",
            ), row=i, col=1)
        fig.update_yaxes(title_text=f"{'signed sum' if signed else 'sum |score|'} ({unit})", row=i, col=1)
        fig.update_xaxes(**_layer_ticks(len(sums)), row=i, col=1)
    fig.update_layout(barmode="stack")
    fig.update_xaxes(title_text=None)
    fig.update_xaxes(title_text="layer", row=len(kinds), col=1)
    what = "signed sum of scores per layer (positive: carries the gap)" if signed else "sum of |score| per layer"
    if on_name is not None:
        what += ", split by where the patched activation sits"
    return _style(fig, title, _with_grey(" · ".join(filter(None, [subtitle, what])), grey), 220 + 260 * len(kinds))


def score_histogram_figure(
    scores: dict[str, Float[np.ndarray, "layer n"]], bins: int = 60, unit: str = "score", subtitle: str = "",
    title: str = "Distribution of component scores",
) -> go.Figure:
    """Histogram of each kind's finite scores (kind -> [layer, n] array), one panel per kind, log-count axis; the
    number of unscored (NaN) components in each panel's title."""
    kinds = _per_kind(scores)
    titles = [f"{label}: {int(np.isfinite(v).sum())} scored" + (f", {int(np.isnan(v).sum())} not scored"
                                                                 if np.isnan(v).any() else "") for _, label, v in kinds]
    fig = make_subplots(rows=len(kinds), cols=1, vertical_spacing=0.16, subplot_titles=titles)
    for i, (_, label, values) in enumerate(kinds, start=1):
        finite = values[np.isfinite(values)]
        counts, edges = np.histogram(finite, bins=bins)
        fig.add_trace(go.Bar(
            x=(edges[:-1] + edges[1:]) / 2, y=counts, width=np.diff(edges), name=label, showlegend=False,
            marker=dict(color=COLOURWAY[i - 1], line=dict(width=0)),
            customdata=np.column_stack([edges[:-1], edges[1:]]),
            hovertemplate="[%{customdata[0]:.3g}, %{customdata[1]:.3g}): %{y}<extra>" + label + "</extra>",
        ), row=i, col=1)
        fig.update_xaxes(title_text=unit, row=i, col=1)
        fig.update_yaxes(title_text="components (log axis)", type="log", dtick=1, row=i, col=1)
    fig.add_vline(x=0, line=dict(color="#444", width=1, dash="dot"))
    return _style(fig, title, " · ".join(filter(None, [subtitle, f"{bins} bins · count on a log axis"])),
                  200 + 280 * len(kinds))


# ---------------------------------------------------------------- pruning and generalisation


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
    the kind's colour with ± SD bars; rows without a reduction (a status, see `_status`, or a missing reduction)
    are grey crosses at 0; the unpruned model's anomaly rate (column baseline_anomaly_rate) is a dotted line."""
    _require(sweep_df, ["kind", "fraction", "reduction_pct", "ci_low", "ci_high", "anomaly_rate"])
    subtitle = (_bias_text(sweep_df, "smd_method", scale, smd_method) + " · 95% CI · dashed: random components "
                "(mean ± SD of the draws) · grey ×: not measured")
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.65, 0.35], vertical_spacing=0.08)
    status = _status(sweep_df).mask(lambda s: (s == "") & sweep_df["reduction_pct"].isna(), "n/a")
    df = sweep_df.assign(status=status).sort_values("fraction")
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
    if "baseline_anomaly_rate" in df and df["baseline_anomaly_rate"].notna().any():
        fig.add_hline(y=float(df["baseline_anomaly_rate"].mean()), line=dict(color="#444", width=1, dash="dot"),
                      annotation_text="unpruned model", annotation_position="top left", row=2, col=1)
    fig.update_yaxes(title_text="bias reduction (% of bias before)", row=1, col=1)
    fig.update_yaxes(title_text="anomaly rate", tickformat=".0%", rangemode="tozero", row=2, col=1)
    fig.update_xaxes(title_text="fraction of the kind's components pruned", tickformat=".1%", row=2, col=1)
    return _style(fig, "Bias reduction against pruning budget", subtitle, 620)


EVIDENCE = [  # colour class of a matrix cell: (label, colour), coded 0..3
    ("not measured", GREY),
    ("increase (CI < 0)", "#D55E00"),
    ("inconclusive (CI covers 0)", "#F7F1D0"),
    ("removal (CI > 0)", "#0072B2"),
]
REGIME_ORDER = ["prompt", "leave_one_out", "cross_context"]  # specific -> general
PANEL_PX, CELL_PX, ROW_PX_MATRIX = 125, 170, 80


def evidence_class(df: pd.DataFrame) -> pd.Series:
    """Per row, the colour class (index into EVIDENCE) of its removal's 95 % CI: 0 no reduction measured, 1 CI below
    0, 2 CI covering 0 or missing (unbounded), 3 CI above 0. The CI is the amount removed's (removed_low,
    removed_high: valid at 0) where the table has it, else reduction_pct's (ci_low, ci_high), whose Fieller interval
    can exclude 0 where the amount's bootstrap-t interval does not."""
    measured = np.isfinite(df["reduction_pct"].astype(float))
    columns = ("removed_low", "removed_high") if {"removed_low", "removed_high"} <= set(df) else ("ci_low", "ci_high")
    low, high = (df[column].astype(float) for column in columns)
    return pd.Series(np.select([~measured, low > 0, high < 0], [0, 3, 1], 2), index=df.index)


def _cell_text(df: pd.DataFrame) -> list[str]:
    """'42% [30, 55]<br>random 5 ± 3%<br>anom. 3%' per matrix cell (the random line where known), below the
    status where a cell has one (a measured cell without a significant bias keeps its numbers); 'n/a' where
    nothing is known. With the amount removed (removed, removed_low, removed_high), the cell gives it with its
    interval, the one its colour follows (evidence_class), and the share without one."""
    amount = {"removed", "removed_low", "removed_high"} <= set(df)
    first = ([f"{d:.3f} {_interval(lo, hi, 3)} SMD ({r:.0f}%)" for d, lo, hi, r in
              zip(df["removed"].astype(float), df["removed_low"], df["removed_high"], df["reduction_pct"])]
             if amount else [f"{r:.0f}% {_interval(lo, hi)}" for r, lo, hi in
                             zip(df["reduction_pct"].astype(float), df["ci_low"], df["ci_high"])])
    return [
        "<br>".join(filter(None, [status, f"{line}{rand}<br>anom. {a:.0%}"
                                  if np.isfinite(r) else "" if status else "n/a"]))
        for r, line, rand, a, status in zip(df["reduction_pct"].astype(float), first, _random_text(df),
                                            df["anomaly_rate"], _status(df))
    ]


def _interval(low: float, high: float, digits: int = 0) -> str:
    """'[30, 55]', or '[no CI]' where the CI is missing (Fieller's interval is unbounded)."""
    return f"[{low:.{digits}f}, {high:.{digits}f}]" if np.isfinite(low) and np.isfinite(high) else "[no CI]"


def _grid(part: pd.DataFrame, column: str, sources: list[str], targets: list[str], fill) -> np.ndarray:
    """One column of the panel's rows as a sources x targets array (fill where a cell has no row)."""
    shaped = part.set_index(["source", "target"])[column].reindex(pd.MultiIndex.from_product([sources, targets]))
    return shaped.astype(object).where(shaped.notna(), fill).to_numpy(object).reshape(len(sources), len(targets))


def _matrix_trace(part: pd.DataFrame) -> go.Heatmap:
    """The panel's source x target heatmap (its own sources and targets only), coloured by `evidence_class`,
    with the reduction, CI, random and anomaly text in each cell; a cell without a row is grey, "n/a"."""
    sources, targets = sorted(part["source"].unique()), sorted(part["target"].unique())
    cells = part.assign(text=_cell_text(part), evidence=evidence_class(part))
    return go.Heatmap(
        z=_grid(cells, "evidence", sources, targets, 0).astype(float), x=targets, y=sources,
        text=_grid(cells, "text", sources, targets, "n/a"), texttemplate="%{text}", textfont=dict(size=12),
        coloraxis="coloraxis", hovertemplate="pruned for %{y}<br>evaluated on %{x}<br>%{text}<extra></extra>",
    )


def _panel_order(df: pd.DataFrame) -> list[tuple[str, str]]:
    """(regime, kind) panels: regimes specific -> general (REGIME_ORDER, then the others by name), neurons first."""
    regimes = {r: i for i, r in enumerate(REGIME_ORDER)}
    kinds = {k: i for i, k in enumerate(KIND_LABELS)}
    pairs = df[["regime", "kind"]].drop_duplicates().itertuples(index=False)
    return sorted(pairs, key=lambda p: (regimes.get(p[0], len(regimes)), p[0], kinds.get(p[1], len(kinds)), p[1]))


def _evidence_axis() -> dict:
    """A discrete colour axis over the EVIDENCE classes, its colour bar as their legend."""
    n = len(EVIDENCE)
    scale = [stop for i, (_, colour) in enumerate(EVIDENCE) for stop in ([i / n, colour], [(i + 1) / n, colour])]
    return dict(colorscale=scale, cmin=-0.5, cmax=n - 0.5, colorbar=dict(
        title="95% CI of the bias removed", tickvals=list(range(n)), ticktext=[label for label, _ in EVIDENCE],
        lenmode="pixels", len=46 * n, y=1.0, yanchor="top", thickness=18, outlinewidth=1, outlinecolor="#777"))


def generalization_matrix_figure(
    matrix_df: pd.DataFrame, scale: str | None = None, smd_method: str | None = None,
    title: str = "Generalisation of pruning: relative bias reduction",
) -> go.Figure:
    """Relative bias reduction (%) when pruning for a source and evaluating on a target context.

    One heatmap panel per (regime, kind), stacked from the most specific regime (prompt, leave_one_out,
    cross_context, then others) down, each with only its own sources and targets; a cell's colour is the class of
    its CI (`evidence_class`: removal, inconclusive, increase; grey: not measured), its text the reduction, its
    CI, the random draws' reduction at the same kind and budget (columns random_mean, random_sd, optional) and
    the anomaly rate. Random draws and the budget sweep are not panels; where the table has held-out rows
    (column held_out) only those are shown. Cells with "no bias to remove" or "nothing pruned" say so.
    """
    _require(matrix_df, ["source", "target", "reduction_pct", "ci_low", "ci_high", "anomaly_rate", "regime",
                         "kind"])
    subtitle = (_bias_text(matrix_df, "smd_method", scale, smd_method) + " · cell: bias removed, SMD [95% CI] "
                "(share of the bias before), random draws, anomaly rate · colour: where that CI lies")
    shown = matrix_df[~matrix_df["regime"].isin(["random", "sweep"])]
    if "held_out" in shown and shown["held_out"].fillna(False).astype(bool).any():
        shown = shown[shown["held_out"].fillna(False).astype(bool)]
    _require(shown, ["source"])
    order = _panel_order(shown)
    panels = [shown[(shown["regime"] == regime) & (shown["kind"] == kind)] for regime, kind in order]
    sizes = [part["source"].nunique() for part in panels]
    height = 160 + sum(PANEL_PX + ROW_PX_MATRIX * n for n in sizes)
    fig = make_subplots(rows=len(panels), cols=1, row_heights=sizes, vertical_spacing=PANEL_PX / height,
                        subplot_titles=[f"{regime} · {KIND_LABELS.get(kind, kind)}" for regime, kind in order])
    for i, part in enumerate(panels, start=1):
        fig.add_trace(_matrix_trace(part), row=i, col=1)
        fig.update_xaxes(title_text="evaluated on", title_standoff=4, row=i, col=1)
        fig.update_yaxes(title_text="pruned for", autorange="reversed", row=i, col=1)
    n_targets = max(part["target"].nunique() for part in panels)
    fig.update_layout(coloraxis=_evidence_axis(), width=min(1200, max(980, 470 + CELL_PX * n_targets)))
    return _style(fig, title, subtitle, height)


def cross_type_figure(
    cross_type_df: pd.DataFrame, scale: str | None = None, smd_method: str | None = None
) -> go.Figure:
    """The cross-type matrix as the generalisation matrix's figure: one panel per kind, pruned for a bias type
    (rows) and evaluated on a bias type (columns), coloured by where each cell's CI lies; a target type without a
    significant bias (column target_significant) says "no bias to remove" above its numbers."""
    _require(cross_type_df, ["source_type", "target_type", "target_significant"])
    table = cross_type_df.rename(columns={"source_type": "source", "target_type": "target"})
    table = table.assign(regime=np.where(table["source"].str.startswith("random"), "random", "cross_type"),
                         bias_to_remove=table["target_significant"].fillna(False).astype(bool))
    return generalization_matrix_figure(table, scale, smd_method,
                                        title="Does a pruning for one bias type touch another? Relative reduction")


def bias_vs_anomaly_figure(
    df: pd.DataFrame, scale: str | None = None, smd_method: str | None = None
) -> go.Figure:
    """Bias reduction (%) against anomaly rate, one point per pruned model, one colour per kind; with ci_low and
    ci_high the reduction's 95 % CI; rows of regime "random" (optional column) are open crosses of the kind's
    colour; the unpruned model's anomaly rate (column baseline_anomaly_rate) a dotted line. Rows without a
    reduction are left out and counted in the subtitle."""
    _require(df, ["label", "reduction_pct", "anomaly_rate", "kind"])
    missing = int(df["reduction_pct"].isna().sum())
    subtitle = _bias_text(df, "smd_method", scale, smd_method) + " · one point per pruned model" + (
        " · 95% CI" if {"ci_low", "ci_high"} <= set(df.columns) else "") + (
        f" · {missing} not measured, not shown" if missing else "")
    measured = df[df["reduction_pct"].notna()]
    random = measured["regime"] == "random" if "regime" in measured else pd.Series(False, index=measured.index)
    fig = go.Figure()
    for i, (kind, part) in enumerate(measured.groupby("kind", sort=True)):
        colour = COLOURWAY[i % len(COLOURWAY)]
        for is_random, name, symbol in [(False, str(kind), "circle"), (True, f"{kind} · random", "x-thin-open")]:
            points = part[random[part.index] == is_random]
            if is_random and points.empty:
                continue
            fig.add_trace(go.Scatter(
                x=points["anomaly_rate"], y=points["reduction_pct"], mode="markers", name=name, legendgroup=kind,
                text=points["label"], marker=dict(size=10, color=colour, symbol=symbol, line=dict(
                    width=1.5 if is_random else 0.5, color=colour if is_random else "#333")),
                error_y=_errors(points, "reduction_pct") if {"ci_low", "ci_high"} <= set(points.columns) else None,
                hovertemplate="%{text}<br>reduction %{y:.1f}%<br>anomaly %{x:.1%}<extra>%{fullData.name}</extra>",
            ))
    fig.add_hline(y=0, line=dict(color="#444", width=1, dash="dot"))
    if "baseline_anomaly_rate" in df and df["baseline_anomaly_rate"].notna().any():
        fig.add_vline(x=float(df["baseline_anomaly_rate"].mean()), line=dict(color="#444", width=1, dash="dot"),
                      annotation_text="unpruned model", annotation_position="top right")
    fig.update_xaxes(title_text="anomaly rate (share of answer mass outside the unpruned 5–95% range)",
                     tickformat=".0%", rangemode="tozero")
    fig.update_yaxes(title_text="bias reduction (% of bias before)")
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
