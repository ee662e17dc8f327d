"""Bad inputs raise a clear error (type + message naming the argument or layer) and change no weight."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import mend_kernels as mk
from conftest import VOCAB, edit_batch, make_model

_INT_VIEW = {4: torch.int32, 2: torch.int16, 8: torch.int64, 1: torch.uint8}


# ----------------------------------------------------------------------------------------- helpers
def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits (so NaN compares equal to the same NaN)."""
    tensor = tensor.detach().cpu().contiguous()
    if tensor.is_floating_point():
        return tensor.view(_INT_VIEW[tensor.element_size()])
    return tensor


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: _bits(tensor).clone() for name, tensor in module.state_dict().items()}


def _assert_same(module: torch.nn.Module, snapshot: dict[str, torch.Tensor], what: str) -> None:
    now = module.state_dict()
    assert set(now) == set(snapshot), what
    changed = [name for name, tensor in now.items() if not torch.equal(_bits(tensor), snapshot[name])]
    assert not changed, f"{what} changed: {changed}"


def _raises(
    error: type[Exception],
    fragments: list[str],
    action: Callable[[], object],
    *,
    model: torch.nn.Module,
    editor: torch.nn.Module | None = None,
) -> str:
    """Run ``action``; it must raise ``error`` whose message holds every fragment, changing no weight."""
    model_before = _snapshot(model)
    editor_before = _snapshot(editor) if editor is not None else None
    with pytest.raises(error) as info:
        action()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in error message {message!r}"
    _assert_same(model, model_before, "model weights")
    if editor is not None:
        _assert_same(editor, editor_before, "editor state")
    return message


def _editor(model: torch.nn.Module, **options) -> mk.MENDEditor:
    torch.manual_seed(0)
    return mk.MENDEditor.for_model(model, rank=8, **options)


def _warm_editor(kind: str, model: torch.nn.Module) -> mk.MENDEditor:
    """An editor whose statistics saw one batch (the model is left as it was), in eval mode."""
    editor = _editor(model)
    editor.edit(model, **edit_batch(kind, seed=5)).revert()
    return editor.eval()


def _gpt2_of_width(width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=4, n_embd=width, n_head=2, vocab_size=VOCAB, n_positions=64)
    return transformers.GPT2LMHeadModel(config).eval()


def _rows(target: mk.EditTarget, n: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, target.n_in, generator=generator), torch.randn(n, target.n_out, generator=generator)


# ------------------------------------------------------------------------------- pseudo_factors
def _bad_rows(case: str, target: mk.EditTarget):
    u, delta = _rows(target)
    return {
        "u wrong width": (torch.randn(5, target.n_in + 1), delta),
        "u 1-D": (torch.randn(target.n_in), delta),
        "u no rows": (torch.randn(0, target.n_in), torch.randn(0, target.n_out)),
        "u not a tensor": (u.tolist(), delta),
        "u int": (u.round().long(), delta),
        "u on meta": (torch.empty(5, target.n_in, device="meta"), delta),
        "delta wrong width": (u, torch.randn(5, target.n_out - 1)),
        "delta wrong rows": (u, torch.randn(4, target.n_out)),
        "delta int": (u, delta.round().int()),
        "delta on meta": (u, torch.empty(5, target.n_out, device="meta")),
    }[case]


@pytest.mark.parametrize(
    "case",
    ["u wrong width", "u 1-D", "u no rows", "u not a tensor", "u int", "u on meta",
     "delta wrong width", "delta wrong rows", "delta int", "delta on meta"],
)
def test_pseudo_factors_reject_bad_rows(case):
    model = make_model("gpt2")
    editor = _editor(model)
    target = editor.targets[0]
    u, delta = _bad_rows(case, target)
    argument = case.split()[0]
    message = _raises(mk.InvalidInputError, [argument], lambda: editor.pseudo_factors(target.name, u, delta),
                      model=model, editor=editor)
    assert message.startswith(argument + " "), message
    if "int" in case:
        assert "dtype" in message
    if "meta" in case:
        assert "meta" in message


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("side", ["u", "delta"])
def test_pseudo_factors_reject_non_finite_rows(bad, side):
    model = make_model("llama")
    editor = _editor(model)
    target = editor.targets[4]
    u, delta = _rows(target)
    (u if side == "u" else delta)[2, 3] = bad
    _raises(mk.NonFiniteError, [target.name], lambda: editor.pseudo_factors(target.name, u, delta),
            model=model, editor=editor)


