"""Tests for workbench.readout: the exact tree read-out against brute force and sampling, and generate."""

import copy
import itertools
from collections import Counter
from functools import partial

import numpy as np
import pytest
import torch

from workbench.prompts import PromptSet, render_all
from workbench.readout import (
    ExactReadoutConfig,
    SamplingConfig,
    allowed_mask,
    exact_distributions,
    generate,
    number_value,
    number_vocabulary,
    samples_to_distribution,
)
from workbench.tiny import tiny_llama

TINY_PROMPTS = ["Price: $", "I want to buy a bicycle from Lakisha. Offer: $", "A car costs $", "Q: 2+2?\nA: "]


def _next_token_probs(model, ids: list[int]) -> torch.Tensor:
    """Next-token probabilities after `ids` by a full forward of a plain HF model (no cache), in float64."""
    with torch.inference_mode():
        return torch.softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)


def _tiny_ids(tokenizer):
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TINY_PROMPTS]


# ----------------------------------------------------------------------------------------------- tiny, exact


def test_exact_masses_are_a_probability_distribution(tiny_bridge):
    ids = _tiny_ids(tiny_bridge.workbench_tokenizer)
    configs = [ExactReadoutConfig(), ExactReadoutConfig(threshold=1e-5, target_mass=1.0, max_tokens=3)]
    for config in configs:
        for dist in exact_distributions(tiny_bridge, ids, config, progress=False):
            assert (dist.probs >= 0).all() and dist.invalid_mass >= 0 and dist.unexplored_mass >= 0
            assert len(dist.values) == len(set(dist.values.tolist())) > 0
            assert abs(dist.valid_mass + dist.invalid_mass + dist.unexplored_mass - 1.0) < 1e-6


def test_exact_tree_equals_brute_force(tiny_bridge):
    """P("12" then a non-number token), P(3) and the invalid mass by full forwards without a cache."""
    reference, tokenizer = tiny_llama()  # independent copy of the same weights, plain HF, no bridge
    probs = partial(_next_token_probs, reference)
    tid = {c: tokenizer.convert_tokens_to_ids(c) for c in "0123456789., "}
    digits = [tid[c] for c in "0123456789"]
    number_next = digits + [tid["."], tid[","]]  # tokens that continue a number once a digit was written

    def ends(ids):  # probability that the next token is not a number token
        return 1.0 - probs(ids)[number_next].sum().item()

    config = ExactReadoutConfig(threshold=0.0, target_mass=1.0, max_tokens=2, max_branches=10_000)
    prompts = _tiny_ids(tokenizer)[:2]
    dists = exact_distributions(tiny_bridge, prompts, config, progress=False)
    for prompt, dist in zip(prompts, dists):
        p0 = probs(prompt)
        twelve = p0[tid["1"]].item() * probs(prompt + [tid["1"]])[tid["2"]].item() * ends(prompt + [tid["1"], tid["2"]])
        # 3 has five spellings of at most two tokens: "3", " 3", "3.", "3," and "03"
        three = p0[tid["3"]].item() * ends(prompt + [tid["3"]]) + sum(
            p0[tid[a]].item() * probs(prompt + [tid[a]])[tid[b]].item() * ends(prompt + [tid[a], tid[b]])
            for a, b in [(" ", "3"), ("3", "."), ("3", ","), ("0", "3")]
        )
        after_space = probs(prompt + [tid[" "]])[digits].sum().item()
        invalid = 1.0 - p0[digits + [tid[" "]]].sum().item() + p0[tid[" "]].item() * (1.0 - after_space)
        exact = dict(zip(dist.values.tolist(), dist.probs.tolist()))
        assert twelve > 1e-6  # a real check, not 0 == 0
        assert abs(exact[12.0] - twelve) < 1e-5
        assert abs(exact[3.0] - three) < 1e-5
        assert abs(dist.invalid_mass - invalid) < 1e-5
        # every number of at most two tokens was resolved, longer ones are unexplored, nothing else is lost
        assert set(exact) >= {float(d) for d in range(10)} | {10.0, 99.0}
        assert abs(dist.valid_mass + dist.invalid_mass + dist.unexplored_mass - 1.0) < 1e-6


