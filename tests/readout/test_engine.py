"""Tests for workbench.readout.engine: the exact tree read-out against brute force and sampling, and generate."""

import dataclasses
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from workbench.audit.stats import signed_log
from workbench.config import load_config
from workbench.loaded import model_info
from workbench.readout.engine import (
    ExactReadoutConfig,
    Sampler,
    ending_masks,
    SamplingConfig,
    allowed_mask,
    completions,
    exact_distributions,
    generate,
    number_value,
    number_vocabulary,
    samples_to_distribution,
)
from workbench.readout.parsing import parse_answer
from workbench.readout.prompts import PromptSet, render_all
from workbench.testing.tiny import tiny_llama

ROOT = Path(__file__).resolve().parents[2]

TINY_PROMPTS = ["Price: $", "I want to buy a bicycle from Lakisha. Offer: $", "A car costs $", "Q: 2+2?\nA: "]


def _next_token_probs(model, ids: list[int]) -> torch.Tensor:
    """Next-token probabilities after `ids` by a full forward of a plain HF model (no cache), in float64."""
    with torch.inference_mode():
        return torch.softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)


def _tiny_ids(tokenizer):
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TINY_PROMPTS]


# ----------------------------------------------------------------------------------------------- tiny, exact


def test_exact_masses_are_a_probability_distribution(tiny_bridge):
    ids = _tiny_ids(model_info(tiny_bridge).tokenizer)
    configs = [ExactReadoutConfig(), ExactReadoutConfig(threshold=1e-5, max_tokens=3, temperature=1.0, top_p=1.0)]
    for config in configs:
        for dist in exact_distributions(tiny_bridge, ids, config, progress=False):
            assert (dist.probs >= 0).all() and dist.invalid_mass >= 0 and dist.unexplored_mass >= 0
            assert len(dist.values) == len(set(dist.values.tolist())) > 0
            assert abs(dist.valid_mass + dist.invalid_mass + dist.unexplored_mass - 1.0) < 1e-6


def _reference(model, vocab, prompt: list[int], sampler: Sampler, max_tokens: int, max_decimals: int):
    """The answer distribution by recursion over full forwards of a plain HF model (no cache, no tree mask):
    every continuation is followed; a token that neither continues the number nor carries a value of its own
    ends it; a multiplier whose word end is open is decided by the next token."""
    outcome, lost = Counter(), [0.0]

    def add(text, mass):
        outcome[number_value(text)] += mass

    def walk(ids, text, mass, depth, open_word=False):
        with torch.inference_mode():
            p = sampler.probs(model(torch.tensor([prompt + ids])).logits[:, -1].double())[0]
        if open_word:
            word = p[vocab.word_start].sum().item()
            add(text + "a", mass * word)
            add(text + " ", mass * (1 - word))
            return
        allowed = allowed_mask(vocab, text, max_decimals)
        closed, opened = ending_masks(vocab, text)
        add(text, mass * (1.0 - p[allowed | closed | opened].sum().item()))
        for t in torch.nonzero(closed & (p > 0)).flatten().tolist():
            add(text + vocab.strings[t], mass * p[t].item())
        if depth == max_tokens:
            lost[0] += mass * p[allowed | opened].sum().item()
            return
        for t in torch.nonzero(opened & (p > 0)).flatten().tolist():
            walk(ids + [t], text + vocab.strings[t], mass * p[t].item(), depth + 1, open_word=True)
        for t in torch.nonzero(allowed & (p > 1e-9)).flatten().tolist():
            walk(ids + [t], text + vocab.strings[t], mass * p[t].item(), depth + 1)

    walk([], "", 1.0, 0)
    return outcome, lost[0]


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.6, 0.9)])
def test_exact_tree_equals_brute_force(tiny_bridge, temperature, top_p):
    """Every answer's probability, the invalid and the unexplored mass, against full forwards without a cache,
    for the raw softmax and for the paper's sampler (T = 0.6, top-p 0.9)."""
    reference, tokenizer = tiny_llama()  # independent copy of the same weights, plain HF, no bridge
    vocab = number_vocabulary(tokenizer, reference.config.vocab_size)
    config = ExactReadoutConfig(temperature=temperature, top_p=top_p, threshold=0.0, max_tokens=2,
                                max_branches=100_000, max_completions=0)
    prompts = _tiny_ids(tokenizer)[:2]
    for prompt, dist in zip(prompts, exact_distributions(tiny_bridge, prompts, config, progress=False)):
        outcome, lost = _reference(reference, vocab, prompt, config.sampler, config.max_tokens, config.max_decimals)
        exact = dict(zip(dist.values.tolist(), dist.probs.tolist()))
        assert set(exact) == {v for v, m in outcome.items() if v is not None and m > 0}
        assert max(abs(exact[v] - m) for v, m in outcome.items() if v is not None) < 5e-5  # float32 logits / T
        assert abs(dist.invalid_mass - outcome[None]) < 1e-5
        assert abs(dist.unexplored_mass - lost) < 5e-5  # a sum over hundreds of paths
        assert len(exact) > 20 and dist.unexplored_mass > 1e-4  # a real tree, not a trivial one


