"""The read-out's estimand: the exact read-out against the paper's sampled read-out on the same prompts.

    python benchmarks/readout_estimand.py [--names-per-group 4] [--samples 1000] [--variation car]

Both read-outs measure the same quantity (the number that starts the reply after "$", drawn by the sampler at
the study's temperature and top-p). On one purchase variation with `names-per-group` names per race x gender
group, it reports mean |SMD| (log scale, mixture SMD, studentised bootstrap CI over names) from the exact
read-out and from `samples` samples per name, the time of each, and the time the sampled read-out needs for
the exact read-out's precision: the exact read-out's own Monte Carlo SD of a name's expected log answer is
measured from two seeds, and the sampled read-out reaches it with n* = (SD of the log answer / MC SD)^2 samples
per name. Writes benchmarks/results/readout_estimand.json and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from workbench.audit.stats import context_summary, signed_log
from workbench.audit.table import run_audit
from workbench.config import load_config
from workbench.models import load_model
from workbench.readout.engine import SamplingConfig
from workbench.readout.prompts import PromptSet, names_subset

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--names-per-group", type=int, default=4)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--variation", default="car")
    args = parser.parse_args()
    config = load_config(ROOT / "configs" / "paper.toml")
    bridge = load_model(config.model)
    prompts = PromptSet.build(["purchase"], names=names_subset(args.names_per_group),
                              variations={"purchase": [args.variation]})
    stats = dict(scale="log", method="mixture", n_boot=2000, seed=0)
    timed, exact = {}, []
    for seed in (0, 1):
        started = time.perf_counter()
        exact.append(run_audit(bridge, prompts, exact=dataclasses.replace(config.readout, seed=seed), progress=False))
        timed[f"exact seed {seed}"] = time.perf_counter() - started
    r = config.readout
    sampling = SamplingConfig(n_samples=args.samples, temperature=r.temperature, top_p=r.top_p, seed=0)
    started = time.perf_counter()
    sampled = run_audit(bridge, prompts, readout="sample", sampling=sampling, progress=False)
    timed["sampled"] = time.perf_counter() - started
    rows = {}
    for label, frame in [("exact", exact[0]), ("exact, seed 1", exact[1]), (f"sampled ({args.samples}/name)", sampled)]:
        summary = context_summary(frame, **stats).iloc[0]
        rows[label] = {"mean_abs_smd": float(summary.mean_abs_smd), "ci_low": float(summary.ci_low),
                       "ci_high": float(summary.ci_high), "mean_log_answer": float(frame.log_expected.mean()),
                       "unexplored": float(frame.unexplored_mass.mean()), "completed": float(frame.completed_mass.mean())}
    mc_sd = float(np.std(exact[0].log_expected - exact[1].log_expected, ddof=1) / np.sqrt(2))
    log_sd = float(np.mean([np.sqrt(max(v, 0)) for v in _log_variances(exact[0])]))
    per_sample = timed["sampled"] / (len(prompts) * args.samples)
    equal_samples = (log_sd / mc_sd) ** 2 if mc_sd > 0 else float("inf")
    exact_per_prompt = timed["exact seed 0"] / len(prompts)
    result = {
        "prompts": len(prompts), "names_per_group": args.names_per_group, "samples_per_name": args.samples,
        "readout": dataclasses.asdict(config.readout), "mean_abs_smd": rows, "seconds": timed,
        "exact_s_per_prompt": exact_per_prompt, "sampled_s_per_sample": per_sample,
        "exact_mc_sd_of_name_log_answer": mc_sd, "sd_of_log_answer_within_name": log_sd,
        "samples_for_equal_precision": equal_samples,
        "time_ratio_for_equal_precision": equal_samples * per_sample / exact_per_prompt,
        "exact_inside_sampled_ci": rows[f"sampled ({args.samples}/name)"]["ci_low"] <= rows["exact"]["mean_abs_smd"]
        <= rows[f"sampled ({args.samples}/name)"]["ci_high"],
    }
    out = ROOT / "benchmarks" / "results" / "readout_estimand.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"purchase / {args.variation}, {len(prompts)} prompts; log scale, mixture SMD, studentised CI over names")
    print(f"{'read-out':28} {'mean|SMD|':>9} {'95% CI':>17} {'E[log]':>7} {'unexpl':>7} {'compl':>6}")
    for label, row in rows.items():
        print(f"{label:28} {row['mean_abs_smd']:9.3f} [{row['ci_low']:6.3f}, {row['ci_high']:6.3f}] "
              f"{row['mean_log_answer']:7.3f} {row['unexplored']:7.4f} {row['completed']:6.3f}")
    print(f"time: exact {exact_per_prompt:.2f} s/prompt; sampled {per_sample * 1000:.1f} ms/sample "
          f"({timed['sampled'] / len(prompts):.1f} s/prompt at {args.samples})")
    print(f"exact MC SD of a name's E[log] {mc_sd:.4f}; within-name SD of log answer {log_sd:.3f}; samples for the "
          f"same precision {equal_samples:.0f}; time ratio {result['time_ratio_for_equal_precision']:.1f}x")
    print(f"exact inside the sampled CI: {result['exact_inside_sampled_ci']}")


def _log_variances(frame) -> list[float]:
    out = []
    for values, weights in zip(frame["values"], frame["weights"]):
        x = signed_log(values)
        w = weights / weights.sum()
        out.append(float(w @ (x - w @ x) ** 2))
    return out


if __name__ == "__main__":
    main()
