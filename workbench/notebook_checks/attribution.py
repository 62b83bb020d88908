"""Checks of notebook 02 (attribution): on the planted model the planted head and neuron rank first under the
plant's direction and the planted neuron last under the wrong one; on the running example's selection half the
scores are oriented by that half's bias per job, the tables rank by signed score and the figures show what the
tables list, the per-layer sums add up to the totals; and every number the text quotes is the one computed
(`QUOTED`). Returns a short summary for tests/test_notebooks.py to compare."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from workbench.notebook_checks import assert_quoted

NOTEBOOK = "02_attribution"
GUARD, DEVELOPER = "convenience store security guard", "software developer"

QUOTED = {
    # the planted model
    "planted gap": "0.242", "planted neuron score": "0.416", "planted head score": "0.695",
    "planted next neuron": "0.00001", "planted next head": "0.038",
    "planted neuron patching": "0.242", "planted head patching": "0.242",
    # the selection half
    "half guard smd": "-0.069", "half developer smd": "0.014",
    "guard pairs with gradient": "2",
    "guard gap": "0.0105", "developer gap": "0.0041",
    # the rankings
    "guard top neuron": "0.00053", "guard top head": "0.00055",
    "developer top neuron": "0.0018", "developer top head": "0.0035",
    "developer top head share %": "85",
    "guard layer-0 neurons in top 10": "5",
    "guard layer-0 mlp sum": "0.0042", "guard layer-0 mlp share %": "40", "developer layer-0 mlp sum": "-0.0110",
    "developer neuron positive sum": "0.863", "developer neuron negative sum": "-0.873",
    "shared top-64 neurons": "2", "oriented spearman": "-0.17", "un-oriented spearman": "0.17",
}
SHARED_TOP3 = ["L0N368"]  # the text names it


def _rank_of(scores, component) -> int:
    """1 = the highest signed score."""
    order = scores.top(scores.scores.numel())
    return order.index(component) + 1


def _figure_labels(figure) -> set[str]:
    return {str(label) for trace in figure.data for label in (getattr(trace, "text", None) or [])}


def check(*, planted, tiny_pairs, tiny_direction: float, tiny_scores: tuple, wrong_scores: tuple,
          tiny_patching: dict, half: pd.DataFrame, directions: pd.DataFrame, half_bias: pd.DataFrame,
          pairs_with_gradient: dict, scores: dict, tables: dict, neuron_figures: dict, layers: pd.DataFrame,
          overlap: int, rho: float, rho_raw: float, shared_top3: list[str], context: str) -> str:
    """Assert notebook 02's claims; return its key numbers, rounded, ending "attribution checks passed".

    planted: the PlantedModel; tiny_pairs: its PairedInputs; tiny_direction: the sign of its bias (from its audit);
    tiny_scores / wrong_scores: (neurons, heads) oriented by it and by its opposite; tiny_patching: kind ->
    activation-patching ComponentScores of the planted components; half: the selection half's answers; directions:
    `bias_directions` of the half; half_bias: its bias table; pairs_with_gradient: job -> pairs whose Black prompt
    leaves the anchor; scores: the study's `variation_scores` on the half; tables: (job, kind) -> the top table
    shown; neuron_figures: job -> the top-neurons figure shown; layers: per (job, kind, layer) signed sums; overlap:
    the shared top-64 neurons of the two jobs; rho / rho_raw: Spearman of the two jobs' neuron scores, oriented and
    un-oriented; shared_top3: the neurons in both jobs' top 3."""
    # the planted circuit: found first, with the plant's direction; last, with the wrong one
    neurons, heads = tiny_scores
    assert tiny_direction == -1.0 and bool((tiny_pairs.gap < 0).all())  # the plant raises Black answers
    assert neurons.top(1) == [planted.neuron] and heads.top(1) == [planted.head]
    assert neurons.metadata["orientation"] == heads.metadata["orientation"] == tiny_direction
    wrong_neurons, wrong_heads = wrong_scores
    torch.testing.assert_close(wrong_neurons.scores, -neurons.scores)
    assert _rank_of(wrong_neurons, planted.neuron) == neurons.scores.numel()
    assert _rank_of(wrong_heads, planted.head) == heads.scores.numel()
    neuron_patch = tiny_patching["mlp_neuron"].score(planted.neuron)
    head_patch = tiny_patching["attn_head"].score(planted.head)
    assert neuron_patch > 0.1 and head_patch > 0.1

    # the selection half: 16 names, both jobs; directions are the signs of its SMDs
    assert half.name.nunique() == 16 and len(half) == 32
    assert (half.groupby(["race", "gender"]).name.nunique() == 4).all()
    bias = half_bias.set_index("variation")
    sign = directions.set_index("variation").sign
    assert (sign == np.sign(bias.smd)).all() and set(sign) <= {-1.0, 1.0}
    gaps = {}
    for job in (GUARD, DEVELOPER):
        by_kind = scores[(context, job)]
        for kind, s in by_kind.items():
            meta = s.metadata
            assert meta["orientation"] == sign[job] and meta["pairs"] == 8 and meta["bias_type"] == "race"
            assert torch.isfinite(s.scores).all()
            table = tables[(job, kind)]
            # the table ranks by signed score: it is `top`, in order, with its scores
            assert list(table.component) == [c.label() for c in s.top(len(table))]
            assert table.score.is_monotonic_decreasing
            assert np.allclose(table.score, [s.score(c) for c in s.top(len(table))])
            assert s.top(1)[0].label() == table.component.iloc[0]
        # the half's pairs agree with its SMD on the direction: the oriented mean gap is positive
        gaps[job] = by_kind["mlp_neuron"].metadata["mean_gap"] * sign[job]
        assert gaps[job] > 0
        # the figure shows every neuron the table lists
        shown = _figure_labels(neuron_figures[job])
        assert set(tables[(job, "mlp_neuron")].component) <= shown, "the figure and the table disagree"
    assert pairs_with_gradient[DEVELOPER] == 8

    # the per-layer sums add up to the totals
    for (job, kind), part in layers.groupby(["job", "kind"]):
        total = float(scores[(context, job)][kind].scores.sum())
        assert np.isclose(part.signed.sum(), total, rtol=1e-4, atol=1e-7)
        assert (part.positive >= 0).all() and (part.negative <= 0).all()

    assert np.isclose(rho_raw, -rho)  # the jobs' directions are opposite
    assert shared_top3 == SHARED_TOP3
    layer0 = layers[(layers.kind == "mlp_neuron") & (layers.layer == 0)].set_index("job").signed

    guard_top = {k: scores[(context, GUARD)][k] for k in ("mlp_neuron", "attn_head")}
    dev_top = {k: scores[(context, DEVELOPER)][k] for k in ("mlp_neuron", "attn_head")}
    guard_neurons10 = guard_top["mlp_neuron"].top(10)
    dev_heads = dev_top["attn_head"]
    numbers = {
        "planted gap": -float(tiny_pairs.gap.mean()),
        "planted neuron score": neurons.score(planted.neuron), "planted head score": heads.score(planted.head),
        "planted next neuron": neurons.score(neurons.top(2)[1]), "planted next head": heads.score(heads.top(2)[1]),
        "planted neuron patching": neuron_patch, "planted head patching": head_patch,
        "half guard smd": bias.smd[GUARD], "half developer smd": bias.smd[DEVELOPER],
        "guard pairs with gradient": pairs_with_gradient[GUARD],
        "guard gap": gaps[GUARD], "developer gap": gaps[DEVELOPER],
        "guard top neuron": guard_top["mlp_neuron"].score(guard_neurons10[0]),
        "guard top head": guard_top["attn_head"].score(guard_top["attn_head"].top(1)[0]),
        "developer top neuron": dev_top["mlp_neuron"].score(dev_top["mlp_neuron"].top(1)[0]),
        "developer top head": dev_heads.score(dev_heads.top(1)[0]),
        "developer top head share %": 100 * dev_heads.score(dev_heads.top(1)[0]) / gaps[DEVELOPER],
        "guard layer-0 neurons in top 10": sum(c.layer == 0 for c in guard_neurons10),
        "shared top-64 neurons": overlap,
        "guard layer-0 mlp sum": layer0[GUARD], "guard layer-0 mlp share %": 100 * layer0[GUARD] / gaps[GUARD],
        "developer layer-0 mlp sum": layer0[DEVELOPER],
        "developer neuron positive sum": float(dev_top["mlp_neuron"].scores.clamp(min=0).sum()),
        "developer neuron negative sum": float(dev_top["mlp_neuron"].scores.clamp(max=0).sum()),
        "oriented spearman": rho, "un-oriented spearman": rho_raw,
    }
    assert_quoted(NOTEBOOK, QUOTED, numbers)

    def line(job: str) -> str:
        by_kind = scores[(context, job)]
        top = {kind: ", ".join(f"{c.label()} {by_kind[kind].score(c):+.2g}" for c in by_kind[kind].top(2))
               for kind in ("mlp_neuron", "attn_head")}
        return (f"{job}: direction {sign[job]:+.0f} (half's SMD {bias.smd[job]:+.3f}), oriented gap "
                f"{gaps[job]:.4f}; top neurons {top['mlp_neuron']}; top heads {top['attn_head']}")

    return "\n".join([
        f"planted: {planted.neuron.label()} and {planted.head.label()} rank first (attribution "
        f"{neurons.score(planted.neuron):.3f}, {heads.score(planted.head):.3f}; patching {neuron_patch:.3f}, "
        f"{head_patch:.3f}; gap {numbers['planted gap']:.3f}), last under the wrong direction",
        line(GUARD),
        line(DEVELOPER),
        f"guard pairs with a gradient: {pairs_with_gradient[GUARD]} of 8; shared top-64 neurons: {overlap} "
        f"({', '.join(shared_top3)} in both top 3); Spearman of the jobs' neuron scores {rho:+.2f}",
        "attribution checks passed",
    ])
