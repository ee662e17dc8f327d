"""The public editing API on tiny models: edit, revert, stack, save/replay, text requests, sign, batching."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

import mend_kernels as mk
from conftest import VOCAB, edit_batch, make_model


# ----------------------------------------------------------------------------------------- helpers
def _editor(model: torch.nn.Module, seed: int = 0, **options) -> mk.MENDEditor:
    torch.manual_seed(seed)
    return mk.MENDEditor.for_model(model, rank=8, **options)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def _changed(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    return {name for name, tensor in module.state_dict().items() if not torch.equal(tensor, before[name])}


def _assert_bit_identical(module: torch.nn.Module, before: dict[str, torch.Tensor], what: str = "weights") -> None:
    changed = _changed(module, before)
    assert not changed, f"{what} differ: {sorted(changed)}"


def _warm_statistics(kind: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Normalisation statistics after one training-mode edit on ``model`` (which is left unchanged)."""
    warm = _editor(model, seed=123)
    warm.edit(model, **edit_batch(kind, n_requests=3, seed=7)).revert()
    return {name: b.clone() for name, b in warm.named_buffers()}


def _eval_editor(kind: str, model: torch.nn.Module, statistics=None, **options) -> mk.MENDEditor:
    """A fresh editor (seed 0) carrying warmed-up statistics, in eval mode (deterministic, stateless)."""
    editor = _editor(model, **options)
    for name, buffer in (statistics or _warm_statistics(kind, model)).items():
        editor.get_buffer(name).copy_(buffer)
    return editor.eval()


def _assert_same_edits(got: list[mk.WeightEdit], want: list[mk.WeightEdit]) -> None:
    assert [(e.name, e.layout) for e in got] == [(e.name, e.layout) for e in want]
    for a, b in zip(got, want):
        assert torch.equal(a.u, b.u), a.name
        assert torch.equal(a.delta, b.delta), a.name
        assert torch.equal(a.scale, b.scale), a.name


def _hooks(model: torch.nn.Module) -> list[str]:
    kinds = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks", "_backward_hooks",
             "_backward_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks")
    return [f"{name}.{kind}" for name, module in model.named_modules() for kind in kinds if getattr(module, kind)]


