"""The memory estimator against measured peaks (tensor allocator) at small sizes: within 20%."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import mend_kernels as mk
from benchmarks.harness import allocator_peak_bytes
from benchmarks.models import edit_requests
from benchmarks.naive import naive_edit, naive_train_step
from mend_kernels import memory
from mend_kernels.cli import main as cli_main

RANK = 64
CONFIGS = {
    "gpt2-fp32": (transformers.GPT2Config(n_layer=6, n_embd=256, n_head=4, vocab_size=2000, n_positions=128),
                  torch.float32),
    "llama-fp32": (transformers.LlamaConfig(num_hidden_layers=6, hidden_size=256, intermediate_size=688,
                                            num_attention_heads=4, num_key_value_heads=4, vocab_size=2000),
                   torch.float32),
    "llama-bf16": (transformers.LlamaConfig(num_hidden_layers=6, hidden_size=256, intermediate_size=688,
                                            num_attention_heads=4, num_key_value_heads=4, vocab_size=2000),
                   torch.bfloat16),
}


def _live_bytes(*tensor_groups) -> int:
    return sum(t.numel() * t.element_size() for group in tensor_groups for t in group)


def _model_and_editor(config, dtype):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval()
    return model, mk.MENDEditor.for_model(model, rank=RANK)


def _assert_within(predicted: int, measured: int, what: str) -> None:
    assert abs(predicted - measured) <= 0.2 * measured, f"{what}: predicted {predicted}, measured {measured}"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_edit_estimates_match_measured_peaks(name):
    config, dtype = CONFIGS[name]
    model, editor = _model_and_editor(config, dtype)
    ids, mask, labels = edit_requests(2, 24, config.vocab_size)
    editor.edit(model, ids, mask, labels, keep_original=False)  # warm-up
    live = _live_bytes(model.parameters(), editor.parameters())
    package = live + allocator_peak_bytes(lambda: editor.edit(model, ids, mask, labels, keep_original=False))
    reference = live + allocator_peak_bytes(lambda: naive_edit(model, editor, ids, mask, labels))
    predicted = {e.approach: e.total_bytes for e in memory.estimate(config, dtype=dtype, tokens=24, edits=2, rank=RANK)}
    _assert_within(predicted["mend_kernels edit"], package, f"{name} package edit")
    _assert_within(predicted["reference edit"], reference, f"{name} reference edit")
    assert predicted["mend_kernels streamed edit"] < predicted["mend_kernels edit"]


def test_meta_training_step_estimates_match_measured_peaks():
    from mend_kernels.data import make_world, train_word_tokenizer

    world = make_world(n_people=60, seed=0)
    tokenizer = train_word_tokenizer(world.sentences())
    config = transformers.GPT2Config(n_layer=6, n_embd=256, n_head=4, vocab_size=len(tokenizer), n_positions=128)
    model, editor = _model_and_editor(config, torch.float32)
    train = world.edit_examples("train", 16, heldout=False)
    trainer = mk.MetaTrainer(model, editor, tokenizer, train, world.edit_examples("val", 2, heldout=True),
                             mk.TrainConfig(n_edits=1, accumulate=1, seed=0))
    predicted = {e.approach: e.total_bytes for e in memory.estimate(config, dtype=torch.float32, tokens=12, rank=RANK)}
    steps = {"mend_kernels meta-training step": trainer.train_step,
             "reference meta-training step": lambda: naive_train_step(trainer, trainer.rng.sample(train, 1))}
    for approach, step in steps.items():
        step()  # warm-up: Adam's moments exist from here on
        adam = [t for state in trainer.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
        measured = _live_bytes(model.parameters(), editor.parameters(), adam) + allocator_peak_bytes(step)
        _assert_within(predicted[approach], measured, approach)


def test_memory_command_prints_every_approach(tmp_path, capsys):
    config, _ = CONFIGS["llama-fp32"]
    (tmp_path / "config.json").write_text(config.to_json_string())
    assert cli_main(["memory", "--config", str(tmp_path), "--dtype", "bf16", "--tokens", "16", "--edits", "2"]) == 0
    output = capsys.readouterr().out
    for approach in ("mend_kernels edit", "mend_kernels streamed edit", "reference edit",
                     "mend_kernels meta-training step", "mend_kernels streamed meta-training step",
                     "reference meta-training step"):
        assert approach in output
    inline = json.dumps({"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2})
    assert cli_main(["memory", "--config", inline]) == 0


def test_memory_estimator_rejects_bad_configs(tmp_path):
    with pytest.raises(mk.InvalidInputError, match="config"):
        memory.load_config(str(tmp_path / "nowhere.json"))
    with pytest.raises(mk.InvalidInputError, match="tokens"):
        memory.estimate(CONFIGS["gpt2-fp32"][0], tokens=0)
