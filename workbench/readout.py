"""Numeric answers of a model: an exact, deterministic answer distribution and sampled generation.

Exact read-out: the prompt ends with a fixed answer prefix (for example "$"), so the next tokens spell the
number. Starting from the prompt, every continuation made of number tokens (digits, "," and ".", one leading
space) is expanded level by level with a shared KV cache, keeping branches whose probability exceeds a
threshold. At each branch, the probability of any other token ends the number there. The result is the set
of numbers the model would write with their probabilities, the mass that ended without a number (invalid) and
the mass left unexplored (longer than `max_tokens`, or cut and not completed). Branches cut from the exact tree
(below the threshold, or past `max_branches`) are completed greedily, carrying their mass to the number their
most likely continuation ends on (up to `max_completions` per level). Decimals past `max_decimals`
are cut (their mass stays with the shorter number), and scale words after a number ("1 million") are not
followed: the number ends at the word.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from workbench.batching import chunks, left_pad, model_device, pad_id
from workbench.parsing import parse_number

FIRST_TOKEN = re.compile(r"^ ?[0-9][0-9.,]*$")
NEXT_TOKEN = re.compile(r"^[0-9.,]+$")
AFTER_SPACE = re.compile(r"^[0-9][0-9.,]*$")


@dataclass(frozen=True)
class NumberVocabulary:
    """Which tokens may start or continue a number."""

    first: Bool[Tensor, " vocab"]  # allowed as the first answer token (digits, optionally one leading space)
    space: Bool[Tensor, " vocab"]  # a lone space, allowed first (digits must follow)
    after_space: Bool[Tensor, " vocab"]  # digits-first tokens, allowed after a lone space
    next: Bool[Tensor, " vocab"]  # digits and separators, allowed once a digit was written
    strings: tuple[str, ...]


@lru_cache(maxsize=8)
def _number_vocabulary(tokenizer, vocab_size: int) -> NumberVocabulary:
    raw = tokenizer.convert_ids_to_tokens(list(range(min(vocab_size, len(tokenizer)))))
    strings = [""] * vocab_size
    for i, token in enumerate(raw):
        if token and re.search(r"[0-9.,]|^(Ġ|▁| )$", token):
            strings[i] = tokenizer.decode([i])
    masks = {name: torch.zeros(vocab_size, dtype=torch.bool) for name in ("first", "space", "after", "next")}
    for i, text in enumerate(strings):
        masks["first"][i] = bool(FIRST_TOKEN.match(text))
        masks["space"][i] = text == " "
        masks["after"][i] = bool(AFTER_SPACE.match(text))
        masks["next"][i] = bool(NEXT_TOKEN.match(text))
    return NumberVocabulary(masks["first"], masks["space"], masks["after"], masks["next"], tuple(strings))


def number_vocabulary(tokenizer, vocab_size: int) -> NumberVocabulary:
    """The number-token masks of a tokenizer (cached per tokenizer)."""
    return _number_vocabulary(tokenizer, vocab_size)


def allowed_mask(vocab: NumberVocabulary, text: str, max_decimals: int) -> Bool[Tensor, " vocab"]:
    """Tokens that may follow the answer text written so far (none once `max_decimals` decimals are written)."""
    if "." in text and len(text.split(".")[-1]) >= max_decimals:
        return torch.zeros_like(vocab.next)
    if text == "":
        return vocab.first | vocab.space
    if text == " ":
        return vocab.after_space
    return vocab.next


def number_value(text: str) -> float | None:
    """The value of a number spelled with digits, "," and "." (None if it has no digit)."""
    return parse_number(text).value


@dataclass
class AnswerDistribution:
    """The numbers a model writes after a prompt, with their probabilities."""

    values: np.ndarray  # distinct numeric values
    probs: np.ndarray  # absolute probabilities (sum = valid_mass)
    invalid_mass: float  # probability of ending without writing a number
    unexplored_mass: float  # probability left below the threshold or past max_tokens
    texts: dict[float, str] = field(default_factory=dict)  # one spelling per value, for display

    @property
    def valid_mass(self) -> float:
        return float(self.probs.sum())

    def _normalised(self) -> np.ndarray:
        return self.probs / self.probs.sum() if self.probs.sum() > 0 else self.probs

    @property
    def expected(self) -> float:
        """Expected value among valid answers (NaN if none)."""
        return float(np.dot(self._normalised(), self.values)) if self.valid_mass > 0 else math.nan

    @property
    def variance(self) -> float:
        if self.valid_mass == 0:
            return math.nan
        return float(np.dot(self._normalised(), (self.values - self.expected) ** 2))

    @property
    def median(self) -> float:
        if self.valid_mass == 0:
            return math.nan
        order = np.argsort(self.values)
        cumulative = np.cumsum(self._normalised()[order])
        return float(self.values[order][np.searchsorted(cumulative, 0.5)])

    @property
    def mode_text(self) -> str:
        return self.texts.get(float(self.values[np.argmax(self.probs)]), "") if len(self.values) else ""


@dataclass
class _Branch:
    prompt: int  # index of the prompt in the batch
    column: int  # cache column of this branch's last token (-1: the prompt's last token)
    ancestors: tuple[int, ...]  # cache columns of this branch's answer tokens
    text: str
    token: int
    prob: float
    greedy: bool = False  # a cut branch followed to its most likely end, carrying its whole mass


@dataclass
class ExactReadoutConfig:
    """Settings of the exact read-out."""

    threshold: float = 1e-3
    """Branches whose probability falls below this are not expanded exactly (they are completed greedily)."""
    target_mass: float = 0.995
    """A prompt stops expanding once this much probability is resolved (valid + invalid)."""
    max_tokens: int = 8
    """Longest answer, in tokens."""
    max_branches: int = 32
    """Most branches expanded exactly per prompt and level (the most probable)."""
    max_completions: int = 16
    """Most cut branches per prompt and level completed greedily (the most probable; 0: none). The rest of the
    cut mass is 'unexplored'."""
    max_decimals: int = 1
    """Decimal digits followed; the rest of a number's decimals is cut (2.57 counts as 2.5)."""
    batch_size: int = 8
    """Prompts per batch."""


