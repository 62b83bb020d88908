"""The read-out cache shared by runs, notebooks and commands: a call's answer distributions, keyed by all they
depend on.

One entry per call of `engine.exact_distributions` on an unedited model: the key holds the model's identity (its
name, its backend and the hash of its weights as they are at the call: `current_weight_hash`), its device, dtype,
thread count and CPU kernels (`loaded.cpu_kernels`), the prompts' token ids in order, every read-out setting (the
batch size too: padding changes float rounding, and a near-tie of the cut rule can then flip, so only the same call
is the same result), the versions of torch, transformers and TransformerLens, and a hash of the read-out's source
files (a changed engine never reads an old entry). A model with hooks attached to its hook points, weights edited
(`prune.plan.weights_edited`: a pruning, a weight selection, a spike-in plant) or edits named in
`model_info(bridge).edits` is read afresh and not stored.

Folder: $WORKBENCH_READOUT_CACHE, else "readouts" in the model cache (`models.cache_dir()`:
$WORKBENCH_CACHE, else ~/.cache/biasprune); WORKBENCH_READOUT_CACHE=off turns the cache off.
Entries are JSON, written atomically, so a killed run leaves no half entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from weakref import WeakKeyDictionary

import numpy as np
import torch

from workbench.files import atomic_write
from workbench.loaded import cpu_kernels, model_info
from workbench.readout.engine import AnswerDistribution, ExactReadoutConfig

SOURCES = ("engine.py", "parsing.py")
"""The files of workbench/readout whose code decides a read-out's result."""


def cache_folder() -> Path | None:
    """Where entries live, or None when WORKBENCH_READOUT_CACHE=off."""
    root = os.environ.get("WORKBENCH_READOUT_CACHE", "")
    if root.lower() == "off":
        return None
    if root:
        return Path(root).expanduser()
    from workbench.models import cache_dir

    return cache_dir() / "readouts"


@lru_cache(maxsize=1)
def _code_key() -> str:
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((Path(__file__).parent / name).read_bytes())
    for package in ("torch", "transformers", "transformer-lens"):
        try:
            digest.update(f"{package}={version(package)}".encode())
        except PackageNotFoundError:
            digest.update(f"{package}=none".encode())
    return digest.hexdigest()


def unedited(bridge) -> bool:
    """No hook attached to a TransformerLens hook point (every intervention of the workbench goes through them:
    row-wise pruning masks, direction edits, patching) and no weight edit in force. (The bridge keeps torch hooks
    of its own on the wrapped model, which change nothing.)"""
    from transformer_lens.hook_points import HookPoint

    from workbench.prune.plan import weights_edited

    if model_info(bridge).edits or weights_edited(bridge):
        return False
    if model_info(bridge).backend == "nnsight":
        return not bridge.fwd_hooks
    return not any(isinstance(m, HookPoint) and (m.fwd_hooks or m.bwd_hooks) for m in bridge.modules())


_HASHES: WeakKeyDictionary = WeakKeyDictionary()  # model -> (its tensors' versions, their hash)


def current_weight_hash(bridge) -> str:
    """The hash of the weights as they are now (`prune.plan.model_hash`), recomputed only when a parameter was
    replaced or changed in place since the last call (torch's version counter of every tensor moves then), so an
    edit made outside the workbench's edit contexts still changes the key."""
    from workbench.prune.plan import model_hash

    model = bridge.original_model
    versions = tuple((t.data_ptr(), t._version) for t in model.state_dict().values())
    known = _HASHES.get(model)
    if known is None or known[0] != versions:
        known = (versions, model_hash(model))
        _HASHES[model] = known
    return known[1]


def entry_key(bridge, token_ids: list[list[int]], config: ExactReadoutConfig) -> str:
    parameter = next(bridge.parameters())
    info = model_info(bridge)
    described = {"model": info.name, "backend": info.backend, "weights": current_weight_hash(bridge),
                 "device": str(parameter.device), "dtype": str(parameter.dtype), "threads": torch.get_num_threads(),
                 "cpu_kernels": cpu_kernels(), "code": _code_key(), "readout": dataclasses.asdict(config),
                 "token_ids": token_ids}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def entry_path(bridge, token_ids: list[list[int]], config: ExactReadoutConfig) -> Path | None:
    """The entry of this call, or None where the call is not cached (cache off, or the model edited or hooked)."""
    folder = cache_folder()
    if folder is None or getattr(bridge, "remote", False) is True or not unedited(bridge):
        return None  # (NDIF's weights are not here to hash: its read-outs are not kept)
    key = entry_key(bridge, token_ids, config)
    return folder / key[:2] / f"{key}.json"


def load(path: Path) -> list[AnswerDistribution] | None:
    """The stored distributions, or None (no entry, or one that cannot be read: it is computed again)."""
    try:
        rows = json.loads(path.read_text())
        return [AnswerDistribution(values=_array(r["values"]), probs=_array(r["probs"]),
                                   invalid_mass=r["invalid"], unexplored_mass=r["unexplored"],
                                   texts={float(v): t for v, t in r["texts"]}, completed_mass=r["completed"])
                for r in rows]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save(path: Path, distributions: list[AnswerDistribution]) -> None:
    rows = [{"values": d.values.tolist(), "probs": d.probs.tolist(), "invalid": d.invalid_mass,
             "unexplored": d.unexplored_mass, "texts": [[v, t] for v, t in d.texts.items()],
             "completed": d.completed_mass} for d in distributions]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(rows).encode())
    except OSError:
        pass  # a read-only or full cache folder costs the reuse, not the result


def _array(values: list[float]) -> np.ndarray:
    return np.asarray(values, dtype=float)
