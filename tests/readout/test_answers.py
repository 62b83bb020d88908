"""Tests for workbench.readout.answers: valid ranges and the higher-is-better scale, in the answer table and
the metric."""

import numpy as np
import pytest

from workbench.audit.stats import signed_log
from workbench.audit.table import answers_frame, distributions_from_frame
from workbench.localize.metric import leaf_value, pack, top_leaves
from workbench.readout.answers import distribution_on_scale, on_scale
from workbench.readout.engine import AnswerDistribution
from workbench.readout.prompts import PromptSet, render
from workbench.testing.tiny import tiny_tokenizer


def distribution(values, probs, invalid=0.05, unexplored=0.05):
    values = np.asarray(values, dtype=float)
    return AnswerDistribution(values=values, probs=np.asarray(probs, dtype=float), invalid_mass=invalid,
                              unexplored_mass=unexplored, texts={float(v): f"{v:g}" for v in values})


@pytest.mark.parametrize(
    "answer_type, values, scaled, valid",
    [
        ("probability", [0.0, 0.3, 1.0, 1.7, -0.1], [0.0, 0.3, 1.0, 1.7, -0.1], [1, 1, 1, 0, 0]),
        ("percent", [0.0, 55.0, 100.0, 100.5, -3.0], [0.0, 55.0, 100.0, 100.5, -3.0], [1, 1, 1, 0, 0]),
        ("rank", [1.0, 100.0, 45.0, 150.0, 2.5, 0.0], [100.0, 1.0, 56.0, -49.0, 98.5, 101.0], [1, 1, 1, 0, 0, 0]),
        ("dollars", [0.0, 15000.0, -20.0], [0.0, 15000.0, -20.0], [1, 1, 0]),
        ("hours", [0.0, 7.5, -1.0, np.nan], [0.0, 7.5, -1.0, np.nan], [1, 1, 0, 0]),
    ],
)
def test_on_scale_known_answers(answer_type, values, scaled, valid):
    got, ok = on_scale(np.array(values), answer_type)
    np.testing.assert_array_equal(got, scaled)
    assert ok.tolist() == [bool(v) for v in valid]


def test_on_scale_rejects_unknown_type():
    with pytest.raises(ValueError, match="unknown answer type 'minutes'"):
        on_scale(np.array([1.0]), "minutes")


def test_out_of_range_mass_becomes_invalid_not_renormalised():
    answer = distribution([0.3, 1.7], [0.6, 0.3])
    scaled = distribution_on_scale(answer, "probability")
    assert scaled.values.tolist() == [0.3] and scaled.probs.tolist() == [0.6]
    assert scaled.valid_mass == pytest.approx(0.6) and scaled.invalid_mass == pytest.approx(0.35)
    assert scaled.unexplored_mass == answer.unexplored_mass and scaled.texts == {0.3: "0.3"}


def test_rank_is_flipped_and_keeps_its_spelling():
    scaled = distribution_on_scale(distribution([1.0, 100.0, 150.0, 2.5], [0.4, 0.3, 0.1, 0.1]), "rank")
    assert scaled.values.tolist() == [100.0, 1.0] and scaled.probs.tolist() == [0.4, 0.3]
    assert scaled.texts == {100.0: "1", 1.0: "100"}
    assert scaled.invalid_mass == pytest.approx(0.25)


def one_prompt_per_type():
    """A finance (percent), activity (hours), purchase (dollars), chess (probability) and sports (rank) prompt."""
    contexts = ["finance", "activity", "purchase", "chess:low", "sports:low"]
    built = PromptSet.build(contexts, names=["Hunter"], instruction_suffix=False)
    return PromptSet([built.filter(context=c).prompts[0] for c in contexts])


def test_answer_table_values_on_the_scale():
    prompts = one_prompt_per_type()
    assert [p.answer_type for p in prompts] == ["percent", "hours", "dollars", "probability", "rank"]
    answers = [
        distribution([10.0, 15.0, 120.0], [0.5, 0.3, 0.1]),
        distribution([2.0, 4.5], [0.6, 0.3]),
        distribution([250.0, 300.0, -5.0], [0.5, 0.3, 0.1]),
        distribution([0.3, 1.7], [0.6, 0.3]),
        distribution([1.0, 45.0, 150.0], [0.2, 0.6, 0.1]),
    ]
    table = answers_frame(prompts, answers)
    assert [v.tolist() for v in table["values"]] == [[10.0, 15.0], [2.0, 4.5], [250.0, 300.0], [0.3], [100.0, 56.0]]
    assert [list(t) for t in table["texts"]] == [["10", "15"], ["2", "4.5"], ["250", "300"], ["0.3"], ["1", "45"]]
    np.testing.assert_allclose(table["valid_mass"], [0.8, 0.9, 0.8, 0.6, 0.8])
    np.testing.assert_allclose(table["invalid_mass"], [0.15, 0.05, 0.15, 0.35, 0.15])
    assert table["expected"].iloc[4] == pytest.approx((0.2 * 100 + 0.6 * 56) / 0.8)
    restored = distributions_from_frame(table)[4]
    assert restored.values.tolist() == [100.0, 56.0] and restored.texts == {100.0: "1", 56.0: "45"}


def test_in_range_answers_of_the_study_contexts_are_unchanged():
    prompts = one_prompt_per_type()
    answers = [distribution([0.0, 12.5, 100.0], [0.2, 0.5, 0.2]), distribution([0.0, 3.0, 40.0], [0.3, 0.3, 0.3]),
               distribution([0.0, 99.99, 15000.0], [0.1, 0.4, 0.4])]
    table = answers_frame(PromptSet(prompts.prompts[:3]), answers)
    for row, answer in zip(table.itertuples(), answers):
        np.testing.assert_array_equal(row.values, answer.values)
        np.testing.assert_array_equal(row.weights, answer.probs)
        assert row.invalid_mass == answer.invalid_mass and row.expected == answer.expected


def test_metric_leaves_use_the_same_scale():
    assert leaf_value("250", "dollars") == pytest.approx(np.log1p(250))
    assert leaf_value("1", "rank") == pytest.approx(np.log1p(100))
    assert leaf_value("100", "rank") == pytest.approx(np.log1p(1))
    assert leaf_value("150", "rank") is None and leaf_value("1.7", "probability") is None
    pair = [distribution([1.0, 150.0, 45.0], [0.3, 0.5, 0.1]), distribution([45.0, 2.5], [0.4, 0.4])]
    assert top_leaves(pair, 5, "rank") == ["45", "1"]
    assert top_leaves(pair, 5, "dollars") == ["150", "45", "2.5", "1"]


def test_pack_values_rank_leaves_flipped():
    tokenizer = tiny_tokenizer()
    prompts = one_prompt_per_type()
    rendered = [render(p, tokenizer) for p in prompts.prompts[2:]]
    leaves = [["250", "300"], ["0.3"], ["1", "45"]]
    batch = pack(rendered, leaves, [p.answer_type for p in prompts.prompts[2:]], tokenizer, len(tokenizer))
    expected = signed_log(np.array([250.0, 300.0, 0.3, 100.0, 56.0]))
    np.testing.assert_allclose(batch.leaf_value.numpy(), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="leaf '150' is no valid rank answer"):
        pack(rendered[2:], [["150"]], ["rank"], tokenizer, len(tokenizer))
