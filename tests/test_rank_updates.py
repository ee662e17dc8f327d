"""rank_updates_: several weights of different shapes, dtypes and layouts in one call, on every CPU backend."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_ops import ROUND, cpu_backends, expected_rank_update

import mend_kernels as mk
from mend_kernels.ops import RANK_UPDATES, backend_status

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def make_case(n_out, n_in, rows, layout, dtype, transposed=False, seed=0):
    """(weight, u, delta) in ``layout``; a transposed weight is the .t() view of its transpose."""
    generator = torch.Generator().manual_seed(seed)
    shape = (n_out, n_in) if layout == "linear" else (n_in, n_out)
    base = torch.randn(shape[::-1] if transposed else shape, generator=generator)
    weight = (base.t() if transposed else base).to(dtype)
    return weight, torch.randn(rows, n_in, generator=generator), torch.randn(rows, n_out, generator=generator)


def sliced_case(dtype):
    """A (10, 20) view with row stride 40 into a zero tensor, and factors for it."""
    wide = torch.zeros(10, 40, dtype=dtype)
    return wide, wide[:, 5:25], torch.randn(3, 20), torch.randn(3, 10)


# Small grids: the Triton interpreter runs about 3 ms per 64 x 64 tile.
MIXED = [  # (n_out, n_in, rows, layout, dtype, transposed)
    (1, 1, 1, "linear", torch.float32, False),
    (37, 21, 9, "conv1d", torch.bfloat16, True),
    (5, 70, 17, "linear", torch.float16, False),
    (64, 3, 40, "conv1d", torch.float32, False),
    (3, 7, 2, "linear", torch.bfloat16, True),
]


def apply_and_check(backend, specs, scales):
    cases = [make_case(*spec, seed=i) for i, spec in enumerate(specs)]
    layouts = [spec[3] for spec in specs]
    expected = [expected_rank_update(w, u, d, s, layout) for (w, u, d), s, layout in zip(cases, scales, layouts)]
    weights = [w for w, _, _ in cases]
    result = mk.ops.rank_updates_(weights, [u for _, u, _ in cases], [d for _, _, d in cases], scales,
                                  layouts=layouts, backend=backend)
    assert all(r is w for r, w in zip(result, weights))
    for weight, want, spec in zip(weights, expected, specs):
        assert weight.dtype == spec[4]
        bound = ROUND[weight.dtype] * (want.abs() + 1) + 1e-6 * spec[2]
        assert ((weight.double() - want).abs() <= bound).all(), spec


@pytest.mark.parametrize("backend", cpu_backends(RANK_UPDATES))
def test_mixed_shapes_dtypes_and_layouts_match_float64(backend):
    apply_and_check(backend, MIXED, [-0.37, 0.5, 2.0, 1e-3, -1.0])


@pytest.mark.parametrize("backend", cpu_backends(RANK_UPDATES))
def test_sliced_weights_change_only_their_view(backend):
    (wide_a, view_a, u_a, d_a), (wide_b, view_b, u_b, d_b) = sliced_case(torch.float32), sliced_case(torch.bfloat16)
    mk.ops.rank_updates_([view_a, view_b], [u_a, u_b], [d_a, d_b], [2.0, 1.0], backend=backend)
    torch.testing.assert_close(view_a, 2.0 * d_a.t() @ u_a)
    torch.testing.assert_close(view_b.float(), d_b.t() @ u_b, rtol=ROUND[torch.bfloat16], atol=1e-2)
    for wide in (wide_a, wide_b):
        assert wide[:, :5].abs().sum() == 0 and wide[:, 25:].abs().sum() == 0


@pytest.mark.parametrize("backend", cpu_backends(RANK_UPDATES))
def test_batched_call_equals_one_call_per_weight_bit_for_bit(backend):
    # Large enough on the cpu backend to run in parallel and to cut weights into several row blocks.
    small = backend == "triton"
    specs = [(1, 1, 3, "linear", torch.float16, False), (3, 1000 if not small else 70, 16, "conv1d", torch.float16, False),
             (513 if not small else 65, 77, 16, "linear", torch.float32, True),
             (300 if not small else 30, 200 if not small else 66, 64, "conv1d", torch.bfloat16, False)]
    scales = [0.25, -1.5, 1e-2, 3.0]
    cases = [make_case(*spec, seed=i) for i, spec in enumerate(specs)]
    batched = [w.clone() for w, _, _ in cases]
    mk.ops.rank_updates_(batched, [u for _, u, _ in cases], [d for _, _, d in cases], scales,
                         layouts=[spec[3] for spec in specs], backend=backend)
    for (weight, u, delta), scale, spec, result in zip(cases, scales, specs, batched):
        mk.ops.rank_update_(weight, u, delta, scale, layout=spec[3], backend=backend)
        assert torch.equal(weight, result), spec


def test_one_layout_for_all_weights_and_an_empty_call():
    weights = [torch.zeros(3, 2), torch.zeros(4, 2)]
    mk.ops.rank_updates_(weights, [torch.ones(1, 2)] * 2, [torch.ones(1, 3), torch.ones(1, 4)], [1.0, 2.0])
    assert [w.sum().item() for w in weights] == [6.0, 16.0]
    assert mk.ops.rank_updates_([], [], [], []) == []


def bad_call(case: str):
    """(weights, us, deltas, scales, layouts) with one defect; expected error fragment."""
    weights = [torch.zeros(3, 2), torch.zeros(4, 5, dtype=torch.bfloat16), torch.zeros(6, 6)]
    us = [torch.ones(1, 2), torch.ones(2, 4), torch.ones(1, 6)]
    deltas = [torch.ones(1, 3), torch.ones(2, 5), torch.ones(1, 6)]
    scales, layouts = [1.0, 1.0, 1.0], ["linear", "conv1d", "linear"]
    if case == "us[2] wrong width":
        us[2] = torch.ones(1, 5)
    elif case == "deltas[1] wrong rows":
        deltas[1] = torch.ones(3, 5)
    elif case == "us[1] float64":
        us[1] = us[1].double()
    elif case == "weights[2] int":
        weights[2] = torch.zeros(6, 6, dtype=torch.int32)
    elif case == "layouts[1] unknown":
        layouts[1] = "conv"
    elif case == "scales short":
        scales = scales[:2]
    elif case == "same weight twice":
        weights[2] = weights[0] = torch.zeros(6, 6)
        us[0], deltas[0] = torch.ones(1, 6), torch.ones(1, 6)
    elif case == "overlapping views":
        storage = torch.zeros(8, 6)
        weights[0], weights[2] = storage[:6], storage[2:]
        us[0], deltas[0] = torch.ones(1, 6), torch.ones(1, 6)
    elif case == "two devices":
        weights[2], us[2], deltas[2] = (t.to("meta") for t in (weights[2], us[2], deltas[2]))
    return weights, us, deltas, scales, layouts


BAD_CASES = {
    "us[2] wrong width": "us\\[2\\] must have shape",
    "deltas[1] wrong rows": "deltas\\[1\\] must have shape",
    "us[1] float64": "us\\[1\\] must have dtype",
    "weights[2] int": "weights\\[2\\] must have dtype",
    "layouts[1] unknown": "layouts\\[1\\] must be one of",
    "scales short": "scales has 2 entries",
    "same weight twice": "weights\\[0\\] and weights\\[2\\] overlap",
    "overlapping views": "weights\\[0\\] and weights\\[2\\] overlap",
    "two devices": "weights\\[2\\] is on meta",
}


@pytest.mark.parametrize("backend", cpu_backends(RANK_UPDATES))
@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_arguments_are_refused_before_any_weight_changes(backend, case):
    weights, us, deltas, scales, layouts = bad_call(case)
    before = [w.clone() for w in weights]
    with pytest.raises(mk.InvalidInputError, match=BAD_CASES[case]):
        mk.ops.rank_updates_(weights, us, deltas, scales, layouts=layouts, backend=backend)
    assert all(torch.equal(w, b) for w, b in zip(weights, before) if not w.is_meta)


@pytest.mark.parametrize("backend", cpu_backends(RANK_UPDATES))
def test_direct_op_calls_are_checked_before_any_kernel_runs(backend):
    weights = [torch.zeros(4, 4), torch.zeros(8, 8)]
    with pytest.raises(mk.InvalidInputError, match="a\\[1\\] must have shape"):
        torch.ops.mend.rank_updates_(weights, [torch.ones(1, 4), torch.ones(1, 5)], [torch.ones(1, 4), torch.ones(1, 8)],
                                     [1.0, 1.0], backend)
    with pytest.raises(mk.InvalidInputError, match="overlap"):
        torch.ops.mend.rank_updates_([weights[0], weights[0]], [torch.ones(1, 4)] * 2, [torch.ones(1, 4)] * 2,
                                     [1.0, 1.0], backend)
    assert all(w.abs().sum() == 0 for w in weights)


def test_native_binding_names_the_bad_descriptor():
    if not backend_status("cpu").available:
        pytest.skip("the cpu backend is not built")
    from mend_kernels import _native

    weight, a, b = torch.zeros(2, 2), torch.ones(1, 2), torch.ones(1, 2)
    good = (weight.data_ptr(), "float32", 2, 2, 2, a.data_ptr(), b.data_ptr(), 1, 1.0)
    with pytest.raises(ValueError, match="descriptors\\[1\\]: ldw"):
        _native.load(_native.CPU_MODULE).rank_update_batched([good, (*good[:4], 1, *good[5:])])
    assert weight.abs().sum() == 0


def test_batched_op_passes_opcheck():
    weights = [torch.randn(5, 4), torch.randn(3, 7).to(torch.bfloat16), torch.randn(1, 1).to(torch.float16)]
    a = [torch.randn(3, 5), torch.randn(2, 3), torch.randn(1, 1)]
    b = [torch.randn(3, 4), torch.randn(2, 7), torch.randn(1, 1)]
    for backend in cpu_backends(RANK_UPDATES):
        torch.library.opcheck(torch.ops.mend.rank_updates_, ([w.clone() for w in weights], a, b, [0.5, -1.0, 2.0], backend))


def test_reference_batched_update_runs_on_meta_tensors():
    weights = [torch.empty(6, 4, device="meta", dtype=torch.bfloat16), torch.empty(3, 5, device="meta")]
    us = [torch.empty(2, 4, device="meta"), torch.empty(1, 3, device="meta")]
    deltas = [torch.empty(2, 6, device="meta"), torch.empty(1, 5, device="meta")]
    result = mk.ops.rank_updates_(weights, us, deltas, [1.0, 1.0], layouts=["linear", "conv1d"])
    assert [w.shape for w in result] == [(6, 4), (3, 5)]


@pytest.mark.parametrize("backend", [b for b in ("reference", "cpu") if backend_status(b).available])
def test_batched_update_works_under_torch_compile(backend):
    def step(w1, w2, u1, d1, u2, d2):
        mk.ops.rank_updates_([w1, w2], [u1, u2], [d1, d2], [0.5, -2.0], layouts=["linear", "conv1d"], backend=backend)
        return w1.sum() + w2.float().sum()

    compiled = torch.compile(step, fullgraph=True)
    w1, w2 = torch.zeros(6, 4), torch.zeros(3, 5, dtype=torch.bfloat16)
    u1, d1, u2, d2 = torch.randn(3, 4), torch.randn(3, 6), torch.randn(2, 3), torch.randn(2, 5)
    total = compiled(w1, w2, u1, d1, u2, d2)
    torch.testing.assert_close(w1, 0.5 * d1.t() @ u1)
    torch.testing.assert_close(w2, (-2.0 * d2.t() @ u2).t().to(torch.bfloat16))
    torch.testing.assert_close(total, w1.sum() + w2.float().sum())


def test_apply_edits_and_revert_make_one_batched_call_per_edit(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    edits = [
        mk.WeightEdit(f"{i}.weight", "linear", torch.randn(2, n_in), torch.randn(2, n_out), torch.tensor(0.1))
        for i, n_in, n_out in ((0, 4, 6), (2, 6, 3))
    ]
    before = [p.detach().clone() for p in model.parameters()]
    calls = []
    real = mk.ops.rank_updates_
    monkeypatch.setattr(mk.ops, "rank_updates_", lambda *args, **kwargs: calls.append(len(args[0])) or real(*args, **kwargs))
    handle = mk.apply_edits(model, edits, keep_original=False)
    for edit in edits:
        torch.testing.assert_close(model.get_parameter(edit.name) - before[int(edit.name[0])], edit.dense())
    handle.revert()
    assert calls == [2, 2]
    for parameter, original in zip(model.parameters(), before):
        torch.testing.assert_close(parameter, original, rtol=0, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(
    specs=st.lists(
        st.tuples(st.integers(1, 70), st.integers(1, 70), st.integers(1, 40), st.sampled_from(["linear", "conv1d"]),
                  st.sampled_from(DTYPES), st.booleans()),
        min_size=1, max_size=4,
    ),
    scale=st.floats(-4.0, 4.0, allow_nan=False),
)
def test_rank_updates_property(specs, scale):
    for backend in cpu_backends(RANK_UPDATES):
        apply_and_check(backend, specs, [scale * (i + 1) for i in range(len(specs))])
