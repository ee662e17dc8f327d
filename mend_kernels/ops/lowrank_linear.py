"""lowrank_linear: MEND's edited forward during meta-training, without forming the dense update.

Contract: ``y = x W^T + b + scale * (x U^T) D`` for ``layout="linear"`` (nn.Linear, W is (out, in)),
``y = x W + b + scale * (x U^T) D`` for ``layout="conv1d"`` (GPT-2's Conv1D, W is (in, out)).
``x`` is (..., in), ``U`` (k, in) and ``D`` (k, out) are float32 factors, ``scale`` a 0-d float32
step. The side path goes through the (rows, k) tensor ``t = x U^T``, so no (out, in)-sized update
exists in the forward or the backward. W and b are frozen: they never receive gradients (also when
they require them); gradients flow to x, U, D and scale:

    s      = dy D^T                          (rows, k)
    dx     = dy W_lin + scale * s U          W_lin = W (linear) or W^T (conv1d)
    dU     = scale * s^T x
    dD     = scale * t^T dy
    dscale = sum((t D) * dy) = sum(t * s)

Products accumulate in float32; y and dx are rounded once to x's dtype.

Backends: ``triton`` fuses the frozen GEMM, the side path, the bias and the rounding into one tile
kernel per output. ``cpu`` / ``cuda`` run the frozen GEMM in x's dtype through the vendor BLAS
(exactly as nn.Linear does, so y's frozen part is rounded as the reference's) and add the side path
with the ``rank_update_`` kernel on the activation itself: ``y += (scale t) D`` accumulated in fp32
and rounded once, in place, with no (rows, out) fp32 temporary; the same for ``dx``.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from .._checks import check_frozen_linear, check_tensor
from ..errors import InvalidInputError
from ._dispatch import Op
from .rank_update import RANK_UPDATE

LOWRANK_LINEAR = Op("lowrank_linear")


def lowrank_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    u: torch.Tensor,
    delta: torch.Tensor,
    scale: torch.Tensor,
    *,
    layout: str = "linear",
    backend: str | None = None,
) -> torch.Tensor:
    """The frozen layer's output plus the edit's low-rank side path ``scale * (x @ u.T) @ delta``.

    Args:
        x: (..., in) float32, bfloat16 or float16.
        weight: (out, in) for ``layout="linear"``, (in, out) for ``"conv1d"``; x's dtype. Frozen.
        bias: (out,) in x's dtype, or None. Frozen.
        u: (k, in) float32 (MEND's u~).
        delta: (k, out) float32 (MEND's delta~).
        scale: 0-d float32 step size; it receives a gradient.
        backend: ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"reference"``; default: best available.

    Returns:
        (..., out) in x's dtype.

    Example:
        >>> x, w = torch.ones(2, 3), torch.zeros(4, 3)
        >>> y = lowrank_linear(x, w, None, torch.ones(1, 3), torch.ones(1, 4), torch.tensor(0.5))
        >>> y.tolist()[0]
        [1.5, 1.5, 1.5, 1.5]
    """
    _check_args(x, weight, bias, u, delta, scale, layout)
    _, impl = LOWRANK_LINEAR.select(x.device, backend)
    return impl(x, weight, bias, u, delta, scale, layout)


def _check_args(x, weight, bias, u, delta, scale, layout) -> tuple[int, int]:
    """(in, out) after checking every argument; each failure names the argument."""
    n_in, n_out = check_frozen_linear(x, weight, bias, layout)
    check_tensor("u", u, dtypes=(torch.float32,), device=x.device, shape=(None, n_in), min_rows=1)
    check_tensor("delta", delta, dtypes=(torch.float32,), device=x.device, shape=(u.shape[0], n_out))
    check_tensor("scale", scale, dtypes=(torch.float32,), device=x.device, shape=())
    return n_in, n_out


# --------------------------------------------------------------------------------------------------
# reference: pure PyTorch, differentiable by autograd, runs on any device including meta


@LOWRANK_LINEAR.register("reference")
def _lowrank_linear_reference(x, weight, bias, u, delta, scale, layout):
    weight = weight.detach()  # frozen: autograd saves the weight itself for dx, never a copy
    bias = None if bias is None else bias.detach()
    # The frozen product runs in x's dtype (as nn.Linear does: fp32 accumulation inside the matmul);
    # for 16-bit x it is rounded once before the fp32 side path is added.
    base = F.linear(x, weight if layout == "linear" else weight.t(), bias)
    t = x.float() @ u.t()
    return (base.float() + scale * (t @ delta)).to(x.dtype)


# --------------------------------------------------------------------------------------------------
# compiled backends: custom ops (forward and backward) over Triton or native kernels


def _register_compiled(backend: str) -> None:
    @LOWRANK_LINEAR.register(backend)
    def _lowrank_linear_compiled(x, weight, bias, u, delta, scale, layout):
        return torch.ops.mend.lowrank_linear(x, weight, bias, u, delta, scale, layout, backend)


for _backend in ("triton", "cuda", "cpu"):
    _register_compiled(_backend)


def _check_backend(backend: str) -> None:
    if backend not in _FORWARD:
        raise InvalidInputError(f"torch.ops.mend.lowrank_linear implements backends {tuple(_FORWARD)}, got {backend!r}")


@torch.library.custom_op("mend::lowrank_linear", mutates_args=())
def _lowrank_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    u: torch.Tensor,
    delta: torch.Tensor,
    scale: torch.Tensor,
    layout: str,
    backend: str,
) -> torch.Tensor:
    # The op is callable directly (torch.ops.mend.lowrank_linear): check here too.
    n_in, n_out = _check_args(x, weight, bias, u, delta, scale, layout)
    _check_backend(backend)
    x2 = x.reshape(-1, n_in)
    y = torch.empty(x2.shape[0], n_out, dtype=x.dtype, device=x.device)
    _FORWARD[backend](y, x2, weight, bias, u, delta, scale, layout)
    return y.reshape(*x.shape[:-1], n_out)


@_lowrank_linear_op.register_fake
def _lowrank_linear_fake(x, weight, bias, u, delta, scale, layout, backend):
    n_out = weight.shape[0] if layout == "linear" else weight.shape[1]
    return x.new_empty(*x.shape[:-1], n_out)


@torch.library.custom_op("mend::lowrank_linear_backward", mutates_args=())
def _lowrank_linear_backward_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    scale: torch.Tensor,
    layout: str,
    backend: str,
    compute_dx: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, du, ddelta, dscale); dx is an empty (0,) tensor unless ``compute_dx``."""
    n_in, n_out = _check_args(x, weight, None, u, delta, scale, layout)
    _check_backend(backend)
    check_tensor("grad", grad, dtypes=(x.dtype,), device=x.device, shape=(*x.shape[:-1], n_out))
    x2, g2 = x.reshape(-1, n_in), grad.reshape(-1, n_out)
    dx = x2.new_empty(x2.shape) if compute_dx else x.new_empty(0)
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    dscale = torch.empty((), dtype=torch.float32, device=x.device)
    _BACKWARD[backend](dx if compute_dx else None, du, ddelta, dscale, g2, x2, weight, u, delta, scale, layout)
    return (dx.reshape(x.shape) if compute_dx else dx), du, ddelta, dscale


@_lowrank_linear_backward_op.register_fake
def _lowrank_linear_backward_fake(grad, x, weight, u, delta, scale, layout, backend, compute_dx):
    dx = x.new_empty(x.shape) if compute_dx else x.new_empty(0)
    return dx, torch.empty_like(u), torch.empty_like(delta), scale.new_empty(())


def _setup_context(ctx, inputs, output):
    x, weight, bias, u, delta, scale, layout, backend = inputs
    ctx.save_for_backward(x, weight, u, delta, scale)
    ctx.layout, ctx.backend = layout, backend


def _backward(ctx, grad):
    x, weight, u, delta, scale = ctx.saved_tensors
    compute_dx = ctx.needs_input_grad[0]
    dx, du, ddelta, dscale = torch.ops.mend.lowrank_linear_backward(
        grad.to(x.dtype), x, weight, u, delta, scale, ctx.layout, ctx.backend, compute_dx
    )
    # weight and bias are frozen: no gradient, by contract.
    return (dx if compute_dx else None), None, None, du, ddelta, dscale, None, None


_lowrank_linear_op.register_autograd(_backward, setup_context=_setup_context)


@functools.cache
def _triton_kernels():
    """The Triton kernels, compiled on first use so that importing the package never needs triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def fused_mm_kernel(
        c_ptr, a_ptr, b_ptr, a2_ptr, b2_ptr, bias_ptr, scale_ptr, M, N, K, K2,
        stride_cm, stride_cn, stride_am, stride_ak, stride_bk, stride_bn,
        stride_a2m, stride_a2k, stride_b2k, stride_b2n, stride_bias,
        SCALE_FIRST: tl.constexpr, HAS_SECOND: tl.constexpr, HAS_BIAS: tl.constexpr,
        ROUND_TO_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, BLOCK_K2: tl.constexpr,
    ):
        # One (BLOCK_M, BLOCK_N) tile of
        #     C = [scale *] A @ B  [+ scale * A2 @ B2]  [+ bias]
        # per program. Operands of any dtype are loaded, converted to fp32 and multiplied with IEEE
        # fp32 tl.dot (no TF32), so every product accumulates in fp32; C is rounded once.
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_rows, in_cols = rows < M, cols < N
        scale = tl.load(scale_ptr).to(tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(
                a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak,
                mask=in_rows[:, None] & (ks[None, :] < K), other=0.0,
            ).to(tl.float32)
            b = tl.load(
                b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                mask=(ks[:, None] < K) & in_cols[None, :], other=0.0,
            ).to(tl.float32)
            acc += tl.dot(a, b, input_precision="ieee")
        if SCALE_FIRST:
            acc = acc * scale
        if HAS_SECOND:
            side = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K2, BLOCK_K2):
                ks = k0 + tl.arange(0, BLOCK_K2)
                a2 = tl.load(
                    a2_ptr + rows[:, None] * stride_a2m + ks[None, :] * stride_a2k,
                    mask=in_rows[:, None] & (ks[None, :] < K2), other=0.0,
                ).to(tl.float32)
                b2 = tl.load(
                    b2_ptr + ks[:, None] * stride_b2k + cols[None, :] * stride_b2n,
                    mask=(ks[:, None] < K2) & in_cols[None, :], other=0.0,
                ).to(tl.float32)
                side += tl.dot(a2, b2, input_precision="ieee")
            acc += scale * side
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols * stride_bias, mask=in_cols, other=0.0).to(tl.float32)[None, :]
        if ROUND_TO_BF16:
            # Round to nearest even explicitly: GPUs do it anyway, the Triton interpreter truncates.
            bits = acc.to(tl.uint32, bitcast=True)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            acc = tl.where(acc == acc, rounded.to(tl.float32, bitcast=True), acc)
        inside = in_rows[:, None] & in_cols[None, :]
        tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn,
                 acc.to(c_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def dot_sum_kernel(
        out_ptr, t_ptr, s_ptr, M, K, stride_tm, stride_tk, stride_sm, stride_sk,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # sum(t * s) over (M, K) in one program: deterministic, and (M, K) is only rows x rank.
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                inside = (rows[:, None] < M) & (ks[None, :] < K)
                t = tl.load(t_ptr + rows[:, None] * stride_tm + ks[None, :] * stride_tk, mask=inside, other=0.0)
                s = tl.load(s_ptr + rows[:, None] * stride_sm + ks[None, :] * stride_sk, mask=inside, other=0.0)
                acc += t * s
        tl.store(out_ptr, tl.sum(tl.sum(acc, axis=1), axis=0))

    return fused_mm_kernel, dot_sum_kernel


def _block(size: int, largest: int) -> int:
    """A power of two in [16, largest] covering ``size`` if it can: tl.dot needs dimensions >= 16."""
    block = 16
    while block < size and block < largest:
        block *= 2
    return block


def _mm(c, a, b, scale, *, scale_first=False, a2=None, b2=None, bias=None) -> None:
    """c = [scale *] a @ b [+ scale * a2 @ b2] [+ bias] with one Triton launch; all 2-D views."""
    (m, k), n = a.shape, b.shape[1]
    if m == 0 or n == 0:
        return
    if k == 0 and a2 is None:  # an empty reduction (rows = 0 in dU / dD): the result is zero
        c.zero_()
        if bias is not None:
            c.add_(bias)
        return
    k2 = a2.shape[1] if a2 is not None else 0
    block_m, block_n = _block(m, 64), _block(n, 64)
    grid = (-(-m // block_m), -(-n // block_n))
    dummy = a  # unused pointer arguments (their loads are compiled out)
    _triton_kernels()[0][grid](
        c, a, b, dummy if a2 is None else a2, dummy if b2 is None else b2, dummy if bias is None else bias, scale,
        m, n, k, k2, *c.stride(), *a.stride(), *b.stride(),
        *(a2.stride() if a2 is not None else (0, 0)), *(b2.stride() if b2 is not None else (0, 0)),
        bias.stride(0) if bias is not None else 0,
        SCALE_FIRST=scale_first, HAS_SECOND=a2 is not None, HAS_BIAS=bias is not None,
        ROUND_TO_BF16=c.dtype == torch.bfloat16,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=_block(k, 32), BLOCK_K2=_block(k2, 32),
    )


def _triton_forward(y, x2, weight, bias, u, delta, scale, layout) -> None:
    w_t = weight.t() if layout == "linear" else weight  # (in, out) view, no copy
    t = torch.empty(x2.shape[0], u.shape[0], dtype=torch.float32, device=x2.device)
    _mm(t, x2, u.t(), scale)  # t = x U^T            (rows, k)
    _mm(y, x2, w_t, scale, a2=t, b2=delta, bias=bias)  # y = x W^T + scale t D + b


def _triton_backward(dx, du, ddelta, dscale, g2, x2, weight, u, delta, scale, layout) -> None:
    rows, k = x2.shape[0], u.shape[0]
    t = torch.empty(rows, k, dtype=torch.float32, device=x2.device)
    s = torch.empty(rows, k, dtype=torch.float32, device=x2.device)
    _mm(t, x2, u.t(), scale)  # t = x U^T  (recomputed: rows x k is cheap, nothing saved)
    _mm(s, g2, delta.t(), scale)  # s = dy D^T
    if dx is not None:
        w_lin = weight if layout == "linear" else weight.t()  # (out, in) view
        _mm(dx, g2, w_lin, scale, a2=s, b2=u)  # dx = dy W_lin + scale s U
    _mm(du, s.t(), x2, scale, scale_first=True)  # dU = scale s^T x
    _mm(ddelta, t.t(), g2, scale, scale_first=True)  # dD = scale t^T dy
    if rows == 0:
        dscale.zero_()
        return
    _triton_kernels()[1][(1,)](
        dscale, t, s, rows, k, *t.stride(), *s.stride(), BLOCK_M=_block(rows, 64), BLOCK_K=_block(k, 32)
    )


# --------------------------------------------------------------------------------------------------
# cpu / cuda: the frozen GEMM through the vendor BLAS, the side path through the rank_update_ kernel


def _add_side_path_(out: torch.Tensor, t: torch.Tensor, factor: torch.Tensor, scale: torch.Tensor, backend: str) -> None:
    """out += scale * t @ factor in place, accumulated in fp32 and rounded once to out's dtype."""
    if out.shape[0] > 0:  # (scale is folded into t: a tensor, so no device-to-host sync for it)
        RANK_UPDATE.impl(backend)(out, (t * scale).t(), factor, 1.0)


def _frozen_mm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> None:
    if bias is None:
        torch.mm(a, b, out=out)
    else:
        torch.addmm(bias, a, b, out=out)


def _native(backend: str):
    def forward(y, x2, weight, bias, u, delta, scale, layout) -> None:
        w_t = weight.t() if layout == "linear" else weight  # (in, out) view, no copy
        _frozen_mm(y, x2, w_t, bias)  # x's dtype, as nn.Linear
        _add_side_path_(y, x2.float() @ u.t(), delta, scale, backend)

    def backward(dx, du, ddelta, dscale, g2, x2, weight, u, delta, scale, layout) -> None:
        xf, gf = x2.float(), g2.float()
        t, s = xf @ u.t(), gf @ delta.t()
        if dx is not None:
            _frozen_mm(dx, g2, weight if layout == "linear" else weight.t(), None)  # dy W_lin
            _add_side_path_(dx, s, u, scale, backend)  # + scale s U
        torch.mm((scale * s).t(), xf, out=du)  # dU = scale s^T x
        torch.mm((scale * t).t(), gf, out=ddelta)  # dD = scale t^T dy
        dscale.copy_(torch.vdot(t.reshape(-1), s.reshape(-1)))

    return forward, backward


_FORWARD = {"triton": _triton_forward}
_BACKWARD = {"triton": _triton_backward}
for _backend in ("cuda", "cpu"):
    _FORWARD[_backend], _BACKWARD[_backend] = _native(_backend)
