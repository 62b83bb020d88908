"""A loaded model's name, tokenizer and weight hash (`ModelInfo`), kept on its bridge and read with `model_info`.

Kept apart from `workbench.models` so that the read-out and localisation modules reach it without importing
transformers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class ModelInfo:
    """What the workbench knows about a loaded model besides its weights: reach it with `model_info(bridge)`."""

    name: str
    """The registry name, HF directory or hub name the model was loaded from."""
    tokenizer: PreTrainedTokenizerBase
    """The prepared tokenizer (left padding, a pad token)."""
    model: torch.nn.Module = field(repr=False, compare=False)
    backend: str = "bridge"
    """What runs the model: 'bridge' (TransformerLens) or 'nnsight' (`workbench.nnsight_backend`)."""
    edits: list[dict] = field(default_factory=list, repr=False, compare=False)
    """Weight edits in force that `weight_hash` (computed once, on the original weights) does not see: a spike-in
    plant pushes its record here while planted (`workbench.spike_in.Plant.planted`), so cached stages key on it."""

    @cached_property
    def weight_hash(self) -> str:
        """`prune.model_hash` of the weights, computed once (on first use) and kept: the model's identity. NDIF's
        models have no weights here (a weightless skeleton): theirs is the hub name's."""
        from workbench.prune.plan import model_hash

        if getattr(self.model, "remote", False) is True:
            return f"NDIF's copy of {self.name}"
        return model_hash(self.model)


INFO_ATTRIBUTE = "workbench_info"
"""The one attribute `wrap` sets on a bridge: its `ModelInfo`."""


def model_info(bridge) -> ModelInfo:
    """The `ModelInfo` of a model made by `wrap` or `load_model` (either backend)."""
    info = getattr(bridge, INFO_ATTRIBUTE, None)
    if info is None:
        raise TypeError(f"{type(bridge).__name__} was not loaded by workbench.models.wrap or load_model")
    return info


def cpu_kernels() -> dict:
    """The CPU kernels torch runs, which decide float rounding (pinned in workbench/__init__.py): ATen's capability,
    as torch reports it, and MKL's code branch as `MKL_CBWR` asks for it (MKL reads the variable at its first call,
    so it holds where workbench was imported before any computation)."""
    import torch

    return {"aten": torch.backends.cpu.get_cpu_capability(), "mkl_cbwr": os.environ.get("MKL_CBWR")}
