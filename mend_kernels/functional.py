"""Building blocks for embedding MEND in your own training, evaluation or serving code.

This module is the stable functional surface of the package (see docs/embedding.md):

- :func:`capture_rows` records (u, delta) of chosen linear layers for any loss you compute, with no
  weight gradients and a backward that stops at the lowest captured layer;
- the editor is a plain ``nn.Module``: ``editor(rows)`` maps captured rows to :class:`WeightEdit`
  factors (:meth:`MENDEditor.forward`), and ``ShapeGroupEditor`` maps the rows of one weight shape;
- :func:`temporarily_edited` applies edits for the duration of a ``with`` block, as a low-rank side
  path or in place, and restores the model on exit, also on an exception;
- :func:`broadcast_edits` sends one rank's edit factors to every rank of a process group;
- the fused ops with autograd: :func:`capture_linear`, :func:`lowrank_linear`, :func:`editor_mlp`,
  and the in-place :func:`rank_update_`.

Every function accepts a model wrapped by ``torch.compile`` or ``DistributedDataParallel`` and works
on the model inside (:func:`unwrap_model`), whose parameters the wrapper shares.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from .capture import RowCapture
from .edit import WeightEdit, _check_edit, apply_edits, lowrank_edited
from .errors import InvalidInputError, TargetError
from .ops import capture_linear, editor_mlp, lowrank_linear, rank_update_
from .targets import EditTarget, check_model_has_targets, resolve_targets, unwrap_model

MODES = ("lowrank", "inplace")

__all__ = [
    "broadcast_edits",
    "capture_linear",
    "capture_rows",
    "editor_mlp",
    "lowrank_linear",
    "rank_update_",
    "temporarily_edited",
    "unwrap_model",
]


@contextmanager
def capture_rows(model: nn.Module, layers: Sequence[str | EditTarget]) -> Iterator[RowCapture]:
    """Record (u, delta) of ``layers`` while you run any forward and backward inside the block.

    For the duration, every parameter of the model is frozen (no weight gradient is formed and no
    ``.grad`` written), layers below the lowest captured layer build no autograd graph, and each
    captured layer's backward writes its output gradient as float32 rows. A compiled model runs
    eagerly inside the block (``torch.compiler.set_stance("force_eager")``): the capture keeps
    per-call Python state that a compiled graph cannot. Everything is restored on exit.

    Args:
        model: the model (or its torch.compile / DDP wrapper; under DDP call ``model.module`` inside
            the block: the wrapper's forward would start a gradient all-reduce that never completes).
        layers: weight names (``"transformer.h.3.mlp.c_fc.weight"``) or :class:`EditTarget` objects
            (e.g. ``editor.targets``) of nn.Linear or GPT-2 Conv1D layers.

    Yields:
        the :class:`RowCapture`: after the backward, ``capture.rows(name)`` gives (u (n, in),
        delta (n, out)) of one weight and ``capture.all_rows()`` all of them, ready for ``editor(rows)``.

    Example:
        >>> with capture_rows(model, ["transformer.h.3.mlp.c_fc.weight"]) as capture:   # doctest: +SKIP
        ...     my_loss(model(ids)).backward()
        >>> u, delta = capture.rows("transformer.h.3.mlp.c_fc.weight")                  # doctest: +SKIP
    """
    model = unwrap_model(model)
    targets = _targets(model, layers)
    with torch.compiler.set_stance("force_eager"), RowCapture(model, targets) as capture:
        yield capture


def _targets(model: nn.Module, layers: Sequence[str | EditTarget]) -> list[EditTarget]:
    """``layers`` as EditTargets checked against ``model``; a bad name raises TargetError with close matches."""
    if isinstance(layers, (str, EditTarget)):
        raise InvalidInputError(f"layers must be a list of weight names or EditTargets, got a single {layers!r}")
    layers = list(layers)
    for layer in layers:
        if not isinstance(layer, (str, EditTarget)):
            raise InvalidInputError(f"layers must hold weight names or EditTargets, got {type(layer).__name__}")
    targets = resolve_targets(model, [layer if isinstance(layer, str) else layer.name for layer in layers])
    given = [layer for layer in layers if isinstance(layer, EditTarget)]
    if given:  # an EditTarget built for another model must match this one's shape and layout
        check_model_has_targets(model, given)
    return targets


@contextmanager
def temporarily_edited(
    model: nn.Module, edits: Sequence[WeightEdit], *, mode: str = "lowrank", backend: str | None = None
) -> Iterator[nn.Module]:
    """Run the model with ``edits`` applied inside the block, and restore it on exit, also on an exception.

    Modes:
        ``"lowrank"`` (default): no weight changes. Each edited layer computes
        ``x W^T + b + scale * (x u~^T) delta~`` (:func:`lowrank_linear`), so gradients reach the
        factors and steps (meta-training, or a loss on the edited model), nothing dense is formed, and
        concurrent readers of the weights are unaffected. Costs a little per forward. A compiled
        model recompiles for the edited forward; prefer ``"inplace"`` there.
        ``"inplace"``: the rank-k update is added to the weights (:func:`mend_kernels.apply_edits`),
        so forwards run at full speed; on exit the weights are restored bit for bit from a CPU copy,
        discarding anything else written to those weights inside the block.

    Every edit is checked before anything changes: unknown or non-Linear weights raise TargetError,
    factors of the wrong shape, dtype or device or with NaN/inf raise InvalidInputError /
    NonFiniteError, and the model is left untouched.

    Yields:
        the (unwrapped) model.

    Example:
        >>> with temporarily_edited(model, handle.edits, mode="inplace"):   # doctest: +SKIP
        ...     answer = model.generate(ids)
    """
    if mode not in MODES:
        raise InvalidInputError(f"mode must be one of {MODES}, got {mode!r}")
    model = unwrap_model(model)
    _check_edits(model, edits)
    if mode == "lowrank":
        with lowrank_edited(model, edits, backend=backend):
            yield model
        return
    handle = apply_edits(model, edits, keep_original=True, backend=backend)
    try:
        yield model
    finally:
        handle.revert(force=True)


def _check_edits(model: nn.Module, edits: Sequence[WeightEdit]) -> None:
    if isinstance(edits, WeightEdit):
        raise InvalidInputError("edits must be a list of WeightEdit, got a single WeightEdit: wrap it in [...]")
    edits = list(edits)
    if not edits:
        raise InvalidInputError("edits is empty: pass at least one WeightEdit")
    for edit in edits:
        if not isinstance(edit, WeightEdit):
            raise InvalidInputError(f"edits must hold WeightEdit objects, got {type(edit).__name__}")
    params = dict(model.named_parameters())
    for edit in edits:
        _check_edit(model, edit, params)
    names = [edit.name for edit in edits]
    if len(set(names)) != len(names):
        raise TargetError(f"the edits name a weight more than once: {sorted(names)}")


def broadcast_edits(
    edits: Sequence[WeightEdit] | None, *, src: int = 0, group=None, device: torch.device | str = "cpu"
) -> list[WeightEdit]:
    """Every rank returns rank ``src``'s edits: their factors and steps, never dense weights.

    The recipe for identical weights on every rank (DDP or any other data parallelism): one rank
    computes the edit, all ranks receive its factors and apply them with the same call, so they end
    with bit-identical weights, and only the computing rank needs an editor (its normalisation
    statistics, updated in training mode, exist once). Collective: call it on every rank of
    ``group``, with the edits on ``src`` and ``None`` elsewhere. ``device`` is where the tensors
    travel and are returned: ``"cpu"`` for gloo, the rank's CUDA device for NCCL.

    If the edits on ``src`` are malformed, every rank raises InvalidInputError (no rank hangs).

    Example:
        >>> edits = editor.compute_edit(ddp_model, **request) if rank == 0 else None     # doctest: +SKIP
        >>> apply_edits(ddp_model.module, broadcast_edits(edits))                        # doctest: +SKIP
    """
    if dist.get_rank() == src:
        header = _broadcast_header(edits)
        _broadcast_json(header, src, group, device)
    else:
        header = _broadcast_json(None, src, group, device)
    if "error" in header:
        raise InvalidInputError(f"broadcast_edits on rank {src}: {header['error']}")
    received = []
    for index, entry in enumerate(header["edits"]):
        shapes = {"u": (entry["rows"], entry["n_in"]), "delta": (entry["rows"], entry["n_out"]), "scale": ()}
        parts = {}
        for part, shape in shapes.items():
            tensor = (
                getattr(edits[index], part).detach().to(device, torch.float32).contiguous()
                if dist.get_rank() == src
                else torch.empty(shape, dtype=torch.float32, device=device)
            )
            dist.broadcast(tensor, src, group=group)
            parts[part] = tensor
        received.append(WeightEdit(entry["name"], entry["layout"], parts["u"], parts["delta"], parts["scale"]))
    return received


def _broadcast_header(edits: Sequence[WeightEdit] | None) -> dict:
    """What the receivers need to allocate the factors, or the reason the edits cannot be sent."""
    if not edits or not all(isinstance(edit, WeightEdit) for edit in edits):
        return {"error": f"edits must be a non-empty list of WeightEdit on the source rank, got {edits!r:.80}"}
    entries = []
    for edit in edits:
        if edit.u.dim() != 2 or edit.delta.dim() != 2 or edit.u.shape[0] != edit.delta.shape[0] or edit.scale.numel() != 1:
            return {
                "error": f"the edit of {edit.name} has u {tuple(edit.u.shape)}, delta {tuple(edit.delta.shape)}, "
                f"scale {tuple(edit.scale.shape)}; expected (n, in), (n, out) and a 0-d step"
            }
        n_rows, n_in = edit.u.shape
        entries.append({"name": edit.name, "layout": edit.layout, "rows": n_rows, "n_in": n_in, "n_out": edit.delta.shape[1]})
    return {"edits": entries}


def _broadcast_json(value: dict | None, src: int, group, device) -> dict:
    """Broadcast a JSON header as bytes (no pickle: nothing from another process is unpickled)."""
    payload = torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8) if value is not None else None
    size = torch.tensor([0 if payload is None else payload.numel()], dtype=torch.int64, device=device)
    dist.broadcast(size, src, group=group)
    buffer = payload.to(device) if payload is not None else torch.empty(int(size), dtype=torch.uint8, device=device)
    dist.broadcast(buffer, src, group=group)
    return value if value is not None else json.loads(buffer.cpu().numpy().tobytes().decode())
