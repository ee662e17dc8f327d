"""Shared benchmark plumbing: timing, peak memory in a fresh process, machine facts, long-format CSV."""

from __future__ import annotations

import csv
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

CSV_FIELDS = ("benchmark", "provider", "case", "metric", "value", "machine", "versions", "git_revision")


def median_seconds(fn: Callable[[], object], *, warmup: int = 2, repeats: int = 7) -> float:
    """Median wall time of ``fn`` after warm-up runs."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (Linux VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not available: peak-memory measurement needs Linux")


def run_isolated(module: str, *args: str) -> str:
    """Run ``python -m module args`` in a fresh process (a clean peak-RSS counter) and return stdout."""
    result = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, check=True)
    return result.stdout.strip()


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    return f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip()


def versions() -> str:
    import mend_kernels

    return f"torch {torch.__version__}; mend_kernels {mend_kernels.__version__}; python {platform.python_version()}"


def write_csv(rows: list[dict], path: str | Path) -> None:
    """Long-format rows: one measured value per line, with the machine, versions and revision."""
    context = {"machine": machine(), "versions": versions(), "git_revision": git_revision()}
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({**context, **row})


def print_table(headers: list[str], lines: list[list[object]]) -> None:
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *lines)]
    print("  ".join(str(h).rjust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for line in lines:
        print("  ".join(str(x).rjust(w) for x, w in zip(line, widths)))
