"""Figures say what they show: colours encode evidence, grey means not measured, answers carry their units."""

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from workbench.pipeline import plots


def matrix(rows):
    """A generalisation table from (regime, kind, source, target, reduction, ci_low, ci_high) rows."""
    return pd.DataFrame([dict(regime=r, kind=k, source=s, target=t, reduction_pct=e, ci_low=lo, ci_high=hi,
                              anomaly_rate=0.05, scale="log", smd_method="mixture")
                         for r, k, s, t, e, lo, hi in rows])


def regimes_matrix():
    rows = [(r, k, "each variation", t, 10.0, 5.0, 15.0) for r in ("prompt", "leave_one_out")
            for k in ("mlp_neuron", "attn_head") for t in ("finance", "purchase")]
    rows += [("cross_context", k, s, t, 10.0, 5.0, 15.0) for k in ("mlp_neuron", "attn_head")
             for s in ("finance", "purchase", "hiring") for t in ("finance", "purchase", "hiring") if s != t]
    return matrix(rows)


def test_matrix_colours_the_ci_not_the_estimate():
    df = matrix([("prompt", "mlp_neuron", "each variation", "a", 66.0, -162.0, 127.0),
                 ("prompt", "mlp_neuron", "each variation", "b", 20.0, 5.0, 35.0),
                 ("prompt", "mlp_neuron", "each variation", "c", -30.0, -50.0, -10.0),
                 ("prompt", "mlp_neuron", "each variation", "d", np.nan, np.nan, np.nan)])
    fig = plots.generalization_matrix_figure(df)
    (trace,) = fig.data
    assert list(trace.x) == ["a", "b", "c", "d"]
    assert list(np.asarray(trace.z)[0]) == [2, 3, 1, 0]  # covers 0, above 0, below 0, not measured
    labels = [label for label, _ in plots.EVIDENCE]
    assert labels[2].startswith("inconclusive") and labels[3].startswith("removal") and labels[0] == "not measured"
    assert trace.text[0][0] == "66% [-162, 127]<br>anom. 5%" and trace.text[0][3] == "n/a"
    colours = dict(fig.layout.coloraxis.colorscale)
    assert colours[0.0] == plots.GREY  # the not-measured class is grey, and no other class is
    assert sum(colour == plots.GREY for _, colour in plots.EVIDENCE) == 1
    assert list(fig.layout.coloraxis.colorbar.ticktext) == labels


def test_matrix_cell_without_a_ci_is_inconclusive_and_says_so():
    df = matrix([("prompt", "mlp_neuron", "each variation", "a", 50.0, np.nan, np.nan)])
    trace = plots.generalization_matrix_figure(df).data[0]
    assert np.asarray(trace.z)[0, 0] == 2 and trace.text[0][0].startswith("50% [no CI]")


def test_matrix_orders_regimes_specific_to_general_neurons_first():
    fig = plots.generalization_matrix_figure(regimes_matrix())
    titles = [a.text for a in fig.layout.annotations]
    assert titles == ["prompt · neurons", "prompt · heads", "leave_one_out · neurons", "leave_one_out · heads",
                      "cross_context · neurons", "cross_context · heads"]


def test_matrix_panels_show_only_their_own_rows_and_columns_and_fit_the_page():
    fig = plots.generalization_matrix_figure(regimes_matrix())
    prompt, cross = fig.data[0], fig.data[-1]
    assert list(prompt.y) == ["each variation"] and list(prompt.x) == ["finance", "purchase"]
    assert list(cross.y) == ["finance", "hiring", "purchase"] and list(cross.x) == ["finance", "hiring", "purchase"]
    for trace in fig.data:  # no empty row or column: each has a measured cell
        z = np.asarray(trace.z)
        assert (z != 0).any(axis=1).all() and (z != 0).any(axis=0).all()
    assert np.asarray(cross.z)[0, 0] == 0 and cross.text[0][0] == "n/a"  # the diagonal was not measured
    assert fig.layout.width <= 1200 and fig.layout.height > 6 * 100  # panels stacked: height grows instead


