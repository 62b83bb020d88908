"""The cross-type matrix on a planted model whose race and gender biases run through different heads.

workbench.testing.planted with `z_head` and `gendered_prompts`: "Q" marks a Black name and the planted head moves it,
"Z" marks a woman's name and the Z head moves it; both heads feed one shared neuron. So the known answer is:
- heads: the race pruning is the planted head and the gender pruning the Z head (Jaccard 0); each removes its
  own type's bias and does not reduce the other's (it grows: the answers saturate, so with one marker gone the
  other moves the answer further), and each beats the random draws on its own type only;
- neurons: both types choose the shared neuron (Jaccard 1), which removes both biases.
The test fails if the matrix mixes up source or target types, or if pairs do not follow the contrast.
"""

from __future__ import annotations

import pandas as pd
import pytest

from workbench.audit.bias_types import BLACK_WOMEN_VS_REST, BLACK_WOMEN_VS_WHITE_MEN, GENDER
from workbench.audit.stats import RACE
from workbench.audit.table import run_audit
from workbench.components import ModelShape
from workbench.localize.pairs import contrast_pairs
from workbench.models import wrap
from workbench.prune import cross_type, generalize
from workbench.readout.engine import ExactReadoutConfig
from workbench.readout.prompts import PromptSet
from workbench.testing.planted import BLACK_NAMES, QZ_NAMES, WHITE_NAMES, Z_NAMES, gendered_prompts, planted_model

READOUT = ExactReadoutConfig(max_tokens=2)
STATS = dict(scale="log", method="mixture", n_boot=200, seed=0)
ONE_EACH = {"mlp_neuron": 1, "attn_head": 1}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def planted():
    """The planted model, its held-out cross-type cases (race and gender, 2 folds) with random draws, the
    matrix and the overlap."""
    model = planted_model(z_head=(0, 2), noise=0.3, answer_gap=0.15)
    prompts = gendered_prompts(n_names=3)
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
    assert diagonal.reduction_pct > 85 and diagonal.ci_low > 50
    assert across.reduction_pct < 0 and across.bias_after > across.bias_before  # not reduced: it grows
    assert bool(diagonal.better_than_random) and not bool(across.better_than_random)
    assert abs(diagonal.random_mean) < 10 and diagonal.n_random == 3


def test_the_shared_neuron_removes_both_types(planted):
    _, _, matrix, _ = planted
    for own in ("race", "gender"):
        for target in ("race", "gender"):
            row = cell(matrix, "mlp_neuron", own, target)
            assert row.reduction_pct > 85 and bool(row.better_than_random)


def test_the_matrix_rows_are_each_target_types_own_statistics(planted):
    """The same pruned answers give each target type its own bias: race and gender rows differ before pruning,
    and every row of a target type shares that type's bias_before."""
    _, _, matrix, _ = planted
    before = matrix.groupby("target_type").bias_before.agg(["min", "max"])
    assert (before["max"] - before["min"] < 1e-9).all()
    assert before.loc["race", "min"] != pytest.approx(before.loc["gender", "min"], abs=1e-6)
    assert set(matrix.source_type) == {"race", "gender", "random 0", "random 1", "random 2"}


# ------------------------------------------------------------------------------------------------ pairs

def test_pairs_follow_the_contrast():
    prompts = gendered_prompts(("lamp",), n_names=2)
    names = lambda pairs: [(a.name, b.name) for a, b in pairs]  # noqa: E731
    assert contrast_pairs(prompts, RACE) == prompts.pairs()
    assert names(contrast_pairs(prompts, RACE)) == [(WHITE_NAMES[0], BLACK_NAMES[0]), (WHITE_NAMES[1], BLACK_NAMES[1]),
                                                    (Z_NAMES[0], QZ_NAMES[0]), (Z_NAMES[1], QZ_NAMES[1])]
    assert names(contrast_pairs(prompts, GENDER)) == [(WHITE_NAMES[0], Z_NAMES[0]), (WHITE_NAMES[1], Z_NAMES[1]),
                                                      (BLACK_NAMES[0], QZ_NAMES[0]), (BLACK_NAMES[1], QZ_NAMES[1])]
    assert names(contrast_pairs(prompts, BLACK_WOMEN_VS_WHITE_MEN)) == list(zip(WHITE_NAMES[:2], QZ_NAMES[:2]))
    rest = names(contrast_pairs(prompts, BLACK_WOMEN_VS_REST))
    assert len(rest) == 6 and [b for _, b in rest] == list(QZ_NAMES[:2]) * 3


def test_unequal_sides_are_named():
    prompts = PromptSet([p for p in gendered_prompts(("lamp",), n_names=2) if p.name != Z_NAMES[1]])
    with pytest.raises(ValueError, match="tip/lamp for gender: 2 white men and 1 women prompts"):
        contrast_pairs(prompts, GENDER)


def test_unknown_bias_types_are_named():
    assert [c.name for c in cross_type.contrasts_named(["gender", "race"])] == ["gender", "race"]
    with pytest.raises(ValueError, match=r"unknown bias type\(s\) \['sex'\]"):
        cross_type.contrasts_named(["sex"])
