"""Localisation on a tiny model with a planted bias circuit (workbench.testing.planted): attribution, activation
patching and ablation find the planted components."""

import pytest
import torch

from workbench.components import KINDS, ModelShape
from workbench.localize.ablation import ablation_scores
from workbench.localize.attribution import attribution_by_span, attribution_scores
from workbench.localize.metric import forward
from workbench.localize.pairs import build_pairs
from workbench.localize.patching import block_inputs, patching_scores
from workbench.localize.scores import agreement
from workbench.models import wrap
from workbench.testing.planted import planted_model, planted_prompts

PLACEMENTS = {"early": ((1, 7), (0, 1)), "late": ((2, 12), (1, 2))}
NAME_PLACEMENTS = {"early": ((0, 5), (1, 1)), "late": ((1, 12), (2, 2))}  # (neuron, head), neuron on the name
SPAN_CHOICES = {"default": {}, "name": {"spans": ("name",)}, "suffix": {"spans": ("suffix",)}}  # default: both


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


def test_a_given_direction_orients_the_scores(planted, scored):
    """Scores follow the direction given (a plant's, or the selection half's bias test), not the gap's sign: the
    wrong direction turns the planted neuron's score negative and puts it last among the neurons."""
    model, bridge, inputs = planted
    assert inputs.oriented(-1.0).orientation == -1.0 and inputs.oriented(1.0).orientation == 1.0
    flipped, _ = attribution_scores(bridge, inputs.oriented(1.0), progress=False)
    neurons, _ = scored["attribution"]
    torch.testing.assert_close(flipped.scores, -neurons.scores)
    assert flipped.metadata["orientation"] == 1.0 and flipped.top(flipped.scores.numel())[-1] == model.neuron
    with pytest.raises(ValueError, match="direction"):
        inputs.oriented(0.0)


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
    """Patching a name into itself (name span included) is a no-op for both methods."""
    model = planted_model(answer_gap=0.15)
    bridge = wrap(model.model, model.tokenizer, "tiny-planted")
    inputs = build_pairs(bridge, _prompts(identical=True), progress=False)
    assert all(len(leaves) > 1 for leaves in inputs.leaves)  # else the metric is constant and every score 0
    shape = ModelShape.of(bridge)
    heads = patching_scores(bridge, inputs, shape.all("attn_head"), progress=False)
    neurons = patching_scores(bridge, inputs, shape.all("mlp_neuron")[:16], progress=False)
    assert torch.allclose(heads.scores, torch.zeros_like(heads.scores), atol=1e-6)
    assert torch.allclose(neurons.scores[0], torch.zeros(16), atol=1e-6)
    assert torch.isnan(neurons.scores[1:]).all()
    for scores in attribution_scores(bridge, inputs, progress=False):
        assert torch.equal(scores.scores, torch.zeros_like(scores.scores))


@pytest.fixture(scope="module", params=list(NAME_PLACEMENTS))
def name_planted(request):
    """A planted model whose bias neuron acts only on the name, in float64 (patching differences of 1e-6 are
    exact), scored by both methods with each choice of patched spans."""
    neuron, head = NAME_PLACEMENTS[request.param]
    model = planted_model(neuron, head, neuron_at="name")
    model.model.double()
    bridge = wrap(model.model, model.tokenizer, "tiny-planted-name")
    inputs = build_pairs(bridge, _prompts(), progress=False)
    shape = ModelShape.of(bridge)
    scores = {}
    for label, spans in SPAN_CHOICES.items():
        scores["attribution", label] = attribution_scores(bridge, inputs, progress=False, **spans)
        scores["patching", label] = tuple(
            patching_scores(bridge, inputs, shape.all(k), progress=False, **spans) for k in KINDS)
    return model, inputs, scores


def test_name_pairs_have_unequal_spans(name_planted):
    _, inputs, _ = name_planted
    batch = inputs.batches[0]
    white = batch.rows.suffix_start[: batch.n] - batch.rows.name_start[: batch.n]
    assert batch.name.sum(1).tolist() == [3, 3] and white.tolist() == [3, 2]  # Ben/Qin, Al/JaQ
    assert torch.all(inputs.gap < -0.1)