@torch.inference_mode()
def exact_distributions(
    bridge, token_ids: list[list[int]], config: ExactReadoutConfig | None = None, progress: bool = True
) -> list[AnswerDistribution]:
    """The exact numeric answer distribution after each prompt (each prompt already ends with its prefix)."""
    config = config or ExactReadoutConfig()
    tokenizer = bridge.workbench_tokenizer
    results: list[AnswerDistribution] = []
    batches = list(chunks(len(token_ids), config.batch_size))
    for part in tqdm(batches, desc="exact read-out", disable=not progress, leave=False):
        results.extend(_exact_batch(bridge, tokenizer, token_ids[part], config))
    return results


class _Tally:
    """Per-prompt outcomes of one batch: mass per value, one spelling per value, invalid and resolved mass."""

    def __init__(self, n: int):
        self.outcomes: list[dict[float, float]] = [{} for _ in range(n)]
        self.texts: list[dict[float, str]] = [{} for _ in range(n)]
        self.invalid, self.resolved = np.zeros(n), np.zeros(n)

    def end(self, branch: _Branch, mass: float) -> None:
        value = number_value(branch.text)
        if value is None:
            self.invalid[branch.prompt] += mass
        else:
            self.outcomes[branch.prompt][value] = self.outcomes[branch.prompt].get(value, 0.0) + mass
            self.texts[branch.prompt].setdefault(value, branch.text)
        self.resolved[branch.prompt] += mass

    def distributions(self) -> list[AnswerDistribution]:
        return [_distribution(o, t, i, r) for o, t, i, r in zip(self.outcomes, self.texts, self.invalid, self.resolved)]


