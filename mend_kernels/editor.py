"""The MEND editor: a small network that turns a fine-tuning gradient into a model edit.

Edited weights with the same (in, out) shape share one :class:`ShapeGroupEditor` (``shared=True``);
each weight selects its own scale/shift rows (its "mode"). The editor normalises the captured rows
with running statistics, passes them through two low-rank residual layers that start as the
identity, and the edit is ``W += sign * alpha * sum_i delta~_i u~_i^T`` with one learned step size
``alpha`` per weight (SPEC sections 3 and 4).
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import ops
from ._checks import check_finite, check_tensor
from .capture import capture_edit_rows
from .edit import EditHandle, WeightEdit, apply_edits
from .errors import CheckpointError, InvalidInputError, TargetError
from .requests import encode_requests, is_encoder_decoder, make_batch
from .targets import EditTarget, check_model_has_targets, is_causal_lm, resolve_targets, unwrap_model

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "editor.safetensors"
FORMAT_VERSION = 1
V_INITS = ("normal", "xavier")


@dataclass
class EditorConfig:
    """Everything needed to rebuild an editor; saved as JSON beside its weights.

    Attributes:
        targets: the edited weights, in order (the order fixes modes and step sizes).
        rank: rank r of the low-rank layers (capped at in + out).
        n_hidden: hidden layers; the network has n_hidden + 1 low-rank residual layers.
        edit_lr: initial step size alpha of every weight.
        sign: -1 applies gradient descent (the paper); +1 reproduces the reference code.
        v_init: "normal" (reference code) or "xavier" (paper) initialisation of the down projection.
        shared: one editor per weight shape (True) or one per weight.
        eps: added to the standard deviation before normalising.
        shift_labels: labels are shifted by one position (causal LMs).
        normalize: normalise the rows with running statistics (off: the paper's "no norm" ablation).
        identity_init: start the residual branches at zero so the editor is the identity (off: the
            up projection is Xavier-initialised, the paper's "no ID init" ablation).
    """

    targets: list[EditTarget]
    rank: int = 1920
    n_hidden: int = 1
    edit_lr: float = 1e-4
    sign: float = -1.0
    v_init: str = "normal"
    shared: bool = True
    eps: float = 1e-7
    shift_labels: bool = True
    normalize: bool = True
    identity_init: bool = True
    format_version: int = field(default=FORMAT_VERSION)

    def __post_init__(self) -> None:
        if not self.targets:
            raise InvalidInputError("an editor needs at least one target weight")
        if self.rank < 1 or self.n_hidden < 0:
            raise InvalidInputError(f"rank must be >= 1 and n_hidden >= 0, got {self.rank} and {self.n_hidden}")
        if self.sign not in (-1.0, 1.0):
            raise InvalidInputError(f"sign must be -1 (descent) or +1 (reference code), got {self.sign}")
        if self.v_init not in V_INITS:
            raise InvalidInputError(f"v_init must be one of {V_INITS}, got {self.v_init!r}")
        if not math.isfinite(self.edit_lr) or self.edit_lr <= 0:
            raise InvalidInputError(f"edit_lr must be a positive number, got {self.edit_lr}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EditorConfig:
        """Rebuild a config from :meth:`to_dict` output; anything malformed raises CheckpointError."""
        if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
            version = data.get("format_version") if isinstance(data, dict) else None
            raise CheckpointError(f"editor config format_version {version!r}, expected {FORMAT_VERSION}")
        try:
            targets = [EditTarget(**target) for target in data["targets"]]
            return cls(**{**data, "targets": targets})
        except (TypeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"malformed editor config: {exc}") from exc


class ShapeGroupEditor(nn.Module):
    """The editor network of the weights of one (in, out) shape, and its normalisation statistics.

    Parameters are stacked over the ``n_hidden + 1`` layers: ``down_proj`` (L, r, D) (V in the paper),
    ``up_proj`` (L, D, r) (U, zero at init), ``bias`` (L, D), ``mode_scale``/``mode_shift``
    (L, n_modes, D). Statistics of concat(u, delta) rows: ``count``, ``mean`` (D,), ``m2`` (D,).
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        n_modes: int,
        rank: int,
        n_layers: int,
        v_init: str = "normal",
        normalize: bool = True,
        identity_init: bool = True,
    ):
        super().__init__()
        dim = n_in + n_out
        rank = min(rank, dim)
        self.n_in, self.n_out, self.normalize = n_in, n_out, normalize
        self.down_proj = nn.Parameter(torch.empty(n_layers, rank, dim))
        self.up_proj = nn.Parameter(torch.zeros(n_layers, dim, rank))
        self.bias = nn.Parameter(torch.zeros(n_layers, dim))
        self.mode_scale = nn.Parameter(torch.ones(n_layers, n_modes, dim))
        self.mode_shift = nn.Parameter(torch.zeros(n_layers, n_modes, dim))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("m2", torch.zeros(dim))
        with torch.no_grad():
            for layer in self.down_proj:
                nn.init.normal_(layer) if v_init == "normal" else nn.init.xavier_uniform_(layer)
            if not identity_init:
                for layer in self.up_proj:
                    nn.init.xavier_uniform_(layer)

    def update_statistics(self, rows: torch.Tensor) -> None:
        """Merge concat(u, delta) rows into the running statistics (training mode only)."""
        ops.running_moments_(self.mean, self.m2, self.count, rows.detach())

    def std(self) -> torch.Tensor:
        count = int(self.count)
        if count < 2:
            raise InvalidInputError(
                f"the editor's normalisation statistics hold {count} row(s); at least 2 are needed. "
                "Edit in training mode (editor.train()) or load a trained editor."
            )
        return (self.m2 / (count - 1)).sqrt()

    def forward(self, rows: torch.Tensor, mode: int, eps: float) -> torch.Tensor:
        if self.normalize and self.training:
            self.update_statistics(rows)
        mean, std = (self.mean, self.std()) if self.normalize else (torch.zeros_like(self.mean), torch.ones_like(self.m2))
        return ops.editor_mlp(
            rows,
            mean,
            std,
            self.down_proj,
            self.up_proj,
            self.bias,
            self.mode_scale[:, mode],
            self.mode_shift[:, mode],
            eps if self.normalize else 0.0,
        )


@dataclass(frozen=True)
class _Slot:
    index: int
    target: EditTarget
    group: str
    mode: int


class MENDEditor(nn.Module):
    """MEND editor for the chosen weights of one model.

    Example:
        >>> editor = MENDEditor.for_model(model, rank=1920, n_hidden=1)      # doctest: +SKIP
        >>> handle = editor.edit(model, prompts=["The Eiffel Tower is in"],   # doctest: +SKIP
        ...                      targets=["Rome"], tokenizer=tokenizer)
        >>> handle.revert()                                                   # doctest: +SKIP
    """

    def __init__(self, config: EditorConfig):
        super().__init__()
        self.config = config
        members: dict[str, list[EditTarget]] = {}
        for target in config.targets:
            members.setdefault(self._group_key(target), []).append(target)
        self.groups = nn.ModuleDict(
            {
                key: ShapeGroupEditor(
                    group[0].n_in,
                    group[0].n_out,
                    len(group),
                    config.rank,
                    config.n_hidden + 1,
                    config.v_init,
                    config.normalize,
                    config.identity_init,
                )
                for key, group in members.items()
            }
        )
        self.edit_lrs = nn.Parameter(torch.full((len(config.targets),), float(config.edit_lr)))
        self._slots = {}
        for index, target in enumerate(config.targets):
            key = self._group_key(target)
            self._slots[target.name] = _Slot(index, target, key, members[key].index(target))

    def _group_key(self, target: EditTarget) -> str:
        return target.shape_key if self.config.shared else target.name.replace(".", "#")

    # ----------------------------------------------------------------------------------- creation
    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        inner_params: Sequence[str] | None = None,
        preset: str = "auto",
        rank: int = 1920,
        n_hidden: int = 1,
        **options,
    ) -> MENDEditor:
        """A new editor (identity init) for ``model``'s ``inner_params`` or the preset's weights.

        ``options`` are further :class:`EditorConfig` fields (edit_lr, sign, v_init, shared, eps,
        shift_labels). The editor is placed on the device of the first edited weight.
        """
        targets = resolve_targets(model, inner_params, preset)
        options.setdefault("shift_labels", is_causal_lm(model))
        editor = cls(EditorConfig(targets=targets, rank=rank, n_hidden=n_hidden, **options))
        return editor.to(model.get_parameter(targets[0].name).device)

    @classmethod
    def from_official(
        cls, state_dict_or_path, model: nn.Module, inner_params: Sequence[str], *, sign: float = 1.0
    ) -> MENDEditor:
        """Load an editor trained with the authors' code (or EasyEdit): same weights, same edits.

        ``inner_params`` must be the reference config's ``model.inner_params`` in its order (it fixes
        each weight's mode and step size). The reference code adds the update (sign +1, kept by
        default); pass ``sign=-1.0`` for an editor trained with a descent variant. Files are read
        safely: safetensors, or torch checkpoints with ``weights_only=True``.
        """
        from .official import load_official

        return load_official(cls, state_dict_or_path, model, inner_params, sign=sign)

    # ----------------------------------------------------------------------------------- editing
    @property
    def targets(self) -> list[EditTarget]:
        return list(self.config.targets)

    def _slot(self, param_name: str) -> _Slot:
        if param_name not in self._slots:
            close = difflib.get_close_matches(param_name, self._slots, n=3, cutoff=0.5)
            raise TargetError(f"the editor does not edit {param_name!r} (close matches: {close or 'none'})")
        return self._slots[param_name]

    @property
    def device(self) -> torch.device:
        return self.edit_lrs.device

    def step_size(self, param_name: str) -> torch.Tensor:
        """sign * alpha of one weight (a 0-d tensor that carries gradient to ``edit_lrs``)."""
        return self.config.sign * self.edit_lrs[self._slot(param_name).index]

    def pseudo_factors(
        self, param_name: str, u: torch.Tensor, delta: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Editor output (u~, delta~) for captured rows of one weight.

        Rows whose u or delta is all zero (padding, positions after the last label) are dropped,
        as in the reference code. In training mode the rows first update the normalisation
        statistics of the weight's shape group.

        Args:
            param_name: an edited weight, e.g. ``"transformer.h.11.mlp.c_fc.weight"``.
            u: (n, in) layer inputs. delta: (n, out) gradients of the loss w.r.t. the layer output.

        Returns:
            u~ (k, in) and delta~ (k, out) in float32, k <= n.
        """
        slot = self._slot(param_name)
        target = slot.target
        floats = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
        check_tensor("u", u, dtypes=floats, device=self.device, shape=(None, target.n_in), min_rows=1)
        check_tensor("delta", delta, dtypes=floats, device=self.device, shape=(u.shape[0], target.n_out))
        rows = torch.cat((u, delta), dim=1).float()
        check_finite(f"captured rows of {param_name}", rows)
        nonzero = (u != 0).any(dim=1) & (delta != 0).any(dim=1)
        rows = rows[nonzero]
        if rows.shape[0] == 0:
            raise InvalidInputError(
                f"every captured row of {param_name} has a zero input or a zero gradient: "
                "no gradient signal reached this weight (are the labels all masked?)"
            )
        z = self.groups[slot.group](rows, slot.mode, self.config.eps)
        return z[:, : target.n_in], z[:, target.n_in :]

    def compute_edit(
        self,
        model: nn.Module,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        prompts: Sequence[str] | None = None,
        targets: Sequence[str] | None = None,
        tokenizer=None,
    ) -> list[WeightEdit]:
        """The edit of each weight for the given requests, without changing the model.

        Gradients flow from the returned factors and step sizes to the editor's parameters, so this
        is also the building block of meta-training. A model wrapped by torch.compile or
        DistributedDataParallel is edited through the model it wraps (the capture runs eagerly).
        """
        model = unwrap_model(model)
        check_model_has_targets(model, self.config.targets)
        if prompts is not None or targets is not None:
            if input_ids is not None or labels is not None:
                raise InvalidInputError("pass either token tensors (input_ids, labels) or text (prompts, targets)")
            if tokenizer is None:
                raise InvalidInputError("text requests need tokenizer=")
            encoded = encode_requests(
                tokenizer, prompts or [], targets or [], encoder_decoder=is_encoder_decoder(model), device=self.device
            )
            input_ids, attention_mask, labels = encoded["input_ids"], encoded["attention_mask"], encoded["labels"]
        if input_ids is None or labels is None:
            raise InvalidInputError("an edit needs input_ids and labels (or prompts, targets and a tokenizer)")
        batch = make_batch(model, input_ids, attention_mask, labels, shift_labels=self.config.shift_labels)
        return self(capture_edit_rows(model, self.config.targets, batch, shift_labels=self.config.shift_labels))

    def forward(self, rows: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> list[WeightEdit]:
        """The edits for captured rows: ``{weight name: (u, delta)}`` -> one WeightEdit per weight.

        The editor is a plain ``nn.Module``: call it on rows captured for any loss (for example with
        :func:`mend_kernels.functional.capture_rows`), and train it with any loss and optimizer, since
        gradients flow from the returned factors and step sizes to its parameters. Rows may cover a
        subset of the editor's weights; edits come in the editor's target order.

        Example:
            >>> with capture_rows(model, editor.targets) as capture:             # doctest: +SKIP
            ...     my_loss(model(ids)).backward()
            >>> edits = editor(capture.all_rows())                                # doctest: +SKIP
        """
        if not rows:
            raise InvalidInputError("rows is empty: pass {weight name: (u, delta)} for at least one edited weight")
        for name in rows:
            self._slot(name)  # an unknown name raises TargetError with the closest edited weights
        edits = []
        for target in self.config.targets:
            if target.name in rows:
                u_tilde, delta_tilde = self.pseudo_factors(target.name, *rows[target.name])
                edits.append(WeightEdit(target.name, target.layout, u_tilde, delta_tilde, self.step_size(target.name)))
        return edits

    def edit(
        self,
        model: nn.Module,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        prompts: Sequence[str] | None = None,
        targets: Sequence[str] | None = None,
        tokenizer=None,
        keep_original: bool = True,
        backend: str | None = None,
    ) -> EditHandle:
        """Edit ``model`` in place for one or more requests and return a handle to revert it.

        Requests are token tensors (``labels`` = -100 except on the target tokens) or text
        ``prompts`` and ``targets`` with a ``tokenizer``. All rows of all requests form one update
        of rank <= number of rows. In training mode the rows also update the normalisation
        statistics. If any check fails, neither the model nor the editor is changed.

        Args:
            keep_original: keep a CPU copy of the edited weights so ``revert()`` restores them
                bit for bit; without it ``revert()`` subtracts the update (exact up to rounding).
            backend: backend of the in-place update (default: best available).
        """
        model = unwrap_model(model)
        statistics = {name: buffer.clone() for name, buffer in self.named_buffers()}
        try:
            with torch.no_grad():
                edits = self.compute_edit(
                    model, input_ids, attention_mask, labels, prompts=prompts, targets=targets, tokenizer=tokenizer
                )
            return apply_edits(model, edits, keep_original=keep_original, backend=backend)
        except BaseException:  # a failed edit leaves the editor's statistics as they were, too
            for name, buffer in self.named_buffers():
                buffer.copy_(statistics[name])
            raise

    # ----------------------------------------------------------------------------------- saving
    def save(self, directory: str | Path) -> None:
        """Write ``config.json`` and ``editor.safetensors`` (weights and statistics) to ``directory``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "mend_kernels", "version": str(FORMAT_VERSION)})
        (directory / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2))

    @classmethod
    def load(cls, directory: str | Path, model: nn.Module) -> MENDEditor:
        """Load an editor saved by :meth:`save`, check it against ``model``, and return it in eval mode."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        try:
            config = EditorConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text()))
            tensors = load_file(directory / WEIGHTS_FILE)
        except (OSError, json.JSONDecodeError, KeyError, SafetensorError) as exc:
            raise CheckpointError(f"cannot read the editor in {directory}: {exc}") from exc
        try:
            check_model_has_targets(model, config.targets)
        except TargetError as exc:
            raise CheckpointError(f"the editor in {directory} does not match the model: {exc}") from exc
        editor = cls(config)
        editor.load_tensors(tensors, source=str(directory))
        return editor.to(model.get_parameter(config.targets[0].name).device).eval()

    def load_tensors(self, tensors: dict[str, torch.Tensor], *, source: str) -> None:
        """Copy a full state dict into the editor, checking names, shapes and finiteness first."""
        expected = self.state_dict()
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise CheckpointError(f"{source}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}")
        for name, tensor in tensors.items():
            if tensor.shape != expected[name].shape or tensor.dtype != expected[name].dtype:
                raise CheckpointError(
                    f"{source}: tensor {name} is {tensor.dtype} {tuple(tensor.shape)}, "
                    f"expected {expected[name].dtype} {tuple(expected[name].shape)}"
                )
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise CheckpointError(f"{source}: tensor {name} contains NaN or infinity")
        self.load_state_dict(tensors)
