"""Does a change still leave a working model? A generated capability suite with known answers, and asking.

- capability_items: few-shot prompts of five tasks (arithmetic, comparison, copying, format, recall) whose answers
  are known by construction, drawn deterministically from a seed.
- capability_scores / capability_panel: greedy answers of the model, with or without a change, and the share of
  the items the unchanged model solves that the changed model still solves.
- ask_race / recognition_by_asking: a recognition control that asks the model outright whether a first name is
  more common among Black or White Americans, read from the next-token log-probabilities of the two answers.

A change is either forward hooks (`hooks`, a list of (hook name, fn)) or a weight edit (`edit`, a zero-argument
callable returning a context manager in force inside its `with`), as in workbench.prune.anomaly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from workbench.batching import chunks, left_pad, model_device, pad_id
from workbench.loaded import model_info
from workbench.prune.anomaly import encode_with_bos

Hooks = list[tuple[str, Callable]]
Edit = Callable[[], AbstractContextManager]

TASKS = ("arithmetic", "comparison", "copying", "format", "recall")
CASE_SENSITIVE = frozenset({"copying", "format"})
"""Tasks whose answers must match in case (the format task asks for capital letters; copying is verbatim)."""

WORDS = ("cat", "dog", "tree", "book", "lamp", "door", "fish", "bird", "cake", "ship", "moon", "star", "rain",
         "milk", "shoe", "hat", "car", "bed", "cup", "pen", "box", "egg", "sun", "key", "road", "ring", "boat",
         "coat", "desk", "farm", "gold", "hill", "king", "lake", "nose", "park", "rock", "sand", "wall", "wind")
"""Short common words for the copying and format tasks."""

FILLERS = ("banana", "orange", "yes", "blue", "seven", "hello", "north", "table")
"""Words a format item tells the model to answer with, whatever the question."""

QUESTIONS = ("What is your name?", "Where do you live?", "What time is it?", "How old are you?",
             "What is your favourite food?", "Where are you going?", "What day is it today?",
             "Who is your best friend?")

RECALL_TEMPLATES = {
    "capital": "The capital of {} is {}.",
    "opposite": "The opposite of {} is {}.",
    "day": "The day after {} is {}.",
    "colour": "The colour of {} is {}.",
}
"""One sentence per kind of fact; the question is the sentence cut before its answer."""

FACTS: dict[str, tuple[tuple[str, str], ...]] = {
    "capital": (("France", "Paris"), ("Italy", "Rome"), ("Japan", "Tokyo"), ("Germany", "Berlin"),
                ("Spain", "Madrid"), ("England", "London"), ("Russia", "Moscow"), ("Egypt", "Cairo"),
                ("Greece", "Athens"), ("China", "Beijing"), ("Ireland", "Dublin"), ("Austria", "Vienna"),
                ("Portugal", "Lisbon"), ("Norway", "Oslo")),
    "opposite": (("hot", "cold"), ("up", "down"), ("big", "small"), ("fast", "slow"), ("day", "night"),
                 ("happy", "sad"), ("left", "right"), ("open", "closed"), ("light", "dark"), ("rich", "poor"),
                 ("wet", "dry"), ("black", "white"), ("hard", "soft"), ("full", "empty")),
    "day": (("Monday", "Tuesday"), ("Tuesday", "Wednesday"), ("Wednesday", "Thursday"), ("Thursday", "Friday"),
            ("Friday", "Saturday"), ("Saturday", "Sunday"), ("Sunday", "Monday")),
    "colour": (("grass", "green"), ("the sky", "blue"), ("snow", "white"), ("coal", "black"), ("blood", "red"),
               ("a banana", "yellow"), ("an orange", "orange"), ("milk", "white"), ("a lemon", "yellow"),
               ("a tomato", "red"), ("the sea", "blue"), ("a leaf", "green")),
}
"""Facts to recall (subject, answer) by kind: 47 in all."""


@dataclass(frozen=True)
class CapabilityItem:
    """One prompt of the capability suite and its known answer."""

    task: str
    prompt: str
    answer: str


def _arithmetic(rng: np.random.Generator) -> tuple[str, str]:
    """An addition or subtraction of numbers from 1 to 10 (never negative), as 'a + b =' and its answer."""
    a, b = (int(x) for x in rng.integers(1, 11, size=2))
    if rng.random() < 0.5:
        return f"{a} + {b} =", str(a + b)
    a, b = max(a, b), min(a, b)
    return f"{a} - {b} =", str(a - b)


def _comparison(rng: np.random.Generator) -> tuple[str, str]:
    """The larger of a one-digit and a two-digit number, in random order (numbers of the same length are
    near chance for a 135M model)."""
    a, b = int(rng.integers(1, 10)), int(rng.integers(10, 100))
    if rng.random() < 0.5:
        a, b = b, a
    return f"The larger of {a} and {b} is", str(max(a, b))


def _shots(rng: np.random.Generator, make: Callable[[np.random.Generator], tuple[str, str]], n: int = 3
           ) -> tuple[list[tuple[str, str]], tuple[str, str]]:
    """n solved examples and a question, all different."""
    seen: list[tuple[str, str]] = []
    while len(seen) < n + 1:
        pair = make(rng)
        if pair[0] not in (p for p, _ in seen):
            seen.append(pair)
    return seen[:n], seen[n]


def _arithmetic_item(rng: np.random.Generator) -> CapabilityItem:
    shots, (question, answer) = _shots(rng, _arithmetic)
    lines = [f"{q} {a}" for q, a in shots]
    return CapabilityItem("arithmetic", "\n".join([*lines, question]), answer)


def _comparison_item(rng: np.random.Generator) -> CapabilityItem:
    shots, (question, answer) = _shots(rng, _comparison)
    lines = [f"{q} {a}." for q, a in shots]
    return CapabilityItem("comparison", "\n".join([*lines, question]), answer)


def _copying_item(rng: np.random.Generator) -> CapabilityItem:
    picks = [str(w) for w in rng.choice(WORDS, size=4, replace=False)]
    shots = [picks[0], f"{picks[1]} {picks[2]}"]
    target = picks[3] if rng.random() < 0.5 else " ".join(str(w) for w in rng.choice(WORDS, size=2, replace=False))
    lines = [f"Repeat: {s}\nOutput: {s}" for s in shots]
    return CapabilityItem("copying", "\n".join([*lines, f"Repeat: {target}\nOutput:"]), target)


def _format_item(rng: np.random.Generator, index: int) -> CapabilityItem:
    """Alternately: write a word in capital letters, or answer any question with a given word."""
    if index % 2 == 0:
        picks = [str(w) for w in rng.choice(WORDS, size=4, replace=False)]
        lines = [f"{w}: {w.upper()}" for w in picks[:3]]
        prompt = "\n".join(["Write each word in capital letters.", *lines, f"{picks[3]}:"])
        return CapabilityItem("format", prompt, picks[3].upper())
    filler = str(rng.choice(FILLERS))
    questions = [str(q) for q in rng.choice(QUESTIONS, size=3, replace=False)]
    lines = [f"Q: {q}\nA: {filler}" for q in questions[:2]]
    prompt = "\n".join([f'Answer every question with the word "{filler}".', *lines, f"Q: {questions[2]}\nA:"])
    return CapabilityItem("format", prompt, filler)


def _recall_items(rng: np.random.Generator, n: int) -> list[CapabilityItem]:
    """n facts without repetition (cycling through all facts when n exceeds them), each after two solved
    facts of the same kind."""
    facts = [(kind, subject, answer) for kind, pairs in FACTS.items() for subject, answer in pairs]
    order = np.concatenate([rng.permutation(len(facts)) for _ in range(-(-n // len(facts)))])[:n]
    items = []
    for index in order:
        kind, subject, answer = facts[index]
        template = RECALL_TEMPLATES[kind]
        others = [pair for pair in FACTS[kind] if pair[0] != subject]
        shots = [others[i] for i in rng.choice(len(others), size=2, replace=False)]
        lines = [template.format(*pair) for pair in shots]
        question = template.rsplit(" {}", 1)[0].format(subject)
        items.append(CapabilityItem("recall", "\n".join([*lines, question]), answer))
    return items


def capability_items(n_per_task: int = 12, seed: int = 0) -> list[CapabilityItem]:
    """n_per_task items of each task in TASKS (task order), drawn deterministically from numpy's
    default_rng(seed); every prompt is two or three solved examples and then the question, whose answer is
    the next word (or number) after it."""
    rng = np.random.default_rng(seed)
    items = [_arithmetic_item(rng) for _ in range(n_per_task)]
    items += [_comparison_item(rng) for _ in range(n_per_task)]
    items += [_copying_item(rng) for _ in range(n_per_task)]
    items += [_format_item(rng, i) for i in range(n_per_task)]
    return items + _recall_items(rng, n_per_task)


def is_correct(output: str, answer: str, case_sensitive: bool = False) -> bool:
    """The output, stripped, starts with the answer, and the answer is not the start of a longer word or
    number ('12' is not the answer '1')."""
    output = output.strip()
    if not case_sensitive:
        output, answer = output.lower(), answer.lower()
    return output.startswith(answer) and (len(output) == len(answer) or not output[len(answer)].isalnum())


@contextmanager
def _changed(bridge, hooks: Hooks | None, edit: Edit | None) -> Iterator[None]:
    """The change in force: the weight edit, with the hooks registered inside it."""
    with edit() if edit else nullcontext(), bridge.hooks(fwd_hooks=hooks) if hooks else nullcontext():
        yield


def _answer(tokenizer, tokens: Sequence[int]) -> tuple[str, bool]:
    """Generated text up to its first special token (end of turn, end of text) or its first line break after
    some text, and whether it has ended there."""
    special = set(tokenizer.all_special_ids)
    kept = []
    for token in tokens:
        if token in special:
            return tokenizer.decode(kept), True
        kept.append(token)
        text = tokenizer.decode(kept)
        start = len(text) - len(text.lstrip())
        if "\n" in text[start:]:
            return text[: text.index("\n", start)], True
    return tokenizer.decode(kept), False


def _greedy(bridge, ids: Int[Tensor, "batch pos"], mask: Int[Tensor, "batch pos"], max_new_tokens: int
            ) -> list[str]:
    """Greedy answers of left-padded prompts, recomputing the whole sequence at each step (no KV cache); a
    prompt leaves the batch once its answer has ended (_answer)."""
    tokenizer = model_info(bridge).tokenizer
    new = [[] for _ in range(len(ids))]
    answers = [("", False)] * len(ids)
    active = list(range(len(ids)))
    for _ in range(max_new_tokens):
        tokens = bridge(ids, attention_mask=mask)[:, -1].argmax(-1)
        for row, token in zip(active, tokens.tolist()):
            new[row].append(token)
            answers[row] = _answer(tokenizer, new[row])
        going = [i for i, row in enumerate(active) if not answers[row][1]]
        if not going:
            break
        keep = torch.tensor(going, device=ids.device)
        ids = torch.cat([ids, tokens[:, None]], dim=1)[keep]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)[keep]
        active = [active[i] for i in going]
    return [text for text, _ in answers]


def capability_scores(bridge, items: Sequence[CapabilityItem], hooks: Hooks | None = None, edit: Edit | None = None,
                      max_new_tokens: int = 4, batch_size: int = 16) -> pd.DataFrame:
    """One row per item (task, prompt, answer, output, correct): the greedy output of the model (at most
    max_new_tokens, cut at its first line break), with the change in force if one is given, and whether it is
    right (is_correct; case-sensitive for the tasks in CASE_SENSITIVE)."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    tokenizer = model_info(bridge).tokenizer
    encoded = encode_with_bos(tokenizer, [item.prompt for item in items])
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # batches of similar lengths
    outputs = [""] * len(encoded)
    with _changed(bridge, hooks, edit), torch.inference_mode():
        for part in chunks(len(order), batch_size):
            rows = order[part]
            ids, mask = left_pad([encoded[i] for i in rows], pad_id(tokenizer), model_device(bridge))
            for row, output in zip(rows, _greedy(bridge, ids, mask, max_new_tokens)):
                outputs[row] = output
    return pd.DataFrame([{"task": item.task, "prompt": item.prompt, "answer": item.answer, "output": output,
                          "correct": is_correct(output, item.answer, item.task in CASE_SENSITIVE)}
                         for item, output in zip(items, outputs)])


