"""Left-padded batches of token sequences, so that every prompt's last token sits at position -1."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from jaxtyping import Int
from torch import Tensor


def left_pad(
    sequences: Sequence[Sequence[int]], pad_id: int, device: str | torch.device = "cpu"
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Token ids and attention mask of sequences padded on the left to the longest one."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if len(sequence):
            ids[row, width - len(sequence) :] = torch.tensor(list(sequence), dtype=torch.long)
            mask[row, width - len(sequence) :] = 1
    return ids.to(device), mask.to(device)


def chunks(n_items: int, size: int) -> Iterator[slice]:
    """Consecutive slices of at most `size` items covering range(n_items)."""
    for start in range(0, n_items, size):
        yield slice(start, min(start + size, n_items))


def model_device(bridge) -> torch.device:
    """The device of a bridge's (or HF model's) parameters."""
    return next(bridge.parameters()).device


def pad_id(tokenizer) -> int:
    """The tokenizer's pad id, falling back to eos."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
