import os
import re
import stat
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from workbench.pipeline import plots, report
from workbench.pipeline.runstore import atomic_write

CHROMIUM = Path("/usr/bin/chromium")
CDN_SCRIPT = re.compile(r"<script[^>]*src=[^>]*cdn\.plot\.ly")  # the bundle itself names cdn.plot.ly for maps
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="/usr/bin/chromium not installed (apt-get install chromium)"
)


def subtitle(fig) -> str:
    return f"{fig.layout.title.text} {fig.layout.title.subtitle.text}"


def bias_df(scale="raw", method="mixture"):
    return pd.DataFrame({
        "context": ["chess", "chess", "purchase", "purchase", "purchase"],
        "variation": ["a", "b", "x", "y", "z"],
        "smd": [0.3, -0.1, 0.5, np.nan, 0.2],
        "ci_low": [0.1, -0.3, 0.2, np.nan, 0.0],
        "ci_high": [0.5, 0.1, 0.8, np.nan, 0.4],
        "scale": scale,
        "method": method,
    })


def group_df():
    rows = []
    for context, variations in (("chess", ["a", "b"]), ("purchase", ["x", "y", "z"])):
        for variation in variations:
            for race in ("white", "black"):
                for gender in ("man", "woman", "all"):
                    rows.append(dict(context=context, variation=variation, race=race, gender=gender, mean=1.0,
                                     ci_low=0.5, ci_high=1.5, n_names=4, n_invalid=0, scale="log"))
    return pd.DataFrame(rows)


def summary_df():
    return pd.DataFrame({"context": ["chess", "purchase", "hiring"], "mean_abs_smd": [0.2, 0.4, 0.1],
                         "ci_low": [0.1, 0.2, 0.0], "ci_high": [0.3, 0.6, 0.2], "n_variations": 3, "n_used": 3,
                         "scale": "raw", "method": "pooled_winsorized"})


def sweep_df():
    """Held-out sweep rows with random controls; the heads' smallest budget has no bias to remove."""
    rows = [
        dict(kind=kind, fraction=b / n, budget=b, n_pruned_mean=float(b), reduction_pct=10.0 * b, ci_low=5.0 * b,
             ci_high=15.0 * b, anomaly_rate=b / n, random_mean=1.0, random_sd=2.0,
             bias_to_remove=not (kind == "head" and b == 1))
        for kind, n in (("neuron", 1000), ("head", 100)) for b in (1, 2, 5)
    ]
    return pd.DataFrame(rows)


def matrix_df():
    contexts = ["chess", "hiring", "purchase"]
    rows = [
        dict(source=s, target=t, reduction_pct=40.0 if s == t else -5.0, ci_low=10.0, ci_high=60.0,
             anomaly_rate=0.03, regime=regime, kind=kind)
        for regime in ("within", "cross") for kind in ("neuron", "head") for s in contexts for t in contexts
    ]
    return pd.DataFrame(rows)


def anomaly_df():
    return pd.DataFrame({"label": ["n1", "n2", "h1"], "reduction_pct": [30.0, 50.0, 10.0],
                         "anomaly_rate": [0.01, 0.2, 0.0], "kind": ["neuron", "neuron", "head"]})


# ---------------------------------------------------------------- figures


def test_group_means_figure_uses_per_race_rows_per_context():
    fig = plots.group_means_figure(group_df())
    assert len(fig.data) == 4  # 2 contexts x 2 races
    assert [len(t.x) for t in fig.data] == [2, 2, 3, 3]
    assert {t.marker.color for t in fig.data} == set(plots.RACE_COLOURS.values())
    assert "scale: log" in subtitle(fig)


def test_smd_figure_one_trace_per_context_with_method_and_scale():
    fig = plots.smd_figure(bias_df(scale="log", method="pooled_winsorized"))
    assert [len(t.x) for t in fig.data] == [2, 3]
    assert "scale: log" in subtitle(fig) and "pooled_winsorized" in subtitle(fig)
    assert any(shape.x0 == 0 and shape.x1 == 0 for shape in fig.layout.shapes)


def test_smd_figure_refuses_mixed_scales():
    mixed = pd.concat([bias_df("raw"), bias_df("log")])
    with pytest.raises(ValueError, match="one scale"):
        plots.smd_figure(mixed)


def test_context_summary_figure():
    fig = plots.context_summary_figure(summary_df())
    assert len(fig.data) == 1 and len(fig.data[0].x) == 3
    assert fig.data[0].error_y.array is None  # mean |SMD| gets no interval
    assert "scale: raw" in subtitle(fig) and "pooled_winsorized" in subtitle(fig)


