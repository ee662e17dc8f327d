"""rank_update_: the in-place rank-k update of an edited weight.

Contract: ``weight += scale * a.T @ b`` with ``a`` (k, M) and ``b`` (k, N) in float32 and ``weight``
(M, N) in float32, bfloat16 or float16. The update is accumulated in float32, added to the weight in
float32 and rounded once, so small updates to low-precision weights are not lost to rounding.
The public :func:`rank_update_` maps MEND's factors onto this contract for both weight layouts;
:func:`rank_updates_` does the same for several weights of any shapes, dtypes and layouts in one op
call (one parallel region on the CPU, one kernel launch on the GPU).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from .. import _native
from .._checks import WEIGHT_DTYPES, check_layout, check_tensor
from ..errors import InvalidInputError
from ._dispatch import Op

RANK_UPDATE = Op("rank_update_")
RANK_UPDATES = Op("rank_updates_")


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
    a, b = _kernel_factors(weight, u, delta, layout, _SINGLE_NAMES)
    name, _ = RANK_UPDATE.select(weight.device, backend)
    torch.ops.mend.rank_update_(weight, a, b, float(scale), name)
    return weight


_SINGLE_NAMES = {"weight": "weight", "u": "u", "delta": "delta", "layout": "layout"}


def _indexed_names(index: int) -> dict[str, str]:
    return {"weight": f"weights[{index}]", "u": f"us[{index}]", "delta": f"deltas[{index}]", "layout": f"layouts[{index}]"}


def _kernel_factors(weight, u, delta, layout, names: dict[str, str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks one weight's arguments and maps MEND's (u, delta) onto the kernel's (a, b) for its layout."""
    check_tensor(names["weight"], weight, ndim=2, dtypes=WEIGHT_DTYPES)
    check_layout(layout, names["layout"])
    n_in, n_out = weight.shape[::-1] if layout == "linear" else weight.shape
    check_tensor(names["u"], u, dtypes=(torch.float32,), device=weight.device, shape=(None, n_in), min_rows=1)
    check_tensor(names["delta"], delta, dtypes=(torch.float32,), device=weight.device, shape=(u.shape[0], n_out))
    return (delta, u) if layout == "linear" else (u, delta)


def rank_updates_(
    weights: Sequence[torch.Tensor],
    us: Sequence[torch.Tensor],
    deltas: Sequence[torch.Tensor],
    scales: Sequence[float],
    *,
    layouts: str | Sequence[str] = "linear",
    backend: str | None = None,
) -> list[torch.Tensor]:
    """:func:`rank_update_` on several weights in one op call, and return them.

    ``weights[i] += scales[i] * deltas[i].T @ us[i]`` (transposed for a ``"conv1d"`` layout) for every
    i: the weights may differ in shape, dtype (float32, bfloat16, float16) and layout, and must be on
    one device. On the compiled backends all their tiles run in one parallel region (cpu) or one kernel
    launch (cuda, triton): small weights do not each pay a thread fork/join or a launch.
    Every argument is checked before any weight changes; the same weight twice, or weights whose
    memory ranges intersect (views of one tensor), are refused.

    Args:
        weights, us, deltas, scales: one entry per weight, as for :func:`rank_update_`.
        layouts: one layout for all weights, or one per weight.
        backend: as for :func:`rank_update_`; one backend serves the whole call.

    Example:
        >>> ws = [torch.zeros(3, 2), torch.zeros(2, 5, dtype=torch.bfloat16)]
        >>> _ = rank_updates_(ws, [torch.ones(1, 2), torch.ones(1, 2)], [torch.ones(1, 3), torch.ones(1, 5)],
        ...                   [0.5, 2.0], layouts=["linear", "conv1d"])
        >>> [w.sum().item() for w in ws]
        [3.0, 20.0]
    """
    weights, us, deltas, scales = list(weights), list(us), list(deltas), list(scales)
    layouts = [layouts] * len(weights) if isinstance(layouts, str) else list(layouts)
    _check_one_per_weight(len(weights), us=us, deltas=deltas, scales=scales, layouts=layouts)
    if not weights:
        return weights
    factors = [
        _kernel_factors(*args, _indexed_names(i)) for i, args in enumerate(zip(weights, us, deltas, layouts))
    ]
    device = weights[0].device
    for i, weight in enumerate(weights):
        if weight.device != device:
            raise InvalidInputError(f"weights[{i}] is on {weight.device}, but weights[0] is on {device}: one call updates one device")
    name, _ = RANK_UPDATES.select(device, backend)
    a, b = [pair[0] for pair in factors], [pair[1] for pair in factors]
    torch.ops.mend.rank_updates_(weights, a, b, [float(scale) for scale in scales], name)
    return weights