def test_pseudo_factors_reject_an_unknown_weight():
    model = make_model("gpt2")
    editor = _editor(model)
    u, delta = _rows(editor.targets[0])
    _raises(mk.TargetError, ["transformer.h.1.mlp.c_fc.weigth", "transformer.h.1.mlp.c_fc.weight"],
            lambda: editor.pseudo_factors("transformer.h.1.mlp.c_fc.weigth", u, delta), model=model, editor=editor)


def test_pseudo_factors_reject_rows_without_signal():
    model = make_model("gpt2")
    editor = _editor(model)
    target = editor.targets[1]
    u, delta = _rows(target)
    delta.zero_()
    _raises(mk.InvalidInputError, [target.name], lambda: editor.pseudo_factors(target.name, u, delta),
            model=model, editor=editor)


# ------------------------------------------------------------------------------------- requests
def _bad_request(case: str, kind: str) -> dict:
    batch = edit_batch(kind)
    input_ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    no_label = labels.clone()
    no_label[1] = -100
    first_only = torch.full_like(labels, -100)
    first_only[:, 0] = input_ids[:, 0]
    high = input_ids.clone()
    high[0, 2] = VOCAB
    negative = input_ids.clone()
    negative[1, 0] = -1
    bad_label = labels.clone()
    bad_label[0, -1] = VOCAB + 5
    cases = {
        "float input_ids": dict(batch, input_ids=input_ids.float()),
        "1-D input_ids": dict(batch, input_ids=input_ids[0], attention_mask=mask[0], labels=labels[0]),
        "empty batch": dict(input_ids=input_ids[:0], attention_mask=mask[:0], labels=labels[:0]),
        "no tokens": dict(input_ids=input_ids[:, :0], attention_mask=mask[:, :0], labels=labels[:, :0]),
        "input_ids on meta": dict(batch, input_ids=input_ids.to("meta")),
        "input_ids above vocab": dict(batch, input_ids=high),
        "negative input_ids": dict(batch, input_ids=negative),
        "labels shape": dict(batch, labels=labels[:, :-1] if kind not in ("bart", "t5") else labels[:1]),
        "float labels": dict(batch, labels=labels.float()),
        "labels all -100": dict(batch, labels=no_label),
        "labels above vocab": dict(batch, labels=bad_label),
        "labels missing": dict(input_ids=input_ids, attention_mask=mask),
        "attention_mask shape": dict(batch, attention_mask=mask[:, :-1]),
    }
    cases["label only on first token (causal)"] = dict(batch, labels=first_only)
    return cases[case]


REQUEST_CASES = {
    "float input_ids": "input_ids",
    "1-D input_ids": "input_ids",
    "empty batch": "input_ids",
    "no tokens": "input_ids",
    "input_ids on meta": "input_ids",
    "input_ids above vocab": "input_ids",
    "negative input_ids": "input_ids",
    "labels shape": "labels",
    "float labels": "labels",
    "labels all -100": "labels",
    "labels above vocab": "labels",
    "labels missing": "labels",
    "attention_mask shape": "attention_mask",
    "label only on first token (causal)": "labels",
}


@pytest.mark.parametrize(
    "kind, case",
    [(kind, case) for kind in ("gpt2", "bart") for case in sorted(REQUEST_CASES)
     if not (kind == "bart" and "causal" in case)],  # no label shift in seq2seq
)
def test_bad_token_requests_raise_invalid_input(kind, case):
    model = make_model(kind)
    editor = _editor(model)
    request = _bad_request(case, kind)
    _raises(mk.InvalidInputError, [REQUEST_CASES[case]], lambda: editor.edit(model, **request),
            model=model, editor=editor)


def test_request_without_target_names_the_request():
    model = make_model("llama")
    editor = _editor(model)
    request = edit_batch("llama", n_requests=3)
    request["labels"][2] = -100
    message = _raises(mk.InvalidInputError, ["labels", "[2]"], lambda: editor.edit(model, **request),
                      model=model, editor=editor)
    assert "[0" not in message


