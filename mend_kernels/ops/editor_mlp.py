"""editor_mlp: MEND's editor network on captured rows (normalisation + low-rank residual layers).

Contract, for rows x = concat(u, delta) (n, D) of one edited weight and L stacked layers:

    z = (x - mean) / (std + eps)                                   # running statistics, (D,)
    for j in range(L):
        a = (z @ down_proj[j].T) @ up_proj[j].T + bias[j]          # rank-r residual branch
        z = z + clamp(a * scale[j] + shift[j], min=0)
    return z                                                       # concat(u~, delta~)

``scale``/``shift`` (L, D) are the rows of the edited weight's mode (layer-specific scale and shift).
clamp(min=0) rather than relu: its gradient at exactly 0 is 1, as in the reference code, which
matters at the identity initialisation where every pre-activation is 0. Differentiable in all inputs.

The compiled backends share two custom ops, ``torch.ops.mend.editor_mlp`` (forward) and
``torch.ops.mend.editor_mlp_backward``, with a ``backend`` argument; fp32 throughout (no TF32).

``cpu`` / ``cuda``: the two GEMMs per layer (and the four of the backward) go to the vendor BLAS
torch links (MKL, cuBLAS; tuned for every shape and transposition of these operands); everything between
them is one native pass (csrc/cpu/editor_mlp.cpp, csrc/cuda/editor_mlp.cu): the normalisation, the
epilogue ``z + clamp(a*S + O, min=0)``, and in the backward the masked gradient with the three column
sums, where eager PyTorch makes 4-6 passes over (n, D) with as many temporaries. z_0 is normalised
again in the backward instead of being kept.

``triton``: fully fused, IEEE tl.dot. Per layer j the forward runs two tile launches:

    t_j     = z_j V_j^T                  (n, r)   layer 0: normalisation fused into the load of rows
    z_{j+1} = z_j + clamp(a_j*S_j+O_j)   (n, D)   a_j = t_j U_j^T + b_j; bias, scale/shift, clamp and
                                                  the residual (normalised on load for j = 0) are the
                                                  matmul's epilogue, which also stores a_j

Saved for the backward (extra outputs of the forward op, marked non-differentiable): the inner
layer inputs z_1..z_{L-1} (L-1, n, D) (z_0 is never stored: it is re-normalised from ``rows`` on
load), t_j (L, n, r) and the pre-activations a_j (L, n, D) (so the clamp mask is the forward's own,
bit for bit, and no matmul is recomputed). Backward per layer, g = dL/dz_{j+1}:

    gh = g * [a_j*S_j + O_j >= 0]    ga = gh * S_j        one launch (column-block programs loop over
    dO_j = sum_rows gh   dS_j = sum_rows gh*a_j           rows: the sums are deterministic)
    db_j = sum_rows ga
    dU_j = ga^T t_j      dt = ga U_j      dV_j = dt^T z_j  (z_0 normalised on load)
    dz_j = g + dt V_j                                     (residual fused in the epilogue)

Gradients for rows/mean/std (not needed by MEND: rows are detached, mean/std are buffers) follow
from dz_0 with a few PyTorch element-wise ops, only when requested.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from .. import _native
from .._checks import check_tensor
from ..errors import InvalidInputError
from ._dispatch import Op
from .lowrank_linear import _block

EDITOR_MLP = Op("editor_mlp")


def editor_mlp(
    rows: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    down_proj: torch.Tensor,
    up_proj: torch.Tensor,
    bias: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    eps: float = 1e-7,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Map captured rows concat(u, delta) to concat(u~, delta~); see the module docstring.

    Shapes: rows (n, D), mean/std (D,), down_proj (L, r, D), up_proj (L, D, r),
    bias/scale/shift (L, D); all float32.
    """
    _, impl = EDITOR_MLP.select(rows.device, backend)
    return impl(rows, mean, std, down_proj, up_proj, bias, scale, shift, eps)


@EDITOR_MLP.register("reference")
def _editor_mlp_reference(rows, mean, std, down_proj, up_proj, bias, scale, shift, eps):
    z = (rows - mean) / (std + eps)
    for layer in range(down_proj.shape[0]):
        pre_activation = torch.addmm(bias[layer], z @ down_proj[layer].t(), up_proj[layer].t())
        z = z + (pre_activation * scale[layer] + shift[layer]).clamp(min=0)
    return z


