"""mend_kernels.functional: capture for any loss, the editor as a module, temporary edits, compiled
models, and edits under DistributedDataParallel."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mend_kernels as mk
import mend_kernels.functional as mkf
from mend_kernels.edit import lowrank_edited
from conftest import edit_batch, make_model

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


# ----------------------------------------------------------------------------------------- helpers
def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def _assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor], requires_grad: dict[str, bool]) -> None:
    """Weights bit-identical, requires_grad flags as before, no layer forward left replaced."""
    changed = [name for name, tensor in model.state_dict().items() if not torch.equal(tensor, before[name])]
    assert not changed, f"weights changed: {changed}"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == requires_grad
    assert not [name for name, module in model.named_modules() if "forward" in module.__dict__]


def _flags(model: torch.nn.Module) -> dict[str, bool]:
    return {name: p.requires_grad for name, p in model.named_parameters()}


def _custom_loss(logits: torch.Tensor) -> torch.Tensor:
    """A loss that is not MEND's edit loss: the rows must still give its weight gradient."""
    return logits[:, -3:].square().mean() + F.cross_entropy(logits[:, -1], torch.arange(logits.shape[0]))


def _edits(model: torch.nn.Module, kind: str, seed: int = 0) -> list[mk.WeightEdit]:
    torch.manual_seed(seed)
    editor = mk.MENDEditor.for_model(model, rank=8, edit_lr=0.05)
    with torch.no_grad():
        return editor.compute_edit(model, **edit_batch(kind, seed=seed))


def _logits(model: torch.nn.Module, kind: str = "gpt2") -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=edit_batch(kind, seed=9)["input_ids"]).logits


# ------------------------------------------------------------------------------------- capture_rows
@pytest.mark.parametrize("kind", ["gpt2", "llama"])  # Conv1D and nn.Linear layouts
def test_captured_rows_give_the_weight_gradient_of_any_loss(kind):
    model = make_model(kind)
    targets = mk.resolve_targets(model)
    layers = [targets[0].name, *targets[1:]]  # names and EditTarget objects mixed
    ids = edit_batch(kind)["input_ids"]
    reference = copy.deepcopy(model)
    _custom_loss(reference(input_ids=ids).logits).backward()
    flags = _flags(model)

    with mkf.capture_rows(model, layers) as capture:
        _custom_loss(model(input_ids=ids).logits).backward()

    assert all(p.grad is None for p in model.parameters()), "no weight gradient may be formed"
    assert _flags(model) == flags
    for target in targets:
        u, delta = capture.rows(target.name)
        assert u.dtype == delta.dtype == torch.float32
        gradient = delta.t() @ u if target.layout == "linear" else u.t() @ delta
        torch.testing.assert_close(gradient, reference.get_parameter(target.name).grad, rtol=1e-4, atol=1e-6)


def test_backward_stops_at_the_lowest_captured_layer():
    model = make_model("gpt2")
    lowest = "transformer.h.2.mlp.c_fc.weight"
    reached = []
    model.transformer.h[1].mlp.register_full_backward_hook(lambda *args: reached.append("h.1"))
    _custom_loss(model(input_ids=edit_batch("gpt2")["input_ids"]).logits).backward()
    assert reached, "the hook must see an ordinary backward, or the test proves nothing"
    model.zero_grad(set_to_none=True)
    reached.clear()
    with mkf.capture_rows(model, [lowest, "transformer.h.3.mlp.c_proj.weight"]) as capture:
        _custom_loss(model(input_ids=edit_batch("gpt2")["input_ids"]).logits).backward()
    assert not reached, "backward ran below the lowest captured layer"
    assert capture.rows(lowest)[1].abs().sum() > 0


def test_editor_module_on_captured_rows_equals_compute_edit_and_trains_with_any_loss():
    model = make_model("gpt2")
    torch.manual_seed(0)
    editor = mk.MENDEditor.for_model(model, rank=8)  # training mode: statistics update as in compute_edit
    request = edit_batch("gpt2")
    twin = copy.deepcopy(editor)
    with torch.no_grad():
        expected = twin.compute_edit(model, **request)
    batch_labels = request["labels"]
    with mkf.capture_rows(model, editor.targets) as capture:
        mk.token_nll(model(input_ids=request["input_ids"]).logits, batch_labels, shift_labels=True).backward()
    edits = editor(capture.all_rows())
    assert [e.name for e in edits] == [e.name for e in expected]
    for got, want in zip(edits, expected):
        torch.testing.assert_close(got.u, want.u)
        torch.testing.assert_close(got.delta, want.delta)

    optimizer = torch.optim.SGD(editor.parameters(), lr=0.1)
    before = editor.edit_lrs.detach().clone()
    sum(edit.dense().square().sum() for edit in edits).backward()  # any loss of the edits
    optimizer.step()
    assert not torch.equal(editor.edit_lrs.detach(), before)
    subset = editor({edits[0].name: capture.rows(edits[0].name)})
    assert [e.name for e in subset] == [edits[0].name]


