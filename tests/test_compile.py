"""The differentiable ops under torch.compile(fullgraph=True) on CPU, with the reference and cpu backends.

Backend choice and custom ops must trace without graph breaks, forward and backward, and give the
eager results.
"""

from __future__ import annotations

import pytest
import torch

import mend_kernels as mk
from mend_kernels.ops import backend_status

BACKENDS = [b for b in ("reference", "cpu") if backend_status(b).available]


def compiled_and_eager(fn, *inputs):
    """(output, gradients) of fn eagerly and compiled, each on fresh leaves of ``inputs``."""
    results = []
    for run in (fn, torch.compile(fn, fullgraph=True)):
        leaves = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
        out = run(*leaves)
        out.square().sum().backward()
        results.append((out.detach(), [leaf.grad for leaf in leaves if leaf.requires_grad]))
    return results


def assert_same(results):
    (eager_out, eager_grads), (compiled_out, compiled_grads) = results
    torch.testing.assert_close(compiled_out, eager_out)
    for compiled, eager in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("backend", BACKENDS)
def test_editor_mlp_compiles(backend):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    n, dim, rank, layers = 6, 12, 4, 2
    rows, mean, std = torch.randn(n, dim, generator=g), torch.randn(dim, generator=g), torch.rand(dim, generator=g) + 0.5
    params = [torch.randn(layers, rank, dim, generator=g), torch.randn(layers, dim, rank, generator=g)]
    params += [torch.randn(layers, dim, generator=g) for _ in range(3)]

    def editor(rows, mean, std, *params):
        return mk.ops.editor_mlp(rows, mean, std, *params, 1e-7, backend=backend)

    assert_same(compiled_and_eager(editor, rows, mean, std, *(p.requires_grad_() for p in params)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_lowrank_linear_compiles(backend, layout):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 5, generator=g)
    weight = torch.randn((4, 5) if layout == "linear" else (5, 4), generator=g)
    bias, u, delta = torch.randn(4, generator=g), torch.randn(2, 5, generator=g), torch.randn(2, 4, generator=g)

    def edited_layer(x, u, delta, scale):
        return mk.ops.lowrank_linear(x, weight, bias, u, delta, scale, layout=layout, backend=backend)

    inputs = (x.requires_grad_(), u.requires_grad_(), delta.requires_grad_(), torch.tensor(0.3, requires_grad=True))
    assert_same(compiled_and_eager(edited_layer, *inputs))