# --------------------------------------------------------------------------------------------------
# compiled backends: custom ops (forward and backward) over Triton or native kernels


def _register_compiled(backend: str) -> None:
    @EDITOR_MLP.register(backend)
    def _editor_mlp_compiled(rows, mean, std, down_proj, up_proj, bias, scale, shift, eps):
        return torch.ops.mend.editor_mlp(rows, mean, std, down_proj, up_proj, bias, scale, shift, float(eps), backend)[0]


for _backend in ("triton", "cuda", "cpu"):
    _register_compiled(_backend)


def _check_backend(backend: str) -> None:
    if backend not in _FORWARD:
        raise InvalidInputError(f"torch.ops.mend.editor_mlp implements backends {tuple(_FORWARD)}, got {backend!r}")


def _check_args(rows, mean, std, down_proj, up_proj, bias, scale, shift) -> tuple[int, int, int, int]:
    """(n, D, L, r) after checking every argument; each failure names the argument."""
    f32 = (torch.float32,)
    check_tensor("rows", rows, ndim=2, dtypes=f32)
    n, dim = rows.shape
    dev = rows.device
    check_tensor("mean", mean, dtypes=f32, device=dev, shape=(dim,))
    check_tensor("std", std, dtypes=f32, device=dev, shape=(dim,))
    check_tensor("down_proj", down_proj, ndim=3, dtypes=f32, device=dev, shape=(None, None, dim))
    n_layers, rank = down_proj.shape[:2]
    check_tensor("up_proj", up_proj, dtypes=f32, device=dev, shape=(n_layers, dim, rank))
    for name, value in (("bias", bias), ("scale", scale), ("shift", shift)):
        check_tensor(name, value, dtypes=f32, device=dev, shape=(n_layers, dim))
    return n, dim, n_layers, rank


@torch.library.custom_op("mend::editor_mlp", mutates_args=())
def _editor_mlp_op(
    rows: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    down_proj: torch.Tensor,
    up_proj: torch.Tensor,
    bias: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    eps: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, inner z_1..z_{L-1}, t, pre-activations a): the last three are saved for the backward."""
    n, dim, n_layers, rank = _check_args(rows, mean, std, down_proj, up_proj, bias, scale, shift)
    _check_backend(backend)
    out = rows.new_empty(n, dim)
    inner = rows.new_empty(max(n_layers - 1, 0), n, dim)
    ts = rows.new_empty(n_layers, n, rank)
    pres = rows.new_empty(n_layers, n, dim)
    _FORWARD[backend](out, inner, ts, pres, rows, mean, std, down_proj, up_proj, bias, scale, shift, eps)
    return out, inner, ts, pres


@_editor_mlp_op.register_fake
def _editor_mlp_fake(rows, mean, std, down_proj, up_proj, bias, scale, shift, eps, backend):
    n, dim = rows.shape
    n_layers, rank = down_proj.shape[:2]
    return (
        rows.new_empty(n, dim),
        rows.new_empty(max(n_layers - 1, 0), n, dim),
        rows.new_empty(n_layers, n, rank),
        rows.new_empty(n_layers, n, dim),
    )


@torch.library.custom_op("mend::editor_mlp_backward", mutates_args=())
def _editor_mlp_backward_op(
    grad: torch.Tensor,
    rows: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    down_proj: torch.Tensor,
    up_proj: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    eps: float,
    inner: torch.Tensor,
    ts: torch.Tensor,
    pres: torch.Tensor,
    compute_dz0: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dz_0, d down_proj, d up_proj, d bias, d scale, d shift); dz_0 is empty (0,) unless ``compute_dz0``.

    dz_0 is the gradient w.r.t. the normalised input z_0 (not rows)."""
    # (bias is not needed by the backward: scale stands in for its shape check)
    n, dim, n_layers, rank = _check_args(rows, mean, std, down_proj, up_proj, scale, scale, shift)
    _check_backend(backend)
    check_tensor("grad", grad, dtypes=(torch.float32,), device=rows.device, shape=(n, dim))
    check_tensor("inner", inner, shape=(max(n_layers - 1, 0), n, dim))
    check_tensor("ts", ts, shape=(n_layers, n, rank))
    check_tensor("pres", pres, shape=(n_layers, n, dim))
    dz0 = rows.new_empty(n, dim) if compute_dz0 else rows.new_empty(0)
    ddown, dup = torch.empty_like(down_proj), torch.empty_like(up_proj)
    dbias, dscale, dshift = (rows.new_empty(n_layers, dim) for _ in range(3))
    _BACKWARD[backend](
        dz0 if compute_dz0 else None, ddown, dup, dbias, dscale, dshift,
        grad, rows, mean, std, down_proj, up_proj, scale, shift, eps, inner, ts, pres,
    )
    return dz0, ddown, dup, dbias, dscale, dshift


