"""Memory-constrained editing: streamed checkpoints, atomic write-back, delta files, accelerate
dispatch and offload, bf16 accumulation and the memory of an in-memory edit."""

from __future__ import annotations

import copy
import hashlib
import json
import os

import pytest
import torch
import transformers

import mend_kernels as mk
from benchmarks.harness import allocator_peak_bytes
from conftest import edit_batch, make_model
from mend_kernels import streaming
from mend_kernels.streaming import StreamedModel, load_with_deltas, offloaded_weights_attached


# ----------------------------------------------------------------------------------------- helpers
def _checkpoint(tmp_path, kind: str, shard_size: str | None = "30KB"):
    """A tiny model of ``kind`` saved as several shards (or one file), and an editor for it."""
    model = make_model(kind)
    directory = tmp_path / kind
    model.save_pretrained(directory, **({"max_shard_size": shard_size} if shard_size else {}))
    torch.manual_seed(0)
    return model, directory, mk.MENDEditor.for_model(model, rank=8)


def _files(directory) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def _reload(directory) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(directory).eval()


def _assert_same_weights(got: torch.nn.Module, want: torch.nn.Module) -> None:
    want_state = want.state_dict()
    for name, tensor in got.state_dict().items():
        torch.testing.assert_close(tensor, want_state[name], rtol=1e-6, atol=1e-7, msg=name)


# ------------------------------------------------------------------------------ streaming == memory
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_streamed_edit_equals_in_memory_edit(tmp_path, kind):
    model, directory, editor = _checkpoint(tmp_path, kind)
    assert len(json.loads((directory / streaming.INDEX_FILE).read_text())["weight_map"]) > 1
    streamed_editor, batch = copy.deepcopy(editor), edit_batch(kind)
    want = editor.compute_edit(model, **batch)  # training mode: both editors update the same statistics
    with StreamedModel.open(directory) as streamed:
        lower = streamed.model.get_submodule(streamed.streamed_blocks[0])
        got = streamed.edit(streamed_editor, **batch)
        assert all(p.device.type == "meta" for p in lower.parameters())  # read, run and dropped again
    for a, b in zip(got, want):
        assert a.name == b.name
        torch.testing.assert_close(a.u, b.u, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(a.delta, b.delta, rtol=1e-6, atol=1e-7)
    mk.apply_edits(model, want)
    _assert_same_weights(_reload(directory), model)


def _count_block_reads(streamed, monkeypatch) -> list[int]:
    """Per read of a streamed block: how many streamed blocks were resident just before it."""
    blocks = [streamed.model.get_submodule(name) for name in streamed.streamed_blocks]
    resident_before_read = []
    real_load = streamed._load

    def counting_load(block_name):
        resident_before_read.append(sum(any(p.device.type != "meta" for p in b.parameters()) for b in blocks))
        real_load(block_name)

    monkeypatch.setattr(streamed, "_load", counting_load)
    return resident_before_read


def test_only_one_lower_block_is_resident_at_a_time(tmp_path, monkeypatch):
    model, directory, editor = _checkpoint(tmp_path, "llama")
    with StreamedModel.open(directory, inner_params=["model.layers.3.mlp.down_proj.weight"]) as streamed:
        resident_before_read = _count_block_reads(streamed, monkeypatch)
        with torch.no_grad():
            logits = streamed.model(input_ids=edit_batch("llama")["input_ids"]).logits
    assert resident_before_read == [0, 0, 0]  # each block read after the previous one was dropped
    torch.testing.assert_close(logits, model(input_ids=edit_batch("llama")["input_ids"]).logits)


def test_single_file_checkpoint_is_edited_in_place(tmp_path):
    model, directory, editor = _checkpoint(tmp_path, "gpt2", shard_size=None)
    batch = edit_batch("gpt2")
    with StreamedModel.open(directory) as streamed:
        edits = streamed.edit(copy.deepcopy(editor), **batch)
    mk.apply_edits(model, edits)
    assert sorted(_files(directory)) == ["config.json", "generation_config.json", "model.safetensors"]
    _assert_same_weights(_reload(directory), model)


def test_meta_training_on_a_streamed_model_equals_in_memory(tmp_path, monkeypatch):
    """MetaTrainer runs unchanged on ``streamed.model`` (every forward streams the lower blocks);
    StreamedMetaTrainer gives the same steps with one pass over the lower blocks per step."""
    from mend_kernels.data import make_world, train_word_tokenizer
    from mend_kernels.streaming import StreamedMetaTrainer

    world = make_world(n_people=12, seed=0)
    tokenizer = train_word_tokenizer(world.sentences())
    config = transformers.LlamaConfig(num_hidden_layers=5, hidden_size=24, intermediate_size=40, num_attention_heads=2,
                                      num_key_value_heads=2, vocab_size=len(tokenizer))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path, max_shard_size="30KB")
    editor = mk.MENDEditor.for_model(model, rank=8)
    train, val = world.edit_examples("train", 4, heldout=False), world.edit_examples("val", 1, heldout=True)
    settings = mk.TrainConfig(n_edits=1, accumulate=1, seed=0)
    trainers = [mk.MetaTrainer(model, copy.deepcopy(editor), tokenizer, train, val, settings)]
    with StreamedModel.open(tmp_path) as plain, StreamedModel.open(tmp_path) as precomputed:
        trainers.append(mk.MetaTrainer(plain.model, copy.deepcopy(editor), tokenizer, train, val, settings))
        trainers.append(StreamedMetaTrainer(precomputed, editor, tokenizer, train, val, settings))
        reads = _count_block_reads(precomputed, monkeypatch)
        for _ in range(2):
            want, *got = [trainer.train_step().loss for trainer in trainers]
            assert got == pytest.approx([want, want], rel=1e-5)
    assert len(reads) == 2 * len(precomputed.streamed_blocks)  # one pass per step, not one per forward
    for trainer in trainers[1:]:
        for a, b in zip(trainer.editor.parameters(), trainers[0].editor.parameters()):
            torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------ atomic write-back
