"""The paper's head score (attention from the answer to the name) and its greedy prune-and-rescore loop.

For each prompt the model writes its greedy answer; one forward pass over prompt + answer then records every
head's attention pattern (`blocks.{l}.attn.hook_pattern`, reduced inside the hook, so no full cache is kept).
A head's score on a prompt is its attention mass on the name tokens, averaged over the query positions that
produced the answer: the last prompt token and every answer token (the rows HF `generate` reports as the
attentions of the generated tokens). Scores are averaged over the Black prompts and over the White prompts,
and the two means are summed, as in the paper. Heads are query heads (grouped-query attention included).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from workbench.batching import chunks, left_pad, model_device, pad_id
from workbench.components import AblationMode, Component, ModelShape, ablation_hooks
from workbench.loaded import model_info
from workbench.localize.scores import ComponentScores
from workbench.nnsight_backend import require_values_here
from workbench.readout.engine import SamplingConfig, generate
from workbench.readout.prompts import Prompt, RenderedPrompt, render_all


def greedy_answers(bridge, rendered: Sequence[RenderedPrompt], max_new_tokens: int = 10, batch_size: int = 32,
                   progress: bool = True) -> list[list[int]]:
    """The token ids of each prompt's greedy answer (stop token excluded), under any active hooks."""
    config = SamplingConfig(n_samples=1, temperature=0.0, max_new_tokens=max_new_tokens, batch_size=batch_size)
    texts = generate(bridge, [r.input_ids for r in rendered], config, progress=progress)
    tokenizer = model_info(bridge).tokenizer
    return [tokenizer(text[0], add_special_tokens=False)["input_ids"] for text in texts]


def _weights(rendered: RenderedPrompt, n_answer: int, width: int) -> tuple[Tensor, Tensor]:
    """Query weights (1/n over the answer-producing positions) and key indicator (name tokens), left-padded."""
    offset = width - len(rendered.input_ids) - n_answer
    query = torch.zeros(width)
    query[offset + rendered.answer_start - 1 : offset + rendered.answer_start + n_answer] = 1.0
    key = torch.zeros(width)
    key[offset + rendered.name_span[0] : offset + rendered.name_span[1]] = 1.0
    return query / query.sum(), key


def _recorder(store: dict[int, Tensor], layer: int, query: Tensor, key: Tensor):
    """A hook that stores [batch, n_heads] = sum over queries and name keys of weight * pattern."""

    def hook(pattern: Float[Tensor, "batch head q k"], hook) -> None:
        store[layer] = torch.einsum("bhqk,bq,bk->bh", pattern.float(), query, key).cpu()

    return hook


@torch.inference_mode()
def name_attention(bridge, rendered: Sequence[RenderedPrompt], answers: Sequence[Sequence[int]],
                   ablated: Sequence[Component] = (), removal: AblationMode = "query_zero", batch_size: int = 8,
                   progress: bool = True) -> Float[Tensor, "prompt layer head"]:
    """Each prompt's per-head attention from the answer-producing positions to the name, ablations applied."""
    shape = ModelShape.of(bridge)
    device = model_device(bridge)
    ablation = ablation_hooks(ablated, removal) if ablated else []
    rows = []
    for part in tqdm(list(chunks(len(rendered), batch_size)), desc="head scores", disable=not progress, leave=False):
        sequences = [list(r.input_ids) + list(a) for r, a in zip(rendered[part], answers[part])]
        ids, mask = left_pad(sequences, pad_id(model_info(bridge).tokenizer), device)
        weights = [_weights(r, len(a), ids.shape[1]) for r, a in zip(rendered[part], answers[part])]
        query = torch.stack([w[0] for w in weights]).to(device)
        key = torch.stack([w[1] for w in weights]).to(device)
        store: dict[int, Tensor] = {}
        recorders = [(f"blocks.{l}.attn.hook_pattern", _recorder(store, l, query, key)) for l in range(shape.n_layers)]
        with bridge.hooks(fwd_hooks=ablation + recorders):
            bridge(ids, attention_mask=mask)
        rows.append(torch.stack([store[l] for l in range(shape.n_layers)], dim=1))
    return torch.cat(rows)


def _group_sum(per_prompt: Float[Tensor, "prompt layer head"], prompts: Sequence[Prompt]):
    """Mean over each race's prompts, summed over races (Black + White)."""
    races = sorted({p.race for p in prompts})
    total = torch.zeros(per_prompt.shape[1:])
    for race in races:
        rows = torch.tensor([p.race == race for p in prompts])
        total += per_prompt[rows].mean(0)
    return total, {race: sum(p.race == race for p in prompts) for race in races}


def head_attention_scores(bridge, prompts: Sequence[Prompt], answers: Sequence[Sequence[int]] | None = None,
                          ablated: Sequence[Component] = (), removal: AblationMode = "query_zero",
                          system_prompt: str | None = None, max_new_tokens: int = 10, batch_size: int = 8,
                          progress: bool = True) -> ComponentScores:
    """The paper's head score [n_layers, n_heads]; answers (token ids per prompt) are generated if not given.

    `ablated` heads are removed (by `removal`) both while the answers are generated and while scoring.
    """
    require_values_here(bridge, "the head attention score")
    prompts = list(prompts)
    rendered = render_all(prompts, model_info(bridge).tokenizer, system_prompt)
    if answers is None:
        ablation = ablation_hooks(ablated, removal) if ablated else []
        with bridge.hooks(fwd_hooks=ablation):
            answers = greedy_answers(bridge, rendered, max_new_tokens, progress=progress)
    per_prompt = name_attention(bridge, rendered, answers, ablated, removal, batch_size, progress)
    scores, counts = _group_sum(per_prompt, prompts)
    metadata = {
        "n_prompts": counts,
        "ablated": [c.label() for c in ablated],
        "removal": removal,
        "answer_lengths": [len(a) for a in answers],
        "query_positions": "last prompt token and every answer token",
    }
    return ComponentScores("head_attention", "attn_head", scores, metadata)


def greedy_head_pruning(bridge, prompts: Sequence[Prompt], steps: int, removal: AblationMode = "query_zero",
                        answers: Sequence[Sequence[int]] | None = None, system_prompt: str | None = None,
                        max_new_tokens: int = 10, batch_size: int = 8,
                        progress: bool = True) -> tuple[list[Component], list[ComponentScores]]:
    """Prune the top-scoring head, re-score the pruned model, repeat: the pruned heads in order and the scores
    before each step. Answers are regenerated by the pruned model at every step unless given."""
    pruned: list[Component] = []
    history: list[ComponentScores] = []
    for _ in tqdm(range(steps), desc="greedy head pruning", disable=not progress):
        scores = head_attention_scores(bridge, prompts, answers, pruned, removal, system_prompt, max_new_tokens,
                                       batch_size, progress=False)
        history.append(scores)
        candidates = scores.scores.clone()
        for head in pruned:
            candidates[head.layer, head.index] = torch.nan
        pruned.append(ComponentScores(scores.method, "attn_head", candidates).top(1)[0])
    return pruned, history