def _check_one_per_weight(count: int, **lists: list) -> None:
    for name, values in lists.items():
        if len(values) != count:
            raise InvalidInputError(f"{name} has {len(values)} entries, expected one per weight ({count})")


@torch.library.custom_op("mend::rank_update_", mutates_args=("weight",))
def _rank_update_op(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, backend: str) -> None:
    # The op is callable directly (torch.ops.mend.rank_update_): kernels get raw pointers, so check here.
    _check_operands(weight, a, b, "weight", "a", "b", device=weight.device)
    RANK_UPDATE.impl(backend)(weight, a, b, scale)


@_rank_update_op.register_fake
def _rank_update_fake(weight, a, b, scale, backend) -> None:
    return None


@torch.library.custom_op("mend::rank_updates_", mutates_args=("weights",))
def _rank_updates_op(
    weights: list[torch.Tensor], a: list[torch.Tensor], b: list[torch.Tensor], scales: list[float], backend: str
) -> None:
    # Callable directly too: every operand is checked before the kernel touches any weight.
    _check_one_per_weight(len(weights), a=a, b=b, scales=scales)
    if not weights:
        return
    implementation = RANK_UPDATES.impl(backend)
    for i, operands in enumerate(zip(weights, a, b)):
        _check_operands(*operands, f"weights[{i}]", f"a[{i}]", f"b[{i}]", device=weights[0].device)
    _check_disjoint(weights)
    implementation(weights, a, b, scales)


@_rank_updates_op.register_fake
def _rank_updates_fake(weights, a, b, scales, backend) -> None:
    return None


def _check_operands(weight, a, b, weight_name: str, a_name: str, b_name: str, *, device: torch.device) -> None:
    check_tensor(weight_name, weight, ndim=2, dtypes=WEIGHT_DTYPES, device=device)
    if any(stride == 0 and size > 1 for stride, size in zip(weight.stride(), weight.shape)):
        raise InvalidInputError(
            f"{weight_name} has overlapping elements (strides {weight.stride()}): it cannot be updated in place"
        )
    check_tensor(a_name, a, dtypes=(torch.float32,), device=device, shape=(None, weight.shape[0]), min_rows=1)
    check_tensor(b_name, b, dtypes=(torch.float32,), device=device, shape=(a.shape[0], weight.shape[1]))


def _check_disjoint(weights: list[torch.Tensor]) -> None:
    """Refuses weights whose byte ranges intersect: the kernels update all weights concurrently.

    Ranges, not elements, are compared: interleaved views of one tensor are refused too (rare for
    weights, and an exact test of two strided views is not worth its cost here).
    """
    if weights[0].is_meta:  # no memory to overlap
        return
    spans = sorted((*_byte_span(weight), i) for i, weight in enumerate(weights))
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            first, second = sorted((first, second))
            raise InvalidInputError(
                f"weights[{first}] and weights[{second}] overlap in memory (the same tensor twice, or views of one "
                "tensor): each weight must appear once"
            )


def _byte_span(weight: torch.Tensor) -> tuple[int, int]:
    last = sum((size - 1) * stride for size, stride in zip(weight.shape, weight.stride()))
    return weight.data_ptr(), weight.data_ptr() + (last + 1) * weight.element_size()


