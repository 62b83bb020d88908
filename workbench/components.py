"""The component index (layer, kind, index) and the hooks that read or ablate components.

- An MLP neuron is one unit of `blocks.{l}.mlp.hook_post` [batch, pos, d_mlp] (after the gate product in
  gated MLPs); ablating it removes its contribution through the down projection.
- An attention head is one *query* head of `blocks.{l}.attn.hook_z` [batch, pos, n_heads, d_head], the
  head's output before W_O. With grouped-query attention several query heads share one key/value head; a
  head here is always the query head, so ablating it leaves the shared keys and values (and its siblings)
  untouched. Query-zeroing (the paper's removal) hooks `blocks.{l}.attn.hook_q` instead: a zero query gives
  uniform attention over the visible positions, it does not remove the head's output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from jaxtyping import Float
from torch import Tensor

from workbench.errors import PlanError

Kind = Literal["mlp_neuron", "attn_head"]
AblationMode = Literal["zero", "mean", "query_zero"]
KINDS: tuple[Kind, ...] = get_args(Kind)
ABLATION_MODES: tuple[AblationMode, ...] = get_args(AblationMode)


@dataclass(frozen=True, order=True)
class Component:
    """One MLP neuron or one attention (query) head."""

    layer: int
    kind: Kind
    index: int

    @property
    def hook_name(self) -> str:
        return activation_hook(self.layer, self.kind)

    def label(self) -> str:
        return f"L{self.layer}N{self.index}" if self.kind == "mlp_neuron" else f"L{self.layer}H{self.index}"


def activation_hook(layer: int, kind: Kind) -> str:
    """The hook point whose last (neuron) or second-to-last (head) axis indexes the component."""
    return f"blocks.{layer}.mlp.hook_post" if kind == "mlp_neuron" else f"blocks.{layer}.attn.hook_z"


@dataclass(frozen=True)
class ModelShape:
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_mlp: int
    d_head: int

    @classmethod
    def of(cls, bridge) -> "ModelShape":
        config = bridge.original_model.config
        text_config = getattr(config, "text_config", None) or config
        n_heads = text_config.num_attention_heads
        return cls(
            n_layers=text_config.num_hidden_layers,
            n_heads=n_heads,
            n_kv_heads=getattr(text_config, "num_key_value_heads", None) or n_heads,
            d_mlp=text_config.intermediate_size,
            d_head=getattr(text_config, "head_dim", None) or text_config.hidden_size // n_heads,
        )

    def count(self, kind: Kind) -> int:
        """Components of a kind per layer."""
        return self.d_mlp if kind == "mlp_neuron" else self.n_heads

    def all(self, kind: Kind) -> list[Component]:
        return [Component(layer, kind, i) for layer in range(self.n_layers) for i in range(self.count(kind))]


def components_by_hook(components: Iterable[Component], kind_hook: Callable[[Component], str] | None = None):
    """Group component indices by hook name."""
    groups: dict[str, list[int]] = {}
    for component in components:
        name = kind_hook(component) if kind_hook else component.hook_name
        groups.setdefault(name, []).append(component.index)
    return groups


def ablation_hooks(
    components: Iterable[Component],
    mode: AblationMode = "zero",
    means: dict[str, Float[Tensor, "..."]] | None = None,
) -> list[tuple[str, Callable]]:
    """Forward hooks that ablate the components at every position, for `bridge.hooks(fwd_hooks=...)`.

    zero: set the activation to 0; mean: set it to its mean over a reference set (`means[hook_name]`,
    shape [d_mlp] or [n_heads, d_head]); query_zero: heads only, zero the query (uniform attention).
    """
    return row_ablation_hooks(keep_masks([list(components)], mode), mode, means)


def keep_masks(prunings: Sequence[Sequence[Component]], mode: AblationMode = "zero"
               ) -> dict[str, Float[Tensor, "pruning width"]]:
    """Per hook point, one row per pruning: 1 where a component is kept, 0 where it is ablated (the hook point
    is the component's, or `hook_q` for query-zeroing)."""
    if mode == "query_zero" and any(c.kind != "attn_head" for p in prunings for c in p):
        raise PlanError("query_zero ablation applies to attention heads only")
    hook_of = (lambda c: f"blocks.{c.layer}.attn.hook_q") if mode == "query_zero" else None
    groups = [components_by_hook(pruning, hook_of) for pruning in prunings]
    width: dict[str, int] = {}
    for group in groups:
        for name, indices in group.items():
            width[name] = max(width.get(name, 0), max(indices) + 1)
    masks = {name: torch.ones((len(prunings), n)) for name, n in width.items()}
    for row, group in enumerate(groups):
        for name, indices in group.items():
            masks[name][row, indices] = 0.0
    return masks


def row_ablation_hooks(keep: dict[str, Float[Tensor, "rows width"]], mode: AblationMode = "zero",
                       means: dict[str, Float[Tensor, "..."]] | None = None) -> list[tuple[str, Callable]]:
    """Hooks that ablate, in batch row r, the components whose `keep[hook][r]` is 0 (one row: every batch row).

    The masks may be narrower than the hook's component axis: components past their width are kept. Many
    prunings run in one forward pass this way, one per row (`keep_masks`)."""
    hooks = []
    for name, mask in keep.items():
        if mode == "mean" and (means is None or name not in means):
            raise PlanError(f"mean ablation needs the mean activation of {name}")
        hooks.append((name, _masking_hook(mask, means[name] if mode == "mean" else None)))
    return hooks


def _masking_hook(keep: Float[Tensor, "rows width"], mean: Tensor | None) -> Callable:
    cache: dict[tuple, tuple[Tensor, Tensor | None]] = {}

    def hook(activation: Tensor, hook) -> Tensor:
        heads = activation.ndim == 4  # [batch, pos, n_heads, d_head]; neurons: [batch, pos, d_mlp]
        key = (activation.device, activation.dtype, activation.shape[2])
        if key not in cache:
            full = torch.ones((keep.shape[0], activation.shape[2]), dtype=activation.dtype, device=activation.device)
            full[:, : keep.shape[1]] = keep
            full = full[:, None, :, None] if heads else full[:, None, :]
            shift = None if mean is None else (1 - full) * mean.to(activation)
            cache[key] = (full, shift)
        full, shift = cache[key]
        activation = activation * full
        return activation if shift is None else activation + shift

    return hook


def mean_activations(bridge, batches: Iterable[tuple[Tensor, Tensor]], hook_names: list[str]) -> dict[str, Tensor]:
    """Mean activation of each hook over all real (unpadded) positions of the given (ids, mask) batches."""
    sums: dict[str, Tensor] = {}
    count = 0
    for ids, mask in batches:
        with torch.inference_mode():
            _, cache = bridge.run_with_cache(ids, attention_mask=mask, names_filter=lambda n: n in hook_names)
        real = mask.bool()
        for name in hook_names:
            total = cache[name][real].sum(0)
            sums[name] = sums.get(name, 0) + total
        count += int(real.sum())
    return {name: value / count for name, value in sums.items()}