def test_bad_capture_and_editor_arguments_raise_named_errors_and_change_nothing():
    model = make_model("gpt2")
    before, flags = _state(model), _flags(model)
    editor = mk.MENDEditor.for_model(model, rank=8)
    wrong_shape = mk.EditTarget("transformer.h.3.mlp.c_fc.weight", 24, 48, "conv1d")
    cases = [
        (["transformer.h.3.mlp.c_fx.weight"], mk.TargetError, "c_fc"),  # close match named
        (["transformer.h.3.ln_2.weight"], mk.TargetError, "LayerNorm"),
        ("transformer.h.3.mlp.c_fc.weight", mk.InvalidInputError, "single"),
        ([3], mk.InvalidInputError, "int"),
        ([], mk.TargetError, "empty"),
        ([wrong_shape], mk.TargetError, "built for"),
    ]
    for layers, error, message in cases:
        with pytest.raises(error, match=message):
            with mkf.capture_rows(model, layers):
                pass
        _assert_unchanged(model, before, flags)
    with pytest.raises(mk.InvalidInputError, match="empty"):
        editor({})
    with pytest.raises(mk.TargetError, match="close matches"):
        editor({"transformer.h.3.mlp.c_fx.weight": (torch.ones(1, 24), torch.ones(1, 96))})
    with pytest.raises(mk.InvalidInputError, match="delta must have shape"):
        editor({"transformer.h.3.mlp.c_fc.weight": (torch.ones(2, 24), torch.ones(2, 95))})


# ------------------------------------------------------------------------------- temporarily_edited
@pytest.mark.parametrize("mode", mkf.MODES)
def test_temporarily_edited_runs_the_edited_model_and_restores_it_bit_for_bit(mode):
    model = make_model("gpt2")
    edits = _edits(model, "gpt2")
    edited = copy.deepcopy(model)
    mk.apply_edits(edited, edits)
    before, flags, plain = _state(model), _flags(model), _logits(model)
    with mkf.temporarily_edited(model, edits, mode=mode):
        torch.testing.assert_close(_logits(model), _logits(edited), rtol=1e-5, atol=1e-5)
    _assert_unchanged(model, before, flags)
    assert torch.equal(_logits(model), plain)


@pytest.mark.parametrize("mode", mkf.MODES)
def test_temporarily_edited_restores_on_an_exception_even_after_writes_inside(mode):
    model = make_model("gpt2")
    edits = _edits(model, "gpt2")
    before, flags = _state(model), _flags(model)
    with pytest.raises(KeyError, match="inside the block"):
        with mkf.temporarily_edited(model, edits, mode=mode):
            if mode == "inplace":  # e.g. an optimizer step: discarded by the bit-exact restore
                with torch.no_grad():
                    model.get_parameter(edits[0].name).add_(1.0)
            raise KeyError("inside the block")
    _assert_unchanged(model, before, flags)


def test_lowrank_temporary_edit_passes_gradients_to_the_factors():
    model = make_model("gpt2").requires_grad_(False)
    edits = _edits(model, "gpt2")
    leaves = [mk.WeightEdit(e.name, e.layout, e.u.clone().requires_grad_(), e.delta, e.scale) for e in edits]
    with mkf.temporarily_edited(model, leaves):
        model(input_ids=edit_batch("gpt2")["input_ids"]).logits.square().mean().backward()
    assert all(edit.u.grad is not None and edit.u.grad.abs().sum() > 0 for edit in leaves)


def test_bad_temporary_edits_raise_named_errors_and_change_nothing():
    model = make_model("gpt2")
    good = _edits(model, "gpt2")[0]
    before, flags = _state(model), _flags(model)

    def variant(**changes) -> mk.WeightEdit:
        fields = {"name": good.name, "layout": good.layout, "u": good.u, "delta": good.delta, "scale": good.scale}
        return mk.WeightEdit(**{**fields, **changes})

    nan_u = good.u.clone()
    nan_u[0, 0] = float("nan")
    cases = [
        ([], mk.InvalidInputError, "empty"),
        (good, mk.InvalidInputError, "single WeightEdit"),
        (["w"], mk.InvalidInputError, "WeightEdit objects"),
        ([variant(name="transformer.h.3.mlp.c_fx.weight")], mk.TargetError, "no parameter"),
        ([variant(layout="linear")], mk.TargetError, "conv1d weight"),
        ([variant(u=good.u[:, :-1])], mk.InvalidInputError, "u~ of .* must have shape"),
        ([variant(u=good.u.double())], mk.InvalidInputError, "dtype float32"),
        ([variant(delta=good.delta.to("meta"))], mk.InvalidInputError, "is on meta"),
        ([variant(u=nan_u)], mk.NonFiniteError, "NaN"),
        ([good, good], mk.TargetError, "more than once"),
    ]
    for mode in mkf.MODES:
        for edits, error, message in cases:
            with pytest.raises(error, match=message):
                with mkf.temporarily_edited(model, edits, mode=mode):
                    pytest.fail("the block must not run")
            _assert_unchanged(model, before, flags)
    with pytest.raises(mk.InvalidInputError, match="mode must be one of"):
        with mkf.temporarily_edited(model, [good], mode="dense"):
            pass


