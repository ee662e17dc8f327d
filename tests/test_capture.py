"""SPEC section 2: captured rows (u_i, delta_i) give the true weight gradient, with no base-model gradient,
no backward below the lowest edited layer, float32 rows, and zero rows at padding."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import mend_kernels as mk
from conftest import VOCAB, edit_batch, make_model
from mend_kernels.requests import EditBatch, make_batch
from mend_kernels.targets import is_causal_lm

KINDS = ["gpt2", "llama", "bart", "gpt_neo", "gptj", "bert", "t5"]


# ----------------------------------------------------------------------------------------- helpers
def _batch(model: nn.Module, tokens: dict[str, torch.Tensor]) -> EditBatch:
    return make_batch(model, tokens["input_ids"], tokens["attention_mask"], tokens["labels"],
                      shift_labels=is_causal_lm(model))


def _capture(model: nn.Module, targets, batch: EditBatch):
    return mk.capture_edit_rows(model, targets, batch, shift_labels=is_causal_lm(model))


def _reference_grads(model: nn.Module, batch: EditBatch, names) -> dict[str, torch.Tensor]:
    """dL/dW by plain autograd on an unfrozen copy, with the same token-mean NLL."""
    reference = copy.deepcopy(model)
    for parameter in reference.parameters():
        parameter.requires_grad_(True)
    outputs = reference(**batch.model_inputs())
    loss = mk.token_nll(outputs.logits, batch.labels, shift_labels=is_causal_lm(model))
    loss.backward()
    return {name: reference.get_parameter(name).grad.detach().clone() for name in names}


def _gradient_from_rows(target: mk.EditTarget, u: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """sum_i delta_i u_i^T, in the weight's own layout."""
    gradient = delta.t() @ u  # (out, in)
    return gradient if target.layout == "linear" else gradient.t()


def _assert_relative_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    assert actual.shape == expected.shape, what
    assert float(expected.norm()) > 0, f"{what}: reference gradient is zero, the test proves nothing"
    error = float((actual.double() - expected.double()).norm() / expected.double().norm())
    assert error < rtol, f"{what}: relative error {error:.3g}"


def _blocks(model: nn.Module, kind: str) -> nn.ModuleList:
    if kind in ("gpt2", "gpt_neo", "gptj"):
        return model.transformer.h
    if kind == "llama":
        return model.model.layers
    if kind == "bert":
        return model.bert.encoder.layer
    if kind == "bart":
        return model.model.encoder.layers
    return model.encoder.block