@pytest.mark.parametrize("fail_at", ["copy", "commit"])
def test_interrupted_write_back_leaves_the_checkpoint_intact(tmp_path, monkeypatch, fail_at):
    model, directory, editor = _checkpoint(tmp_path, "llama")
    before = _files(directory)
    copies = []

    def interrupted_copy(*args, **kwargs):
        if copies:  # the second shard's copy: one patched shard is already on disk
            raise KeyboardInterrupt("simulated interruption")
        copies.append(real_copy(*args, **kwargs))
        return copies[-1]

    def interrupted_replace(*args):
        raise OSError("simulated crash before the index is replaced")

    real_copy = streaming._patched_copy
    monkeypatch.setattr(streaming, "_patched_copy", interrupted_copy) if fail_at == "copy" else None
    with StreamedModel.open(directory) as streamed:
        weight = streamed.model.get_parameter("model.layers.3.mlp.up_proj.weight")
        original = weight.detach().clone()
        if fail_at == "commit":
            monkeypatch.setattr(os, "replace", interrupted_replace)
        with pytest.raises((KeyboardInterrupt, OSError), match="simulated"):
            streamed.edit(editor, **edit_batch("llama"))
        monkeypatch.undo()
        torch.testing.assert_close(weight, original, rtol=0, atol=1e-6)  # the resident weights are reverted too
    assert _files(directory) == before
    _assert_same_weights(_reload(directory), model)


# ------------------------------------------------------------------------------ delta files
def test_delta_file_leaves_the_shards_and_its_loader_applies_it(tmp_path):
    model, directory, editor = _checkpoint(tmp_path, "llama")
    before = _files(directory)
    delta = tmp_path / "edit.safetensors"
    with StreamedModel.open(directory) as streamed:
        edits = streamed.edit(editor, **edit_batch("llama"), delta_path=delta)
    assert _files(directory) == before
    from safetensors import safe_open

    with safe_open(str(delta), framework="pt") as file:  # factors and steps only, no weight
        assert {key.rpartition(".")[2] for key in file.keys()} == {"u", "delta", "scale"}
    mk.apply_edits(model, edits)
    _assert_same_weights(load_with_deltas(directory, [delta]), model)


# ------------------------------------------------------------------------------ errors
def _break_index(directory):
    (directory / streaming.INDEX_FILE).write_text("{not json")


def _drop_a_shard(directory):
    sorted(directory.glob("*.safetensors"))[-1].unlink()


def _truncate_a_shard(directory):
    shard = sorted(directory.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-16])


def _corrupt_a_header(directory):
    shard = sorted(directory.glob("*.safetensors"))[0]
    shard.write_bytes(b"\xff" * 8 + shard.read_bytes()[8:])


