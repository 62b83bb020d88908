"""The study's report: figures and headline tables built from a finished run directory."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from workbench import plots
from workbench.localize.scores import ComponentScores
from workbench.report import save_figure, write_report
from workbench.runstore import RunDir

SCORE_FILES = {
    "attribution": ("attribution_neurons", "attribution_heads"),
    "activation patching": ("patching_neurons", "patching_heads"),
    "zero ablation": ("ablation_neurons", "ablation_heads"),
    "head attention to name": (None, "head_attention"),
}


def load_scores(run: RunDir) -> dict[str, dict[str, ComponentScores]]:
    found: dict[str, dict[str, ComponentScores]] = {}
    for method, stems in SCORE_FILES.items():
        for kind, stem in zip(("mlp_neuron", "attn_head"), stems):
            if stem and run.path(f"scores/{stem}.json").exists():
                found.setdefault(method, {})[kind] = ComponentScores.load(run.path(f"scores/{stem}"))
    return found


def top_table(scores: dict[str, dict[str, ComponentScores]], kind: str, k: int = 10) -> pd.DataFrame:
    """The top-k components of each method, side by side."""
    columns = {}
    for method, by_kind in scores.items():
        if kind in by_kind:
            chosen = by_kind[kind].top(k)
            columns[method] = [f"{c.label()} ({by_kind[kind].score(c):+.3g})" for c in chosen]
    width = max((len(v) for v in columns.values()), default=0)
    return pd.DataFrame({m: v + [""] * (width - len(v)) for m, v in columns.items()}, index=range(1, width + 1))


def _timings(run: RunDir, name: str) -> pd.DataFrame:
    path = run.path(name)
    if not path.exists():
        return pd.DataFrame()
    data = run.read_json(name)
    return pd.DataFrame({"step": list(data), "seconds": [round(v, 1) for v in data.values()]})


def build_sections(run: RunDir, manifest: dict) -> tuple[list[dict], dict]:
    """Report sections and the figures to copy into figures/."""
    figures = {}
    bias = run.read_table("tables/bias.parquet")
    summary = run.read_table("tables/context_summary.parquet")
    groups = run.read_table("tables/group_means.parquet")
    audit = run.read_json("audit_summary.json")
    scale, method = bias.scale.iloc[0], bias.method.iloc[0]
    figures["audit_smd"] = plots.smd_figure(bias)
    figures["audit_context_summary"] = plots.context_summary_figure(summary)
    figures["audit_group_means"] = plots.group_means_figure(groups)
    config = manifest["config"]
    sections = [{
        "heading": "Study",
        "text": (f"Model: `{manifest['model']['model']}` (weights SHA-256 {manifest['model']['weight_hash'][:16]}...), "
                 f"device {manifest['device']}, seed {manifest['seed']}. {audit['prompts']} prompts "
                 f"({config['audit']['names_per_group']} names per race x gender group). Bias is the SMD between "
                 f"White- and Black-name answers on the {scale} scale ({method} method; positive = White names "
                 f"get higher numbers). Answers come from the exact read-out: mean valid mass "
                 f"{audit['mean_valid_mass']:.2f}, unexplored {audit['mean_unexplored_mass']:.2f}."),
        "tables": [("Timings (s)", pd.DataFrame({"stage": list(manifest["timings_s"]),
                                                  "seconds": [round(v, 1) for v in manifest["timings_s"].values()]}))],
    }, {
        "heading": "Audit",
        "text": "Mean |SMD| per context and SMD per variation, with 95 % bootstrap CIs resampling names.",
        "tables": [("Mean |SMD| per context", summary.round(3)),
                   ("SMD per variation", bias[["context", "variation", "smd", "ci_low", "ci_high", "mean_white",
                                               "mean_black", "p_mwu", "n_invalid", "note"]].round(3))],
        "figures": [figures["audit_context_summary"], figures["audit_smd"], figures["audit_group_means"]],
    }]
    scores = load_scores(run)
    if scores:
        for method, by_kind in scores.items():
            if "attn_head" in by_kind:
                key = "heads_" + method.replace(" ", "_")
                figures[key] = plots.head_heatmap(by_kind["attn_head"].scores.numpy(), f"Heads: {method}")
        if "attribution" in scores:
            figures["neurons_attribution"] = plots.top_neurons_figure(
                scores["attribution"]["mlp_neuron"].scores.numpy(), k=5, title="Top neurons per layer: attribution")
        agreement = run.read_table("tables/localize_agreement.parquet")
        sections.append({
            "heading": "Localisation",
            "text": (f"Every MLP neuron and attention head scored on the {config['localize']['context']} context. "
                     "Scores are in units of the expected log answer: how much of the White-Black gap a component "
                     "carries (positive = it carries the gap)."),
            "tables": [("Top 10 neurons per method", top_table(scores, "mlp_neuron")),
                       ("Top 10 heads per method", top_table(scores, "attn_head")),
                       ("Agreement between methods", agreement.round(3)),
                       ("Wall time per method (s)", _timings(run, "localize_timings.json"))],
            "figures": [figures[k] for k in figures if k.startswith(("heads_", "neurons_"))],
        })
    if run.path("tables/generalization.parquet").exists():
        sections.append(generalization_section(run, figures))
    return sections, figures


def generalization_section(run: RunDir, figures: dict) -> dict:
    matrix = run.read_table("tables/generalization.parquet")
    sweep = run.read_table("tables/sweep.parquet")
    overlap = run.read_table("tables/overlap.parquet")
    figures["generalization_matrix"] = plots.generalization_matrix_figure(matrix)
    figures["budget_sweep"] = plots.budget_curve_figure(sweep)
    points = matrix.assign(label=matrix.regime + ": " + matrix.source + " -> " + matrix.target)
    figures["bias_vs_anomaly"] = plots.bias_vs_anomaly_figure(points)
    headline = regime_summary(matrix)
    columns = ["regime", "kind", "source", "target", "bias_before", "bias_after", "reduction_pct", "ci_low",
               "ci_high", "anomaly_rate", "baseline_anomaly_rate", "invalid_rate", "n_pruned_mean"]
    return {
        "heading": "Pruning and generalisation",
        "text": ("Bias reduction = 1 - mean|SMD| after / before on the target prompts, with a paired bootstrap CI. "
                 "Anomaly rate = share of the pruned model's answer mass outside the unpruned model's [5 %, 95 %] "
                 "range (the unpruned model itself scores about 0.1 by construction: compare with "
                 "baseline_anomaly_rate)."),
        "tables": [("Mean reduction per regime and kind (the paper's comparison)", headline),
                   ("Generalisation matrix", matrix[columns].round(3)),
                   ("Budget sweep (matched budgets)", sweep.round(4)),
                   ("Jaccard overlap of context-level components", overlap.pivot_table(
                       index=["kind", "source"], columns="target", values="jaccard").round(2).reset_index())],
        "figures": [figures["generalization_matrix"], figures["budget_sweep"], figures["bias_vs_anomaly"]],
    }


def regime_summary(matrix: pd.DataFrame) -> pd.DataFrame:
    """Bias before and after, pooled over the cells of each regime and kind (off-diagonal cells only for
    cross-context): reduction = 1 - mean bias after / mean bias before, robust to cells with tiny bias."""
    rows = matrix[(matrix.regime != "cross_context") | (matrix.source != matrix.target)]
    table = rows.groupby(["regime", "kind"]).agg(bias_before=("bias_before", "mean"),
                                                 bias_after=("bias_after", "mean"),
                                                 anomaly_rate=("anomaly_rate", "mean"),
                                                 cells=("reduction_pct", "size")).reset_index()
    table.insert(4, "reduction_pct", 100 * (1 - table.bias_after / table.bias_before))
    order = {"prompt": 0, "leave_one_out": 1, "cross_context": 2}
    return table.sort_values(by="regime", key=lambda r: r.map(order)).round(2).reset_index(drop=True)


def write_study_report(run: RunDir, manifest: dict, figures_dir: Path | None) -> Path:
    sections, figures = build_sections(run, manifest)
    messages = []
    for stem, figure in figures.items():
        saved = save_figure(figure, run.path("figures"), stem)
        if saved["message"]:
            messages.append(saved["message"])
    if messages:
        sections[0]["text"] += f" PNG export: {messages[0]}"
    html_path, _ = write_report(run.root, "biasprune study report", sections)
    if figures_dir is not None:
        figures_dir.mkdir(parents=True, exist_ok=True)
        for path in run.path("figures").glob("*"):
            if path.suffix in (".png", ".html"):
                shutil.copy2(path, figures_dir / path.name)
    return html_path


def headline_numbers(run: RunDir) -> dict:
    summary = run.read_table("tables/context_summary.parquet")
    return {r.context: [round(r.mean_abs_smd, 3), round(r.ci_low, 3), round(r.ci_high, 3)]
            for r in summary.itertuples() if np.isfinite(r.mean_abs_smd)}
