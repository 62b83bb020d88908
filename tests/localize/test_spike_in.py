"""Spike-in plants (workbench.spike_in) on a tiny model: parsing, exact undo, and calibration to a target SMD."""

import numpy as np
import pandas as pd
import pytest
import torch

from workbench.components import Component
from workbench.errors import ConfigError
from workbench.localize.pairs import build_pairs
from workbench.models import wrap
from workbench.spike_in import PlantSpec, bias_change, calibrated_plant, leaf_answers, parse_components
from workbench.testing.planted import BLACK_NAMES, WHITE_NAMES, planted_model, planted_prompts

pytestmark = pytest.mark.usefixtures("one_thread")


def test_components_are_read_as_the_reports_write_them():
    assert parse_components("L9H3, L12N400") == [Component(9, "attn_head", 3), Component(12, "mlp_neuron", 400)]
    assert parse_components("L2N0-3") == [Component(2, "mlp_neuron", i) for i in range(4)]
    for bad in ("9H3", "L2N5-1", "L2X1", ""):
        with pytest.raises(ConfigError):
            parse_components(bad)


def test_plant_kinds_are_checked():
    assert PlantSpec.parse("L1H0", 0.3).kind == "head"
    assert PlantSpec.parse("L1N0", 0.3).kind == "neuron"
    assert PlantSpec.parse("L1N0-7", 0.3).kind == "distributed"
    assert PlantSpec.parse("L1N0-7", 0.3).labels() == "L1N0-7"
    with pytest.raises(ConfigError, match="attention heads only"):
        PlantSpec.parse("L1N0", 0.3, kind="head")
    with pytest.raises(ConfigError, match="at least 2"):
        PlantSpec.parse("L1N0", 0.3, kind="distributed")
    with pytest.raises(ConfigError, match="positive"):
        PlantSpec.parse("L1H0", 0.0)


@pytest.fixture(scope="module")
def tiny():
    model = planted_model((1, 7), (0, 1))
    bridge = wrap(model.model, model.tokenizer, "tiny-planted")
    features = build_pairs(bridge, planted_prompts(("lamp", "desk"), white=WHITE_NAMES[:3], black=BLACK_NAMES[:3]),
                           progress=False)
    return bridge, features


@pytest.mark.parametrize("text", ["L2N3", "L1H0", "L2N0-7"])
def test_calibration_reaches_the_target_within_its_interval_and_undoes_exactly(tiny, text):
    bridge, features = tiny
    before = {k: v.clone() for k, v in bridge.original_model.state_dict().items()}
    base = leaf_answers(bridge, features)
    plant = calibrated_plant(bridge, PlantSpec.parse(text, 0.5), features, direction=1.0)
    assert plant.achieved_low <= 0.5 <= plant.achieved_high
    assert plant.achieved_smd == pytest.approx(0.5, rel=0.1)
    after = bridge.original_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the plant is gone after its `with` blocks
    with plant.planted(bridge):  # the recorded scale gives the recorded SMD again
        again = bias_change(base, leaf_answers(bridge, features), plant.direction, n_boot=50)
    assert again.value == pytest.approx(plant.achieved_smd, abs=1e-6)
    assert 0 < plant.kl < 0.05


def test_a_saved_plant_loads_back_and_plants_the_same_weights(tiny, tmp_path):
    from workbench.loaded import model_info
    from workbench.spike_in import Plant

    bridge, features = tiny
    spec = PlantSpec.parse("L2N0-7", 0.5)
    plant = calibrated_plant(bridge, spec, features, direction=1.0, n_boot=50)
    plant.save(tmp_path / "plant.safetensors")
    loaded = Plant.load(tmp_path / "plant.safetensors", spec)
    assert (loaded.scale, loaded.direction, loaded.kl, loaded.steps) == (plant.scale, 1.0, plant.kl, plant.steps)
    weights = []
    for p in (plant, loaded):
        with p.planted(bridge):
            assert model_info(bridge).edits == [{"spike_in": "L2N0-7", "kind": "distributed", "scale": p.scale,
                                                 "direction": 1.0}]  # cached stages key on the edit
            weights.append({k: v.clone() for k, v in bridge.original_model.state_dict().items()})
    assert model_info(bridge).edits == []
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_an_unreachable_target_is_a_clear_error(tiny):
    bridge, features = tiny
    with pytest.raises(ConfigError, match="did not reach SMD 50"):
        calibrated_plant(bridge, PlantSpec.parse("L2N3", 50.0), features, direction=1.0, max_steps=3)
    with pytest.raises(ConfigError, match="cannot plant L9N3: the model has 3 layers"):
        calibrated_plant(bridge, PlantSpec.parse("L9N3", 0.5), features)


def test_feature_names_are_those_a_study_never_uses():
    from workbench.readout.prompts import names_beyond, names_subset

    used, unused = names_subset(8), names_beyond(8)
    assert len(unused) == 4 * 8 and not set(used) & set(unused)
    with pytest.raises(ConfigError, match="no names are left"):
        names_beyond(16)


def test_no_change_is_exactly_zero_with_a_zero_interval():
    """A pruning that removes every planted component leaves spiked and unspiked answers identical: the plant left
    is 0 [0, 0], not an undefined bootstrap-t interval; a real change gets an interval around it."""
    rng = np.random.default_rng(0)
    rows = [{"context": "purchase", "variation": "car", "name": f"{race}{gender}{i}", "race": race, "gender": gender,
             "values": np.array([1.0, 2.0, 3.0]), "weights": rng.dirichlet(np.ones(3))}
            for race in ("white", "black") for gender in ("man", "woman") for i in range(4)]
    answers = pd.DataFrame(rows)
    assert bias_change(answers, answers.copy(), 1.0, n_boot=200).tolist() == [0.0, 0.0, 0.0]
    shifted = answers.copy()
    shifted["weights"] = [np.array([0.0, 0.2, 0.8]) if race == "white" else w
                          for race, w in zip(shifted.race, shifted.weights)]
    change = bias_change(answers, shifted, 1.0, n_boot=200)
    assert change.value > 0.3 and change.low < change.value < change.high
