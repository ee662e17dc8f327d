"""Microbenchmarks of the ops against eager PyTorch, in one run on this machine.

rank_update_: ``W += s * alpha * D^T U`` in place on bf16 weights, against the eager
``W += (alpha * D.T @ U).to(W.dtype)`` and against the memory floor of copying W once (``copy_``
into a preallocated buffer). rank_updates_ (several weights in one call) is measured on GPT-2-small's
edited MLP weights and on many small weights, against one rank_update_ call per weight and the eager
loop. Peak extra memory is measured in a fresh process per provider (Linux
VmHWM above the resident inputs). The GPU columns are estimates on paper for an H100 SXM, not
measurements: time >= max(bytes / 3.35 TB/s, FLOPs / 67 TFLOP/s fp32).

    python -m benchmarks.bench_ops [--quick] [--csv results.csv]
"""

from __future__ import annotations

import torch

import mend_kernels as mk
from benchmarks.harness import benchmark_main, median_seconds, peak_rss_bytes, print_table, run_isolated
from mend_kernels.ops import backend_status

H100_BANDWIDTH = 3.35e12  # bytes/s, HBM3
H100_FP32 = 67e12  # FLOP/s, CUDA cores (fp32 factors, no TF32)
SHAPES = ((3072, 768), (16384, 4096))
ROWS = (16, 64, 256)
# (name, [(out, in) per weight]): MEND's GPT-2 edit (c_fc and c_proj of the last 3 blocks, Conv1D
# weights stored (in, out)), and 24 small weights where per-call overhead dominates.
BATCHES = (
    ("GPT-2 small MLP, 3 blocks", [(3072, 768), (768, 3072)] * 3),
    ("24 weights 256x64", [(256, 64)] * 24),
)
BATCH_ROWS = (16, 64)


def operands(out_features: int, in_features: int, rows: int):
    """bf16 W filled in place (no fp32 temporary the size of W), fp32 factors."""
    weight = torch.empty(out_features, in_features, dtype=torch.bfloat16)
    for chunk in weight.view(-1).split(1 << 20):
        chunk.normal_()
    generator = torch.Generator().manual_seed(0)
    return weight, torch.randn(rows, in_features, generator=generator), torch.randn(rows, out_features, generator=generator)


def providers(weight: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, spare: torch.Tensor | None) -> dict:
    scale = 1e-12  # keeps W unchanged in bf16 across repeats; the work is the same
    calls = {
        f"mend_kernels[{backend}]": (lambda b=backend: mk.ops.rank_update_(weight, u, delta, scale, backend=b))
        for backend in ("cpu", "reference")
        if backend_status(backend).available
    }
    calls["eager"] = lambda: weight.add_((scale * delta.t() @ u).to(weight.dtype))
    if spare is not None:
        calls["copy W (floor)"] = lambda: spare.copy_(weight)
    return calls


def conv1d_operands(out_features: int, in_features: int, rows: int):
    """A Conv1D weight (in, out) and its factors: operands() of the transposed shape, factors swapped."""
    weight, delta, u = operands(in_features, out_features, rows)
    return weight, u, delta


def batch_providers(batch: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], spares: list[torch.Tensor]) -> dict:
    """Conv1D-layout weights (in, out) updated in one call, one call each, and eagerly."""
    scale = 1e-12
    weights, us, deltas = (list(column) for column in zip(*batch))
    scales = [scale] * len(weights)
    calls = {}
    for backend in ("cpu", "reference"):
        if backend_status(backend).available:
            calls[f"mend_kernels[{backend}] one call"] = lambda b=backend: mk.ops.rank_updates_(
                weights, us, deltas, scales, layouts="conv1d", backend=b)
    if backend_status("cpu").available:
        calls["mend_kernels[cpu] call per weight"] = lambda: [
            mk.ops.rank_update_(w, u, d, scale, layout="conv1d", backend="cpu") for w, u, d in batch]
    calls["eager"] = lambda: [w.add_((scale * u.t() @ d).to(w.dtype)) for w, u, d in batch]
    calls["copy W (floor)"] = lambda: [spare.copy_(w) for spare, w in zip(spares, weights)]
    return calls