def test_multipliers_are_followed_as_the_parser_reads_them(tiny_bridge):
    """A tiny model's tokens are characters: "12k" and "12 k" are 12,000 unless a word character follows."""
    tokenizer = model_info(tiny_bridge).tokenizer
    vocab = number_vocabulary(tokenizer, tiny_bridge.cfg.d_vocab)
    k, m, a, space = (tokenizer.convert_tokens_to_ids(c) for c in "kma ")
    assert vocab.open["digit"][k] and vocab.open["digit"][m] and vocab.open["digit_space"][k]
    assert not vocab.open["digit_space"][m]  # "5 m" stays 5 (minutes, metres)
    assert vocab.word_start[a] and not vocab.word_start[space]
    assert allowed_mask(vocab, "12", 2)[space] and not allowed_mask(vocab, "12 ", 2).any()
    config = ExactReadoutConfig(temperature=1.0, top_p=1.0, threshold=0.0, max_tokens=3, max_branches=100_000,
                                max_completions=0)
    dist = exact_distributions(tiny_bridge, _tiny_ids(tokenizer)[:1], config, progress=False)[0]
    assert any(v >= 1000 and v % 1000 == 0 for v in dist.values)  # a random model writes some "5k"


def test_sampler_matches_hugging_face_warpers():
    """Temperature, top-k and top-p as Hugging Face's generate applies them (same support, same probabilities)."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    logits = torch.randn(64, 500, generator=torch.Generator().manual_seed(0)) * 3
    for temperature, top_p, top_k in [(0.6, 0.9, 0), (1.0, 0.5, 0), (0.7, 0.95, 20), (1.3, 1.0, 5)]:
        warped = TemperatureLogitsWarper(temperature)(None, logits.clone())
        if top_k:
            warped = TopKLogitsWarper(top_k)(None, warped)
        if top_p < 1:
            warped = TopPLogitsWarper(top_p)(None, warped)
        expected = torch.softmax(warped, -1)
        got = Sampler(temperature, top_p, top_k).probs(logits)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        assert ((got > 0) == (expected > 0)).all()


def test_settled_decimals_move_each_answer_by_less_than_the_tolerance(tiny_bridge):
    """The bounded read-out (`value_tolerance`) against the full tree (itself checked against brute force above):
    every answer of a number of at least 1 / tolerance that writes a decimal point ends at the value written there,
    so each of its answers is the full tree's answers in [v, floor(v) + 1) taken together (the unexplored mass of
    the full tree's deepest decimals aside), each moved by less than the tolerance on the log scale, and the
    expected log answer moves by less than the tolerance."""
    ids = _tiny_ids(model_info(tiny_bridge).tokenizer)[:2]
    tolerance = 0.5  # numbers >= 2: a tiny model writes "2.5" within 3 tokens
    common = dict(temperature=1.0, top_p=1.0, threshold=0.0, max_tokens=3, max_decimals=1, max_branches=100_000,
                  max_completions=0)
    full = exact_distributions(tiny_bridge, ids, ExactReadoutConfig(value_tolerance=0, **common), progress=False)
    bounded = exact_distributions(tiny_bridge, ids, ExactReadoutConfig(value_tolerance=tolerance, **common),
                                  progress=False)
    for f, b in zip(full, bounded):
        settled = lambda v: np.floor(v) if v >= 1 / tolerance else v  # noqa: E731
        expected = Counter()
        for value, mass in zip(f.values.tolist(), f.probs.tolist()):
            assert abs(np.log1p(value) - np.log1p(settled(value))) < tolerance
            expected[settled(value)] += mass
        got = Counter(dict(zip(b.values.tolist(), b.probs.tolist())))
        assert set(got) == set(expected)
        assert max(abs(got[v] - expected[v]) for v in got) <= f.unexplored_mass + 1e-9
        assert abs(b.invalid_mass - f.invalid_mass) < 1e-9
        assert b.unexplored_mass <= f.unexplored_mass + 1e-9
        assert sum(v != settled(v) for v in f.values) > 20  # decimals of numbers >= 2 were in the tree
        expected_log = lambda d: d.probs @ np.log1p(d.values) / d.valid_mass  # noqa: E731
        assert abs(expected_log(b) - expected_log(f)) < tolerance


@pytest.mark.parametrize("completion_mass", [0.0, 0.1])
def test_sampled_completions_are_unbiased(tiny_bridge, completion_mass):
    """With one exact branch per level, the cut rest is resampled into completions: averaged over seeds, the
    distribution equals the full tree (unbiased), and a single seed is not the greedy collapse onto one path; also
    when the completions are allocated by the cut mass (fewer where less is cut)."""
    ids = _tiny_ids(model_info(tiny_bridge).tokenizer)[:1]
    common = dict(temperature=1.0, top_p=1.0, threshold=0.0, max_tokens=2)
    full = exact_distributions(tiny_bridge, ids, ExactReadoutConfig(max_branches=100_000, max_completions=0,
                                                                    **common), progress=False)[0]
    truth = Counter(dict(zip(full.values.tolist(), full.probs.tolist())))
    seeds = 60
    per_seed = []
    for seed in range(seeds):
        config = ExactReadoutConfig(max_branches=1, max_completions=4, completion_mass=completion_mass, seed=seed,
                                    **common)
        dist = exact_distributions(tiny_bridge, ids, config, progress=False)[0]
        assert abs(dist.valid_mass + dist.invalid_mass + dist.unexplored_mass - 1.0) < 1e-9
        assert dist.completed_mass > 0.05
        per_seed.append([dist.valid_mass, dist.probs @ np.log1p(np.abs(dist.values)), dist.probs @ (dist.values < 10)])
    per_seed = np.array(per_seed)
    truth = [full.valid_mass, full.probs @ np.log1p(np.abs(full.values)), full.probs @ (full.values < 10)]
    se = per_seed.std(0, ddof=1) / np.sqrt(seeds)
    assert (se > 0).all()  # the completions are random ...
    assert (np.abs(per_seed.mean(0) - truth) < 4 * se).all()  # ... and unbiased


def test_completions_follow_the_cut_mass():
    """min(max_completions, ceil(m / completion_mass)), at least one; without completion_mass always the maximum."""
    config = ExactReadoutConfig(max_completions=16, completion_mass=0.001)
    assert [completions(m, config) for m in (1e-6, 0.001, 0.0011, 0.0095, 0.5)] == [1, 1, 2, 10, 16]
    assert completions(1e-6, ExactReadoutConfig(max_completions=16)) == 16


def test_allocated_completions_cost_fewer_rows_where_little_is_cut(tiny_bridge, monkeypatch):
    """Allocating by the cut mass draws fewer completions where the cut mass is small: fewer branch rows, and per
    level never more completions than the mass asks for (at most max_completions)."""
    from workbench.readout import engine

    ids = _tiny_ids(model_info(tiny_bridge).tokenizer)
    drawn: list[tuple[float, int]] = []
    original = engine._continuations

    def recording(parents, candidates, vocab, config, rng):
        children = original(parents, candidates, vocab, config, rng)
        sampled = [c for c in children if c.sampled]
        drawn.append((sum(c.prob for c in sampled), sum(c.count for c in sampled)))
        return children

    monkeypatch.setattr(engine, "_continuations", recording)
    common = dict(temperature=1.0, top_p=1.0, threshold=0.05, max_branches=2, max_tokens=3, max_completions=16)
    rows = {}
    for mass in (0.0, 0.02):
        drawn.clear()
        exact_distributions(tiny_bridge, ids, ExactReadoutConfig(completion_mass=mass, **common), progress=False)
        rows[mass] = sum(n for _, n in drawn)
        if mass:
            assert all(n == min(16, max(1, int(np.ceil(m / mass - 1e-9)))) for m, n in drawn if n)
            assert any(n < 16 for m, n in drawn if n)
        else:
            assert all(n == 16 for _, n in drawn if n)
    assert rows[0.02] < rows[0.0]


def test_exact_batch_size_does_not_change_results(tiny_bridge):
    ids = _tiny_ids(model_info(tiny_bridge).tokenizer)
    assert len({len(i) for i in ids}) == len(ids)  # left padding differs per prompt in the batch
    # the exact part at T = 1 without top-p: float noise can flip a token in or out of a nucleus, and move a draw
    base = dict(threshold=1e-4, max_tokens=3, max_completions=0, temperature=1.0, top_p=1.0)
    one = exact_distributions(tiny_bridge, ids, ExactReadoutConfig(batch_size=1, **base), progress=False)
    eight = exact_distributions(tiny_bridge, ids, ExactReadoutConfig(batch_size=8, **base), progress=False)
    for a, b in zip(one, eight):
        # same support; probabilities equal up to float rounding of padded vs unpadded matmuls
        assert np.array_equal(a.values, b.values)
        np.testing.assert_allclose(a.probs, b.probs, rtol=0, atol=1e-6)
        assert abs(a.invalid_mass - b.invalid_mass) < 1e-6
        assert abs(a.unexplored_mass - b.unexplored_mass) < 1e-6


def test_batching_by_tree_size_keeps_each_prompts_answers(tiny_bridge, monkeypatch):
    """`sizes` batch the prompts in their order (the two large trees together, then the two small ones), and each
    prompt still gets its own answers, in the prompts' order; with row_hooks (rows named by position) they are
    refused."""
    monkeypatch.setenv("WORKBENCH_READOUT_CACHE", "off")
    from workbench.readout import engine

    ids = _tiny_ids(model_info(tiny_bridge).tokenizer)
    batches: list[list[list[int]]] = []
    original = engine._exact_batch
    monkeypatch.setattr(engine, "_exact_batch", lambda b, t, part, c: batches.append(part) or original(b, t, part, c))
    base = dict(threshold=1e-4, max_tokens=3, max_completions=0, temperature=1.0, top_p=1.0, batch_size=2)
    given = exact_distributions(tiny_bridge, ids, ExactReadoutConfig(**base), progress=False)
    sizes = [3, 0, 2, 1]
    batches.clear()
    by_size = exact_distributions(tiny_bridge, ids, ExactReadoutConfig(**base), progress=False, sizes=sizes)
    assert batches == [[ids[1], ids[3]], [ids[2], ids[0]]]
    for a, b in zip(given, by_size):
        assert np.array_equal(a.values, b.values)
        np.testing.assert_allclose(a.probs, b.probs, rtol=0, atol=1e-6)
        assert abs(a.invalid_mass - b.invalid_mass) < 1e-6
    with pytest.raises(ValueError, match="sizes"):
        exact_distributions(tiny_bridge, ids, ExactReadoutConfig(**base), progress=False, sizes=sizes,
                            row_hooks=lambda part: [])
    with pytest.raises(ValueError, match="sizes: 3 for 4 prompts"):
        exact_distributions(tiny_bridge, ids, ExactReadoutConfig(**base), progress=False, sizes=sizes[:3])


def test_exact_is_deterministic(tiny_bridge, monkeypatch):
    monkeypatch.setenv("WORKBENCH_READOUT_CACHE", "off")  # both calls computed
    ids = _tiny_ids(model_info(tiny_bridge).tokenizer)
    first = exact_distributions(tiny_bridge, ids, progress=False)
    torch.manual_seed(123)  # the completions draw from the read-out's own seed: a global seed changes nothing
    second = exact_distributions(tiny_bridge, ids, progress=False)
    for a, b in zip(first, second):
        assert np.array_equal(a.values, b.values) and np.array_equal(a.probs, b.probs)
        assert a.invalid_mass == b.invalid_mass and a.unexplored_mass == b.unexplored_mass
        assert a.texts == b.texts


# ----------------------------------------------------------------------------------------------- tiny, generate


def test_greedy_generation_batched_equals_one_by_one(tiny_bridge):
    ids = _tiny_ids(model_info(tiny_bridge).tokenizer)
    greedy = dict(n_samples=1, temperature=0.0, max_new_tokens=6)
    batched = generate(tiny_bridge, ids, SamplingConfig(batch_size=8, **greedy), progress=False)
    single = [generate(tiny_bridge, [i], SamplingConfig(batch_size=1, **greedy), progress=False)[0] for i in ids]
    assert batched == single
    assert all(len(texts) == 1 and texts[0] for texts in batched)


def test_sampling_is_seeded(tiny_bridge):
    ids = _tiny_ids(model_info(tiny_bridge).tokenizer)[:2]
    config = SamplingConfig(n_samples=5, temperature=1.0, top_p=1.0, max_new_tokens=4, batch_size=4, seed=7)
    first = generate(tiny_bridge, ids, config, progress=False)
    assert first == generate(tiny_bridge, ids, config, progress=False)
    assert [len(t) for t in first] == [5, 5]
    assert len(set(first[0])) > 1  # temperature 1 on a random model: samples differ


def test_samples_to_distribution_counts_unparseable_as_invalid():
    dist = samples_to_distribution(["12", "12 dollars", "no idea", "", "3.5 USD", "twelve", " 40k", "$40"])
    assert dist.values.tolist() == [3.5, 12.0, 40_000.0]  # "$40": the reply must start with the number
    np.testing.assert_allclose(dist.probs, [1 / 8, 2 / 8, 1 / 8])
    assert dist.invalid_mass == pytest.approx(4 / 8)
    assert dist.unexplored_mass == 0.0
    assert dist.valid_mass + dist.invalid_mass == pytest.approx(1.0)
    assert dist.expected == pytest.approx((3.5 + 24 + 40_000) / 4)


# ----------------------------------------------------------------------------------------------- real model

N_SAMPLES = 2000


def test_exact_readout_is_the_limit_of_generate(smol_bridge):
    """The exact read-out against 2,000 samples per prompt drawn by `generate` with the same prompt, answer
    prefix, temperature and top-p (the paper's 0.6 / 0.9), on 6 prompts of the four contexts: the expected log
    answer, the variance of the log answer and the invalid mass each lie within 3 standard errors.

    The standard error combines the samples' (the estimate's SE from 2,000 draws) and the read-out's own Monte
    Carlo error: the cut part of the tree is completed by resampled paths, so the read-out is unbiased but not
    noise-free; its SE is measured from 3 seeds of the read-out (settings of configs/study.toml). SE of the sample variance: sd((x - mean)^2)/sqrt(n).
    """
    cases = [("purchase", "car", "Hunter"), ("purchase", "piano", "Ebony"), ("finance", "childcare expenses", "Hunter"),
             ("service", "medical services", "Ebony"), ("activity", "skiing", "Hunter"), ("activity", "pottery", "Ebony")]
    variations = {c: sorted({v for cc, v, _ in cases if cc == c}) for c, _, _ in cases}
    prompts = PromptSet.build(list(variations), names=["Hunter", "Ebony"], variations=variations)
    chosen = [next(p for p in prompts if (p.context, p.variation, p.name) == case) for case in cases]
    ids = [r.input_ids for r in render_all(chosen, model_info(smol_bridge).tokenizer)]
    config = load_config(ROOT / "configs" / "study.toml").readout  # the default study's read-out
    assert (config.temperature, config.top_p) == (0.6, 0.9)
    runs = [exact_distributions(smol_bridge, ids, dataclasses.replace(config, seed=s), progress=False)
            for s in range(3)]
    texts = generate(smol_bridge, ids, SamplingConfig(n_samples=N_SAMPLES, temperature=config.temperature,
                                                      top_p=config.top_p, seed=1), progress=False)
    for i, (prompt, samples) in enumerate(zip(chosen, texts)):
        values = [parse_answer(t).value for t in samples]
        valid = signed_log(np.array([v for v in values if v is not None], dtype=float))
        invalid = 1 - len(valid) / N_SAMPLES
        sampled = {"mean": valid.mean(), "var": valid.var(), "invalid": invalid}
        sample_se = {"mean": valid.std() / np.sqrt(len(valid)),
                     "var": ((valid - valid.mean()) ** 2).std() / np.sqrt(len(valid)),
                     "invalid": np.sqrt(max(invalid * (1 - invalid), 1 / N_SAMPLES) / N_SAMPLES)}
        per_seed = []
        for run in runs:
            dist = run[i]
            x, w = signed_log(dist.values), dist.probs / dist.probs.sum()
            mean = w @ x
            per_seed.append({"mean": mean, "var": w @ (x - mean) ** 2, "invalid": dist.invalid_mass})
            assert dist.unexplored_mass < 0.05
        for key in ("mean", "var", "invalid"):
            exact = np.array([s[key] for s in per_seed])
            se = np.sqrt(sample_se[key] ** 2 + exact.var(ddof=1) / len(exact))
            assert abs(exact.mean() - sampled[key]) < 3 * se, (prompt.context, prompt.variation, key,
                                                                exact.mean(), sampled[key], se)
