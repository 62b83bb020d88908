"""Numeric answers of a model: the sampler's exact answer distribution, and sampled generation.

Both read-outs measure one quantity: the number that starts the model's reply after a fixed answer prefix (for
example "$"), as `workbench.readout.parsing.parse_answer` reads it, when the reply is drawn by a sampler (temperature,
then top-k, then top-p, as in Hugging Face's `generate`; the paper: T = 0.6, top-p 0.9).

Exact read-out: the infinite-sample limit of that sampler. Every continuation made of number tokens (digits,
"," and ".", one leading space, a space after a digit) is expanded level by level with a shared KV cache, each
level's probabilities transformed by the sampler exactly as `generate` transforms them. At each branch, the
probability of any token that neither continues the number nor carries a value of its own ends the number
there; a token with a value of its own (a multiplier such as "k", " thousand", "M", or digits with trailing
text) ends it with that value, and where a multiplier's word end is still open ("5k" could become "5km") the
next token decides. The result is the set of numbers with their probabilities, the mass that ended without a
number (invalid), and the mass left unexplored (numbers longer than `max_tokens`).

Cut branches. Per prompt and level the `max_branches` most probable continuations above `threshold` stay
exact; the cut rest is resampled (systematic resampling, in proportion to mass) into at most
`max_completions` completions that share its mass equally. A completion tallies what ends at each of its
tokens exactly and follows one sampled continuation with the rest of its mass, so the cut part is estimated
without bias (its spread is kept, where a greedy completion would collapse it onto one number) at a Monte
Carlo error that shrinks with `max_completions`; `completed_mass` says how much mass it carries. Completions
that share a prefix run as one branch that splits its count over its next tokens by one multinomial draw
(grouped ancestral sampling), so many completions cost only as many rows as they have distinct prefixes. Completions
are seeded per prompt (`seed` and the prompt's tokens), so results do not depend on the batch.
Decimals past `max_decimals` are cut (their mass stays with the shorter number).
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from workbench.batching import chunks, left_pad, model_device, pad_id
from workbench.errors import ConfigError
from workbench.loaded import model_info
from workbench.readout.parsing import answer_is_final, parse_answer

FIRST_TOKEN = re.compile(r"^ ?[0-9][0-9.,]*$")
NEXT_TOKEN = re.compile(r"^[0-9.,]+$")
AFTER_SPACE = re.compile(r"^[0-9][0-9.,]*$")
WORD_START = re.compile(r"^\w", re.ASCII)


@dataclass(frozen=True)
class Sampler:
    """The per-step transformation of a sampler: temperature, then top-k, then top-p (nucleus).

    Top-p keeps the most probable tokens until their mass reaches `top_p`: a token is dropped when the mass of
    the tokens sorted before it already exceeds `top_p`, so the most probable token is always kept. Temperature
    0 is greedy decoding (all mass on the argmax)."""

    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 0  # 0: no top-k

    def support(self, logits: Float[Tensor, "rows vocab"]) -> Bool[Tensor, "rows vocab"]:
        """The tokens the sampler can draw (computed without gradient)."""
        logits = logits.detach().float()
        if self.temperature == 0:
            return torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, logits.argmax(-1, keepdim=True), True)
        keep = self._top_k(logits)
        if self.top_p < 1:
            keep &= self._nucleus(torch.softmax((logits / self.temperature).masked_fill(~keep, -torch.inf), dim=-1))
        return keep

    def _top_k(self, logits: Float[Tensor, "rows vocab"]) -> Bool[Tensor, "rows vocab"]:
        if not self.top_k:
            return torch.ones_like(logits, dtype=torch.bool)
        return logits >= torch.topk(logits, min(self.top_k, logits.shape[-1]), dim=-1).values[..., -1:]

    def _nucleus(self, probs: Float[Tensor, "rows vocab"]) -> Bool[Tensor, "rows vocab"]:
        """The top-p set of tempered probabilities: the tokens before which less than `top_p` is gathered."""
        # the nucleus is usually small: sort the top 256 tokens, and everything only where that is too few
        sorted_probs, order = probs.topk(min(256, probs.shape[-1]), dim=-1)
        inside = sorted_probs.cumsum(-1) - sorted_probs <= self.top_p
        if bool(inside[..., -1].any()):
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            inside = sorted_probs.cumsum(-1) - sorted_probs <= self.top_p
        return torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, order, inside)

    def log_probs(self, logits: Float[Tensor, "rows vocab"]) -> Float[Tensor, "rows vocab"]:
        """Log-probabilities of the next token (-inf outside the support); differentiable, support held fixed."""
        if self.temperature == 0:
            raise ConfigError("temperature 0 (greedy) has no differentiable probabilities: use temperature > 0")
        return torch.log_softmax((logits.float() / self.temperature).masked_fill(~self.support(logits), -torch.inf),
                                 dim=-1)

    def probs(self, logits: Float[Tensor, "rows vocab"]) -> Float[Tensor, "rows vocab"]:
        """Probabilities of the next token under the sampler (no gradient: one softmax, renormalised in the
        nucleus)."""
        logits = logits.detach().float()
        if self.temperature == 0:
            return self.support(logits).float()
        probs = torch.softmax((logits / self.temperature).masked_fill(~self._top_k(logits), -torch.inf), dim=-1)
        if self.top_p < 1:
            probs = probs * self._nucleus(probs)
            probs = probs / probs.sum(-1, keepdim=True)
        return probs


@dataclass(frozen=True)
class NumberVocabulary:
    """Which tokens continue a number, and which end it with a value of their own (a multiplier, "5)")."""

    first: Bool[Tensor, " vocab"]  # allowed as the first answer token (digits, optionally one leading space)
    space: Bool[Tensor, " vocab"]  # a lone space, allowed first (digits must follow)
    after_space: Bool[Tensor, " vocab"]  # digits-first tokens, allowed after a lone space
    next: Bool[Tensor, " vocab"]  # digits and separators, allowed once a digit was written
    closed: dict[str, Bool[Tensor, " vocab"]]  # per place: tokens that end the answer with a value of their own
    open: dict[str, Bool[Tensor, " vocab"]]  # per place: the same, once the next token says if a word ends there
    word_start: Bool[Tensor, " vocab"]  # tokens starting with a word character (they break a multiplier)
    strings: tuple[str, ...]
    columns: Int[Tensor, " n"]  # the tokens in any mask but word_start: the only ones a branch reads one by one


PLACES = {"start": "", "space": " ", "digit": "5", "digit_space": "5 "}
"""Where an answer token can stand (at the start, after a lone space, after a digit, after a digit and a
space), with a sample text."""


def place_of(text: str) -> str | None:
    """The place after `text`, or None (after "." or "," only digits and separators continue)."""
    if text in ("", " "):
        return "start" if text == "" else "space"
    if text[-1].isdigit():
        return "digit"
    return "digit_space" if text[-1] == " " and text[-2:-1].isdigit() else None


@lru_cache(maxsize=8)
def _number_vocabulary(tokenizer, vocab_size: int) -> NumberVocabulary:
    strings = tokenizer.batch_decode([[i] for i in range(min(vocab_size, len(tokenizer)))])
    strings = tuple(strings) + ("",) * (vocab_size - len(strings))
    masks = {name: torch.zeros(vocab_size, dtype=torch.bool) for name in ("first", "space", "after", "next", "word")}
    closed = {place: torch.zeros(vocab_size, dtype=torch.bool) for place in PLACES}
    opened = {place: torch.zeros(vocab_size, dtype=torch.bool) for place in PLACES}
    continues = {"start": ("first", "space"), "space": ("after",), "digit": ("next", "space"), "digit_space": ()}
    for i, text in enumerate(strings):
        masks["first"][i] = bool(FIRST_TOKEN.match(text))
        masks["space"][i] = text == " "
        masks["after"][i] = bool(AFTER_SPACE.match(text))
        masks["next"][i] = bool(NEXT_TOKEN.match(text))
        masks["word"][i] = bool(WORD_START.match(text))
        for place, before in PLACES.items():
            if not text or any(masks[m][i] for m in continues[place]):
                continue
            at_word, at_end = parse_answer(before + text + "a").value, parse_answer(before + text + " ").value
            ended = parse_answer(before + " ").value  # what ending here without this token would give
            closed[place][i] = at_word == at_end != ended
            opened[place][i] = at_word != at_end
    number = masks["first"] | masks["space"] | masks["after"] | masks["next"]
    number |= torch.stack([*closed.values(), *opened.values()]).any(0)
    return NumberVocabulary(masks["first"], masks["space"], masks["after"], masks["next"], closed, opened,
                            masks["word"], strings, torch.nonzero(number).flatten())


def number_vocabulary(tokenizer, vocab_size: int) -> NumberVocabulary:
    """The number-token masks of a tokenizer (cached per tokenizer)."""
    return _number_vocabulary(tokenizer, vocab_size)


def allowed_mask(vocab: NumberVocabulary, text: str, max_decimals: int) -> Bool[Tensor, " vocab"]:
    """Tokens that continue the answer written so far: digits and separators (none once `max_decimals`
    decimals are written), and after a digit a lone space (a multiplier word may follow: "5 thousand")."""
    if text == "":
        return vocab.first | vocab.space
    if text == " ":
        return vocab.after_space
    place = place_of(text)
    digits = vocab.next if not ("." in text and len(text.split(".")[-1]) >= max_decimals) else None
    if place == "digit":
        return vocab.space if digits is None else digits | vocab.space
    return torch.zeros_like(vocab.next) if digits is None or place == "digit_space" else digits


def ending_masks(vocab: NumberVocabulary, text: str) -> tuple[Bool[Tensor, " vocab"], Bool[Tensor, " vocab"]]:
    """(closed, open): tokens after `text` that end the answer with a value of their own (see NumberVocabulary)."""
    place = place_of(text)
    if place is None:
        none = torch.zeros_like(vocab.next)
        return none, none
    return vocab.closed[place], vocab.open[place]


def number_value(text: str) -> float | None:
    """The value of an answer text (None if it does not start with a number)."""
    return parse_answer(text).value


@dataclass
class AnswerDistribution:
    """The numbers a model writes after a prompt, with their probabilities."""

    values: np.ndarray  # distinct numeric values
    probs: np.ndarray  # absolute probabilities (sum = valid_mass)
    invalid_mass: float  # probability of ending without writing a number
    unexplored_mass: float  # probability left past max_tokens or cut without completion
    texts: dict[float, str] = field(default_factory=dict)  # one spelling per value, for display
    completed_mass: float = 0.0  # part of the valid and invalid mass resolved by sampled completions

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
class ExactReadoutConfig:
    """Settings of the exact read-out (the `[readout]` table of a study config)."""

    temperature: float = 0.6
    """Sampler temperature whose limit is read out (the paper: 0.6; 1 with top_p 1 is the raw softmax)."""
    top_p: float = 0.9
    """Sampler nucleus mass (the paper: 0.9; 1 keeps every token)."""
    top_k: int = 0
    """Sampler top-k (0: none)."""
    threshold: float = 1e-3
    """Branches whose probability falls below this are cut (resampled into completions) instead of expanded
    exactly."""
    max_branches: int = 8
    """Most branches expanded exactly per prompt and level (the most probable)."""
    max_completions: int = 64
    """Sampled completions per prompt and level that stand for the cut branches (drawn in proportion to their
    mass, each carrying an equal share of it; completions on the same prefix run as one branch, so the cost is
    the number of distinct prefixes); 0 leaves the cut mass unexplored."""
    completion_mass: float = 0.0
    """Cut mass one completion stands for: a level's cut mass m is resampled into min(max_completions,
    ceil(m / completion_mass)) completions, so completions go where the mass is (Neyman allocation: a cut part's
    Monte Carlo variance is about m^2 s^2 / n, least in total for a given number of completions at n proportional
    to m) and a name's variance is at most about completion_mass * s^2 * its completed mass. 0: max_completions at
    every level."""
    max_tokens: int = 10
    """Longest answer, in tokens (longer numbers are unexplored)."""
    max_decimals: int = 2
    """Decimal digits followed; the rest of a number's decimals is cut (2.578 counts as 2.57)."""
    value_tolerance: float = 1e-4
    """Decimals are not expanded where they move the value by less than this share: once a number of at least
    1 / value_tolerance has written its decimal point, its mass ends at the value written so far (every
    continuation lies within value_tolerance of it, relative, and within value_tolerance on the log scale), so a
    name's expected log answer moves by less than value_tolerance. A multiplier word after such decimals ("13,500.5k")
    is the one continuation this does not bound. 0 expands every decimal (up to max_decimals)."""
    batch_size: int = 8
    """Prompts per batch."""
    seed: int = 0
    """Seed of the sampled completions (each prompt draws from its own generator, so batching changes
    nothing)."""

    @property
    def sampler(self) -> Sampler:
        return Sampler(self.temperature, self.top_p, self.top_k)