@_editor_mlp_backward_op.register_fake
def _editor_mlp_backward_fake(grad, rows, mean, std, down_proj, up_proj, scale, shift, eps, inner, ts, pres,
                              compute_dz0, backend):
    n, dim = rows.shape
    n_layers = down_proj.shape[0]
    dz0 = rows.new_empty(n, dim) if compute_dz0 else rows.new_empty(0)
    return (dz0, torch.empty_like(down_proj), torch.empty_like(up_proj),
            rows.new_empty(n_layers, dim), rows.new_empty(n_layers, dim), rows.new_empty(n_layers, dim))


def _setup_context(ctx, inputs, output):
    rows, mean, std, down_proj, up_proj, bias, scale, shift, eps, backend = inputs
    _, inner, ts, pres = output
    ctx.mark_non_differentiable(inner, ts, pres)
    # mean and std are the editor's running statistics, updated in place between edits (possibly
    # before this backward runs): keep the forward's values, (D,) each, instead of the buffers.
    ctx.save_for_backward(rows, mean.clone(), std.clone(), down_proj, up_proj, scale, shift, inner, ts, pres)
    ctx.eps, ctx.backend = eps, backend


def _backward(ctx, grad, *unused):
    rows, mean, std, down_proj, up_proj, scale, shift, inner, ts, pres = ctx.saved_tensors
    need_rows, need_mean, need_std = ctx.needs_input_grad[:3]
    compute_dz0 = need_rows or need_mean or need_std
    if grad is None:
        grad = torch.zeros_like(rows)
    dz0, ddown, dup, dbias, dscale, dshift = torch.ops.mend.editor_mlp_backward(
        grad.contiguous(), rows, mean, std, down_proj, up_proj, scale, shift, ctx.eps, inner, ts, pres, compute_dz0,
        ctx.backend,
    )
    drows = dmean = dstd = None
    if compute_dz0:
        denom = std + ctx.eps
        drows = dz0 / denom
        dmean = -drows.sum(0) if need_mean else None
        dstd = -(drows * ((rows - mean) / denom)).sum(0) if need_std else None
    return drows if need_rows else None, dmean, dstd, ddown, dup, dbias, dscale, dshift, None, None


_editor_mlp_op.register_autograd(_backward, setup_context=_setup_context)


