"""The checks of notebooks/03_patching_and_heads.ipynb: the known answers of the planted model, the invariants of
patching and of the head score, and the numbers the notebook's text quotes (`QUOTED`, at the precision the text
gives them), so that the text cannot go stale silently: a re-run that moves a quoted number fails here, and the
text and `QUOTED` are updated together."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

QUOTED: dict[str, float | str] = {
    "tiny_spearman_neurons": 0.98, "tiny_spearman_heads": 1.00, "tiny_head_score": 0.64,
    "tiny_neuron_attribution": 0.260, "tiny_neuron_patching": 0.399, "tiny_head_attribution": 0.408,
    "tiny_head_patching": 0.409, "tiny_slope_neurons": 0.65,
    "n_positive_gaps": 6, "largest_gap": -0.025, "median_head_score": 0.002,
    "smd": 0.014, "smd_low": -0.020, "smd_high": 0.051, "sign": 1,
    "spearman_neurons": 0.98, "spearman_heads": 0.47, "slope_neurons": 0.67, "slope_heads": -0.48,
    "top_positive_neurons": 4, "top_positive_heads": 7,
    "n_flips": 2, "n_flips_heads": 2, "largest_flip": "L1H0", "second_flip": "L3H2",
    "largest_flip_attribution": 0.0141, "largest_flip_patching": -0.0022,
    "reader": "L16H3", "reader_score": 0.074, "reader_attribution_rank": 28, "rho_attention_attribution": 0.09,
    "reader_name_mass": 0.03, "reader_sink_mass": 0.56,
}
"""The numbers the notebook's text quotes, as the text rounds them."""


def _rounded(value, digits: int):
    return value if isinstance(value, str) else round(float(value), digits)


def quoted_numbers(numbers: dict[str, tuple], quoted: dict | None = None) -> list[str]:
    """Every number of `quoted` (default: this notebook's `QUOTED`) equals the computed one of `numbers` (key ->
    (value, digits)) at the text's precision; the keys the text does not quote."""
    quoted_ = QUOTED if quoted is None else quoted
    unquoted, stale = [], []
    for key, (value, digits) in numbers.items():
        shown = _rounded(value, digits)
        if key not in quoted_:
            unquoted.append(key)
            continue
        expected = quoted_[key]
        if isinstance(shown, str) or isinstance(expected, str):
            if shown != expected:
                stale.append(f"{key}: the text says {expected!r}, the notebook computed {shown!r}")
        # within rounding: the text's number is the computed one rounded to `digits`
        elif not math.isclose(shown, expected, abs_tol=0.51 * 10 ** -digits):
            stale.append(f"{key}: the text says {expected}, the notebook computed {float(value):.{digits + 2}f}")
    assert not stale, "; ".join(stale)
    return unquoted