@dataclass
class _Branch:
    prompt: int  # index of the prompt in the batch
    column: int  # cache column of this branch's last token (-1: the prompt's last token)
    ancestors: tuple[int, ...]  # cache columns of this branch's answer tokens
    text: str
    token: int
    prob: float
    sampled: bool = False  # a cut branch standing for `count` sampled paths that share this prefix
    count: int = 1  # how many of the resampled completions follow this prefix
    open: bool = False  # its last token is a multiplier: the next token decides whether a word ends there


@torch.inference_mode()
def exact_distributions(
    bridge, token_ids: list[list[int]], config: ExactReadoutConfig | None = None, progress: bool = True,
    row_hooks: Callable[[slice], list[tuple[str, Callable]]] | None = None, desc: str = "exact read-out",
    sizes: Sequence[float] | None = None,
) -> list[AnswerDistribution]:
    """The exact numeric answer distribution after each prompt (each prompt already ends with its prefix).

    `row_hooks(part)` gives forward hooks for the batch of prompts `token_ids[part]` (batch row i is prompt
    part.start + i), so that prompts of one batch can run under different prunings
    (`components.row_ablation_hooks`). `sizes` (without row_hooks), one per prompt, say how large each prompt's
    tree is expected to be (the number of distinct answers of an earlier read-out of it): prompts are then batched
    in that order, so that alike trees share a batch and a level pads less; the results come back in the prompts'
    order and do not depend on it. Calls on an unedited model are kept in the read-out cache
    (`workbench.readout.cache`) and read back from it."""
    from workbench.readout import cache

    config = config or ExactReadoutConfig()
    if config.temperature == 0 and config.max_completions:
        config = dataclasses.replace(config, max_completions=0)  # greedy: one branch, nothing to sample
    entry = cache.entry_path(bridge, token_ids, config) if row_hooks is None else None
    if entry is not None and (stored := cache.load(entry)) is not None:
        return stored
    if sizes is not None and row_hooks is not None:
        raise ValueError("sizes reorder the prompts, and row_hooks name prompts by position: pass one of them")
    if sizes is not None and len(sizes) != len(token_ids):
        raise ValueError(f"sizes: {len(sizes)} for {len(token_ids)} prompts (one per prompt)")
    order = list(range(len(token_ids))) if sizes is None else sorted(range(len(token_ids)), key=lambda i: sizes[i])
    ordered = [token_ids[i] for i in order]
    tokenizer = model_info(bridge).tokenizer
    found: list[AnswerDistribution] = []
    batches = list(chunks(len(token_ids), config.batch_size))
    for part in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
        with bridge.hooks(fwd_hooks=row_hooks(part)) if row_hooks else nullcontext():
            found.extend(_exact_batch(bridge, tokenizer, ordered[part], config))
    results: list[AnswerDistribution] = [None] * len(token_ids)  # type: ignore[list-item]
    for i, distribution in zip(order, found):
        results[i] = distribution
    if entry is not None:
        cache.save(entry, results)
    return results