def test_context_summary_figure_shows_the_held_out_signed_bias_with_its_interval():
    fig = plots.context_summary_figure(summary_df().assign(signed_bias=[0.1, -0.05, 0.0], signed_ci_low=[0.0, -0.2, -0.1],
                                                           signed_ci_high=[0.2, 0.1, 0.1]))
    signed = fig.data[-1]
    assert signed.name.startswith("held-out signed bias") and list(signed.error_y.array) == pytest.approx(
        [0.1, 0.1, 0.15])


def test_context_summary_figure_shows_the_noise_floor_and_greys_what_is_not_significant():
    tested = summary_df().assign(null_mean=[0.02, 0.03, 0.04], null_q95=[0.05, 0.06, 0.07],
                                 p_adjusted=[0.01, 0.5, 1.0], significant=[True, False, False])
    fig = plots.context_summary_figure(tested)
    bars, floor_mean, floor_q95 = fig.data
    assert list(bars.x) == ["chess", "hiring", "purchase"]  # sorted by context, every column along
    assert list(floor_q95.y) == [0.05, 0.07, 0.06] and list(floor_mean.y) == [0.02, 0.04, 0.03]
    assert list(bars.marker.color) == [plots.COLOURWAY[0], plots.PALE, plots.PALE]  # grey: not measured only
    assert list(bars.text) == ["p adj. 0.01", "p adj. 1", "p adj. 0.5"]


def test_head_heatmap_shape_and_diverging_scale():
    scores = np.random.default_rng(0).normal(size=(4, 6))
    fig = plots.head_heatmap(scores, "heads")
    assert np.asarray(fig.data[0].z).shape == (4, 6)
    assert fig.data[0].zmid == 0.0
    positive = plots.head_heatmap(np.abs(scores), "heads")
    assert positive.data[0].zmid is None


def test_top_neurons_figure_picks_top_k_by_signed_score():
    scores = np.zeros((3, 20))
    scores[1, 7], scores[1, 8] = 9.0, -9.0  # oriented scores: the top carries the bias, the bottom opposes it
    scores[2, 3] = np.nan
    fig = plots.top_neurons_figure(scores, k=4, title="neurons")
    assert len(fig.data[0].x) == 12
    assert "L1N7" in fig.data[0].text and "L1N8" not in fig.data[0].text
    assert "L2N3" not in fig.data[0].text


def test_budget_curve_figure_reduction_random_and_greyed_points():
    fig = plots.budget_curve_figure(sweep_df(), scale="raw", smd_method="mixture")
    names = [t.name for t in fig.data]
    # per kind: reduction, random draws, (grey points), anomaly
    assert names == ["head", "head · random", "head · no reduction", "head", "neuron", "neuron · random", "neuron"]
    head, random, grey = fig.data[:3]
    assert list(head.x) == [0.02, 0.05] and list(head.y) == [20.0, 50.0]  # the greyed budget is not a reduction
    assert list(random.y) == [1.0] * 3 and list(random.error_y.array) == [2.0] * 3 and random.line.dash == "dash"
    assert list(grey.x) == [0.01] and list(grey.text) == ["no bias to remove"] and grey.marker.color == plots.GREY
    assert max(fig.data[-1].x) == pytest.approx(0.005)
    assert "scale: raw" in subtitle(fig) and "mixture" in subtitle(fig)


def test_budget_curve_figure_requires_scale():
    with pytest.raises(ValueError, match="scale"):
        plots.budget_curve_figure(sweep_df(), smd_method="mixture")


def test_generalization_matrix_figure_panels_and_cell_text():
    df = matrix_df().assign(scale="log", smd_method="mixture")
    fig = plots.generalization_matrix_figure(df)
    assert len(fig.data) == 4  # (regime, kind) panels
    z = np.asarray(fig.data[0].z, dtype=float)
    assert z.shape == (3, 3) and (z == 3).all()  # every CI [10, 60]: the removal class
    assert fig.data[0].text[0][0] == "40% [10, 60]<br>anom. 3%"
    assert "scale: log" in subtitle(fig)