@pytest.mark.parametrize(
    "arguments, fragment",
    [
        (dict(prompts=["a b"], targets=["c"]), "tokenizer"),
        (dict(prompts="a b", targets="c", tokenizer=object()), "prompts"),
        (dict(prompts=["a b", "c"], targets=["d"], tokenizer=object()), "prompts"),
        (dict(prompts=["a b"], targets=["  "], tokenizer=object()), "target 0"),
        (dict(edit_batch("gpt2"), prompts=["a"], targets=["b"], tokenizer=object()), "prompts"),
    ],
)
def test_bad_text_requests_raise_invalid_input(arguments, fragment):
    model = make_model("gpt2")
    editor = _editor(model)
    _raises(mk.InvalidInputError, [fragment], lambda: editor.edit(model, **arguments), model=model, editor=editor)


# ------------------------------------------------------------------------------- non-finite values
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_nan_embedding_gives_non_finite_error_naming_the_layer(kind):
    model = copy.deepcopy(make_model(kind))
    request = edit_batch(kind)
    with torch.no_grad():
        model.get_input_embeddings().weight[request["input_ids"][0, 0]] = math.nan
    editor = _editor(model)
    _raises(mk.NonFiniteError, ["captured rows of " + editor.targets[0].name],
            lambda: editor.edit(model, **request), model=model, editor=editor)


@pytest.mark.parametrize(
    "parameter, index, value, output",
    [
        ("bias", (-1, 0), math.inf, "u~"),
        ("bias", (-1, -1), math.nan, "delta~"),
        ("mode_shift", (0, "mode", 0), math.nan, "u~"),
        ("mode_scale", (1, "mode", -1), math.inf, "delta~"),
        ("up_proj", (1, -1, 0), math.inf, "delta~"),
    ],
)
def test_non_finite_editor_output_changes_nothing(parameter, index, value, output):
    model = make_model("gpt2")
    editor = _editor(model)
    last = editor.targets[-1]  # edited last: no earlier weight may be changed either
    members = [t.name for t in editor.targets if t.shape_key == last.shape_key]
    mode = members.index(last.name)
    with torch.no_grad():
        getattr(editor.groups[last.shape_key], parameter)[tuple(mode if i == "mode" else i for i in index)] = value
    message = _raises(mk.NonFiniteError, [output], lambda: editor.edit(model, **edit_batch("gpt2")), model=model)
    if parameter.startswith("mode_"):  # only the last weight's mode is broken
        assert last.name in message
    else:  # the whole shape group is broken
        assert any(name in message for name in members), message


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_step_size_changes_nothing(value):
    model = make_model("llama")
    editor = _editor(model)
    with torch.no_grad():
        editor.edit_lrs[-1] = value
    _raises(mk.NonFiniteError, ["step size", editor.targets[-1].name],
            lambda: editor.edit(model, **edit_batch("llama")), model=model)


# ---------------------------------------------------------------------------- editor/model mismatch
@pytest.mark.parametrize(
    "source, other, request_kind, fragment",
    [
        (lambda: make_model("gpt2"), lambda: make_model("llama"), "llama", "transformer.h.1.mlp.c_fc.weight"),
        (lambda: make_model("gpt2"), lambda: _gpt2_of_width(32), "gpt2", "editor was built for"),
        (lambda: make_model("bart"), lambda: make_model("t5"), "t5", "model.encoder.layers.1.fc1.weight"),
        (lambda: make_model("gpt2"), lambda: make_model("gpt_neo"), "gpt_neo", "conv1d"),
    ],
    ids=["gpt2-on-llama", "gpt2-on-wider-gpt2", "bart-on-t5", "gpt2-on-gpt_neo"],
)
def test_editor_on_a_model_without_its_weights_raises_target_error(source, other, request_kind, fragment):
    editor = _editor(source())
    model = other()
    request = edit_batch(request_kind)
    _raises(mk.TargetError, [fragment], lambda: editor.edit(model, **request), model=model, editor=editor)
    _raises(mk.TargetError, [fragment], lambda: editor.compute_edit(model, **request), model=model, editor=editor)


def test_eval_editor_without_statistics_raises_invalid_input():
    model = make_model("gpt2")
    editor = _editor(model).eval()
    _raises(mk.InvalidInputError, ["statistics"], lambda: editor.edit(model, **edit_batch("gpt2")),
            model=model, editor=editor)