def _padded_tokens(kind: str, lengths=(9, 6), n_labels: int = 3, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded causal-LM requests: labels on the last ``n_labels`` real tokens, -100 on pads."""
    generator = torch.Generator().manual_seed(1)
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for row, length in enumerate(lengths):
        input_ids[row, :length] = torch.randint(3, VOCAB, (length,), generator=generator)
        attention_mask[row, :length] = 1
        labels[row, length - n_labels : length] = input_ids[row, length - n_labels : length]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _padded_seq2seq_tokens() -> dict[str, torch.Tensor]:
    """BART requests with a padded source (pad id 1) and a padded target (-100)."""
    tokens = edit_batch("bart", n_requests=2, length=9)
    tokens["input_ids"][1, 6:] = 1
    tokens["attention_mask"][1, 6:] = 0
    tokens["labels"][1, 2:] = -100
    return tokens


def _no_hooks_left(model: nn.Module) -> None:
    for name, module in model.named_modules():
        assert not module._forward_hooks, f"forward hook left on {name or 'model'}"
        assert not module._forward_hooks_with_kwargs, f"forward hook left on {name or 'model'}"
        assert not module._forward_pre_hooks, f"forward pre-hook left on {name or 'model'}"
        assert not module._backward_hooks, f"backward hook left on {name or 'model'}"


# ------------------------------------------------------------------------ (a) rows give dL/dW exactly
@pytest.mark.parametrize("kind", KINDS)
def test_rows_sum_to_the_true_weight_gradient(kind):
    model = make_model(kind)
    targets = mk.resolve_targets(model)
    batch = _batch(model, edit_batch(kind))
    expected = _reference_grads(model, batch, [t.name for t in targets])
    rows = _capture(model, targets, batch)
    assert list(rows) == [t.name for t in targets]
    for target in targets:
        u, delta = rows[target.name]
        assert u.shape[1] == target.n_in and delta.shape == (u.shape[0], target.n_out)
        _assert_relative_close(_gradient_from_rows(target, u, delta), expected[target.name], 1e-5, target.name)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_lm_head_runs_only_on_the_positions_the_loss_reads(kind, monkeypatch):
    model = make_model(kind)
    targets = mk.resolve_targets(model)
    tokens = edit_batch(kind, length=9)
    tokens["labels"][:, :6] = -100  # targets are the last 3 tokens: the loss reads logits 5..8
    batch = _batch(model, tokens)
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    rows = _capture(model, targets, batch)
    monkeypatch.setattr("mend_kernels.capture._scored_positions", lambda *args: None)  # the whole prompt
    full = _capture(model, targets, batch)
    assert seen == [4, 9]
    for name in rows:
        for kept, everything in zip(rows[name], full[name]):
            torch.testing.assert_close(kept, everything, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_rows_give_the_gradient_with_padding(kind):
    model = make_model(kind)
    targets = mk.resolve_targets(model)
    batch = _batch(model, _padded_tokens(kind))
    expected = _reference_grads(model, batch, [t.name for t in targets])
    for target in targets:
        u, delta = _capture(model, targets, batch)[target.name]
        _assert_relative_close(_gradient_from_rows(target, u, delta), expected[target.name], 1e-5, target.name)


def test_rows_give_the_gradient_for_padded_seq2seq():
    model = make_model("bart")
    targets = mk.resolve_targets(model)
    batch = _batch(model, _padded_seq2seq_tokens())
    expected = _reference_grads(model, batch, [t.name for t in targets])
    rows = _capture(model, targets, batch)
    for target in targets:
        _assert_relative_close(_gradient_from_rows(target, *rows[target.name]), expected[target.name], 1e-5, target.name)


@pytest.mark.parametrize(
    "kind, names",
    [
        ("llama", ["lm_head.weight", "model.layers.2.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"]),
        ("gpt2", ["transformer.h.2.attn.c_attn.weight", "transformer.h.0.mlp.c_proj.weight"]),
    ],
)
def test_rows_give_the_gradient_of_any_linear_weight(kind, names):
    model = make_model(kind)
    targets = mk.resolve_targets(model, names)
    batch = _batch(model, edit_batch(kind))
    expected = _reference_grads(model, batch, names)
    rows = _capture(model, targets, batch)
    for target in targets:
        _assert_relative_close(_gradient_from_rows(target, *rows[target.name]), expected[target.name], 1e-5, target.name)


@pytest.mark.parametrize("kind", ["gpt2", "bart"])
def test_reference_loss_is_the_models_own_loss(kind):
    """The oracle's token-mean NLL is the transformers loss (so the gradient test checks the right thing)."""
    model = make_model(kind)
    batch = _batch(model, edit_batch(kind))
    with torch.no_grad():
        outputs = model(**batch.model_inputs(), labels=batch.labels)
        ours = mk.token_nll(outputs.logits, batch.labels, shift_labels=is_causal_lm(model))
    torch.testing.assert_close(ours, outputs.loss, rtol=1e-6, atol=1e-6)


# -------------------------------------------------------------------- (b) no .grad, flags restored
@pytest.mark.parametrize("kind", ["gpt2", "llama", "bart"])
def test_capture_writes_no_grad_and_restores_requires_grad(kind):
    model = make_model(kind)
    frozen = {name for i, (name, _) in enumerate(model.named_parameters()) if i % 3 == 0}
    frozen.add(mk.resolve_targets(model)[-1].name)  # an edited weight that was frozen to begin with
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name not in frozen)
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    assert set(before.values()) == {True, False}
    _capture(model, mk.resolve_targets(model), _batch(model, edit_batch(kind)))
    for name, parameter in model.named_parameters():
        assert parameter.grad is None, name
        assert parameter.requires_grad == before[name], name


