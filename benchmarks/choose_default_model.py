"""Which bundled model should be the default? Audit each one and print a table.

The rule (issue: foundation): the fastest model whose bias is significant in at least one variation, and
whose answers are plausible; plausibility is reported as the median answer per context next to the bias so the
reader can judge it. Significant: permutation p-value (race shuffled across names within gender), Holm-adjusted
across all variations x contexts, below 0.05; the read-out is the default study's (the paper's sampler).

    python benchmarks/choose_default_model.py [--names-per-group 4] [--out benchmarks/results/default_model.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from workbench.audit.stats import significance_table
from workbench.audit.table import run_audit
from workbench.config import load_config
from workbench.models import REGISTRY, load_model
from workbench.pipeline.study import audit_prompts, exact_settings

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "paper.toml"
"""The prompts (contexts, variations, read-out settings) of the default study; names per group from --names-per-group."""


def readout_key(config) -> dict:
    """The read-out settings a row was measured with: rows measured otherwise are recomputed, not reused."""
    return dataclasses.asdict(exact_settings(config))


def audit_model(name: str, per_group: int) -> dict:
    started = time.perf_counter()
    bridge = load_model(name)
    load_seconds = time.perf_counter() - started
    config = load_config(CONFIG)
    config.audit.names_per_group = per_group
    prompts = audit_prompts(config)
    started = time.perf_counter()
    answers = run_audit(bridge, prompts, exact=exact_settings(config), progress=False)
    audit_seconds = time.perf_counter() - started
    a = config.audit
    tables = significance_table(answers, scale=a.scale, method=a.method, n_boot=a.n_boot, n_perm=a.n_perm,
                                seed=config.seed, alpha=a.alpha, correction=a.correction,
                                min_valid_mass=a.min_valid_mass)
    table, summary = tables.variations, tables.contexts
    significant = table[table.significant.fillna(False).astype(bool)]
    return {
        "model": name,
        "names_per_group": per_group,
        "readout": readout_key(config),
        "prompts": len(prompts),
        "load_s": round(load_seconds, 1),
        "audit_s": round(audit_seconds, 1),
        "s_per_prompt": round(audit_seconds / len(prompts), 3),
        "significant_variations": [f"{r.context}/{r.variation}" for r in significant.itertuples()],
        "mean_abs_smd_log": {r.context: round(r.mean_abs_smd, 3) for r in summary.itertuples()},
        "median_answer": {c: float(np.nanmedian(answers[answers.context == c]["median"])) for c in a.contexts},
        "valid_mass": round(float(answers.valid_mass.mean()), 3),
        "unexplored_mass": round(float(answers.unexplored_mass.mean()), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--names-per-group", type=int, default=4)
    parser.add_argument("--models", nargs="*", default=list(REGISTRY))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/default_model.json"))
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(args.out.read_text()) if args.out.exists() else []
    current = readout_key(load_config(CONFIG))
    done = {row["model"] for row in rows
            if row.get("names_per_group") == args.names_per_group and row.get("readout") == current}
    for name in args.models:
        if name not in done:
            rows = [r for r in rows if r["model"] != name] + [audit_model(name, args.names_per_group)]
            args.out.write_text(json.dumps(rows, indent=2))
    header = f"{'model':24} {'prompts':>7} {'s/prompt':>8} {'valid':>6} {'unexpl':>6}  significant  mean|SMD| (log)  median answer"
    print(header)
    for row in sorted(rows, key=lambda r: r["s_per_prompt"]):
        smd = " ".join(f"{c[:4]}={v}" for c, v in row["mean_abs_smd_log"].items())
        med = " ".join(f"{c[:4]}={v:g}" for c, v in row["median_answer"].items())
        print(f"{row['model']:24} {row['prompts']:>7} {row['s_per_prompt']:>8} {row['valid_mass']:>6} "
              f"{row['unexplored_mass']:>6}  {len(row['significant_variations']):>11}  {smd}  {med}")


if __name__ == "__main__":
    main()
