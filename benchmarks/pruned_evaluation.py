"""K pruned models on the same prompts: the workbench's batched evaluation against one pruning at a time.

    python benchmarks/pruned_evaluation.py [--model NAME_OR_DIR] [--device cpu|cuda] [--dtype float32|bfloat16]
        [--prunings 8] [--names-per-group 2] [--batch-sizes 8 32] [--out benchmarks/results/pruned_evaluation.json]

Both evaluate K prunings (half of them 64 random MLP neurons, half 8 random attention heads, seeded) on the
prompts of one purchase variation with the study's exact read-out:
- loop (the study's way before): each pruning applied alone as weight edits (`Pruning.active`), its prompts
  read out in batches of 8, restored;
- batched (`generalize.read_pruned`): all K x prompts rows in shared batches, every row zero-ablating its own
  pruning's components with per-row masks on hook_post / hook_z, rows ordered by prompt.
It prints the wall time of each, the ratio, the largest absolute difference of any answer probability (and of
the invalid and unexplored masses) between the two, the forward FLOPs and their rate as a share of the
matmul rate of the model's shapes on this machine, and writes the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import torch

from workbench.audit.table import run_audit
from workbench.components import Component, ModelShape
from workbench.config import load_config
from workbench.models import load_model
from workbench.prune.generalize import Pruning, random_cases, read_pruned
from workbench.readout.prompts import PromptSet, names_subset

from measure import ForwardFlops, device_clock, largest_differences, matmul_rate

ROOT = Path(__file__).resolve().parents[1]


def alternating_random_prunings(shape: ModelShape, prompts: PromptSet, k: int, seed: int) -> list[Pruning]:
    """k prunings: alternately 64 random neurons and 8 random heads (the study's budgets), seeded."""
    draws = {kind: [case.pruning for case in random_cases(shape, prompts.filter(context="purchase"),
                                                          {kind: budget}, n_draws=(k + 1) // 2, seed=seed)]
             for kind, budget in (("mlp_neuron", 64), ("attn_head", 8))}
    return [draws["mlp_neuron" if i % 2 == 0 else "attn_head"][i // 2] for i in range(k)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="registry name or HF directory (default: the study's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--prunings", type=int, default=8)
    parser.add_argument("--names-per-group", type=int, default=2)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--completions", type=int, default=None,
                        help="max_completions of the read-out (default: the study's; 0: the exact tree alone)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pruned_evaluation.json"))
    args = parser.parse_args()
    config = load_config(ROOT / "configs" / "paper.toml")
    dtype = getattr(torch, args.dtype)
    started = time.perf_counter()
    bridge = load_model(args.model or config.model, device=args.device, dtype=dtype)
    load_s = time.perf_counter() - started
    hf = bridge.original_model
    prompts = PromptSet.build(["purchase"], names=names_subset(args.names_per_group),
                              variations={"purchase": ["car"]})
    prunings = alternating_random_prunings(ModelShape.of(bridge), prompts, args.prunings, config.seed)
    readout = dataclasses.replace(config.readout, seed=config.seed)
    if args.completions is not None:
        readout = dataclasses.replace(readout, max_completions=args.completions)
    run_audit(bridge, PromptSet(list(prompts)[:1]), exact=readout, progress=False)  # warm-up, vocabulary built
    rows = []

    def timed(label: str, batch_size: int, evaluate):
        with ForwardFlops(hf) as flops:
            start = device_clock(args.device)
            tables = evaluate()
            seconds = device_clock(args.device) - start
        rows.append({"evaluation": label, "batch_size": batch_size, "seconds": seconds,
                     "seconds_per_prompt": seconds / (len(prunings) * len(prompts)), "gflop": flops.flops / 1e9,
                     "positions": flops.positions, "gflop_per_s": flops.flops / seconds / 1e9})
        return tables

    def loop():
        tables = []
        for pruning in prunings:
            with pruning.active(bridge, "zero", "zero"):
                tables.append(run_audit(bridge, prompts, exact=dataclasses.replace(readout, batch_size=8),
                                        progress=False))
        return tables

    reference = timed("loop (weight edits, one pruning at a time)", 8, loop)
    differences = {}
    for batch_size in args.batch_sizes:
        batched = timed("batched (per-row masks)", batch_size, lambda: read_pruned(
            bridge, [prompts] * len(prunings), prunings, dataclasses.replace(readout, batch_size=batch_size),
            progress=False))
        differences[batch_size] = largest_differences(reference, batched)
        rows[-1]["ratio_vs_loop"] = rows[0]["seconds"] / rows[-1]["seconds"]
        rows[-1]["max_abs_difference"] = differences[batch_size]
    rate = matmul_rate(hf, 512, dtype, args.device)
    for row in rows:
        row["share_of_matmul_rate"] = row["gflop_per_s"] * 1e9 / rate
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    result = {"model": args.model or config.model, "device": args.device, "device_name": device_name,
              "dtype": args.dtype, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "load_s": load_s, "prunings": len(prunings), "prompts": len(prompts),
              "readout": dataclasses.asdict(readout), "matmul_gflop_per_s": rate / 1e9, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{len(prunings)} prunings x {len(prompts)} prompts on {device_name} ({args.dtype}); "
          f"matmul rate {rate / 1e9:.0f} GFLOP/s")
    print(f"| evaluation | batch | s | s per prompt | ratio | GFLOP/s | share of matmul | max abs diff (answer p) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        diff = row.get("max_abs_difference", {}).get("answer_probability")
        print(f"| {row['evaluation']} | {row['batch_size']} | {row['seconds']:.1f} | {row['seconds_per_prompt']:.3f} "
              f"| {row.get('ratio_vs_loop', 1.0):.2f} | {row['gflop_per_s']:.1f} | {row['share_of_matmul_rate']:.2f} "
              f"| {'-' if diff is None else f'{diff:.1e}'} |")


if __name__ == "__main__":
    main()