def test_cross_type_colours_measured_cells_by_evidence_and_keeps_the_note():
    df = pd.DataFrame({"kind": "mlp_neuron", "source_type": ["race", "race", "random 0"],
                       "target_type": ["race", "gender", "race"], "reduction_pct": [85.0, 10.0, 3.0],
                       "ci_low": [13.0, -20.0, -5.0], "ci_high": [144.0, 40.0, 9.0], "anomaly_rate": 0.1,
                       "target_significant": [False, True, False], "scale": "log", "smd_method": "mixture"})
    (trace,) = plots.cross_type_figure(df).data
    assert list(trace.y) == ["race"] and list(trace.x) == ["gender", "race"]  # the random draw is no row
    assert list(np.asarray(trace.z)[0]) == [2, 3]  # measured: coloured, not grey
    assert trace.text[0][1].startswith("no bias to remove<br>85% [13, 144]")


def test_unpatched_heads_are_grey_not_zero():
    scores = np.array([[0.5, np.nan], [-0.2, 0.1]])
    fig = plots.head_heatmap(scores, "heads", subtitle="hiring · 4 pairs", unit="logit-diff change (SMD units)")
    z = np.asarray(fig.data[0].z, dtype=float)
    assert np.isnan(z[0, 1])  # not 0, which would be the white middle of the diverging scale
    assert fig.layout.plot_bgcolor == plots.GREY  # NaN cells are not drawn: the grey background shows
    assert "grey: not measured" in fig.layout.title.subtitle.text
    assert fig.layout.title.subtitle.text.startswith("hiring · 4 pairs")
    assert fig.data[0].colorbar.title.text == "logit-diff change (SMD units)"
    assert "grey" not in (plots.head_heatmap(np.ones((2, 2)), "heads").layout.title.subtitle.text or "")


def test_neuron_layer_axis_has_only_real_layers():
    scores = np.random.default_rng(0).normal(size=(30, 50))
    fig = plots.top_neurons_figure(scores, k=3, subtitle="attribution", unit="expected log answer")
    low, high = fig.layout.xaxis.range
    assert -1 < low < 0 and 29 < high < 30  # half a layer of room, no tick at -1 or 30
    assert list(fig.layout.xaxis.tickvals) == list(range(30))
    assert fig.layout.yaxis.title.text == "expected log answer"
    assert fig.data[0].marker.colorbar.title.text == "expected log answer"


def test_attribution_by_layer_sums_each_layer():
    neurons = np.array([[1.0, -2.0, np.nan], [np.nan, np.nan, np.nan], [0.5, 0.5, -3.0]])
    heads = np.array([[0.1, -0.1], [0.2, 0.3], [-1.0, 0.0]])
    fig = plots.attribution_by_layer_figure({"attn_head": heads, "mlp_neuron": neurons}, unit="SMD")
    bars = [t for t in fig.data if t.type == "bar"]
    assert [t.name for t in bars] == ["neurons", "heads"]  # neurons first
    np.testing.assert_allclose(bars[0].y, [3.0, np.nan, 4.0])
    np.testing.assert_allclose(bars[1].y, [0.2, 0.5, 1.0])
    (grey,) = [t for t in fig.data if t.type == "scatter"]
    assert list(grey.x) == [1] and grey.marker.color == plots.GREY and list(grey.text) == ["n/a"]
    assert "sum of |score|" in fig.layout.title.subtitle.text and "grey: not measured" in fig.layout.title.subtitle.text
    signed = plots.attribution_by_layer_figure({"mlp_neuron": neurons}, signed=True)
    np.testing.assert_allclose(signed.data[0].y, [-1.0, np.nan, -2.0])


def test_score_histogram_counts_finite_scores_on_a_log_axis():
    neurons = np.array([[0.0, 1.0, 1.0, np.nan], [2.0, 2.0, 2.0, 3.0]])
    fig = plots.score_histogram_figure({"mlp_neuron": neurons}, bins=3, unit="SMD")
    assert list(fig.data[0].y) == [1, 2, 4] and fig.layout.yaxis.type == "log"
    assert fig.layout.annotations[0].text == "neurons: 7 scored, 1 not scored"
    assert fig.layout.xaxis.title.text == "SMD"


def group_means():
    rows = []
    for context in ("finance", "purchase"):
        for race in ("white", "black"):
            for gender in ("man", "woman", "all"):
                mean = np.log1p(100.0 if race == "white" else 80.0)
                rows.append(dict(context=context, variation="v", race=race, gender=gender, mean=mean,
                                 ci_low=mean - 0.1, ci_high=mean + 0.1, n_names=4, scale="log"))
    return pd.DataFrame(rows)


