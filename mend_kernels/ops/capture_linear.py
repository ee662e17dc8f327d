"""capture_linear: an edited layer's forward whose backward records delta and forms no weight gradient.

Contract: ``y = x W^T + b`` for ``layout="linear"`` (nn.Linear, W is (out, in)), ``y = x W + b`` for
``layout="conv1d"`` (GPT-2's Conv1D, W is (in, out)); ``x`` is (..., in). W and b are frozen: they
never receive a gradient, also when they require one. The backward, given dy = dL/dy, computes

    delta_out = dy                       as float32 rows (rows, out), written into the caller's buffer
    dx        = dy W_lin                 W_lin = W (linear) or W^T (conv1d); only if x needs a gradient

and nothing else: MEND needs the rows (u, delta) of dL/dW = sum_i delta_i u_i^T, never dL/dW itself,
so the (out, in) weight gradient is never formed. ``u`` is the forward's ``x``, which the caller keeps.
Products accumulate in float32; y and dx are rounded once to x's dtype; delta_out is dy exactly.

Why ``anchor``: the lowest edited layer runs on an input that needs no gradient (the layers below
are frozen and build no graph), so with frozen W and b its output would not require grad and
backward would never reach it to record delta. That layer passes ``anchor``, a 0-element float32
tensor that requires grad: the output joins the graph through it, backward returns no gradient for
it and, x needing none, computes no dx either, so at the lowest layer the backward is only the copy
of dy. It is an argument rather than created inside the op because a tensor that requires grad
cannot be created inside a torch.compile region. Without a path to the loss (or under
``torch.no_grad()``) the backward never runs and ``delta_out`` is left untouched.

Implemented as two custom ops in the ``mend`` namespace, ``torch.ops.mend.capture_linear`` (forward,
mutates nothing) and ``torch.ops.mend.capture_linear_backward`` (mutates ``delta_out``), with fake
kernels, so that every backend shares one autograd formula and traces under torch.compile.

Backends:

- ``reference``: pure PyTorch in float32, rounded once; also runs on meta tensors.
- ``triton``: the backward is one fused kernel: the dx GEMM tiles read dy anyway, and the programs
  of dx's first column tile store the dy tiles they load, as float32, into delta_out, so dy is read
  once for both. Without dx (the lowest layer) the same kernel only copies. The forward is the same
  tile kernel with a bias epilogue.
- ``cpu`` / ``cuda``: for this op the compiled backends are the vendor GEMM that torch links
  (MKL/oneDNN, cuBLAS), computing y exactly as nn.Linear / Conv1D do and dx as their autograd
  would, with delta recorded by one cast-copy. One GEMM plus one copy is all the op is, and a
  GEMM in csrc/ would only re-implement the vendor's; the names are registered so that the contract
  holds on every device. (``cpu`` is available exactly when the native module is built, as for
  every op: see ``_dispatch``.)
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from .._checks import WEIGHT_DTYPES, check_frozen_linear, check_frozen_weight, check_tensor
from ..errors import InvalidInputError
from ._dispatch import Op
from .lowrank_linear import _block

CAPTURE_LINEAR = Op("capture_linear")


def capture_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    delta_out: torch.Tensor,
    *,
    layout: str = "linear",
    anchor: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """The frozen layer's output; its backward writes dy into ``delta_out`` and forms no weight gradient.

    Args:
        x: (..., in) float32, bfloat16 or float16.
        weight: (out, in) for ``layout="linear"``, (in, out) for ``"conv1d"``; x's dtype. Frozen.
        bias: (out,) in x's dtype, or None. Frozen.
        delta_out: contiguous float32 (rows, out) buffer, rows = prod(x.shape[:-1]), that the backward
            fills with dL/dy; one buffer per call.
        anchor: a 0-element float32 tensor that requires grad, for a call whose x needs no gradient
            (the lowest edited layer): it makes the output join the autograd graph, so that
            backward reaches this call; see the module docstring.
        backend: ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"reference"``; default: best available.

    Returns:
        (..., out) in x's dtype.

    Example:
        >>> x, w, delta = torch.ones(2, 3), torch.ones(4, 3), torch.empty(2, 4)
        >>> anchor = torch.empty(0, requires_grad=True)  # x needs no gradient
        >>> capture_linear(x, w, None, delta, anchor=anchor).sum().backward()
        >>> delta.tolist()[0]
        [1.0, 1.0, 1.0, 1.0]
    """
    _check_args(x, weight, bias, delta_out, anchor, layout)
    if anchor is not None and not anchor.requires_grad:
        raise InvalidInputError("anchor must require grad: it exists to make the output join the autograd graph")
    name, _ = CAPTURE_LINEAR.select(x.device, backend)
    return torch.ops.mend.capture_linear(x, weight, bias, delta_out, anchor, layout, name)


# --------------------------------------------------------------------------------------------------
# argument checks (the custom ops are callable directly, so they check too)


def _check_args(x, weight, bias, delta_out, anchor, layout) -> tuple[int, int]:
    """(in, out) after checking every forward argument; each failure names the argument."""
    n_in, n_out = check_frozen_linear(x, weight, bias, layout)
    _check_delta_out(delta_out, x, n_out)
    if anchor is not None:
        check_tensor("anchor", anchor, dtypes=(torch.float32,), device=x.device, shape=(0,))
    return n_in, n_out


def _check_delta_out(delta_out, like: torch.Tensor, n_out: int) -> None:
    """delta_out holds one float32 row per row of ``like`` (x, or dy in the backward)."""
    rows = math.prod(like.shape[:-1])
    check_tensor(
        "delta_out", delta_out, dtypes=(torch.float32,), device=like.device, shape=(rows, n_out), contiguous=True
    )


def _check_backward_args(grad, weight, delta_out, layout) -> tuple[int, int]:
    check_tensor("grad", grad, dtypes=WEIGHT_DTYPES)
    if grad.dim() < 1:
        raise InvalidInputError(f"grad must have at least 1 dimension (..., out), got shape {tuple(grad.shape)}")
    n_in, n_out = check_frozen_weight(weight, layout, grad, "grad")
    if grad.shape[-1] != n_out:
        raise InvalidInputError(f"grad must have shape (..., {n_out}), got {tuple(grad.shape)}")
    _check_delta_out(delta_out, grad, n_out)
    return n_in, n_out


# --------------------------------------------------------------------------------------------------
# custom ops: one autograd formula for every backend


class _Kernels(NamedTuple):
    """One backend's implementation, on 2-D (rows, features) views."""

    # (x2, weight, bias, layout) -> y2 in x's dtype
    forward: Callable[..., torch.Tensor]
    # (grad2, weight, layout, delta_out, compute_dx) -> dx2 in grad's dtype, or None; fills delta_out
    backward: Callable[..., Optional[torch.Tensor]]


