"""Spike-in positive controls on the bundled model: plant a race bias of known size, then localise and prune it.

    python benchmarks/spike_in.py [--targets 0.2 0.4] [--names-per-group 4] [--draws 19] [--out NAME]
        [--plants head neuron distributed] [--layer 14]

Design (`workbench.spike_in`): prompts of the default study's localisation context and its variations without
the instruction suffix (shorter rows: the plant does not need it); three disjoint sets of names per race x gender
group from the bundled list: the study's first `names_per_group` are the *selection* names (localisation), the
next as many the *evaluation* names (the bias removed), and the rest the *feature* names (what the plant reads
and the calibration of its scale). Plants at layer `layer`: the head of that layer that attends most to the name
(`workbench.localize.heads`), one neuron (index 100), and a distributed plant over neurons 0-63. For each plant and
target SMD: calibrate, then on the spiked model score every component by attribution patching and (heads: all;
neurons: attribution's top 100) activation patching on the selection pairs, prune each method's top `budget`
(8 heads, 8 neurons; 64 neurons is the study's neuron budget and is also given for the distributed plant) and
measure on the evaluation names the bias removed next to `draws` random prunings of the same size. The estimand
is the signed mixture SMD of the leaf metric's answer distributions (log scale; `spike_in.leaf_answers`) in the
plant's direction, at the spiked model's pooled SD; the truth is what removing the plant removes.
Prints the table and writes benchmarks/results/<out>.json and .md (spike_in by default).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch

from workbench.components import Component, ModelShape
from workbench.config import load_config
from workbench.localize.attribution import attribution_scores
from workbench.localize.heads import head_attention_scores
from workbench.localize.pairs import build_pairs
from workbench.localize.patching import patching_scores
from workbench.pipeline.study import exact_settings, load_bridge
from workbench.readout.prompts import PromptSet, load_names
from workbench.spike_in import PlantSpec, calibrated_plant, spike_in_rows

ROOT = Path(__file__).resolve().parents[1]
SHOWN = ["plant", "components", "target_smd", "kl_on_neutral", "method", "budget", "ranks", "recall",
         "planted_smd", "truth_removed", "removed", "removed_low", "removed_high", "removed_pct_of_plant",
         "random_mean", "random_max", "rank", "p_rank"]


def name_sets(per_group: int) -> tuple[list[str], list[str], list[str]]:
    """Selection, evaluation and feature names: consecutive blocks of each group's names in file order."""
    groups: dict[str, list[str]] = {}
    for entry in load_names():
        groups.setdefault(entry.group, []).append(entry.name)
    blocks = [[n for names in groups.values() for n in names[i * per_group : (i + 1) * per_group]] for i in range(2)]
    return blocks[0], blocks[1], [n for names in groups.values() for n in names[2 * per_group :]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/study.toml"))
    parser.add_argument("--targets", type=float, nargs="+", default=[0.2, 0.4])
    parser.add_argument("--names-per-group", type=int, default=4)
    parser.add_argument("--draws", type=int, default=19)
    parser.add_argument("--layer", type=int, default=14)
    parser.add_argument("--plants", nargs="+", default=["head", "neuron", "distributed"])
    parser.add_argument("--patch-pairs", type=int, default=4, help="selection pairs activation patching runs on")
    parser.add_argument("--out", default="spike_in")
    args = parser.parse_args()
    config = load_config(args.config)
    bridge = load_bridge(config)
    context = config.localize.context
    variations = {context: config.audit.variations.get(context)} if config.audit.variations else None
    readout, n_leaves = exact_settings(config), config.localize.n_leaves
    selection, evaluation, features = (
        build_pairs(bridge, PromptSet.build([context], names=names, variations=variations, instruction_suffix=False),
                    n_leaves=n_leaves, readout=readout, progress=False)
        for names in name_sets(args.names_per_group))
    few = build_pairs(bridge, PromptSet([p for pair in selection.pairs[: args.patch_pairs] for p in pair]),
                      n_leaves=n_leaves, readout=readout, progress=False)
    attention = head_attention_scores(bridge, [p for pair in features.pairs for p in pair], progress=False)
    layer_heads = attention.scores[args.layer]
    head = Component(args.layer, "attn_head", int(torch.argmax(layer_heads)))
    plants = {"head": head.label(), "neuron": f"L{args.layer}N100", "distributed": f"L{args.layer}N0-63"}
    rows, records, clock = [], [], time.perf_counter()
    for kind in args.plants:
        for target in args.targets:
            start = time.perf_counter()
            plant = calibrated_plant(bridge, PlantSpec.parse(plants[kind], target), features)
            with plant.planted(bridge):
                neurons, heads = attribution_scores(bridge, selection, progress=False)
                if kind == "head":
                    patched = patching_scores(bridge, few, ModelShape.of(bridge).all("attn_head"), progress=False)
                    scores, budgets = {"attribution": heads, "activation_patching": patched}, [8]
                else:
                    patched = patching_scores(bridge, few, neurons.top(100, absolute=True), progress=False)
                    scores = {"attribution": neurons, "activation_patching": patched}
                    budgets = [8, 64]
            for budget in budgets:
                rows.append(spike_in_rows(bridge, plant, evaluation, scores, budget, args.draws, config.seed))
            records.append(plant.record() | {"seconds": time.perf_counter() - start})
            print(rows[-1][SHOWN].to_string(index=False, float_format=lambda v: f"{v:.3f}"), flush=True)
    table = pd.concat(rows, ignore_index=True)
    seconds = time.perf_counter() - clock
    print(table[SHOWN].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    out = ROOT / "benchmarks/results" / args.out
    info = {"model": config.model, "context": context, "names_per_group": args.names_per_group,
            "draws": args.draws, "layer": args.layer, "head_attention_to_name": float(layer_heads.max()),
            "seconds": seconds, "plants": records, "rows": table.to_dict("records")}
    out.with_suffix(".json").write_text(json.dumps(info, indent=2, default=float) + "\n")
    command = "python benchmarks/spike_in.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if k != "config")
    text = (f"# Spike-in positive controls, {config.model}, {context}\n\nCommand: `{command}` ({seconds / 60:.0f} min "
            f"on {torch.get_num_threads()} CPU threads). Estimand: signed mixture SMD of the leaf metric's answer "
            "distributions (log scale) in the plant's direction at the spiked model's pooled SD, on the evaluation "
            "names; truth = the bias removing the plant removes; random = the same number of random components.\n\n")
    out.with_suffix(".md").write_text(text + table[SHOWN].to_markdown(index=False, floatfmt=".3f") + "\n")


if __name__ == "__main__":
    main()
