"""Applying, stacking, reverting, saving and replaying edits.

An edit of one weight is its factors and step: ``W += scale * delta~^T u~`` (``scale = sign * alpha``),
applied in place without forming the dense update; all weights of an edit go through one
:func:`mend_kernels.ops.rank_updates_` call (one per device when the model spans several). An
:class:`EditHandle` keeps the factors, so the edit can be reverted, saved and replayed on another
copy of the model. Handles on the same weights stack: revert the newest first.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from . import ops
from ._checks import check_finite, check_tensor
from .errors import CheckpointError, InvalidInputError, StaleEditError, TargetError
from .targets import module_and_layout, unwrap_model


@dataclass
class WeightEdit:
    """The edit of one weight: ``W += scale * delta.T @ u`` (layout "linear"; transposed for "conv1d")."""

    name: str
    layout: str
    u: torch.Tensor  # (n, in) float32
    delta: torch.Tensor  # (n, out) float32
    scale: torch.Tensor  # 0-d: sign * alpha

    def dense(self) -> torch.Tensor:
        """The dense update in the weight's layout (for inspection and tests; edits never form it)."""
        update = self.scale * (self.delta.t() @ self.u)
        return update if self.layout == "linear" else update.t()


# Per weight (by identity: tensors compare elementwise), the handles applied to it and not yet
# reverted, oldest first.
_ACTIVE: dict[int, tuple[weakref.ref, list[EditHandle]]] = {}


def _active_stack(weight: torch.Tensor) -> list[EditHandle]:
    entry = _ACTIVE.get(id(weight))
    if entry is None or entry[0]() is not weight:
        entry = _ACTIVE[id(weight)] = (weakref.ref(weight), [])
    return entry[1]


class EditHandle:
    """An applied edit: revert it, save its factors, or replay them on another model.

    Example:
        >>> handle = editor.edit(model, prompts=["Paris is in"], targets=["Italy"], tokenizer=tok)  # doctest: +SKIP
        >>> handle.save("edit.safetensors"); handle.revert()                                        # doctest: +SKIP
        >>> apply_edits(other_model, load_edits("edit.safetensors"))                                # doctest: +SKIP
    """

    def __init__(
        self,
        weights: dict[str, nn.Parameter],
        edits: list[WeightEdit],
        originals: dict[str, torch.Tensor] | None,
        backend: str | None,
    ):
        self.edits = edits
        self._weights = weights
        self._originals = originals
        self._backend = backend
        self._versions = {name: weight._version for name, weight in weights.items()}
        self.active = True
        for weight in weights.values():
            _active_stack(weight).append(self)

    def revert(self, *, force: bool = False) -> None:
        """Undo the edit in place.

        With ``keep_original=True`` (default) the weights are restored bit for bit; otherwise the
        update is subtracted. Raises StaleEditError if a later edit on the same weights is still
        applied, or if the weights were modified since (``force=True`` reverts anyway).
        """
        if not self.active:
            raise StaleEditError("this edit was already reverted")
        for name, weight in self._weights.items():
            stack = _active_stack(weight)
            if stack and stack[-1] is not self:
                raise StaleEditError(f"a later edit of {name} is still applied: revert it first")
            if weight._version != self._versions[name] and not force:
                raise StaleEditError(f"{name} was modified after this edit; revert(force=True) to revert anyway")
        with torch.no_grad():
            if self._originals is not None:
                for name, weight in self._weights.items():
                    weight.copy_(self._originals[name])
            else:
                for group in reversed(_by_device(self._weights, self.edits)):
                    _apply_group(self._weights, group, sign=-1.0, backend=self._backend)
        for name, weight in self._weights.items():
            stack = _active_stack(weight)
            stack.pop()
            if stack:  # the previous edit sees the weight exactly as it left it
                stack[-1]._versions[name] = weight._version
            else:
                del _ACTIVE[id(weight)]
        self.active = False

    def save(self, path: str | Path) -> None:
        """Write the factors and steps to a safetensors file (replay with :func:`load_edits`)."""
        save_edits(self.edits, path)


def _by_device(weights: dict[str, nn.Parameter], edits: Sequence[WeightEdit]) -> list[list[WeightEdit]]:
    """The edits grouped by their weight's device: one batched update serves one device."""
    groups: dict[torch.device, list[WeightEdit]] = {}
    for edit in edits:
        groups.setdefault(weights[edit.name].device, []).append(edit)
    return list(groups.values())


def _apply_group(weights: dict[str, nn.Parameter], edits: list[WeightEdit], *, sign: float, backend: str | None) -> None:
    ops.rank_updates_(
        [weights[edit.name] for edit in edits],
        [edit.u for edit in edits],
        [edit.delta for edit in edits],
        [sign * float(edit.scale) for edit in edits],
        layouts=[edit.layout for edit in edits],
        backend=backend,
    )