@torch.library.custom_op("mend::capture_linear", mutates_args=())
def _capture_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    delta_out: torch.Tensor,
    anchor: Optional[torch.Tensor],
    layout: str,
    backend: str,
) -> torch.Tensor:
    n_in, n_out = _check_args(x, weight, bias, delta_out, anchor, layout)
    rows = delta_out.shape[0]  # checked: prod(x.shape[:-1]); reshape(-1, 0) would be ambiguous
    y2 = CAPTURE_LINEAR.impl(backend).forward(x.reshape(rows, n_in), weight, bias, layout)
    return y2.reshape(*x.shape[:-1], n_out)


@_capture_linear_op.register_fake
def _capture_linear_fake(x, weight, bias, delta_out, anchor, layout, backend):
    n_out = weight.shape[0] if layout == "linear" else weight.shape[1]
    return x.new_empty(*x.shape[:-1], n_out)


@torch.library.custom_op("mend::capture_linear_backward", mutates_args=("delta_out",))
def _capture_linear_backward_op(
    grad: torch.Tensor, weight: torch.Tensor, delta_out: torch.Tensor, layout: str, backend: str, compute_dx: bool
) -> torch.Tensor:
    """dx (..., in) in grad's dtype, or an empty (0,) tensor unless ``compute_dx``; fills delta_out."""
    n_in, n_out = _check_backward_args(grad, weight, delta_out, layout)
    grad2 = grad.reshape(delta_out.shape[0], n_out)
    dx2 = CAPTURE_LINEAR.impl(backend).backward(grad2, weight, layout, delta_out, compute_dx)
    return dx2.reshape(*grad.shape[:-1], n_in) if compute_dx else grad.new_empty(0)


