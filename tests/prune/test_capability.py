"""The capability panel and the asking control (workbench.prune.capability): known answers, and on SmolLM2 that
an unchanged model keeps its answers while a destructive change (hooks or a weight edit) loses most of them."""

import re
from collections import Counter
from contextlib import contextmanager
from itertools import product

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from workbench.batching import left_pad, pad_id
from workbench.loaded import model_info
from workbench.prune.anomaly import load_neutral_texts
from workbench.prune.capability import (
    FACTS,
    RECALL_TEMPLATES,
    TASKS,
    answer_tokens,
    ask_prompt,
    ask_race,
    capability_items,
    capability_panel,
    capability_scores,
    is_correct,
    recognition_by_asking,
    roc_auc,
)
from workbench.prune.plan import hf_module
from workbench.readout.prompts import load_names

N_PER_TASK = 8
PCA_HOOK = "blocks.15.hook_resid_pre"
ZEROED_LAYERS = (1, 2, 3)

# On a busy 2-core machine one thread is about three times faster than two (they mostly wait for each other).
pytestmark = pytest.mark.usefixtures("one_thread")


def test_items_deterministic_with_known_answers():
    items = capability_items(12, seed=0)
    assert items == capability_items(12, seed=0)
    assert items != capability_items(12, seed=1)
    assert Counter(item.task for item in items) == {task: 12 for task in TASKS}
    assert sum(len(pairs) for pairs in FACTS.values()) >= 2 * 12
    for item in items:
        lines = item.prompt.split("\n")
        if item.task == "arithmetic":
            *shots, question = lines
            a, op, b = re.fullmatch(r"(\d+) ([+-]) (\d+) =", question).groups()
            assert item.answer == str(eval(f"{a} {op} {b}")) and int(item.answer) >= 0
            for shot in shots:  # the solved examples are right too
                left, right = shot.split(" = ")
                assert int(right) == eval(left)
        elif item.task == "comparison":
            a, b = map(int, re.fullmatch(r"The larger of (\d+) and (\d+) is", lines[-1]).groups())
            assert item.answer == str(max(a, b)) and a != b
        elif item.task == "copying":
            assert lines[-2] == f"Repeat: {item.answer}" and lines[-1] == "Output:"
        elif item.task == "format":
            if lines[0].startswith("Write each word in capital letters"):
                assert lines[-1] == f"{item.answer.lower()}:" and item.answer == item.answer.lower().upper()
            else:
                assert lines[0] == f'Answer every question with the word "{item.answer}".'
        else:
            known = {template.rsplit(" {}", 1)[0].format(subject): answer
                     for kind, template in RECALL_TEMPLATES.items() for subject, answer in FACTS[kind]}
            assert known[lines[-1]] == item.answer
    recall = [item.prompt.split("\n")[-1] for item in items if item.task == "recall"]
    assert len(set(recall)) == len(recall)  # no fact asked twice


def test_is_correct():
    assert is_correct(" 16\n", "16") and is_correct("Tokyo.", "tokyo") and is_correct("star farm", "star farm")
    assert not is_correct("12", "1")  # a longer number is not the answer
    assert not is_correct("milkshake", "milk")
    assert not is_correct("cat", "CAT", case_sensitive=True) and is_correct("CAT", "CAT", case_sensitive=True)
    assert not is_correct("", "7")


def test_roc_auc_known_answers():
    assert roc_auc([1, 2, 3, 4], [False, False, True, True]) == 1.0
    assert roc_auc([4, 3, 2, 1], [False, False, True, True]) == 0.0
    assert roc_auc([5, 5, 5, 5], [False, True, False, True]) == 0.5
    assert roc_auc([1, 2, 2, 3], [False, True, False, True]) == pytest.approx(3.5 / 4)
    assert np.isnan(roc_auc([1, 2], [True, True]))
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=40).astype(float)  # many ties
    positive = rng.random(40) < 0.4
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0)
             for p, n in product(scores[positive], scores[~positive])]
    assert roc_auc(scores, positive) == pytest.approx(np.mean(pairs))