def _check_edit(model: nn.Module, edit: WeightEdit, params: dict[str, nn.Parameter]) -> nn.Parameter:
    if edit.name not in params:
        raise TargetError(f"the model has no parameter {edit.name!r} to apply an edit to")
    weight = params[edit.name]
    _, layout = module_and_layout(model, edit.name)
    if layout != edit.layout:
        raise TargetError(f"{edit.name} is a {layout} weight, but the edit was made for a {edit.layout} weight")
    n_in, n_out = weight.shape[::-1] if layout == "linear" else weight.shape
    check_tensor(f"u~ of {edit.name}", edit.u, dtypes=(torch.float32,), device=weight.device, shape=(None, n_in), min_rows=1)
    check_tensor(
        f"delta~ of {edit.name}", edit.delta, dtypes=(torch.float32,), device=weight.device, shape=(edit.u.shape[0], n_out)
    )
    check_tensor(f"step size of {edit.name}", edit.scale, shape=())
    check_finite(f"editor output u~ of {edit.name}", edit.u)
    check_finite(f"editor output delta~ of {edit.name}", edit.delta)
    check_finite(f"step size of {edit.name}", edit.scale)
    return weight


def apply_edits(
    model: nn.Module,
    edits: Sequence[WeightEdit],
    *,
    keep_original: bool = True,
    backend: str | None = None,
) -> EditHandle:
    """Apply edits in place and return their handle. Every edit is checked before any weight changes.

    A model wrapped by torch.compile or DistributedDataParallel is edited through the model it wraps
    (they share the parameters)."""
    model = unwrap_model(model)
    params = dict(model.named_parameters())
    weights = {edit.name: _check_edit(model, edit, params) for edit in edits}
    if len(weights) != len(edits):
        raise TargetError("the edits name a weight more than once")
    originals = {name: w.detach().to("cpu", copy=True) for name, w in weights.items()} if keep_original else None
    applied: list[list[WeightEdit]] = []
    try:
        with torch.no_grad():
            for group in _by_device(weights, edits):
                _apply_group(weights, group, sign=1.0, backend=backend)
                applied.append(group)
    except BaseException:
        with torch.no_grad():  # leave the model as it was
            if originals is not None:  # also undoes a call that failed after changing weights
                for name, weight in weights.items():
                    weight.copy_(originals[name])
            else:  # a batched call checks all its arguments before it changes any weight
                for group in reversed(applied):
                    _apply_group(weights, group, sign=-1.0, backend=backend)
        raise
    detached = [WeightEdit(e.name, e.layout, e.u.detach(), e.delta.detach(), e.scale.detach()) for e in edits]
    return EditHandle(weights, detached, originals, backend)


@contextmanager
def lowrank_edited(model: nn.Module, edits: Sequence[WeightEdit], *, backend: str | None = None) -> Iterator[None]:
    """Run ``model`` as if ``edits`` were applied, without touching any weight.

    For the duration, each edited layer computes :func:`mend_kernels.ops.lowrank_linear`:
    ``x W^T + b + scale * (x u~^T) delta~`` (``x W + ...`` for Conv1D), which equals the layer with
    the dense update applied. Gradients flow to the factors and steps, so meta-training needs no
    dense update and no copy of a weight. The module's class and hooks are untouched; only its
    ``forward`` is replaced on the instance and restored on exit, also on an exception.
    """
    model = unwrap_model(model)
    patched: list[nn.Module] = []
    try:
        for edit in edits:
            module, layout = module_and_layout(model, edit.name)
            if "forward" in module.__dict__:  # e.g. accelerate's dispatch hooks own it: do not bypass them
                raise InvalidInputError(
                    f"the module of {edit.name} already has an instance-level forward (accelerate dispatch or a "
                    "nested lowrank_edited); the low-rank edited forward cannot replace it"
                )
            module.forward = partial(_edited_forward, module, edit, layout, backend)
            patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward


def _edited_forward(module: nn.Module, edit: WeightEdit, layout: str, backend: str | None, x: torch.Tensor) -> torch.Tensor:
    return ops.lowrank_linear(x, module.weight, module.bias, edit.u, edit.delta, edit.scale, layout=layout, backend=backend)


def save_edits(edits: Sequence[WeightEdit], path: str | Path) -> None:
    """Save edits as safetensors: ``<name>.u``, ``<name>.delta``, ``<name>.scale`` and the layouts."""
    from safetensors.torch import save_file

    tensors = {}
    for edit in edits:
        tensors[f"{edit.name}.u"] = edit.u.detach().cpu().contiguous()
        tensors[f"{edit.name}.delta"] = edit.delta.detach().cpu().contiguous()
        tensors[f"{edit.name}.scale"] = edit.scale.detach().cpu().reshape(())
    layouts = {edit.name: edit.layout for edit in edits}
    save_file(tensors, str(path), metadata={"format": "mend_kernels.edits", "layouts": json.dumps(layouts)})


def load_edits(path: str | Path, device: torch.device | str = "cpu") -> list[WeightEdit]:
    """Read edits written by :meth:`EditHandle.save`; apply them with :func:`apply_edits`."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(device)) as file:
            layouts = json.loads((file.metadata() or {})["layouts"])
            return [
                WeightEdit(name, layout, *(file.get_tensor(f"{name}.{part}") for part in ("u", "delta", "scale")))
                for name, layout in layouts.items()
            ]
    except (OSError, KeyError, AttributeError, TypeError, ValueError, SafetensorError) as exc:
        raise CheckpointError(f"cannot read edits from {path}: {exc}") from exc
