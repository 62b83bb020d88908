"""Direction edits with known answers: fitted on labelled activations, an ace edit removes the class-mean
difference along its direction at that layer, a random control has the same form and size, a plan round-trips
through JSON, a direction fitted on shuffled labels does not find the planted direction; on planted tiny models, a
bias spread over many heads and neurons is removed by the edit and not by pruning a few, one carried by a head by
both."""

import dataclasses

import pandas as pd
import pytest
import torch

from workbench.audit.table import run_audit
from workbench.components import ModelShape
from workbench.errors import PlanError
from workbench.models import wrap
from workbench.prune import generalize
from workbench.prune.directions import (
    Activations, DirectionPlan, collect_activations, control_kind, fit_layer, fit_plan, random_plan, shuffled_labels,
)
from workbench.readout.engine import ExactReadoutConfig
from workbench.testing.planted import BLACK_NAMES, WHITE_NAMES, planted_model, planted_prompts

pytestmark = pytest.mark.usefixtures("one_thread")


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


# ============================================================== planted models: distributed bias against one head

PLANT_READOUT = ExactReadoutConfig(max_tokens=2)
PLANT_STATS = dict(scale="log", method="mixture", n_boot=50, seed=0)
BUDGETS = {"mlp_neuron": 4, "attn_head": 1}


def planted_summary(distributed: bool) -> pd.DataFrame:
    """On a planted model (`distributed`: the bias spread over every head of layer 0 and 32 neurons of layer 1;
    else one head and one neuron): top-k pruning at BUDGETS by attribution, a mean-difference ace edit at layer 1
    fitted on the prompts, the same fitted on shuffled labels, and 3 random draws of each form; in-sample (the plant
    is known, so no names are held out), one context, two variations."""
    model = planted_model(distributed=distributed, d_mlp=64 if distributed else 16, noise=0.3, answer_gap=0.15)
    prompts = planted_prompts(("lamp", "desk"), white=WHITE_NAMES, black=BLACK_NAMES)
    bridge = wrap(model.model, model.tokenizer, "tiny-planted")
    baseline = run_audit(bridge, prompts, exact=PLANT_READOUT, progress=False)
    scores = generalize.variation_scores(bridge, prompts, 5, PLANT_READOUT, progress=False)
    cases = generalize.regime_cases("cross_context", scores, BUDGETS)
    cases += generalize.random_cases(ModelShape.of(bridge), prompts, BUDGETS, n_draws=3, seed=0)
    activations = collect_activations(bridge, prompts)
    units = [("tip", v) for v in prompts.variations("tip")]
    for regime, labelled in (("fitted", activations), ("shuffled", shuffled_labels(activations, seed=1))):
        plan = fit_plan(bridge, labelled, "mean_difference", "ace", layers=[1])
        cases += [dataclasses.replace(c, regime=regime) for c in generalize.edit_cases("cross_context", units,
                                                                                      lambda _: plan)]
    cases += generalize.random_edit_cases(plan, prompts, n_draws=3, seed=0)
    summary, _ = generalize.evaluate(bridge, prompts, baseline, cases, PLANT_READOUT, PLANT_STATS, progress=False)
    return summary.set_index(["regime", "kind"])


def works(row) -> bool:
    """The known-answer criterion: at least 90 % of the bias removed, with the CI of removed minus the random
    draws' mean above 0."""
    return bool(row.reduction_pct >= 90 and row.difference_low > 0)


def test_a_distributed_bias_is_removed_by_the_direction_edit_and_not_by_small_pruning():
    summary = planted_summary(distributed=True)
    edit = summary.loc[("fitted", "ace:mean_difference")]
    assert works(edit) and edit.n_random == 3
    for kind in BUDGETS:  # 1 of 4 heads moves a quarter of the marker, 4 of 32 neurons an eighth of the write
        assert summary.loc[("cross_context", kind)].reduction_pct < 50
    assert not works(summary.loc[("shuffled", "ace:mean_difference")])  # the test can fail


def test_a_bias_through_one_head_is_removed_by_both():
    summary = planted_summary(distributed=False)
    assert works(summary.loc[("fitted", "ace:mean_difference")])
    assert works(summary.loc[("cross_context", "attn_head")]) and works(summary.loc[("cross_context", "mlp_neuron")])
    assert not works(summary.loc[("shuffled", "ace:mean_difference")])
