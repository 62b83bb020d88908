"""biasprune's workbench: audit a language model for race and gender bias, localise it, prune it.

`import workbench as wb` is the front door: the names below are imported on first use (the package itself
imports nothing heavy), e.g. `wb.load_model`, `wb.PromptSet.build`, `wb.run_audit`, `wb.bias_table`.
"""

from __future__ import annotations

import importlib
import os
import platform

# One set of CPU kernels on every x86-64 machine (ATen's AVX2 kernels, MKL's AVX2 code branch), read by torch at its
# first computation: without it, float rounding differs between CPUs (AVX-512 or not, Intel or AMD) and flips names
# across the read-out's top-p cliff, so that a study's numbers would depend on the machine. Set either variable
# (not empty) before importing workbench to choose other kernels; the study's manifest records the ones that ran.
if platform.machine().lower() in {"x86_64", "amd64"}:
    for _variable, _value in {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}.items():
        if not os.environ.get(_variable):
            os.environ[_variable] = _value

_EXPORTS: dict[str, str] = {
    # models
    "DEFAULT_MODEL": "workbench.models",
    "load_model": "workbench.models",
    "model_info": "workbench.loaded",
    "ModelInfo": "workbench.loaded",
    "wrap": "workbench.models",
    # prompts and read-out
    "PromptSet": "workbench.readout.prompts",
    "render": "workbench.readout.prompts",
    "ExactReadoutConfig": "workbench.readout.engine",
    "SamplingConfig": "workbench.readout.engine",
    "exact_distributions": "workbench.readout.engine",
    "generate": "workbench.readout.engine",
    # audit and statistics
    "run_audit": "workbench.audit.table",
    "bias_table": "workbench.audit.stats",
    "signed_reduction": "workbench.audit.stats",
    "bias_directions": "workbench.audit.stats",
    "random_comparison": "workbench.audit.stats",
    "context_summary": "workbench.audit.stats",
    "group_means": "workbench.audit.stats",
    "significance_table": "workbench.audit.stats",
    "bias_type_table": "workbench.audit.bias_types",
    "lowest_group_table": "workbench.audit.bias_types",
    "BIAS_TYPES": "workbench.audit.bias_types",
    # components and localisation
    "Component": "workbench.components",
    "ModelShape": "workbench.components",
    "ablation_hooks": "workbench.components",
    "attribution_scores": "workbench.localize.attribution",
    "build_pairs": "workbench.localize.pairs",
    "baseline": "workbench.localize.pairs",
    "patching_scores": "workbench.localize.patching",
    "head_attention_scores": "workbench.localize.heads",
    # pruning and anomalies
    "PruningPlan": "workbench.prune.plan",
    "model_hash": "workbench.prune.plan",
    "kl_on_neutral": "workbench.prune.anomaly",
    "perplexity": "workbench.prune.anomaly",
    # the study
    "StudyConfig": "workbench.config",
    "load_config": "workbench.config",
    "run_study": "workbench.pipeline.study",
    "names_subset": "workbench.readout.prompts",
    # errors
    "WorkbenchError": "workbench.errors",
    "ConfigError": "workbench.errors",
    "ModelError": "workbench.errors",
    "PlanError": "workbench.errors",
    "PromptDataError": "workbench.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """Import a front-door name from its module on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'workbench' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
