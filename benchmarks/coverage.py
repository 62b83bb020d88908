"""Coverage of the study's intervals at small true biases, on the simulated answer model (known truth).

    python benchmarks/coverage.py [--sets 1000] [--boot 400]

The default study's design: 8 names per race x gender group, 2 variations per context, names halved into two
folds (cross-fitting: the direction of each variation's bias and the gate from one half, the measurement on the
other, both folds pooled). At true SMD 0, 0.05 and 0.2 (both variations) it reports, over `sets` simulated data
sets, how often each 95 % interval covers its truth:
- smd: a variation's SMD on all names (bootstrap-t within race x gender groups);
- mean |SMD|: the context's mean |SMD| on all names (the interval the reports no longer print);
- signed bias: the held-out bias in the selection halves' direction (signed_reduction's bias_before);
- removed (null pruning): the bias removed by a "pruning" that redraws every name's answers from the same model
  (its true bias unchanged: truth 0);
- removed (half): the bias removed by one that moves White names down by half the true gap (truth: half the
  signed bias);
and, for the null pruning measured only on the folds whose gate passed (permutation p < 0.05 on the fold's
selection half, as the study does), the mean removed bias (no winner's curse: about 0) and the coverage of
removed and of the signed bias there, next to the old estimand (the relative change of mean |SMD|, gated on all
names and measured on them: a winner's curse). Writes benchmarks/results/coverage.json and coverage.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from workbench.audit.stats import (bias_directions, bias_table, context_summary, permutation_test,
                                   signed_reduction)
from workbench.testing.answer_model import POPULATION_SD, simulate_answers

ROOT = Path(__file__).resolve().parents[1]
PER_GROUP, VARIATIONS = 8, 2


def covered(low, high, truth) -> float:
    return float(np.mean((np.asarray(low) <= truth) & (truth <= np.asarray(high))))


def one_truth(truth: float, n_sets: int, n_boot: int, seed: int) -> dict:
    df = simulate_answers(seed, n_sets, PER_GROUP, [truth] * VARIATIONS)
    noisy = simulate_answers(seed + 100, n_sets, PER_GROUP, [truth] * VARIATIONS)  # every answer new, bias the same
    halved = df.assign(values=[v - (r == "white") * truth / 2 * POPULATION_SD for v, r in zip(df["values"], df["race"])])
    fold = df.name.map(lambda n: int(n.split("-")[-1]) % 2)
    directions = pd.concat([bias_directions(df[fold != f]).assign(fold=f) for f in (0, 1)])
    signs = directions.groupby(["fold", "context"]).sign.mean().groupby("context").mean()
    smd = bias_table(df, n_boot=n_boot, seed=2)
    summary = context_summary(df, n_boot=n_boot, seed=2)
    null = signed_reduction(df, noisy.assign(fold=fold), directions, n_boot=n_boot, seed=2)
    half = signed_reduction(df, halved.assign(fold=fold), directions, n_boot=n_boot, seed=2)
    bias_truth = truth * signs.reindex(null.context).to_numpy()
    # the gate on each fold's selection half; a fold is measured only where its gate passed (as the study does)
    gate = pd.concat([permutation_test(df[fold != f], n_perm=200, seed=3).contexts.assign(fold=f) for f in (0, 1)])
    passed = set(zip(gate.context[gate.p_perm < 0.05], gate.fold[gate.p_perm < 0.05]))
    keep = np.array([(c, f) in passed for c, f in zip(df.context, fold)])
    gated = signed_reduction(df[keep], noisy.assign(fold=fold)[keep], directions, n_boot=n_boot, seed=2)
    gated_truth = truth * pd.Series({(c, f): s for (f, c), s in directions.groupby(["fold", "context"]).sign.mean()
                                     .items()})
    gated_bias_truth = [np.mean([gated_truth[(c, f)] for f in (0, 1) if (c, f) in passed]) for c in gated.context]
    old_gate = permutation_test(df, n_perm=200, seed=3).contexts.set_index("context").p_perm.reindex(null.context) < 0.05
    after_abs = context_summary(noisy, n_boot=2).set_index("context").mean_abs_smd.reindex(null.context)
    old = 100 * (1 - after_abs / summary.set_index("context").mean_abs_smd.reindex(null.context))
    return {
        "true_smd": truth, "sets": n_sets,
        "smd": covered(smd.ci_low, smd.ci_high, truth),
        "mean_abs_smd": covered(summary.ci_low, summary.ci_high, truth),
        "signed_bias": covered(null.bias_ci_low, null.bias_ci_high, bias_truth),
        "removed_null": covered(null.removed_low, null.removed_high, 0.0),
        # at true 0 the "half" pruning removes exactly nothing: a zero-width interval, no coverage to measure
        "removed_half": covered(half.removed_low, half.removed_high, bias_truth / 2) if truth else float("nan"),
        "gated_sets_new": len(gated),
        "gated_removed_mean_new": float(gated.removed.mean()) if len(gated) else float("nan"),
        "gated_removed_coverage_new": covered(gated.removed_low, gated.removed_high, 0.0),
        "gated_bias_coverage_new": covered(gated.bias_ci_low, gated.bias_ci_high, np.array(gated_bias_truth)),
        "gated_sets_old": int(old_gate.sum()),
        "gated_reduction_pct_old": float(old[old_gate.to_numpy()].mean()) if old_gate.any() else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", type=int, default=1000)
    parser.add_argument("--boot", type=int, default=400)
    args = parser.parse_args()
    rows = [one_truth(truth, args.sets, args.boot, seed) for seed, truth in enumerate((0.0, 0.05, 0.2))]
    table = pd.DataFrame(rows)
    out = ROOT / "benchmarks" / "results"
    (out / "coverage.json").write_text(json.dumps(rows, indent=2))
    se = np.sqrt(0.95 * 0.05 / args.sets)
    text = (f"Coverage of nominal 95 % intervals, {args.sets} simulated data sets per truth (MC SE {100 * se:.1f} "
            f"points), {PER_GROUP} names per race x gender group, {VARIATIONS} variations, two name folds; "
            f"{args.boot} bootstrap replicates. Command: python benchmarks/coverage.py --sets {args.sets} "
            f"--boot {args.boot}\n\n" + table.round(3).to_string(index=False) + "\n")
    (out / "coverage.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
