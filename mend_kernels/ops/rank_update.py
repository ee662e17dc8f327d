"""rank_update_: the in-place rank-k update of an edited weight.

Contract: ``weight += scale * a.T @ b`` with ``a`` (k, M) and ``b`` (k, N) in float32 and ``weight``
(M, N) in float32, bfloat16 or float16. The update is accumulated in float32, added to the weight in
float32 and rounded once, so small updates to low-precision weights are not lost to rounding.
The public :func:`rank_update_` maps MEND's factors onto this contract for both weight layouts.
"""

from __future__ import annotations

import torch

from .. import _native
from .._checks import WEIGHT_DTYPES, check_tensor
from ..errors import InvalidInputError
from ._dispatch import Op

LAYOUTS = ("linear", "conv1d")

RANK_UPDATE = Op("rank_update_")


def rank_update_(
    weight: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    scale: float,
    *,
    layout: str = "linear",
    backend: str | None = None,
) -> torch.Tensor:
    """Add ``scale * sum_i delta_i u_i^T`` to ``weight`` in place and return it.

    Args:
        weight: (out, in) for ``layout="linear"`` (nn.Linear), (in, out) for ``"conv1d"``
            (GPT-2's Conv1D); float32, bfloat16 or float16.
        u: (n, in) float32 rows (MEND's u~).
        delta: (n, out) float32 rows (MEND's delta~).
        scale: the step, ``sign * alpha``.
        backend: ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"reference"``; default: best available.

    Example:
        >>> w = torch.zeros(3, 2)
        >>> _ = rank_update_(w, torch.ones(1, 2), torch.ones(1, 3), 0.5)
        >>> w.sum().item()
        3.0
    """
    check_tensor("weight", weight, ndim=2, dtypes=WEIGHT_DTYPES)
    if layout not in LAYOUTS:
        raise InvalidInputError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    n_in, n_out = weight.shape[::-1] if layout == "linear" else weight.shape
    check_tensor("u", u, dtypes=(torch.float32,), device=weight.device, shape=(None, n_in), min_rows=1)
    check_tensor("delta", delta, dtypes=(torch.float32,), device=weight.device, shape=(u.shape[0], n_out))
    a, b = (delta, u) if layout == "linear" else (u, delta)
    name, _ = RANK_UPDATE.select(weight.device, backend)
    torch.ops.mend.rank_update_(weight, a, b, float(scale), name)
    return weight


@torch.library.custom_op("mend::rank_update_", mutates_args=("weight",))
def _rank_update_op(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, backend: str) -> None:
    # The op is callable directly (torch.ops.mend.rank_update_): kernels get raw pointers, so check here.
    check_tensor("weight", weight, ndim=2, dtypes=WEIGHT_DTYPES)
    check_tensor("a", a, dtypes=(torch.float32,), device=weight.device, shape=(None, weight.shape[0]), min_rows=1)
    check_tensor("b", b, dtypes=(torch.float32,), device=weight.device, shape=(a.shape[0], weight.shape[1]))
    RANK_UPDATE.impl(backend)(weight, a, b, scale)


@_rank_update_op.register_fake
def _rank_update_fake(weight, a, b, scale, backend) -> None:
    return None


@RANK_UPDATE.register("reference")
def _rank_update_reference(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
    weight.copy_(torch.addmm(weight.float(), a.t(), b, alpha=scale))


def _unit_stride_view(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """(W, A, B) with W row-major and rows that do not overlap; a column-major W goes through W.T."""
    for w, first, second in ((weight, a, b), (weight.t(), b, a)):
        rows, cols = w.shape
        if w.stride(1) == 1 and (rows == 1 or w.stride(0) >= cols):
            return w, first, second
    raise InvalidInputError(
        f"compiled backends need a weight with unit stride in one dimension and non-overlapping rows, "
        f"got shape {tuple(weight.shape)} with strides {weight.stride()}"
    )


def _launch_native(kernel, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, *extra) -> None:
    w, a, b = _unit_stride_view(weight, a, b)
    a, b = a.contiguous(), b.contiguous()  # held in this frame until the kernel returns
    rows, cols = w.shape
    dtype_name = str(w.dtype).removeprefix("torch.")
    ldw = w.stride(0) if rows > 1 else cols
    kernel(w.data_ptr(), dtype_name, rows, cols, ldw, a.data_ptr(), b.data_ptr(), a.shape[0], scale, *extra)


@RANK_UPDATE.register("cpu")
def _rank_update_cpu(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
    _launch_native(_native.load(_native.CPU_MODULE).rank_update, weight, a, b, scale)


@RANK_UPDATE.register("cuda")
def _rank_update_cuda(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
    # Temporaries freed after the launch are safe: the caching allocator reuses them in stream order.
    with torch.cuda.device(weight.device):  # the kernel launches on the current device
        stream = torch.cuda.current_stream(weight.device).cuda_stream
        _launch_native(_native.load(_native.CUDA_MODULE).rank_update, weight, a, b, scale, stream)
