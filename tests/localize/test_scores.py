"""Tests for workbench.localize.scores: component scores saved and loaded, and the agreement of two scorings."""

import pytest
import torch

from workbench.localize.scores import ComponentScores, agreement


def test_scores_round_trip(tmp_path):
    scores = torch.randn(3, 5)
    scores[1, 2] = torch.nan
    original = ComponentScores("attribution", "attn_head", scores, {"pairs": 4, "note": "x"})
    original.save(tmp_path / "sub" / "heads")
    loaded = ComponentScores.load(tmp_path / "sub" / "heads")
    assert (loaded.method, loaded.kind, loaded.metadata) == ("attribution", "attn_head", {"pairs": 4, "note": "x"})
    assert torch.equal(torch.nan_to_num(loaded.scores, 9.0), torch.nan_to_num(original.scores, 9.0))
    assert loaded.top(3) == original.top(3)
    assert not (tmp_path / "sub" / "heads.pkl").exists()


def test_agreement_with_itself_is_perfect():
    scores = ComponentScores("a", "mlp_neuron", torch.randn(4, 64))
    result = agreement(scores, scores)
    assert result["spearman"] == pytest.approx(1.0)
    assert result["overlap_10"] == result["overlap_50"] == result["overlap_200"] == 1.0