def _exact_batch(bridge, tokenizer, token_ids, config: ExactReadoutConfig) -> list[AnswerDistribution]:
    """Tree decoding: every level's branches run in one forward pass over a shared KV cache.

    Each prompt's cache row holds the prompt followed by all answer tokens expanded so far; a 4-D attention
    mask lets each new token see its prompt and its own ancestors only, so no cache row is ever copied.
    Branches cut from the exact tree (below the threshold or past `max_branches`) are completed greedily: each
    follows its most likely continuation (or ends, if ending is likelier) and carries its whole mass to the
    number it ends on. Without this the cut mass falls mostly on long numbers ("149.99" splits its mass over
    many digit branches, "2.5" does not), which would bias the distribution towards short numbers.
    """
    ids, prompt_mask = left_pad(token_ids, pad_id(tokenizer), model_device(bridge))
    # only the last position's logits are needed: skip the unembedding of the rest of the prompt
    logits, cache = bridge(ids, attention_mask=prompt_mask, return_type="logits_and_cache", logits_to_keep=1)
    vocab = number_vocabulary(tokenizer, logits.shape[-1])
    tally = _Tally(len(token_ids))
    branches = [_Branch(p, -1, (), "", -1, 1.0) for p in range(len(token_ids))]
    branch_logits: Float[Tensor, "branch vocab"] = logits[:, -1]
    width = prompt_mask.shape[1]
    for depth in range(config.max_tokens + 1):
        probs = torch.softmax(branch_logits.float(), dim=-1).cpu()
        children: list[_Branch] = []
        for branch, row in zip(branches, probs):
            allowed = allowed_mask(vocab, branch.text, config.max_decimals)
            end_share = max(0.0, 1.0 - float(row[allowed].sum()))
            ancestors = branch.ancestors + ((branch.column,) if branch.column >= 0 else ())
            if branch.greedy:
                best = int(torch.argmax(row * allowed)) if bool(allowed.any()) else -1
                if best < 0 or end_share >= float(row[best]):
                    tally.end(branch, branch.prob)
                elif depth < config.max_tokens:
                    children.append(_Branch(branch.prompt, -1, ancestors, branch.text + vocab.strings[best], best,
                                            branch.prob, greedy=True))
                continue
            tally.end(branch, branch.prob * end_share)
            if depth == config.max_tokens:
                continue
            candidate_probs = row * allowed * branch.prob  # at most this many children of a prompt are kept:
            top = torch.topk(candidate_probs, min(config.max_branches + config.max_completions, len(row)))
            children.extend(
                _Branch(branch.prompt, -1, ancestors, branch.text + vocab.strings[t], t, p)
                for p, t in zip(top.values.tolist(), top.indices.tolist()) if p > 0
            )
        branches = _select(children, tally.resolved, config)
        if not branches:
            break
        branch_logits, cache, width = _expand(bridge, branches, cache, width, prompt_mask, depth)
    return tally.distributions()


def _expand(bridge, branches: list[_Branch], cache, width: int, prompt_mask, depth: int):
    """Run one level of branches (one new token each) against the cache of `width` columns; their logits."""
    n, prompt_width = prompt_mask.shape
    per_prompt: dict[int, list[_Branch]] = {}
    for branch in branches:
        per_prompt.setdefault(branch.prompt, []).append(branch)
    k = max(len(group) for group in per_prompt.values())
    new_ids = torch.full((n, k), pad_id(bridge.workbench_tokenizer), dtype=torch.long)
    mask = torch.zeros((n, 1, k, width + k), dtype=torch.bool)
    mask[:, 0, torch.arange(k), width + torch.arange(k)] = True  # every new token sees itself
    rows, slots = [], []
    for prompt, group in per_prompt.items():
        for j, branch in enumerate(group):
            new_ids[prompt, j] = branch.token
            mask[prompt, 0, j, :prompt_width] = prompt_mask[prompt].bool().cpu()
            mask[prompt, 0, j, list(branch.ancestors)] = True
            branch.column = width + j
            rows.append(prompt)
            slots.append(j)
    device = prompt_mask.device
    positions = (prompt_mask.sum(1, keepdim=True) + depth).expand(n, k)
    logits, cache = bridge(new_ids.to(device), attention_mask=mask.to(device), position_ids=positions,
                           past_key_values=cache, return_type="logits_and_cache")
    return logits[torch.tensor(rows), torch.tensor(slots)], cache, width + k


def _select(children: list[_Branch], resolved: np.ndarray, config: ExactReadoutConfig) -> list[_Branch]:
    """Each unfinished prompt's branches for the next level: the most probable exact ones above the threshold,
    every greedy completion under way, and the most probable of the cut branches as new completions."""
    by_prompt: dict[int, list[_Branch]] = {}
    for child in children:
        if resolved[child.prompt] < config.target_mass:
            by_prompt.setdefault(child.prompt, []).append(child)
    kept = []
    for prompt_branches in by_prompt.values():
        exact = sorted((b for b in prompt_branches if not b.greedy), key=lambda b: -b.prob)
        n_exact = sum(1 for b in exact[: config.max_branches] if b.prob > config.threshold)
        cut = exact[n_exact : n_exact + config.max_completions]
        for branch in cut:
            branch.greedy = True
        kept.extend(exact[:n_exact] + [b for b in prompt_branches if b.greedy])
    return kept