@_capture_linear_backward_op.register_fake
def _capture_linear_backward_fake(grad, weight, delta_out, layout, backend, compute_dx):
    n_in = weight.shape[1] if layout == "linear" else weight.shape[0]
    return grad.new_empty(*grad.shape[:-1], n_in) if compute_dx else grad.new_empty(0)


def _setup_context(ctx, inputs, output):
    x, weight, bias, delta_out, anchor, layout, backend = inputs
    ctx.save_for_backward(weight)
    # Not saved through save_for_backward: the backward writes it, and a saved tensor modified in
    # place would fail autograd's version check on a second backward (retain_graph=True).
    ctx.delta_out = delta_out
    ctx.layout, ctx.backend = layout, backend


def _backward(ctx, grad):
    (weight,) = ctx.saved_tensors
    compute_dx = ctx.needs_input_grad[0]
    dx = torch.ops.mend.capture_linear_backward(grad, weight, ctx.delta_out, ctx.layout, ctx.backend, compute_dx)
    # weight and bias are frozen and the anchor only joins the graph: no gradient for them, by contract.
    return (dx if compute_dx else None), None, None, None, None, None, None


_capture_linear_op.register_autograd(_backward, setup_context=_setup_context)


def _in_out(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """W as an (in, out) view, no copy: the forward's right operand."""
    return weight.t() if layout == "linear" else weight


# --------------------------------------------------------------------------------------------------
# reference: pure PyTorch in float32, rounded once; runs on any device including meta


def _reference_forward(x2, weight, bias, layout):
    y = x2.float() @ _in_out(weight, layout).float()
    return (y if bias is None else y + bias.float()).to(x2.dtype)


def _reference_backward(grad2, weight, layout, delta_out, compute_dx):
    delta_out.copy_(grad2)
    return (delta_out @ _in_out(weight, layout).t().float()).to(grad2.dtype) if compute_dx else None


CAPTURE_LINEAR.register("reference")(_Kernels(_reference_forward, _reference_backward))


# --------------------------------------------------------------------------------------------------
# cpu and cuda: the vendor GEMM torch links (MKL/oneDNN, cuBLAS) and one cast-copy


def _vendor_forward(x2, weight, bias, layout):
    # The module's own computation, so the captured forward is the model's forward.
    if layout == "linear":
        return F.linear(x2, weight, bias)  # nn.Linear
    return x2 @ weight if bias is None else torch.addmm(bias, x2, weight)  # Conv1D


def _vendor_backward(grad2, weight, layout, delta_out, compute_dx):
    delta_out.copy_(grad2)
    return grad2 @ _in_out(weight, layout).t() if compute_dx else None


_VENDOR = _Kernels(_vendor_forward, _vendor_backward)
CAPTURE_LINEAR.register("cpu")(_VENDOR)
CAPTURE_LINEAR.register("cuda")(_VENDOR)


# --------------------------------------------------------------------------------------------------
# triton: one tile kernel for the forward (with a bias epilogue) and the fused backward


@functools.cache
def _triton_kernel():
    """The Triton kernel, compiled on first use so that importing the package never needs triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def gemm_copy_kernel(
        c_ptr, a_ptr, b_ptr, bias_ptr, a_copy_ptr, M, N, K, stride_cm, stride_cn, stride_am, stride_ak,
        stride_bk, stride_bn, stride_bias, stride_copy_m, stride_copy_k,
        COMPUTE_C: tl.constexpr, HAS_BIAS: tl.constexpr, COPY_A: tl.constexpr, ROUND_TO_BF16: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # One (BLOCK_M, BLOCK_N) tile of C = A @ B [+ bias] per program. With COPY_A, the programs of
        # column tile 0 also store the A tiles they load into a_copy as fp32: the backward reads dy
        # once for both dx = dy W_lin and delta = dy. Operands are loaded, converted to fp32 and
        # multiplied with IEEE fp32 tl.dot (no TF32); C is rounded once.
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_rows, in_cols = rows < M, cols < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a_inside = in_rows[:, None] & (ks[None, :] < K)
            a = tl.load(a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak, mask=a_inside, other=0.0)
            a = a.to(tl.float32)
            if COPY_A:
                if tl.program_id(1) == 0:
                    tl.store(a_copy_ptr + rows[:, None] * stride_copy_m + ks[None, :] * stride_copy_k, a,
                             mask=a_inside)
            if COMPUTE_C:
                b = tl.load(
                    b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=(ks[:, None] < K) & in_cols[None, :], other=0.0,
                ).to(tl.float32)
                acc += tl.dot(a, b, input_precision="ieee")
        if COMPUTE_C:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + cols * stride_bias, mask=in_cols, other=0.0).to(tl.float32)[None, :]
            if ROUND_TO_BF16:
                # Round to nearest even explicitly: GPUs do it anyway, the Triton interpreter truncates.
                bits = acc.to(tl.uint32, bitcast=True)
                rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
                acc = tl.where(acc == acc, rounded.to(tl.float32, bitcast=True), acc)
            tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn,
                     acc.to(c_ptr.dtype.element_ty), mask=in_rows[:, None] & in_cols[None, :])

    return gemm_copy_kernel


def _gemm_copy(a, b, c=None, *, bias=None, a_copy=None) -> None:
    """c = a @ b [+ bias] and/or a_copy = float32(a), one Triton launch; 2-D views of any strides.

    Without c only the copy runs: one program per row tile, no GEMM.
    """
    (m, k), n = a.shape, b.shape[1]
    if m == 0:
        return
    block_m = _block(m, 64)
    block_n = _block(n, 64) if c is not None else 16
    # At least one column tile, so that the copy runs also when c has no columns.
    column_tiles = max(1, -(-n // block_n)) if c is not None else 1
    unused = a  # pointer arguments whose use is compiled out
    _triton_kernel()[(-(-m // block_m), column_tiles)](
        unused if c is None else c, a, b, unused if bias is None else bias, unused if a_copy is None else a_copy,
        m, n, k, *(c.stride() if c is not None else (0, 0)), *a.stride(), *b.stride(),
        bias.stride(0) if bias is not None else 0, *(a_copy.stride() if a_copy is not None else (0, 0)),
        COMPUTE_C=c is not None, HAS_BIAS=bias is not None, COPY_A=a_copy is not None,
        ROUND_TO_BF16=c is not None and c.dtype == torch.bfloat16,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=_block(k, 32),
    )


def _triton_forward(x2, weight, bias, layout):
    y2 = x2.new_empty(x2.shape[0], _in_out(weight, layout).shape[1])
    _gemm_copy(x2, _in_out(weight, layout), y2, bias=bias)
    return y2


def _triton_backward(grad2, weight, layout, delta_out, compute_dx):
    w_lin = _in_out(weight, layout).t()  # (out, in) view
    dx2 = grad2.new_empty(grad2.shape[0], w_lin.shape[1]) if compute_dx else None
    _gemm_copy(grad2, w_lin, dx2, a_copy=delta_out)
    return dx2


CAPTURE_LINEAR.register("triton")(_Kernels(_triton_forward, _triton_backward))
