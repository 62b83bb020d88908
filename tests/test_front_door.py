"""`import workbench as wb`: every name in `workbench.__all__` resolves, and the package imports nothing heavy."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

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


KERNEL_PROBE = """
import hashlib, torch, workbench
generator = torch.Generator().manual_seed(0)
x = torch.randn(300, 997, generator=generator)
outputs = [x.softmax(-1), torch.nn.functional.rms_norm(x, (997,)), x @ x.T]
digest = hashlib.sha256(b"".join(o.numpy().tobytes() for o in outputs)).hexdigest()
print(torch.backends.cpu.get_cpu_capability(), digest)
"""


def _kernel_run(**variables: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in {"ATEN_CPU_CAPABILITY", "MKL_CBWR"}} | variables
    return subprocess.run([sys.executable, "-c", KERNEL_PROBE], capture_output=True, text=True, check=True,
                          env=env | {"OMP_NUM_THREADS": "1"}).stdout.split()


@pytest.mark.skipif(platform.machine().lower() not in {"x86_64", "amd64"}, reason="the pinned kernels are x86-64's")
def test_importing_workbench_pins_the_cpu_kernels_that_an_avx2_machine_runs():
    """Torch imported first, then workbench: the computation is bit-identical to a machine with AVX2 kernels only
    (emulated by asking torch for them), whatever this CPU offers beyond; a user's own choice still wins."""
    pinned, avx2_machine = _kernel_run(), _kernel_run(ATEN_CPU_CAPABILITY="avx2", MKL_CBWR="AVX2")
    generic = _kernel_run(ATEN_CPU_CAPABILITY="default")
    assert pinned == avx2_machine and pinned[0] == "AVX2"
    assert generic[0] == "DEFAULT" and generic[1] != pinned[1]
