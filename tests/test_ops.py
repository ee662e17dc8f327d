"""Ops against float64 oracles, on every backend that runs on this machine's CPU."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mend_kernels as mk
from mend_kernels.ops import RANK_UPDATE, RUNNING_MOMENTS, backend_status
from mend_kernels.ops._dispatch import _runs_on


def cpu_backends(op) -> list[str]:
    return [b for b in op.backends if backend_status(b).available and _runs_on(b, torch.device("cpu"))]


# Tolerance of one rounding of the result in the weight's dtype, relative to |W| + |update|.
ROUND = {torch.float32: 2e-6, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}


def expected_rank_update(weight, u, delta, scale, layout):
    update = scale * (delta.double().t() @ u.double())
    return weight.double() + (update if layout == "linear" else update.t())


def check_rank_update(backend, dtype, n_out, n_in, rows, layout, transposed=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shape = (n_out, n_in) if layout == "linear" else (n_in, n_out)
    base = torch.randn(shape[::-1] if transposed else shape, generator=generator)
    weight = (base.t() if transposed else base).to(dtype)
    u = torch.randn(rows, n_in, generator=generator)
    delta = torch.randn(rows, n_out, generator=generator)
    expected = expected_rank_update(weight, u, delta, -0.37, layout)
    result = mk.ops.rank_update_(weight, u, delta, -0.37, layout=layout, backend=backend)
    assert result is weight and weight.dtype == dtype
    bound = ROUND[dtype] * (expected.abs() + 1) + 1e-6 * rows
    assert ((weight.double() - expected).abs() <= bound).all()


@pytest.mark.parametrize("backend", cpu_backends(RANK_UPDATE))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
@pytest.mark.parametrize("n_out, n_in, rows", [(1, 1, 1), (7, 333, 5), (64, 48, 200), (129, 3, 17)])
def test_rank_update_matches_float64(backend, dtype, layout, n_out, n_in, rows):
    check_rank_update(backend, dtype, n_out, n_in, rows, layout)


@pytest.mark.parametrize("backend", cpu_backends(RANK_UPDATE))
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_rank_update_on_transposed_and_sliced_weights(backend, layout):
    check_rank_update(backend, torch.bfloat16, 37, 21, 9, layout, transposed=True)
    wide = torch.zeros(10, 40)
    view = wide[:, 5:25]  # row stride 40 > 20 columns
    u, delta = torch.randn(3, 20), torch.randn(3, 10)
    mk.ops.rank_update_(view, u, delta, 2.0, backend=backend)
    torch.testing.assert_close(view, 2.0 * delta.t() @ u)
    assert wide[:, :5].abs().sum() == 0 and wide[:, 25:].abs().sum() == 0


@pytest.mark.parametrize("backend", cpu_backends(RANK_UPDATE))
def test_rank_update_with_non_contiguous_factors(backend):
    # The editor returns u~ and delta~ as column slices of one (n, in + out) tensor.
    for trial in range(5):
        rows = torch.randn(16, 120, generator=torch.Generator().manual_seed(trial))
        u, delta = rows[:, :24], rows[:, 24:]
        weight = torch.randn(24, 96)
        expected = expected_rank_update(weight, u, delta, 1e-3, "conv1d")
        mk.ops.rank_update_(weight, u, delta, 1e-3, layout="conv1d", backend=backend)
        torch.testing.assert_close(weight.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", cpu_backends(RANK_UPDATE))
def test_rank_update_keeps_updates_that_bf16_addition_rounds_away(backend):
    weight = torch.full((4, 8), 1.0, dtype=torch.bfloat16)
    u, delta = torch.full((64, 8), 1.0), torch.full((64, 4), 1.0)
    step = 2 ** -10  # each row alone is below half an ulp of 1.0 in bf16; the sum (1/16) is not
    naive = weight.clone()
    for row in range(64):
        naive += (step * delta[row : row + 1].t() @ u[row : row + 1]).to(torch.bfloat16)
    assert torch.equal(naive, weight)  # row by row, bf16 loses every update
    mk.ops.rank_update_(weight, u, delta, step, backend=backend)
    assert torch.equal(weight, torch.full((4, 8), 1.0625, dtype=torch.bfloat16))


@settings(max_examples=25, deadline=None)
@given(
    n_out=st.integers(1, 70),
    n_in=st.integers(1, 70),
    rows=st.integers(1, 40),
    layout=st.sampled_from(["linear", "conv1d"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    transposed=st.booleans(),
)
def test_rank_update_property(n_out, n_in, rows, layout, dtype, transposed):
    for backend in cpu_backends(RANK_UPDATE):
        check_rank_update(backend, dtype, n_out, n_in, rows, layout, transposed)


def welford(batches):
    """The reference code's per-row loop, in float64."""
    mean = m2 = None
    count = 0
    for batch in batches:
        for row in batch.double():
            count += 1
            if mean is None:
                mean, m2 = row.clone(), torch.zeros_like(row)
                continue
            new_mean = mean + (row - mean) / count
            m2 = m2 + (row - mean) * (row - new_mean)
            mean = new_mean
    return mean, m2, count


