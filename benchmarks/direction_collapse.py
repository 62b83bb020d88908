"""How a direction edit removes the bias: does it change the answer distribution, not only the race gap?

    python benchmarks/direction_collapse.py [--run runs/directions] [--every 1]

Reads the context-level ace plan a `workbench study --config configs/directions.toml` run saved
(plans/directions/ace_mean_difference.json, fitted on fold 0's selection names), and reads the study's prompts
(every `every`-th name) with the study's read-out three times: unedited, edited, and under a random edit of the same
form (`random_plan`, seed 0). Per variation it prints the mean expected log answer, its SD across names, the mean
within-prompt SD of the log answer and the mean probability of the prompt's modal answer (for the hiring prompts,
the anchor salary the prompt states). Writes benchmarks/results/direction_collapse.json and .md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from workbench.audit.table import run_audit
from workbench.config import load_config, study_names
from workbench.models import load_model
from workbench.pipeline.study import exact_settings
from workbench.prune.directions import DirectionPlan, random_plan
from workbench.readout.prompts import PromptSet

RESULTS = Path(__file__).resolve().parent / "results"


def spread(answers: pd.DataFrame) -> pd.DataFrame:
    """Per variation: mean and across-name SD of the expected log answer, mean within-prompt SD, mean modal mass."""
    rows = []
    for row in answers.itertuples():
        values, weights = np.sign(row.values) * np.log1p(np.abs(row.values)), row.weights / np.sum(row.weights)
        mean = float(np.sum(values * weights))
        rows.append({"variation": row.variation, "expected_log": mean,
                     "within_sd": float(np.sqrt(np.sum(weights * (values - mean) ** 2))),
                     "modal_mass": float(np.max(weights))})
    frame = pd.DataFrame(rows)
    return frame.groupby("variation").agg(mean_expected_log=("expected_log", "mean"),
                                          sd_across_names=("expected_log", "std"),
                                          mean_within_sd=("within_sd", "mean"),
                                          mean_modal_mass=("modal_mass", "mean"))


def markdown_table(table: pd.DataFrame) -> str:
    """A pipe table without the optional tabulate dependency."""
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(str(value) for value in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/directions")
    parser.add_argument("--config", default="configs/directions.toml")
    parser.add_argument("--every", type=int, default=1)
    args = parser.parse_args()
    config = load_config(args.config)
    bridge = load_model(config.model, dtype=getattr(torch, config.dtype))
    audit = config.audit
    prompts = PromptSet.build(audit.contexts, names=study_names(config)[::args.every], variations=audit.variations,
                              instruction_suffix=audit.instruction_suffix)
    plan = DirectionPlan.load(Path(args.run) / "plans" / "directions" / "ace_mean_difference.json")
    readout = exact_settings(config)
    tables = {}
    for label, hooks in (("unedited", []), ("ace edit", plan.hooks()), ("random ace edit", random_plan(plan, 0).hooks())):
        with bridge.hooks(fwd_hooks=hooks):
            tables[label] = spread(run_audit(bridge, prompts, exact=readout, progress=True))
    table = pd.concat(tables, names=["model"]).reset_index()
    print(table.round(4).to_string(index=False))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "direction_collapse.json").write_text(json.dumps(
        {"command": "python benchmarks/direction_collapse.py", "run": args.run, "n_prompts": len(prompts),
         "layers": plan.layers, "rows": table.to_dict(orient="records")}, indent=2))
    (RESULTS / "direction_collapse.md").write_text(
        "# How the direction edit changes the answers\n\n`python benchmarks/direction_collapse.py` on "
        f"{len(prompts)} prompts (the plan of `{args.run}`, layers {plan.layers[0]}-{plan.layers[-1]}); log scale, "
        "sign(x) log(1 + |x|).\n\n" + markdown_table(table.round(4)) + "\n")


if __name__ == "__main__":
    main()
