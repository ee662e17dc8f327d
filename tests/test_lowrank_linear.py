"""lowrank_linear against a float64 dense oracle (W + scale * D^T U), on every backend that runs here."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mend_kernels as mk
from mend_kernels.errors import InvalidInputError
from mend_kernels.ops import LOWRANK_LINEAR, backend_status
from mend_kernels.ops._dispatch import _runs_on


def cpu_backends(op) -> list[str]:
    return [b for b in op.backends if backend_status(b).available and _runs_on(b, torch.device("cpu"))]


BACKENDS = cpu_backends(LOWRANK_LINEAR)

# Relative tolerance of the output (one rounding in the dtype plus fp32 accumulation).
TOL = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


def make_inputs(lead, n_in, n_out, k, layout, bias, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, n_in, generator=g).to(dtype)
    shape = (n_out, n_in) if layout == "linear" else (n_in, n_out)
    weight = torch.randn(shape, generator=g).to(dtype)
    b = torch.randn(n_out, generator=g).to(dtype) if bias else None
    u = torch.randn(k, n_in, generator=g)
    delta = torch.randn(k, n_out, generator=g)
    scale = torch.tensor(-0.7)
    return x, weight, b, u, delta, scale


def dense_oracle(x, weight, bias, u, delta, scale, layout):
    """float64, with the dense edited weight W' = W + scale * D^T U (oracle only)."""
    w_lin = weight.double() if layout == "linear" else weight.double().t()
    edited = w_lin + scale.double() * (delta.double().t() @ u.double())
    y = x.double() @ edited.t()
    return y if bias is None else y + bias.double()


def assert_close(actual, expected, rtol, name):
    bound = rtol * (expected.abs().max() + 1)
    err = (actual.double() - expected).abs().max() if expected.numel() else 0.0
    assert err <= bound, f"{name}: max error {float(err):.3g} > {float(bound):.3g}"