@pytest.mark.parametrize(
    "options, fragment",
    [(dict(rank=0), "rank"), (dict(sign=0.5), "sign"), (dict(edit_lr=-1e-4), "edit_lr"),
     (dict(edit_lr=math.nan), "edit_lr"), (dict(v_init="uniform"), "v_init"), (dict(n_hidden=-1), "n_hidden")],
)
def test_bad_editor_options_raise_invalid_input(options, fragment):
    model = make_model("gpt2")
    before = _snapshot(model)
    with pytest.raises(mk.InvalidInputError, match=fragment):
        mk.MENDEditor.for_model(model, **options)
    _assert_same(model, before, "model weights")


def test_unknown_backend_changes_nothing():
    model = make_model("gpt2")
    editor = _editor(model)
    _raises(mk.InvalidInputError, ["backend", "bogus"],
            lambda: editor.edit(model, **edit_batch("gpt2"), backend="bogus"), model=model)


# ------------------------------------------------------------------------------------- checkpoints
def _saved_editor(tmp_path, kind: str = "gpt2"):
    model = make_model(kind)
    editor = _warm_editor(kind, model)
    editor.save(tmp_path)
    return model, editor


@pytest.mark.parametrize(
    "other, fragment",
    [(lambda: _gpt2_of_width(32), "transformer.h.1.mlp.c_fc.weight"), (lambda: make_model("llama"), "does not match")],
    ids=["wider-gpt2", "llama"],
)
def test_loading_an_editor_for_another_model_raises_checkpoint_error(tmp_path, other, fragment):
    _saved_editor(tmp_path)
    model = other()
    _raises(mk.CheckpointError, [fragment, str(tmp_path)], lambda: mk.MENDEditor.load(tmp_path, model), model=model)


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    "corrupt",
    [_truncate, lambda data: data[:5], lambda data: b"", lambda data: b"\x00" * 64,
     lambda data: (100).to_bytes(8, "little") + b"{" * 100],
    ids=["truncated", "header-cut", "empty", "zeros", "bad-header"],
)
def test_corrupt_weights_file_raises_checkpoint_error(tmp_path, corrupt):
    model, _ = _saved_editor(tmp_path)
    path = tmp_path / "editor.safetensors"
    path.write_bytes(corrupt(path.read_bytes()))
    _raises(mk.CheckpointError, [str(tmp_path)], lambda: mk.MENDEditor.load(tmp_path, model), model=model)


def _rewrite_tensors(tmp_path, change: Callable[[dict], None]) -> None:
    path = tmp_path / "editor.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize(
    "change, fragment",
    [
        (lambda t: t["groups.24x96.bias"].__setitem__((0, 0), math.nan), "groups.24x96.bias"),
        (lambda t: t.__setitem__("groups.24x96.up_proj", t["groups.24x96.up_proj"][:, :, :4].contiguous()),
         "groups.24x96.up_proj"),
        (lambda t: t.__setitem__("edit_lrs", t["edit_lrs"].double()), "edit_lrs"),
        (lambda t: t.pop("groups.96x24.mean"), "groups.96x24.mean"),
        (lambda t: t.__setitem__("extra", torch.zeros(2)), "extra"),
    ],
    ids=["nan", "wrong-shape", "wrong-dtype", "missing", "unexpected"],
)
def test_inconsistent_weights_file_raises_checkpoint_error(tmp_path, change, fragment):
    model, _ = _saved_editor(tmp_path)
    _rewrite_tensors(tmp_path, change)
    _raises(mk.CheckpointError, [fragment], lambda: mk.MENDEditor.load(tmp_path, model), model=model)


def test_missing_files_raise_checkpoint_error(tmp_path):
    model, _ = _saved_editor(tmp_path)
    _raises(mk.CheckpointError, [str(tmp_path / "nowhere")], lambda: mk.MENDEditor.load(tmp_path / "nowhere", model),
            model=model)
    (tmp_path / "editor.safetensors").unlink()
    _raises(mk.CheckpointError, ["editor.safetensors"], lambda: mk.MENDEditor.load(tmp_path, model), model=model)


def _edit_config(tmp_path, change: Callable[[dict], object]) -> None:
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    replaced = change(config)
    path.write_text(json.dumps(config if replaced is None else replaced))


