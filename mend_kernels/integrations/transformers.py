"""MEND edits inside a transformers ``Trainer`` run: :class:`MENDEditCallback`.

Edits are queued on the callback and applied in place between optimizer steps. Every applied edit
is logged as its :class:`~mend_kernels.WeightEdit` factors, so an edit that a checkpoint reload
undoes can be re-applied cheaply (no editor, no capture) or dropped, as configured.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME

from ..edit import WeightEdit, apply_edits
from ..errors import InvalidInputError
from ..targets import unwrap_model

RELOAD_POLICIES = ("reapply", "drop")

EditSource = Sequence[WeightEdit] | Callable[[nn.Module], Sequence[WeightEdit]]

__all__ = ["AppliedEdit", "MENDEditCallback", "QueuedEdit"]


@dataclass(eq=False)  # compared by identity: they hold tensors
class QueuedEdit:
    """Edits waiting for the end of optimizer step ``at_step`` (None: the next step)."""

    edits: EditSource
    at_step: int | None


@dataclass(eq=False)
class AppliedEdit:
    """Edits the callback applied to the weights at the end of optimizer step ``step``."""

    step: int
    edits: list[WeightEdit]


class MENDEditCallback(TrainerCallback):
    """Applies queued MEND edits to the model between optimizer steps of a transformers ``Trainer``.

    **When.** Queued edits are applied in ``on_step_end``: after ``optimizer.step()``, the scheduler
    step and ``zero_grad()``, with ``state.global_step`` already counting the step, and before the
    Trainer logs, evaluates or saves a checkpoint, so a checkpoint of step N holds every edit
    applied at steps <= N. No gradient or optimizer state is touched; the optimizer's next step
    starts from the edited weights. Edits are applied in place with
    :func:`mend_kernels.apply_edits` on the unwrapped model and logged in :attr:`applied`.

    **Checkpoint reloads.** A reload returns the weights of the checkpoint's step S, undoing the
    edits applied after S. Two reloads are handled:

    - ``trainer.train(resume_from_checkpoint=...)``, detected in ``on_train_begin`` (the global step
      is S > 0 there; a fresh run starts at 0);
    - ``load_best_model_at_end=True``, whose reload of the best checkpoint happens just before
      ``on_train_end``, where the callback reads S from that checkpoint's trainer state.

    With ``on_reload="reapply"`` (default) the undone edits are applied again from their logged
    factors: on resume they are queued for their original steps, so the resumed run applies them
    exactly where the interrupted run did; after the best-model reload they are applied at once.
    With ``on_reload="drop"`` they are removed from the log and stay undone. Edits applied at
    steps <= S are in the checkpoint's weights and are never applied twice; likewise a queued edit
    whose ``at_step`` is <= S is taken to be in the checkpoint already (as if a restarted script
    queued its schedule again, just as the Trainer skips the batches a checkpoint has seen) and is
    skipped.

    Under data parallelism every rank runs its own callback: queue the same factors on every rank
    (e.g. computed on one rank and sent with :func:`mend_kernels.functional.broadcast_edits`).

    Args:
        on_reload: ``"reapply"`` or ``"drop"``: what happens to edits a checkpoint reload undoes.

    Example:
        >>> callback = MENDEditCallback()                                               # doctest: +SKIP
        >>> callback.queue(lambda model: editor.compute_edit(model, **request), at_step=100)  # doctest: +SKIP
        >>> Trainer(model, args, train_dataset=data, callbacks=[callback]).train()      # doctest: +SKIP
    """

    def __init__(self, on_reload: str = "reapply"):
        if on_reload not in RELOAD_POLICIES:
            raise InvalidInputError(f"on_reload must be one of {RELOAD_POLICIES}, got {on_reload!r}")
        self.on_reload = on_reload
        self.pending: list[QueuedEdit] = []
        self.applied: list[AppliedEdit] = []

    def queue(self, edits: EditSource, *, at_step: int | None = None) -> None:
        """Apply ``edits`` at the end of optimizer step ``at_step`` (default: the next one).

        ``edits`` is a list of WeightEdit (applied as given) or a function ``model -> edits``
        called when the edit is due, on the unwrapped model in eval mode (dropout off), so the edit
        is computed from the weights as they are then, e.g.
        ``lambda model: editor.compute_edit(model, **request)``.
        """
        if isinstance(edits, WeightEdit) or not (callable(edits) or isinstance(edits, Sequence)):
            raise InvalidInputError(
                f"edits must be a list of WeightEdit or a function model -> edits, got {type(edits).__name__}"
            )
        if not callable(edits) and (not edits or not all(isinstance(edit, WeightEdit) for edit in edits)):
            raise InvalidInputError("edits must be a non-empty list of WeightEdit")
        if at_step is not None and (not isinstance(at_step, int) or at_step < 1):
            raise InvalidInputError(f"at_step must be an optimizer step >= 1 or None, got {at_step!r}")
        self.pending.append(QueuedEdit(edits, at_step))

    # ------------------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if state.global_step > 0:  # resumed: the weights are the checkpoint's
            undone = self._reloaded(state.global_step)
            self.pending = [QueuedEdit(entry.edits, entry.step) for entry in undone] + self.pending

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs):
        due = [entry for entry in self.pending if entry.at_step is None or entry.at_step <= state.global_step]
        self.pending = [entry for entry in self.pending if entry not in due]
        for entry in due:
            self._apply(model, entry.edits, state.global_step)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs):
        if args.load_best_model_at_end and state.best_model_checkpoint is not None:
            best = TrainerState.load_from_json(os.path.join(state.best_model_checkpoint, TRAINER_STATE_NAME))
            for entry in self._reloaded(best.global_step):
                self._apply(model, entry.edits, entry.step)

    # ------------------------------------------------------------------------------ helpers
    def _reloaded(self, step: int) -> list[AppliedEdit]:
        """Update the log and queue for weights reloaded from step ``step``; the undone edits to re-apply."""
        undone = [entry for entry in self.applied if entry.step > step]
        self.applied = [entry for entry in self.applied if entry.step <= step]
        self.pending = [entry for entry in self.pending if entry.at_step is None or entry.at_step > step]
        return undone if self.on_reload == "reapply" else []

    def _apply(self, model: nn.Module | None, edits: EditSource, step: int) -> None:
        if model is None:
            raise InvalidInputError("the Trainer passed no model to the callback event")
        model = unwrap_model(model)
        if callable(edits):
            edits = _computed_edits(model, edits)
        handle = apply_edits(model, edits, keep_original=False)  # training moves on: no revert, no copy
        self.applied.append(AppliedEdit(step, handle.edits))


def _computed_edits(model: nn.Module, compute: Callable[[nn.Module], Sequence[WeightEdit]]) -> list[WeightEdit]:
    """``compute(model)`` with dropout off (MEND edits an eval-mode model), the mode restored after."""
    was_training = model.training
    model.eval()
    try:
        return list(compute(model))
    finally:
        model.train(was_training)
