"""The benchmark harness itself (not the speed): CSV schema, memory probes, that providers compute the
same edit and the same training step, the targets summary and the figures."""

from __future__ import annotations

import csv
import os

import pytest
import torch
import transformers

from benchmarks import plots
from benchmarks.bench_edit import every_op_on, untrained_editor
from benchmarks.harness import CSV_FIELDS, allocator_peak_bytes, memory_of_call, write_csv
from benchmarks.models import edit_requests
from benchmarks.naive import naive_edit, naive_train_step
from benchmarks.run import target_rows
from mend_kernels.data import make_world, train_word_tokenizer
from mend_kernels.ops import ENV_VAR
from mend_kernels.train import MetaTrainer, TrainConfig

from conftest import make_model


def test_csv_rows_have_the_long_format_schema(tmp_path):
    path = tmp_path / "out.csv"
    write_csv([{"benchmark": "edit", "provider": "naive", "case": "gpt2-small fp32, 1 edit", "metric": "median_ms",
                "value": 12.5}], path)
    with open(path) as file:
        rows = list(csv.DictReader(file))
    assert tuple(rows[0]) == CSV_FIELDS
    assert rows[0]["value"] == "12.5" and rows[0]["machine"] and "torch" in rows[0]["versions"] and rows[0]["git_revision"]


def test_allocator_and_process_peaks_see_a_known_allocation():
    size = 32 * 2**20

    def allocate():
        block = torch.ones(size // 4)  # float32: `size` bytes, touched so they are resident
        return float(block[-1])

    assert size <= allocator_peak_bytes(allocate) < size + 2**20
    memory = memory_of_call(allocate)
    assert size <= memory["allocator_peak_bytes"] < size + 2**20
    assert memory["process_peak_bytes"] > size // 2  # RSS counts pages; the allocator may reuse a few


def test_every_op_on_sets_and_restores_the_backend(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "cpu")
    with every_op_on("reference"):
        assert os.environ[ENV_VAR] == "reference"
    assert os.environ[ENV_VAR] == "cpu"
    monkeypatch.delenv(ENV_VAR)
    with every_op_on("reference"):
        pass
    assert ENV_VAR not in os.environ


@pytest.mark.parametrize("kind", ["gpt2", "llama"])  # Conv1D and Linear layouts
def test_naive_and_mend_kernels_make_the_same_edit(kind):
    model = make_model(kind)
    editor = untrained_editor(model)
    requests = edit_requests(2, 9, model.config.vocab_size, target_tokens=3)
    before = {t.name: model.get_parameter(t.name).detach().clone() for t in editor.targets}
    model.transformer.wte.weight.requires_grad_(False) if kind == "gpt2" else None  # a mix of flags to restore
    flags = [p.requires_grad for p in model.parameters()]
    naive = naive_edit(model, editor, *requests)
    assert [p.requires_grad for p in model.parameters()] == flags  # naive restores the model
    assert all(p.grad is None for p in model.parameters())
    for name, weight in before.items():
        torch.testing.assert_close(model.get_parameter(name), weight, rtol=0, atol=0)
    editor.edit(model, *requests, keep_original=False, backend="reference")
    for name, weight in before.items():
        change = model.get_parameter(name).detach() - weight
        assert change.abs().max() > 0
        torch.testing.assert_close(change, naive[name] - weight, rtol=1e-4, atol=1e-6)


def test_naive_and_mend_kernels_take_the_same_training_step():
    world = make_world(n_people=30, seed=0)
    tokenizer = train_word_tokenizer(world.sentences())
    train = world.edit_examples("train", 8, heldout=False)
    val = world.edit_examples("val", 2, heldout=True)
    losses, grads = {}, {}
    for provider in ("mend_kernels", "naive"):
        torch.manual_seed(0)
        config = transformers.GPT2Config(n_layer=4, n_embd=24, n_head=2, vocab_size=len(tokenizer), n_positions=64)
        model = transformers.GPT2LMHeadModel(config)
        editor = untrained_editor(model)
        with torch.no_grad():
            editor.groups[next(iter(editor.groups))].up_proj.normal_(std=0.01)  # a non-identity editor
        trainer = MetaTrainer(model, editor, tokenizer, train, val, TrainConfig(n_edits=1, accumulate=1, seed=0))
        trainer._optimizer_step = lambda: None  # compare the gradients (Adam's first step is sign(grad) * lr)
        if provider == "naive":  # train_step's sampling, then the naive step
            losses[provider] = naive_train_step(trainer, trainer.rng.sample(trainer.train_examples, 1))
        else:
            losses[provider] = trainer.train_step().loss
        grads[provider] = [p.grad.clone() for p in editor.parameters()]
    assert losses["naive"] == pytest.approx(losses["mend_kernels"], rel=1e-4)
    for naive, mend in zip(grads["naive"], grads["mend_kernels"]):
        torch.testing.assert_close(naive, mend, rtol=1e-3, atol=1e-4 * float(mend.abs().max()))


def _records():
    rows = []
    for model, params in (("gpt2-small", 124e6), ("gpt2-medium", 355e6)):
        for provider, ms, peak in (("mend_kernels[cpu]", 200, 400), ("naive", 900, 1200), ("forward", 100, 50)):
            case = f"{model} fp32, 1 edit"
            rows += [
                {"benchmark": "edit", "provider": provider, "case": case, "metric": "median_ms", "value": ms * params / 124e6},
                {"benchmark": "edit", "provider": provider, "case": case, "metric": "process_peak_bytes", "value": peak * 2**20},
                {"benchmark": "edit", "provider": provider, "case": case, "metric": "parameters", "value": params},
            ]
    for provider, ms, peak in (("mend_kernels[cpu]", 1000, 500), ("naive", 2500, 2000)):
        rows += [
            {"benchmark": "meta_train_step", "provider": provider, "case": "gpt2-small fp32", "metric": "median_ms", "value": ms},
            {"benchmark": "meta_train_step", "provider": provider, "case": "gpt2-small fp32", "metric": "process_peak_bytes",
             "value": peak * 2**20},
        ]
    return rows


def test_targets_summary_computes_the_ratios():
    rows = {name: (measured, met) for name, measured, met in target_rows(_records())}
    assert rows["edit latency <= 1.5x one forward (gpt2-small fp32, 1 edit)"] == ("2.00x forward", "NO")
    assert rows["edit latency >= 3x lower than naive (gpt2-small fp32)"] == ("4.50x lower", "yes")
    assert rows["peak edit memory >= 2x lower than naive (gpt2-small fp32, process peak)"] == ("3.00x lower", "yes")
    assert rows["meta-training step >= 2x faster than naive (gpt2-small fp32)"] == ("2.50x faster", "yes")
    assert rows["meta-training peak memory >= 3x lower than naive (gpt2-small fp32, process peak)"] == ("4.00x lower", "yes")


def test_figures_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    written = plots.edit_figures(_records(), tmp_path) + plots.train_figure(_records(), tmp_path)
    names = {path.name for path in written}
    assert {"edit_median_ms_gpt2.png", "edit_process_peak_bytes_gpt2.png", "edit_over_forward_gpt2.png",
            "meta_train_step.png", "edit_latency_vs_edits.png"} <= names
    assert all(path.stat().st_size > 1000 for path in written)
