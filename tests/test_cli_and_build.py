"""The installed package: the native build, the `mend-kernels info` command, and the README example."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mend_kernels as mk
from mend_kernels.ops import backend_status

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_native_cpu_module_is_built_unless_disabled():
    if os.environ.get("MEND_KERNELS_BUILD_NATIVE") == "0":
        assert not backend_status("cpu").available
        return
    status = backend_status("cpu")
    assert status.available, status.reason


def test_cuda_module_is_compiled_where_nvcc_is_present():
    wants_cuda = shutil.which("nvcc") is not None and os.environ.get("MEND_KERNELS_CUDA") != "0"
    if os.environ.get("MEND_KERNELS_BUILD_NATIVE") == "0" or not wants_cuda:
        return
    info = mk._native.load(mk._native.CUDA_MODULE).build_info()
    assert {"80", "90"} <= {str(arch) for arch in info["architectures"]}, info


def test_info_lists_every_backend_and_op():
    result = run("-m", "mend_kernels", "info")
    assert result.returncode == 0, result.stderr
    for name in ("reference", "cpu", "cuda", "triton", "triton-interpreter", "rank_update_", "editor_mlp"):
        assert name in result.stdout
    cpu_line = next(line for line in result.stdout.splitlines() if line.strip().startswith("cpu "))
    assert ("yes" in cpu_line) == backend_status("cpu").available


def test_quickstart_example_runs_and_reverts_exactly():
    result = run("examples/quickstart.py")
    assert result.returncode == 0, result.stderr
    assert "weights restored exactly: True" in result.stdout
    before, after = map(float, re.search(r"before (\S+), after edit (\S+)", result.stdout).groups())
    assert after > before  # a descent step raises the target's log-probability