def test_capture_leaves_existing_grads_untouched():
    model = make_model("gpt2")
    for parameter in model.parameters():
        parameter.grad = torch.full_like(parameter, 0.5)
    _capture(model, mk.resolve_targets(model), _batch(model, edit_batch("gpt2")))
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter.grad, torch.full_like(parameter, 0.5)), name


# ------------------------------------------------------------ (c) no backward below the lowest layer
class _Probe:
    """Records whether a module's output requires grad and whether any gradient flows back into it."""

    def __init__(self, module: nn.Module):
        self.output_requires_grad: list[bool] = []
        self.backward_calls = 0
        self._handles = [
            module.register_forward_hook(self._forward),
            module.register_full_backward_hook(self._backward),
        ]

    def _forward(self, module, args, output):
        tensor = output[0] if isinstance(output, tuple) else output
        self.output_requires_grad.append(bool(tensor.requires_grad))

    def _backward(self, module, grad_input, grad_output):
        self.backward_calls += 1

    def remove(self):
        for handle in self._handles:
            handle.remove()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_no_backward_below_the_lowest_edited_layer(kind):
    model = make_model(kind)
    targets = mk.resolve_targets(model)  # blocks 1-3
    blocks = _blocks(model, kind)
    below_attention = blocks[1].attn if kind == "gpt2" else blocks[1].self_attn
    probes = {
        "embeddings": _Probe(model.get_input_embeddings()),
        "block 0": _Probe(blocks[0]),
        "attention of block 1 (below its MLP)": _Probe(below_attention),
        "block 2": _Probe(blocks[2]),
        "block 3": _Probe(blocks[3]),
    }
    batch = _batch(model, edit_batch(kind))
    _capture(model, targets, batch)
    for name in ("embeddings", "block 0", "attention of block 1 (below its MLP)"):
        assert probes[name].output_requires_grad == [False], name
        assert probes[name].backward_calls == 0, name
    for name in ("block 2", "block 3"):
        assert probes[name].output_requires_grad == [True], name
        assert probes[name].backward_calls == 1, name

    # control: the same probes do fire under ordinary autograd
    for probe in probes.values():
        probe.remove()
    reference = copy.deepcopy(model)
    control = _Probe(_blocks(reference, kind)[0])
    for parameter in reference.parameters():
        parameter.requires_grad_(True)
    mk.token_nll(reference(**batch.model_inputs()).logits, batch.labels, shift_labels=True).backward()
    assert control.backward_calls == 1


def test_no_backward_into_bart_encoder_below_edited_layers():
    model = make_model("bart")
    probes = [_Probe(model.model.encoder.layers[0]), _Probe(model.model.shared)]
    edited_above = _Probe(model.model.decoder.layers[2])
    _capture(model, mk.resolve_targets(model), _batch(model, edit_batch("bart")))
    for probe in probes:
        assert probe.backward_calls == 0
        assert not any(probe.output_requires_grad)
    assert edited_above.backward_calls == 1


