"""Numeric answers of a model: an exact, deterministic answer distribution and sampled generation.

Exact read-out: the prompt ends with a fixed answer prefix (for example "$"), so the next tokens spell the
number. Starting from the prompt, every continuation made of number tokens (digits, "," and ".", one leading
space) is expanded level by level with a shared KV cache, keeping branches whose probability exceeds a
threshold. At each branch, the probability of any other token ends the number there. The result is the set
of numbers the model would write with their probabilities, the mass that ended without a number (invalid) and
the mass left unexplored (below the threshold, or longer than `max_tokens`). Decimals past `max_decimals`
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


@dataclass
class ExactReadoutConfig:
    """Settings of the exact read-out."""

    threshold: float = 1e-3
    """Branches whose probability falls below this are not expanded (their mass is 'unexplored')."""
    target_mass: float = 0.995
    """A prompt stops expanding once this much probability is resolved (valid + invalid)."""
    max_tokens: int = 8
    """Longest answer, in tokens."""
    max_branches: int = 32
    """Most branches kept per prompt and level (the most probable)."""
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


def _exact_batch(bridge, tokenizer, token_ids, config: ExactReadoutConfig) -> list[AnswerDistribution]:
    """Tree decoding: every level's branches run in one forward pass over a shared KV cache.

    Each prompt's cache row holds the prompt followed by all answer tokens expanded so far; a 4-D attention
    mask lets each new token see its prompt and its own ancestors only, so no cache row is ever copied.
    """
    ids, prompt_mask = left_pad(token_ids, pad_id(tokenizer), model_device(bridge))
    # only the last position's logits are needed: skip the unembedding of the rest of the prompt
    logits, cache = bridge(ids, attention_mask=prompt_mask, return_type="logits_and_cache", logits_to_keep=1)
    vocab = number_vocabulary(tokenizer, logits.shape[-1])
    n = len(token_ids)
    outcomes: list[dict[float, float]] = [{} for _ in range(n)]
    texts: list[dict[float, str]] = [{} for _ in range(n)]
    invalid, resolved = np.zeros(n), np.zeros(n)
    branches = [_Branch(p, -1, (), "", -1, 1.0) for p in range(n)]
    branch_logits: Float[Tensor, "branch vocab"] = logits[:, -1]
    width = prompt_mask.shape[1]
    for depth in range(config.max_tokens + 1):
        probs = torch.softmax(branch_logits.float(), dim=-1).cpu()
        children: list[_Branch] = []
        for branch, row in zip(branches, probs):
            allowed = allowed_mask(vocab, branch.text, config.max_decimals)
            end_prob = branch.prob * max(0.0, 1.0 - float(row[allowed].sum()))
            value = number_value(branch.text)
            if value is None:
                invalid[branch.prompt] += end_prob
            else:
                outcomes[branch.prompt][value] = outcomes[branch.prompt].get(value, 0.0) + end_prob
                texts[branch.prompt].setdefault(value, branch.text)
            resolved[branch.prompt] += end_prob
            if depth == config.max_tokens:
                continue
            candidate_probs = row * allowed * branch.prob
            keep = torch.nonzero(candidate_probs > config.threshold).flatten().tolist()
            ancestors = branch.ancestors + ((branch.column,) if branch.column >= 0 else ())
            children.extend(
                _Branch(branch.prompt, -1, ancestors, branch.text + vocab.strings[t], t, float(candidate_probs[t]))
                for t in keep
            )
        branches = _select(children, resolved, config)
        if not branches:
            break
        branch_logits, cache, width = _expand(bridge, branches, cache, width, prompt_mask, depth)
    return [_distribution(outcomes[p], texts[p], invalid[p], resolved[p]) for p in range(n)]


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
    """Keep each unfinished prompt's most probable branches."""
    by_prompt: dict[int, list[_Branch]] = {}
    for child in children:
        if resolved[child.prompt] < config.target_mass:
            by_prompt.setdefault(child.prompt, []).append(child)
    kept = []
    for prompt_branches in by_prompt.values():
        kept.extend(sorted(prompt_branches, key=lambda b: -b.prob)[: config.max_branches])
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