FUTURE_VERSION = 99
CONFIG_DAMAGE = {
    "truncated-json": None,
    "missing-targets": lambda c: c.pop("targets") and None,
    "unknown-field": lambda c: c.update(bogus=1),
    "future-version": lambda c: c.update(format_version=FUTURE_VERSION),
    "rank-mismatch": lambda c: c.update(rank=4),
    "target-missing-field": lambda c: c["targets"][0].pop("layout") and None,
    "target-unknown-field": lambda c: c["targets"][0].update(block=3),
    "not-an-object-list": lambda c: [1, 2],
    "not-an-object-string": lambda c: "editor",
    "invalid-sign": lambda c: c.update(sign=0.5),
    "invalid-rank": lambda c: c.update(rank=-1),
    "no-targets": lambda c: c.update(targets=[]),
}


@pytest.mark.parametrize("damage", sorted(CONFIG_DAMAGE))
def test_broken_config_raises_checkpoint_error(tmp_path, damage):
    model, _ = _saved_editor(tmp_path)
    if damage == "truncated-json":
        path = tmp_path / "config.json"
        path.write_text(path.read_text()[:40])
    else:
        _edit_config(tmp_path, CONFIG_DAMAGE[damage])
    _raises(mk.CheckpointError, [], lambda: mk.MENDEditor.load(tmp_path, model), model=model)


def test_corrupt_edit_file_raises_checkpoint_error(tmp_path):
    path = tmp_path / "edit.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(mk.CheckpointError, match="edit.safetensors"):
        mk.load_edits(path)
    save_file({"x.u": torch.zeros(1, 2)}, str(path))  # no layout metadata
    with pytest.raises(mk.CheckpointError, match="edit.safetensors"):
        mk.load_edits(path)


# ------------------------------------------------------------------------------------- apply_edits
def _valid_edits(kind: str, model: torch.nn.Module) -> list[mk.WeightEdit]:
    editor = _editor(model)
    with torch.no_grad():
        return editor.compute_edit(model, **edit_batch(kind))


def _replace_last(edits: list[mk.WeightEdit], **fields) -> list[mk.WeightEdit]:
    last = edits[-1]
    values = dict(name=last.name, layout=last.layout, u=last.u, delta=last.delta, scale=last.scale)
    values.update(fields)
    return edits[:-1] + [mk.WeightEdit(**values)]


def _bad_edits(case: str, edits: list[mk.WeightEdit]) -> list[mk.WeightEdit]:
    last = edits[-1]
    if case == "u~ wrong width":
        return _replace_last(edits, u=torch.randn(last.u.shape[0], last.u.shape[1] + 2))
    if case == "delta~ wrong width":
        return _replace_last(edits, delta=torch.randn(last.delta.shape[0], last.delta.shape[1] - 1))
    if case == "delta~ wrong rows":
        return _replace_last(edits, delta=last.delta[:-1])
    if case == "u~ float64":
        return _replace_last(edits, u=last.u.double())
    if case == "delta~ float64":
        return _replace_last(edits, delta=last.delta.double())
    if case == "u~ on meta":
        return _replace_last(edits, u=last.u.to("meta"))
    if case == "u~ nan":
        u = last.u.clone()
        u[0, 0] = math.nan
        return _replace_last(edits, u=u)
    if case == "unknown weight":
        return _replace_last(edits, name="transformer.h.9.mlp.c_fc.weight")
    if case == "wrong layout":
        return _replace_last(edits, layout="linear")
    if case == "duplicate weight":
        return edits + [edits[0]]
    raise AssertionError(case)


APPLY_CASES = {
    "u~ wrong width": (mk.InvalidInputError, "u~ of"),
    "delta~ wrong width": (mk.InvalidInputError, "delta~ of"),
    "delta~ wrong rows": (mk.InvalidInputError, "delta~ of"),
    "u~ float64": (mk.InvalidInputError, "u~ of"),
    "delta~ float64": (mk.InvalidInputError, "delta"),
    "u~ on meta": (mk.InvalidInputError, "u~ of"),
    "u~ nan": (mk.NonFiniteError, "u~ of"),
    "unknown weight": (mk.TargetError, "transformer.h.9.mlp.c_fc.weight"),
    "wrong layout": (mk.TargetError, "conv1d"),
    "duplicate weight": (mk.TargetError, "more than once"),
}