@pytest.mark.parametrize("backend", cpu_backends(RUNNING_MOMENTS))
@pytest.mark.parametrize("dim, sizes", [(1, [1, 1]), (5, [1, 2, 3]), (333, [7, 200, 1]), (64, [50])])
def test_running_moments_matches_per_row_welford(backend, dim, sizes):
    generator = torch.Generator().manual_seed(dim)
    batches = [3.0 + 2.0 * torch.randn(n, dim, generator=generator) for n in sizes]
    mean, m2, count = torch.zeros(dim), torch.zeros(dim), torch.zeros((), dtype=torch.int64)
    for batch in batches:
        mk.ops.running_moments_(mean, m2, count, batch, backend=backend)
    expected_mean, expected_m2, expected_count = welford(batches)
    assert int(count) == expected_count and count.dtype == torch.int64
    torch.testing.assert_close(mean.double(), expected_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m2.double(), expected_m2, rtol=1e-4, atol=1e-4)


@settings(max_examples=15, deadline=None)
@given(dim=st.integers(1, 80), sizes=st.lists(st.integers(1, 60), min_size=1, max_size=4), offset=st.floats(-50, 50))
def test_running_moments_property(dim, sizes, offset):
    generator = torch.Generator().manual_seed(dim)
    batches = [offset + torch.randn(n, dim, generator=generator) for n in sizes]
    expected_mean, expected_m2, expected_count = welford(batches)
    for backend in cpu_backends(RUNNING_MOMENTS):
        mean, m2, count = torch.zeros(dim), torch.zeros(dim), torch.zeros((), dtype=torch.int64)
        for batch in batches:
            mk.ops.running_moments_(mean, m2, count, batch, backend=backend)
        assert int(count) == expected_count
        torch.testing.assert_close(mean.double(), expected_mean, rtol=1e-5, atol=1e-5 * (1 + abs(offset)))
        torch.testing.assert_close(m2.double(), expected_m2, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend", cpu_backends(RUNNING_MOMENTS))
def test_running_moments_first_batch_is_exact_and_rows_may_be_strided(backend):
    rows = torch.randn(9, 12)[:, ::2]  # column stride 2
    mean, m2, count = torch.zeros(6), torch.zeros(6), torch.zeros((), dtype=torch.int64)
    mk.ops.running_moments_(mean, m2, count, rows, backend=backend)
    torch.testing.assert_close(mean, rows.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m2, rows.var(0) * 8, rtol=1e-5, atol=1e-5)


def test_running_moments_count_is_64_bit_beyond_float32():
    mean, m2 = torch.zeros(2), torch.zeros(2)
    count = torch.tensor(2**24, dtype=torch.int64)  # float32 stops counting here
    mk.ops.running_moments_(mean, m2, count, torch.ones(1, 2), backend="reference")
    assert int(count) == 2**24 + 1


def test_custom_ops_pass_opcheck():
    weight, u, delta = torch.randn(5, 4), torch.randn(3, 4), torch.randn(3, 5)
    for backend in cpu_backends(RANK_UPDATE):
        torch.library.opcheck(torch.ops.mend.rank_update_, (weight.clone(), delta, u, 0.5, backend))
    for backend in cpu_backends(RUNNING_MOMENTS):
        args = (torch.zeros(4), torch.zeros(4), torch.zeros((), dtype=torch.int64), torch.randn(6, 4), backend)
        torch.library.opcheck(torch.ops.mend.running_moments_, args)


def test_reference_rank_update_runs_on_meta_tensors():
    weight = torch.empty(6, 4, device="meta", dtype=torch.bfloat16)
    u, delta = torch.empty(2, 4, device="meta"), torch.empty(2, 6, device="meta")
    assert mk.ops.rank_update_(weight, u, delta, 1.0).shape == (6, 4)


def test_backend_selection_explicit_environment_and_errors(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(mk.ops.ENV_VAR, raising=False)
    assert RANK_UPDATE.select(cpu)[0] == ("cpu" if backend_status("cpu").available else "reference")
    assert RANK_UPDATE.select(cpu, "reference")[0] == "reference"
    monkeypatch.setenv(mk.ops.ENV_VAR, "reference")
    assert RANK_UPDATE.select(cpu)[0] == "reference"
    monkeypatch.setenv(mk.ops.ENV_VAR, "fastest")
    with pytest.raises(mk.InvalidInputError, match="MEND_KERNELS_BACKEND"):
        RANK_UPDATE.select(cpu)
    monkeypatch.delenv(mk.ops.ENV_VAR)
    with pytest.raises(mk.BackendUnavailableError, match="cuda"):
        RANK_UPDATE.select(cpu, "cuda")
    reference_only = mk.ops.Op("reference_only")
    reference_only.register("reference")(lambda: None)
    with pytest.raises(mk.BackendUnavailableError, match="no 'cpu' implementation"):
        reference_only.select(cpu, "cpu")


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: mk.ops.rank_update_(torch.zeros(3, 2, dtype=torch.int32), torch.ones(1, 2), torch.ones(1, 3), 1.0), "weight"),
        (lambda: mk.ops.rank_update_(torch.zeros(3, 2), torch.ones(1, 3), torch.ones(1, 3), 1.0), "u must have shape"),
        (lambda: mk.ops.rank_update_(torch.zeros(3, 2), torch.ones(1, 2), torch.ones(2, 3), 1.0), "delta must have shape"),
        (lambda: mk.ops.rank_update_(torch.zeros(3, 2), torch.ones(0, 2), torch.ones(0, 3), 1.0), "at least 1 row"),
        (lambda: mk.ops.rank_update_(torch.zeros(3, 2), torch.ones(1, 2).double(), torch.ones(1, 3), 1.0), "u must have dtype"),
        (lambda: mk.ops.rank_update_(torch.zeros(3, 2), torch.ones(1, 2), torch.ones(1, 3), 1.0, layout="conv"), "layout"),
        (lambda: mk.ops.running_moments_(torch.zeros(3), torch.zeros(3), torch.zeros(()), torch.ones(2, 3)), "count"),
        (lambda: mk.ops.running_moments_(torch.zeros(3), torch.zeros(3), torch.zeros((), dtype=torch.int64), torch.ones(2, 4)), "rows"),
    ],
)
def test_ops_reject_bad_arguments(call, message):
    with pytest.raises(mk.InvalidInputError, match=message):
        call()


