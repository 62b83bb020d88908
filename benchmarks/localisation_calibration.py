"""Attribution patching against activation patching on the same pairs of the bundled model (and a spiked one).

    python benchmarks/localisation_calibration.py [--names-per-group 8] [--variation car] [--random 500]
        [--plant L14H4 --target-smd 0.4]

One variation of the default study's localisation context, the default study's read-out and leaves; race pairs
(2 x names_per_group of them: 16 at 8 names per group). Every head and, for neurons, attribution's top 100 plus a
uniform random sample (`workbench.localize.calibration`). Prints the table and writes
benchmarks/results/localisation_calibration[_<plant>].json and .md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from workbench.config import load_config
from workbench.localize.attribution import attribution_scores
from workbench.localize.calibration import calibrate_attribution
from workbench.localize.pairs import build_pairs
from workbench.pipeline.report import to_markdown
from workbench.pipeline.study import exact_settings, load_bridge
from workbench.readout.prompts import PromptSet, names_subset

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/paper.toml"))
    parser.add_argument("--names-per-group", type=int, default=8)
    parser.add_argument("--variation", default="car")
    parser.add_argument("--random", type=int, default=500)
    parser.add_argument("--plant", default=None, help="components to spike in first (e.g. L14H4)")
    parser.add_argument("--target-smd", type=float, default=0.4)
    args = parser.parse_args()
    config = load_config(args.config)
    bridge = load_bridge(config)
    context = config.localize.context
    prompts = PromptSet.build([context], names=names_subset(args.names_per_group),
                              variations={context: [args.variation]}, instruction_suffix=config.audit.instruction_suffix)
    clock = time.perf_counter()
    plant_record = None
    if args.plant:
        from workbench.readout.prompts import names_beyond
        from workbench.spike_in import PlantSpec, calibrated_plant

        feature_names = PromptSet.build([context], names=names_beyond(args.names_per_group),
                                        variations={context: [args.variation]},
                                        instruction_suffix=config.audit.instruction_suffix)
        features = build_pairs(bridge, feature_names, n_leaves=config.localize.n_leaves,
                               readout=exact_settings(config), progress=False)
        plant = calibrated_plant(bridge, PlantSpec.parse(args.plant, args.target_smd), features)
        plant.apply(bridge)
        plant_record = plant.record()
    inputs = build_pairs(bridge, prompts, n_leaves=config.localize.n_leaves, readout=exact_settings(config),
                         progress=False)
    attribution = attribution_scores(bridge, inputs, progress=False)
    table, _ = calibrate_attribution(bridge, inputs, attribution, n_random=args.random, progress=True)
    seconds = time.perf_counter() - clock
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"{len(inputs.pairs)} pairs, {seconds / 60:.1f} min, {torch.get_num_threads()} threads")
    stem = "localisation_calibration" + (f"_{args.plant.replace(',', '_')}" if args.plant else "")
    out = ROOT / "benchmarks/results" / stem
    info = {"model": config.model, "context": context, "variation": args.variation, "pairs": len(inputs.pairs),
            "random_neurons": args.random, "seconds": seconds, "plant": plant_record,
            "rows": table.to_dict("records")}
    out.with_suffix(".json").write_text(json.dumps(info, indent=2, default=float) + "\n")
    header = (f"# Attribution vs activation patching, {config.model}, {context}/{args.variation}, "
              f"{len(inputs.pairs)} race pairs{', plant ' + args.plant if args.plant else ''}\n\n"
              f"Command: `python benchmarks/localisation_calibration.py"
              f"{' --plant ' + args.plant + ' --target-smd ' + str(args.target_smd) if args.plant else ''}`"
              f" ({seconds / 60:.0f} min on {torch.get_num_threads()} CPU threads)\n\n")
    out.with_suffix(".md").write_text(header + to_markdown(table.round(3)) + "\n")


if __name__ == "__main__":
    main()
