"""The exact read-out in bfloat16 against float32 on the same prompts: speed and the change in the numbers.

    python benchmarks/bfloat16_readout.py [--device cpu|cuda] [--names-per-group 4] [--variation car]

On one purchase variation with `names-per-group` names per race x gender group, the study's read-out
(configs/paper.toml) runs the model in float32 and in bfloat16 (weights and activations; the sampler's
probabilities in float32) with two completion seeds each. It reports the seconds per prompt (the faster of the two runs: the first one also
warms up), the change of each
name's expected log answer between the precisions next to the read-out's own Monte Carlo SD (the same name
between two seeds), the largest change of any answer's probability, and mean |SMD| with its CI (log scale,
mixture SMD, studentised bootstrap over names). Writes benchmarks/results/bfloat16_readout_<device>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from workbench.audit.stats import context_summary
from workbench.audit.table import run_audit
from workbench.config import load_config
from workbench.models import load_model
from workbench.readout.prompts import PromptSet, names_subset

from measure import largest_differences

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--names-per-group", type=int, default=4)
    parser.add_argument("--variation", default="car")
    args = parser.parse_args()
    config = load_config(ROOT / "configs" / "paper.toml")
    prompts = PromptSet.build(["purchase"], names=names_subset(args.names_per_group),
                              variations={"purchase": [args.variation]})
    stats = dict(scale="log", method="mixture", n_boot=2000, seed=0)
    answers, seconds, rows = {}, {}, {}
    for dtype in ("float32", "bfloat16"):
        bridge = load_model(config.model, device=args.device, dtype=getattr(torch, dtype))
        for seed in (0, 1):
            started = time.perf_counter()
            answers[dtype, seed] = run_audit(bridge, prompts, exact=dataclasses.replace(config.readout, seed=seed),
                                             progress=False)
            seconds[f"{dtype}, seed {seed}"] = time.perf_counter() - started
        summary = context_summary(answers[dtype, 0], **stats).iloc[0]
        warm = min(seconds[f"{dtype}, seed {seed}"] for seed in (0, 1))  # the first run also warms up
        rows[dtype] = {"s_per_prompt": warm / len(prompts),
                       "mean_abs_smd": float(summary.mean_abs_smd), "ci_low": float(summary.ci_low),
                       "ci_high": float(summary.ci_high), "mean_log_answer": float(answers[dtype, 0].log_expected.mean())}
        del bridge
    log = {key: frame.log_expected.to_numpy() for key, frame in answers.items()}
    mc_sd = float(np.std(log["float32", 0] - log["float32", 1], ddof=1) / np.sqrt(2))
    change_sd = float(np.std(log["bfloat16", 0] - log["float32", 0], ddof=1) / np.sqrt(2))
    result = {
        "device": args.device, "prompts": len(prompts), "threads": torch.get_num_threads(),
        "readout": dataclasses.asdict(config.readout), "seconds": seconds, "by_dtype": rows,
        "speedup": rows["float32"]["s_per_prompt"] / rows["bfloat16"]["s_per_prompt"],
        "mc_sd_of_name_log_answer": mc_sd,
        "bfloat16_change_sd_of_name_log_answer": change_sd,
        "mean_change_of_log_answer": float(np.mean(log["bfloat16", 0] - log["float32", 0])),
        "max_probability_change": largest_differences([answers["float32", 0]], [answers["bfloat16", 0]])[
            "answer_probability"],
    }
    out = ROOT / "benchmarks" / "results" / f"bfloat16_readout_{args.device.split(':')[0]}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"purchase / {args.variation}, {len(prompts)} prompts on {args.device} ({result['threads']} threads); "
          "log scale, mixture SMD, studentised CI over names")
    print(f"{'dtype':10} {'s/prompt':>9} {'mean|SMD|':>9} {'95% CI':>17} {'E[log]':>7}")
    for dtype, row in rows.items():
        print(f"{dtype:10} {row['s_per_prompt']:9.2f} {row['mean_abs_smd']:9.3f} "
              f"[{row['ci_low']:6.3f}, {row['ci_high']:6.3f}] {row['mean_log_answer']:7.3f}")
    print(f"speed-up {result['speedup']:.2f}x; a name's E[log answer]: bfloat16 - float32 SD "
          f"{change_sd:.3f} (mean {result['mean_change_of_log_answer']:+.3f}) against the read-out's MC SD "
          f"{mc_sd:.3f}; largest change of an answer's probability {result['max_probability_change']:.3f}")


if __name__ == "__main__":
    main()
