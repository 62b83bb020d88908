"""The exact read-out's levers side by side: time, forwarded positions and precision on the same prompts.

    .venv/bin/python benchmarks/readout_speed.py [--prompts 16] [--hiring-prompts 8] [--seeds 3]
    .venv/bin/python benchmarks/readout_speed.py --settings "" completion_mass=0.001 batch_size=16
    PYTHONPATH=<checkout of an older commit> .venv/bin/python benchmarks/readout_speed.py --label "before" \
        --settings none --out readout_speed_before    # the same prompts on an older engine (its defaults)

Prompt sets: the default study's prompts (configs/study.toml: hiring:numeric, both jobs, every 4th of its 64
prompts, its read-out: 8 exact branches, 16 completions) and the 2024 audit's hiring prompts without an anchor
(configs/audit2024.toml's "hiring:low", names 1-2 per group, its read-out: 64 completions), salaries of five or
six digits. Each setting reads every prompt under `--seeds` completion seeds, in one process, one after the other.

Per (set, setting): seconds per prompt (mean over the seeds), positions forwarded per prompt (padding included:
`measure.ForwardFlops`), the Monte Carlo SD of a name's expected log answer (SD over seeds, root mean square over
prompts), and against the first setting the mean and largest change of a prompt's expected log
answer averaged over the seeds (what a setting changes beyond its Monte Carlo noise). With --pruning, seed i reads
under random draw i, so the SD over seeds mixes the draws: read only its times and positions. Writes
benchmarks/results/<out>.json and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from measure import ForwardFlops
from workbench.audit.stats import signed_log
from workbench.components import ModelShape
from workbench.config import load_config
from workbench.loaded import model_info
from workbench.pipeline.study import audit_prompts, exact_settings, load_bridge
from workbench.prune.generalize import random_cases
from workbench.readout.engine import ExactReadoutConfig, exact_distributions, number_vocabulary
from workbench.readout.prompts import PromptSet, render_all

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BUDGETS = {"mlp_neuron": 64, "attn_head": 8}  # the default study's


def prompt_sets(n_default: int, n_hiring: int
                ) -> tuple[object, dict[str, tuple[list[list[int]], ExactReadoutConfig]], dict[str, PromptSet]]:
    """The bundled model and, per prompt set, its token ids and its config's read-out, and its prompts."""
    study = load_config(ROOT / "configs" / "study.toml")
    audit = load_config(ROOT / "configs" / "audit2024.toml")
    bridge = load_bridge(study)
    tokenizer = model_info(bridge).tokenizer
    default = spread(list(audit_prompts(study)), n_default)
    hiring = spread(list(audit_prompts(audit).filter(context="hiring:low")), n_hiring)
    ids = lambda prompts: [r.input_ids for r in render_all(prompts, tokenizer)]  # noqa: E731
    sets = {"default study (hiring:numeric)": (ids(default), exact_settings(study)),
            "2024 audit hiring:low": (ids(hiring), exact_settings(audit))}
    prompts_of = {"default study (hiring:numeric)": PromptSet(default), "2024 audit hiring:low": PromptSet(hiring)}
    return bridge, {name: value for name, value in sets.items() if value[0]}, prompts_of