def test_generalization_matrix_figure_greys_cells_and_leaves_out_random_rows():
    df = matrix_df().assign(scale="log", smd_method="mixture", held_out=True, random_mean=2.0, random_sd=1.0,
                            n_pruned_mean=4.0, bias_to_remove=lambda d: d.target != "hiring")
    df.loc[(df.source == "chess") & (df.target == "purchase"), ["n_pruned_mean", "reduction_pct"]] = [0.0, np.nan]
    draws = df[df.source == "chess"].assign(regime="random", source="random 0", held_out=False)
    in_sample = df.assign(held_out=False, reduction_pct=99.0)
    fig = plots.generalization_matrix_figure(pd.concat([df, draws, in_sample], ignore_index=True))
    assert len(fig.data) == 4  # one heatmap per panel; no random panel, no in-sample rows
    shown = fig.data[0]
    assert list(shown.y) == ["chess", "hiring", "purchase"] and list(shown.x) == ["chess", "hiring", "purchase"]
    z = np.asarray(shown.z, dtype=float)
    assert z[0, 2] == 0 and z[0, 0] == 3 and z[1, 2] == 3  # not measured (grey) / removal: CI above 0
    assert shown.text[0][0] == "40% [10, 60]<br>random 2 ± 1%<br>anom. 3%"
    assert shown.text[0][2] == "nothing pruned"  # no reduction: the status alone
    # a measured cell without a significant bias (the cross-type matrix measures every cell) keeps its numbers
    measured = df[(df.source == "chess") & (df.target == "hiring")].iloc[0]
    assert shown.text[0][1] == (f"no bias to remove<br>{measured.reduction_pct:.0f}% [{measured.ci_low:.0f}, "
                                f"{measured.ci_high:.0f}]<br>random 2 ± 1%<br>anom. {measured.anomaly_rate:.0%}")


def test_bias_vs_anomaly_figure_one_point_per_model():
    fig = plots.bias_vs_anomaly_figure(anomaly_df(), scale="raw", smd_method="mixture")
    assert sorted(len(t.x) for t in fig.data) == [1, 2]
    assert "scale: raw" in subtitle(fig)


# ---------------------------------------------------------------- files


def test_atomic_write_leaves_no_temporary_files_and_readable_files(tmp_path):
    previous = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.txt", "one")
        atomic_write(tmp_path / "a.txt", b"two")
        atomic_write(tmp_path / "b.parquet", lambda path: pd.DataFrame({"x": [1]}).to_parquet(path))
    finally:
        os.umask(previous)
    assert (tmp_path / "a.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.parquet"]
    assert {stat.S_IMODE((tmp_path / name).stat().st_mode) for name in ("a.txt", "b.parquet")} == {0o644}


def test_save_figure_html_embeds_plotlyjs(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "find_browser", lambda: None)
    result = report.save_figure(plots.context_summary_figure(summary_df()), tmp_path, "summary")
    text = result["html"].read_text()
    assert not CDN_SCRIPT.search(text)
    assert "Plotly.newPlot" in text and len(text) > 1_000_000  # the plotly.js bundle is inline
    assert result["png"] is None and "no Chrome/Chromium" in result["message"]
    assert not (tmp_path / "summary.png").exists()


def test_to_markdown_formats_and_aligns():
    df = pd.DataFrame({"name": ["a|b", "c"], "value": [1.23456789, np.nan], "n": [1, 2]})
    lines = report.to_markdown(df).splitlines()
    assert lines[0] == "| name | value | n |"
    assert lines[1] == "|---|---:|---:|"
    assert lines[2] == "| a\\|b | 1.235 | 1 |"
    assert lines[3] == "| c |  | 2 |"


def sections():
    return [
        {"heading": "Audit", "text": "The bias table.\n\n- one\n- two <b>",
         "tables": [("Bias per variation", bias_df()), ("Summary", summary_df(), "The note under the summary.")],
         "figures": [plots.smd_figure(bias_df()), plots.context_summary_figure(summary_df())]},
        {"heading": "Pruning", "text": "Budget sweep.", "figures": [plots.budget_curve_figure(
            sweep_df(), scale="raw", smd_method="mixture")]},
    ]


def test_write_report_writes_html_and_markdown(tmp_path):
    html_path, md_path = report.write_report(tmp_path / "run", "Bias report", sections())
    page = html_path.read_text()
    assert page.count("Plotly.newPlot") == 3
    assert page.count("plotly.js v") == 1 and not CDN_SCRIPT.search(page)  # bundle inlined once
    assert "<caption>Bias per variation</caption>" in page and "<li>two &lt;b&gt;</li>" in page
    md = md_path.read_text()
    assert md.startswith("# Bias report")
    assert "## Audit" in md and "## Pruning" in md and "**Summary**" in md
    assert "| context | variation | smd | ci_low | ci_high | scale | method |" in md
    assert "The note under the summary." in md and "<p>The note under the summary.</p>" in page
    assert "| purchase | x | 0.5 | 0.2 | 0.8 | raw | mixture |" in md