@pytest.mark.parametrize("method", ["attribution", "patching"])
def test_name_neuron_ranks_first(name_planted, method):
    model, _, scores = name_planted
    neurons, heads = scores[method, "default"]
    assert neurons.top(1) == [model.neuron] and heads.top(1) == [model.head]
    assert neurons.score(model.neuron) > 0.1
    assert scores[method, "name"][0].score(model.neuron) == pytest.approx(neurons.score(model.neuron), rel=1e-4)


@pytest.mark.parametrize("method", ["attribution", "patching"])
def test_name_neuron_invisible_on_the_suffix(name_planted, method):
    """Scoring only the aligned columns after the name (the former behaviour) misses the name neuron."""
    model, _, scores = name_planted
    suffix = scores[method, "suffix"][0]
    assert abs(suffix.score(model.neuron)) < 1e-6
    assert suffix.top(1) != [model.neuron]
    assert scores[method, "suffix"][1].top(1) == [model.head]  # the head acts after the name: still found


def test_name_span_attribution_is_first_order_patching(name_planted):
    """On the name span, attribution is the derivative of the same patch: on the distractor neurons (small
    effects) it matches activation patching closely; a different span rule for either breaks this."""
    model, _, scores = name_planted
    attribution, patching = scores["attribution", "name"][0].scores, scores["patching", "name"][0].scores
    others = torch.ones_like(attribution, dtype=torch.bool)
    others[model.neuron.layer, model.neuron.index] = False
    x, y = attribution[others].double(), patching[others].double()
    assert torch.corrcoef(torch.stack([x, y]))[0, 1] > 0.99
    assert (x - y).abs().max() < 0.2 * y.abs().max()


def test_attribution_by_span_splits_the_whole_and_puts_the_name_neuron_on_the_name(name_planted):
    """One pass gives each span's scores: they sum to the whole, equal the span's own call, and the name neuron's
    score sits on the name's columns, the head's after them."""
    model, inputs, scores = name_planted
    bridge = wrap(model.model, model.tokenizer, "tiny-planted-name")
    parts = attribution_by_span(bridge, inputs, progress=False)
    for index in range(2):
        whole = scores["attribution", "default"][index].scores
        assert torch.allclose(parts["name"][index].scores + parts["suffix"][index].scores, whole, atol=1e-12)
        for span in ("name", "suffix"):
            assert torch.allclose(parts[span][index].scores, scores["attribution", span][index].scores, atol=1e-12)
    neuron, head = parts["name"][0].score(model.neuron), parts["suffix"][1].score(model.head)
    assert neuron > 0.1 and abs(parts["suffix"][0].score(model.neuron)) < 1e-6
    assert head > 0.1 and parts["suffix"][1].top(1) == [model.head]


def test_a_forward_resumed_at_a_block_is_the_full_forward_and_skips_the_blocks_before(planted):
    """Patching and ablation resume each chunk's forward at its first layer: from the residual recorded by
    `block_inputs`, with an intervention on a later block, the logits equal the full forward's, and the blocks
    before the start do not run."""
    model, bridge, inputs = planted
    rows = inputs.batches[0].black()
    starts = block_inputs(bridge, rows)
    zero_neuron = ModelShape.of(bridge).all("mlp_neuron")[-1]  # in the last layer
    hook = (zero_neuron.hook_name, lambda act, hook: act.index_fill(-1, torch.tensor([zero_neuron.index]), 0.0))
    calls = []
    handle = bridge.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad(), bridge.hooks(fwd_hooks=[hook]):
            full = forward(bridge, rows)
            n_full = len(calls)
            for layer in range(1, len(bridge.blocks)):
                resumed = forward(bridge, rows, (layer, starts[layer]))
                assert torch.allclose(resumed, full, atol=1e-5), layer
    finally:
        handle.remove()
    assert n_full == 1 and len(calls) == 1  # block 0 ran in the full forward only
    assert not torch.allclose(full, forward(bridge, rows), atol=1e-5)  # the intervention mattered
