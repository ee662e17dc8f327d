"""Capture of MEND's inputs: the rows u_i (layer input) and delta_i (output gradient) of each edited layer.

For an edited layer y = x W^T, dL/dW = sum_i delta_i u_i^T, so MEND never needs dL/dW itself.
:class:`RowCapture` records the rows while the caller runs any forward and backward:

- every base parameter is frozen for the duration, so no weight gradient is formed anywhere and no
  ``.grad`` is written;
- the output of the lowest edited layer becomes the leaf of the autograd graph, so layers below it
  build no graph in the forward and see no backward;
- the gradient still flows through the edited layers above, as it must for their deltas.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .errors import InvalidInputError, TargetError
from .losses import token_nll
from .requests import EditBatch
from .targets import EditTarget, module_and_layout


class RowCapture:
    """Context manager recording (u, delta) rows of ``targets`` during a forward and backward.

    Example:
        >>> with RowCapture(model, targets) as capture:          # doctest: +SKIP
        ...     loss = my_loss(model(**batch))
        ...     loss.backward()
        >>> u, delta = capture.rows("transformer.h.2.mlp.c_fc.weight")  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, targets: Sequence[EditTarget]):
        self.model = model
        self.targets = {target.name: target for target in targets}
        self._inputs: dict[str, list[torch.Tensor]] = {name: [] for name in self.targets}
        self._grads: dict[str, dict[int, torch.Tensor]] = {name: {} for name in self.targets}
        self._handles: list = []
        self._frozen: list[tuple[nn.Parameter, bool]] = []

    def __enter__(self) -> RowCapture:
        if _activation_checkpointing(self.model):
            raise InvalidInputError(
                "row capture cannot run with gradient checkpointing (it re-runs layers inside backward): "
                "call model.gradient_checkpointing_disable() before editing"
            )
        modules = {name: module_and_layout(self.model, name)[0] for name in self.targets}
        self._frozen = [(p, p.requires_grad) for p in self.model.parameters()]
        for parameter, _ in self._frozen:
            parameter.requires_grad_(False)
        for name, module in modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for parameter, requires_grad in self._frozen:
            parameter.requires_grad_(requires_grad)
        self._frozen.clear()

    def _hook(self, name: str):
        def record(module, args, kwargs, output):
            if not torch.is_grad_enabled():
                raise InvalidInputError("row capture needs autograd: do not run the forward under torch.no_grad()")
            layer_input = args[0] if args else next(iter(kwargs.values()))
            call = len(self._inputs[name])
            self._inputs[name].append(layer_input.detach())
            if not output.requires_grad:  # the lowest edited layer: the graph starts here
                output = output.detach().requires_grad_()
            output.register_hook(lambda grad: self._grads[name].__setitem__(call, grad.detach()))
            return output

        return record

    def rows(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(u, delta) of weight ``name``: every token row of every call, float32, (n, in) and (n, out)."""
        if name not in self.targets:
            raise TargetError(f"{name!r} is not captured; captured weights: {sorted(self.targets)}")
        target, inputs, grads = self.targets[name], self._inputs[name], self._grads[name]
        if not inputs:
            raise TargetError(f"layer {name!r} was not called in the forward pass")
        if len(grads) != len(inputs):
            raise TargetError(f"no gradient reached layer {name!r}: it is not on the path of the loss")
        u = torch.cat([x.reshape(-1, target.n_in) for x in inputs]).float()
        delta = torch.cat([grads[call].reshape(-1, target.n_out) for call in range(len(inputs))]).float()
        return u, delta


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
    with torch.enable_grad(), RowCapture(model, targets) as capture:
        logits = model(**batch.model_inputs()).logits
        loss = token_nll(logits, batch.labels, shift_labels=shift_labels)
        if not loss.requires_grad:
            raise TargetError("none of the edited layers is on the path of the edit loss")
        loss.backward()
    return {target.name: capture.rows(target.name) for target in targets}
