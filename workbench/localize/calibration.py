"""Attribution patching calibrated against activation patching on the same pairs.

Attribution patching is a first-order estimate of activation patching; this measures how good the estimate is on a
model: both methods score the same components on the same pairs (`PairedInputs`), and per kind the table gives
- `n_compared`: components scored by both (every head; for neurons the top `n_top` of attribution by |score| and a
  uniform random sample of `n_random` others: patching every neuron is out of reach on a CPU, so patching's own top
  neurons are its top among these);
- `spearman`: rank correlation over all compared components (not only the top, where ranks are compressed);
- `overlap_50`: |top-50 of attribution & top-50 of patching| / 50, both ranked by signed score among the compared;
- `slope`, `intercept`: least squares of attribution on patching (1 and 0 if the estimate is unbiased in size);
- `median_ratio`: the median of attribution / patching over the compared components whose patching effect is
  among the largest tenth (how far the magnitudes differ where it matters).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

from workbench.components import Component, ModelShape
from workbench.localize.pairs import PairedInputs
from workbench.localize.patching import patching_scores
from workbench.localize.scores import ComponentScores

CALIBRATION_COLUMNS = ["kind", "method", "reference", "pairs", "n_compared", "spearman", "overlap_50", "slope",
                       "intercept", "median_ratio"]


def neurons_to_compare(attribution: ComponentScores, neurons: list[Component], n_top: int, n_random: int,
                       seed: int = 0) -> list[Component]:
    """Attribution's top `n_top` neurons by |score| and `n_random` others of `neurons` (every neuron) drawn
    uniformly (seeded)."""
    top = attribution.top(n_top, absolute=True)
    chosen = set(top)
    rest = [c for c in neurons if c not in chosen]
    order = np.random.default_rng(seed).permutation(len(rest))[:n_random]
    return top + [rest[int(i)] for i in sorted(order)]


def calibration_row(estimate: ComponentScores, reference: ComponentScores, top: int = 50) -> dict:
    """How well `estimate` reproduces `reference` over the components both scored (see the module)."""
    both = torch.isfinite(estimate.scores) & torch.isfinite(reference.scores)
    x = reference.scores[both].numpy().astype(float)
    y = estimate.scores[both].numpy().astype(float)
    row = {"kind": estimate.kind, "method": estimate.method, "reference": reference.method,
           "pairs": reference.metadata.get("pairs"), "n_compared": int(both.sum())}
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:  # a method that scores every component alike ranks none
        return row | {"spearman": np.nan, "overlap_50": np.nan, "slope": np.nan, "intercept": np.nan,
                      "median_ratio": np.nan}
    k = min(top, len(x))
    overlap = len(set(np.argsort(-x, kind="stable")[:k]) & set(np.argsort(-y, kind="stable")[:k])) / k
    slope, intercept = np.polyfit(x, y, 1)
    large = np.abs(x) >= np.quantile(np.abs(x), 0.9)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = float(np.median(y[large] / x[large]))
    return row | {"spearman": float(spearmanr(x, y).statistic), "overlap_50": overlap, "slope": float(slope),
                  "intercept": float(intercept), "median_ratio": ratio}


def calibrate_attribution(bridge, inputs: PairedInputs, attribution: tuple[ComponentScores, ComponentScores],
                          n_top: int = 100, n_random: int = 500, seed: int = 0, max_rows: int = 64,
                          progress: bool = False) -> tuple[pd.DataFrame, tuple[ComponentScores, ComponentScores]]:
    """Patch every head and the neurons of `neurons_to_compare` on the pairs attribution was computed on; the
    calibration table (one row per kind) and the patching scores (neurons, heads)."""
    neurons, heads = attribution
    shape = ModelShape.of(bridge)
    compared = neurons_to_compare(neurons, shape.all("mlp_neuron"), n_top, n_random, seed)
    patched_neurons = patching_scores(bridge, inputs, compared, max_rows, progress)
    patched_heads = patching_scores(bridge, inputs, shape.all("attn_head"), max_rows, progress)
    table = pd.DataFrame([calibration_row(neurons, patched_neurons), calibration_row(heads, patched_heads)],
                         columns=CALIBRATION_COLUMNS)
    return table, (patched_neurons, patched_heads)