class _Tally:
    """Per-prompt outcomes of one batch: mass per value, one spelling per value, invalid, resolved and
    completed mass."""

    def __init__(self, n: int):
        self.outcomes: list[dict[float, float]] = [{} for _ in range(n)]
        self.texts: list[dict[float, str]] = [{} for _ in range(n)]
        self.invalid, self.resolved, self.completed = np.zeros(n), np.zeros(n), np.zeros(n)

    def end(self, branch: _Branch, text: str, mass: float) -> None:
        """The branch's answer is `text` (read by parse_answer) with probability `mass`."""
        value = number_value(text)
        prompt = branch.prompt
        if value is None:
            self.invalid[prompt] += mass
        else:
            self.outcomes[prompt][value] = self.outcomes[prompt].get(value, 0.0) + mass
            self.texts[prompt].setdefault(value, text)
        self.resolved[prompt] += mass
        if branch.sampled:
            self.completed[prompt] += mass

    def distributions(self) -> list[AnswerDistribution]:
        return [_distribution(o, t, i, r, c) for o, t, i, r, c in
                zip(self.outcomes, self.texts, self.invalid, self.resolved, self.completed)]


def _exact_batch(bridge, tokenizer, token_ids, config: ExactReadoutConfig) -> list[AnswerDistribution]:
    """Tree decoding: every level's branches run in one forward pass over a shared KV cache.

    Each prompt's cache row holds the prompt followed by all answer tokens expanded so far; a 4-D attention
    mask lets each new token see its prompt and its own ancestors only, so no cache row is ever copied.
    """
    ids, prompt_mask = left_pad(token_ids, pad_id(tokenizer), model_device(bridge))
    # only the last position's logits are needed: skip the unembedding of the rest of the prompt
    logits, cache = bridge(ids, attention_mask=prompt_mask, return_type="logits_and_cache", logits_to_keep=1)
    vocab = number_vocabulary(tokenizer, logits.shape[-1])
    rngs = [np.random.default_rng([config.seed, zlib.crc32(np.asarray(t, dtype=np.int64).tobytes())])
            for t in token_ids]
    tally = _Tally(len(token_ids))
    branches = [_Branch(p, -1, (), "", -1, 1.0) for p in range(len(token_ids))]
    branch_logits: Float[Tensor, "branch vocab"] = logits[:, -1]
    width = prompt_mask.shape[1]
    columns = vocab.columns.to(logits.device)
    word_start = vocab.word_start.to(logits.device)
    for depth in range(config.max_tokens + 1):
        probs = config.sampler.probs(branch_logits)
        word = (probs * word_start).sum(-1).double().cpu()
        children = _level(branches, probs[:, columns].double().cpu(), word, vocab, tally, config, depth, rngs)
        if not children:
            break
        branches = children
        branch_logits, cache, width = _expand(bridge, branches, cache, width, prompt_mask, depth)
    return tally.distributions()