# ---------------------------------------------------------------- with a browser


@needs_chromium
def test_save_figure_writes_png(tmp_path):
    result = report.save_figure(plots.head_heatmap(np.eye(3) - 0.5, "heads"), tmp_path, "heads")
    assert result["message"] == ""
    assert result["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_chromium
def test_save_figures_writes_every_png_in_one_export(tmp_path):
    figures = {"heads": plots.head_heatmap(np.eye(3) - 0.5, "heads"), "summary": plots.context_summary_figure(
        summary_df())}
    results = report.save_figures(figures, tmp_path)
    assert all(r["message"] == "" and r["png"].read_bytes()[:4] == b"\x89PNG" for r in results.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heads.html", "heads.png", "summary.html", "summary.png"]


@needs_chromium
def test_png_export_past_its_time_limit_is_killed_and_said(tmp_path):
    """A browser that hangs cannot hang the report: the export runs in a child process with a time limit (here
    too short for the child even to start) and the HTML is written anyway."""
    result = report.save_figures({"heads": plots.head_heatmap(np.eye(3) - 0.5, "heads")}, tmp_path,
                                 timeout_s=0.2)["heads"]
    assert result["png"] is None and result["message"] == "PNG skipped for heads: export failed (timed out after 0.2 s)"
    assert result["html"].exists() and not (tmp_path / "heads.png").exists()


@needs_chromium
def test_report_renders_offline_in_headless_chromium(tmp_path):
    html_path, _ = report.write_report(tmp_path / "run", "Bias report", sections())
    command = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>",  # no network at all
        f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
        html_path.resolve().as_uri(),
    ]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    figures = re.split(r'class="plotly-graph-div[^"]*"', dom)[1:]
    assert len(figures) == 3
    for figure in figures:
        assert 'class="main-svg"' in figure



def test_refreshing_figures_removes_what_the_run_did_not_make(tmp_path):
    from workbench.pipeline.study_report import refresh_figures

    run, shared = tmp_path / "run", tmp_path / "figures"
    run.mkdir()
    shared.mkdir()
    (run / "audit_smd.png").write_bytes(b"new")
    (run / "audit_smd.html").write_text("new")
    (shared / "audit_smd.png").write_bytes(b"old")
    (shared / "budget_sweep.png").write_bytes(b"stale")
    (shared / "README.txt").write_text("kept")
    refresh_figures(run, shared)
    assert sorted(p.name for p in shared.iterdir()) == ["README.txt", "audit_smd.html", "audit_smd.png"]
    assert (shared / "audit_smd.png").read_bytes() == b"new"


def test_scores_plans_and_selections_are_readable_by_others(tmp_path):
    """Scores, plans and tensors are written whole with the user's normal permissions (not the 0600 that a
    library writing straight to a temporary file would leave)."""
    import torch

    from workbench.components import Component
    from workbench.localize.scores import ComponentScores
    from workbench.prune.plan import PruningPlan, save_tensors

    previous = os.umask(0o022)
    try:
        ComponentScores("attribution", "attn_head", torch.ones(2, 3)).save(tmp_path / "scores")
        PruningPlan(model="m", model_hash="h", components=[Component(0, "attn_head", 1)], method="attribution",
                    selection={"rule": "top_k"}).save(tmp_path / "plan.json")
        save_tensors(tmp_path / "means.safetensors", {"x": torch.zeros(3)})
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"scores.safetensors": 0o644, "scores.json": 0o644, "plan.json": 0o644,
                     "means.safetensors": 0o644}
    assert ComponentScores.load(tmp_path / "scores").scores.sum() == 6


def test_each_removal_states_the_smallest_removal_its_interval_can_detect():
    """mdr from a 95 % interval [-0.1, 0.3]: SE 0.4 / (2 x 1.96), times (1.96 + 0.84) for 80 % power at 0.05."""
    from workbench.pipeline.study_report import with_detectable_removals

    matrix = pd.DataFrame({"removed_low": [-0.1, None], "removed_high": [0.3, None], "difference_low": [0.0, None],
                           "difference_high": [0.2, None]})
    out = with_detectable_removals(matrix)
    assert out.mdr.iloc[0] == pytest.approx(0.4 / (2 * 1.959964) * (1.959964 + 0.841621), rel=1e-4)
    assert out.mdr_vs_random.iloc[0] == pytest.approx(out.mdr.iloc[0] / 2, rel=1e-6)
    assert out[["mdr", "mdr_vs_random"]].iloc[1].isna().all()