def capability_panel(bridge, items: Sequence[CapabilityItem], hooks: Hooks | None = None, edit: Edit | None = None,
                     max_new_tokens: int = 4, batch_size: int = 16, before: pd.DataFrame | None = None
                     ) -> pd.DataFrame:
    """Per task, and pooled in a row "all": of the items the unchanged model answers right, the share the
    changed model still answers right.

    Estimand: accuracy_after = P(changed model correct | unchanged model correct), over the n_items kept items;
    accuracy_before is 1 by construction on them. n_generated is the number of items asked and solved_before
    the share of them the unchanged model solves. An unchanged model gives accuracy_after 1; a change that
    breaks the model gives accuracy_after well below 1. `before` (capability_scores of the unchanged model on
    the same items) saves recomputing it; accuracy_after is NaN where nothing was kept.
    """
    if before is None:
        before = capability_scores(bridge, items, max_new_tokens=max_new_tokens, batch_size=batch_size)
    if len(before) != len(items) or list(before["prompt"]) != [item.prompt for item in items]:
        raise ValueError("`before` must be capability_scores of the same items")
    kept = [item for item, ok in zip(items, before["correct"]) if ok]
    after = capability_scores(bridge, kept, hooks, edit, max_new_tokens, batch_size) if kept else None
    rows = []
    for task in [*dict.fromkeys(item.task for item in items), "all"]:
        asked = before if task == "all" else before[before["task"] == task]
        solved = None if after is None else (after if task == "all" else after[after["task"] == task])
        n_kept = 0 if solved is None else len(solved)
        rows.append({"task": task, "n_generated": len(asked), "solved_before": float(asked["correct"].mean()),
                     "n_items": n_kept, "accuracy_before": 1.0 if n_kept else float("nan"),
                     "accuracy_after": float(solved["correct"].mean()) if n_kept else float("nan")})
    return pd.DataFrame(rows)