def test_group_means_in_the_answers_units():
    fig = plots.group_means_figure(group_means(), units={"finance": "%", "purchase": "$"})
    white = fig.data[0]
    assert white.x[0] == pytest.approx(100.0)  # back-transformed: sign(y)(exp|y| - 1)
    assert fig.layout.xaxis.title.text == "mean answer (%)" and fig.layout.xaxis.ticksuffix == "%"
    assert fig.layout.xaxis2.title.text == "mean answer ($)" and fig.layout.xaxis2.tickprefix == "$"
    assert white.customdata[0][2].startswith("100%") and fig.data[3].customdata[0][2].startswith("$80")
    plain = plots.group_means_figure(group_means())
    assert plain.data[0].x[0] == pytest.approx(np.log1p(100.0))
    assert plain.layout.xaxis.title.text == "mean answer (log scale)"


def test_four_group_means_has_the_four_groups():
    fig = plots.four_group_means_figure(group_means())
    assert [t.name for t in fig.data[:4]] == ["White men", "White women", "Black men", "Black women"]
    assert len(fig.data) == 8 and all(len(t.x) == 1 for t in fig.data)


def test_answer_distribution_per_variation_in_the_unit():
    answers = pd.DataFrame({
        "context": "hiring", "variation": ["a"] * 4 + ["b"] * 4, "name": list("WXYZ") * 2,
        "race": ["white", "white", "black", "black"] * 2, "gender": ["man", "woman"] * 4,
        "answer_type": "dollars", "expected": [100.0, 110.0, 90.0, np.nan, 1.0, 2.0, 3.0, 4.0],
        "log_expected": np.log1p([100.0, 110.0, 90.0, np.nan, 1.0, 2.0, 3.0, 4.0]),
    })
    fig = plots.answer_distribution_figure(answers, scale="log")
    assert [a.text for a in fig.layout.annotations] == ["hiring · a", "hiring · b"]
    first = fig.data[:4]
    assert [t.name for t in first] == ["White men", "White women", "Black men", "Black women"]
    assert list(first[0].x) == pytest.approx([100.0]) and len(first[3].x) == 0
    assert first[0].text[0] == "W: $100" and fig.layout.xaxis.title.text == "answer ($)"
    assert "1 names without a valid answer" in fig.layout.title.subtitle.text


def bias_types():
    return pd.DataFrame({
        "bias_type": ["race", "race", "gender"], "side_a": ["white", "white", "men"],
        "side_b": ["black", "black", "women"], "context": "hiring", "variation": ["a", "b", "a"],
        "smd": [0.3, np.nan, -0.1], "ci_low": [0.1, np.nan, -0.3], "ci_high": [0.5, np.nan, 0.1],
        "p_adjusted": [0.01, np.nan, 0.8], "significant": [True, False, False], "correction": "holm",
        "scale": "log", "method": "mixture"})


def test_bias_type_forest_labels_the_contrast_and_marks_significance():
    fig = plots.bias_type_forest_figure(bias_types())
    rows, significant, not_significant, unmeasured = fig.data
    assert list(rows.y[0]) == ["white minus black", "white minus black", "men minus women"]  # table order
    assert list(significant.x) == [0.3] and list(significant.y[1]) == ["a"] and significant.marker.symbol == "circle"
    assert list(not_significant.y[0]) == ["men minus women"] and not_significant.marker.symbol == "circle-open"
    assert list(unmeasured.y[1]) == ["b"] and unmeasured.marker.color == plots.GREY
    assert "holm" in significant.name and "holm" in fig.layout.title.subtitle.text
    assert any(shape.x0 == 0 and shape.x1 == 0 for shape in fig.layout.shapes)


def test_smd_hover_gives_the_groups_means_as_answers():
    df = pd.DataFrame({"context": "purchase", "variation": ["x"], "smd": [0.2], "ci_low": [0.0], "ci_high": [0.4],
                       "mean_white": [np.log1p(1500.0)], "mean_black": [np.log1p(1200.0)], "scale": "log",
                       "method": "mixture"})
    fig = plots.smd_figure(df, units={"purchase": "$"})
    assert fig.data[0].customdata[0][2] == "<br>White $1,500 · Black $1,200"


