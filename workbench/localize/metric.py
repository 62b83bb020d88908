"""A differentiable bias metric: the expected log answer over a fixed set of answer leaves.

For a prompt and a set of candidate answers (leaves, e.g. the most probable numbers of the exact read-out),
the model's probability of writing each leaf and then ending the number is computed in ONE forward pass:
the prompt and all leaf tokens are packed in one row, and a 4-D attention mask lets each leaf token see the
prompt and the earlier tokens of its own leaf only. The metric is the expected value of sign(v) log(1+|v|)
under those probabilities renormalised over the leaves, v on the audit's higher-is-better scale
(`answers.on_scale`: a rank is flipped, answers out of the type's range are no leaves): smooth in the
activations, so it has gradients.

The probabilities are the read-out's estimand: the sampler's (temperature, top-k, top-p) next-token
distribution, as in workbench.readout.engine. The sampler's support (which tokens top-p keeps) is computed from the
logits of the same forward pass without gradient and held fixed, so the gradient is that of the renormalised
tempered softmax inside the support; activation patching and ablation recompute the support from their own
logits, exactly as the sampler would. A leaf ends where the next token neither continues the number nor ends
it with a value of its own (a multiplier such as "k"); leaves are plain numbers (texts with a multiplier are
left out of the leaf set).

Rows are laid out so that every prompt ends at the same column `prompt_end`: the tokens after the name then
sit at the same columns in the White and Black prompt of a pair (names tokenise to different lengths, the
text after them is the same), which is what activation patching and attribution patching align on (the name
span itself is mapped from the White row onto the Black row by `workbench.localize.pairs`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from workbench.audit.stats import signed_log
from workbench.batching import pad_id
from workbench.readout.answers import on_scale
from workbench.readout.engine import (
    FIRST_TOKEN,
    AnswerDistribution,
    Sampler,
    allowed_mask,
    ending_masks,
    number_value,
    number_vocabulary,
    settled_value,
)
from workbench.readout.prompts import RenderedPrompt


@dataclass
class LeafBatch:
    """Prompts and their answer leaves packed for one forward pass."""

    input_ids: Int[Tensor, "batch seq"]
    attention_mask: Bool[Tensor, "batch 1 seq seq"]
    position_ids: Int[Tensor, "batch seq"]
    prompt_end: int  # column after every prompt's last token
    suffix_start: Int[Tensor, " batch"]  # first column after the name, per row
    name_start: Int[Tensor, " batch"]  # first column of the name, per row
    token_rows: Int[Tensor, " n"]  # for every leaf token: its row,
    token_columns: Int[Tensor, " n"]  # the column whose logits predict it,
    token_ids: Int[Tensor, " n"]  # its id,
    token_leaf: Int[Tensor, " n"]  # and the leaf it belongs to
    end_rows: Int[Tensor, " leaves"]  # for every leaf: the row and column whose logits must end the number,
    end_columns: Int[Tensor, " leaves"]
    end_allowed: Bool[Tensor, "leaves vocab"]  # the tokens that would continue it instead,
    leaf_row: Int[Tensor, " leaves"]  # its row,
    leaf_value: Float[Tensor, " leaves"]  # and its value on the log scale
    sampler: Sampler  # the next-token distribution whose leaf probabilities are taken

    def to(self, device) -> "LeafBatch":
        return LeafBatch(**{k: v.to(device) if isinstance(v, Tensor) else v for k, v in self.__dict__.items()})


def leaf_value(text: str, answer_type: str) -> float | None:
    """A leaf's value in the metric: signed log of its higher-is-better value (`answers.on_scale`); None when
    the text is no valid answer of the type."""
    value = number_value(text)
    if value is None:
        return None
    scaled, valid = on_scale(np.array([value]), answer_type)
    return float(signed_log(scaled)[0]) if valid[0] else None


def top_leaves(distributions: list[AnswerDistribution], n_leaves: int, answer_type: str) -> list[str]:
    """The valid answer texts with the highest summed probability over several prompts (e.g. a White/Black
    pair) of one answer type."""
    totals: dict[str, float] = {}
    for distribution in distributions:
        for value, prob in zip(distribution.values, distribution.probs):
            text = distribution.texts.get(float(value), "")
            if FIRST_TOKEN.match(text) and leaf_value(text, answer_type) is not None:
                totals[text] = totals.get(text, 0.0) + float(prob)
    return [text for text, _ in sorted(totals.items(), key=lambda item: -item[1])[:n_leaves]]


def pack(rendered: list[RenderedPrompt], leaves: list[list[str]], answer_types: list[str], tokenizer,
         vocab_size: int, sampler: Sampler | None = None, max_decimals: int = 2, value_tolerance: float = 0.0
         ) -> LeafBatch:
    """Pack each prompt with its leaf texts and answer type (same order) into one row each. A leaf that the
    read-out settled (`engine.settled_value` at `value_tolerance`: the decimal point of a large number) stands for
    every continuation of its text, as in the read-out: nothing continues it."""
    sampler = sampler or Sampler()
    vocab = number_vocabulary(tokenizer, vocab_size)
    leaf_tokens = [[tokenizer(text, add_special_tokens=False)["input_ids"] for text in row] for row in leaves]
    prompt_end = max(len(r.input_ids) for r in rendered)
    width = prompt_end + max(sum(len(t) for t in row) for row in leaf_tokens)
    batch = len(rendered)
    ids = torch.full((batch, width), pad_id(tokenizer), dtype=torch.long)
    mask = torch.zeros((batch, 1, width, width), dtype=torch.bool)
    mask[:, 0, torch.arange(width), torch.arange(width)] = True
    positions = torch.zeros((batch, width), dtype=torch.long)
    tokens: list[tuple[int, int, int, int]] = []
    ends: list[tuple[int, int, int]] = []
    allowed, values, suffix_start, name_start = [], [], [], []
    leaf_index = 0
    rows = zip(rendered, leaves, leaf_tokens, answer_types, strict=True)
    for row, (prompt, texts, token_lists, answer_type) in enumerate(rows):
        length = len(prompt.input_ids)
        start = prompt_end - length
        ids[row, start:prompt_end] = torch.tensor(prompt.input_ids)
        mask[row, 0, start:prompt_end, start:prompt_end] = torch.tril(torch.ones(length, length, dtype=torch.bool))
        positions[row, start:prompt_end] = torch.arange(length)
        name_start.append(start + prompt.name_span[0])
        suffix_start.append(start + prompt.name_span[1])
        column = prompt_end
        for text, token_list in zip(texts, token_lists):
            previous = prompt_end - 1
            for depth, token in enumerate(token_list):
                ids[row, column] = token
                positions[row, column] = length + depth
                mask[row, 0, column, start:prompt_end] = True
                mask[row, 0, column, column - depth : column + 1] = True
                tokens.append((row, previous, token, leaf_index))
                previous = column
                column += 1
            ends.append((row, previous, leaf_index))
            if settled_value(text, value_tolerance):
                allowed.append(torch.zeros(vocab_size, dtype=torch.bool))
            else:
                allowed.append(allowed_mask(vocab, text, max_decimals) | torch.stack(ending_masks(vocab, text)).any(0))
            value = leaf_value(text, answer_type)
            if value is None:
                raise ValueError(f"row {row}: leaf {text!r} is no valid {answer_type} answer")
            values.append(value)
            leaf_index += 1
    token_array = torch.tensor(tokens, dtype=torch.long).reshape(-1, 4)
    end_array = torch.tensor(ends, dtype=torch.long).reshape(-1, 3)
    return LeafBatch(
        input_ids=ids, attention_mask=mask, position_ids=positions, prompt_end=prompt_end,
        suffix_start=torch.tensor(suffix_start), name_start=torch.tensor(name_start),
        token_rows=token_array[:, 0], token_columns=token_array[:, 1], token_ids=token_array[:, 2],
        token_leaf=token_array[:, 3], end_rows=end_array[:, 0], end_columns=end_array[:, 1],
        end_allowed=torch.stack(allowed) if allowed else torch.zeros((0, vocab_size), dtype=torch.bool),
        leaf_row=end_array[:, 0], leaf_value=torch.tensor(values, dtype=torch.float32), sampler=sampler,
    )


BlockStart = tuple[int, Float[Tensor, "batch seq d_model"]]  # (block k, the residual entering it)


def forward(bridge, batch: LeafBatch, start: BlockStart | None = None) -> Float[Tensor, "batch leaf_seq vocab"]:
    """Logits of the packed rows from the prompt's last column on (hooks active on the bridge apply).

    Only those columns predict leaf tokens; skipping the unembedding of the prompt saves time and memory.
    `start` = (k, residual) resumes the forward at block k from the residual entering it (recorded by
    `workbench.localize.patching.block_inputs`), running only blocks k on (`blocks_from`): exact for any intervention on blocks >= k.
    """
    keep = batch.input_ids.shape[1] - batch.prompt_end + 1
    masks = {"attention_mask": batch.attention_mask, "position_ids": batch.position_ids, "logits_to_keep": keep}
    if start is None or start[0] == 0:
        return bridge(batch.input_ids, **masks)
    layer, residual = start
    with blocks_from(bridge, layer):
        return bridge(residual, start_at_layer=layer, **masks)


@contextmanager
def blocks_from(bridge, layer: int) -> Iterator[None]:
    """While active, the wrapped model's forward runs blocks `layer` on only.

    TransformerLens's `start_at_layer` injects the residual at block k but still runs blocks 0..k-1 and discards
    their output; slicing the model's list of blocks (the `ModuleList` holding the bridge's blocks) skips them.
    Where no such list is found the forward runs every block (exact, no saving). On the nnsight backend `blocks`
    is the HF model's own list, sliced the same way.
    """
    found = next(((parent, attr) for parent in bridge.original_model.modules()
                  for attr, child in parent.named_children()
                  if isinstance(child, torch.nn.ModuleList) and len(child) and child[0] is bridge.blocks[0]), None)
    if found is None or layer == 0:
        yield
        return
    parent, attr = found
    every_block = getattr(parent, attr)
    setattr(parent, attr, every_block[layer:])
    try:
        yield
    finally:
        setattr(parent, attr, every_block)


def leaf_weights(logits: Float[Tensor, "batch kept vocab"], batch: LeafBatch) -> Float[Tensor, " leaves"]:
    """Every leaf's probability, renormalised over its row's leaves (a row whose leaves all left the sampler's
    support gets NaN, not an error).

    `logits` may cover only the last columns of the rows (as `forward` returns them).
    """
    offset = batch.input_ids.shape[1] - logits.shape[1]
    log_probs = batch.sampler.log_probs(logits)
    token_lp = log_probs[batch.token_rows, batch.token_columns - offset, batch.token_ids]
    n_leaves = batch.leaf_row.shape[0]
    leaf_lp = torch.zeros(n_leaves, device=logits.device).index_add(0, batch.token_leaf, token_lp)
    end_probs = log_probs[batch.end_rows, batch.end_columns - offset].exp()
    continue_mass = (end_probs * batch.end_allowed.to(end_probs.dtype)).sum(-1)
    leaf_lp = leaf_lp + torch.log1p(-continue_mass.clamp(max=1 - 1e-6))
    n_rows = logits.shape[0]
    row_max = torch.full((n_rows,), -torch.inf, device=logits.device).scatter_reduce(
        0, batch.leaf_row, leaf_lp, reduce="amax"
    ).clamp(min=-1e30)
    weights = (leaf_lp - row_max[batch.leaf_row]).exp()
    total = torch.zeros(n_rows, device=logits.device).index_add(0, batch.leaf_row, weights)
    return weights / total[batch.leaf_row]


def expected_log_answer(logits: Float[Tensor, "batch kept vocab"], batch: LeafBatch) -> Float[Tensor, " batch"]:
    """Per row: the expected log answer over its leaves, weighted by the model's leaf probabilities."""
    weighted = leaf_weights(logits, batch) * batch.leaf_value
    return torch.zeros(logits.shape[0], device=logits.device).index_add(0, batch.leaf_row, weighted)