# -------------------------------------------------------------------------------- (d) float32 rows
@pytest.mark.parametrize("kind", ["gpt2", "llama", "bart"])
def test_rows_are_float32_for_a_bf16_model(kind):
    model = make_model(kind).to(torch.bfloat16)
    targets = mk.resolve_targets(model)
    rows = _capture(model, targets, _batch(model, edit_batch(kind)))
    for target in targets:
        u, delta = rows[target.name]
        assert u.dtype == torch.float32 and delta.dtype == torch.float32, target.name
        assert bool(torch.isfinite(u).all() and torch.isfinite(delta).all()), target.name
        assert float(delta.abs().sum()) > 0, target.name
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# -------------------------------------------------------------------- (e) RowCapture as a context
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_row_capture_context_matches_capture_edit_rows_and_removes_hooks(kind):
    model = make_model(kind)
    targets = mk.resolve_targets(model)
    batch = _batch(model, edit_batch(kind))
    expected = _capture(model, targets, batch)
    _no_hooks_left(model)
    with mk.RowCapture(model, targets) as capture:
        loss = mk.token_nll(model(**batch.model_inputs()).logits, batch.labels, shift_labels=True)
        loss.backward()
    _no_hooks_left(model)
    for target in targets:
        u, delta = capture.rows(target.name)
        assert torch.equal(u, expected[target.name][0]), target.name
        assert torch.equal(delta, expected[target.name][1]), target.name
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_row_capture_gives_the_gradient_of_a_user_loss():
    model = make_model("gpt2")
    targets = mk.resolve_targets(model)
    batch = _batch(model, edit_batch("gpt2"))

    def user_loss(m):
        logits = m(**batch.model_inputs()).logits
        return logits[:, -1].logsumexp(-1).sum() + (logits[:, 2, 5] ** 2).mean()

    reference = copy.deepcopy(model)
    user_loss(reference).backward()
    with mk.RowCapture(model, targets) as capture:
        user_loss(model).backward()
    for target in targets:
        expected = reference.get_parameter(target.name).grad
        _assert_relative_close(_gradient_from_rows(target, *capture.rows(target.name)), expected, 1e-5, target.name)


def test_row_capture_cleans_up_after_an_exception():
    model = make_model("llama")
    model.model.embed_tokens.weight.requires_grad_(False)
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    batch = _batch(model, edit_batch("llama"))
    with pytest.raises(RuntimeError, match="user failure"):
        with mk.RowCapture(model, mk.resolve_targets(model)):
            model(**batch.model_inputs())
            raise RuntimeError("user failure")
    _no_hooks_left(model)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == before


def test_rows_of_an_uncaptured_weight_raise_target_error():
    model = make_model("gpt2")
    targets = mk.resolve_targets(model)
    batch = _batch(model, edit_batch("gpt2"))
    with mk.RowCapture(model, targets) as capture:
        mk.token_nll(model(**batch.model_inputs()).logits, batch.labels, shift_labels=True).backward()
    with pytest.raises(mk.TargetError, match="transformer.h.0.mlp.c_fc.weight"):
        capture.rows("transformer.h.0.mlp.c_fc.weight")


def test_row_capture_restores_every_forward_also_after_an_exception():
    model = make_model("gpt2")
    batch = _batch(model, edit_batch("gpt2"))
    _capture(model, mk.resolve_targets(model), batch)
    with pytest.raises(RuntimeError, match="user failure"):
        with mk.RowCapture(model, mk.resolve_targets(model)):
            raise RuntimeError("user failure")
    assert not [name for name, module in model.named_modules() if "forward" in module.__dict__]


