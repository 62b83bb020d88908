"""The study's held-out design, checked end to end on a planted model whose right answer depends on it.

workbench.testing.planted with `z_head`: Qin's bias runs through head L0H1, Zin's through head L0H2, and both heads
feed one neuron. With one Black name per half of the names, each fold's selection half sees one of the two Black
names, so its top head is that name's head, which removes nothing for the other half's Black name; the shared
neuron removes the bias on both halves. Measured on the held-out halves, the head pruning therefore removes about
0 % and the neuron about 100 %. Each leak of the selection names into the evaluation breaks that answer:
- evaluating each fold on its selection half (the head then removes all of the bias it was chosen on);
- choosing the components from the attribution on all names (both folds get the same head, which removes the
  bias of one of the two halves);
- giving the cross-type folds the scores of all names (the same, in the cross-type matrix).
The gate and the directions are the study's own (`selection_gate`), forced open here since two names per side
are too few for a significant test.
"""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest

from workbench.config import load_config
from workbench.models import wrap
from workbench.pipeline import study
from workbench.pipeline.runstore import RunDir
from workbench.readout.engine import ExactReadoutConfig
from workbench.testing.planted import BLACK_NAMES, WHITE_NAMES, Z_NAMES, planted_model, planted_prompts

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def planted_study(tmp_path_factory):
    """The study's audit, attribution, fold attribution, generalisation and cross-type stages on the planted model
    (prompt regime, one head or one neuron, race as the only bias type)."""
    model = planted_model(z_head=(0, 2), noise=0.0, answer_gap=0.15)
    bridge = wrap(model.model, model.tokenizer, "tiny-planted")
    prompts = planted_prompts(("lamp",), white=WHITE_NAMES[:2], black=(BLACK_NAMES[0], Z_NAMES[0]))
    config = load_config(None)
    config.readout = dataclasses.replace(ExactReadoutConfig(max_tokens=2), batch_size=8)
    config.audit = dataclasses.replace(config.audit, contexts=["tip"], variations={}, n_boot=100, n_perm=50,
                                       bias_types=["race"], scale="log")
    config.localize = dataclasses.replace(config.localize, context="tip", n_leaves=5)
    config.generalize = dataclasses.replace(config.generalize, neuron_budget=1, head_budget=1, regimes=["prompt"],
                                            sweep_fractions=[], random_draws=2)
    config.cross_type = dataclasses.replace(config.cross_type, bias_types=["race"], context="tip")
    return model, bridge, prompts, config, tmp_path_factory


def run_planted(planted_study, monkeypatch, name: str) -> RunDir:
    _, bridge, prompts, config, paths = planted_study
    real = study.selection_gate

    def open_gate(config, answers, folds):
        gate, directions = real(config, answers, folds)
        return gate.assign(significant=True), directions

    monkeypatch.setattr(study, "selection_gate", open_gate)
    run = RunDir(paths.mktemp(name))
    study.run_stages(run, config, bridge, prompts,
                     ("audit", "attribution", "attribution on fold halves", "generalize", "cross_type"))
    return run


def removed_share(table: pd.DataFrame, kind: str, **key) -> float:
    rows = table[(table.kind == kind) & (table.regime != "random")] if "regime" in table else table[table.kind == kind]
    for column, value in key.items():
        rows = rows[rows[column] == value]
    assert len(rows) == 1, rows
    return float(rows.reduction_pct.iloc[0])


def test_held_out_heads_remove_nothing_and_the_shared_neuron_everything(planted_study, monkeypatch):
    run = run_planted(planted_study, monkeypatch, "honest")
    matrix = run.read_table("tables/generalization.parquet")
    assert (matrix[matrix.regime == "prompt"].n_folds == 2).all()
    assert abs(removed_share(matrix, "attn_head")) < 5
    assert removed_share(matrix, "mlp_neuron") > 90
    cross = run.read_table("tables/cross_type.parquet")
    assert abs(removed_share(cross, "attn_head", source_type="race")) < 5
    assert removed_share(cross, "mlp_neuron", source_type="race") > 90
    gate = run.read_table("tables/gate.parquet")
    assert (gate.n_names == 2).all()  # the gate saw the selection halves only


def test_evaluating_on_the_selection_half_is_caught(planted_study, monkeypatch):
    """The mutation "each fold evaluated on its selection half" makes the head remove all of the bias."""
    from workbench.prune import generalize

    real = generalize.held_out
    monkeypatch.setattr(generalize, "held_out", lambda cases, evaluation, fold: real(
        cases, [s for s, _ in study.held_out_folds(planted_study[3], planted_study[2])][fold], fold))
    matrix = run_planted(planted_study, monkeypatch, "leak_evaluation").read_table("tables/generalization.parquet")
    assert removed_share(matrix, "attn_head") > 90  # what the honest test above rules out


def test_selecting_from_all_names_scores_is_caught(planted_study, monkeypatch):
    """The mutation "components chosen on the attribution of all names": both folds prune the same head."""
    real = study.fold_attribution_stage
    monkeypatch.setattr(study, "fold_attribution_stage", lambda run, config, bridge, prompts, audit: [
        study.load_variation_scores(run, prompts)] * len(real(run, config, bridge, prompts, audit)))
    matrix = run_planted(planted_study, monkeypatch, "leak_selection").read_table("tables/generalization.parquet")
    assert abs(removed_share(matrix, "attn_head")) > 25


def test_cross_type_folds_with_all_names_scores_are_caught(planted_study, monkeypatch):
    """The mutation "both cross-type folds get the scores of all names": the race head no longer removes ~0."""
    from workbench.prune import cross_type, generalize

    _, bridge, prompts, config, _ = planted_study
    everyone = {"race": generalize.variation_scores(bridge, prompts, config.localize.n_leaves, config.readout,
                                                     progress=False)}
    real = cross_type.cross_fit_type_cases
    monkeypatch.setattr(cross_type, "cross_fit_type_cases", lambda folds, fold_scores, context, budgets: real(
        folds, [everyone] * len(folds), context, budgets))
    cross = run_planted(planted_study, monkeypatch, "leak_cross_type").read_table("tables/cross_type.parquet")
    assert abs(removed_share(cross, "attn_head", source_type="race")) > 25