@pytest.mark.parametrize("backend", cpu_backends(RANK_UPDATE))
def test_weights_with_overlapping_rows_are_refused(backend):
    base = torch.zeros(20)
    weight = base[:4].expand(3, 4)  # row stride 0: every row is the same memory
    with pytest.raises(mk.InvalidInputError, match="overlapping"):
        mk.ops.rank_update_(weight, torch.ones(1, 4), torch.ones(1, 3), 1.0, backend=backend)
    assert base.abs().sum() == 0


@pytest.mark.parametrize("backend", cpu_backends(RUNNING_MOMENTS))
def test_running_moments_with_broadcast_rows_and_a_fresh_start(backend):
    rows = torch.arange(8.0).expand(5, 8)  # row stride 0
    mean, m2, count = torch.full((8,), float("nan")), torch.full((8,), 7.0), torch.zeros((), dtype=torch.int64)
    mk.ops.running_moments_(mean, m2, count, rows, backend=backend)  # count 0: old values are ignored
    torch.testing.assert_close(mean, torch.arange(8.0))
    torch.testing.assert_close(m2, torch.zeros(8))


@pytest.mark.parametrize("backend", cpu_backends(RANK_UPDATE))
def test_direct_op_calls_are_checked_before_any_kernel_runs(backend):
    weight = torch.zeros(64, 64)
    with pytest.raises(mk.InvalidInputError, match="a must have shape"):
        torch.ops.mend.rank_update_(weight, torch.ones(1, 8), torch.ones(1, 64), 1.0, backend)
    with pytest.raises(mk.InvalidInputError, match="no 'fastest' implementation"):
        torch.ops.mend.rank_update_(weight, torch.ones(1, 64), torch.ones(1, 64), 1.0, "fastest")
    assert weight.abs().sum() == 0


def test_environment_backend_applies_only_to_ops_that_implement_it(monkeypatch):
    reference_only = mk.ops.Op("reference_only")
    reference_only.register("reference")(lambda: None)
    monkeypatch.setenv(mk.ops.ENV_VAR, "reference")
    assert mk.ops.EDITOR_MLP.select(torch.device("cpu"))[0] == "reference"
    monkeypatch.setenv(mk.ops.ENV_VAR, "cpu")
    assert reference_only.select(torch.device("cpu"))[0] == "reference"
    if backend_status("cpu").available:
        assert RANK_UPDATE.select(torch.device("cpu"))[0] == "cpu"
        assert mk.ops.EDITOR_MLP.select(torch.device("cpu"))[0] == "cpu"


@pytest.mark.parametrize("backend", [b for b in ("reference", "cpu") if backend_status(b).available])
def test_ops_work_under_torch_compile(backend):
    def step(weight, u, delta, mean, m2, count, rows):
        mk.ops.running_moments_(mean, m2, count, rows, backend=backend)
        mk.ops.rank_update_(weight, u, delta, 0.5, backend=backend)
        return weight.sum()

    compiled = torch.compile(step, fullgraph=True)  # backend choice and custom ops trace without graph breaks
    weight, u, delta = torch.zeros(6, 4), torch.randn(3, 4), torch.randn(3, 6)
    mean, m2, count, rows = torch.zeros(5), torch.zeros(5), torch.zeros((), dtype=torch.int64), torch.randn(7, 5)
    total = compiled(weight, u, delta, mean, m2, count, rows)
    torch.testing.assert_close(weight, 0.5 * delta.t() @ u)
    torch.testing.assert_close(total, weight.sum())
    torch.testing.assert_close(mean, rows.mean(0))
    assert int(count) == 7