def _level(branches: list[_Branch], probs: Float[Tensor, "branch column"], word: Float[Tensor, " branch"],
           vocab: NumberVocabulary, tally: _Tally, config: ExactReadoutConfig, depth: int,
           rngs: list[np.random.Generator]) -> list[_Branch]:
    """Tally what ends at each branch's next token; return the next level's branches.

    `probs` are the sampler's probabilities of the number tokens (`vocab.columns`), `word` the probability of a
    token that starts with a word character.

    Exact branches end with the probability of every token that neither continues the number nor ends it with a
    value of its own; their continuations are pooled per prompt: the `max_branches` most probable above the
    threshold stay exact, and the cut rest is resampled (systematic resampling, proportional to mass) into at
    most `max_completions` sampled branches sharing its mass equally, each then following one sampled path."""
    allowed, closed, opened = _branch_masks(vocab, [b.text for b in branches], config.max_decimals)
    end_share = (1.0 - (probs * (allowed | closed | opened)).sum(1)).clamp(min=0.0)
    if depth == config.max_tokens:  # longer answers are unexplored
        allowed = opened = torch.zeros_like(allowed)
    children: list[_Branch] = []
    for i, branch in enumerate(branches):
        row = probs[i]
        if branch.open:  # "5k" + a word character is "5"; anything else keeps the multiplier
            tally.end(branch, branch.text + "a", branch.prob * float(word[i]))
            tally.end(branch, branch.text + " ", branch.prob * (1.0 - float(word[i])))
            continue
        tally.end(branch, branch.text, branch.prob * float(end_share[i]))
        for column in torch.nonzero(closed[i] & (row > 0)).flatten().tolist():
            tally.end(branch, branch.text + vocab.strings[int(vocab.columns[column])], branch.prob * float(row[column]))
        children.extend(_child(branch, int(vocab.columns[column]), branch.prob * float(row[column]), vocab,
                               open=True, sampled=branch.sampled, count=branch.count)
                        for column in torch.nonzero(opened[i] & (row > 0)).flatten().tolist())
        if branch.sampled:
            children.extend(_draw(branch, row, allowed[i], vocab, rngs[branch.prompt]))
    exact = [i for i, b in enumerate(branches) if not (b.open or b.sampled)]
    if exact:
        weights = torch.tensor([branches[i].prob for i in exact], dtype=probs.dtype)[:, None]
        candidates = probs[exact] * allowed[exact] * weights
        for prompt in sorted({branches[i].prompt for i in exact}):
            rows = [j for j, i in enumerate(exact) if branches[i].prompt == prompt]
            children.extend(_continuations([branches[exact[j]] for j in rows], candidates[rows], vocab, config,
                                           rngs[prompt]))
    if not config.value_tolerance:
        return children
    unsettled = []
    for child in children:
        if not child.open and settled_value(child.text, config.value_tolerance):
            tally.end(child, child.text, child.prob)
        else:
            unsettled.append(child)
    return unsettled


