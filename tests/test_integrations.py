"""MENDEditCallback in real transformers Trainer runs (tiny GPT-2, CPU, checkpoints in tmp_path), and
the plain PyTorch training loop example."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import mend_kernels as mk
from conftest import VOCAB, edit_batch, make_model
from mend_kernels.integrations.transformers import MENDEditCallback

pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (extra [hf])")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FC = "transformer.h.3.mlp.c_fc.weight"


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 8, length: int = 10):
        self.ids = torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(3))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def _train(out: Path, callback: MENDEditCallback, *, resume: str | None = None, **options) -> torch.nn.Module:
    """4 optimizer steps of a tiny GPT-2 from its seed-0 init, checkpoints at steps 2 and 4."""
    model = make_model("gpt2")
    settings = dict(
        output_dir=str(out), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-3, save_strategy="steps",
        save_steps=2, report_to="none", use_cpu=True, disable_tqdm=True, logging_strategy="no", seed=0,
    )
    args = transformers.TrainingArguments(**{**settings, **options})
    data = _Tokens()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, eval_dataset=data, callbacks=[callback])
    trainer.train(resume_from_checkpoint=resume)
    return model


def _fixed_edit(seed: int, scale: float = 0.05) -> list[mk.WeightEdit]:
    generator = torch.Generator().manual_seed(seed)
    return [mk.WeightEdit(FC, "conv1d", torch.randn(2, 24, generator=generator), torch.randn(2, 96, generator=generator),
                          torch.tensor(scale))]


def _eval_editor() -> mk.MENDEditor:
    """A deterministic editor (eval mode with warmed statistics), so each run computes the same edit."""
    model = make_model("gpt2")
    torch.manual_seed(0)
    editor = mk.MENDEditor.for_model(model, rank=8, edit_lr=0.05)
    editor.edit(model, **edit_batch("gpt2", n_requests=3)).revert()
    return editor.eval()


def _schedule(callback: MENDEditCallback, editor: mk.MENDEditor, seen: list[bool]) -> MENDEditCallback:
    """Fixed factors at step 1; at step 3 an edit computed from the weights of that moment."""

    def compute(model: torch.nn.Module) -> list[mk.WeightEdit]:
        seen.append(not model.training and all(p.grad is None or not p.grad.any() for p in model.parameters()))
        with torch.no_grad():
            return editor.compute_edit(model, **edit_batch("gpt2", n_requests=1, seed=5))

    callback.queue(_fixed_edit(1), at_step=1)
    callback.queue(compute, at_step=3)
    return callback


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], same: bool = True) -> None:
    equal = all(torch.allclose(a[name], b[name], rtol=0, atol=1e-6) for name in a)
    assert equal == same, "weights differ" if same else "weights are equal but must differ"


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
    """The uninterrupted 4-step run with two edits: its callback, final weights and checkpoint directory."""
    out = tmp_path_factory.mktemp("run")
    editor, seen = _eval_editor(), []
    callback = _schedule(MENDEditCallback(), editor, seen)
    final = _params(_train(out, callback))
    return callback, final, out, editor, seen


def test_edits_apply_between_optimizer_steps_and_are_logged(interrupted_run):
    callback, final, out, _, seen = interrupted_run
    assert [entry.step for entry in callback.applied] == [1, 3] and not callback.pending
    assert seen == [True], "a computed edit runs in eval mode after zero_grad"
    assert len(callback.applied[1].edits) == 6  # the editor's six weights, as factors
    checkpoint_2 = load_file(str(out / "checkpoint-2" / "model.safetensors"))
    unedited = _params(_train(out / "plain", MENDEditCallback()))
    _assert_same(final, unedited, same=False)
    assert not torch.equal(checkpoint_2[FC], final[FC])


def test_resume_reapplies_undone_edits_at_their_steps_like_the_uninterrupted_run(interrupted_run):
    callback, final, out, _, _ = interrupted_run
    reapplier = MENDEditCallback("reapply")
    reapplier.applied = list(callback.applied)  # the same callback object, as in one process
    resumed = _train(out, reapplier, resume=str(out / "checkpoint-2"))
    _assert_same(_params(resumed), final)
    assert [entry.step for entry in reapplier.applied] == [1, 3]


def test_a_restarted_script_queueing_its_schedule_again_skips_edits_in_the_checkpoint(interrupted_run):
    _, final, out, editor, seen = interrupted_run
    restarted = _schedule(MENDEditCallback(), editor, [])
    _assert_same(_params(_train(out, restarted, resume=str(out / "checkpoint-2"))), final)
    assert [entry.step for entry in restarted.applied] == [3]


def test_resume_with_drop_leaves_undone_edits_undone(interrupted_run):
    callback, final, out, _, _ = interrupted_run
    dropper = MENDEditCallback("drop")
    dropper.applied = list(callback.applied)
    dropped = _params(_train(out, dropper, resume=str(out / "checkpoint-2")))
    without_edit = _params(_train(out, MENDEditCallback(), resume=str(out / "checkpoint-2")))
    _assert_same(dropped, without_edit)
    _assert_same(dropped, final, same=False)
    assert [entry.step for entry in dropper.applied] == [1]


@pytest.mark.parametrize("policy", ["reapply", "drop"])
def test_best_model_reload_at_the_end_reapplies_or_drops(tmp_path, policy):
    callback = MENDEditCallback(policy)
    callback.queue(_fixed_edit(2, scale=50.0), at_step=3)  # destructive: step 2 stays the best checkpoint
    model = _train(tmp_path, callback, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                   metric_for_best_model="loss", greater_is_better=False)
    best = load_file(str(tmp_path / "checkpoint-2" / "model.safetensors"))
    expected = best[FC] + _fixed_edit(2, scale=50.0)[0].dense() if policy == "reapply" else best[FC]
    torch.testing.assert_close(model.get_parameter(FC).detach(), expected, rtol=1e-6, atol=1e-5)
    assert [entry.step for entry in callback.applied] == ([3] if policy == "reapply" else [])


def test_bad_queue_arguments_raise_named_errors():
    callback = MENDEditCallback()
    for edits, at_step, message in [
        (_fixed_edit(0)[0], None, "list of WeightEdit"),
        ([], None, "non-empty"),
        (["w"], None, "non-empty list of WeightEdit"),
        (_fixed_edit(0), 0, "at_step"),
        (_fixed_edit(0), 1.5, "at_step"),
    ]:
        with pytest.raises(mk.InvalidInputError, match=message):
            callback.queue(edits, at_step=at_step)
    assert not callback.pending
    with pytest.raises(mk.InvalidInputError, match="on_reload"):
        MENDEditCallback("keep")


# ------------------------------------------------------------------------------------------ examples
def test_plain_training_loop_example_interleaves_fine_tuning_and_edits():
    namespace = runpy.run_path(str(EXAMPLES / "training_loop.py"))
    gains = namespace["main"](steps=4, edit_every=2)
    assert len(gains) == 2 and all(gain > 0 for gain in gains)


def test_trainer_example_applies_its_edit(tmp_path):
    namespace = runpy.run_path(str(EXAMPLES / "hf_trainer_edits.py"))
    callback = namespace["main"](str(tmp_path))
    assert [entry.step for entry in callback.applied] == [2]