class _TwiceLM(nn.Module):
    """Embedding -> shared -> shared -> head: one edited layer called twice in one forward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(11, 4)
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 11)

    def forward(self, input_ids, attention_mask):
        hidden = torch.tanh(self.shared(self.embed(input_ids)))
        return SimpleNamespace(logits=self.head(torch.tanh(self.shared(hidden))))


def test_each_call_of_a_layer_gets_its_own_rows():
    model = _TwiceLM()
    target = mk.resolve_targets(model, ["shared.weight"])[0]
    batch = _toy_batch()
    expected = _reference_grads(model, batch, [target.name])[target.name]
    u, delta = mk.capture_edit_rows(model, [target], batch, shift_labels=False)[target.name]
    assert u.shape == (8, 4) and delta.shape == (8, 4)  # 4 token rows per call
    assert not torch.equal(delta[:4], delta[4:])
    _assert_relative_close(_gradient_from_rows(target, u, delta), expected, 1e-5, target.name)


def test_row_capture_refuses_a_layer_whose_forward_is_already_replaced():
    model = _ToyLM()
    wrapped = model.used.forward
    model.used.forward = lambda x: wrapped(x)  # as accelerate's dispatch hooks do
    with pytest.raises(mk.InvalidInputError, match="used.weight"):
        with mk.RowCapture(model, mk.resolve_targets(model, ["used.weight", "head.weight"])):
            pass
    assert all(p.requires_grad for p in model.parameters())
    assert "forward" not in model.head.__dict__ and "forward" in model.used.__dict__


# ------------------------------------------------------------------------ (f) misuse of the capture
def test_row_capture_under_no_grad_raises_and_cleans_up():
    model = make_model("gpt2")
    batch = _batch(model, edit_batch("gpt2"))
    with pytest.raises(mk.InvalidInputError, match="no_grad"):
        with torch.no_grad(), mk.RowCapture(model, mk.resolve_targets(model)):
            model(**batch.model_inputs())
    _no_hooks_left(model)
    assert all(p.requires_grad for p in model.parameters())


def test_capture_edit_rows_enables_grad_itself():
    """editor.edit runs under no_grad: capture_edit_rows must still give the same rows there."""
    model = make_model("gpt2")
    targets = mk.resolve_targets(model)
    batch = _batch(model, edit_batch("gpt2"))
    expected = _capture(model, targets, batch)
    with torch.no_grad():
        rows = _capture(model, targets, batch)
    for target in targets:
        assert torch.equal(rows[target.name][1], expected[target.name][1])


def test_layer_off_the_loss_path_raises_target_error():
    model = make_model("gpt2")
    targets = mk.resolve_targets(model)  # blocks 1-3
    batch = _batch(model, edit_batch("gpt2"))
    with mk.RowCapture(model, targets) as capture:
        hidden = model(**batch.model_inputs(), output_hidden_states=True).hidden_states[2]  # after block 1
        hidden.square().mean().backward()
    capture.rows("transformer.h.1.mlp.c_proj.weight")  # on the path
    with pytest.raises(mk.TargetError, match=r"transformer\.h\.3\.mlp\.c_fc\.weight"):
        capture.rows("transformer.h.3.mlp.c_fc.weight")


class _ToyLM(nn.Module):
    """Embedding -> used -> head; ``unused`` is called but does not reach the logits."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(11, 4)
        self.used = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)
        self.head = nn.Linear(4, 11)

    def forward(self, input_ids, attention_mask):
        hidden = self.embed(input_ids)
        self.unused(hidden)
        return SimpleNamespace(logits=self.head(self.used(hidden)))


def _toy_batch() -> EditBatch:
    input_ids = torch.tensor([[1, 2, 3, 4]])
    return EditBatch(input_ids, torch.ones_like(input_ids), torch.tensor([[-100, -100, 5, 6]]))


def test_capture_edit_rows_rejects_a_layer_off_the_loss_path():
    model = _ToyLM()
    targets = mk.resolve_targets(model, ["used.weight", "unused.weight"])
    with pytest.raises(mk.TargetError, match="unused.weight"):
        mk.capture_edit_rows(model, targets, _toy_batch(), shift_labels=False)
    _no_hooks_left(model)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_capture_edit_rows_rejects_targets_that_are_all_off_the_loss_path():
    model = _ToyLM()
    with pytest.raises(mk.TargetError, match="path"):
        mk.capture_edit_rows(model, mk.resolve_targets(model, ["unused.weight"]), _toy_batch(), shift_labels=False)
    _no_hooks_left(model)


def test_capture_of_a_layer_that_is_never_called_raises_target_error():
    model = make_model("gpt2")
    targets = mk.resolve_targets(model)
    with mk.RowCapture(model, targets) as capture:
        pass
    with pytest.raises(mk.TargetError, match="not called"):
        capture.rows(targets[0].name)


