"""running_moments_: merge a batch of rows into running per-dimension mean and M2.

Contract: given the statistics of ``count`` rows seen so far (``mean``, ``m2`` = sum of squared
deviations) and a batch ``rows`` (n, d), update them in place to the statistics of all
``count + n`` rows and add n to ``count``. The batch is reduced with a two-pass mean / centred sum of
squares and merged with Chan et al.'s parallel formula, which gives the same statistics as MEND's
per-row Welford loop in one vectorised step. ``count`` is a 64-bit integer tensor: it stays exact
far beyond the 2**24 rows at which the reference code's float32 counter stops counting.
"""

from __future__ import annotations

import functools

import torch

from .. import _native
from .._checks import check_tensor
from ._dispatch import Op

RUNNING_MOMENTS = Op("running_moments_")


def running_moments_(
    mean: torch.Tensor,
    m2: torch.Tensor,
    count: torch.Tensor,
    rows: torch.Tensor,
    *,
    backend: str | None = None,
) -> None:
    """Merge ``rows`` (n, d) into ``mean`` (d,), ``m2`` (d,) and ``count`` (0-d int64) in place.

    Start from zeros and a count of 0. The unbiased variance is ``m2 / (count - 1)``.

    Example:
        >>> mean, m2, count = torch.zeros(2), torch.zeros(2), torch.zeros((), dtype=torch.int64)
        >>> running_moments_(mean, m2, count, torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
        >>> mean.tolist(), m2.tolist(), int(count)
        ([2.0, 4.0], [2.0, 8.0], 2)
    """
    check_tensor("mean", mean)  # the op checks the rest; the device picks the backend
    name, _ = RUNNING_MOMENTS.select(mean.device, backend)
    torch.ops.mend.running_moments_(mean, m2, count, rows, name)


@torch.library.custom_op("mend::running_moments_", mutates_args=("mean", "m2", "count"))
def _running_moments_op(
    mean: torch.Tensor, m2: torch.Tensor, count: torch.Tensor, rows: torch.Tensor, backend: str
) -> None:
    # The op is callable directly (torch.ops.mend.running_moments_): kernels get raw pointers, so check here.
    check_tensor("mean", mean, ndim=1, dtypes=(torch.float32,), contiguous=True)
    dim = mean.shape[0]
    check_tensor("m2", m2, dtypes=(torch.float32,), device=mean.device, shape=(dim,), contiguous=True)
    check_tensor("count", count, dtypes=(torch.int64,), device=mean.device, shape=())
    check_tensor("rows", rows, dtypes=(torch.float32,), device=mean.device, shape=(None, dim), min_rows=1)
    RUNNING_MOMENTS.impl(backend)(mean, m2, count, rows)


@_running_moments_op.register_fake
def _running_moments_fake(mean, m2, count, rows, backend) -> None:
    return None


@RUNNING_MOMENTS.register("reference")
def _running_moments_reference(mean, m2, count, rows) -> None:
    n = rows.shape[0]
    batch_mean = rows.mean(dim=0)
    batch_m2 = (rows - batch_mean).square().sum(dim=0)
    batch_weight = (n / (count + n)).to(torch.float32)
    shift = batch_mean - mean
    merged_mean = mean + shift * batch_weight
    merged_m2 = m2 + batch_m2 + shift.square() * (count.to(torch.float32) * batch_weight)
    first = count == 0  # the old values mean nothing yet (they may even be NaN): take the batch's
    mean.copy_(torch.where(first, batch_mean, merged_mean))
    m2.copy_(torch.where(first, batch_m2, merged_m2))
    count.add_(n)


def _rows_with_unit_stride(rows: torch.Tensor) -> torch.Tensor:
    """Rows the kernels can walk with a row stride: unit column stride, rows not overlapping."""
    n, dim = rows.shape
    ok = rows.stride(1) == 1 and (n == 1 or rows.stride(0) >= dim)
    return rows if ok else rows.contiguous()


@RUNNING_MOMENTS.register("cpu")
def _running_moments_cpu(mean, m2, count, rows) -> None:
    rows = _rows_with_unit_stride(rows)
    n, dim = rows.shape
    _native.load(_native.CPU_MODULE).running_moments(
        mean.data_ptr(), m2.data_ptr(), int(count), rows.data_ptr(), n, dim, rows.stride(0) if n > 1 else dim
    )
    count.add_(n)


@RUNNING_MOMENTS.register("cuda")
def _running_moments_cuda(mean, m2, count, rows) -> None:
    rows = _rows_with_unit_stride(rows)
    n, dim = rows.shape
    with torch.cuda.device(mean.device):  # the kernel launches on the current device
        stream = torch.cuda.current_stream(mean.device).cuda_stream
        _native.load(_native.CUDA_MODULE).running_moments(
            mean.data_ptr(), m2.data_ptr(), count.data_ptr(), rows.data_ptr(), n, dim, rows.stride(0) if n > 1 else dim, stream
        )
    count.add_(n)


@functools.cache
def _triton_kernel():
    """The Triton kernel, compiled on first use so that importing the package never needs triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def running_moments_kernel(
        mean_ptr, m2_ptr, count_ptr, x_ptr, n, d, stride_xn, stride_xd, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr
    ):
        # One block of columns per program; two passes over the rows (mean, then centred squares).
        cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
        in_cols = cols < d
        total = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for r0 in range(0, n, BLOCK_N):
            rows = r0 + tl.arange(0, BLOCK_N)
            inside = (rows[:, None] < n) & in_cols[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_xn + cols[None, :] * stride_xd, mask=inside, other=0.0)
            total += tl.sum(x, axis=0)
        batch_mean = total / n
        squares = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for r0 in range(0, n, BLOCK_N):
            rows = r0 + tl.arange(0, BLOCK_N)
            inside = (rows[:, None] < n) & in_cols[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_xn + cols[None, :] * stride_xd, mask=inside, other=0.0)
            centred = tl.where(inside, x - batch_mean[None, :], 0.0)
            squares += tl.sum(centred * centred, axis=0)
        count = tl.load(count_ptr).to(tl.float32)
        old_mean = tl.load(mean_ptr + cols, mask=in_cols, other=0.0)
        old_m2 = tl.load(m2_ptr + cols, mask=in_cols, other=0.0)
        batch_weight = n / (count + n)
        shift = batch_mean - old_mean
        first = count == 0  # old values mean nothing yet
        new_mean = tl.where(first, batch_mean, old_mean + shift * batch_weight)
        new_m2 = tl.where(first, squares, old_m2 + squares + shift * shift * count * batch_weight)
        tl.store(mean_ptr + cols, new_mean, mask=in_cols)
        tl.store(m2_ptr + cols, new_m2, mask=in_cols)

    return running_moments_kernel


_TRITON_BLOCKS = {"BLOCK_D": 128, "BLOCK_N": 32}


@RUNNING_MOMENTS.register("triton")
def _running_moments_triton(mean, m2, count, rows) -> None:
    n, dim = rows.shape
    grid = (-(-dim // _TRITON_BLOCKS["BLOCK_D"]),)
    _triton_kernel()[grid](mean, m2, count, rows, n, dim, *rows.stride(), **_TRITON_BLOCKS)
    count.add_(n)
