"""Spike-in positive controls on the real bundled model: a bias planted through a head or a neuron is found by
attribution and by activation patching and removed by pruning the budget on held-out names, far above random
prunings; a plant spread over 64 neurons is not removed at a budget of 8 (the known negative), and is removed by
the direction edit of configs/directions.toml (not by one fitted on shuffled labels)."""

import pandas as pd
import pytest
import torch

from workbench.components import Component, ModelShape
from workbench.localize.attribution import attribution_scores
from workbench.localize.heads import head_attention_scores
from workbench.localize.pairs import build_pairs
from workbench.localize.patching import patching_scores
from workbench.readout.engine import ExactReadoutConfig
from workbench.readout.prompts import PromptSet, names_beyond, names_subset
from workbench.prune.directions import collect_activations, fit_plan, shuffled_labels
from workbench.spike_in import (
    PlantSpec, bias_change, calibrated_plant, leaf_answers, planted_ranks, spike_in_rows,
)

LAYER, BUDGET, DRAWS = 14, 8, 9
TARGETS = {"head": 1.0, "neuron": 0.4, "distributed": 0.4}  # random 8-head prunings move this bias by up to ~0.7
# (benchmarks/results/spike_in.md): a head plant must be larger than that to stand out from them
READOUT = ExactReadoutConfig(max_branches=4, max_completions=16, seed=0)  # the leaves only: a cheaper read-out


def _pairs(bridge, names):
    prompts = PromptSet.build(["purchase"], names=names, variations={"purchase": ["car"]}, instruction_suffix=False)
    return build_pairs(bridge, prompts, n_leaves=8, readout=READOUT, progress=False)


@pytest.fixture(scope="module")
def name_pairs(smol_bridge):
    """Selection (names 1-4 of each group), evaluation (5-8) and feature pairs (13-16): 8 race pairs each."""
    selection, first_eight = names_subset(4), names_subset(8)
    return (_pairs(smol_bridge, selection), _pairs(smol_bridge, [n for n in first_eight if n not in selection]),
            _pairs(smol_bridge, names_beyond(12)))


def _recovered(bridge, spec: PlantSpec, name_pairs, patch: bool = True, draws: int = DRAWS):
    """Plant `spec`, localise it on the selection pairs (attribution over every component; activation patching,
    on 4 pairs, of attribution's top 24 and the plant's layer's first 8) and measure the pruning on the evaluation
    pairs against `draws` random prunings."""
    selection, evaluation, features = name_pairs
    plant = calibrated_plant(bridge, spec, features, n_boot=200)
    kind = spec.components[0].kind
    oriented = selection.oriented(plant.direction)
    with plant.planted(bridge):
        neurons, heads = attribution_scores(bridge, oriented, progress=False)
        scores = {"attribution": heads if kind == "attn_head" else neurons}
        if patch:
            few = build_pairs(bridge, PromptSet([p for pair in oriented.pairs[:4] for p in pair]), n_leaves=8,
                              readout=READOUT, progress=False).oriented(plant.direction)
            layer = [c for c in ModelShape.of(bridge).all(kind) if c.layer == LAYER][:8]
            candidates = list(dict.fromkeys(scores["attribution"].top(24, absolute=True) + layer))
            scores["activation_patching"] = patching_scores(bridge, few, candidates, progress=False)
    table = spike_in_rows(bridge, plant, evaluation, scores, BUDGET, draws, seed=0, n_boot=200)
    return plant, scores, table


def check_found_and_removed(scores: dict, table, expected: list[Component]) -> None:
    """The expected components rank within the budget for every method, and pruning the budget removes at least
    80 % of the planted bias on the evaluation names, with a CI of its removal minus the random draws' above 0."""
    for method, method_scores in scores.items():
        assert planted_ranks(method_scores, expected, BUDGET)["recall"] == 1.0, method
    assert (table.plant_removed_pct >= 80).all()
    assert (table.difference_low > 0).all()


def _head_spec(bridge, name_pairs) -> tuple[Component, PlantSpec]:
    """The layer's head that attends most to the name on the feature pairs."""
    features = name_pairs[2]
    attention = head_attention_scores(bridge, [p for pair in features.pairs[:4] for p in pair], progress=False)
    head = Component(LAYER, "attn_head", int(torch.argmax(attention.scores[LAYER])))
    return head, PlantSpec((head,), TARGETS["head"], "head")


def _neuron_spec(bridge, name_pairs) -> tuple[Component, PlantSpec]:
    neuron = Component(LAYER, "mlp_neuron", 100)
    return neuron, PlantSpec((neuron,), TARGETS["neuron"], "neuron")


