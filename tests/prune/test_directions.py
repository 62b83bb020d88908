"""Direction edits on a tiny model with a known answer: fitted on labelled activations, an ace edit removes the
class-mean difference along its direction at that layer, a random control has the same form and size, a plan
round-trips through JSON, a direction fitted on shuffled labels does not find the planted direction."""

import pandas as pd
import pytest
import torch

from workbench.errors import PlanError
from workbench.prune.directions import (
    Activations, DirectionPlan, control_kind, fit_layer, fit_plan, random_plan, shuffled_labels,
)


def planted_activations(n_names: int = 12, d: int = 16, n_layers: int = 2, gap: float = 3.0, seed: int = 0):
    """Activations whose White and Black names differ by `gap` along the first axis only (noise elsewhere)."""
    generator = torch.Generator().manual_seed(seed)
    races = ["white" if i % 2 == 0 else "black" for i in range(n_names)]
    x = torch.randn(n_names, n_layers, d, generator=generator)
    x[:, :, 0] += torch.tensor([gap / 2 if r == "white" else -gap / 2 for r in races])[:, None]
    prompts = pd.DataFrame({"context": "c", "variation": "v", "name": [f"n{i}" for i in range(n_names)],
                            "race": races, "gender": "men"})
    return Activations(prompts, x, x.clone())


def test_ace_removes_the_class_mean_difference_along_its_direction():
    acts = planted_activations(n_names=200)
    white = torch.tensor((acts.prompts.race == "white").to_numpy())
    edit = fit_layer(acts.answer[:, 1], white, "mean_difference", "ace")
    direction = edit.left[:, 0]
    assert abs(float(direction[0])) > 0.95  # the planted axis
    edited = edit(acts.answer[:, 1])
    gap = edited[white].mean(0) - edited[~white].mean(0)
    assert abs(float(gap @ direction)) < 1e-4
    assert torch.allclose(edited @ direction, torch.full((200,), float(edit.bias @ direction)), atol=1e-4)


@pytest.mark.parametrize("method", ["mean_difference", "leace"])
def test_fitted_edits_find_the_planted_axis_and_shuffled_labels_do_not(tiny_bridge, method):
    acts = planted_activations(n_names=40, d=tiny_bridge.cfg.d_model, n_layers=tiny_bridge.cfg.n_layers)
    white = torch.tensor((acts.prompts.race == "white").to_numpy())

    def remaining_gap(activations):
        plan = fit_plan(tiny_bridge, activations, method, "ace")
        edited = plan.maps[0](acts.answer[:, 0])
        return float((edited[white].mean(0) - edited[~white].mean(0))[0])

    assert abs(remaining_gap(acts)) < 0.1 * 3.0
    assert abs(remaining_gap(shuffled_labels(acts, seed=1))) > 0.5 * 3.0


def test_random_control_has_the_same_form_size_and_kind_family(tiny_bridge, tmp_path):
    acts = planted_activations(d=tiny_bridge.cfg.d_model, n_layers=tiny_bridge.cfg.n_layers)
    plan = fit_plan(tiny_bridge, acts, "mean_difference", "ace")
    control = random_plan(plan, seed=3)
    assert control.size == plan.size == tiny_bridge.cfg.n_layers
    assert control.kind == "ace:random" == control_kind(plan.kind) == control_kind("ace:leace@synthetic")
    assert torch.equal(control.maps[0].bias, plan.maps[0].bias)
    assert abs(float(control.maps[0].left[:, 0] @ plan.maps[0].left[:, 0])) < 0.9
    steering = fit_plan(tiny_bridge, acts, "mean_difference", "steering", scale=-1.0)
    drawn = random_plan(steering, seed=3)
    assert torch.isclose(drawn.maps[0].shift.norm(), steering.maps[0].shift.norm())
    plan.save(tmp_path / "edit.json")
    loaded = DirectionPlan.load(tmp_path / "edit.json")
    assert loaded.kind == plan.kind and torch.equal(loaded.maps[1].left, plan.maps[1].left)
    (tmp_path / "bad.json").write_text('{"model": "m", "model_hash": "h", "method": "pca", "intervention": "ace", '
                                       '"layers": [0]}')
    with pytest.raises(PlanError, match="bad.json.*method"):
        DirectionPlan.load(tmp_path / "bad.json")