SHAPES = [  # (lead, in, out, k)
    ((5,), 1, 1, 1),
    ((2, 3), 7, 5, 3),
    ((5,), 33, 40, 17),
    ((2, 3), 33, 1, 1),
    ((1,), 1, 40, 3),
    ((2, 3), 7, 40, 17),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead, n_in, n_out, k", SHAPES)
def test_forward_and_backward_match_float64(backend, layout, bias, lead, n_in, n_out, k):
    x, weight, b, u, delta, scale = make_inputs(lead, n_in, n_out, k, layout, bias)
    leaves = [t.clone().requires_grad_() for t in (x, u, delta, scale)]
    y = mk.ops.lowrank_linear(leaves[0], weight, b, *leaves[1:], layout=layout, backend=backend)
    assert y.shape == (*lead, n_out) and y.dtype == x.dtype
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(y, leaves, grad)

    oracle_leaves = [t.double().requires_grad_() for t in (x, u, delta, scale)]
    ox, ou, od, os_ = oracle_leaves
    expected = dense_oracle(ox, weight, b, ou, od, os_, layout)
    want = torch.autograd.grad(expected, oracle_leaves, grad.double())

    assert_close(y, expected.detach(), 1e-5, "y")
    for name, g_got, g_want in zip(("dx", "du", "ddelta", "dscale"), got, want):
        assert g_got.shape == g_want.shape and g_got.dtype == torch.float32, name
        assert_close(g_got, g_want, 1e-5, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_low_precision_forward(backend, dtype, layout):
    for lead, n_in, n_out, k in [((2, 3), 33, 40, 17), ((5,), 7, 5, 3)]:
        x, weight, b, u, delta, scale = make_inputs(lead, n_in, n_out, k, layout, True, dtype)
        y = mk.ops.lowrank_linear(x, weight, b, u, delta, scale, layout=layout, backend=backend)
        assert y.dtype == dtype
        assert_close(y, dense_oracle(x, weight, b, u, delta, scale, layout), TOL[dtype], f"y {dtype}")


@settings(max_examples=10, deadline=None)
@given(
    lead=st.lists(st.integers(1, 6), min_size=1, max_size=2), n_in=st.integers(1, 50), n_out=st.integers(1, 50),
    k=st.integers(1, 20), layout=st.sampled_from(["linear", "conv1d"]), bias=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
def test_property_every_backend_matches_float64(lead, n_in, n_out, k, layout, bias, dtype):
    x, weight, b, u, delta, scale = make_inputs(tuple(lead), n_in, n_out, k, layout, bias, dtype)
    want = dense_oracle(x, weight, b, u, delta, scale, layout)
    for backend in BACKENDS:
        leaves = [x.clone().requires_grad_(), u.clone().requires_grad_()]
        y = mk.ops.lowrank_linear(leaves[0], weight, b, leaves[1], delta, scale, layout=layout, backend=backend)
        assert y.dtype == dtype
        assert_close(y, want, TOL[dtype], f"{backend} y")
        dx, du = torch.autograd.grad(y.float().sum(), leaves)
        xd, ud = x.double().requires_grad_(), u.double().requires_grad_()
        want_dx, want_du = torch.autograd.grad(dense_oracle(xd, weight, b, ud, delta, scale, layout).sum(), (xd, ud))
        assert_close(dx, want_dx, TOL[dtype], f"{backend} dx")
        assert_close(du, want_du, 4 * TOL[dtype], f"{backend} du")


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_backward_has_x_dtype(backend):
    x, weight, b, u, delta, scale = make_inputs((4,), 7, 5, 3, "linear", True, torch.float16)
    x.requires_grad_()
    u.requires_grad_()
    y = mk.ops.lowrank_linear(x, weight, b, u, delta, scale, backend=backend)
    dx, du = torch.autograd.grad(y.float().sum(), (x, u))
    assert dx.dtype == torch.float16 and du.dtype == torch.float32
    xd, ud = x.detach().double().requires_grad_(), u.double().requires_grad_()
    want = torch.autograd.grad(dense_oracle(xd, weight, b, ud, delta, scale, "linear").sum(), (xd, ud))
    assert_close(dx, want[0], TOL[torch.float16], "dx")
    assert_close(du, want[1], TOL[torch.float16], "du")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_and_frozen_weight(backend):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 5, 2, generator=g)[:, :, 0].t()  # (5, 7), strided
    rows = torch.randn(3, 7 + 9, generator=g)
    u, delta = rows[:, :7], rows[:, 7:]  # column slices, as the editor returns them
    weight = torch.randn(7, 9, generator=g).t().requires_grad_()  # (9, 7) transposed view; frozen
    bias = torch.randn(9, 2, generator=g)[:, 1].requires_grad_()  # stride 2
    scale = torch.tensor(0.25, requires_grad=True)
    y = mk.ops.lowrank_linear(x, weight, bias, u, delta, scale, backend=backend)
    assert_close(y, dense_oracle(x, weight.detach(), bias.detach(), u, delta, scale.detach(), "linear"), 1e-5, "y")
    y.sum().backward()
    assert weight.grad is None and bias.grad is None and scale.grad is not None


@pytest.mark.filterwarnings("ignore:Input #:UserWarning")
def test_reference_gradcheck_float32():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 5, generator=g, requires_grad=True)
    weight, bias = torch.randn(4, 5, generator=g), torch.randn(4, generator=g)
    u = torch.randn(2, 5, generator=g, requires_grad=True)
    delta = torch.randn(2, 4, generator=g, requires_grad=True)
    scale = torch.tensor(0.6, requires_grad=True)

    def fn(x, u, delta, scale):
        return mk.ops.lowrank_linear(x, weight, bias, u, delta, scale, backend="reference")

    assert torch.autograd.gradcheck(fn, (x, u, delta, scale), eps=1e-2, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_custom_ops_pass_opcheck(backend, layout):
    x, weight, b, u, delta, scale = make_inputs((2, 3), 7, 5, 3, layout, True)
    x.requires_grad_(), u.requires_grad_(), delta.requires_grad_(), scale.requires_grad_()
    torch.library.opcheck(torch.ops.mend.lowrank_linear, (x, weight, b, u, delta, scale, layout, backend))
    torch.library.opcheck(torch.ops.mend.lowrank_linear, (x, weight, None, u, delta, scale, layout, backend))
    grad = torch.randn(2, 3, 5)
    for compute_dx in (True, False):
        args = (grad, x.detach(), weight, u.detach(), delta.detach(), scale.detach(), layout, backend, compute_dx)
        torch.library.opcheck(torch.ops.mend.lowrank_linear_backward, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_input_and_empty_rows(backend):
    # The lowest edited layer's input needs no gradient (layers below run under no_grad).
    x, weight, b, u, delta, scale = make_inputs((4,), 7, 5, 3, "conv1d", True)
    u.requires_grad_()
    y = mk.ops.lowrank_linear(x, weight, b, u, delta, scale, layout="conv1d", backend=backend)
    (du,) = torch.autograd.grad(y.sum(), (u,))
    ud = u.double().requires_grad_()
    (want,) = torch.autograd.grad(dense_oracle(x, weight, b, ud, delta, scale, "conv1d").sum(), (ud,))
    assert_close(du, want, 1e-5, "du")
    leaves = [t.clone().requires_grad_() for t in (x[:0], u.detach(), delta, scale)]
    y = mk.ops.lowrank_linear(leaves[0], weight, b, *leaves[1:], layout="conv1d", backend=backend)
    assert y.shape == (0, 5)
    grads = torch.autograd.grad(y.sum(), leaves)
    assert grads[0].shape == (0, 7) and all(float(g.abs().sum()) == 0 for g in grads[1:])


def test_reference_runs_on_meta_tensors():
    x = torch.empty(2, 3, 6, device="meta", dtype=torch.bfloat16)
    weight = torch.empty(6, 4, device="meta", dtype=torch.bfloat16)  # conv1d (in, out)
    u, delta = torch.empty(2, 6, device="meta"), torch.empty(2, 4, device="meta")
    scale = torch.empty((), device="meta")
    y = mk.ops.lowrank_linear(x, weight, None, u, delta, scale, layout="conv1d", backend="reference")
    assert y.shape == (2, 3, 4) and y.dtype == torch.bfloat16 and y.is_meta


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(x=a["x"][..., :-1]), "x must have shape"),
        (lambda a: a.update(x=a["x"].double()), "x must have dtype"),
        (lambda a: a.update(weight=a["weight"].half()), "weight must have x's dtype"),
        (lambda a: a.update(bias=torch.zeros(3)), "bias must have shape"),
        (lambda a: a.update(u=a["u"].double()), "u must have dtype"),
        (lambda a: a.update(delta=a["delta"][:-1]), "delta must have shape"),
        (lambda a: a.update(scale=torch.tensor([0.5])), "scale must have shape"),
        (lambda a: a.update(scale=torch.tensor(0.5, dtype=torch.float64)), "scale must have dtype"),
        (lambda a: a.update(layout="transposed"), "layout must be one of"),
    ],
)
def test_argument_errors_name_the_argument(change, message):
    x, weight, b, u, delta, scale = make_inputs((2,), 7, 5, 3, "linear", True)
    args = dict(x=x, weight=weight, bias=b, u=u, delta=delta, scale=scale, layout="linear")
    change(args)
    layout = args.pop("layout")
    with pytest.raises(InvalidInputError, match=message):
        mk.ops.lowrank_linear(*args.values(), layout=layout, backend="reference")
