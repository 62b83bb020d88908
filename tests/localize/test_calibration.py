"""Attribution against patching: the calibration table's known answers and the choice of the patching pairs."""

import numpy as np
import pytest
import torch

from workbench.localize.calibration import calibration_row
from workbench.localize.scores import ComponentScores
from workbench.pipeline.study import patching_pairs
from workbench.readout.engine import AnswerDistribution
from workbench.readout.prompts import PromptSet


def scores(values, method: str) -> ComponentScores:
    scores = torch.tensor(values, dtype=torch.float32).view(2, -1)
    return ComponentScores(method=method, kind="attn_head", scores=scores, metadata={"pairs": 1})


def test_calibration_row_recovers_a_known_linear_relation():
    reference = np.linspace(-1.0, 1.0, 12)
    row = calibration_row(scores(2 * reference + 0.5, "attribution"), scores(reference, "activation_patching"))
    assert row["slope"] == pytest.approx(2) and row["intercept"] == pytest.approx(0.5, abs=1e-6)
    assert row["spearman"] == pytest.approx(1) and row["median_ratio"] == pytest.approx(2) and row["n_compared"] == 12


def test_calibration_row_is_undefined_when_a_method_scores_every_component_alike():
    """A pair whose answers are one number each (top-p keeps a single token) gives zero gradients and no patching
    effect: the row says nothing (NaN), it does not fail."""
    row = calibration_row(scores(np.zeros(12), "attribution"), scores(np.zeros(12), "activation_patching"))
    assert np.isnan([row["spearman"], row["slope"], row["overlap_50"]]).all() and row["n_compared"] == 12


def test_patching_pairs_prefer_pairs_whose_answers_both_have_spread():
    prompts = PromptSet.build(["purchase"], names=["Hunter", "Jake", "DaShawn", "Jamal"],
                              variations={"purchase": ["car"]})
    point = AnswerDistribution(values=np.array([100.0]), probs=np.array([1.0]), invalid_mass=0.0, unexplored_mass=0.0)
    spread = AnswerDistribution(values=np.array([100.0, 200.0]), probs=np.array([0.7, 0.3]), invalid_mass=0.0,
                                unexplored_mass=0.0)
    distributions = {(p.context, p.variation, p.name): point if p.name == "DaShawn" else spread for p in prompts}
    first, second = prompts.pairs()
    assert [p.name for p in first] == ["Hunter", "DaShawn"]
    assert patching_pairs(prompts, distributions, 1) == [second]
    assert patching_pairs(prompts, distributions, 2) == [second, first]