@RANK_UPDATE.register("reference")
def _rank_update_reference(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
    weight.copy_(torch.addmm(weight.float(), a.t(), b, alpha=scale))


@RANK_UPDATES.register("reference")
def _rank_updates_reference(weights: list[torch.Tensor], a: list[torch.Tensor], b: list[torch.Tensor], scales: list[float]) -> None:
    for operands in zip(weights, a, b, scales):
        _rank_update_reference(*operands)


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


def _native_descriptor(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float):
    """(the kernel's arguments (w_ptr, dtype, M, N, ldw, a_ptr, b_ptr, K, scale), the tensors they point into).

    The caller holds the returned tensors until the kernel returns: A and B may be fresh contiguous copies.
    """
    w, a, b = _unit_stride_view(weight, a, b)
    a, b = a.contiguous(), b.contiguous()
    rows, cols = w.shape
    dtype_name = str(w.dtype).removeprefix("torch.")
    ldw = w.stride(0) if rows > 1 else cols
    return (w.data_ptr(), dtype_name, rows, cols, ldw, a.data_ptr(), b.data_ptr(), a.shape[0], scale), (a, b)


def _launch_native(kernel, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, *extra) -> None:
    descriptor, _held = _native_descriptor(weight, a, b, scale)
    kernel(*descriptor, *extra)


def _launch_native_batched(kernel, weights, a, b, scales, *extra) -> None:
    # Every descriptor (and its stride check) is built before the kernel touches any weight.
    descriptors, _held = zip(*map(_native_descriptor, weights, a, b, scales))
    kernel(list(descriptors), *extra)


@RANK_UPDATE.register("cpu")
def _rank_update_cpu(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
    _launch_native(_native.load(_native.CPU_MODULE).rank_update, weight, a, b, scale)


@RANK_UPDATES.register("cpu")
def _rank_updates_cpu(weights: list[torch.Tensor], a: list[torch.Tensor], b: list[torch.Tensor], scales: list[float]) -> None:
    _launch_native_batched(_native.load(_native.CPU_MODULE).rank_update_batched, weights, a, b, scales)


def _current_stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


@RANK_UPDATE.register("cuda")
def _rank_update_cuda(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
    # Temporaries freed after the launch are safe: the caching allocator reuses them in stream order.
    with torch.cuda.device(weight.device):  # the kernel launches on the current device
        _launch_native(_native.load(_native.CUDA_MODULE).rank_update, weight, a, b, scale, _current_stream(weight.device))


@RANK_UPDATES.register("cuda")
def _rank_updates_cuda(weights: list[torch.Tensor], a: list[torch.Tensor], b: list[torch.Tensor], scales: list[float]) -> None:
    device = weights[0].device
    with torch.cuda.device(device):
        kernel = _native.load(_native.CUDA_MODULE).rank_update_batched
        _launch_native_batched(kernel, weights, a, b, scales, _current_stream(device))


# Field order of a row of the batched Triton kernel's table (one int64 row per weight).
_TABLE_FIELDS = (
    "w_ptr", "a_ptr", "b_ptr", "M", "N", "K", "stride_wm", "stride_wn", "stride_ak", "stride_am", "stride_bk",
    "stride_bn", "dtype", "first_tile", "tiles_n",
)
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # mend_dtype in csrc/include/mend/kernels.h


@functools.cache
def _triton_kernels():
    """(single-weight kernel, batched kernel, their helper arguments), compiled on first use so importing the package never needs triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def accumulate_tile(
        a_ptr, b_ptr, rows, cols, M, N, K, stride_ak, stride_am, stride_bk, stride_bn,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # A[:, rows]^T B[:, cols] accumulated over K in fp32.
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
        return acc

    @triton.jit
    def update_tile(w_ptr, rows, cols, M, N, stride_wm, stride_wn, acc, scale, ROUND_TO_BF16: tl.constexpr):
        # One read-modify-write of the tile with a single rounding to W's dtype.
        inside = (rows[:, None] < M) & (cols[None, :] < N)
        w_ptrs = w_ptr + rows[:, None] * stride_wm + cols[None, :] * stride_wn
        result = tl.load(w_ptrs, mask=inside, other=0.0).to(tl.float32) + scale * acc
        if ROUND_TO_BF16:
            # Round to nearest even explicitly: GPUs do it anyway, the Triton interpreter truncates.
            bits = result.to(tl.uint32, bitcast=True)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            result = tl.where(result == result, rounded.to(tl.float32, bitcast=True), result)
        tl.store(w_ptrs, result.to(w_ptr.dtype.element_ty), mask=inside)

    # The kernels receive the two helpers as constexpr arguments (ACCUMULATE, UPDATE): jit functions
    # defined in this closure cannot see each other by name, and module-level ones would import triton
    # with the package.
    @triton.jit
    def rank_update_kernel(
        w_ptr, a_ptr, b_ptr, M, N, K, stride_wm, stride_wn, stride_ak, stride_am, stride_bk, stride_bn, scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROUND_TO_BF16: tl.constexpr,
        ACCUMULATE: tl.constexpr, UPDATE: tl.constexpr,
    ):
        # One (BLOCK_M, BLOCK_N) tile of W per program.
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = ACCUMULATE(a_ptr, b_ptr, rows, cols, M, N, K, stride_ak, stride_am, stride_bk, stride_bn,
                              BLOCK_M, BLOCK_N, BLOCK_K)
        UPDATE(w_ptr, rows, cols, M, N, stride_wm, stride_wn, acc, scale, ROUND_TO_BF16)

    @triton.jit
    def rank_updates_kernel(
        table_ptr, scales_ptr, n_weights,
        FIELDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        ACCUMULATE: tl.constexpr, UPDATE: tl.constexpr,
    ):
        # One tile of one weight per program over a flat grid of all weights' tiles. The weight is the
        # number of weights after the first whose first tile is <= this program's (rows sorted by it).
        tile = tl.program_id(0)
        weight = 0
        for i in range(1, n_weights):
            weight += (tl.load(table_ptr + i * FIELDS + 13) <= tile).to(tl.int32)
        row = table_ptr + weight * FIELDS  # fields in the order of _TABLE_FIELDS
        w_addr, a_addr, b_addr = tl.load(row + 0), tl.load(row + 1), tl.load(row + 2)
        M, N, K = tl.load(row + 3), tl.load(row + 4), tl.load(row + 5)
        stride_wm, stride_wn = tl.load(row + 6), tl.load(row + 7)
        stride_ak, stride_am, stride_bk, stride_bn = tl.load(row + 8), tl.load(row + 9), tl.load(row + 10), tl.load(row + 11)
        dtype, first_tile, tiles_n = tl.load(row + 12), tl.load(row + 13), tl.load(row + 14)

        local = tile - first_tile
        rows = (local // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = (local % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        a_ptr = a_addr.to(tl.pointer_type(tl.float32))
        b_ptr = b_addr.to(tl.pointer_type(tl.float32))
        acc = ACCUMULATE(a_ptr, b_ptr, rows, cols, M, N, K, stride_ak, stride_am, stride_bk, stride_bn,
                         BLOCK_M, BLOCK_N, BLOCK_K)
        scale = tl.load(scales_ptr + weight)
        # W's element type is a run-time value here: one branch per dtype, uniform per program.
        if dtype == 1:
            UPDATE(w_addr.to(tl.pointer_type(tl.bfloat16)), rows, cols, M, N, stride_wm, stride_wn, acc, scale, True)
        elif dtype == 2:
            UPDATE(w_addr.to(tl.pointer_type(tl.float16)), rows, cols, M, N, stride_wm, stride_wn, acc, scale, False)
        else:
            UPDATE(w_addr.to(tl.pointer_type(tl.float32)), rows, cols, M, N, stride_wm, stride_wn, acc, scale, False)

    return rank_update_kernel, rank_updates_kernel, {"ACCUMULATE": accumulate_tile, "UPDATE": update_tile}


# Tiles of 64 x 64 outputs with K in chunks of 32: fp32 tl.dot needs every block dimension >= 16.
_TRITON_BLOCKS = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}


def _tiles(size: int, block: str) -> int:
    return -(-size // _TRITON_BLOCKS[block])


@RANK_UPDATE.register("triton")
def _rank_update_triton(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
    rows, cols = weight.shape
    kernel, _, helpers = _triton_kernels()
    kernel[(_tiles(rows, "BLOCK_M"), _tiles(cols, "BLOCK_N"))](
        weight, a, b, rows, cols, a.shape[0], *weight.stride(), *a.stride(), *b.stride(), scale,
        ROUND_TO_BF16=weight.dtype == torch.bfloat16, **_TRITON_BLOCKS, **helpers,
    )


@RANK_UPDATES.register("triton")
def _rank_updates_triton(weights: list[torch.Tensor], a: list[torch.Tensor], b: list[torch.Tensor], scales: list[float]) -> None:
    # One launch for every weight: the kernel reads each weight's addresses, sizes, strides and dtype
    # from a small int64 table (the tensors stay alive in the caller's lists during the launch).
    table, first_tile = [], 0
    for weight, a_i, b_i in zip(weights, a, b):
        rows, cols = weight.shape
        fields = (weight.data_ptr(), a_i.data_ptr(), b_i.data_ptr(), rows, cols, a_i.shape[0], *weight.stride(),
                  *a_i.stride(), *b_i.stride(), _DTYPE_CODES[weight.dtype], first_tile, _tiles(cols, "BLOCK_N"))
        table.append(fields)
        first_tile += _tiles(rows, "BLOCK_M") * _tiles(cols, "BLOCK_N")
    device = weights[0].device
    _, kernel, helpers = _triton_kernels()
    kernel[(first_tile,)](
        torch.tensor(table, dtype=torch.int64, device=device), torch.tensor(scales, dtype=torch.float32, device=device),
        len(weights), FIELDS=len(_TABLE_FIELDS), **_TRITON_BLOCKS, **helpers,
    )