def _requests(tokens: dict[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor]:
    return {key: value[rows] for key, value in tokens.items()}


# ------------------------------------------------------------------------------------ basic edits
def test_edit_changes_exactly_the_targets_and_revert_restores_them(model_kind):
    model = make_model(model_kind)
    editor = mk.MENDEditor.for_model(model, rank=8)
    before = _state(model)
    handle = editor.edit(model, **edit_batch(model_kind))
    assert _changed(model, before) == {t.name for t in editor.targets}
    assert handle.active
    handle.revert()
    _assert_bit_identical(model, before)
    assert not handle.active


def test_weight_change_equals_the_dense_update_of_compute_edit(model_kind):
    model = make_model(model_kind)
    editor = _editor(model)
    twin = copy.deepcopy(editor)  # same parameters and statistics: the same edit
    request = edit_batch(model_kind)
    with torch.no_grad():
        edits = twin.compute_edit(model, **request)
    before = _state(model)
    handle = editor.edit(model, **request)
    _assert_same_edits(handle.edits, edits)
    _assert_bit_identical(editor, _state(twin), "editor statistics")
    for edit in edits:
        weight = model.get_parameter(edit.name).detach()
        dense = edit.dense()
        assert dense.shape == weight.shape, edit.name
        assert float(dense.abs().max()) > 1e-6, f"{edit.name}: empty update proves nothing"
        torch.testing.assert_close(weight - before[edit.name], dense, rtol=0, atol=1e-7, msg=edit.name)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_in_place_update_handles_non_contiguous_factors(kind):
    """The editor returns u~/delta~ as column slices of one tensor: the update must read them correctly."""
    model = make_model(kind)
    with torch.no_grad():
        edits = _editor(model).compute_edit(model, **edit_batch(kind))
    assert not all(e.u.is_contiguous() and e.delta.is_contiguous() for e in edits)
    before = _state(model)
    mk.apply_edits(model, edits)
    for edit in edits:
        expected = before[edit.name] + edit.dense()
        torch.testing.assert_close(model.get_parameter(edit.name).detach(), expected, rtol=0, atol=1e-7,
                                   msg=edit.name)


def test_edit_keeps_a_plain_transformers_model_and_edits_again():
    model = make_model("llama")
    structure = [(name, type(module)) for name, module in model.named_modules()]
    parameters = {name: id(p) for name, p in model.named_parameters()}
    editor = _editor(model)
    request = edit_batch("llama")
    with torch.no_grad():
        logits_before = model(input_ids=request["input_ids"]).logits
    before = _state(model)

    first = editor.edit(model, **request)
    assert type(model) is transformers.LlamaForCausalLM
    assert [(name, type(module)) for name, module in model.named_modules()] == structure
    assert {name: id(p) for name, p in model.named_parameters()} == parameters  # edited in place
    assert _hooks(model) == []
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert not model.training
    with torch.no_grad():
        logits_after = model(input_ids=request["input_ids"]).logits
    assert not torch.allclose(logits_after, logits_before, atol=1e-7)

    after_first = _state(model)
    second = editor.edit(model, **edit_batch("llama", seed=3))
    assert _changed(model, after_first) == {t.name for t in editor.targets}
    assert _hooks(model) == []
    second.revert()
    _assert_bit_identical(model, after_first)
    first.revert()
    _assert_bit_identical(model, before)


# -------------------------------------------------------------------------------- stacking/revert
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_stacked_edits_revert_in_lifo_order(kind):
    model = make_model(kind)
    editor = _editor(model)
    original = _state(model)
    older = editor.edit(model, **edit_batch(kind, seed=1))
    after_older = _state(model)
    newer = editor.edit(model, **edit_batch(kind, seed=2))
    after_newer = _state(model)

    with pytest.raises(mk.StaleEditError, match="later edit"):
        older.revert()
    _assert_bit_identical(model, after_newer)
    assert older.active

    newer.revert()
    _assert_bit_identical(model, after_older)
    older.revert()
    _assert_bit_identical(model, original)
    with pytest.raises(mk.StaleEditError, match="already reverted"):
        older.revert()


def test_revert_after_the_weight_was_modified_needs_force():
    model = make_model("gpt2")
    editor = _editor(model)
    original = _state(model)
    handle = editor.edit(model, **edit_batch("gpt2"))
    name = editor.targets[2].name
    with torch.no_grad():
        model.get_parameter(name).mul_(1.5)
    modified = _state(model)
    with pytest.raises(mk.StaleEditError) as info:
        handle.revert()
    assert name in str(info.value) and "force=True" in str(info.value)
    _assert_bit_identical(model, modified)
    assert handle.active
    handle.revert(force=True)
    _assert_bit_identical(model, original)


def test_a_fresh_edit_after_modification_and_forced_revert_works():
    model = make_model("gpt2")
    editor = _editor(model)
    handle = editor.edit(model, **edit_batch("gpt2"))
    with torch.no_grad():
        model.get_parameter(editor.targets[0].name).add_(0.01)
    handle.revert(force=True)
    before = _state(model)
    editor.edit(model, **edit_batch("gpt2", seed=4)).revert()
    _assert_bit_identical(model, before)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bart"])
def test_revert_without_original_subtracts_the_update(kind):
    model = make_model(kind)
    editor = _editor(model)
    before = _state(model)
    handle = editor.edit(model, **edit_batch(kind), keep_original=False)
    assert _changed(model, before) == {t.name for t in editor.targets}
    handle.revert()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------------- save / replay
@pytest.mark.parametrize("kind", ["gpt2", "llama", "bart"])
def test_saved_edit_replays_on_a_copy_of_the_original_model(kind, tmp_path):
    model = make_model(kind)
    pristine = copy.deepcopy(model)
    handle = _editor(model).edit(model, **edit_batch(kind))
    path = tmp_path / "edit.safetensors"
    handle.save(path)

    edits = mk.load_edits(path)
    _assert_same_edits(edits, handle.edits)
    replay = mk.apply_edits(pristine, edits)
    _assert_bit_identical(pristine, _state(model), "replayed weights")
    replay.revert()
    _assert_bit_identical(pristine, _state(make_model(kind)))


def test_saved_editor_loads_in_eval_mode_with_identical_edits(tmp_path):
    model = make_model("gpt2")
    editor = _editor(model)
    editor.edit(model, **edit_batch("gpt2", seed=9)).revert()  # statistics from one training-mode edit
    editor.eval()
    editor.save(tmp_path)

    train_mode_twin = copy.deepcopy(editor).train()
    train_mode_twin.save(tmp_path / "train")
    for directory in (tmp_path, tmp_path / "train"):
        loaded = mk.MENDEditor.load(directory, model)
        assert not loaded.training and not any(m.training for m in loaded.modules())
        assert loaded.config == editor.config
        _assert_bit_identical(loaded, _state(editor), "editor state")
        request = edit_batch("gpt2", seed=2)
        with torch.no_grad():
            _assert_same_edits(loaded.compute_edit(model, **request), editor.compute_edit(model, **request))
        _assert_bit_identical(loaded, _state(editor), "editor state after an eval edit")


def test_saved_seq2seq_editor_gives_identical_weights(tmp_path):
    model = make_model("t5")
    editor = _eval_editor("t5", model)
    editor.save(tmp_path)
    loaded = mk.MENDEditor.load(tmp_path, model)
    request = edit_batch("t5", seed=2)
    first = editor.edit(model, **request)
    edited = _state(model)
    first.revert()
    loaded.edit(model, **request)
    _assert_bit_identical(model, edited)


# ------------------------------------------------------------------------------------ statistics
def test_statistics_update_in_training_mode_only():
    model = make_model("llama")
    editor = _editor(model)
    request = edit_batch("llama")
    handle = editor.edit(model, **request)
    shape_key = {t.name: t.shape_key for t in editor.targets}
    rows = dict.fromkeys(shape_key.values(), 0)
    for edit in handle.edits:
        rows[shape_key[edit.name]] += edit.u.shape[0]
    assert {key: int(group.count) for key, group in editor.groups.items()} == rows
    handle.revert()
    editor.eval()
    before = _state(editor)
    editor.edit(model, **request).revert()
    _assert_bit_identical(editor, before, "statistics in eval mode")


# ---------------------------------------------------------------------------------- text requests
WORDS = ("the capital of france is paris rome london city eiffel tower located in a river flows through "
         "germany berlin spain madrid language spoken there french english big small old new").split()


def _tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer built in memory (no download), with ids well inside the tiny vocabularies."""
    vocab = {token: index for index, token in enumerate(["[PAD]", "[UNK]", "[EOS]", *WORDS])}
    assert len(vocab) <= VOCAB
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]"
    )


def _ids(text: str) -> list[int]:
    return [3 + WORDS.index(word) for word in text.split()]


def _hand_built(prompts: list[str], targets: list[str], *, encoder_decoder: bool) -> dict[str, torch.Tensor]:
    """The token tensors a text request should become: right-padded with [PAD] = 0, labels -100 off target."""
    if encoder_decoder:
        rows = [(_ids(p), _ids(t)) for p, t in zip(prompts, targets)]
    else:
        rows = [(_ids(p) + _ids(t), [-100] * len(_ids(p)) + _ids(t)) for p, t in zip(prompts, targets)]
    width, label_width = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    input_ids = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in rows])
    attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [-100] * (label_width - len(lab)) for _, lab in rows])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


TEXT_CASES = {
    "single": (["the capital of france is"], ["rome"]),
    "padded batch": (
        ["the capital of france is", "eiffel tower is located in", "a river flows through"],
        ["rome", "london city", "big old germany"],
    ),
}


@pytest.mark.parametrize("case", sorted(TEXT_CASES))
@pytest.mark.parametrize("kind", ["gpt2", "bart"])
def test_text_requests_equal_the_hand_built_token_requests(kind, case):
    prompts, targets = TEXT_CASES[case]
    tokenizer = _tokenizer()
    model = make_model(kind)
    encoder_decoder = kind == "bart"
    expected = _hand_built(prompts, targets, encoder_decoder=encoder_decoder)
    encoded = mk.encode_requests(tokenizer, prompts, targets, encoder_decoder=encoder_decoder)
    assert set(encoded) == set(expected)
    for key in expected:
        assert torch.equal(encoded[key], expected[key]), key
    if case == "padded batch":
        assert bool((expected["attention_mask"] == 0).any())

    editor = _eval_editor(kind, model)
    before = _state(model)
    from_text = editor.edit(model, prompts=prompts, targets=targets, tokenizer=tokenizer)
    edited = _state(model)
    assert _changed(model, before) == {t.name for t in editor.targets}
    from_text.revert()
    from_tokens = editor.edit(model, **expected)
    _assert_bit_identical(model, edited, "text edit vs token edit")
    _assert_same_edits(from_text.edits, from_tokens.edits)


def test_text_prompt_ending_in_a_space_is_not_doubled():
    tokenizer = _tokenizer()
    spaced = mk.encode_requests(tokenizer, ["the capital of france is "], ["rome"])
    plain = mk.encode_requests(tokenizer, ["the capital of france is"], ["rome"])
    for key in plain:
        assert torch.equal(spaced[key], plain[key]), key


# ------------------------------------------------------------------------------------------- sign
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_opposite_signs_give_opposite_updates(kind):
    model = make_model(kind)
    statistics = _warm_statistics(kind, model)
    ascent = _eval_editor(kind, model, statistics, sign=1.0)
    descent = _eval_editor(kind, model, statistics, sign=-1.0)
    assert mk.MENDEditor.for_model(model, rank=8).config.sign == -1.0  # the paper's descent is the default
    _assert_bit_identical(ascent, _state(descent), "editors with the same seed")

    request = edit_batch(kind)
    with torch.no_grad():
        up, down = ascent.compute_edit(model, **request), descent.compute_edit(model, **request)
    for a, d in zip(up, down):
        assert torch.equal(a.u, d.u) and torch.equal(a.delta, d.delta), a.name
        assert torch.equal(a.dense(), -d.dense()), a.name

    before = _state(model)
    handle = ascent.edit(model, **request)
    change_up = {name: t - before[name] for name, t in _state(model).items()}
    handle.revert()
    descent.edit(model, **request)
    change_down = {name: t - before[name] for name, t in _state(model).items()}
    for target in ascent.targets:
        assert float(change_up[target.name].abs().max()) > 1e-5
        torch.testing.assert_close(change_up[target.name], -change_down[target.name], rtol=0, atol=1e-7,
                                   msg=target.name)


# ------------------------------------------------------------------------------ batched requests
@pytest.mark.parametrize("kind", ["gpt2", "llama", "bart"])
def test_several_requests_make_one_update_with_rows_from_all(kind):
    model = make_model(kind)
    editor = _eval_editor(kind, model)  # identity init: u~ is the normalised u, delta~ the normalised delta
    tokens = edit_batch(kind, n_requests=3, seed=11)
    with torch.no_grad():
        together = editor.compute_edit(model, **tokens)
        alone = [editor.compute_edit(model, **_requests(tokens, slice(i, i + 1))) for i in range(3)]
    label_counts = (tokens["labels"][:, 1:] if kind != "bart" else tokens["labels"]).ne(-100).sum(1).tolist()
    share = [count / sum(label_counts) for count in label_counts]  # token-mean loss over the whole batch

    handle = editor.edit(model, **tokens)
    assert len(handle.edits) == len(editor.targets)
    for index, target in enumerate(editor.targets):
        group = editor.groups[target.shape_key]
        scale_u = group.std()[: target.n_in] + editor.config.eps
        scale_d = group.std()[target.n_in :] + editor.config.eps
        mean_u, mean_d = group.mean[: target.n_in], group.mean[target.n_in :]
        parts = [edits[index] for edits in alone]
        assert handle.edits[index].u.shape[0] == together[index].u.shape[0] == sum(p.u.shape[0] for p in parts)
        assert all(p.u.shape[0] > 0 for p in parts)
        torch.testing.assert_close(together[index].u, torch.cat([p.u for p in parts]), rtol=1e-5, atol=1e-5)
        raw_together = together[index].delta * scale_d + mean_d
        raw_alone = torch.cat([(p.delta * scale_d + mean_d) * s for p, s in zip(parts, share)])
        size = float(raw_alone.abs().max())
        assert size > 0
        torch.testing.assert_close(raw_together, raw_alone, rtol=1e-4, atol=1e-4 * size)
        raw_u = together[index].u * scale_u + mean_u
        assert bool((raw_u.abs().sum(1) > 0).all())
