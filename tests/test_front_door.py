"""`import workbench as wb`: every name in `workbench.__all__` resolves, and the package imports nothing heavy."""

from __future__ import annotations

import subprocess
import sys

import workbench as wb


def test_every_exported_name_resolves():
    for name in wb.__all__:
        assert getattr(wb, name) is not None, name
    assert {"load_model", "PromptSet", "run_audit", "bias_table", "context_summary", "significance_table",
            "bias_type_table", "attribution_scores", "build_pairs", "PruningPlan", "ExactReadoutConfig",
            "load_config", "run_study"} <= set(wb.__all__)


def test_importing_the_package_is_light():
    code = "import sys, workbench; print('torch' in sys.modules, 'pandas' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