def test_ask_race_on_tiny_model(tiny_bridge):
    tokenizer = model_info(tiny_bridge).tokenizer
    shared, tokens = answer_tokens(tokenizer)
    # Character level: both answers start with ' ', which the prompt gets; then 'B' and 'W' differ.
    assert tokenizer.decode(shared) == " " and tokenizer.decode([tokens["black"]]) == "B"
    assert tokenizer.decode([tokens["white"]]) == "W"
    names, races = ["Amy", "Jamal", "Todd", "Ebony"], ["white", "black", "white", "black"]
    asked = ask_race(tiny_bridge, names, races, batch_size=3)
    assert list(asked.columns) == ["name", "race", "score", "predicted"]
    assert asked["name"].tolist() == names and asked["race"].tolist() == races
    assert (asked["predicted"] == np.where(asked["score"] > 0, "white", "black")).all()
    # The score of one name by hand, unbatched: log P(W) - log P(B) after the prompt and the shared ' '.
    ids = [tokenizer.bos_token_id, *tokenizer.encode(ask_prompt("Jamal"), add_special_tokens=False), *shared]
    with torch.inference_mode():
        log_probs = F.log_softmax(tiny_bridge(torch.tensor([ids]))[0, -1].float(), dim=-1)
    expected = float(log_probs[tokens["white"]] - log_probs[tokens["black"]])
    assert asked.loc[1, "score"] == pytest.approx(expected, abs=1e-4)
    unchanged = recognition_by_asking(tiny_bridge, names, races)
    assert unchanged["accuracy_before"] == unchanged["accuracy_after"]
    assert unchanged["auc_before"] == pytest.approx(unchanged["auc_after"]) and unchanged["n_names"] == 4
    assert unchanged["auc_before"] == pytest.approx(roc_auc(asked["score"], np.array(races) == "white"))


def test_capability_scores_on_tiny_model(tiny_bridge):
    items = capability_items(2)
    scores = capability_scores(tiny_bridge, items, max_new_tokens=3, batch_size=4)
    assert list(scores.columns) == ["task", "prompt", "answer", "output", "correct"]
    assert scores["prompt"].tolist() == [item.prompt for item in items]
    assert scores["correct"].tolist() == [is_correct(o, a, t in ("copying", "format"))
                                          for o, a, t in zip(scores["output"], scores["answer"], scores["task"])]


def _principal_hooks(bridge) -> list:
    """Hooks projecting the top 8 principal directions of neutral-text activations out of one residual stream."""
    tokenizer = model_info(bridge).tokenizer
    encoded = [[tokenizer.bos_token_id, *tokenizer.encode(t, add_special_tokens=False)]
               for t in load_neutral_texts()[:8]]
    ids, mask = left_pad(encoded, pad_id(tokenizer))
    with torch.inference_mode():
        _, cache = bridge.run_with_cache(ids, attention_mask=mask, names_filter=lambda name: name == PCA_HOOK)
    acts = cache[PCA_HOOK][mask.bool()].float()
    directions = torch.linalg.svd(acts - acts.mean(0), full_matrices=False).Vh[:8]

    def project_out(resid, hook):
        return resid - (resid @ directions.T) @ directions

    return [(PCA_HOOK, project_out)]


@contextmanager
def _zero_neuron(bridge, layer: int = 10, neuron: int = 5):
    """One MLP neuron's output weights set to zero inside the `with`: a change too small to break anything."""
    module = hf_module(bridge.original_model, f"model.layers.{layer}.mlp.down_proj")
    saved = module.weight[:, neuron].clone()
    with torch.no_grad():
        module.weight[:, neuron] = 0
    try:
        yield
    finally:
        with torch.no_grad():
            module.weight[:, neuron] = saved


@contextmanager
def _zero_down_proj(bridge, layers):
    """All MLP output weights of the layers set to zero inside the `with`, restored after."""
    modules = [hf_module(bridge.original_model, f"model.layers.{layer}.mlp.down_proj") for layer in layers]
    saved = [module.weight.detach().clone() for module in modules]
    with torch.no_grad():
        for module in modules:
            module.weight.zero_()
    try:
        yield
    finally:
        with torch.no_grad():
            for module, weight in zip(modules, saved):
                module.weight.copy_(weight)


