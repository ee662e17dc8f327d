"""rank_update_: the in-place rank-k update of an edited weight.

Contract: ``weight += scale * a.T @ b`` with ``a`` (k, M) and ``b`` (k, N) in float32 and ``weight``
(M, N) in float32, bfloat16 or float16. The update is accumulated in float32, added to the weight in
float32 and rounded once, so small updates to low-precision weights are not lost to rounding.
The public :func:`rank_update_` maps MEND's factors onto this contract for both weight layouts.
"""

from __future__ import annotations

import functools

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
    if any(stride == 0 and size > 1 for stride, size in zip(weight.stride(), weight.shape)):
        raise InvalidInputError(f"weight has overlapping elements (strides {weight.stride()}): it cannot be updated in place")
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


@functools.cache
def _triton_kernel():
    """The Triton kernel, compiled on first use so that importing the package never needs triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def rank_update_kernel(
        w_ptr, a_ptr, b_ptr, M, N, K, stride_wm, stride_wn, stride_ak, stride_am, stride_bk, stride_bn, scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROUND_TO_BF16: tl.constexpr,
    ):
        # One (BLOCK_M, BLOCK_N) tile of W per program: accumulate A^T B over K in fp32, then one
        # read-modify-write of the tile with a single rounding to W's dtype.
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a_t = tl.load(
                a_ptr + ks[None, :] * stride_ak + rows[:, None] * stride_am,
                mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0,
            )
            b = tl.load(
                b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                mask=(ks[:, None] < K) & (cols[None, :] < N), other=0.0,
            )
            acc += tl.dot(a_t, b, input_precision="ieee")  # fp32 factors stay fp32 (no TF32)
        inside = (rows[:, None] < M) & (cols[None, :] < N)
        w_ptrs = w_ptr + rows[:, None] * stride_wm + cols[None, :] * stride_wn
        result = tl.load(w_ptrs, mask=inside, other=0.0).to(tl.float32) + scale * acc
        if ROUND_TO_BF16:
            # Round to nearest even explicitly: GPUs do it anyway, the Triton interpreter truncates.
            bits = result.to(tl.uint32, bitcast=True)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            result = tl.where(result == result, rounded.to(tl.float32, bitcast=True), result)
        tl.store(w_ptrs, result.to(w_ptr.dtype.element_ty), mask=inside)

    return rank_update_kernel


# Tiles of 64 x 64 outputs with K in chunks of 32: fp32 tl.dot needs every block dimension >= 16.
_TRITON_BLOCKS = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}


@RANK_UPDATE.register("triton")
def _rank_update_triton(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
    rows, cols = weight.shape
    grid = (-(-rows // _TRITON_BLOCKS["BLOCK_M"]), -(-cols // _TRITON_BLOCKS["BLOCK_N"]))
    _triton_kernel()[grid](
        weight, a, b, rows, cols, a.shape[0], *weight.stride(), *a.stride(), *b.stride(), scale,
        ROUND_TO_BF16=weight.dtype == torch.bfloat16, **_TRITON_BLOCKS,
    )