@pytest.fixture(scope="module", params=["head", "neuron"])
def single_plant(request, smol_bridge, name_pairs):
    """A head or a neuron plant and its recovery, computed once per kind for the tests below (a parametrized
    module fixture: pytest runs both tests of one kind before building the next)."""
    component, spec = (_head_spec if request.param == "head" else _neuron_spec)(smol_bridge, name_pairs)
    return component, _recovered(smol_bridge, spec, name_pairs)


def test_a_planted_component_is_found_and_removed(single_plant):
    component, (plant, scores, table) = single_plant
    assert plant.achieved_low <= plant.spec.target_smd <= plant.achieved_high and plant.kl < 0.01
    assert (table.planted_smd > 0.1).all()  # the plant carries over to the held-out names (in part: it is name-
    # dependent, calibrated on other names)
    check_found_and_removed(scores, table, [component])


def test_the_check_fails_for_a_plant_in_another_layer(single_plant):
    """The same check, told to expect the plant four layers earlier than it was put, fails."""
    component, (_, scores, table) = single_plant
    elsewhere = Component(component.layer - 4, component.kind, component.index)
    with pytest.raises(AssertionError):
        check_found_and_removed(scores, table, [elsewhere])


@pytest.fixture(scope="module")
def distributed_plant(smol_bridge, name_pairs):
    """64 neurons of layer 14 with 1/64 of the plant each, and its pruning at the budget (against one random
    pruning: the test reads the truth and the plant left, which the random draws do not change)."""
    spec = PlantSpec.parse(f"L{LAYER}N0-63", TARGETS["distributed"])
    plant, _, table = _recovered(smol_bridge, spec, name_pairs, patch=False, draws=1)
    return plant, table


def test_a_distributed_plant_is_not_removed_by_a_small_budget(distributed_plant):
    """Pruning the top 8 by attribution can remove at most about 8/64 of it."""
    row = distributed_plant[1].iloc[0]
    assert row.truth_low > 0  # there is a bias to remove, and removing all 64 neurons removes it
    assert row.plant_removed_pct < 50 and row.plant_left_low > 0  # most of the plant is left


def edit_removals(bridge, plant, name_pairs, labels_seeds: tuple[int | None, ...]) -> list[pd.Series]:
    """The study's edit (ace of the mean difference at the answer position, layers 8-21: configs/directions.toml)
    fitted on the spiked model's selection names (a seed of `labels_seeds`: on shuffled race labels; None: the
    true ones) and applied to the evaluation names: per seed, the planted bias the edited model still carries
    (spiked and edited minus unspiked and edited, as `spike_in_rows` measures a pruning's) and the share of the
    plant removed. The fits share the unedited answers and the spiked model's activations."""
    selection, evaluation, _ = name_pairs
    unspiked = leaf_answers(bridge, evaluation)
    with plant.planted(bridge):
        spiked = leaf_answers(bridge, evaluation)
        activations = collect_activations(bridge, PromptSet([p for pair in selection.pairs for p in pair]))
    planted = bias_change(unspiked, spiked, plant.direction, 200)
    removals = []
    for labels_seed in labels_seeds:
        fitted_on = activations if labels_seed is None else shuffled_labels(activations, labels_seed)
        with plant.planted(bridge):
            edit = fit_plan(bridge, fitted_on, "mean_difference", "ace", layers=list(range(8, 22))).hooks()
            spiked_edited = leaf_answers(bridge, evaluation, edit)
        left = bias_change(leaf_answers(bridge, evaluation, edit), spiked_edited, plant.direction, 200)
        removals.append(pd.Series({"planted": planted.value, "left": left.value, "left_high": left.high,
                                   "removed_pct": 100 * (1 - left.value / planted.value)}))
    return removals


def removes_the_plant(removal: pd.Series) -> bool:
    """At least 90 % of the plant removed, and the CI of what is left below a quarter of it."""
    return bool(removal.removed_pct >= 90 and removal.left_high < 0.25 * removal.planted)


def test_the_direction_edit_removes_the_distributed_plant_and_a_shuffled_one_does_not(smol_bridge, name_pairs,
                                                                                        distributed_plant):
    """Measured: 98.6 % removed, left 0.003 [-0.038, 0.026] of 0.187; shuffled labels (seeds 1, 2): 2 % and 69 %
    removed, with what is left up to 0.27 and 0.10."""
    removal, *shuffled = edit_removals(smol_bridge, distributed_plant[0], name_pairs, labels_seeds=(None, 1, 2))
    assert removal.planted > 0.1 and removes_the_plant(removal)
    for shuffled_removal in shuffled:
        assert not removes_the_plant(shuffled_removal)