def test_cut_branches_are_completed_greedily(tiny_bridge):
    """max_branches=1: one exact branch per level; every other child is followed by its most likely
    continuation (or ends, where ending is likelier) with its whole mass. Reference: full forwards, no cache."""
    reference, tokenizer = tiny_llama()
    probs = partial(_next_token_probs, reference)
    vocab = number_vocabulary(tokenizer, reference.config.vocab_size)
    config = ExactReadoutConfig(threshold=0.0, target_mass=1.0, max_tokens=3, max_branches=1, max_completions=10_000)

    def expected(prompt):
        outcome, invalid = Counter(), [0.0]

        def end(text, mass):
            value = number_value(text)
            if value is None:
                invalid[0] += mass
            else:
                outcome[value] += mass

        def greedy(ids, text, mass, depth):
            p, allowed = probs(prompt + ids), allowed_mask(vocab, text, config.max_decimals)
            best = int(torch.argmax(p * allowed)) if bool(allowed.any()) else -1
            if best < 0 or 1.0 - p[allowed].sum().item() >= p[best].item():
                end(text, mass)
            elif depth < config.max_tokens:
                greedy(ids + [best], text + vocab.strings[best], mass, depth + 1)

        ids, text, mass = [], "", 1.0
        for depth in range(config.max_tokens + 1):
            p, allowed = probs(prompt + ids), allowed_mask(vocab, text, config.max_decimals)
            end(text, mass * (1.0 - p[allowed].sum().item()))
            children = p * allowed * mass
            if depth == config.max_tokens or not bool((children > 0).any()):
                break
            order = torch.argsort(children, descending=True).tolist()
            for t in order[1:]:
                if children[t] > 0:
                    greedy(ids + [t], text + vocab.strings[t], children[t].item(), depth + 1)
            ids, text, mass = ids + [order[0]], text + vocab.strings[order[0]], children[order[0]].item()
        return outcome, invalid[0]

    prompts = _tiny_ids(tokenizer)[:2]
    cut_only = ExactReadoutConfig(threshold=0.0, target_mass=1.0, max_tokens=3, max_branches=1, max_completions=0)
    dists = exact_distributions(tiny_bridge, prompts, config, progress=False)
    exact_only = exact_distributions(tiny_bridge, prompts, cut_only, progress=False)
    for prompt, dist, bare in zip(prompts, dists, exact_only):
        outcome, invalid = expected(prompt)
        got = dict(zip(dist.values.tolist(), dist.probs.tolist()))
        assert set(got) == {v for v, m in outcome.items() if m > 0}
        assert max(abs(got[v] - m) for v, m in outcome.items()) < 1e-5
        assert abs(dist.invalid_mass - invalid) < 1e-5
        assert abs(dist.valid_mass + dist.invalid_mass + dist.unexplored_mass - 1.0) < 1e-6
        # the completions recover mass the bare tree leaves unexplored
        assert bare.unexplored_mass > 0.05 and dist.unexplored_mass < bare.unexplored_mass / 2


def test_exact_batch_size_does_not_change_results(tiny_bridge):
    ids = _tiny_ids(tiny_bridge.workbench_tokenizer)
    assert len({len(i) for i in ids}) == len(ids)  # left padding differs per prompt in the batch
    base = dict(threshold=1e-4, target_mass=1.0, max_tokens=3)
    one = exact_distributions(tiny_bridge, ids, ExactReadoutConfig(batch_size=1, **base), progress=False)
    eight = exact_distributions(tiny_bridge, ids, ExactReadoutConfig(batch_size=8, **base), progress=False)
    for a, b in zip(one, eight):
        # same support; probabilities equal up to float rounding of padded vs unpadded matmuls
        assert np.array_equal(a.values, b.values)
        np.testing.assert_allclose(a.probs, b.probs, rtol=0, atol=1e-6)
        assert abs(a.invalid_mass - b.invalid_mass) < 1e-6
        assert abs(a.unexplored_mass - b.unexplored_mass) < 1e-6


