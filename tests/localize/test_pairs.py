"""Tests for workbench.localize.pairs: the span map that lines up names of different lengths, and the pairs of
each bias type's contrast (on the planted model's gendered prompts)."""

import pytest
import torch

from workbench.audit.bias_types import REST_MINUS_BLACK_WOMEN, WHITE_MEN_MINUS_BLACK_WOMEN, GENDER
from workbench.audit.stats import RACE
from workbench.localize.pairs import contrast_pairs, span_map
from workbench.readout.prompts import PromptSet
from workbench.testing.planted import BLACK_NAMES, QZ_NAMES, WHITE_NAMES, Z_NAMES, gendered_prompts


def test_span_map_stretches_the_white_span():
    assert torch.equal(span_map(3, 3), torch.eye(3))
    assert torch.allclose(span_map(3, 2), torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]))
    assert torch.allclose(span_map(1, 4), torch.full((1, 4), 0.25))
    for target, source in [(2, 5), (5, 2), (4, 3)]:
        weights = span_map(target, source)
        assert torch.allclose(weights.sum(1), torch.ones(target))  # every Black token gets an average
        assert torch.allclose(weights.mean(0), torch.full((source,), 1 / source))  # the span's mean is kept
        assert weights[-1, -1] == weights[-1].max() and weights[0, 0] == weights[0].max()  # order is kept


def test_pairs_follow_the_contrast():
    prompts = gendered_prompts(("lamp",), n_names=2)
    names = lambda pairs: [(a.name, b.name) for a, b in pairs]  # noqa: E731
    assert contrast_pairs(prompts, RACE) == prompts.pairs()
    assert names(contrast_pairs(prompts, RACE)) == [(WHITE_NAMES[0], BLACK_NAMES[0]), (WHITE_NAMES[1], BLACK_NAMES[1]),
                                                    (Z_NAMES[0], QZ_NAMES[0]), (Z_NAMES[1], QZ_NAMES[1])]
    assert names(contrast_pairs(prompts, GENDER)) == [(WHITE_NAMES[0], Z_NAMES[0]), (WHITE_NAMES[1], Z_NAMES[1]),
                                                      (BLACK_NAMES[0], QZ_NAMES[0]), (BLACK_NAMES[1], QZ_NAMES[1])]
    assert names(contrast_pairs(prompts, WHITE_MEN_MINUS_BLACK_WOMEN)) == list(zip(WHITE_NAMES[:2], QZ_NAMES[:2]))
    rest = names(contrast_pairs(prompts, REST_MINUS_BLACK_WOMEN))
    assert len(rest) == 6 and [b for _, b in rest] == list(QZ_NAMES[:2]) * 3


def test_unequal_sides_are_named():
    prompts = PromptSet([p for p in gendered_prompts(("lamp",), n_names=2) if p.name != Z_NAMES[1]])
    with pytest.raises(ValueError, match="tip/lamp for gender: 2 white men and 1 women prompts"):
        contrast_pairs(prompts, GENDER)
