"""Shared benchmark plumbing: timing, peak memory in a fresh process, machine facts, long-format CSV."""

from __future__ import annotations

import argparse
import csv
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPOSITORY = Path(__file__).resolve().parents[1]  # benchmarks run as modules of the source checkout
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
    return _rss_field("VmHWM")


def run_isolated(module: str, *args: str) -> str:
    """Run ``python -m module args`` in a fresh process (a clean peak-RSS counter) and return stdout.

    glibc's malloc is told to map every allocation above 64 KiB separately: otherwise its dynamic
    threshold keeps freed tensors in the heap, and a later allocation reuses them without raising
    the peak, so a warm-up run would hide the measured run's memory.
    """
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, check=True, env=env, cwd=REPOSITORY
    )
    return result.stdout.strip()


def _rss_field(name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{name} not available: memory measurement needs Linux")


def release_freed_memory() -> None:
    """Give freed memory back to the OS before a memory probe starts in another process.

    glibc keeps freed blocks below its mmap threshold (up to 32 MB, so most weight matrices) in the
    heap; a process that has just dropped a large model would otherwise still hold its size in RSS
    while the probe process builds its own copy."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def reset_peak_rss() -> None:
    """Start a new peak-RSS (VmHWM) window at the current RSS (Linux: clear_refs 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def allocator_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of tensor memory allocated by ``fn`` above what was live when it started.

    From the profiler's allocator events ([memory]: +bytes on allocation, -bytes on free), so it
    counts tensors only, not the interpreter, BLAS scratch or allocator slack (the process peak does).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def memory_of_call(fn: Callable[[], object]) -> dict[str, int]:
    """Process peak (RSS above the start) and allocator peak of one call of ``fn``, after a warm-up call.

    Meant for a fresh process started by :func:`run_isolated`.
    """
    fn()  # one-time costs (thread pools, lazily built kernels) are not the call's memory
    reset_peak_rss()
    start = _rss_field("VmRSS")
    fn()
    process_peak = _rss_field("VmHWM") - start
    return {"process_peak_bytes": process_peak, "allocator_peak_bytes": allocator_peak_bytes(fn)}


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


def benchmark_main(
    argv: list[str] | None,
    doc: str,
    run: Callable[[argparse.Namespace], list[dict]],
    *,
    quick_help: str,
    memory_probe: Callable[..., object] | None = None,
    probe_metavar: tuple[str, ...] = (),
    extra_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """The command line every benchmark module shares: --quick, --csv, and the hidden --memory-probe
    with which :func:`run_isolated` measures one provider in a fresh process (its result is printed
    as JSON; the probe gets its arguments as strings)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--csv", help="write long-format rows to this CSV file")
    if extra_arguments is not None:
        extra_arguments(parser)
    if memory_probe is not None:
        parser.add_argument("--memory-probe", nargs=len(probe_metavar), metavar=probe_metavar, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if getattr(args, "memory_probe", None):
        print(json.dumps(memory_probe(*args.memory_probe)))
        return 0
    records = run(args)
    if args.csv:
        write_csv(records, args.csv)
    return 0