def test_exact_is_deterministic(tiny_bridge):
    ids = _tiny_ids(tiny_bridge.workbench_tokenizer)
    first = exact_distributions(tiny_bridge, ids, progress=False)
    torch.manual_seed(123)  # no randomness is involved: a different global seed changes nothing
    second = exact_distributions(tiny_bridge, ids, progress=False)
    for a, b in zip(first, second):
        assert np.array_equal(a.values, b.values) and np.array_equal(a.probs, b.probs)
        assert a.invalid_mass == b.invalid_mass and a.unexplored_mass == b.unexplored_mass
        assert a.texts == b.texts


# ----------------------------------------------------------------------------------------------- tiny, generate


def test_greedy_generation_batched_equals_one_by_one(tiny_bridge):
    ids = _tiny_ids(tiny_bridge.workbench_tokenizer)
    greedy = dict(n_samples=1, temperature=0.0, max_new_tokens=6)
    batched = generate(tiny_bridge, ids, SamplingConfig(batch_size=8, **greedy), progress=False)
    single = [generate(tiny_bridge, [i], SamplingConfig(batch_size=1, **greedy), progress=False)[0] for i in ids]
    assert batched == single
    assert all(len(texts) == 1 and texts[0] for texts in batched)


def test_sampling_is_seeded(tiny_bridge):
    ids = _tiny_ids(tiny_bridge.workbench_tokenizer)[:2]
    config = SamplingConfig(n_samples=5, temperature=1.0, top_p=1.0, max_new_tokens=4, batch_size=4, seed=7)
    first = generate(tiny_bridge, ids, config, progress=False)
    assert first == generate(tiny_bridge, ids, config, progress=False)
    assert [len(t) for t in first] == [5, 5]
    assert len(set(first[0])) > 1  # temperature 1 on a random model: samples differ


def test_samples_to_distribution_counts_unparseable_as_invalid():
    dist = samples_to_distribution(["12", "12 dollars", "no idea", "", "3.5 USD", "twelve", "$40"])
    assert dist.values.tolist() == [3.5, 12.0, 40.0]
    np.testing.assert_allclose(dist.probs, [1 / 7, 2 / 7, 1 / 7])
    assert dist.invalid_mass == pytest.approx(3 / 7)
    assert dist.unexplored_mass == 0.0
    assert dist.valid_mass + dist.invalid_mass == pytest.approx(1.0)
    assert dist.expected == pytest.approx((3.5 + 24 + 40) / 4)


# ----------------------------------------------------------------------------------------------- real model

N_SAMPLES = 2000
TOP = 5


def _spellings(targets: set[float], max_chars: int = 4) -> set[str]:
    """Every string of digits, "." and "," up to max_chars long whose number_value is a target ("05", "1,0"...)."""
    found = set()
    for length in range(1, max_chars + 1):
        for chars in itertools.product("0123456789.,", repeat=length):
            text = "".join(chars)
            if number_value(text) in targets:
                found.add(text)
    return found