def test_public_ops_are_the_dispatched_ops_with_autograd():
    assert (mkf.rank_update_, mkf.lowrank_linear, mkf.editor_mlp, mkf.capture_linear) == (
        mk.ops.rank_update_, mk.ops.lowrank_linear, mk.ops.editor_mlp, mk.ops.capture_linear)
    x, weight = torch.randn(3, 4, requires_grad=True), torch.randn(5, 4)
    u, delta = torch.randn(2, 4, requires_grad=True), torch.randn(2, 5)
    scale = torch.tensor(0.5, requires_grad=True)
    out = mkf.lowrank_linear(x, weight, None, u, delta, scale)
    torch.testing.assert_close(out, x @ (weight + scale * delta.t() @ u).t())
    out.sum().backward()
    assert x.grad is not None and u.grad is not None and scale.grad is not None


# ---------------------------------------------------------------------------------- torch.compile
def test_edit_of_a_compiled_model_equals_the_eager_edit():
    torch._dynamo.reset()
    eager = make_model("gpt2")
    compiled_inner = copy.deepcopy(eager)
    compiled = torch.compile(compiled_inner, backend="eager")  # dynamo tracing without inductor's compile time
    request = edit_batch("gpt2")
    torch.manual_seed(0)
    editor = mk.MENDEditor.for_model(eager, rank=8)
    twin = copy.deepcopy(editor)
    eager_handle = editor.edit(eager, **request)
    compiled_handle = twin.edit(compiled, **request)
    for a, b in zip(eager_handle.edits, compiled_handle.edits):
        assert torch.equal(a.u, b.u) and torch.equal(a.delta, b.delta) and torch.equal(a.scale, b.scale)
    assert all(torch.equal(p, q) for p, q in zip(eager.parameters(), compiled_inner.parameters()))
    torch.testing.assert_close(_logits(compiled), _logits(eager))  # the compiled forward sees the edit
    # Edits made elsewhere apply and run low-rank through the wrapper too.
    compiled_handle.revert()
    reapplied = mk.apply_edits(compiled, compiled_handle.edits)
    assert all(torch.equal(p, q) for p, q in zip(eager.parameters(), compiled_inner.parameters()))
    reapplied.revert()
    with lowrank_edited(compiled, compiled_handle.edits):
        torch.testing.assert_close(_logits(compiled), _logits(eager))


def test_capture_through_a_compiled_model_equals_eager_capture():
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.Linear(8, 5))
    compiled = torch.compile(model)  # inductor
    x = torch.randn(4, 6)
    plain = compiled(x).detach()  # compiled before the capture: the capture must not reuse the graph
    layers = ["2.weight", "3.weight"]
    rows = {}
    for name, net in (("eager", model), ("compiled", compiled)):
        with mkf.capture_rows(net, layers) as capture:
            net(x).square().sum().backward()
        rows[name] = capture.all_rows()
    for layer in layers:
        for got, want in zip(rows["compiled"][layer], rows["eager"][layer]):
            assert torch.equal(got, want)
    edit = mk.WeightEdit("3.weight", "linear", *rows["eager"]["3.weight"], torch.tensor(-0.1))
    with mkf.temporarily_edited(compiled, [edit], mode="inplace"):
        torch.testing.assert_close(compiled(x), model(x))
        assert not torch.allclose(compiled(x), plain)
    torch.testing.assert_close(compiled(x), plain)


# ------------------------------------------------------------------------------ distributed (DDP)
def test_ddp_ranks_end_with_identical_edited_weights():
    """examples/distributed_edits.py: 2 gloo processes, rank 0 computes, broadcast_edits sends the factors."""
    sys.path.insert(0, str(EXAMPLES))  # the spawned processes import the example module by name
    try:
        import distributed_edits

        weights, edits = distributed_edits.main(world_size=2)
    finally:
        sys.path.remove(str(EXAMPLES))
    assert len(edits[0]) == 4
    for a, b in zip(edits[0], edits[1]):
        assert a.name == b.name and torch.equal(a.u, b.u) and torch.equal(a.delta, b.delta)
        assert torch.equal(a.scale, b.scale)
    assert all(torch.equal(weights[1][name], tensor) for name, tensor in weights[0].items())
