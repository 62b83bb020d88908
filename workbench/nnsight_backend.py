"""The nnsight backend: the study's model surface on nnsight's `TransformersModel` (a local HF model, or NDIF's).

The workbench talks to a model through the surface of a TransformerLens `TransformerBridge` it uses: a forward
(`model(ids, attention_mask=..., position_ids=..., past_key_values=..., return_type=..., logits_to_keep=...)`,
with `start_at_layer` to resume from a block's input), `model.hooks(fwd_hooks=[(hook name, fn)])`,
`run_with_cache`, `cfg`, `original_model` and `parameters()`. `NNsightModel` is that surface on nnsight: every
forward is one `trace`, in which the hooks in force read and overwrite the values of the HF modules behind the
bridge's hook names, and whose logits (and KV cache) come back through `.save()`.

One hook-name map for both backends: the HF module behind each hook name is read from TransformerLens's own
architecture adapter for the model (the map the bridge is built from), so the two backends hook the same tensors
on every architecture TransformerLens supports. (nnterp's standardised names cover the residual stream and the
attention and MLP outputs, not the per-head values before `o_proj` nor the neurons before `down_proj` that the
study prunes, so they are not used.)

`remote` is nnsight's: False runs here; "local" serialises every trace as for NDIF and runs the deserialised
request here (nnsight's `LocalSimulationBackend`: the remote code path without a server); True sends it to NDIF.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from workbench.errors import ModelError
from workbench.loaded import INFO_ATTRIBUTE, ModelInfo, model_info

HOOK_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")
SHARED_WEIGHTS = "workbench_shared_weights"
"""Set on the HF model of a remote nnsight model: NDIF's weights are shared, so `prune.plan` refuses weight edits
(prune by activation hooks instead)."""


@dataclass(frozen=True)
class HookSite:
    """Where a hook name's tensor lives in the HF model: a module's first input or its output (or one element of
    its output tuple), viewed per head where the hook name is per head."""

    module: str
    side: str  # "input" or "output"
    order: int  # position of the site in a block's forward, so that a trace reads the sites in execution order
    per_head: bool = False
    element: int | None = None  # index into a tuple output (the attention pattern)


def hook_sites(adapter) -> dict[str, Callable[[int], HookSite]]:
    """Per hook point (the part of a hook name after `blocks.{layer}.`), its site in block `layer`, from a
    TransformerLens architecture adapter's component mapping."""
    blocks = adapter.component_mapping["blocks"]
    parts = blocks.submodules
    attn, mlp = parts["attn"], parts["mlp"]
    missing = [f"{owner}.{key}" for owner, bridge, keys in (("attn", attn, ("q", "o")), ("mlp", mlp, ("out",)))
               for key in keys if key not in bridge.submodules]
    if missing or "ln2" not in parts:
        raise ModelError(f"the nnsight backend needs separate q and o projections, an MLP output projection and a "
                         f"second norm; this architecture's adapter ({type(adapter).__name__}) lacks "
                         f"{', '.join(missing or ['ln2'])}")

    def site(path: str, side: str, order: int, **kw) -> Callable[[int], HookSite]:
        return lambda layer: HookSite(f"{blocks.name}.{layer}{'.' + path if path else ''}", side, order, **kw)

    return {
        "hook_resid_pre": site("", "input", 0),
        "attn.hook_q": site(f"{attn.name}.{attn.submodules['q'].name}", "output", 1, per_head=True),
        "attn.hook_z": site(f"{attn.name}.{attn.submodules['o'].name}", "input", 2, per_head=True),
        "attn.hook_pattern": site(attn.name, "output", 3, element=1),
        "hook_resid_mid": site(parts["ln2"].name, "input", 4),
        "mlp.hook_in": site(mlp.name, "input", 5),
        "mlp.hook_post": site(f"{mlp.name}.{mlp.submodules['out'].name}", "input", 6),
        "hook_resid_post": site("", "output", 7),
    }


def one_line(error: BaseException) -> str:
    """An error's type and the first line of its message (what a one-line report of it shows)."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def require_values_here(model, what: str) -> None:
    """Stages whose hooks keep activations in this process's objects (recorders) need the model's hooks to run
    here: on NDIF (and in its local simulation) a hook runs on the server's copy of those objects."""
    if getattr(model, "remote", False):
        raise ModelError(f"{what} records activations from inside hooks, which on NDIF run on the server: run it "
                         "with remote = false (nnsight here, or the bridge); NDIF serves read-outs with hook edits")


