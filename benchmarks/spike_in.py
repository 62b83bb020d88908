"""Spike-in positive controls on the bundled model: plant a race bias of known size, then localise and prune it.

    python benchmarks/spike_in.py [--targets 0.2 0.4] [--names-per-group 4] [--plants head neuron distributed]
        [--methods attribution activation_patching] [--draws 19] [--layer 14] [--out NAME]

The power curve is the same script over targets and names per group, attribution only:

    python benchmarks/spike_in.py --plants neuron --targets 0.05 0.1 0.2 0.4 --names-per-group 2 4 \
        --methods attribution --budgets 8 --out spike_in_power

Design (`workbench.spike_in`): prompts of the default study's localisation context and its variations without
the instruction suffix (shorter rows: the plant does not need it); three disjoint sets of names per race x gender
group from the bundled list: the first `n` are the *selection* names (localisation), the next `n` the
*evaluation* names (the bias removed), and the last 4 of each group the *feature* names (what the plant reads
and the calibration of its scale; the same for every `n`). Plants at layer `layer`: the head of that layer that
attends most to the name (`workbench.localize.heads`), one neuron (index 100), and a distributed plant over
neurons 0-63. For each plant, target SMD and `n`: calibrate, then on the spiked model score every component by
attribution patching and (heads: all; neurons: attribution's top 100) activation patching on the first
`--patch-pairs` selection pairs, all oriented in the plant's direction; prune each method's top `budget` (8 heads,
8 neurons; 64 neurons, the study's neuron budget, too) and measure on the evaluation names the bias removed next
to `draws` random prunings of the same size. The estimand is the signed mixture SMD of the leaf metric's answer
distributions (log scale; `spike_in.leaf_answers`) in the plant's direction, at the spiked model's pooled SD; the
truth is what removing the plant removes. Prints each row as it comes and writes benchmarks/results/<out>.json
and .md (spike_in by default).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from workbench.components import Component, ModelShape
from workbench.config import load_config
from workbench.errors import ConfigError
from workbench.localize.attribution import attribution_scores
from workbench.localize.heads import head_attention_scores
from workbench.localize.pairs import build_pairs
from workbench.localize.patching import patching_scores
from workbench.pipeline.report import to_markdown
from workbench.pipeline.study import exact_settings, load_bridge
from workbench.readout.prompts import AUDIT_GROUPS, PromptSet, names_beyond, names_subset
from workbench.spike_in import PlantSpec, calibrated_plant, spike_in_rows

ROOT = Path(__file__).resolve().parents[1]
FEATURES_PER_GROUP = 4
SHOWN = ["plant", "components", "target_smd", "n_names", "kl_on_neutral", "method", "budget", "ranks", "recall",
         "planted_smd", "truth_removed", "removed", "removed_low", "removed_high", "plant_left", "plant_removed_pct",
         "random_mean", "random_max", "rank", "p_rank", "difference_low"]


def name_sets(per_group: int) -> tuple[list[str], list[str], list[str]]:
    """Selection (the first `per_group` of each group), evaluation (the next `per_group`) and feature names (the
    last FEATURES_PER_GROUP of each group)."""
    per_group_in_file = len(names_beyond(0)) // len(AUDIT_GROUPS)
    features = names_beyond(per_group_in_file - FEATURES_PER_GROUP)
    selection, first_two = names_subset(per_group), names_subset(2 * per_group)
    if set(first_two) & set(features):
        raise ConfigError(f"--names-per-group {per_group} is too many: at most "
                          f"{(per_group_in_file - FEATURES_PER_GROUP) // 2}")
    return selection, [n for n in first_two if n not in selection], features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/paper.toml"))
    parser.add_argument("--targets", type=float, nargs="+", default=[0.2, 0.4])
    parser.add_argument("--names-per-group", type=int, nargs="+", default=[4])
    parser.add_argument("--draws", type=int, default=19)
    parser.add_argument("--layer", type=int, default=14)
    parser.add_argument("--plants", nargs="+", default=["head", "neuron", "distributed"])
    parser.add_argument("--methods", nargs="+", default=["attribution", "activation_patching"])
    parser.add_argument("--patch-pairs", type=int, default=4, help="selection pairs activation patching runs on")
    parser.add_argument("--budgets", type=int, nargs="+", default=None,
                        help="components pruned (default: 8 for a head plant, 8 and 64 for neurons)")
    parser.add_argument("--out", default="spike_in")
    args = parser.parse_args()
    config = load_config(args.config)
    bridge = load_bridge(config)
    context = config.localize.context
    variations = {context: config.audit.variations.get(context)} if config.audit.variations else None
    readout, n_leaves = exact_settings(config), config.localize.n_leaves

    def pairs_of(names: list[str]):
        prompts = PromptSet.build([context], names=names, variations=variations, instruction_suffix=False)
        return build_pairs(bridge, prompts, n_leaves=n_leaves, readout=readout, progress=False)

    features = pairs_of(name_sets(args.names_per_group[0])[2])
    attention = head_attention_scores(bridge, [p for pair in features.pairs for p in pair], progress=False)
    layer_heads = attention.scores[args.layer]
    head = Component(args.layer, "attn_head", int(torch.argmax(layer_heads)))
    plants = {"head": head.label(), "neuron": f"L{args.layer}N100", "distributed": f"L{args.layer}N0-63"}
    rows, records, clock = [], [], time.perf_counter()
    for per_group in args.names_per_group:
        selection_names, evaluation_names, _ = name_sets(per_group)
        selection, evaluation = pairs_of(selection_names), pairs_of(evaluation_names)
        for kind in args.plants:
            for target in args.targets:
                start = time.perf_counter()
                plant = calibrated_plant(bridge, PlantSpec.parse(plants[kind], target), features)
                chosen = selection.oriented(plant.direction)
                with plant.planted(bridge):
                    neurons, heads = attribution_scores(bridge, chosen, progress=False)
                    scores = {"attribution": heads if kind == "head" else neurons}
                    if "activation_patching" in args.methods:
                        few = build_pairs(bridge, PromptSet([p for pair in chosen.pairs[: args.patch_pairs]
                                                             for p in pair]),
                                          n_leaves=n_leaves, readout=readout, progress=False).oriented(plant.direction)
                        candidates = (ModelShape.of(bridge).all("attn_head") if kind == "head"
                                      else neurons.top(100, absolute=True))
                        scores["activation_patching"] = patching_scores(bridge, few, candidates, progress=False)
                for budget in args.budgets or ([8] if kind == "head" else [8, 64]):
                    rows.append(spike_in_rows(bridge, plant, evaluation, scores, budget, args.draws, config.seed))
                    print(rows[-1][SHOWN].to_string(index=False, float_format=lambda v: f"{v:.3f}"), flush=True)
                records.append(plant.record() | {"names_per_group": per_group,
                                                 "seconds": time.perf_counter() - start})
                print(f"[{kind} {target} n={per_group}: {(time.perf_counter() - start) / 60:.1f} min]", flush=True)
    table = pd.concat(rows, ignore_index=True)
    seconds = time.perf_counter() - clock
    print(table[SHOWN].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    out = ROOT / "benchmarks/results" / args.out
    info = {"model": config.model, "context": context, "names_per_group": args.names_per_group,
            "feature_names_per_group": FEATURES_PER_GROUP, "draws": args.draws, "layer": args.layer,
            "head_attention_to_name": float(layer_heads.max()), "seconds": seconds, "plants": records,
            "rows": table.to_dict("records")}
    out.with_suffix(".json").write_text(json.dumps(info, indent=2, default=float) + "\n")
    command = "python benchmarks/spike_in.py " + " ".join(sys.argv[1:])
    text = (f"# Spike-in positive controls, {config.model}, {context}\n\nCommand: `{command}` ({seconds / 60:.0f} min "
            f"on {torch.get_num_threads()} CPU threads). Estimand: signed mixture SMD of the leaf metric's answer "
            "distributions (log scale) in the plant's direction at the spiked model's pooled SD, on the evaluation "
            "names (n_names = names of both races); truth = the bias removing the plant removes; random = "
            f"{args.draws} prunings of the same number of random components; p_rank = (1 + rank) / (1 + draws), "
            "one-sided, uncorrected (the rows are separate controls, not a family of claims).\n\n")
    out.with_suffix(".md").write_text(text + to_markdown(table[SHOWN].round(3)) + "\n")


if __name__ == "__main__":
    main()