@pytest.fixture(scope="module")
def smol_panels(smol_bridge):
    items = capability_items(N_PER_TASK)
    before = capability_scores(smol_bridge, items)
    weights = [hf_module(smol_bridge.original_model, f"model.layers.{layer}.mlp.down_proj").weight.clone()
               for layer in ZEROED_LAYERS]
    panels = {
        "unchanged": capability_panel(smol_bridge, items, before=before),
        "hooks": capability_panel(smol_bridge, items, hooks=_principal_hooks(smol_bridge), before=before),
        "edit": capability_panel(smol_bridge, items, edit=lambda: _zero_down_proj(smol_bridge, ZEROED_LAYERS),
                                 before=before),
        "mild": capability_panel(smol_bridge, items, edit=lambda: _zero_neuron(smol_bridge), before=before),
    }
    restored = all(torch.equal(w, hf_module(smol_bridge.original_model, f"model.layers.{layer}.mlp.down_proj").weight)
                   for w, layer in zip(weights, ZEROED_LAYERS))
    return {"items": items, "before": before, "restored": restored, **panels}


def test_unchanged_model_solves_a_good_share(smol_panels):
    before = smol_panels["before"]
    solved = before.groupby("task")["correct"].mean()
    # Measured (seed 0, 8 per task): 0.775 overall; arithmetic 0.375, comparison 0.625, copying 1, format 1,
    # recall 0.875.
    assert before["correct"].mean() >= 0.6
    assert solved["copying"] >= 0.85 and solved["format"] >= 0.6 and solved["recall"] >= 0.6
    assert (solved >= 0.25).all()  # every task keeps items for the panel


def test_panel_of_unchanged_model_is_one(smol_panels):
    panel = smol_panels["unchanged"].set_index("task")
    assert list(panel.index) == [*TASKS, "all"]
    before = smol_panels["before"]
    assert panel.loc["all", "n_generated"] == len(before) == 5 * N_PER_TASK
    assert panel.loc["all", "n_items"] == before["correct"].sum()
    assert panel.loc["all", "solved_before"] == pytest.approx(before["correct"].mean())
    assert (panel["accuracy_before"] == 1).all() and (panel["accuracy_after"] == 1).all()


def test_mild_change_keeps_accuracy(smol_panels):
    # Measured: 1.0 on every task (seed 0, 8 and 12 per task).
    assert (smol_panels["mild"]["accuracy_after"] >= 0.85).all()


@pytest.mark.parametrize("change", ["hooks", "edit"])
def test_destructive_change_drops_accuracy(smol_panels, change):
    panel = smol_panels[change].set_index("task")
    # Measured: 0.06 (principal directions projected out) and 0.03 (three layers' MLP outputs zeroed).
    assert panel.loc["all", "accuracy_after"] <= 0.3
    assert (panel.loc[list(TASKS), "accuracy_after"] <= 0.5).all()
    assert panel["n_items"].tolist() == smol_panels["unchanged"]["n_items"].tolist()
    assert smol_panels["restored"]


def test_recognition_by_asking_detects_the_destructive_change(smol_bridge):
    """Asked about a name's group with the top principal directions projected out, the model is at chance.
    Measured: AUC 0.875 -> 0.5 on these 16 names. (A probe at layers 15-20 still reads the group, AUC 0.97 before
    and 0.96-0.97 after: the projection breaks the model without erasing race from its activations.)"""
    names = load_names()[::4]
    result = recognition_by_asking(smol_bridge, [e.name for e in names], [e.race for e in names],
                                   hooks=_principal_hooks(smol_bridge))
    assert result["auc_before"] >= 0.7 and result["auc_after"] <= 0.6


def test_recognition_by_asking_unchanged(smol_bridge):
    names = load_names()[::4]  # 16 of the paper's names, 8 per race
    result = recognition_by_asking(smol_bridge, [e.name for e in names], [e.race for e in names])
    assert result["n_names"] == 16
    assert result["accuracy_before"] == result["accuracy_after"]
    assert result["auc_before"] == pytest.approx(result["auc_after"], abs=1e-6)
    # Measured: AUC 0.875 on these 16 (0.84 on all 64) while nearly every name is answered ' Black' (accuracy
    # 0.5): the ranking knows more than the threshold at zero.
    assert result["auc_before"] >= 0.7