class _HookName:
    """What a hook function receives as its `hook` argument (TransformerLens passes the HookPoint): its name."""

    def __init__(self, name: str):
        self.name = name


class NNsightModel:
    """The bridge surface the workbench uses, run through nnsight traces (see the module docstring)."""

    def __init__(self, lm, tokenizer, name: str, remote: bool | str = False):
        from transformer_lens.factories.architecture_adapter_factory import ArchitectureAdapterFactory
        from transformer_lens.model_bridge.sources.transformers.source import (
            build_bridge_config_from_hf, determine_architecture_from_hf_config,
        )

        self.lm = lm
        self.original_model = lm._module
        config = self.original_model.config
        self.cfg = build_bridge_config_from_hf(config, determine_architecture_from_hf_config(config), name,
                                               self.original_model.dtype)
        adapter = ArchitectureAdapterFactory.select_architecture_adapter(self.cfg)
        self._sites = hook_sites(adapter)
        self.blocks = self.original_model.get_submodule(adapter.component_mapping["blocks"].name)
        """The HF model's list of decoder blocks (as the bridge's `blocks`: `localize.metric.blocks_from` slices it
        to resume a forward at a block)."""
        self.remote = remote
        self.fwd_hooks: list[tuple[str, Callable]] = []
        if remote:
            import nnsight

            nnsight.register("workbench")  # its hooks run on the server: ship their code with each request
            setattr(self.original_model, SHARED_WEIGHTS, True)
        setattr(self, INFO_ATTRIBUTE, ModelInfo(name, tokenizer, self, backend="nnsight"))

    @classmethod
    def local(cls, hf_model: torch.nn.Module, tokenizer, name: str, remote: bool | str = False) -> "NNsightModel":
        """nnsight on a loaded HF model (`remote="local"`: every trace through NDIF's serialisation)."""
        from nnsight import TransformersModel

        return cls(TransformersModel(hf_model, tokenizer=tokenizer, task="text-generation"), tokenizer, name, remote)

    @classmethod
    def on_ndif(cls, hub_name: str) -> "NNsightModel":
        """NDIF's copy of a hub model: a weightless local skeleton whose traces run on NDIF (needs the hub for
        the config and tokenizer, and NDIF's API key in nnsight's config)."""
        from nnsight import TransformersModel

        from workbench.models import prepare_tokenizer

        try:
            lm = TransformersModel(hub_name, task="text-generation")
        except Exception as error:  # the hub's and nnsight's errors have no common base
            raise ModelError(f"cannot reach {hub_name!r} for NDIF ({one_line(error)})") from error
        return cls(lm, prepare_tokenizer(lm.tokenizer, hub_name), hub_name, remote=True)

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return self.original_model.parameters()

    @contextmanager
    def hooks(self, fwd_hooks: Sequence[tuple[str, Callable]] = ()) -> Iterator["NNsightModel"]:
        """While active, every forward applies `fwd_hooks` (TransformerLens's `fn(activation, hook)`, returning the
        new activation or None to keep it), after the hooks already in force at the same hook name."""
        for name, _ in fwd_hooks:
            self.site(name)
        before = list(self.fwd_hooks)
        self.fwd_hooks = before + list(fwd_hooks)
        try:
            yield self
        finally:
            self.fwd_hooks = before

    def site(self, name: str) -> tuple[int, HookSite]:
        """(layer, site) of a hook name; an unknown name is a ModelError naming it."""
        match = HOOK_NAME.match(name)
        if match is None or match.group(2) not in self._sites:
            raise ModelError(f"the nnsight backend has no hook {name!r}; it knows blocks.<layer>.("
                             f"{'|'.join(self._sites)})")
        layer = int(match.group(1))
        if layer >= self.cfg.n_layers:
            raise ModelError(f"hook {name!r}: the model has {self.cfg.n_layers} blocks")
        return layer, self._sites[match.group(2)](layer)

    def __call__(self, tokens: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                 past_key_values=None, return_type: str = "logits", logits_to_keep: int = 0,
                 start_at_layer: int | None = None):
        """Logits ("logits"), or logits and the KV cache ("logits_and_cache"), of token ids, or, with
        `start_at_layer` = k, of the residual `tokens` entering block k: its input is overwritten with them, and
        hooks on blocks before k are not applied (inside `localize.metric.blocks_from` those blocks do not run)."""
        if return_type not in ("logits", "logits_and_cache"):
            raise ValueError(f"return_type {return_type!r}: the nnsight backend returns 'logits' or 'logits_and_cache'")
        if attention_mask is not None and attention_mask.ndim == 4 and attention_mask.dtype == torch.bool:
            # a 4-D mask reaches HF's eager attention as it is, and is added to the scores: make it additive
            attention_mask = torch.zeros(attention_mask.shape, dtype=self.original_model.dtype,
                                         device=attention_mask.device).masked_fill(
                ~attention_mask, torch.finfo(self.original_model.dtype).min)
        inputs = {"inputs_embeds" if start_at_layer else "input_ids": tokens, "attention_mask": attention_mask,
                  "position_ids": position_ids, "past_key_values": past_key_values,
                  "use_cache": return_type == "logits_and_cache", "logits_to_keep": logits_to_keep}
        hooks = self.fwd_hooks
        if start_at_layer:
            hooks = [(f"blocks.{start_at_layer}.hook_resid_pre", lambda _, hook: tokens)] + [
                (name, fn) for name, fn in hooks if self.site(name)[0] >= start_at_layer]
        output, _ = self._trace(inputs, hooks, [])
        return (output.logits, output.past_key_values) if return_type == "logits_and_cache" else output.logits

    def run_with_cache(self, tokens: Tensor, attention_mask: Tensor | None = None,
                       names_filter: Callable[[str], bool] | None = None, **_) -> tuple[Tensor, dict[str, Tensor]]:
        """Logits and the activations (after the hooks in force) at every hook name that `names_filter` keeps."""
        names = [f"blocks.{layer}.{point}" for layer in range(self.cfg.n_layers) for point in self._sites]
        names = [n for n in names if names_filter is None or names_filter(n)]
        output, saved = self._trace({"input_ids": tokens, "attention_mask": attention_mask}, self.fwd_hooks, names)
        return output.logits, saved

    @contextmanager
    def _reaching_ndif(self) -> Iterator[None]:
        """On NDIF (`remote` true or a host), any failure of the request is one line naming NDIF and the model."""
        if self.remote in (False, "local"):
            yield
            return
        try:
            yield
        except Exception as error:  # the hub's, the network's and NDIF's errors have no common base
            raise ModelError(f"NDIF run of {model_info(self).name!r} failed ({one_line(error)}); "
                             "check the network, NDIF's status and the API key (nnsight's CONFIG.API)") from error

    def _trace(self, inputs: dict, hooks: Sequence[tuple[str, Callable]], saved_names: Sequence[str]):
        """One trace applying `hooks` and saving the activations at `saved_names`, with every site visited once, in
        the order the forward reaches it (nnsight reads a module's values only as the forward passes them)."""
        visits: dict[tuple[int, int], tuple[HookSite, list, list]] = {}
        for name, fn in hooks:
            layer, site = self.site(name)
            visits.setdefault((layer, site.order), (site, [], []))[1].append((name, fn))
        for name in saved_names:
            layer, site = self.site(name)
            visits.setdefault((layer, site.order), (site, [], []))[2].append(name)
        plan = [visits[key] for key in sorted(visits)]
        inputs = {key: value for key, value in inputs.items() if value is not None}
        n_heads, d_head = self.cfg.n_heads, self.cfg.d_head
        lm = self.lm  # the block below is shipped to NDIF as it is: it names no object the server lacks
        envoys = [lm.get(site.module) for site, _, _ in plan]
        saved = {}
        with self._reaching_ndif(), lm.trace(**inputs, remote=self.remote):
            for (site, site_hooks, site_saves), envoy in zip(plan, envoys):
                value = envoy.input if site.side == "input" else envoy.output
                whole = value
                if site.element is not None:
                    value = whole[site.element]
                if site.per_head:
                    value = value.view(*value.shape[:-1], n_heads, d_head)
                for name, fn in site_hooks:
                    changed = fn(value, _HookName(name))
                    value = value if changed is None else changed
                for name in site_saves:
                    saved[name] = value
                if site_hooks:
                    if site.per_head:
                        value = value.reshape(*value.shape[:-2], n_heads * d_head)
                    if site.element is not None:
                        value = tuple(value if i == site.element else part for i, part in enumerate(whole))
                    if site.side == "input":
                        envoy.input = value
                    else:
                        envoy.output = value
            output = lm.output.save()
            saved = saved.save() if saved else saved
        return output, saved

