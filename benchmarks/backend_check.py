"""The nnsight backend against the TransformerLens bridge on the bundled model, and a model split over devices
against one device: the same answer tables, pruned and edited answers, attribution scores.

    .venv/bin/python benchmarks/backend_check.py [--prompts 64] [--pairs 4]
    python3 benchmarks/backend_check.py --split --device cuda     # on a GPU: layers split over cuda:0 and the CPU

Prompts: the default study's (configs/study.toml, its read-out), the first `--prompts`. Per model: the read-out
time, and against the reference (the bridge on one device) the largest difference of an answer probability
(values aligned), of the invalid mass and of a prompt's expected log answer, unedited, with 8 random heads
pruned (hooks) and with a direction edit fitted on the prompts (hooks); and Spearman's rho and the largest
difference of the attribution scores of every neuron and head on `--pairs` race pairs. `--split` adds both
backends with the first half of the layers on `--device` and the rest on the CPU (accelerate's device_map).
Writes benchmarks/results/backend_check[_<device>].json and prints the table. The read-out cache is off.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from measure import device_clock, largest_differences
from workbench.audit.table import run_audit
from workbench.components import ModelShape, ablation_hooks
from workbench.config import load_config
from workbench.errors import ModelError
from workbench.localize.attribution import attribution_scores
from workbench.localize.pairs import build_pairs
from workbench.models import load_model
from workbench.pipeline.study import audit_prompts, exact_settings
from workbench.prune.directions import collect_activations, fit_plan

ROOT = Path(__file__).resolve().parents[1]


def split_map(n_layers: int, device: str) -> dict[str, str]:
    """The embedding and the first half of the blocks on `device`, the rest, the final norm and the head on the
    CPU."""
    placed = {"model.embed_tokens": device, "model.rotary_emb": device}
    placed.update({f"model.layers.{k}": device if k < n_layers // 2 else "cpu" for k in range(n_layers)})
    return {**placed, "model.norm": "cpu", "lm_head": "cpu"}


def measure(model, prompts, readout, edits: dict, pairs) -> dict:
    """Answer tables per edit (with the unedited read-out's seconds) and attribution scores."""
    tables, seconds = {}, None
    for label, hooks in edits.items():
        started = device_clock(str(next(model.parameters()).device))
        with model.hooks(fwd_hooks=hooks):
            tables[label] = run_audit(model, prompts, exact=readout, progress=False)
        if seconds is None:
            seconds = device_clock(str(next(model.parameters()).device)) - started
    neurons, heads = attribution_scores(model, build_pairs(model, pairs, progress=False), progress=False)
    return {"tables": tables, "seconds": seconds, "scores": (neurons.scores.flatten(), heads.scores.flatten())}


def compare(reference: dict, other: dict) -> dict:
    row = {"readout_s": round(other["seconds"], 2)}
    for label, table in reference["tables"].items():
        diff = largest_differences([table], [other["tables"][label]])
        row[f"{label}: answer probability"] = diff["answer_probability"]
        row[f"{label}: invalid mass"] = diff["invalid_mass"]
        row[f"{label}: E[log answer]"] = float(np.nanmax(np.abs(table.log_expected.to_numpy()
                                                                 - other["tables"][label].log_expected.to_numpy())))
    for kind, expected, got in zip(("neurons", "heads"), reference["scores"], other["scores"]):
        row[f"attribution {kind}: Spearman"] = float(spearmanr(expected.float().cpu().numpy(),
                                                               got.float().cpu().numpy()).statistic)
        row[f"attribution {kind}: largest difference"] = float((expected.cpu() - got.cpu()).abs().max())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=4, help="race pairs (both names' prompts) for attribution")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--split", action="store_true", help="also run the model split over --device and the CPU")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    os.environ["WORKBENCH_READOUT_CACHE"] = "off"
    config = load_config(ROOT / "configs" / "study.toml")
    every = audit_prompts(config)
    names = {race: list(dict.fromkeys(p.name for p in every if p.race == race)) for race in ("white", "black")}
    per_race = max(1, args.prompts // (2 * len({p.variation for p in every})))
    prompts = every.filter(names=names["white"][:per_race] + names["black"][:per_race])
    pairs = every.filter(names=names["white"][: args.pairs] + names["black"][: args.pairs])
    readout = exact_settings(config)

    def load(backend: str, device_map=""):
        return load_model(config.model, device=args.device, dtype=torch.float32, backend=backend,
                          device_map=device_map)

    reference_model = load("bridge")
    shape = ModelShape.of(reference_model)
    heads = shape.all("attn_head")
    chosen = [heads[i] for i in np.random.default_rng(0).choice(len(heads), 8, replace=False)]
    direction = fit_plan(reference_model, collect_activations(reference_model, prompts), "mean_difference", "ace")
    edits = {"unedited": [], "8 heads pruned": ablation_hooks(chosen), "direction edit": direction.hooks()}
    reference = measure(reference_model, prompts, readout, edits, pairs)
    del reference_model
    rows = {f"bridge, {args.device}": {"readout_s": round(reference["seconds"], 2)}}
    candidates = {f"nnsight, {args.device}": ("nnsight", "")}
    if args.split:
        placed = split_map(shape.n_layers, args.device)
        candidates.update({f"bridge, split {args.device} + cpu": ("bridge", placed),
                           f"nnsight, split {args.device} + cpu": ("nnsight", placed)})
    for label, (backend, device_map) in candidates.items():
        try:
            model = load(backend, device_map)
        except ModelError as error:  # the bridge refuses a GPU + CPU map: say so in the row
            rows[label] = {"refused": str(error)}
            continue
        rows[label] = compare(reference, measure(model, prompts, readout, edits, pairs))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    result = {"prompts": len(prompts), "pairs": args.pairs, "device": args.device, "gpu": gpu,
              "threads": torch.get_num_threads(), "python": platform.python_version(),
              "reference": f"bridge, {args.device}", "rows": rows, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / (
        "backend_check.json" if args.device == "cpu" else f"backend_check_{args.device.split(':')[0]}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    keys = list(dict.fromkeys(k for row in rows.values() for k in row))
    print("| model | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for label, row in rows.items():
        print(f"| {label} | " + " | ".join(
            (f"{row[k]:.3g}" if isinstance(row[k], float) else str(row[k])) if k in row else "" for k in keys) + " |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
