"""Localisation on a tiny model with a planted bias circuit (workbench.planted)."""

import pytest
import torch

from workbench.components import ModelShape
from workbench.localize.ablation import ablation_scores
from workbench.localize.attribution import attribution_scores
from workbench.localize.pairs import build_pairs
from workbench.localize.patching import patching_scores
from workbench.localize.scores import ComponentScores, agreement
from workbench.models import wrap
from workbench.planted import planted_model, planted_prompts

KINDS = ("mlp_neuron", "attn_head")
PLACEMENTS = {"early": ((1, 7), (0, 1)), "late": ((2, 12), (1, 2))}


def _prompts(identical: bool = False):
    return planted_prompts(("lamp",), identical=identical).filter(names=["Ben", "Al", "Qin", "JaQ"])


@pytest.fixture(scope="module", params=list(PLACEMENTS))
def planted(request):
    neuron, head = PLACEMENTS[request.param]
    model = planted_model(neuron, head)
    bridge = wrap(model.model, model.tokenizer, "tiny-planted")
    inputs = build_pairs(bridge, _prompts(), progress=False)
    return model, bridge, inputs


@pytest.fixture(scope="module")
def scored(planted):
    model, bridge, inputs = planted
    shape = ModelShape.of(bridge)
    neurons, heads = attribution_scores(bridge, inputs, progress=False)
    return {
        "attribution": (neurons, heads),
        "patching": tuple(patching_scores(bridge, inputs, shape.all(k), progress=False) for k in KINDS),
        "zero": tuple(ablation_scores(bridge, inputs, shape.all(k), "zero", progress=False) for k in KINDS),
        "mean": tuple(ablation_scores(bridge, inputs, shape.all(k), "mean", progress=False) for k in KINDS),
    }


def test_black_answers_higher(planted):
    _, _, inputs = planted
    assert torch.all(inputs.gap < -0.1)  # E_white - E_black: the planted circuit raises Black answers
    assert inputs.orientation == -1.0


@pytest.mark.parametrize("method", ["attribution", "patching", "zero", "mean"])
def test_planted_components_rank_first(planted, scored, method):
    model, _, _ = planted
    neurons, heads = scored[method]
    assert neurons.top(1) == [model.neuron]
    assert heads.top(1) == [model.head]
    assert neurons.score(model.neuron) > 0.1 and heads.score(model.head) > 0.1


def test_attribution_agrees_with_patching(scored):
    attribution, patching = scored["attribution"][0], scored["patching"][0]
    result = agreement(attribution, patching, top=48)
    assert result["spearman"] > 0.8
    assert result["overlap_10"] >= 0.8


def test_patching_identical_prompts_scores_zero():
    model = planted_model()
    bridge = wrap(model.model, model.tokenizer, "tiny-planted")
    inputs = build_pairs(bridge, _prompts(identical=True), progress=False)
    shape = ModelShape.of(bridge)
    heads = patching_scores(bridge, inputs, shape.all("attn_head"), progress=False)
    neurons = patching_scores(bridge, inputs, shape.all("mlp_neuron")[:16], progress=False)
    assert torch.allclose(heads.scores, torch.zeros_like(heads.scores), atol=1e-6)
    assert torch.allclose(neurons.scores[0], torch.zeros(16), atol=1e-6)
    assert torch.isnan(neurons.scores[1:]).all()


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