ASK_SHOTS = (("Jermaine", "Black"), ("Brad", "White"), ("Malik", "Black"), ("Cody", "White"))
"""Solved examples of the asking prompt (first names outside the paper's lists). On SmolLM2-135M-Instruct the
AUC on the paper's names depends much on them: 0.84 in this order, 0.65 with White first, 0.48 with only the
first two pairs. Its scores are almost all negative (62 of 64 names answered ' Black'), so the accuracy at the
threshold zero stays near 0.5 while the ranking (AUC) carries the recognition."""
ASK_INSTRUCTION = "Is each first name more common among Black or White Americans?"
ANSWERS = {"black": " Black", "white": " White"}


def ask_prompt(name: str) -> str:
    """The asking prompt for one first name: an instruction, solved examples, then 'Name: {name}\\nAnswer:'."""
    lines = [f"Name: {shot}\nAnswer: {answer}" for shot, answer in ASK_SHOTS]
    return "\n".join([ASK_INSTRUCTION, *lines, f"Name: {name}\nAnswer:"])


def answer_tokens(tokenizer) -> tuple[list[int], dict[str, int]]:
    """The tokens the two answers (' Black', ' White') share at their start, which the prompt is extended with
    (none for SmolLM2; ' ' for a character-level tokenizer), and each answer's first token after them."""
    encoded = {race: tokenizer.encode(word, add_special_tokens=False) for race, word in ANSWERS.items()}
    black, white = encoded["black"], encoded["white"]
    shared = 0
    while shared < min(len(black), len(white)) and black[shared] == white[shared]:
        shared += 1
    if shared == min(len(black), len(white)):
        raise ValueError(f"the answers {list(ANSWERS.values())} have no differing token")
    return black[:shared], {race: ids[shared] for race, ids in encoded.items()}