def _change_the_config(directory):
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (_break_index, "index.json"),
        (_drop_a_shard, "missing"),
        (_truncate_a_shard, "truncated or corrupt"),
        (_corrupt_a_header, "corrupt safetensors header"),
        (_change_the_config, "mlp"),
    ],
)
def test_damaged_checkpoints_raise_checkpoint_errors(tmp_path, damage, match):
    _, directory, _ = _checkpoint(tmp_path, "llama")
    damage(directory)
    before = _files(directory)
    with pytest.raises(mk.CheckpointError, match=match):
        StreamedModel.open(directory)
    assert _files(directory) == before


def test_wrong_paths_and_layer_names_raise(tmp_path):
    _, directory, _ = _checkpoint(tmp_path, "llama")
    with pytest.raises(mk.CheckpointError, match="config.json"):
        StreamedModel.open(tmp_path / "nowhere")
    with pytest.raises(mk.TargetError, match="close matches"):
        StreamedModel.open(directory, inner_params=["model.layers.3.mlp.gate_prj.weight"])
    with pytest.raises(mk.TargetError, match="block list"):
        StreamedModel.open(directory, inner_params=["lm_head.weight"])
    with pytest.raises(mk.CheckpointError, match="delta"):
        load_with_deltas(directory, [tmp_path / "missing-delta.safetensors"])


# ------------------------------------------------------------------------------ accelerate
def test_model_dispatched_with_a_device_map_is_editable():
    from accelerate import dispatch_model

    model, reference = make_model("llama"), make_model("llama")
    device_map = {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    dispatch_model(model, device_map=device_map, force_hooks=True)
    assert "_old_forward" in model.model.layers[3].mlp.up_proj.__dict__
    torch.manual_seed(0)
    editor = mk.MENDEditor.for_model(reference, rank=8)
    batch = edit_batch("llama")
    copy.deepcopy(editor).edit(reference, **batch)
    editor.edit(model, **batch)
    _assert_same_weights(model, reference)


def test_cpu_offloaded_model_is_editable_in_place():
    from accelerate import cpu_offload

    model, reference = make_model("llama"), make_model("llama")
    torch.manual_seed(0)
    editor = mk.MENDEditor.for_model(reference, rank=8)
    batch = edit_batch("llama")
    copy.deepcopy(editor).edit(reference, **batch)
    cpu_offload(model, execution_device="cpu")
    assert model.model.layers[3].mlp.up_proj.weight.device.type == "meta"
    with offloaded_weights_attached(model):
        editor.edit(model, **batch)
    assert model.model.layers[3].mlp.up_proj.weight.device.type == "meta"  # offloaded again
    with torch.no_grad():  # the hooks now bring in the edited weights
        torch.testing.assert_close(model(input_ids=batch["input_ids"]).logits,
                                   reference(input_ids=batch["input_ids"]).logits)


# ------------------------------------------------------------------------------ lean in-memory edits
def test_bf16_accumulation_keeps_updates_that_naive_bf16_addition_rounds_away():
    weight = torch.ones(8, 16, dtype=torch.bfloat16)
    u, delta = torch.full((4, 16), 1e-2), torch.full((4, 8), 1e-1)  # update 4e-3 per entry, per row 1e-3
    naive = weight.clone()
    for row in range(4):  # what adding each row's update in bf16 does: 1 + 1e-3 rounds back to 1
        naive += (delta[row : row + 1].t() @ u[row : row + 1]).to(torch.bfloat16)
    assert torch.equal(naive, weight)
    mk.ops.rank_updates_([weight], [u], [delta], [1.0])
    assert torch.allclose(weight.float(), torch.full((8, 16), 1.004), atol=4e-3)  # one rounding of 1.004
    assert (weight != 1).all()


def test_an_edit_allocates_nothing_of_the_size_of_a_weight():
    """Peak tensor memory of an edit above the model = activations of the edited blocks + captured
    and edited rows + a small constant: less than one edited bf16 weight (keep_original=False). A
    dense update, or the weight upcast to fp32 for the addition, would be 1x to 2x of it."""
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=512, intermediate_size=8192,
                                      num_attention_heads=2, num_key_value_heads=2, vocab_size=97)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    inner = [f"model.layers.1.mlp.{name}.weight" for name in ("gate_proj", "up_proj", "down_proj")]
    editor = mk.MENDEditor.for_model(model, inner, rank=8)
    batch = {key: value[:1] for key, value in edit_batch("llama").items()}
    editor.edit(model, **batch, keep_original=False)  # warm-up: statistics and lazily built kernels
    weight_bytes = 512 * 8192 * 2
    peak = allocator_peak_bytes(lambda: editor.edit(model, **batch, keep_original=False))
    assert peak < weight_bytes, (peak, weight_bytes)