def settled_value(text: str, tolerance: float) -> bool:
    """Whether every continuation of the answer `text` lies within `tolerance` of its value, relative: it is in the
    decimals of a number of at least 1 / tolerance (a later multiplier word excepted)."""
    integer, point, _ = text.strip().replace(",", "").partition(".")
    return bool(point) and integer.isdigit() and int(integer) * tolerance >= 1


def _branch_masks(vocab: NumberVocabulary, texts: list[str], max_decimals: int
                  ) -> tuple[Bool[Tensor, "branch column"], Bool[Tensor, "branch column"], Bool[Tensor, "branch column"]]:
    """`allowed_mask` and `ending_masks` (closed, open) after each text, on the number tokens (`vocab.columns`)."""
    masks: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
    rows = []
    for text in texts:
        if text not in masks:
            full = (allowed_mask(vocab, text, max_decimals), *ending_masks(vocab, text))
            masks[text] = tuple(mask[vocab.columns] for mask in full)
        rows.append(masks[text])
    return tuple(torch.stack(part) for part in zip(*rows))


def _child(parent: _Branch, token: int, prob: float, vocab: NumberVocabulary, **state) -> _Branch:
    ancestors = parent.ancestors + ((parent.column,) if parent.column >= 0 else ())
    return _Branch(parent.prompt, -1, ancestors, parent.text + vocab.strings[token], token, prob, **state)