# ------------------------------------------------------------------------------------- (g) padding
def _expected_live_positions(tokens: dict[str, torch.Tensor], last_block: bool) -> torch.Tensor:
    """Flat mask of causal-LM positions whose delta can be non-zero in an edited MLP layer.

    Below the last block, attention carries gradient to every real token before the last label. In
    the last block the MLP is position-wise, so only positions whose logits are scored (label at t + 1).
    Padding and positions from the last label on never reach the loss.
    """
    labels = tokens["labels"]
    live = torch.zeros_like(labels, dtype=torch.bool)
    if last_block:
        live[:, :-1] = labels[:, 1:] != -100
        return live.flatten()
    for row in range(labels.shape[0]):
        last_label = int((labels[row] != -100).nonzero().max())
        live[row, :last_label] = True
    return live.flatten()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_padding_rows_have_zero_delta_and_are_dropped(kind):
    model = make_model(kind)
    targets = mk.resolve_targets(model)
    tokens = _padded_tokens(kind, lengths=(9, 6))
    rows = _capture(model, targets, _batch(model, tokens))
    editor = mk.MENDEditor.for_model(model, rank=4)
    for target in targets:
        live = _expected_live_positions(tokens, last_block=".3." in target.name)
        assert int(live.sum()) == (6 if ".3." in target.name else 8 + 5)
        u, delta = rows[target.name]
        assert u.shape[0] == tokens["input_ids"].numel()
        assert bool((delta[~live] == 0).all()), f"{target.name}: non-zero delta at a pad / post-label position"
        assert bool((delta[live] != 0).any(dim=1).all()), f"{target.name}: zero delta at a live position"
        u_tilde, delta_tilde = editor.pseudo_factors(target.name, u, delta)
        assert u_tilde.shape == (int(live.sum()), target.n_in)
        assert delta_tilde.shape == (int(live.sum()), target.n_out)


def test_pseudo_factors_drop_exactly_the_zero_rows():
    model = make_model("gpt2")
    tokens = _padded_tokens("gpt2", lengths=(9, 6))
    target = mk.resolve_targets(model)[-1]
    u, delta = _capture(model, [target], _batch(model, tokens))[target.name]
    live = (delta != 0).any(dim=1) & (u != 0).any(dim=1)
    assert 0 < int(live.sum()) < u.shape[0]
    editor = mk.MENDEditor.for_model(model, rank=4)
    editor.pseudo_factors(target.name, u[live], delta[live])  # statistics from the live rows only
    frozen = copy.deepcopy(editor).eval()
    editor.eval()
    all_rows = editor.pseudo_factors(target.name, u, delta)
    live_rows = frozen.pseudo_factors(target.name, u[live], delta[live])
    for got, want in zip(all_rows, live_rows):
        assert torch.equal(got, want)


def test_pseudo_factors_drop_rows_with_zero_input():
    model = make_model("llama")
    target = mk.resolve_targets(model)[0]
    u = torch.randn(6, target.n_in)
    delta = torch.randn(6, target.n_out)
    u[1] = 0
    delta[4] = 0
    editor = mk.MENDEditor.for_model(model, rank=4)
    u_tilde, delta_tilde = editor.pseudo_factors(target.name, u, delta)
    assert u_tilde.shape[0] == delta_tilde.shape[0] == 4
    assert int(editor.groups[target.shape_key].count) == 4  # statistics saw only the kept rows


def test_seq2seq_padding_rows_have_zero_delta_in_the_decoder():
    model = make_model("bart")
    tokens = _padded_seq2seq_tokens()
    targets = mk.resolve_targets(model)
    rows = _capture(model, targets, _batch(model, tokens))
    decoder = [t for t in targets if ".decoder." in t.name]
    label_live = (tokens["labels"] != -100).flatten()
    for target in decoder:
        u, delta = rows[target.name]
        # a decoder position sees only earlier positions: after the last label nothing reaches the loss
        assert bool((delta.reshape(2, 4, -1)[1, 2:] == 0).all()), target.name
        assert bool((delta[label_live] != 0).any(dim=1).all()), target.name
    encoder = [t for t in targets if ".encoder." in t.name]
    source_pad = (tokens["attention_mask"] == 0).flatten()
    for target in encoder:
        u, delta = rows[target.name]
        assert bool((delta[source_pad] == 0).all()), f"{target.name}: gradient at a masked source token"
        assert bool((delta[~source_pad] != 0).any(dim=1).all()), target.name
