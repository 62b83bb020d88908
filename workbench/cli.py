"""`workbench` command line: audit | localize | prune | generalize | study | models."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from workbench.config import validate
from workbench.errors import WorkbenchError

USER_ERRORS = (WorkbenchError, OSError)
"""What the command line reports as one line (exit status 2); anything else is a bug and keeps its traceback."""


def _models(args) -> None:
    from workbench.models import ensure_hf_export, installed_models

    for name in args.fetch or []:
        ensure_hf_export(name)
    for row in installed_models():
        flags = ("default " if row["default"] else "") + ("cached" if row["hf_export_cached"] else "not fetched")
        print(f"{row['name']:24} {flags:20} {row['description']}")


def _config(args):
    """The study config with the command line's overrides (the read-out's sampler included)."""
    from workbench.pipeline import study

    config = study.config_from_args(args)
    if args.temperature is not None:
        config.readout.temperature = args.temperature
    if args.top_p is not None:
        config.readout.top_p = args.top_p
    validate(config, "command line")
    return config


def _audit(args) -> None:
    from workbench.pipeline import study

    config = _config(args)
    prompts = study.audit_prompts(config, args.prompts_csv)
    run = study.RunDir(args.out)
    bridge = study.load_bridge(config)
    study.audit_stage(run, config, bridge, prompts, readout=args.readout, n_samples=args.samples)
    for saved in study.audit_figures(run):
        print(f"figure: {saved['html']}" + (f" ({saved['message']})" if saved["message"] else ""))
    print(study.audit_summary_text(run))
    print(f"wrote {run.root}")


def _localize(args) -> None:
    from workbench.pipeline import study

    config = _config(args)
    run = study.RunDir(args.out)
    bridge = study.load_bridge(config)
    study.run_stages(run, config, bridge, study.localize_prompts(config), ("audit", "attribution", "localize"))
    print(f"wrote {run.root}")


def _generalize(args) -> None:
    from workbench.pipeline import study

    config = _config(args)
    run = study.RunDir(args.out)
    bridge = study.load_bridge(config)
    study.run_stages(run, config, bridge, study.audit_prompts(config),
                     ("audit", "attribution", "attribution on fold halves", "generalize"))
    print(f"wrote {run.root}")


def _prune(args) -> None:
    from workbench.pipeline import study

    config = _config(args)
    bridge = study.load_bridge(config)
    out = study.prune_command(config, bridge, Path(args.plan), Path(args.out), export=args.export)
    print(f"wrote {out}")


def _study(args) -> None:
    from workbench.pipeline import study

    config = _config(args)
    report = study.run_study(config, Path(args.out), figures_dir=Path(args.figures))
    skipped = json.loads((Path(args.out) / "manifest.json").read_text()).get("skipped")
    if skipped:
        print(f"no bias to remove: no context is significant after correction; skipped {', '.join(skipped)} "
              "([localize] always = true runs them)")
    print(f"report: {report}")


def _power(args) -> None:
    from workbench.pipeline import power, study

    config = _config(args)
    prompts = study.audit_prompts(config)
    run = study.RunDir(args.out)
    bridge = study.load_bridge(config)
    answers = study.audit_stage(run, config, bridge, prompts).answers  # the run's audit, or a pilot audit now
    budget = args.budget_minutes * 60 if args.budget_minutes else run.read_json("audit_summary.json")["seconds"]
    noise = power.readout_noise(bridge, config, prompts, answers, args.noise_prompts) if args.noise_prompts else None
    tables = power.power_tables(config, answers, noise, budget)
    a = config.audit
    print(f"Power of {args.out}'s audit ({a.names} names, {a.names_per_group} per group; {a.scale} scale, "
          f"{a.method} SMD; {a.correction}'s first step, alpha {a.alpha} over the tests; 80 % power)")
    for name, table in tables.items():
        run.write_table(f"tables/power_{name}.parquet", table)
        print(f"\n{name}:\n{table.round(4).to_string(index=False)}")
    if noise is not None:
        print(f"\nallocation: a budget of {budget / 60:.1f} min for the audit's prompts")
    print(f"wrote {run.path('tables')}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workbench", description="Find and prune racial bias in language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="list the bundled models and what is cached")
    models.add_argument("--fetch", nargs="*", help="download and convert these bundled models")
    models.set_defaults(func=_models)

    def common(p, out_default):
        p.add_argument("--config", help="study TOML config (defaults are built in)")
        p.add_argument("--model", help="bundled model name, HF directory or hub name (overrides the config)")
        p.add_argument("--backend", choices=["bridge", "nnsight"], help="what runs the model: a TransformerLens "
                       "bridge or nnsight traces (overrides the config's backend)")
        p.add_argument("--contexts", nargs="*", help="contexts (overrides the config)")
        p.add_argument("--names-per-group", type=int, help="names per race x gender group (overrides the config)")
        p.add_argument("--out", default=out_default, help="run directory")
        p.add_argument("--temperature", type=float, help="sampler temperature of both read-outs (overrides the "
                       "config; the paper: 0.6)")
        p.add_argument("--top-p", type=float, help="sampler top-p of both read-outs (overrides the config; the "
                       "paper: 0.9)")

    audit = sub.add_parser("audit", help="audit a model's bias")
    common(audit, "runs/audit")
    audit.add_argument("--readout", choices=["exact", "sample"], default="exact")
    audit.add_argument("--samples", type=int, default=100, help="samples per prompt with --readout sample")
    audit.add_argument("--prompts-csv", help="a prompt table in the 2024 audit's CSV format")
    audit.set_defaults(func=_audit)

    localize = sub.add_parser("localize", help="score neurons and heads for the bias")
    common(localize, "runs/localize")
    localize.add_argument("--methods", nargs="*", help="attribution patching ablation heads wanda")
    localize.set_defaults(func=_localize)

    prune = sub.add_parser("prune", help="apply a pruning plan (JSON) and measure bias and anomaly")
    common(prune, "runs/prune")
    prune.add_argument("--plan", required=True, help="PruningPlan JSON file")
    prune.add_argument("--export", action="store_true", help="also export the pruned model as an HF directory")
    prune.set_defaults(func=_prune)

    generalize = sub.add_parser("generalize", help="the generalisation study (prompt, leave-one-out, cross-context)")
    common(generalize, "runs/generalize")
    generalize.set_defaults(func=_generalize)

    power = sub.add_parser("power", help="the power of the design's tests and the budget's best allocation")
    common(power, "runs/study")
    power.add_argument("--budget-minutes", type=float, help="compute budget of the audit (default: the audit's own "
                       "time)")
    power.add_argument("--noise-prompts", type=int, default=16, help="prompts read out again per read-out setting "
                       "to measure its Monte Carlo noise and cost (0: no allocation)")
    power.set_defaults(func=_power)

    study = sub.add_parser("study", help="the whole study: audit, localise, prune, generalise, report")
    common(study, "runs/study")
    study.add_argument("--figures", default="figures", help="folder refreshed with the report's figures")
    study.add_argument("--plant", metavar="COMPONENT[,COMPONENT]", help="a positive control: plant a race bias "
                       "through these components first (L14H3, L14N100, L14N0-63; overrides [spike_in] components)")
    study.add_argument("--target-smd", type=float, help="the planted bias's SMD (overrides [spike_in] target_smd)")
    study.set_defaults(func=_study)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as error:
        print(f"workbench {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