def _grouped_samples(bridge, prompt: list[int], targets: set[float], config: ExactReadoutConfig,
                     generator: torch.Generator) -> Counter:
    """N_SAMPLES ancestral samples at temperature 1 (top-p 1), read with the exact read-out's own grammar.

    Samples that share a prefix are drawn together (multinomial counts per prefix), which has exactly the law
    of N_SAMPLES independent samples. Each sample's answer is read token by token with `allowed_mask` (same
    number tokens, same cut after max_decimals, same max_tokens) and valued with `number_value`, so the sample
    and the exact read-out define the answer identically. A sample whose prefix can no longer spell a target
    value is counted as "other" and not followed further: only P(value = target) is compared.
    Prefix logits come from a plain KV-cached continuation of the prompt (one row per prefix, 2-D mask), not
    from the read-out's shared cache with its 4-D tree mask.
    """
    vocab = number_vocabulary(bridge.workbench_tokenizer, bridge.cfg.d_vocab)
    spellings = _spellings(targets)
    prefixes = {s[:i] for s in spellings for i in range(len(s) + 1)}
    outcomes: Counter = Counter()
    with torch.inference_mode():
        logits, prompt_cache = bridge(torch.tensor([prompt]), return_type="logits_and_cache")
    alive = {(): ("", N_SAMPLES)}
    next_logits = logits[:, -1]
    for depth in range(config.max_tokens + 1):
        grown = {}
        for key, row in zip(list(alive), torch.softmax(next_logits.double(), -1)):
            text, count = alive[key]
            allowed = allowed_mask(vocab, text, config.max_decimals)
            draws = torch.multinomial(row, count, replacement=True, generator=generator)
            for token, k in Counter(draws.tolist()).items():
                if not allowed[token]:
                    value = number_value(text)
                    outcomes["invalid" if value is None else value] += k
                elif depth == config.max_tokens:
                    outcomes["too long"] += k
                elif (text + vocab.strings[token]).lstrip(" ") in prefixes:
                    grown[key + (token,)] = (text + vocab.strings[token], k)
                else:
                    outcomes["other"] += k
        alive = grown
        if not alive:
            break
        keys = list(alive)
        cache = copy.deepcopy(prompt_cache)
        cache.batch_repeat_interleave(len(keys))
        ids = torch.tensor([list(k) for k in keys])
        mask = torch.ones((len(keys), len(prompt) + ids.shape[1]), dtype=torch.long)
        with torch.inference_mode():
            next_logits = bridge(ids, attention_mask=mask, past_key_values=cache)[:, -1]
    assert sum(outcomes.values()) == N_SAMPLES
    return outcomes


def test_exact_readout_agrees_with_sampling(smol_bridge):
    """Exact P(answer = v) for the 5 likeliest answers v lies within 3 SE of its frequency in 2,000 samples.

    Why not the expected log answer: on these prompts SmolLM2 writes numbers one digit per token, so the
    answers spread over many long branches and the exact tree (max_completions=0, tested here) leaves about
    half the mass unexplored (below the threshold or beyond max_branches), mostly on long, large numbers; its
    E[sign*log1p] is renormalised over the explored half only, so it is biased low against samples whatever
    the code does (the greedy completions of cut branches, tested separately, exist to fix that). Absolute
    probabilities of single answers are not renormalised: the exact tree claims P(v) exactly, so its top
    answers can be checked one by one, each within 3 standard errors.
    The samples come from a grouped ancestral sampler (see `_grouped_samples`), not `generate`: generate
    re-runs the prompt for every row and took about 100 s for 64 rows on this 2-core CPU, so 4,000 samples
    through it would take about 2 hours. `generate` is tested separately (greedy parity, seeding).
    """
    tokenizer = smol_bridge.workbench_tokenizer
    prompts = PromptSet.build(["purchase"], variations={"purchase": ["bicycle"]}).prompts[:2]
    assert all(p.answer_prefix == "$" for p in prompts)
    rendered = render_all(prompts, tokenizer)
    config = ExactReadoutConfig(max_completions=0)
    dists = exact_distributions(smol_bridge, [r.input_ids for r in rendered], config, progress=False)
    generator = torch.Generator().manual_seed(0)
    for r, dist in zip(rendered, dists):
        assert r.text.endswith("assistant\n$")
        order = np.argsort(-dist.probs)[:TOP]
        targets = {float(v) for v in dist.values[order]}
        counts = _grouped_samples(smol_bridge, r.input_ids, targets, config, generator)
        for value, p in zip(dist.values[order], dist.probs[order]):
            frequency = counts[float(value)] / N_SAMPLES
            se = np.sqrt(p * (1 - p) / N_SAMPLES)
            assert abs(frequency - p) < 3 * se, (value, p, frequency, se)
        # and the invalid mass (ending before any digit) agrees too
        p = dist.invalid_mass
        assert abs(counts["invalid"] / N_SAMPLES - p) < 3 * np.sqrt(p * (1 - p) / N_SAMPLES) + 1e-3