def test_budget_curve_greys_rows_without_a_reduction_and_shows_the_unpruned_anomaly():
    df = pd.DataFrame({"kind": "attn_head", "fraction": [0.1, 0.2], "reduction_pct": [np.nan, 30.0],
                       "ci_low": [np.nan, 10.0], "ci_high": [np.nan, 50.0], "anomaly_rate": [0.1, 0.2],
                       "baseline_anomaly_rate": 0.1, "scale": "log", "smd_method": "mixture"})
    fig = plots.budget_curve_figure(df)
    grey = [t for t in fig.data if t.name == "attn_head · no reduction"][0]
    assert list(grey.x) == [0.1] and list(grey.text) == ["n/a"] and grey.marker.color == plots.GREY
    assert "grey ×: not measured" in fig.layout.title.subtitle.text
    assert any(shape.y0 == 0.1 and shape.y1 == 0.1 for shape in fig.layout.shapes)


def test_bias_vs_anomaly_shows_cis_and_random_draws_apart():
    df = pd.DataFrame({"label": ["p", "r0", "r1", "q"], "kind": "mlp_neuron", "regime": ["prompt", "random", "random",
                       "prompt"], "reduction_pct": [40.0, 5.0, -3.0, np.nan], "ci_low": [10.0, -5.0, -9.0, np.nan],
                       "ci_high": [70.0, 15.0, 3.0, np.nan], "anomaly_rate": [0.1, 0.12, 0.11, 0.1],
                       "scale": "log", "smd_method": "mixture"})
    fig = plots.bias_vs_anomaly_figure(df)
    chosen, random = fig.data
    assert list(chosen.text) == ["p"] and list(chosen.error_y.array) == [30.0]
    assert list(random.text) == ["r0", "r1"] and random.name == "mlp_neuron · random"
    assert "1 not measured, not shown" in fig.layout.title.subtitle.text


def test_evidence_follows_the_amount_removed_where_the_table_has_it():
    """Fieller's interval of the share can exclude 0 where the amount's bootstrap-t interval does not (the default
    study's 64 neurons: 237 % [123, 650] against 0.137 [-0.021, 0.285]): the colour follows the amount."""
    cell = pd.DataFrame({"reduction_pct": [237.0], "ci_low": [123.0], "ci_high": [650.0]})
    assert plots.evidence_class(cell).tolist() == [3]
    assert plots.evidence_class(cell.assign(removed_low=-0.021, removed_high=0.285)).tolist() == [2]
    assert plots.evidence_class(cell.assign(removed_low=0.01, removed_high=0.285)).tolist() == [3]


def test_attribution_by_layer_splits_each_bar_into_the_name_and_the_rest():
    total = np.array([[1.0, -2.0], [0.5, 0.5]])
    on_name = np.array([[1.0, -1.0], [0.0, 0.0]])  # layer 0: most on the name (an embedding-like layer)
    fig = plots.attribution_by_layer_figure({"mlp_neuron": total}, on_name={"mlp_neuron": on_name})
    name, rest = [trace for trace in fig.data if isinstance(trace, go.Bar)]
    assert name.name == "on the name's columns" and rest.name == "after the name" and fig.layout.barmode == "stack"
    assert list(name.y) == [2.0, 0.0] and list(rest.y) == [1.0, 1.0]


def test_matrix_cells_give_the_amount_removed_whose_interval_the_colour_follows():
    cell = pd.DataFrame({"regime": ["prompt"], "kind": ["mlp_neuron"], "source": ["each variation"],
                         "target": ["hiring"], "reduction_pct": [237.0], "ci_low": [123.0], "ci_high": [650.0],
                         "removed": [0.137], "removed_low": [-0.021], "removed_high": [0.285], "anomaly_rate": [0.11],
                         "scale": "log", "smd_method": "mixture"})
    fig = plots.generalization_matrix_figure(cell)
    assert fig.data[0].text[0][0].startswith("0.137 [-0.021, 0.285] SMD (237%)")
    assert np.asarray(fig.data[0].z, dtype=float)[0, 0] == 2  # inconclusive: the amount's CI covers 0


def test_long_subtitles_break_at_their_separators():
    parts = ["scale: log (sign·log1p|x|)", "95% CI over names", "log-scale values back-transformed: sign(y)·(e^|y| − 1)",
             "a geometric-type mean"]
    wrapped = plots._wrapped(" · ".join(parts))
    assert all(len(line) <= plots.SUBTITLE_LINE for line in wrapped.split("<br>"))
    assert wrapped.replace("<br>", " · ") == " · ".join(parts)  # nothing lost, only broken
    assert plots._wrapped("short · subtitle") == "short · subtitle"