@functools.cache
def _triton_kernels():
    """The Triton kernels, compiled on first use so that importing the package never needs triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def mm_kernel(
        c_ptr, a_ptr, b_ptr, M, N, K,
        stride_cm, stride_cn, stride_am, stride_ak, stride_bk, stride_bn,
        mean_ptr, std_ptr, eps,
        r_ptr, stride_rm, stride_rn,
        bias_ptr, scale_ptr, shift_ptr, stride_bias, stride_scale, stride_shift,
        pre_ptr, stride_pm, stride_pn,
        NORM_A: tl.constexpr, NORM_B: tl.constexpr, NORM_R: tl.constexpr, EPILOGUE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # One (BLOCK_M, BLOCK_N) tile of C = A @ B (NORM_A / NORM_B: A / B normalised on load), then
        #   EPILOGUE 0: C = acc
        #   EPILOGUE 1: pre = acc + bias; C = R + clamp(pre * scale + shift, min=0); pre is stored too
        #   EPILOGUE 2: C = R + acc
        # with R (M, N) the residual (NORM_R: normalised on load, statistics along N).
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_rows, in_cols = rows < M, cols < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            in_ks = ks < K
            a_in = in_rows[:, None] & in_ks[None, :]
            a = tl.load(a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak, mask=a_in, other=0.0)
            if NORM_A:  # z_0 = (rows - mean) / (std + eps), statistics along K; padding stays 0
                mu = tl.load(mean_ptr + ks, mask=in_ks, other=0.0)
                sd = tl.load(std_ptr + ks, mask=in_ks, other=1.0)
                a = tl.where(a_in, (a - mu[None, :]) / (sd[None, :] + eps), 0.0)
            b_in = in_ks[:, None] & in_cols[None, :]
            b = tl.load(b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn, mask=b_in, other=0.0)
            if NORM_B:  # statistics along N
                mu = tl.load(mean_ptr + cols, mask=in_cols, other=0.0)
                sd = tl.load(std_ptr + cols, mask=in_cols, other=1.0)
                b = tl.where(b_in, (b - mu[None, :]) / (sd[None, :] + eps), 0.0)
            acc += tl.dot(a, b, input_precision="ieee")
        inside = in_rows[:, None] & in_cols[None, :]
        if EPILOGUE != 0:
            res = tl.load(r_ptr + rows[:, None] * stride_rm + cols[None, :] * stride_rn, mask=inside, other=0.0)
            if NORM_R:  # statistics along N
                mu = tl.load(mean_ptr + cols, mask=in_cols, other=0.0)
                sd = tl.load(std_ptr + cols, mask=in_cols, other=1.0)
                res = (res - mu[None, :]) / (sd[None, :] + eps)
        if EPILOGUE == 1:
            pre = acc + tl.load(bias_ptr + cols * stride_bias, mask=in_cols, other=0.0)[None, :]
            tl.store(pre_ptr + rows[:, None] * stride_pm + cols[None, :] * stride_pn, pre, mask=inside)
            s = tl.load(scale_ptr + cols * stride_scale, mask=in_cols, other=0.0)
            o = tl.load(shift_ptr + cols * stride_shift, mask=in_cols, other=0.0)
            h = pre * s[None, :] + o[None, :]
            acc = res + tl.where(h < 0, 0.0, h)  # NaN propagates, as torch.clamp
        if EPILOGUE == 2:
            acc += res
        tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn, acc, mask=inside)

    @triton.jit
    def grad_epilogue_kernel(
        ga_ptr, g_ptr, pre_ptr, scale_ptr, shift_ptr, dbias_ptr, dscale_ptr, dshift_ptr, M, N,
        stride_gam, stride_gan, stride_gm, stride_gn, stride_pm, stride_pn,
        stride_scale, stride_shift,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # One column block, all rows: gh = g * [pre*scale + shift >= 0] (torch.clamp's gradient),
        # ga = gh * scale, and the column sums d shift = sum gh, d scale = sum gh*pre, d bias = sum ga.
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_cols = cols < N
        s = tl.load(scale_ptr + cols * stride_scale, mask=in_cols, other=0.0)
        o = tl.load(shift_ptr + cols * stride_shift, mask=in_cols, other=0.0)
        sum_gh = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        sum_gha = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        sum_ga = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            inside = (rows[:, None] < M) & in_cols[None, :]
            g = tl.load(g_ptr + rows[:, None] * stride_gm + cols[None, :] * stride_gn, mask=inside, other=0.0)
            pre = tl.load(pre_ptr + rows[:, None] * stride_pm + cols[None, :] * stride_pn, mask=inside, other=0.0)
            h = pre * s[None, :] + o[None, :]
            gh = tl.where(inside & (h >= 0), g, 0.0)
            ga = gh * s[None, :]
            tl.store(ga_ptr + rows[:, None] * stride_gam + cols[None, :] * stride_gan, ga, mask=inside)
            sum_gh += gh
            sum_gha += gh * pre
            sum_ga += ga
        tl.store(dshift_ptr + cols, tl.sum(sum_gh, axis=0), mask=in_cols)
        tl.store(dscale_ptr + cols, tl.sum(sum_gha, axis=0), mask=in_cols)
        tl.store(dbias_ptr + cols, tl.sum(sum_ga, axis=0), mask=in_cols)

    return mm_kernel, grad_epilogue_kernel


def _mm(c, a, b, *, stats=None, norm_a=False, norm_b=False, residual=None, norm_r=False,
        layer=None, pre=None) -> None:
    """c = a @ b with the optional fusions of ``mm_kernel``; all 2-D strided fp32 views.

    ``stats`` = (mean, std, eps) for the normalising loads; ``layer`` = (bias, scale, shift) rows
    selects the editor epilogue (and ``pre`` receives the pre-activation)."""
    (m, k), n = a.shape, b.shape[1]
    if m == 0 or n == 0:
        return
    mean, std, eps = stats if stats is not None else (a, a, 0.0)
    epilogue = 1 if layer is not None else 2 if residual is not None else 0
    res = residual if residual is not None else a
    bias, scale, shift = layer if layer is not None else (a, a, a)
    pre_t = pre if pre is not None else c
    block_m, block_n = _block(m, 64), _block(n, 64)
    grid = (-(-m // block_m), -(-n // block_n))
    _triton_kernels()[0][grid](
        c, a, b, m, n, k, *c.stride(), *a.stride(), *b.stride(),
        mean, std, float(eps),
        res, *res.stride(),
        bias, scale, shift,
        bias.stride(-1) if layer is not None else 0, scale.stride(-1) if layer is not None else 0,
        shift.stride(-1) if layer is not None else 0,
        pre_t, *pre_t.stride(),
        NORM_A=norm_a, NORM_B=norm_b, NORM_R=norm_r, EPILOGUE=epilogue,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=_block(k, 32),
    )


def _triton_forward(out, inner, ts, pres, rows, mean, std, down_proj, up_proj, bias, scale, shift, eps) -> None:
    n_layers = down_proj.shape[0]
    stats = (mean, std, eps)
    z = rows
    for j in range(n_layers):
        first = j == 0
        _mm(ts[j], z, down_proj[j].t(), stats=stats, norm_a=first)  # t_j = z_j V_j^T
        z_next = out if j == n_layers - 1 else inner[j]
        _mm(z_next, ts[j], up_proj[j].t(), stats=stats, residual=z, norm_r=first,
            layer=(bias[j], scale[j], shift[j]), pre=pres[j])
        z = z_next


def _triton_backward(dz0, ddown, dup, dbias, dscale, dshift,
                     grad, rows, mean, std, down_proj, up_proj, scale, shift, eps, inner, ts, pres) -> None:
    n, dim = rows.shape
    n_layers = down_proj.shape[0]
    if n == 0:
        for t in (ddown, dup, dbias, dscale, dshift):
            t.zero_()
        return
    stats = (mean, std, eps)
    kernels = _triton_kernels()
    g = grad
    ga = rows.new_empty(n, dim)
    dt = rows.new_empty(n, down_proj.shape[1])
    block_n = _block(dim, 64)
    for j in reversed(range(n_layers)):
        kernels[1][(-(-dim // block_n),)](
            ga, g, pres[j], scale[j], shift[j], dbias[j], dscale[j], dshift[j], n, dim,
            *ga.stride(), *g.stride(), *pres[j].stride(), scale[j].stride(0), shift[j].stride(0),
            BLOCK_M=_block(n, 32), BLOCK_N=block_n,
        )
        _mm(dup[j], ga.t(), ts[j])  # dU_j = ga^T t_j          (D, r)
        _mm(dt, ga, up_proj[j])  # dt = ga U_j                 (n, r)
        if j == 0:
            _mm(ddown[j], dt.t(), rows, stats=stats, norm_b=True)  # dV_0 = dt^T z_0, z_0 normalised on load
        else:
            _mm(ddown[j], dt.t(), inner[j - 1])  # dV_j = dt^T z_j
        if j > 0 or dz0 is not None:
            g_next = dz0 if j == 0 else rows.new_empty(n, dim)
            _mm(g_next, dt, down_proj[j], residual=g)  # dz_j = g + dt V_j
            g = g_next


# --------------------------------------------------------------------------------------------------
# cpu / cuda: vendor GEMMs through torch, element-wise passes in csrc/{cpu,cuda}/editor_mlp.*


class _NativeKernels:
    """The editor's element-wise kernels of one compiled module, called on tensors.

    Every (n, D) tensor passed is contiguous (the op allocates them so); ``rows`` needs unit column
    stride only, and 1-D parameters are contiguous rows of the (L, D) parameters."""

    def __init__(self, device: torch.device):
        if device.type == "cuda":
            self._module = _native.load(_native.CUDA_MODULE)
            self._stream = (torch.cuda.current_stream(device).cuda_stream,)  # launch on the caller's stream
        else:
            self._module = _native.load(_native.CPU_MODULE)
            self._stream = ()

    def normalize(self, z, rows, mean, std, eps) -> None:
        n, dim = rows.shape
        ldr = rows.stride(0) if n > 1 else dim
        self._module.editor_normalize(z.data_ptr(), rows.data_ptr(), ldr, mean.data_ptr(), std.data_ptr(),
                                      float(eps), n, dim, *self._stream)

    def layer_forward(self, out, pre, res, scale, shift) -> None:
        self._module.editor_layer_forward(out.data_ptr(), pre.data_ptr(), res.data_ptr(), scale.data_ptr(),
                                          shift.data_ptr(), *out.shape, *self._stream)

    def layer_backward(self, ga, g, pre, scale, shift, dbias, dscale, dshift) -> None:
        self._module.editor_layer_backward(ga.data_ptr(), g.data_ptr(), pre.data_ptr(), scale.data_ptr(),
                                           shift.data_ptr(), dbias.data_ptr(), dscale.data_ptr(),
                                           dshift.data_ptr(), *ga.shape, *self._stream)


def _unit_column_stride(rows: torch.Tensor) -> torch.Tensor:
    return rows if rows.shape[1] <= 1 or rows.stride(1) == 1 else rows.contiguous()


def _normalized(kernels: _NativeKernels, rows, mean, std, eps) -> torch.Tensor:
    z = rows.new_empty(rows.shape)
    kernels.normalize(z, _unit_column_stride(rows), mean.contiguous(), std.contiguous(), eps)
    return z


def _native_forward(out, inner, ts, pres, rows, mean, std, down_proj, up_proj, bias, scale, shift, eps) -> None:
    if rows.shape[0] == 0:
        return
    with torch.cuda.device(rows.device) if rows.is_cuda else contextlib.nullcontext():
        kernels = _NativeKernels(rows.device)
        scale, shift = scale.contiguous(), shift.contiguous()
        z = _normalized(kernels, rows, mean, std, eps)  # z_0, also the first residual
        n_layers = down_proj.shape[0]
        for j in range(n_layers):
            torch.mm(z, down_proj[j].t(), out=ts[j])  # t_j = z_j V_j^T
            torch.addmm(bias[j], ts[j], up_proj[j].t(), out=pres[j])  # a_j = t_j U_j^T + b_j
            z_next = out if j == n_layers - 1 else inner[j]
            kernels.layer_forward(z_next, pres[j], z, scale[j], shift[j])
            z = z_next


def _native_backward(dz0, ddown, dup, dbias, dscale, dshift,
                     grad, rows, mean, std, down_proj, up_proj, scale, shift, eps, inner, ts, pres) -> None:
    n, dim = rows.shape
    if n == 0:
        for t in (ddown, dup, dbias, dscale, dshift):
            t.zero_()
        return
    with torch.cuda.device(rows.device) if rows.is_cuda else contextlib.nullcontext():
        kernels = _NativeKernels(rows.device)
        scale, shift = scale.contiguous(), shift.contiguous()
        g = grad
        ga = rows.new_empty(n, dim)
        dt = rows.new_empty(n, down_proj.shape[1])
        for j in reversed(range(down_proj.shape[0])):
            kernels.layer_backward(ga, g, pres[j], scale[j], shift[j], dbias[j], dscale[j], dshift[j])
            torch.mm(ga.t(), ts[j], out=dup[j])  # dU_j = ga^T t_j
            torch.mm(ga, up_proj[j], out=dt)  # dt = ga U_j
            z = _normalized(kernels, rows, mean, std, eps) if j == 0 else inner[j - 1]
            torch.mm(dt.t(), z, out=ddown[j])  # dV_j = dt^T z_j
            if j > 0 or dz0 is not None:
                g_next = dz0 if j == 0 else rows.new_empty(n, dim)
                torch.addmm(g, dt, down_proj[j], out=g_next)  # dz_j = g + dt V_j
                g = g_next


_FORWARD = {"triton": _triton_forward, "cuda": _native_forward, "cpu": _native_forward}
_BACKWARD = {"triton": _triton_backward, "cuda": _native_backward, "cpu": _native_backward}