def _last_log_probs(bridge, ids: Int[Tensor, "batch pos"], mask: Int[Tensor, "batch pos"]
                    ) -> Float[Tensor, "batch vocab"]:
    return F.log_softmax(bridge(ids, attention_mask=mask)[:, -1].float(), dim=-1)


def ask_race(bridge, names: Sequence[str], races: Sequence[str], hooks: Hooks | None = None,
             edit: Edit | None = None, batch_size: int = 16) -> pd.DataFrame:
    """One row per name (name, race, score, predicted): score is log P(' White') - log P(' Black') of the
    answers' first tokens (answer_tokens) at the answer position of ask_prompt(name); predicted is 'white'
    where the score is positive, else 'black'."""
    if len(names) != len(races):
        raise ValueError("names and races must have the same length")
    tokenizer = model_info(bridge).tokenizer
    shared, tokens = answer_tokens(tokenizer)
    encoded = [ids + shared for ids in encode_with_bos(tokenizer, [ask_prompt(name) for name in names])]
    scores: list[float] = []
    with _changed(bridge, hooks, edit), torch.inference_mode():
        for part in chunks(len(encoded), batch_size):
            ids, mask = left_pad(encoded[part], pad_id(tokenizer), model_device(bridge))
            log_probs = _last_log_probs(bridge, ids, mask)
            scores += (log_probs[:, tokens["white"]] - log_probs[:, tokens["black"]]).tolist()
    return pd.DataFrame({"name": list(names), "race": list(races), "score": scores,
                         "predicted": ["white" if s > 0 else "black" for s in scores]})


def roc_auc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """ROC AUC by the Mann-Whitney statistic: P(score of a positive > score of a negative), ties counting
    one half; NaN without both classes."""
    scores, positive = np.asarray(scores, dtype=float), np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = pd.Series(scores).rank(method="average").to_numpy()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def recognition_by_asking(bridge, names: Sequence[str], races: Sequence[str], hooks: Hooks | None = None,
                          edit: Edit | None = None) -> dict[str, float]:
    """Accuracy of the asked race and ROC AUC of the score (White positive), without the change (before) and
    with it (after)."""
    positive = np.asarray(races) == "white"
    result: dict[str, float] = {"n_names": len(names)}
    for when, change in (("before", {}), ("after", {"hooks": hooks, "edit": edit})):
        asked = ask_race(bridge, names, races, **change)
        result[f"accuracy_{when}"] = float((asked["predicted"] == asked["race"]).mean())
        result[f"auc_{when}"] = roc_auc(asked["score"], positive)
    return result
