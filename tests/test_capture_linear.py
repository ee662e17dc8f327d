"""capture_linear against a float64 oracle on every backend that runs here: y = x W_lin^T + b, and a
backward that gives dx = dy W_lin, writes delta_out = float32(dy) and forms no weight gradient."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.pytorch_utils import Conv1D

import mend_kernels as mk
from mend_kernels.errors import InvalidInputError
from mend_kernels.ops import CAPTURE_LINEAR, backend_status
from mend_kernels.ops._dispatch import _runs_on

BACKENDS = [b for b in CAPTURE_LINEAR.backends if backend_status(b).available and _runs_on(b, torch.device("cpu"))]

# Relative tolerance of y and dx (fp32 accumulation, one rounding in the dtype).
TOL = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


def make_inputs(lead, n_in, n_out, layout, bias, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, n_in, generator=g).to(dtype)
    weight = torch.randn((n_out, n_in) if layout == "linear" else (n_in, n_out), generator=g).to(dtype)
    b = torch.randn(n_out, generator=g).to(dtype) if bias else None
    grad = torch.randn(*lead, n_out, generator=g).to(dtype)
    return x, weight, b, grad


def unwritten_buffer(rows, n_out):
    """A delta_out whose every entry the backward must overwrite."""
    return torch.full((rows, n_out), math.nan)


def w_lin(weight, layout):
    return (weight if layout == "linear" else weight.t()).double()


def oracle(x, weight, bias, grad, layout):
    """(y, dx) in float64."""
    y = x.double() @ w_lin(weight, layout).t()
    return (y if bias is None else y + bias.double()), grad.double() @ w_lin(weight, layout)


def assert_close(actual, expected, rtol, name):
    bound = rtol * (expected.abs().max() + 1) if expected.numel() else 0.0
    err = (actual.double() - expected).abs().max() if expected.numel() else 0.0
    assert err <= bound, f"{name}: max error {float(err):.3g} > {float(bound):.3g}"


def run(x, weight, bias, grad, layout, backend, *, x_needs_grad=True):
    """(y, dx or None, delta_out) after one forward and backward through capture_linear."""
    n_out = grad.shape[-1]
    delta = unwritten_buffer(math.prod(x.shape[:-1]), n_out)
    leaf = x.detach().requires_grad_(x_needs_grad)
    anchor = None if x_needs_grad else torch.empty(0, requires_grad=True)
    y = mk.ops.capture_linear(leaf, weight, bias, delta, layout=layout, anchor=anchor, backend=backend)
    y.backward(grad)
    assert anchor is None or anchor.grad is None
    return y.detach(), leaf.grad, delta


SHAPES = [  # (lead, in, out); rows from 1 to 201, in up to 130 (three column tiles of dx in Triton)
    ((1,), 1, 1),
    ((5,), 1, 7),
    ((2, 3), 7, 5),
    ((3, 67), 33, 40),
    ((13,), 100, 1),
    ((2, 1, 3), 16, 70),
    ((9,), 130, 24),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead, n_in, n_out", SHAPES)
def test_forward_and_backward_match_float64(backend, layout, bias, lead, n_in, n_out):
    x, weight, b, grad = make_inputs(lead, n_in, n_out, layout, bias)
    y, dx, delta = run(x, weight, b, grad, layout, backend)
    want_y, want_dx = oracle(x, weight, b, grad, layout)
    assert y.shape == (*lead, n_out) and y.dtype == x.dtype
    assert dx.shape == x.shape and dx.dtype == x.dtype
    assert_close(y, want_y, TOL[torch.float32], "y")
    assert_close(dx, want_dx, TOL[torch.float32], "dx")
    assert torch.equal(delta, grad.reshape(-1, n_out))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead, n_in, n_out", [((0, 3), 7, 5), ((4,), 0, 3), ((4,), 3, 0)])
def test_empty_rows_and_features(backend, lead, n_in, n_out):
    x, weight, b, grad = make_inputs(lead, n_in, n_out, "conv1d", True)
    y, dx, delta = run(x, weight, b, grad, "conv1d", backend)
    want_y, want_dx = oracle(x, weight, b, grad, "conv1d")
    assert y.shape == want_y.shape and dx.shape == x.shape
    assert torch.equal(y.double(), want_y) and torch.equal(dx.double(), want_dx)  # y = b, dx = 0
    assert torch.equal(delta, grad.reshape(delta.shape))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_input_without_gradient_records_delta_through_the_anchor(backend, layout):
    x, weight, b, grad = make_inputs((3, 67), 130, 24, layout, True)
    y, dx, delta = run(x, weight, b, grad, layout, backend, x_needs_grad=False)
    assert dx is None
    assert_close(y, oracle(x, weight, b, grad, layout)[0], TOL[torch.float32], "y")
    assert torch.equal(delta, grad.reshape(-1, 24))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
@pytest.mark.parametrize("lead, n_in, n_out", [((3, 67), 33, 40), ((5,), 7, 5), ((9,), 130, 24)])
def test_low_precision(backend, dtype, layout, lead, n_in, n_out):
    x, weight, b, grad = make_inputs(lead, n_in, n_out, layout, True, dtype)
    y, dx, delta = run(x, weight, b, grad, layout, backend)
    want_y, want_dx = oracle(x, weight, b, grad, layout)
    assert y.dtype == dtype and dx.dtype == dtype and delta.dtype == torch.float32
    assert_close(y, want_y, TOL[dtype], f"y {dtype}")
    assert_close(dx, want_dx, TOL[dtype], f"dx {dtype}")
    assert torch.equal(delta, grad.reshape(-1, n_out).float())  # exact: delta is dy, widened


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_and_frozen_weight(backend):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 5, 2, generator=g)[:, :, 0].t().requires_grad_()  # (5, 7), strided
    weight = torch.randn(7, 9, generator=g).t().requires_grad_()  # (9, 7) transposed view, linear layout
    bias = torch.randn(9, 2, generator=g)[:, 1].requires_grad_()  # stride 2
    delta, ones = unwritten_buffer(5, 9), torch.ones(5, 9)
    y = mk.ops.capture_linear(x, weight, bias, delta, backend=backend)
    want_y, want_dx = oracle(x.detach(), weight.detach(), bias.detach(), ones, "linear")
    assert_close(y.detach(), want_y, 1e-5, "y")
    y.sum().backward()  # an expanded (stride 0) gradient
    assert torch.equal(delta, ones)
    assert_close(x.grad, want_dx, 1e-5, "dx")
    assert weight.grad is None and bias.grad is None  # frozen although they require grad


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("x_needs_grad", [True, False])
def test_backward_forms_no_weight_gradient(backend, x_needs_grad):
    """One GEMM (dx) in the backward, none without dx: dL/dW, another GEMM, is never formed."""
    x, weight, b, grad = make_inputs((6,), 8, 5, "linear", True)
    x.requires_grad_(x_needs_grad)
    weight.requires_grad_()
    anchor = None if x_needs_grad else torch.empty(0, requires_grad=True)
    y = mk.ops.capture_linear(x, weight, b, unwritten_buffer(6, 5), anchor=anchor, backend=backend)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        y.backward(grad)
    gemms = [e.name for e in profile.events() if e.name in ("aten::mm", "aten::addmm", "aten::bmm")]
    assert len(gemms) == (1 if x_needs_grad else 0), gemms
    assert weight.grad is None


@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_cpu_backend_computes_what_the_module_computes(layout):
    """y and dx bit for bit as nn.Linear / Conv1D and their autograd give them: capture changes no number."""
    if "cpu" not in BACKENDS:
        pytest.skip("cpu backend not built")
    x, weight, b, grad = make_inputs((3, 67), 33, 40, layout, True)
    module = torch.nn.Linear(33, 40) if layout == "linear" else Conv1D(40, 33)
    with torch.no_grad():
        module.weight.copy_(weight)
        module.bias.copy_(b)
    leaf = x.clone().requires_grad_()
    module_y = module(leaf)
    (module_dx,) = torch.autograd.grad(module_y, leaf, grad)
    y, dx, _ = run(x, weight, b, grad, layout, "cpu")
    assert torch.equal(y, module_y) and torch.equal(dx, module_dx)


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_backward_overwrites_delta(backend):
    x, weight, b, grad = make_inputs((4,), 7, 5, "conv1d", True)
    delta = unwritten_buffer(4, 5)
    y = mk.ops.capture_linear(x.requires_grad_(), weight, b, delta, layout="conv1d", backend=backend)
    y.backward(grad, retain_graph=True)
    y.backward(2 * grad)
    assert torch.equal(delta, 2 * grad)


def test_no_grad_leaves_delta_untouched():
    x, weight, b, _ = make_inputs((4,), 7, 5, "linear", True)
    delta = unwritten_buffer(4, 5)
    with torch.no_grad():
        y = mk.ops.capture_linear(x, weight, b, delta, anchor=torch.empty(0, requires_grad=True))
    assert not y.requires_grad and bool(delta.isnan().all())


@pytest.mark.filterwarnings("ignore:Input #:UserWarning")
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_reference_gradcheck_float32(layout):
    x, weight, b, _ = make_inputs((2, 3), 5, 4, layout, True)
    delta = torch.empty(6, 4)

    def fn(x):
        return mk.ops.capture_linear(x, weight, b, delta, layout=layout, backend="reference")

    assert torch.autograd.gradcheck(fn, (x.requires_grad_(),), eps=1e-2, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ops_pass_opcheck(backend):
    for layout in ("linear", "conv1d"):
        x, weight, b, grad = make_inputs((2, 3), 7, 5, layout, True)
        delta = torch.empty(6, 5)
        anchor = torch.empty(0, requires_grad=True)
        forward = torch.ops.mend.capture_linear
        torch.library.opcheck(forward, (x.requires_grad_(), weight, b, delta, None, layout, backend))
        torch.library.opcheck(forward, (x.detach(), weight, None, delta, anchor, layout, backend))
        for compute_dx in (True, False):
            args = (grad, weight, delta, layout, backend, compute_dx)
            torch.library.opcheck(torch.ops.mend.capture_linear_backward, args)


@pytest.mark.parametrize("backend", [b for b in ("reference", "cpu") if b in BACKENDS])
def test_works_under_torch_compile(backend):
    def loss(x, weight, bias, delta, anchor):
        y = mk.ops.capture_linear(x, weight, bias, delta, layout="conv1d", anchor=anchor, backend=backend)
        return y.square().sum()

    compiled = torch.compile(loss, fullgraph=True)  # the custom ops and the backend choice trace without breaks
    x, weight, b, _ = make_inputs((2, 3), 7, 5, "conv1d", True)
    y = x @ weight + b
    for x_needs_grad in (True, False):
        leaf, delta = x.clone().requires_grad_(x_needs_grad), unwritten_buffer(6, 5)
        anchor = None if x_needs_grad else torch.empty(0, requires_grad=True)
        compiled(leaf, weight, b, delta, anchor).backward()
        torch.testing.assert_close(delta, 2 * y.reshape(6, 5))
        if x_needs_grad:
            torch.testing.assert_close(leaf.grad, 2 * y @ weight.t())


@settings(max_examples=25, deadline=None)
@given(
    lead=st.lists(st.integers(1, 14), min_size=1, max_size=2),
    n_in=st.integers(1, 80),
    n_out=st.integers(1, 80),
    layout=st.sampled_from(["linear", "conv1d"]),
    bias=st.booleans(),
    x_needs_grad=st.booleans(),
    backend=st.sampled_from(BACKENDS),
    seed=st.integers(0, 2 ** 16),
)
def test_property_random_shapes(lead, n_in, n_out, layout, bias, x_needs_grad, backend, seed):
    x, weight, b, grad = make_inputs(tuple(lead), n_in, n_out, layout, bias, seed=seed)
    y, dx, delta = run(x, weight, b, grad, layout, backend, x_needs_grad=x_needs_grad)
    want_y, want_dx = oracle(x, weight, b, grad, layout)
    assert_close(y, want_y, TOL[torch.float32], "y")
    assert (dx is None) != x_needs_grad
    if x_needs_grad:
        assert_close(dx, want_dx, TOL[torch.float32], "dx")
    assert torch.equal(delta, grad.reshape(-1, n_out))


def test_reference_runs_on_meta_tensors():
    x = torch.empty(2, 3, 6, device="meta", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.empty(6, 4, device="meta", dtype=torch.bfloat16)  # conv1d (in, out)
    delta = torch.empty(6, 4, device="meta")
    y = mk.ops.capture_linear(x, weight, None, delta, layout="conv1d", backend="reference")
    assert y.shape == (2, 3, 4) and y.dtype == torch.bfloat16 and y.is_meta
    (dx,) = torch.autograd.grad(y, x, torch.empty_like(y))
    assert dx.shape == x.shape and dx.is_meta


def _args(**changes):
    x, weight, b, _ = make_inputs((2, 3), 7, 5, "linear", True)
    args = dict(x=x, weight=weight, bias=b, delta_out=torch.empty(6, 5), anchor=None, layout="linear")
    args.update(changes)
    return args


ARGUMENT_ERRORS = [
    (dict(x=torch.randn(2, 3, 6)), "x must have shape"),
    (dict(x=torch.randn(2, 3, 7, dtype=torch.float64)), "x must have dtype"),
    (dict(x=torch.tensor(1.0)), "x must have at least 1 dimension"),
    (dict(weight=torch.randn(5, 7).half()), "weight must have x's dtype"),
    (dict(weight=torch.randn(5, 7, 1)), "weight must be 2-D"),
    (dict(bias=torch.zeros(3)), "bias must have shape"),
    (dict(bias=torch.zeros(5).half()), "bias must have x's dtype"),
    (dict(delta_out=torch.empty(5, 5)), "delta_out must have shape"),
    (dict(delta_out=torch.empty(6, 5).half()), "delta_out must have dtype"),
    (dict(delta_out=torch.empty(5, 6).t()), "delta_out must be contiguous"),
    (dict(delta_out=torch.empty(6, 5, device="meta")), "delta_out is on meta"),
    (dict(anchor=torch.empty(1, requires_grad=True)), "anchor must have shape"),
    (dict(layout="transposed"), "layout must be one of"),
]


@pytest.mark.parametrize("changes, message", ARGUMENT_ERRORS)
def test_argument_errors_name_the_argument(changes, message):
    args = _args(**changes)
    layout, anchor = args.pop("layout"), args.pop("anchor")
    with pytest.raises(InvalidInputError, match=message):
        mk.ops.capture_linear(*args.values(), layout=layout, anchor=anchor, backend="reference")


# (a meta delta_out is left out: with a meta argument the dispatcher runs the fake kernel)
@pytest.mark.parametrize("changes, message", [case for case in ARGUMENT_ERRORS if "meta" not in case[1]])
def test_direct_op_call_checks_its_arguments(changes, message):
    args = _args(**changes)
    with pytest.raises(InvalidInputError, match=message):
        torch.ops.mend.capture_linear(*args.values(), "reference")


def test_anchor_must_require_grad():
    with pytest.raises(InvalidInputError, match="anchor must require grad"):
        mk.ops.capture_linear(**_args(anchor=torch.empty(0)), backend="reference")


@pytest.mark.parametrize(
    "grad, delta_out, message",
    [
        (torch.randn(2, 3, 4), torch.empty(6, 5), "grad must have shape"),
        (torch.randn(2, 3, 5).double(), torch.empty(6, 5), "grad must have dtype"),
        (torch.randn(2, 3, 5), torch.empty(6, 4), "delta_out must have shape"),
    ],
)
def test_backward_op_checks_its_arguments(grad, delta_out, message):
    with pytest.raises(InvalidInputError, match=message):
        torch.ops.mend.capture_linear_backward(grad, torch.randn(5, 7), delta_out, "linear", "reference", True)