def _distribution(outcome: dict[float, float], text: dict[float, str], invalid: float, resolved: float):
    values = np.array(sorted(outcome), dtype=float)
    probs = np.array([outcome[v] for v in values], dtype=float)
    return AnswerDistribution(values, probs, float(invalid), float(max(0.0, 1.0 - resolved)), text)


@dataclass
class SamplingConfig:
    """Settings of sampled generation (the paper: temperature 0.6, top-p 0.9, 10 new tokens)."""

    n_samples: int = 100
    temperature: float = 0.6
    top_p: float = 0.9
    max_new_tokens: int = 10
    seed: int = 0
    batch_size: int = 128
    """Rows (prompt x sample) per forward pass."""


@torch.inference_mode()
def generate(bridge, token_ids: list[list[int]], config: SamplingConfig | None = None,
             progress: bool = True) -> list[list[str]]:
    """Sampled (temperature > 0) or greedy (temperature = 0) continuations: n_samples texts per prompt.

    Each prompt runs once; its KV cache is repeated for the samples (`batch_size` rows per batch).
    """
    config = config or SamplingConfig()
    tokenizer = bridge.workbench_tokenizer
    generator = torch.Generator().manual_seed(config.seed)
    per_batch = max(1, config.batch_size // config.n_samples)
    texts: list[str] = []
    for part in tqdm(list(chunks(len(token_ids), per_batch)), desc="generate", disable=not progress, leave=False):
        texts.extend(_generate_batch(bridge, tokenizer, token_ids[part], config, generator))
    return [texts[i : i + config.n_samples] for i in range(0, len(texts), config.n_samples)]


def _generate_batch(bridge, tokenizer, prompts, config: SamplingConfig, generator) -> list[str]:
    device = model_device(bridge)
    ids, mask = left_pad(prompts, pad_id(tokenizer), device)
    logits, cache = bridge(ids, attention_mask=mask, return_type="logits_and_cache", logits_to_keep=1)
    cache.batch_repeat_interleave(config.n_samples)
    logits = logits[:, -1:].repeat_interleave(config.n_samples, dim=0)
    mask = mask.repeat_interleave(config.n_samples, dim=0)
    stop_ids = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    finished = torch.zeros(mask.shape[0], dtype=torch.bool)
    new_tokens: list[Tensor] = []
    for _ in range(config.max_new_tokens):
        token = _sample(logits[:, -1].float().cpu(), config, generator)
        token[finished] = pad_id(tokenizer)
        new_tokens.append(token)
        finished |= torch.tensor([t in stop_ids for t in token.tolist()])
        if bool(finished.all()):
            break
        mask = torch.cat([mask, (~finished).long().unsqueeze(1).to(device)], dim=1)
        logits, cache = bridge(token.unsqueeze(1).to(device), attention_mask=mask, past_key_values=cache,
                               return_type="logits_and_cache")
    generated = torch.stack(new_tokens, dim=1)
    return [tokenizer.decode([t for t in row if t not in stop_ids]) for row in generated.tolist()]


def _sample(logits: Float[Tensor, "rows vocab"], config: SamplingConfig, generator) -> Tensor:
    if config.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / config.temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs > config.top_p
    sorted_probs[outside] = 0.0
    choice = torch.multinomial(sorted_probs, 1, generator=generator).squeeze(1)
    return order.gather(1, choice.unsqueeze(1)).squeeze(1)


def samples_to_distribution(texts: list[str]) -> AnswerDistribution:
    """Sampled answers as an empirical distribution (each sample weight 1/n; unparseable ones are invalid)."""
    counts: dict[float, float] = {}
    spelled: dict[float, str] = {}
    invalid = 0.0
    for text in texts:
        value = parse_number(text).value
        if value is None:
            invalid += 1 / len(texts)
        else:
            counts[value] = counts.get(value, 0.0) + 1 / len(texts)
            spelled.setdefault(value, text)
    return _distribution(counts, spelled, invalid, 1.0)
