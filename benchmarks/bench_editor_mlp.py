"""editor_mlp forward + backward against the eager composite, in one run on this machine.

The editor at the size MEND uses for a 3840-wide pair of rows (u, delta concatenated): D = 3840,
rank r = 1920, two low-rank residual layers, 16 to 512 rows. "eager" is the pure-PyTorch composite
(the reference backend: normalisation, ``addmm`` per layer, scale/shift/clamp/residual as separate
ops, autograd for the backward); ``mend_kernels[cpu]`` runs the same GEMMs through the same BLAS
with every element-wise pass fused into one native kernel, and keeps only what the backward needs.
The parameters require gradients and the rows do not, as in meta-training.

Peak extra memory is measured in a fresh process per provider (Linux VmHWM above the resident
inputs). The GPU column is an estimate on paper for an H100 SXM, not a measurement:
time >= max(bytes / 3.35 TB/s, FLOPs / 67 TFLOP/s fp32) for the fused forward + backward.

    python -m benchmarks.bench_editor_mlp [--quick] [--csv results.csv]
"""

from __future__ import annotations

import torch

import mend_kernels as mk
from benchmarks.harness import benchmark_main, median_seconds, peak_rss_bytes, print_table, run_isolated
from mend_kernels.ops import backend_status

H100_BANDWIDTH = 3.35e12  # bytes/s, HBM3
H100_FP32 = 67e12  # FLOP/s, CUDA cores (fp32, no TF32)
DIM, RANK, LAYERS = 3840, 1920, 2
ROWS = (16, 64, 256, 512)
EPS = 1e-7


def operands(rows: int, dim: int = DIM, rank: int = RANK, layers: int = LAYERS):
    """(rows, mean, std, parameters requiring grad, output gradient), seeded."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, dim, generator=g)
    mean, std = torch.randn(dim, generator=g) * 0.1, torch.rand(dim, generator=g) + 0.5
    params = [
        torch.randn(layers, rank, dim, generator=g) / dim ** 0.5,
        torch.randn(layers, dim, rank, generator=g) / rank ** 0.5,
        torch.randn(layers, dim, generator=g) * 0.1,
        torch.randn(layers, dim, generator=g) + 1.0,
        torch.randn(layers, dim, generator=g) * 0.1,
    ]
    return x, mean, std, [p.requires_grad_() for p in params], torch.randn(rows, dim, generator=g)


def providers(x, mean, std, params, grad) -> dict:
    def forward_backward(backend: str) -> None:
        for p in params:
            p.grad = None
        mk.ops.editor_mlp(x, mean, std, *params, EPS, backend=backend).backward(grad)

    names = {"cpu": "mend_kernels[cpu]", "reference": "eager"}
    return {name: (lambda b=b: forward_backward(b)) for b, name in names.items() if backend_status(b).available}


def gpu_estimate_us(rows: int, dim: int = DIM, rank: int = RANK, layers: int = LAYERS) -> tuple[float, float, float]:
    """(bytes, FLOPs, microseconds) of the fused forward + backward on an H100, on paper."""
    gemms = 2 + 4 * layers - 1  # forward: 2 per layer; backward: dU, dt, dV per layer, dz for all but the first
    flops = 2 * rows * dim * rank * gemms
    params = 2 * dim * rank * 4 * layers  # V and U, fp32
    # Parameters read in the forward and the backward, their gradients written; per layer the (rows, D)
    # activations: forward reads z and writes pre and z', backward reads g, pre, z and writes ga and g'.
    moved = 3 * params + 4 * rows * dim * 8 * layers
    return moved, flops, 1e6 * max(moved / H100_BANDWIDTH, flops / H100_FP32)


def memory_probe(provider: str, rows: int | str) -> int:
    """Peak extra bytes of one forward + backward of ``provider`` (run in a fresh process by the parent)."""
    providers(*operands(4, 64, 16))[provider]()  # one-time initialisation (thread pools, BLAS buffers)
    inputs = operands(int(rows))
    for p in inputs[3]:  # gradients exist before the measurement, as in a training loop after step 1
        p.grad = torch.zeros_like(p)
    baseline = peak_rss_bytes()
    providers(*inputs)[provider]()
    return peak_rss_bytes() - baseline


def run(quick: bool) -> list[dict]:
    """Measure, print the table, return long-format records."""
    records, table = [], []
    for rows in (16, 256) if quick else ROWS:
        calls = providers(*operands(rows))
        times = {name: median_seconds(call, warmup=2, repeats=5) for name, call in calls.items()}
        moved, flops, h100_us = gpu_estimate_us(rows)
        case = f"D={DIM} r={RANK} L={LAYERS}, {rows} rows"
        for name, seconds in times.items():
            extra = int(run_isolated("benchmarks.bench_editor_mlp", "--memory-probe", name, str(rows)))
            table.append([
                case, name, f"{1e3 * seconds:.1f}", f"{times['eager'] / seconds:.2f}x",
                f"{flops / seconds / 1e9:.0f}", f"{max(extra, 0) / 2**20:.0f}",
                f"{h100_us:.0f}" if name.startswith("mend_kernels") else "",
            ])
            records.append({"benchmark": "editor_mlp", "provider": name, "case": case, "metric": "median_ms", "value": 1e3 * seconds})
            records.append({"benchmark": "editor_mlp", "provider": name, "case": case, "metric": "peak_extra_bytes", "value": extra})
        for metric, value in (("estimated_us", h100_us), ("bytes_moved", moved), ("flops", flops)):
            records.append({"benchmark": "editor_mlp", "provider": "H100 estimate", "case": case, "metric": metric, "value": value})
    print(f"editor_mlp forward + backward on this CPU ({torch.get_num_threads()} threads); 'vs eager' = eager time / time")
    print("(higher is better); GFLOP/s of the GEMMs; peak extra memory of one call in MiB; H100 column: estimate")
    print_table(["case", "provider", "median ms", "vs eager", "GFLOP/s", "peak extra MiB", "H100 est. us"], table)
    return records


def main(argv: list[str] | None = None) -> int:
    return benchmark_main(argv, __doc__, lambda args: run(args.quick), quick_help="16 and 256 rows only",
                          memory_probe=memory_probe, probe_metavar=("PROVIDER", "ROWS"))


if __name__ == "__main__":
    raise SystemExit(main())
