"""editor_mlp's compiled backends (triton, cpu, cuda) against the PyTorch reference and a float64 oracle.

On a GPU machine the tests run on CUDA tensors (triton, cuda); without one on CPU tensors (cpu, and
triton in its interpreter: tests/conftest.py sets TRITON_INTERPRET=1 there).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mend_kernels as mk
from mend_kernels.editor import ShapeGroupEditor
from mend_kernels.errors import BackendUnavailableError, InvalidInputError
from mend_kernels.ops import EDITOR_MLP, backend_status
from mend_kernels.ops._dispatch import _runs_on
from mend_kernels.ops.editor_mlp import _editor_mlp_reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
COMPILED = [b for b in EDITOR_MLP.backends if b != "reference" and backend_status(b).available and _runs_on(b, DEVICE)]
pytestmark = pytest.mark.skipif(not COMPILED, reason="no compiled editor_mlp backend runs here")
by_backend = pytest.mark.parametrize("backend", COMPILED)

PARAMS = ("down_proj", "up_proj", "bias", "scale", "shift")
EPS = 1e-7


def make_inputs(n, dim, rank, n_layers, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, dim, generator=g) * 2 + 0.5
    mean = torch.randn(dim, generator=g) * 0.3
    std = torch.rand(dim, generator=g) + 0.5
    params = (
        torch.randn(n_layers, rank, dim, generator=g) / dim ** 0.5,
        torch.randn(n_layers, dim, rank, generator=g) / rank ** 0.5,
        torch.randn(n_layers, dim, generator=g) * 0.5,
        torch.randn(n_layers, dim, generator=g) + 1.0,
        torch.randn(n_layers, dim, generator=g) * 0.5,
    )
    return rows.to(DEVICE), mean.to(DEVICE), std.to(DEVICE), tuple(p.to(DEVICE) for p in params)


def run(backend, rows, mean, std, params, grad, dtype=torch.float32, eps=EPS):
    """(output, gradients of the five parameters) for one backend."""
    leaves = [p.detach().to(DEVICE, dtype).requires_grad_() for p in params]
    out = mk.ops.editor_mlp(rows.to(dtype), mean.to(dtype), std.to(dtype), *leaves, eps, backend=backend)
    out.backward(grad.to(dtype))
    return out.detach(), [leaf.grad for leaf in leaves]


def assert_close(actual, expected, rtol):
    scale = expected.abs().max().item() + 1.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=0, atol=rtol * scale)


CASES = list(itertools.product((1, 2), (1, 5, 37), (3, 20, 40), (1, 7, 16)))


@pytest.mark.parametrize("n_layers, n, dim, rank", CASES)
@by_backend
def test_forward_and_parameter_gradients_match_reference(backend, n_layers, n, dim, rank):
    rows, mean, std, params = make_inputs(n, dim, rank, n_layers, seed=n * 1000 + dim * 10 + rank)
    grad = torch.randn(n, dim, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out, grads = run(backend, rows, mean, std, params, grad)
    ref_out, ref_grads = run("reference", rows, mean, std, params, grad)
    oracle_out, oracle_grads = run("reference", rows, mean, std, params, grad, dtype=torch.float64)
    assert out.dtype == torch.float32 and out.shape == (n, dim)
    assert_close(out, ref_out, 1e-5)
    assert_close(out, oracle_out, 1e-5)
    for name, got, ref, oracle in zip(PARAMS, grads, ref_grads, oracle_grads):
        assert got.shape == ref.shape, name
        assert_close(got, ref, 1e-5)
        assert_close(got, oracle, 1e-5)


@settings(max_examples=10, deadline=None)
@given(n_layers=st.integers(1, 3), n=st.integers(1, 40), dim=st.integers(1, 70), rank=st.integers(1, 20))
def test_property_every_backend_matches_float64(n_layers, n, dim, rank):
    rows, mean, std, params = make_inputs(n, dim, rank, n_layers, seed=n + dim + rank)
    grad = torch.randn(n, dim, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    oracle_out, oracle_grads = run("reference", rows, mean, std, params, grad, dtype=torch.float64)
    for backend in COMPILED:
        out, grads = run(backend, rows, mean, std, params, grad)
        assert_close(out, oracle_out, 1e-5)
        for got, oracle in zip(grads, oracle_grads):
            assert_close(got, oracle, 1e-5)


@pytest.mark.parametrize("n_layers", (1, 2))
@by_backend
def test_identity_init_zero_pre_activations_pass_the_gradient(backend, n_layers):
    # up_proj = 0, bias = 0, shift = 0: every pre-activation is exactly 0 and clamp(min=0) passes the
    # gradient there (torch.clamp's convention), unlike relu.
    n, dim, rank = 5, 20, 7
    rows, mean, std, (down, _, _, _, _) = make_inputs(n, dim, rank, n_layers)
    params = (down, torch.zeros(n_layers, dim, rank), torch.zeros(n_layers, dim), torch.ones(n_layers, dim),
              torch.zeros(n_layers, dim))
    grad = torch.randn(n, dim, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    out, grads = run(backend, rows, mean, std, params, grad)
    ref_out, ref_grads = run("reference", rows, mean, std, params, grad)
    torch.testing.assert_close(out, (rows - mean) / (std + EPS), rtol=0, atol=0)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    for name, got, ref in zip(PARAMS, grads, ref_grads):
        assert_close(got, ref, 1e-5)
    # The gradient passes: d shift = column sums of the incoming gradient (in every layer), nonzero d up_proj.
    assert_close(grads[4], grad.sum(0).expand(n_layers, dim), 1e-5)
    assert grads[1].abs().sum() > 0


@by_backend
def test_mixed_exact_zero_negative_and_positive_pre_activations(backend):
    # up_proj = 0 so a = bias; shift picks h = a*scale + shift exactly 0, negative or positive per column.
    n, dim, rank, n_layers = 5, 21, 4, 2
    rows, mean, std, (down, _, bias, _, _) = make_inputs(n, dim, rank, n_layers)
    scale = torch.ones(n_layers, dim, device=DEVICE)
    offset = torch.tensor([0.0, -1.0, 1.0], device=DEVICE).repeat(dim // 3).expand(n_layers, dim)
    shift = -bias + offset
    params = (down, torch.zeros(n_layers, dim, rank), bias, scale, shift)
    grad = torch.randn(n, dim, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    out, grads = run(backend, rows, mean, std, params, grad)
    ref_out, ref_grads = run("reference", rows, mean, std, params, grad)
    assert_close(out, ref_out, 1e-6)
    for got, ref in zip(grads, ref_grads):
        assert_close(got, ref, 1e-5)
    passed = (grads[4][1] != 0).reshape(-1, 3)  # last layer: exact-0 and positive columns pass
    assert passed[:, 0].all() and not passed[:, 1].any() and passed[:, 2].all()


@by_backend
def test_input_gradients_and_strided_views(backend):
    # Editor-style call: scale/shift are (L, n_modes, D)[:, mode] views; rows non-contiguous; gradients
    # w.r.t. rows, mean and std too (the contract is differentiable in all inputs).
    n, dim, rank, n_layers = 6, 18, 5, 2
    rows, mean, std, (down, up, bias, scale, shift) = make_inputs(n, dim, rank, n_layers)
    mode_scale = torch.stack([scale, scale * 0.5, -scale], dim=1)
    mode_shift = torch.stack([shift, shift + 1, shift - 1], dim=1)
    rows_t = rows.t().contiguous().t()
    grad = torch.randn(n, dim, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    results = {}
    for name in (backend, "reference"):
        leaves = [t.clone().requires_grad_() for t in (rows_t, mean, std, down, up, bias, mode_scale, mode_shift)]
        r, m, s, d, u, b, ms, mo = leaves
        out = mk.ops.editor_mlp(r, m, s, d, u, b, ms[:, 1], mo[:, 1], EPS, backend=name)
        out.backward(grad)
        results[name] = (out.detach(), [leaf.grad for leaf in leaves])
    out, grads = results[backend]
    ref_out, ref_grads = results["reference"]
    assert_close(out, ref_out, 1e-5)
    for got, ref in zip(grads, ref_grads):
        assert_close(got, ref, 1e-5)
    assert grads[6][:, 0].abs().sum() == 0 and grads[6][:, 1].abs().sum() > 0


@by_backend
def test_frozen_parameters_and_empty_rows(backend):
    rows, mean, std, params = make_inputs(4, 10, 3, 2)
    # Only some inputs need a gradient.
    up = params[1].clone().requires_grad_()
    out = mk.ops.editor_mlp(rows, mean, std, params[0], up, *params[2:], EPS, backend=backend)
    out.sum().backward()
    ref_up = params[1].clone().requires_grad_()
    _editor_mlp_reference(rows, mean, std, params[0], ref_up, *params[2:], EPS).sum().backward()
    assert_close(up.grad, ref_up.grad, 1e-5)
    # No rows: an empty output and zero gradients.
    leaves = [p.clone().requires_grad_() for p in params]
    out = mk.ops.editor_mlp(rows[:0], mean, std, *leaves, EPS, backend=backend)
    assert out.shape == (0, 10)
    out.sum().backward()
    assert all(leaf.grad is not None and leaf.grad.abs().sum() == 0 for leaf in leaves)


def test_reference_gradcheck_float64():
    # The oracle itself: every input, float64 (the reference is dtype-generic).
    rows, mean, std, params = make_inputs(3, 6, 2, 2)
    inputs = [t.detach().cpu().double().requires_grad_() for t in (rows, mean, std, *params)]
    assert torch.autograd.gradcheck(lambda *a: _editor_mlp_reference(*a, EPS), inputs)


@by_backend
def test_statistics_updated_before_the_backward(backend):
    # Meta-training with several edits normalises edit 1, updates the running statistics with edit 2's
    # rows, then runs one backward: the gradient must use the statistics the forward saw.
    rows, mean, std, params = make_inputs(4, 10, 3, 2)
    grads = {}
    for name in (backend, "reference"):
        leaves = [p.clone().requires_grad_() for p in params]
        mean_buffer, std_buffer = mean.clone(), std.clone()
        out = mk.ops.editor_mlp(rows, mean_buffer, std_buffer, *leaves, EPS, backend=name)
        mean_buffer.add_(1.0), std_buffer.mul_(2.0)
        out.sum().backward()
        grads[name] = [leaf.grad for leaf in leaves]
    for got, ref in zip(grads[backend], grads["reference"]):
        assert_close(got, ref, 1e-5)


@by_backend
def test_custom_ops_pass_opcheck(backend):
    n, dim, rank, n_layers = 5, 20, 7, 2
    rows, mean, std, params = make_inputs(n, dim, rank, n_layers)
    leaves = [p.clone().requires_grad_() for p in params]
    torch.library.opcheck(torch.ops.mend.editor_mlp, (rows, mean, std, *leaves, EPS, backend))
    torch.library.opcheck(torch.ops.mend.editor_mlp, (rows.requires_grad_(), mean, std, *leaves, EPS, backend))
    with torch.no_grad():
        _, inner, ts, pres = torch.ops.mend.editor_mlp(rows, mean, std, *params, EPS, backend)
    grad = torch.randn(n, dim, device=DEVICE)
    down, up, _, scale, shift = params
    for compute_dz0 in (True, False):
        args = (grad, rows.detach(), mean, std, down, up, scale, shift, EPS, inner, ts, pres, compute_dz0, backend)
        torch.library.opcheck(torch.ops.mend.editor_mlp_backward, args)


def test_custom_op_rejects_bad_arguments():
    rows, mean, std, params = make_inputs(3, 8, 2, 1)
    with pytest.raises(InvalidInputError, match="up_proj"):
        torch.ops.mend.editor_mlp(rows, mean, std, params[0], params[1][:, :, :1], *params[2:], EPS, "cpu")
    with pytest.raises(InvalidInputError, match="rows"):
        torch.ops.mend.editor_mlp(rows.double(), mean, std, *params, EPS, "cpu")
    with pytest.raises(InvalidInputError, match="backends"):
        torch.ops.mend.editor_mlp(rows, mean, std, *params, EPS, "reference")


def test_backend_selection(monkeypatch):
    assert EDITOR_MLP.backends == ("triton", "cuda", "cpu", "reference")
    monkeypatch.delenv(mk.ops.ENV_VAR, raising=False)
    default = "triton" if DEVICE.type == "cuda" else "cpu"  # the interpreter is never a default
    assert EDITOR_MLP.select(DEVICE)[0] == default
    assert EDITOR_MLP.select(DEVICE, "triton")[0] == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET|cannot run on cpu"):
        EDITOR_MLP.select(torch.device("cpu"), "triton")


@by_backend
def test_editor_forward_through_the_environment_backend(backend, monkeypatch):
    # ShapeGroupEditor.forward calls ops.editor_mlp unchanged; MEND_KERNELS_BACKEND routes it to a backend.
    torch.manual_seed(0)
    editor = ShapeGroupEditor(n_in=6, n_out=5, n_modes=2, rank=4, n_layers=2).to(DEVICE)
    with torch.no_grad():
        editor.up_proj.normal_()
        editor.bias.normal_()
    rows = torch.randn(7, 11, device=DEVICE)
    editor.eval()
    editor.update_statistics(rows)
    results = {}
    for name in (backend, "reference"):
        monkeypatch.setenv(mk.ops.ENV_VAR, name)
        editor.zero_grad()
        out = editor(rows, mode=1, eps=EPS)
        out.square().sum().backward()
        results[name] = (out.detach(), [p.grad.clone() for p in editor.parameters()])
    assert_close(results[backend][0], results["reference"][0], 1e-5)
    for got, ref in zip(results[backend][1], results["reference"][1]):
        assert_close(got, ref, 1e-5)
