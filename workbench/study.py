"""The study's stages as functions over a config and a run directory (cached by input hash, resumable).

audit -> localise -> generalise (prune + evaluate) -> report. Each stage writes its tables (parquet),
scores (safetensors + JSON) and figures (HTML, PNG where a browser exists) into the run directory.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from importlib import metadata
from pathlib import Path

import pandas as pd
import torch

from workbench.audit import run_audit
from workbench.config import StudyConfig, load_config, to_dict
from workbench.models import load_model, weight_hash
from workbench.prompts import PromptSet, load_names
from workbench.readout import ExactReadoutConfig, SamplingConfig
from workbench.runstore import RunDir
from workbench.stats import bias_table, context_summary, group_means

__all__ = ["RunDir", "run_study"]


def config_from_args(args) -> StudyConfig:
    """The config file's values, with the command line's overrides."""
    config = load_config(getattr(args, "config", None))
    if getattr(args, "model", None):
        config.model = args.model
    if getattr(args, "contexts", None):
        config.audit.contexts = list(args.contexts)
    if getattr(args, "names_per_group", None):
        config.audit.names_per_group = args.names_per_group
    if getattr(args, "methods", None):
        config.localize.methods = list(args.methods)
    return config


def load_bridge(config: StudyConfig):
    return load_model(config.model)


def names_subset(per_group: int) -> list[str]:
    """The first `per_group` names of each race x gender group."""
    if per_group < 1:
        raise ValueError(f"names_per_group must be at least 1, got {per_group}")
    chosen: dict[str, list[str]] = {}
    for entry in load_names():
        chosen.setdefault(entry.group, [])
        if len(chosen[entry.group]) < per_group:
            chosen[entry.group].append(entry.name)
    return [name for group in chosen.values() for name in group]


def audit_prompts(config: StudyConfig, prompts_csv: str | None = None) -> PromptSet:
    if prompts_csv:
        return PromptSet.from_audit_csv(prompts_csv)
    return PromptSet.build(
        config.audit.contexts,
        names=names_subset(config.audit.names_per_group),
        instruction_suffix=config.audit.instruction_suffix,
    )


def exact_settings(config: StudyConfig) -> ExactReadoutConfig:
    r = config.readout
    return ExactReadoutConfig(threshold=r.threshold, max_branches=r.max_branches, max_tokens=r.max_tokens,
                              batch_size=r.batch_size)


def model_identity(bridge) -> dict:
    if not hasattr(bridge, "workbench_hash"):
        bridge.workbench_hash = weight_hash(bridge.original_model)
    return {"model": bridge.workbench_name, "weight_hash": bridge.workbench_hash}


def _prompt_key(prompts: PromptSet) -> list[str]:
    return [f"{p.context}|{p.variation}|{p.name}|{p.text}|{p.answer_prefix}" for p in prompts]


def audit_stage(run: RunDir, config: StudyConfig, bridge, prompts: PromptSet, readout: str = "exact",
                n_samples: int = 100) -> pd.DataFrame:
    """Answers of every prompt and the bias tables (cached)."""
    sampling = SamplingConfig(n_samples=n_samples, seed=config.seed)
    inputs = {"model": model_identity(bridge), "prompts": _prompt_key(prompts), "readout": readout,
              "exact": dataclasses.asdict(exact_settings(config)), "sampling": dataclasses.asdict(sampling),
              "system_prompt": config.audit.system_prompt, "stats": dataclasses.asdict(config.audit)}
    outputs = ["tables/answers.parquet", "tables/bias.parquet", "tables/context_summary.parquet",
               "tables/group_means.parquet", "audit_summary.json"]

    def compute() -> None:
        started = time.perf_counter()
        answers = run_audit(bridge, prompts, readout=readout, exact=exact_settings(config), sampling=sampling,
                            system_prompt=config.audit.system_prompt or None)
        seconds = time.perf_counter() - started
        write_bias_tables(run, config, answers)
        run.write_table("tables/answers.parquet", answers)
        run.write_json("audit_summary.json", {"seconds": seconds, "prompts": len(prompts), "readout": readout,
                                              "mean_valid_mass": float(answers.valid_mass.mean()),
                                              "mean_unexplored_mass": float(answers.unexplored_mass.mean())})

    run.cached("audit", inputs, outputs, compute)
    return run.read_table("tables/answers.parquet")


def write_bias_tables(run: RunDir, config: StudyConfig, answers: pd.DataFrame) -> None:
    a = config.audit
    options = dict(scale=a.scale, method=a.method, n_boot=a.n_boot, seed=config.seed)
    run.write_table("tables/bias.parquet", bias_table(answers, **options))
    run.write_table("tables/context_summary.parquet", context_summary(answers, **options))
    run.write_table("tables/group_means.parquet", group_means(answers, scale=a.scale, n_boot=a.n_boot,
                                                              seed=config.seed))


def audit_summary_text(run: RunDir) -> str:
    """The audit's headline tables as plain text."""
    bias = run.read_table("tables/bias.parquet")
    summary = run.read_table("tables/context_summary.parquet")
    columns = ["context", "variation", "smd", "ci_low", "ci_high", "mean_white", "mean_black", "n_invalid"]
    return (bias[columns].round(3).to_string(index=False) + "\n\n"
            + summary.round(3).to_string(index=False))


def manifest(config: StudyConfig, bridge, timings: dict) -> dict:
    packages = ["torch", "transformers", "transformer-lens", "numpy", "pandas", "biasprune-workbench"]
    return {
        "config": to_dict(config),
        "model": model_identity(bridge),
        "versions": {p: _version(p) for p in packages},
        "python": platform.python_version(),
        "device": str(next(bridge.parameters()).device),
        "threads": torch.get_num_threads(),
        "seed": config.seed,
        "timings_s": timings,
    }


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def write_config(run: RunDir, config: StudyConfig) -> None:
    run.write_text("config.json", json.dumps(to_dict(config), indent=2))