def spread(prompts: list, n: int) -> list:
    """n of the prompts, evenly spaced (every 4th where there are 4n or more)."""
    return prompts[:: max(1, min(4, len(prompts) // max(n, 1)))][:n]


def expected_logs(distributions) -> np.ndarray:
    return np.array([d.probs @ signed_log(d.values) / d.valid_mass if d.valid_mass else np.nan
                     for d in distributions])


def parse_setting(setting: str) -> dict[str, float | int | str]:
    """'key=value,key=value' as read-out changes (the value's type is the field's); 'order=size' batches the
    prompts by the number of distinct answers the set's own read-out gives them unedited (as pruned evaluations
    batch by their baseline's)."""
    fields = {f.name: f.type for f in dataclasses.fields(ExactReadoutConfig)}
    changes = {}
    for part in filter(None, setting.split(",")):
        key, _, value = part.partition("=")
        if (key, value) == ("order", "size"):
            changes["order"] = value
            continue
        if key not in fields:
            raise SystemExit(f"--settings {setting!r}: the read-out has no setting {key!r}")
        changes[key] = int(value) if fields[key] in (int, "int") else float(value)
    return changes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--hiring-prompts", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--settings", nargs="+", default=["", "completion_mass=0.001"],
                        help="read-out changes to compare, each 'key=value,key=value' ('': the set's own read-out; "
                             "'none': the engine's defaults, for older code)")
    parser.add_argument("--pruning", choices=["none", "mlp_neuron", "attn_head"], default="none",
                        help="read under a random pruning at the study's budget (64 neurons or 8 heads, one draw "
                             "per seed, as weight edits), as the study's pruned evaluations are")
    parser.add_argument("--label", default="", help="prefix of every row's setting (e.g. the commit)")
    parser.add_argument("--out", default="readout_speed", help="results file stem in benchmarks/results")
    args = parser.parse_args()
    os.environ["WORKBENCH_READOUT_CACHE"] = "off"  # time the read-out, not the cache
    settings: list[tuple[str, dict]] = [(f"{args.label} engine defaults".strip(), {})] if args.settings == [
        "none"] else [(f"{args.label} {setting or 'config'}".strip(), parse_setting(setting))
                      for setting in args.settings]
    bridge, sets, prompts_of = prompt_sets(args.prompts, args.hiring_prompts)
    number_vocabulary(model_info(bridge).tokenizer, bridge.cfg.d_vocab)  # the one-off vocabulary scan
    rows = []
    for set_name, (ids, base) in sets.items():
        reference = None
        # the tree sizes that order=size batches by: the unedited read-out's distinct answers (the study's baseline)
        sizes = [len(d.values) for d in exact_distributions(bridge, ids, base, progress=False)] if any(
            changes.get("order") for _, changes in settings) else None
        prunings = [case.pruning for case in random_cases(ModelShape.of(bridge), prompts_of[set_name],
                                                          {args.pruning: BUDGETS[args.pruning]}, args.seeds)
                    ] if args.pruning != "none" else [None] * args.seeds
        for setting, changes in settings:
            logs, seconds, positions = [], [], []
            changes = dict(changes)
            by_size = changes.pop("order", None) == "size"
            for seed, pruning in zip(range(args.seeds), prunings):
                config = dataclasses.replace(base, seed=seed, **changes)
                with ForwardFlops(bridge.original_model) as flops, (
                        pruning.active(bridge, "zero", "zero") if pruning else nullcontext()):
                    started = time.perf_counter()
                    found = exact_distributions(bridge, ids, config, progress=False,
                                                sizes=sizes if by_size else None)
                    seconds.append(time.perf_counter() - started)
                positions.append(flops.positions)
                logs.append(expected_logs(found))
            logs = np.array(logs)  # [seed, prompt]
            mean_log = logs.mean(0)
            reference = mean_log if reference is None else reference
            rows.append({
                "prompts": set_name, "setting": setting, "pruning": args.pruning, "n_prompts": len(ids),
                "seeds": args.seeds,
                "s_per_prompt": float(np.mean(seconds)) / len(ids),
                "positions_per_prompt": float(np.mean(positions)) / len(ids),
                "mc_sd_expected_log": float(np.sqrt(np.nanmean(logs.var(0, ddof=1)))),
                "mean_change_vs_first": float(np.nanmean(mean_log - reference)),
                "max_abs_change_vs_first": float(np.nanmax(np.abs(mean_log - reference))),
                "completions": base.max_completions, "exact_branches": base.max_branches,
                "expected_log_by_prompt": mean_log.tolist(),
            })
            print(json.dumps({k: v for k, v in rows[-1].items() if k != 'expected_log_by_prompt'}), flush=True)
    for row in rows:
        first = next(r for r in rows if r["prompts"] == row["prompts"])
        row["speed_up"] = first["s_per_prompt"] / row["s_per_prompt"]
    machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    columns = ["prompts", "setting", "n_prompts", "s_per_prompt", "speed_up", "positions_per_prompt",
               "mc_sd_expected_log", "mean_change_vs_first", "max_abs_change_vs_first"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c])
                                       for c in columns) + " |")
    table = "\n".join(lines)
    (RESULTS / f"{args.out}.md").write_text(f"machine: {machine}\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