def batched_benchmark(table: list, rows_out: list) -> None:
    for name, shapes in BATCHES:
        for rows in BATCH_ROWS:
            batch = [conv1d_operands(out_features, in_features, rows) for out_features, in_features in shapes]
            spares = [torch.empty_like(w) for w, _, _ in batch]
            times = {provider: median_seconds(call) for provider, call in batch_providers(batch, spares).items()}
            h100_us = sum(gpu_estimate_us(out_features, in_features, rows)[2] for out_features, in_features in shapes)
            case = f"{name} bf16, {rows} rows"
            for provider, seconds in times.items():
                table.append([
                    case, provider, f"{1e3 * seconds:.2f}", f"{times['eager'] / seconds:.2f}x",
                    f"{seconds / times['copy W (floor)']:.2f}x", "",
                    f"{h100_us:.1f}" if provider.startswith("mend_kernels") else "",
                ])
                rows_out.append({"benchmark": "rank_updates_", "provider": provider, "case": case, "metric": "median_ms", "value": 1e3 * seconds})
            rows_out.append({"benchmark": "rank_updates_", "provider": "H100 estimate", "case": case, "metric": "estimated_us", "value": h100_us})


def gpu_estimate_us(out_features: int, in_features: int, rows: int) -> tuple[float, float, float]:
    moved = 2 * out_features * in_features * 2 + rows * (out_features + in_features) * 4  # bf16 W r+w, fp32 factors
    flops = 2 * out_features * in_features * rows
    return moved, flops, 1e6 * max(moved / H100_BANDWIDTH, flops / H100_FP32)


def memory_probe(provider: str, out_features: int | str, in_features: int | str, rows: int | str) -> int:
    """Peak extra bytes of one call of ``provider`` (run in a fresh process by the parent)."""
    small = operands(64, 32, int(rows))
    providers(*small, None)[provider]()  # one-time initialisation (thread pools, BLAS buffers)
    weight, u, delta = operands(int(out_features), int(in_features), int(rows))
    baseline = peak_rss_bytes()
    providers(weight, u, delta, None)[provider]()
    return peak_rss_bytes() - baseline


def run(quick: bool) -> list[dict]:
    """Measure, print the table, return long-format records."""
    rows_out, table = [], []
    for out_features, in_features in SHAPES:
        for rows in (64,) if quick else ROWS:
            weight, u, delta = operands(out_features, in_features, rows)
            spare = torch.empty_like(weight)
            times = {name: median_seconds(call) for name, call in providers(weight, u, delta, spare).items()}
            moved, flops, h100_us = gpu_estimate_us(out_features, in_features, rows)
            case = f"{out_features}x{in_features} bf16, {rows} rows"
            for name, seconds in times.items():
                extra = None
                if name != "copy W (floor)":
                    extra = int(run_isolated("benchmarks.bench_ops", "--memory-probe", name, str(out_features), str(in_features), str(rows)))
                share = "" if extra is None else f"{100 * max(extra, 0) / weight.nbytes:.1f}%"
                table.append([
                    case, name, f"{1e3 * seconds:.2f}", f"{times['eager'] / seconds:.2f}x",
                    f"{seconds / times['copy W (floor)']:.2f}x", share,
                    f"{h100_us:.1f}" if name.startswith("mend_kernels") else "",
                ])
                rows_out.append({"benchmark": "rank_update_", "provider": name, "case": case, "metric": "median_ms", "value": 1e3 * seconds})
                if extra is not None:
                    rows_out.append({"benchmark": "rank_update_", "provider": name, "case": case, "metric": "peak_extra_bytes", "value": extra})
            rows_out.append({"benchmark": "rank_update_", "provider": "H100 estimate", "case": case, "metric": "estimated_us", "value": h100_us})
            rows_out.append({"benchmark": "rank_update_", "provider": "H100 estimate", "case": case, "metric": "bytes_moved", "value": moved})
            rows_out.append({"benchmark": "rank_update_", "provider": "H100 estimate", "case": case, "metric": "flops", "value": flops})
    batched_benchmark(table, rows_out)
    print(f"rank_update_ / rank_updates_ on this CPU ({torch.get_num_threads()} threads); 'vs eager' = eager time / time (higher is better),")
    print("'vs copy' = time / copy time (1.0 is the memory floor); peak extra memory as a share of W; H100 column: estimate")
    print_table(["case", "provider", "median ms", "vs eager", "vs copy", "peak extra / W", "H100 est. us"], table)
    return rows_out


def main(argv: list[str] | None = None) -> int:
    return benchmark_main(argv, __doc__, lambda args: run(args.quick), quick_help="K = 64 only",
                          memory_probe=memory_probe, probe_metavar=("PROVIDER", "OUT", "IN", "ROWS"))


if __name__ == "__main__":
    raise SystemExit(main())
