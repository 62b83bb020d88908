"""The cross-type matrix on a planted model whose race and gender biases run through different heads.

workbench.testing.planted with `z_head` and `gendered_prompts`: "Q" marks a Black name and the planted head moves it,
"Z" marks a woman's name and the Z head moves it; both heads feed one shared neuron. So the known answer is:
- heads: the race pruning is the planted head and the gender pruning the Z head (Jaccard 0); each removes its
  own type's bias and does not reduce the other's (it grows: the answers saturate, so with one marker gone the
  other moves the answer further), and each outranks every random draw on its own type only (3 draws keep the
  test fast: rank 0, p_rank 1/4, and no better_than_random verdict, which needs 19);
- neurons: both types choose the shared neuron (Jaccard 1), which removes both biases.
The test fails if the matrix mixes up source or target types (that pairs follow the contrast is checked in
tests/localize/test_pairs.py).
"""

from __future__ import annotations

import pandas as pd
import pytest

from workbench.audit.bias_types import GENDER
from workbench.audit.stats import RACE
from workbench.audit.table import run_audit
from workbench.components import ModelShape
from workbench.models import wrap
from workbench.prune import cross_type, generalize
from workbench.readout.engine import ExactReadoutConfig
from workbench.testing.planted import gendered_prompts, planted_model

READOUT = ExactReadoutConfig(max_tokens=2)
STATS = dict(scale="log", method="mixture", n_boot=200, seed=0)
ONE_EACH = {"mlp_neuron": 1, "attn_head": 1}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def planted():
    """The planted model, its held-out cross-type cases (race and gender, 2 folds) with random draws, the
    matrix and the overlap."""
    model = planted_model(z_head=(0, 2), noise=0.3, answer_gap=0.15)
    prompts = gendered_prompts(n_names=4)  # 2 names per group in each fold: a bootstrap per fold
    bridge = wrap(model.model, model.tokenizer, "tiny-planted")
    baseline = run_audit(bridge, prompts, exact=READOUT, progress=False)
    folds = generalize.name_folds(prompts, seed=0)
    fold_scores = [{c.name: generalize.variation_scores(bridge, selection, 5, READOUT, progress=False, contrast=c)
                    for c in (RACE, GENDER)} for selection, _ in folds]
    cases = cross_type.cross_fit_type_cases(folds, fold_scores, "tip", ONE_EACH)
    cases += generalize.random_cases(ModelShape.of(bridge), prompts, ONE_EACH, n_draws=3, seed=0)
    after = generalize.pruned_answers(bridge, prompts, baseline, cases, READOUT, progress=False)
    matrix = cross_type.cross_type_matrix(after, baseline, [RACE, GENDER], STATS)
    return model, cases, matrix, cross_type.type_overlap(cases)


def cell(matrix: pd.DataFrame, kind: str, source: str, target: str) -> pd.Series:
    rows = matrix[(matrix.kind == kind) & (matrix.source_type == source) & (matrix.target_type == target)]
    assert len(rows) == 1
    return rows.iloc[0]


def test_each_type_chooses_its_own_head_and_both_the_shared_neuron(planted):
    model, cases, _, overlap = planted
    chosen = {(c.kind, c.source, c.fold): c.pruning.components for c in cases if c.regime == cross_type.REGIME}
    for fold in (0, 1):
        assert chosen[("attn_head", "race", fold)] == [model.head]
        assert chosen[("attn_head", "gender", fold)] == [model.z_head]
        assert chosen[("mlp_neuron", "race", fold)] == chosen[("mlp_neuron", "gender", fold)] == [model.neuron]
    jaccard = overlap.set_index(["kind", "source_type", "target_type"]).jaccard
    assert jaccard[("attn_head", "race", "gender")] == 0 and jaccard[("attn_head", "race", "race")] == 1
    assert jaccard[("mlp_neuron", "race", "gender")] == 1


@pytest.mark.parametrize("own, other", [("race", "gender"), ("gender", "race")])
def test_a_head_pruning_removes_its_own_type_and_leaves_the_other(planted, own, other):
    _, _, matrix, _ = planted
    diagonal = cell(matrix, "attn_head", own, own)
    across = cell(matrix, "attn_head", own, other)
    assert diagonal.held_out and across.held_out
    assert diagonal.bias_before > 0.5 and across.bias_before > 0.5  # both biases are there to remove
    assert diagonal.reduction_pct > 85 and diagonal.removed_low > 0.5 * diagonal.bias_before
    assert across.reduction_pct < 0 and across.bias_after > across.bias_before  # not reduced: it grows
    assert across.removed_high < 0
    assert diagonal["rank"] == 0 and diagonal.p_rank == pytest.approx(1 / 4) and across["rank"] == 3
    assert diagonal.difference_low > 0 and across.difference_high < 0
    assert pd.isna(diagonal.better_than_random)  # 3 draws: too few for a verdict
    assert abs(diagonal.random_mean) < 10 and diagonal.n_random == 3


def test_the_shared_neuron_removes_both_types(planted):
    _, _, matrix, _ = planted
    for own in ("race", "gender"):
        for target in ("race", "gender"):
            row = cell(matrix, "mlp_neuron", own, target)
            assert row.reduction_pct > 85 and row["rank"] == 0 and row.difference_low > 0


def test_the_matrix_rows_are_each_target_types_own_statistics(planted):
    """The same pruned answers give each target type its own bias: race and gender rows differ before pruning,
    and every held-out row of a target type shares that type's bias_before (the same names and directions)."""
    _, _, matrix, _ = planted
    before = matrix[matrix.held_out].groupby("target_type").bias_before.agg(["min", "max"])
    assert (before["max"] - before["min"] < 1e-9).all()
    assert before.loc["race", "min"] != pytest.approx(before.loc["gender", "min"], abs=1e-6)
    assert set(matrix.source_type) == {"race", "gender", "random 0", "random 1", "random 2"}


# ------------------------------------------------------------------------------------------ types by name

def test_unknown_bias_types_are_named():
    assert [c.name for c in cross_type.contrasts_named(["gender", "race"])] == ["gender", "race"]
    with pytest.raises(ValueError, match=r"unknown bias type\(s\) \['sex'\]"):
        cross_type.contrasts_named(["sex"])