def check(tiny_table: pd.DataFrame, tiny_calibration: pd.DataFrame, tiny_attention, planted, smd: pd.Series,
          sign: float, calibration: pd.DataFrame, points: pd.DataFrame, flips: pd.DataFrame, attention, heads,
          reader, head_rank: float, rho: float, pattern: torch.Tensor, gaps: torch.Tensor, name_span: tuple[int, int],
          uniform: torch.Tensor) -> str:
    """Assert the notebook's claims; a few lines of rounded key numbers ending "... checks passed"."""
    # the planted model: both methods put the planted head and neuron first; the wrong sign puts the neuron last
    assert (tiny_table["rank (attribution)"] == 1).all() and (tiny_table["rank (patching)"] == 1).all()
    neuron_row = tiny_table.set_index("kind").loc["mlp_neuron"]
    assert neuron_row["rank (attribution, wrong sign +1)"] == neuron_row["of"]
    assert (tiny_table["score (attribution)"] > 0).all() and (tiny_table["score (patching)"] > 0).all()
    assert (tiny_calibration.spearman > 0.9).all()
    assert tiny_attention.top(1) == [planted.head]
    # the head score is two means of attention masses: in [0, 2]
    for scores in (tiny_attention.scores, attention.scores):
        assert (scores >= 0).all() and (scores <= 2 + 1e-5).all()
    # the running example: the direction is the sign of the selection half's SMD, and the scores are oriented by it
    assert sign == np.sign(smd.smd) and heads.metadata["orientation"] == sign
    assert set(calibration.n_compared) == {24} and set(calibration.pairs) == {1}
    assert (points["sign flips"] == (np.sign(points["attribution (this pair)"])
                                     != np.sign(points["patching (this pair)"]))).all()
    assert reader == attention.top(1)[0] and 1 <= head_rank <= heads.scores.numel()
    # an attention row is a distribution; a zero query spreads it uniformly over the visible positions
    assert torch.allclose(pattern.sum(1), torch.ones(len(pattern)), atol=1e-4)
    assert torch.allclose(uniform, torch.full_like(uniform, 1 / uniform.numel()), atol=1e-5)

    by_kind = calibration.set_index("kind")
    top = points[points.chosen == "top 12"]
    positive = top.groupby("kind")["patching (this pair)"].apply(lambda s: int((s > 0).sum()))
    largest_flip = flips.iloc[0] if len(flips) else None
    name_mass = float(pattern[:, name_span[0]:name_span[1]].sum(1).mean())
    numbers = {
        "tiny_spearman_neurons": (tiny_calibration.set_index("kind").spearman["mlp_neuron"], 2),
        "tiny_spearman_heads": (tiny_calibration.set_index("kind").spearman["attn_head"], 2),
        "tiny_head_score": (tiny_attention.score(planted.head), 2),
        "tiny_neuron_attribution": (neuron_row["score (attribution)"], 3),
        "tiny_neuron_patching": (neuron_row["score (patching)"], 3),
        "tiny_head_attribution": (tiny_table.set_index("kind").loc["attn_head", "score (attribution)"], 3),
        "tiny_head_patching": (tiny_table.set_index("kind").loc["attn_head", "score (patching)"], 3),
        "tiny_slope_neurons": (tiny_calibration.set_index("kind").slope["mlp_neuron"], 2),
        "n_positive_gaps": (int((gaps > 0).sum()), 0), "largest_gap": (gaps[gaps.abs().argmax()], 3),
        "median_head_score": (attention.scores.median(), 3),
        "smd": (smd.smd, 3), "smd_low": (smd.ci_low, 3), "smd_high": (smd.ci_high, 3), "sign": (sign, 0),
        "spearman_neurons": (by_kind.spearman["mlp_neuron"], 2), "spearman_heads": (by_kind.spearman["attn_head"], 2),
        "slope_neurons": (by_kind.slope["mlp_neuron"], 2), "slope_heads": (by_kind.slope["attn_head"], 2),
        "top_positive_neurons": (positive.get("mlp_neuron", 0), 0), "top_positive_heads": (positive.get("attn_head", 0), 0),
        "n_flips": (len(flips), 0),
        "n_flips_heads": (int((flips.kind == "attn_head").sum()), 0),
        "largest_flip": (largest_flip.component if largest_flip is not None else "none", 0),
        "largest_flip_attribution": (largest_flip["attribution (this pair)"] if largest_flip is not None else 0, 4),
        "largest_flip_patching": (largest_flip["patching (this pair)"] if largest_flip is not None else 0, 4),
        "second_flip": (flips.iloc[1].component if len(flips) > 1 else "none", 0),
        "reader": (reader.label(), 0), "reader_score": (attention.score(reader), 3),
        "reader_attribution_rank": (head_rank, 0), "rho_attention_attribution": (rho, 2),
        "reader_name_mass": (name_mass, 2), "reader_sink_mass": (float(pattern[:, 0].mean()), 2),
    }
    unquoted = quoted_numbers(numbers)
    lines = [
        "planted model: L1N7 and L0H1 rank first under attribution and patching; the wrong sign puts L1N7 last",
        f"running example ({len(points) // 2} components per kind on 1 pair): SMD on the selection half "
        f"{smd.smd:+.3f} [{smd.ci_low:+.3f}, {smd.ci_high:+.3f}], direction {sign:+.0f}",
        f"attribution vs patching: Spearman neurons {by_kind.spearman['mlp_neuron']:.2f}, heads "
        f"{by_kind.spearman['attn_head']:.2f}; {len(flips)} sign flips"
        + (f", the largest {largest_flip.component}" if largest_flip is not None else ""),
        f"head score: {reader.label()} reads the name most ({attention.score(reader):.3f}), attribution rank "
        f"{head_rank:.0f}; Spearman with attribution {rho:+.2f}",
    ]
    if unquoted:
        lines.append("not quoted by the text: " + ", ".join(f"{k}={_rounded(*numbers[k])}" for k in unquoted))
    return "\n".join(lines + ["patching and head-score checks passed"])
