"""Capture of MEND's inputs: the rows u_i (layer input) and delta_i (output gradient) of each edited layer.

For an edited layer y = x W^T, dL/dW = sum_i delta_i u_i^T, so MEND never needs dL/dW itself.
:class:`RowCapture` records the rows while the caller runs any forward and backward:

- every base parameter is frozen for the duration, so no weight gradient is formed anywhere and no
  ``.grad`` is written;
- each edited layer runs :func:`mend_kernels.ops.capture_linear`, whose backward writes delta as
  float32 rows straight into a buffer of the call and computes only the input gradient;
- the lowest edited layer's input needs no gradient, so layers below it build no graph in the
  forward and see no backward; its call passes the op's ``anchor`` so that backward still reaches it;
- the gradient still flows through the edited layers above, as it must for their deltas.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from . import ops
from .errors import InvalidInputError, TargetError
from .losses import IGNORE_INDEX, token_nll
from .requests import EditBatch
from .targets import EditTarget, module_and_layout


@dataclass
class _Call:
    """One call of an edited layer: its input u, the buffer its backward fills with delta, and
    whether the backward reached it (the buffer holds nothing before)."""

    u: torch.Tensor
    delta: torch.Tensor
    reached: bool = False

    def mark_reached(self, grad_outputs) -> None:
        self.reached = True


class RowCapture:
    """Context manager recording (u, delta) rows of ``targets`` during a forward and backward.

    For the duration, each edited layer's ``forward`` is replaced on the instance (its class and
    hooks are untouched) and restored on exit, also on an exception.

    Example:
        >>> with RowCapture(model, targets) as capture:          # doctest: +SKIP
        ...     loss = my_loss(model(**batch))
        ...     loss.backward()
        >>> u, delta = capture.rows("transformer.h.2.mlp.c_fc.weight")  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, targets: Sequence[EditTarget]):
        self.model = model
        self.targets = {target.name: target for target in targets}
        self._calls: dict[str, list[_Call]] = {name: [] for name in self.targets}
        self._patched: list[tuple[nn.Module, str, object]] = []
        self._frozen: list[tuple[nn.Parameter, bool]] = []

    def __enter__(self) -> RowCapture:
        if _activation_checkpointing(self.model):
            raise InvalidInputError(
                "row capture cannot run with gradient checkpointing (it re-runs layers inside backward): "
                "call model.gradient_checkpointing_disable() before editing"
            )
        layers = {name: module_and_layout(self.model, name) for name in self.targets}
        for name, (module, _) in layers.items():
            if "forward" in module.__dict__ and not _accelerate_hooked(module):  # do not bypass someone's forward
                raise InvalidInputError(
                    f"the module of {name} already has an instance-level forward (a nested capture / "
                    "lowrank_edited or a foreign wrapper); row capture cannot replace it"
                )
        self._frozen = [(p, p.requires_grad) for p in self.model.parameters()]
        for parameter, _ in self._frozen:
            parameter.requires_grad_(False)
        for name, (module, layout) in layers.items():
            # accelerate's dispatch hooks own ``forward``: they move weights and inputs to the execution
            # device, then call ``_old_forward``. Capturing there keeps the hooks (and offloading) working.
            attribute = "_old_forward" if _accelerate_hooked(module) else "forward"
            self._patched.append((module, attribute, module.__dict__.get(attribute)))
            setattr(module, attribute, partial(self._captured_forward, name, module, layout))
        return self

    def __exit__(self, *exc_info) -> None:
        for module, attribute, original in self._patched:
            if original is None:
                delattr(module, attribute)
            else:
                setattr(module, attribute, original)
        self._patched.clear()
        for parameter, requires_grad in self._frozen:
            parameter.requires_grad_(requires_grad)
        self._frozen.clear()

    def _captured_forward(self, name: str, module: nn.Module, layout: str, *args, **kwargs) -> torch.Tensor:
        if not torch.is_grad_enabled():
            raise InvalidInputError("row capture needs autograd: do not run the forward under torch.no_grad()")
        x = args[0] if args else next(iter(kwargs.values()))
        rows = math.prod(x.shape[:-1])
        call = _Call(x.detach(), torch.empty(rows, self.targets[name].n_out, dtype=torch.float32, device=x.device))
        self._calls[name].append(call)
        # The lowest edited layer's input needs no gradient: the anchor puts its output on the graph.
        anchor = None if x.requires_grad else torch.empty(0, device=x.device, requires_grad=True)
        output = ops.capture_linear(x, module.weight, module.bias, call.delta, layout=layout, anchor=anchor)
        # The buffer cannot tell whether the backward ran, so the op's own backward node reports it
        # (a node hook rather than a hook on ``output``, which the model may still modify in place).
        output.grad_fn.register_prehook(call.mark_reached)
        return output

    def rows(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(u, delta) of weight ``name``: every token row of every call, float32, (n, in) and (n, out)."""
        if name not in self.targets:
            raise TargetError(f"{name!r} is not captured; captured weights: {sorted(self.targets)}")
        target, calls = self.targets[name], self._calls[name]
        if not calls:
            raise TargetError(f"layer {name!r} was not called in the forward pass")
        if not all(call.reached for call in calls):
            raise TargetError(f"no gradient reached layer {name!r}: it is not on the path of the loss")
        u = torch.cat([call.u.reshape(-1, target.n_in) for call in calls]).float()
        delta = torch.cat([call.delta for call in calls])
        return u, delta

    def all_rows(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(u, delta) of every captured weight, by name: the input of :meth:`MENDEditor.forward`."""
        return {name: self.rows(name) for name in self.targets}


def _accelerate_hooked(module: nn.Module) -> bool:
    """Whether accelerate's ``add_hook_to_module`` wrapped the module's forward (device_map, offload)."""
    return hasattr(module, "_hf_hook") and "_old_forward" in module.__dict__


def _activation_checkpointing(model: nn.Module) -> bool:
    # transformers renamed is_gradient_checkpointing to is_activation_checkpointing (v5)
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def capture_edit_rows(
    model: nn.Module, targets: Sequence[EditTarget], batch: EditBatch, *, shift_labels: bool
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(u, delta) per edited weight for MEND's edit loss: token-mean NLL of the batch's labels."""
    inputs, labels = batch.model_inputs(), batch.labels
    positions = _scored_positions(model, labels, shift_labels)
    if positions is not None:  # the LM head runs on the positions the loss reads, not on the whole prompt
        inputs["logits_to_keep"] = positions
        labels = labels[:, positions]
    with torch.enable_grad(), RowCapture(model, targets) as capture:
        logits = model(**inputs).logits
        loss = token_nll(logits, labels, shift_labels=shift_labels)
        if not loss.requires_grad:
            raise TargetError("none of the edited layers is on the path of the edit loss")
        loss.backward()
    return capture.all_rows()


def _scored_positions(model: nn.Module, labels: torch.Tensor, shift_labels: bool) -> torch.Tensor | None:
    """The final positions whose logits a causal LM's edit loss reads, if the model can compute only
    those (transformers' ``logits_to_keep``) and that saves work; else None.

    With the causal shift the logits at position j score the label at j + 1, so the loss reads the
    positions from one before the first target token to the end. Edit requests put their target
    at the end of the prompt, so this is a few positions out of the whole request: the LM head
    (vocabulary x hidden, the largest matrix of a small model) and its backward run on those only.
    The loss, and therefore every captured row, is unchanged.

    The positions go as an index tensor, not a count: a count makes transformers slice the hidden
    states into a strided view, for which torch's CPU matmul in bf16 takes a batched path that
    copies the LM head per request (measured: 1.5 s and 593 MiB for 8 requests on GPT-2 small,
    against 11 ms and 4 MiB with the gathered, contiguous rows).
    """
    if not shift_labels or "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return None
    scored = (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero()
    first = int(scored[0])  # logits position of the first target; make_batch guarantees one exists
    if first == 0:
        return None
    return torch.arange(first, labels.shape[1], device=labels.device)
