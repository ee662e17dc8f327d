"""Meta-training of a MEND editor (SPEC section 5), memory-lean from the start.

One step: capture (u, delta) of the edit loss on the edit prompt; editor -> factors; then, with the
edit applied as a low-rank side path (no dense update, no weight copy, no functional wrapper),
L = c_edit * NLL(target | paraphrase) + c_loc * KL(p_base(. | x_loc) || p_edited(. | x_loc)).
The base model is frozen throughout: layers below the lowest edited layer build no autograd graph
in any pass, and the pre-edit locality logits are computed once per step without autograd.
Checkpoints (safetensors + JSON) resume exactly: editor, statistics, optimizer, step and RNG state.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .data.synthetic import EditExample
from .edit import lowrank_edited
from .editor import MENDEditor
from .errors import CheckpointError, InvalidInputError
from .losses import IGNORE_INDEX, token_nll
from .requests import encode_requests, is_encoder_decoder

CHECKPOINT_STATE = "trainer.json"
OPTIMIZER_TENSORS = "optimizer.safetensors"


@dataclass
class TrainConfig:
    """Meta-training settings; defaults are the reference code's (SPEC section 5).

    ``alpha_lr`` is the learning rate of the step sizes (the paper's lr_lr); with
    ``reference_alpha_lr`` the step sizes train at ``lr`` instead, as the reference code's second
    optimiser effectively does.
    """

    lr: float = 1e-6
    alpha_lr: float = 1e-4
    reference_alpha_lr: bool = False
    c_edit: float = 0.1
    c_loc: float = 1.0
    n_edits: int = 1
    accumulate: int = 10
    grad_clip: float = 100.0
    max_steps: int = 100_000
    val_every: int = 5000
    val_edits: int = 500
    patience: int = 20_000
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_edits", "accumulate", "max_steps", "val_every", "val_edits", "patience"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class StepResult:
    """Losses and edit metrics of one meta-training or validation step."""

    loss: float
    edit_loss: float
    loc_kl: float
    edit_success: float  # every target token is the argmax on the paraphrase, under the edit
    locality: float  # fraction of locality predictions unchanged by the edit


def locality_kl(base_logits: torch.Tensor, edited_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(p_base || p_edited) per position over the vocabulary, averaged over the ``mask`` positions."""
    base = base_logits.float().log_softmax(-1)
    edited = edited_logits.float().log_softmax(-1)
    per_position = F.kl_div(edited, base, log_target=True, reduction="none").sum(-1)
    return (per_position * mask).sum() / mask.sum()


def scored_positions(labels: torch.Tensor, shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, mask) aligned with the logits that predict them."""
    if shift:
        labels = labels[:, 1:]
    return labels, labels != IGNORE_INDEX


def answer_positions(labels: torch.Tensor, shift: bool) -> torch.Tensor:
    """Mask over the logits' positions (batch, length) that predict a label token."""
    if not shift:
        return labels != IGNORE_INDEX
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def all_tokens_correct(logits: torch.Tensor, labels: torch.Tensor, shift: bool) -> torch.Tensor:
    """Per request: every label token is the argmax under teacher forcing (bool, (batch,))."""
    if shift:
        logits = logits[:, :-1]
    labels, mask = scored_positions(labels, shift)
    return ((logits.argmax(-1) == labels) | ~mask).all(dim=1)


class MetaTrainer:
    """Meta-trains ``editor`` for ``model`` on edit examples.

    Example:
        >>> trainer = MetaTrainer(model, editor, tokenizer, train_examples, val_examples,  # doctest: +SKIP
        ...                       TrainConfig(lr=1e-4, max_steps=2000), out_dir="runs/demo")
        >>> best = trainer.fit()                                                          # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        editor: MENDEditor,
        tokenizer,
        train_examples: Sequence[EditExample],
        val_examples: Sequence[EditExample],
        config: TrainConfig | None = None,
        out_dir: str | Path | None = None,
    ):
        if not train_examples or not val_examples:
            raise InvalidInputError("meta-training needs at least one training and one validation example")
        self.model, self.editor, self.tokenizer = model, editor, tokenizer
        self.train_examples, self.val_examples = list(train_examples), list(val_examples)
        self.config = config or TrainConfig()
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.shift = editor.config.shift_labels
        self.device = editor.device
        for parameter in model.parameters():  # the base model is frozen for all of meta-training
            parameter.requires_grad_(False)
        model.eval()  # dropout off (SPEC 5)
        alpha_lr = self.config.lr if self.config.reference_alpha_lr else self.config.alpha_lr
        network = [p for name, p in editor.named_parameters() if name != "edit_lrs"]
        self.optimizer = torch.optim.Adam(
            [{"params": network, "lr": self.config.lr}, {"params": [editor.edit_lrs], "lr": alpha_lr}]
        )
        self.rng = random.Random(self.config.seed)
        self.step = 0
        self.skipped_updates = 0
        self.best_val_loss = math.inf
        self.best_step = 0

    # ------------------------------------------------------------------------------ one step
    def _encode(self, prompts: list[str], targets: list[str]) -> dict[str, torch.Tensor]:
        return encode_requests(
            self.tokenizer, prompts, targets, encoder_decoder=is_encoder_decoder(self.model), device=self.device
        )

    def _forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if is_encoder_decoder(self.model):
            inputs["decoder_input_ids"] = self.model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
        return self.model(**inputs).logits

    def run_step(self, examples: Sequence[EditExample], paraphrase_choice: random.Random) -> tuple[torch.Tensor, StepResult]:
        """Loss (with graph to the editor) and metrics of one step on ``examples``."""
        targets = [example.target for example in examples]
        edit_batch = self._encode([example.prompt for example in examples], targets)
        equivalence = self._encode([paraphrase_choice.choice(example.paraphrases) for example in examples], targets)
        local = [paraphrase_choice.choice(example.locality) for example in examples]
        loc_batch = self._encode([prompt for prompt, _ in local], [answer for _, answer in local])
        loc_mask = answer_positions(loc_batch["labels"], self.shift)
        with torch.no_grad():
            base_loc_logits = self._forward(loc_batch)
        edits = self.editor.compute_edit(self.model, **edit_batch)
        with lowrank_edited(self.model, edits):
            equivalence_logits = self._forward(equivalence)
            edited_loc_logits = self._forward(loc_batch)
        edit_loss = token_nll(equivalence_logits, equivalence["labels"], shift_labels=self.shift)
        loc_kl = locality_kl(base_loc_logits, edited_loc_logits, loc_mask)
        loss = self.config.c_edit * edit_loss + self.config.c_loc * loc_kl
        unchanged = (base_loc_logits.argmax(-1) == edited_loc_logits.argmax(-1)).float()
        result = StepResult(
            loss=loss.item(),
            edit_loss=edit_loss.item(),
            loc_kl=loc_kl.item(),
            edit_success=all_tokens_correct(equivalence_logits, equivalence["labels"], self.shift).float().mean().item(),
            locality=((unchanged * loc_mask).sum() / loc_mask.sum()).item(),
        )
        return loss, result

    def train_step(self) -> StepResult:
        """One meta-training step; the optimizer steps every ``accumulate`` steps."""
        self.editor.train()
        examples = self.rng.sample(self.train_examples, min(self.config.n_edits, len(self.train_examples)))
        loss, result = self.run_step(examples, self.rng)
        (loss / self.config.accumulate).backward()
        self.step += 1
        if self.step % self.config.accumulate == 0:
            self._optimizer_step()
        return result

    def _optimizer_step(self) -> None:
        parameters = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = all(bool(torch.isfinite(p.grad).all()) for p in parameters)
        if finite:
            torch.nn.utils.clip_grad_norm_(parameters, self.config.grad_clip)
            self.optimizer.step()
        else:
            self.skipped_updates += 1
        self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------------------ validation
    def validate(self) -> dict[str, float]:
        """Mean step metrics over the validation edits, editor in eval mode (statistics frozen)."""
        self.editor.eval()
        choice = random.Random(f"val-{self.config.seed}")
        examples = self.val_examples[: self.config.val_edits]
        results = []
        with torch.no_grad():  # capture still enables autograd for its own backward
            for start in range(0, len(examples), self.config.n_edits):
                _, result = self.run_step(examples[start : start + self.config.n_edits], choice)
                results.append(result)
        self.editor.train()
        return {key: sum(getattr(r, key) for r in results) / len(results) for key in asdict(results[0])}

    # ------------------------------------------------------------------------------ the loop
    def fit(self, progress: bool = True) -> dict[str, float]:
        """Train until ``max_steps`` or early stopping; keeps the best editor in ``out_dir/best``.

        Returns the best validation metrics. A JSONL line per validation goes to
        ``out_dir/validation.jsonl``; ``out_dir/checkpoint`` is rewritten at every validation.
        """
        from tqdm.auto import tqdm

        best: dict[str, float] = {}
        bar = tqdm(total=self.config.max_steps, initial=self.step, disable=not progress, desc="meta-training")
        while self.step < self.config.max_steps:
            result = self.train_step()
            bar.update(1)
            bar.set_postfix(loss=f"{result.loss:.3f}", es=f"{result.edit_success:.2f}", loc=f"{result.locality:.2f}")
            if self.step % self.config.val_every == 0 or self.step == self.config.max_steps:
                metrics = self.validate()
                best = self._record_validation(metrics) or best
                if self.step - self.best_step >= self.config.patience:
                    break
        bar.close()
        return best or self._best_metrics()

    def _record_validation(self, metrics: dict[str, float]) -> dict[str, float] | None:
        improved = metrics["loss"] < self.best_val_loss
        if improved:
            self.best_val_loss, self.best_step = metrics["loss"], self.step
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            line = {"step": self.step, "skipped_updates": self.skipped_updates, **metrics, "best": improved}
            with open(self.out_dir / "validation.jsonl", "a") as log:
                log.write(json.dumps(line) + "\n")
            if improved:
                self.editor.save(self.out_dir / "best")
                (self.out_dir / "best" / "metrics.json").write_text(json.dumps({"step": self.step, **metrics}))
            self.save_checkpoint(self.out_dir / "checkpoint")
        return {"step": self.step, **metrics} if improved else None

    def _best_metrics(self) -> dict[str, float]:
        if self.out_dir is not None and (self.out_dir / "best" / "metrics.json").is_file():
            return json.loads((self.out_dir / "best" / "metrics.json").read_text())
        return {}

    # ------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, directory: str | Path) -> None:
        """Everything needed to continue exactly: editor, optimizer, pending gradients, counters, RNG states."""
        from safetensors.torch import save_file

        directory = Path(directory)
        self.editor.save(directory / "editor")
        state = self.optimizer.state_dict()
        tensors, layout = {}, {}
        for index, entries in state["state"].items():
            layout[str(index)] = sorted(entries)
            for key, value in entries.items():
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
        for name, parameter in self.editor.named_parameters():  # gradients accumulated since the last update
            if parameter.grad is not None:
                tensors[f"grad.{name}"] = parameter.grad.detach().cpu().contiguous()
        tensors["torch_rng"] = torch.get_rng_state()
        save_file(tensors, directory / OPTIMIZER_TENSORS)
        trainer_state = {
            "config": asdict(self.config),
            "step": self.step,
            "skipped_updates": self.skipped_updates,
            "best_val_loss": self.best_val_loss,
            "best_step": self.best_step,
            "param_groups": state["param_groups"],
            "optimizer_layout": layout,
            "python_rng": self.rng.getstate(),
        }
        (directory / CHECKPOINT_STATE).write_text(json.dumps(trainer_state))

    @classmethod
    def resume(
        cls,
        directory: str | Path,
        model: nn.Module,
        tokenizer,
        train_examples: Sequence[EditExample],
        val_examples: Sequence[EditExample],
        out_dir: str | Path | None = None,
    ) -> MetaTrainer:
        """A trainer in exactly the state :meth:`save_checkpoint` wrote."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        try:
            state = json.loads((directory / CHECKPOINT_STATE).read_text())
            tensors = load_file(directory / OPTIMIZER_TENSORS)
        except (OSError, json.JSONDecodeError, SafetensorError) as exc:
            raise CheckpointError(f"cannot read the training checkpoint in {directory}: {exc}") from exc
        editor = MENDEditor.load(directory / "editor", model).train()
        trainer = cls(model, editor, tokenizer, train_examples, val_examples, TrainConfig(**state["config"]), out_dir)
        optimizer_state = {
            "state": {
                int(index): {key: tensors[f"{index}.{key}"].to(trainer.device) for key in keys}
                for index, keys in state["optimizer_layout"].items()
            },
            "param_groups": state["param_groups"],
        }
        trainer.optimizer.load_state_dict(optimizer_state)
        for name, parameter in editor.named_parameters():
            if f"grad.{name}" in tensors:
                parameter.grad = tensors[f"grad.{name}"].to(trainer.device)
        torch.set_rng_state(tensors["torch_rng"])
        version, internal, gauss = state["python_rng"]
        trainer.rng.setstate((version, tuple(internal), gauss))
        trainer.step, trainer.skipped_updates = state["step"], state["skipped_updates"]
        trainer.best_val_loss, trainer.best_step = state["best_val_loss"], state["best_step"]
        return trainer