def _draw(branch: _Branch, row: Float[Tensor, " column"], allowed: Bool[Tensor, " column"], vocab: NumberVocabulary,
          rng: np.random.Generator) -> list[_Branch]:
    """A sampled branch's continuations: its `count` paths draw their next digit token (one multinomial draw in
    proportion to the probabilities), and the paths that drew the same token go on as one branch carrying their
    share of the continuing mass (what ends here was tallied exactly)."""
    candidates = torch.nonzero(allowed & (row > 0)).flatten()
    if not len(candidates):
        return []
    weights = row[candidates].numpy()
    total = float(weights.sum())
    drawn = rng.multinomial(branch.count, weights / total)
    return [_child(branch, int(vocab.columns[candidates[i]]), branch.prob * total * k / branch.count, vocab, sampled=True,
                   count=int(k)) for i, k in enumerate(drawn) if k]


def _continuations(parents: list[_Branch], candidates: Float[Tensor, "parent column"], vocab: NumberVocabulary,
                   config: ExactReadoutConfig, rng: np.random.Generator) -> list[_Branch]:
    """One prompt's next exact branches and its resampled completions of the cut rest."""
    flat = candidates.flatten()
    nonzero = torch.nonzero(flat > 0).flatten()
    order = nonzero[torch.argsort(flat[nonzero], descending=True, stable=True)]
    masses = flat[order]
    n_exact = int((masses[: config.max_branches] > config.threshold).sum())
    width = candidates.shape[1]

    def branch(index: int, prob: float, **state) -> _Branch:
        return _child(parents[index // width], int(vocab.columns[index % width]), prob, vocab, **state)

    kept = [branch(int(i), float(m)) for i, m in zip(order[:n_exact], masses[:n_exact])]
    cut = order[n_exact:]
    # resample in a canonical order (parent, token), so that float noise in the masses hardly moves the picks
    cut = cut[torch.argsort(cut)]
    cut_masses = flat[cut].numpy()
    total = float(cut_masses.sum())
    n_draws = completions(total, config) if len(cut) else 0
    if n_draws:
        positions = (rng.random() + np.arange(n_draws)) / n_draws * total
        picks = np.minimum(np.searchsorted(np.cumsum(cut_masses), positions, side="right"), len(cut) - 1)
        chosen, counts = np.unique(picks, return_counts=True)  # completions on one prefix run as one branch
        kept.extend(branch(int(cut[p]), total * k / n_draws, sampled=True, count=int(k))
                    for p, k in zip(chosen, counts))
    return kept


def completions(cut_mass: float, config: ExactReadoutConfig) -> int:
    """How many completions stand for a level's cut mass (see `ExactReadoutConfig.completion_mass`)."""
    if not config.completion_mass:
        return config.max_completions
    return min(config.max_completions, max(1, math.ceil(cut_mass / config.completion_mass)))


def _expand(bridge, branches: list[_Branch], cache, width: int, prompt_mask, depth: int):
    """Run one level of branches (one new token each) against the cache of `width` columns; their logits."""
    n, prompt_width = prompt_mask.shape
    per_prompt: dict[int, list[_Branch]] = {}
    for branch in branches:
        per_prompt.setdefault(branch.prompt, []).append(branch)
    k = max(len(group) for group in per_prompt.values())
    new_ids = torch.full((n, k), pad_id(model_info(bridge).tokenizer), dtype=torch.long)
    mask = torch.zeros((n, 1, k, width + k), dtype=torch.bool)
    mask[:, 0, torch.arange(k), width + torch.arange(k)] = True  # every new token sees itself
    for prompt, group in per_prompt.items():
        for j, branch in enumerate(group):
            new_ids[prompt, j] = branch.token
            mask[prompt, 0, j, :prompt_width] = prompt_mask[prompt].bool().cpu()
            mask[prompt, 0, j, list(branch.ancestors)] = True
            branch.column = width + j
    device = prompt_mask.device
    positions = (prompt_mask.sum(1, keepdim=True) + depth).expand(n, k)
    logits, cache = bridge(new_ids.to(device), attention_mask=mask.to(device), position_ids=positions,
                           past_key_values=cache, return_type="logits_and_cache")
    rows = torch.tensor([b.prompt for b in branches])
    slots = torch.tensor([b.column - width for b in branches])
    return logits[rows, slots], cache, width + k  # in the order of `branches`


def _distribution(outcome: dict[float, float], text: dict[float, str], invalid: float, resolved: float,
                  completed: float = 0.0) -> AnswerDistribution:
    values = np.array(sorted(outcome), dtype=float)
    probs = np.array([outcome[v] for v in values], dtype=float)
    return AnswerDistribution(values, probs, float(invalid), float(max(0.0, 1.0 - resolved)), text,
                              float(completed))


@dataclass
class SamplingConfig:
    """Settings of sampled generation (the paper: temperature 0.6, top-p 0.9, 10 new tokens)."""

    n_samples: int = 100
    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 0
    max_new_tokens: int = 10
    seed: int = 0
    batch_size: int = 256
    """Rows (prompt x sample) per forward pass."""
    stop_at_answer: bool = True
    """Stop a row once its answer is decided (`parsing.answer_is_final`): the parsed answer is the same, the
    text may be shorter. False writes max_new_tokens (or up to a stop token)."""

    @property
    def sampler(self) -> Sampler:
        return Sampler(self.temperature, self.top_p, self.top_k)


@torch.inference_mode()
def generate(bridge, token_ids: list[list[int]], config: SamplingConfig | None = None,
             progress: bool = True) -> list[list[str]]:
    """Sampled (temperature > 0) or greedy (temperature = 0) continuations: n_samples texts per prompt.

    Samples are drawn together (grouped ancestral sampling): the samples that share a prefix form one branch,
    and each step splits a branch's count over next tokens by one multinomial draw from the sampler's
    distribution, which has exactly the law of that many independent draws. Branches run on the exact
    read-out's engine (each prompt one cache row, branches seeing the prompt and their own earlier tokens
    through a 4-D mask). A sample stops at a stop token, or once its answer is decided (`stop_at_answer`).
    Prompts run together while their samples add up to at most `batch_size`; each prompt's texts come in a
    random order.
    """
    config = config or SamplingConfig()
    tokenizer = model_info(bridge).tokenizer
    generator = torch.Generator().manual_seed(config.seed)
    texts: list[list[str]] = []
    groups = list(chunks(len(token_ids), max(1, config.batch_size // max(1, config.n_samples))))
    for part in tqdm(groups, desc="generate", unit="batch", disable=not progress, leave=False):
        texts.extend(_generate_batch(bridge, tokenizer, token_ids[part], config, generator))
    return texts


def _generate_batch(bridge, tokenizer, prompts: list[list[int]], config: SamplingConfig,
                    generator) -> list[list[str]]:
    """`config.n_samples` samples of each prompt, grouped by shared prefix (see `generate`)."""
    ids, prompt_mask = left_pad(prompts, pad_id(tokenizer), model_device(bridge))
    logits, cache = bridge(ids, attention_mask=prompt_mask, return_type="logits_and_cache", logits_to_keep=1)
    branches = [_Branch(p, -1, (), "", -1, 1.0) for p in range(len(prompts))]
    counts, written = [config.n_samples] * len(prompts), [[] for _ in prompts]
    row_logits = logits[:, -1]
    finished: list[list[str]] = [[] for _ in prompts]
    stop_ids = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    width = prompt_mask.shape[1]
    for depth in range(config.max_new_tokens):
        probs = config.sampler.probs(row_logits.float()).cpu()
        children, child_counts, child_written = [], [], []
        for branch, count, tokens, row in zip(branches, counts, written, probs):
            for token, k in _split(row, count, config.sampler, generator):
                text = tokens + [token] if token not in stop_ids else tokens
                if token in stop_ids or depth == config.max_new_tokens - 1 or (
                        config.stop_at_answer and answer_is_final(tokenizer.decode(text))):
                    finished[branch.prompt].extend([tokenizer.decode(text)] * k)
                    continue
                ancestors = branch.ancestors + ((branch.column,) if branch.column >= 0 else ())
                children.append(_Branch(branch.prompt, -1, ancestors, "", token, 1.0))
                child_counts.append(k)
                child_written.append(text)
        if not children:
            break
        row_logits, cache, width = _expand(bridge, children, cache, width, prompt_mask, depth)
        branches, counts, written = children, child_counts, child_written
    order = [torch.randperm(len(texts), generator=generator).tolist() for texts in finished]
    return [[texts[i] for i in perm] for texts, perm in zip(finished, order)]


def _split(probs: Float[Tensor, " vocab"], count: int, sampler: Sampler, generator) -> list[tuple[int, int]]:
    """How `count` samples that share a prefix spread over their next tokens: [(token, how many)]."""
    if sampler.temperature == 0:
        return [(int(probs.argmax()), count)]
    draws = torch.multinomial(probs, count, replacement=True, generator=generator)
    tokens, how_many = torch.unique(draws, return_counts=True)
    return list(zip(tokens.tolist(), how_many.tolist()))


def samples_to_distribution(texts: list[str]) -> AnswerDistribution:
    """Sampled answers as an empirical distribution (each sample weight 1/n; answers that do not start with a
    number are invalid, as in the exact read-out)."""
    counts: dict[float, float] = {}
    spelled: dict[float, str] = {}
    invalid = 0.0
    for text in texts:
        value = parse_answer(text).value
        if value is None:
            invalid += 1 / len(texts)
        else:
            counts[value] = counts.get(value, 0.0) + 1 / len(texts)
            spelled.setdefault(value, text)
    return _distribution(counts, spelled, invalid, 1.0)
