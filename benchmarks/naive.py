"""The `naive` provider: the computational pattern of MEND's reference code, as a baseline.

What makes it naive (each point is what mend_kernels avoids):
- every base weight requires grad, so the edit loss's backward runs through the whole model and
  forms a gradient for every weight (.grad of the size of the model);
- (u, delta) are recorded by hooks on the edited layers during that backward;
- each edited weight gets a dense pseudo-gradient ``einsum("bi,bj->ij", delta~, u~)`` and the
  edited weight is a new dense tensor ``W + alpha * G``;
- in meta-training the post-edit forward runs through ``torch.func.functional_call`` with those
  dense weights, which autograd keeps for the backward into the editor, and the base weights still
  require grad there.

It uses the same editor (``editor(rows)``) as mend_kernels, so both compute the same edit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mend_kernels.edit import WeightEdit
from mend_kernels.losses import token_nll
from mend_kernels.targets import EditTarget, module_and_layout
from mend_kernels.train import MetaTrainer, answer_positions, locality_kl


class _Hooks:
    """Forward hooks recording each edited layer's input and its output gradient (as the reference's hooks.py)."""

    def __init__(self, model: nn.Module, targets: Sequence[EditTarget]):
        self.inputs: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}
        self._handles = [
            module_and_layout(model, t.name)[0].register_forward_hook(self._record(t.name)) for t in targets
        ]

    def _record(self, name: str):
        def hook(module, args, output):
            self.inputs[name] = args[0].detach()
            output.register_hook(lambda grad: self.grads.__setitem__(name, grad.detach()))

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def rows(self, targets: Sequence[EditTarget]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {
            t.name: (self.inputs[t.name].reshape(-1, t.n_in), self.grads[t.name].reshape(-1, t.n_out)) for t in targets
        }


def _with_all_weights_trainable(model: nn.Module):
    """Sets requires_grad on every parameter; returns a function restoring the old flags and dropping .grad."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for parameter, _ in saved:
        parameter.requires_grad_(True)

    def restore() -> None:
        for parameter, flag in saved:
            parameter.grad = None
            parameter.requires_grad_(flag)

    return restore


def captured_rows(model: nn.Module, targets: Sequence[EditTarget], input_ids, attention_mask, labels, shift_labels: bool):
    """Full forward and backward of the edit loss with hooks; the .grad of every weight is formed."""
    hooks = _Hooks(model, targets)
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        token_nll(logits, labels, shift_labels=shift_labels).backward()
        return hooks.rows(targets)
    finally:
        hooks.remove()


def dense_weight(model: nn.Module, edit: WeightEdit) -> torch.Tensor:
    """The edited weight as a new dense tensor: W + alpha * einsum('bi,bj->ij', delta~, u~)."""
    weight = model.get_parameter(edit.name)
    pseudo_grad = torch.einsum("bi,bj->ij", edit.delta, edit.u)  # (out, in)
    if edit.layout == "conv1d":
        pseudo_grad = pseudo_grad.t()
    return (weight + edit.scale * pseudo_grad).to(weight.dtype)


def naive_edit(model: nn.Module, editor, input_ids, attention_mask, labels) -> dict[str, torch.Tensor]:
    """The edited weights {name: new dense tensor}; the model itself is left unchanged."""
    restore = _with_all_weights_trainable(model)
    try:
        rows = captured_rows(model, editor.targets, input_ids, attention_mask, labels, editor.config.shift_labels)
        with torch.no_grad():
            return {edit.name: dense_weight(model, edit) for edit in editor(rows)}
    finally:
        restore()


def naive_train_step(trainer: MetaTrainer, examples) -> float:
    """One meta-training step of ``trainer``'s task the reference code's way; returns the loss.

    Same batches, losses and optimizer step as :meth:`MetaTrainer.train_step` with accumulate=1.
    """
    model, editor, config = trainer.model, trainer.editor, trainer.config
    targets = [example.target for example in examples]
    edit_batch = trainer._encode([example.prompt for example in examples], targets)
    equivalence = trainer._encode([trainer.rng.choice(example.paraphrases) for example in examples], targets)
    local = [trainer.rng.choice(example.locality) for example in examples]
    loc_batch = trainer._encode([prompt for prompt, _ in local], [answer for _, answer in local])
    loc_mask = answer_positions(loc_batch["labels"], trainer.shift)
    editor.train()
    with torch.no_grad():
        base_loc_logits = trainer._forward(loc_batch)
    restore = _with_all_weights_trainable(model)
    try:
        rows = captured_rows(model, editor.targets, edit_batch["input_ids"], edit_batch["attention_mask"],
                             edit_batch["labels"], trainer.shift)
        for parameter in model.parameters():
            parameter.grad = None  # the reference zeroes the base model's gradients before the outer step
        edited = {edit.name: dense_weight(model, edit) for edit in editor(rows)}

        def forward(batch):
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            return torch.func.functional_call(model, edited, args=(), kwargs=inputs, strict=False).logits

        edit_loss = token_nll(forward(equivalence), equivalence["labels"], shift_labels=trainer.shift)
        loss = config.c_edit * edit_loss + config.c_loc * locality_kl(base_loc_logits, forward(loc_batch), loc_mask)
        loss.backward()
        trainer._optimizer_step()
        return loss.item()
    finally:
        restore()