@pytest.mark.parametrize("case", sorted(APPLY_CASES))
def test_apply_edits_rejects_bad_edits_and_changes_nothing(case):
    model = make_model("gpt2")
    edits = _bad_edits(case, _valid_edits("gpt2", model))
    error, fragment = APPLY_CASES[case]
    message = _raises(error, [fragment], lambda: mk.apply_edits(model, edits), model=model)
    if case not in ("unknown weight", "duplicate weight", "delta~ float64"):
        assert edits[-1].name in message


def test_apply_edits_of_another_architecture_raise_target_error():
    edits = _valid_edits("gpt2", make_model("gpt2"))
    model = make_model("llama")
    _raises(mk.TargetError, [edits[0].name], lambda: mk.apply_edits(model, edits), model=model)


class _FailOnCall:
    """Wraps ``ops.rank_updates_`` (one call per edit): raises on the ``fail_at``-th call, after the
    real update when ``after_update`` (a failure once the weights changed, e.g. an interrupt)."""

    def __init__(self, real, fail_at: int, error: BaseException, *, after_update: bool):
        self.real, self.fail_at, self.error, self.after_update, self.calls = real, fail_at, error, after_update, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls != self.fail_at:
            return self.real(*args, **kwargs)
        if self.after_update:
            self.real(*args, **kwargs)
        raise self.error


@pytest.mark.parametrize("error", [RuntimeError("kernel failure"), KeyboardInterrupt()], ids=["runtime", "interrupt"])
def test_failure_after_the_update_in_apply_edits_restores_every_weight(monkeypatch, error):
    model = make_model("gpt2")
    edits = _valid_edits("gpt2", model)
    patched = _FailOnCall(mk.ops.rank_updates_, 1, error, after_update=True)
    monkeypatch.setattr(mk.ops, "rank_updates_", patched)
    _raises(type(error), [], lambda: mk.apply_edits(model, edits), model=model)
    assert patched.calls == 1  # every weight was updated before the failure, then restored
    monkeypatch.undo()
    # nothing is left registered: a fresh edit applies and reverts cleanly
    before = _snapshot(model)
    mk.apply_edits(model, edits).revert()
    _assert_same(model, before, "model weights after apply + revert")


def test_failure_after_the_update_in_editor_edit_restores_every_weight(monkeypatch):
    model = make_model("llama")
    editor = _editor(model)
    patched = _FailOnCall(mk.ops.rank_updates_, 1, RuntimeError("kernel failure"), after_update=True)
    monkeypatch.setattr(mk.ops, "rank_updates_", patched)
    _raises(RuntimeError, ["kernel failure"], lambda: editor.edit(model, **edit_batch("llama")), model=model)
    assert patched.calls == 1


def test_failed_batched_update_without_originals_leaves_every_weight_untouched(monkeypatch):
    model = make_model("gpt2")
    edits = _valid_edits("gpt2", model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    failing = _FailOnCall(mk.ops.rank_updates_, 1, RuntimeError("kernel failure"), after_update=False)
    monkeypatch.setattr(mk.ops, "rank_updates_", failing)
    with pytest.raises(RuntimeError, match="kernel failure"):
        mk.apply_edits(model, edits, keep_original=False)
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name]), name


def test_gradient_checkpointing_is_refused_with_a_clear_message():
    model = make_model("gpt2")
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()  # transformers 5 renamed gradient_checkpointing_enable
    editor = mk.MENDEditor.for_model(model, rank=8)
    before = _snapshot(model)
    with pytest.raises(mk.InvalidInputError, match="gradient checkpointing"):
        editor.edit(model, **edit_batch("gpt2"))
    _assert_same(model, before, "gradient checkpointing")


def test_malformed_edit_file_metadata_is_a_checkpoint_error(tmp_path):
    from safetensors.torch import save_file

    save_file({"w.u": torch.zeros(1, 2)}, str(tmp_path / "edits.safetensors"), metadata={"layouts": "[1, 2]"})
    with pytest.raises(mk.CheckpointError, match="cannot read edits"):
        mk.load_edits(tmp_path / "edits.safetensors")
