"""Per-component scores of one localisation method, their ranking, storage and agreement between methods.

Scores are a float32 tensor [n_layers, n_per_layer] (neurons: d_mlp per layer; heads: n_heads per layer).
Convention of every method in this package: a positive score means the component carries the bias (it moves
the Black answer toward the White one); `top` ranks by score, highest first. NaN marks an unscored component.
Files are `<stem>.safetensors` (the tensor) and `<stem>.json` (method, kind, metadata): never pickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float
from safetensors.torch import load_file, save
from scipy.stats import spearmanr
from torch import Tensor

from workbench.components import Component, Kind
from workbench.files import atomic_write

OVERLAP_KS = (10, 50, 200)


@dataclass
class ComponentScores:
    """One method's score for every neuron or every head."""

    method: str
    kind: Kind
    scores: Float[Tensor, "n_layers n_per_layer"]
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        self.scores = self.scores.detach().to("cpu", torch.float32)

    def top(self, k: int, absolute: bool = False) -> list[Component]:
        """The k highest-scoring components (by |score| if `absolute`); NaN scores are never chosen."""
        values = self.scores.abs() if absolute else self.scores
        flat = torch.nan_to_num(values.flatten(), nan=-torch.inf)
        k = min(k, int(torch.isfinite(flat).sum()))
        order = torch.argsort(flat, descending=True, stable=True)[:k]
        width = self.scores.shape[1]
        return [Component(int(i) // width, self.kind, int(i) % width) for i in order]

    def score(self, component: Component) -> float:
        return float(self.scores[component.layer, component.index])

    def save(self, path_stem: str | Path) -> None:
        """Write `<stem>.safetensors` and `<stem>.json`."""
        stem = Path(path_stem)
        atomic_write(stem.with_suffix(".safetensors"), save({"scores": self.scores.contiguous()}))
        info = {"method": self.method, "kind": self.kind, "metadata": self.metadata}
        atomic_write(stem.with_suffix(".json"), json.dumps(info, indent=2))

    @classmethod
    def load(cls, path_stem: str | Path) -> "ComponentScores":
        stem = Path(path_stem)
        info = json.loads(stem.with_suffix(".json").read_text())
        scores = load_file(str(stem.with_suffix(".safetensors")))["scores"]
        return cls(info["method"], info["kind"], scores, info["metadata"])


def agreement(a: ComponentScores, b: ComponentScores, top: int = 200) -> dict:
    """Spearman correlation of a and b over a's top components (scored by both), and top-k overlaps.

    overlap_k = |top_k(a) & top_k(b)| / k for k in 10, 50, 200 (smaller k if fewer components are scored),
    ranking both only over the components that both scored (a method that scored a subset, like activation
    patching of attribution's top neurons, is not penalised for the components it never saw).
    """
    if a.kind != b.kind or a.scores.shape != b.scores.shape:
        raise ValueError(f"cannot compare {a.kind} {tuple(a.scores.shape)} with {b.kind} {tuple(b.scores.shape)}")
    chosen = [c for c in a.top(top) if np.isfinite(b.score(c))]
    result: dict = {"n_compared": len(chosen)}
    if len(chosen) >= 3:
        rho = spearmanr([a.score(c) for c in chosen], [b.score(c) for c in chosen]).statistic
        result["spearman"] = float(rho)
    else:
        result["spearman"] = float("nan")
    both = torch.isfinite(a.scores) & torch.isfinite(b.scores)
    a_shared, b_shared = (ComponentScores(s.method, s.kind, torch.where(both, s.scores, torch.nan)) for s in (a, b))
    for k in OVERLAP_KS:
        top_a, top_b = set(a_shared.top(k)), set(b_shared.top(k))
        size = min(len(top_a), len(top_b))
        result[f"overlap_{k}"] = len(top_a & top_b) / size if size else float("nan")
    return result
