"""Editing models that do not fit in memory: stream them from a sharded safetensors checkpoint.

A checkpoint as transformers writes it (``config.json``, ``model.safetensors.index.json`` and its
shards, or one ``model.safetensors``) is opened as a :class:`StreamedModel`: the model is built
from its config with every parameter on the meta device, then

- the edited blocks and everything outside the block list (embeddings, final norm, LM head) are
  read into memory (memory-mapped, copy-on-write) and stay resident;
- each block below the lowest edited block is read just before it runs and dropped right after,
  so at most one of them is in memory. They need no autograd graph: the row capture freezes every
  weight and their input needs no gradient. For meta-training, :class:`StreamedMetaTrainer` runs
  each step's batches through them together, once, and the step's forwards start above them.

The model's own forward runs unchanged (its attention masks, rotary embeddings and head), so the
editor, :class:`~mend_kernels.capture.RowCapture` and :class:`~mend_kernels.train.MetaTrainer` work
on ``streamed.model`` as on any model. Peak memory of an edit: the resident modules + one streamed
block + the activations of the edited blocks.

The edit is written back atomically, either into the shards (:meth:`StreamedModel.write_into_shards`)
or as a small delta file of factors (:func:`save_edits_atomically`, applied by :func:`load_with_deltas`).

Example:
    >>> with StreamedModel.open("llama-13b/") as streamed:                          # doctest: +SKIP
    ...     editor = MENDEditor.load("editor/", streamed.model)
    ...     edits = streamed.edit(editor, input_ids, attention_mask, labels)        # shards rewritten
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from .edit import WeightEdit, apply_edits, load_edits, save_edits
from .errors import CheckpointError, InvalidInputError, TargetError
from .targets import EditTarget, resolve_targets
from .train import MetaTrainer

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_EDITED_SUFFIX = re.compile(r"\.edit-[0-9a-f]{8}$")


# ------------------------------------------------------------------------------------ the checkpoint
@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: its shard, dtype, shape and absolute byte range in the shard file."""

    shard: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass
class SafetensorsCheckpoint:
    """The tensors of a safetensors checkpoint directory, read from the shard headers (no data).

    Example:
        >>> checkpoint = SafetensorsCheckpoint.open("llama-13b/")     # doctest: +SKIP
        >>> checkpoint.entries["lm_head.weight"].shard                 # doctest: +SKIP
        'model-00006-of-00006.safetensors'
    """

    directory: Path
    entries: dict[str, TensorEntry]
    index: dict | None  # the parsed index file; None for a single-file checkpoint

    @classmethod
    def open(cls, directory: str | Path) -> SafetensorsCheckpoint:
        """Read and check the index and every shard header; raises CheckpointError naming the problem."""
        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file():
            raise CheckpointError(f"{directory} is not a checkpoint directory: {CONFIG_FILE} is missing")
        index = None
        if (directory / INDEX_FILE).is_file():
            index = _read_index(directory / INDEX_FILE)
            weight_map = index["weight_map"]
        elif (directory / SINGLE_FILE).is_file():
            weight_map = None
        else:
            raise CheckpointError(f"{directory} holds neither {INDEX_FILE} nor {SINGLE_FILE}")
        shards = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]
        entries = {}
        for shard in shards:
            for name, entry in _read_shard_header(directory, shard).items():
                if weight_map is None or weight_map.get(name) == shard:
                    entries[name] = entry
        missing = sorted(set(weight_map or ()) - set(entries))
        if missing:
            raise CheckpointError(f"{INDEX_FILE} lists tensors its shards do not hold: {missing[:5]}")
        return cls(directory, entries, index)

    def read(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The named tensors, memory-mapped copy-on-write: pages are read when first touched, and
        released when the tensors are dropped (each shard is opened per call, not kept mapped)."""
        from safetensors import SafetensorError, safe_open

        by_shard: dict[str, list[str]] = {}
        for name in names:
            by_shard.setdefault(self.entries[name].shard, []).append(name)
        tensors = {}
        for shard, shard_names in by_shard.items():
            try:
                with safe_open(str(self.directory / shard), framework="pt") as file:
                    tensors.update({name: file.get_tensor(name) for name in shard_names})
            except (OSError, SafetensorError) as exc:
                raise CheckpointError(f"cannot read {shard_names[:3]} from {self.directory / shard}: {exc}") from exc
        return tensors


def _read_index(path: Path) -> dict:
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{path} has no 'weight_map' of tensor name -> shard file")
    return index


def _read_shard_header(directory: Path, shard: str) -> dict[str, TensorEntry]:
    """The tensors of one shard from its header: 8-byte little-endian length, then JSON."""
    path = directory / shard
    if Path(shard).name != shard:
        raise CheckpointError(f"shard name {shard!r} in {INDEX_FILE} is not a file name of the checkpoint directory")
    try:
        size = path.stat().st_size
        with open(path, "rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            if length > size - 8:
                raise ValueError(f"header length {length} exceeds the file size {size}")
            header = json.loads(file.read(length))
    except FileNotFoundError:
        raise CheckpointError(f"shard {shard} listed in the checkpoint is missing from {directory}") from None
    except (OSError, struct.error, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"corrupt safetensors header in {path}: {exc}") from exc
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (8 + length + offset for offset in info["data_offsets"])
            entry = TensorEntry(shard, _DTYPES[info["dtype"]], tuple(info["shape"]), begin, end)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"corrupt entry {name!r} in the header of {path}: {exc}") from exc
        if end > size or end - begin != _nbytes(entry):
            raise CheckpointError(f"{path} is truncated or corrupt: tensor {name!r} does not fit its byte range")
        entries[name] = entry
    return entries


def _nbytes(entry: TensorEntry) -> int:
    count = 1
    for size in entry.shape:
        count *= size
    return count * torch.empty((), dtype=entry.dtype).element_size()


# ------------------------------------------------------------------------------------ the model
class StreamedModel:
    """A causal LM of a checkpoint directory whose blocks below the lowest edited one are streamed.

    Use :meth:`open`; ``streamed.model`` is a regular transformers model (eval mode) to edit or
    meta-train. Its streamed blocks run through :meth:`_run_block` (an instance-level forward: they
    are never edited or captured). Close it (or use ``with``) to undo that.
    """

    def __init__(self, model: nn.Module, checkpoint: SafetensorsCheckpoint, targets: list[EditTarget],
                 streamed_blocks: list[str]):
        self.model = model
        self.checkpoint = checkpoint
        self.targets = targets
        self.streamed_blocks = streamed_blocks
        self._keys = _checkpoint_keys(model, checkpoint)
        self._pending: dict[bytes, dict[str, torch.Tensor]] = {}  # batches to precompute together
        self._cache: dict[bytes, object] = {}  # batch key -> output of the last streamed block
        self._batch: bytes | None = None  # key of the batch the model is running on
        self._recording = False
        self._hooks = [model.register_forward_pre_hook(self._note_batch, with_kwargs=True),
                       model.register_forward_hook(self._forget_batch, always_call=True)]
        for block_name in streamed_blocks:  # the model's loop calls them; they are never edited or captured
            block = model.get_submodule(block_name)
            block.forward = partial(self._run_block, block_name, block)
        resident = [name for name, _ in _parameters_and_buffers(model) if not _under(name, streamed_blocks)]
        self._assign(resident)

    @classmethod
    def open(
        cls, directory: str | Path, inner_params: Sequence[str] | None = None, preset: str = "auto",
        dtype: torch.dtype | None = None,
    ) -> StreamedModel:
        """Build the model of ``directory`` on the meta device and load all but the lower blocks.

        ``inner_params`` names the edited weights (default: the preset's, e.g. the MLPs of the last
        3 blocks); they must be in one block list (``model.layers``, ``transformer.h``). ``dtype``
        defaults to the stored dtype of the first of ``inner_params`` (else of the checkpoint's
        first tensor by name). Nothing on disk is changed.
        """
        checkpoint = SafetensorsCheckpoint.open(directory)
        model = _skeleton(checkpoint.directory, dtype, checkpoint, inner_params)
        targets = resolve_targets(model, inner_params, preset)
        blocks_name, lowest = _lowest_edited_block(model, targets)
        return cls(model, checkpoint, targets, [f"{blocks_name}.{index}" for index in range(lowest)])

    def close(self) -> None:
        """Remove the streaming from the model's blocks (the model stays usable only for resident work)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for block_name in self.streamed_blocks:
            self.model.get_submodule(block_name).__dict__.pop("forward", None)
        self._cache.clear()

    def __enter__(self) -> StreamedModel:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ---------------------------------------------------------------------------- running blocks
    def expect(self, batch: dict[str, torch.Tensor]) -> None:
        """Announce a batch the model will run on: at the first forward that misses the cache, every
        announced batch passes the streamed blocks together (each block read once for all of them),
        and later forwards on them skip the streamed blocks. Used by :class:`StreamedMetaTrainer`."""
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}
        self._pending[_batch_key(**inputs)] = inputs

    def _note_batch(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        incremental = kwargs.get("past_key_values") is not None or kwargs.get("use_cache")  # generation
        cacheable = input_ids is not None and not incremental
        self._batch = _batch_key(input_ids, kwargs.get("attention_mask")) if cacheable else None

    def _forget_batch(self, *unused) -> None:  # a call of an inner module alone is never taken for a cached batch
        self._batch = None

    def _run_block(self, block_name: str, block: nn.Module, *args, **kwargs):
        if self._recording:  # precomputing: the first block's inputs are what the model prepared for it
            raise _BlockInputs(args, kwargs)
        if self._batch in self._pending and block_name == self.streamed_blocks[0]:
            self._precompute()
        if self._batch in self._cache:  # every streamed block passes on the last one's output
            return self._cache[self._batch]
        self._load(block_name)
        try:
            return type(block).forward(block, *args, **kwargs)
        finally:
            self._drop(block_name)

    def _precompute(self) -> None:
        """Run the announced batches through the streamed blocks, one block at a time, without autograd."""
        running, inputs, outputs = self._batch, {}, {}
        with torch.no_grad():
            for key, batch in self._pending.items():
                self._recording = True
                try:
                    self.model(**batch)
                except _BlockInputs as first:
                    inputs[key] = (first.args, first.kwargs)
                finally:
                    self._recording = False
            for block_name in self.streamed_blocks:
                self._load(block_name)
                block = self.model.get_submodule(block_name)
                try:
                    for key, (args, kwargs) in inputs.items():
                        outputs[key] = type(block).forward(block, *args, **kwargs)
                        inputs[key] = _with_hidden_states(args, kwargs, outputs[key])
                finally:
                    self._drop(block_name)
        self._pending.clear()
        self._cache, self._batch = outputs, running

    # ---------------------------------------------------------------------------- loading blocks
    def _load(self, block_name: str) -> None:
        self._assign([name for name, _ in _parameters_and_buffers(self.model) if _under(name, [block_name])])

    def _drop(self, block_name: str) -> None:
        for name, tensor in list(_parameters_and_buffers(self.model.get_submodule(block_name))):
            if f"{block_name}.{name}" in self._keys:  # buffers computed at construction are kept
                _set_tensor(self.model, f"{block_name}.{name}", torch.empty_like(tensor, device="meta"))

    def _assign(self, names: list[str]) -> None:
        """Read ``names`` from the checkpoint and put them into the model (tied names share one read)."""
        keys = {name: self._keys[name] for name in names if name in self._keys}
        tensors = self.checkpoint.read(sorted(set(keys.values())))
        for name, key in keys.items():
            target = _get_tensor(self.model, name)
            _set_tensor(self.model, name, tensors[key].to(target.dtype))

    # ---------------------------------------------------------------------------- editing
    def edit(self, editor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             labels: torch.Tensor | None = None, *, delta_path: str | Path | None = None) -> list[WeightEdit]:
        """Compute the edit of the requests and write it back: into the shards (default), or only
        to ``delta_path`` as a delta file when given. Returns the edits."""
        with torch.no_grad():  # the capture enables autograd for its own backward
            edits = editor.compute_edit(self.model, input_ids, attention_mask, labels)
        if delta_path is not None:
            save_edits_atomically(edits, delta_path)
        else:
            self.write_into_shards(edits)
        return edits

    def write_into_shards(self, edits: Sequence[WeightEdit]) -> None:
        """Apply ``edits`` to the resident weights (fp32 accumulation, one rounding) and commit them
        to the checkpoint atomically; on any failure the checkpoint on disk is unchanged."""
        streamed = [edit.name for edit in edits if _under(edit.name, self.streamed_blocks)]
        if streamed:
            raise TargetError(f"{streamed} are streamed weights, not resident edited weights of this model")
        handle = apply_edits(self.model, edits, keep_original=False)
        try:
            replace_tensors(self.checkpoint, {e.name: self.model.get_parameter(e.name).detach() for e in edits},
                            keys={e.name: self._keys[e.name] for e in edits})
        except BaseException:
            handle.revert()
            raise
        self.checkpoint = SafetensorsCheckpoint.open(self.checkpoint.directory)


class _BlockInputs(Exception):
    """Stops a forward at the first streamed block, carrying the arguments the model passed it."""

    def __init__(self, args: tuple, kwargs: dict):
        super().__init__("first streamed block reached")
        self.args, self.kwargs = args, kwargs


def _batch_key(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> bytes:
    parts = [input_ids] + ([attention_mask] if attention_mask is not None else [])
    return b"|".join(repr(tuple(t.shape)).encode() + t.detach().cpu().numpy().tobytes() for t in parts)


def _with_hidden_states(args: tuple, kwargs: dict, output) -> tuple[tuple, dict]:
    """The next block's arguments: the same, with the hidden states replaced by this block's output."""
    hidden = output[0] if isinstance(output, tuple) else output
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _skeleton(directory: Path, dtype: torch.dtype | None, checkpoint: SafetensorsCheckpoint,
              inner_params: Sequence[str] | None) -> nn.Module:
    """The model of ``config.json`` with parameters on the meta device (buffers computed on the CPU)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(directory)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"cannot read the model config in {directory}: {exc}") from exc
    if dtype is None:
        names = list(inner_params or ()) + sorted(checkpoint.entries)
        dtype = next(checkpoint.entries[n].dtype for n in names if n in checkpoint.entries)
    with init_empty_weights(include_buffers=False):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except ValueError as exc:
            raise CheckpointError(f"{directory}: the config is not that of a causal LM: {exc}") from exc
    model.tie_weights()  # on the meta device the tied head is its own parameter until tied again
    model.config.use_cache = False  # editing and training need no key/value cache (and streaming skips blocks)
    return model.eval()


def _checkpoint_keys(model: nn.Module, checkpoint: SafetensorsCheckpoint) -> dict[str, str]:
    """For every parameter (and stored buffer) of the model: the checkpoint tensor holding it.

    Tied parameters (a tied LM head) are stored once under one of their names. Raises
    CheckpointError when a parameter is missing or has another shape (config and checkpoint differ).
    """
    aliases: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(parameter), []).append(name)
    keys = {}
    for names in aliases.values():
        stored = [name for name in names if name in checkpoint.entries]
        if not stored:
            raise CheckpointError(
                f"the checkpoint has no tensor for parameter {names[0]!r}: config and checkpoint differ")
        for name in names:
            keys[name] = stored[0]
    keys.update({name: name for name, _ in model.named_buffers() if name in checkpoint.entries})
    for name, key in keys.items():
        want, got = tuple(_get_tensor(model, name).shape), checkpoint.entries[key].shape
        if want != got:
            raise CheckpointError(f"{key} is {got} in the checkpoint but {name} is {want} in the model of its config")
    return keys


def _lowest_edited_block(model: nn.Module, targets: list[EditTarget]) -> tuple[str, int]:
    """The block list (an nn.ModuleList such as ``model.layers``) holding the targets, and the lowest index."""
    found = set()
    for target in targets:
        parts = target.name.split(".")
        for position in range(1, len(parts)):
            container = ".".join(parts[:position])
            if parts[position].isdigit() and isinstance(model.get_submodule(container), nn.ModuleList):
                found.add((container, int(parts[position])))
                break
        else:
            raise TargetError(f"{target.name!r} is not inside a block list (nn.ModuleList): nothing to stream below it")
    lists = {container for container, _ in found}
    if len(lists) != 1:
        raise TargetError(f"the edited weights lie in several block lists {sorted(lists)}; streaming needs one")
    return lists.pop(), min(index for _, index in found)


def _parameters_and_buffers(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers()


def _under(name: str, prefixes: Sequence[str]) -> bool:
    return any(name.startswith(prefix + ".") for prefix in prefixes)


def _get_tensor(model: nn.Module, name: str) -> torch.Tensor:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner)
    return module._parameters[leaf] if leaf in module._parameters else module._buffers[leaf]


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Swap a parameter or buffer (frozen: the base model never needs weight gradients)."""
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[leaf] = value


class StreamedMetaTrainer(MetaTrainer):
    """:class:`~mend_kernels.train.MetaTrainer` for a :class:`StreamedModel`: the frozen lower blocks
    run once per step, for the edit, paraphrase and locality batches together, block by block and
    without autograd; the step's four forwards then start at the lowest edited block.

    Example:
        >>> with StreamedModel.open("llama-13b/") as streamed:                                   # doctest: +SKIP
        ...     editor = MENDEditor.for_model(streamed.model)
        ...     StreamedMetaTrainer(streamed, editor, tokenizer, train, val, TrainConfig()).fit()
    """

    def __init__(self, streamed: StreamedModel, editor, tokenizer, train_examples, val_examples, config=None,
                 out_dir=None):
        super().__init__(streamed.model, editor, tokenizer, train_examples, val_examples, config, out_dir)
        self.streamed = streamed

    def _encode(self, prompts: list[str], targets: list[str]) -> dict[str, torch.Tensor]:
        batch = super()._encode(prompts, targets)
        self.streamed.expect(batch)
        return batch


# ------------------------------------------------------------------------------------ writing back
def replace_tensors(checkpoint: SafetensorsCheckpoint, tensors: dict[str, torch.Tensor], *,
                    keys: dict[str, str] | None = None) -> None:
    """Rewrite tensors of a checkpoint in place of their old values, atomically.

    Each shard holding one of them is copied to a new file in the same directory (same header,
    the tensors' bytes overwritten, fsync). The single commit point is then one ``os.replace``:
    of the index, which now names the new shards (sharded checkpoints), or of the file itself
    (single-file checkpoints). Interrupted before it, the old checkpoint is intact (the new files
    are removed); after it, the old shards are removed. ``keys`` maps a tensor's name to its
    checkpoint name (tied weights), default the same.
    """
    keys = keys or {name: name for name in tensors}
    by_shard: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        entry = checkpoint.entries[keys[name]]
        if tensor.dtype != entry.dtype or tuple(tensor.shape) != entry.shape:
            raise CheckpointError(f"{name}: {tensor.dtype} {tuple(tensor.shape)} cannot replace the stored "
                                  f"{entry.dtype} {entry.shape}")
        by_shard.setdefault(entry.shard, {})[keys[name]] = tensor
    directory = checkpoint.directory
    written: dict[str, Path] = {}
    try:
        for shard, shard_tensors in by_shard.items():
            patches = {checkpoint.entries[key]: tensor for key, tensor in shard_tensors.items()}
            written[shard] = _patched_copy(directory, shard, patches)
        if checkpoint.index is None:
            os.replace(written.pop(SINGLE_FILE), directory / SINGLE_FILE)
        else:
            _commit_index(directory, checkpoint.index, {old: path.name for old, path in written.items()})
        _fsync_directory(directory)
    except BaseException:
        for path in written.values():
            path.unlink(missing_ok=True)
        raise
    for old in written:  # committed: the old shards are no longer part of the checkpoint
        (directory / old).unlink(missing_ok=True)


def _patched_copy(directory: Path, shard: str, tensors: dict[TensorEntry, torch.Tensor]) -> Path:
    """A copy of ``shard`` under a new name with ``tensors`` written over their byte ranges, fsynced."""
    stem = _EDITED_SUFFIX.sub("", shard.removesuffix(".safetensors"))
    path = directory / f"{stem}.edit-{uuid.uuid4().hex[:8]}.safetensors"
    try:
        shutil.copyfile(directory / shard, path)  # kernel-side copy: no shard-sized buffer in this process
        with open(path, "r+b") as file:
            for entry, tensor in tensors.items():
                file.seek(entry.start)
                file.write(memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def _commit_index(directory: Path, index: dict, renamed: dict[str, str]) -> None:
    weight_map = {name: renamed.get(shard, shard) for name, shard in index["weight_map"].items()}
    _write_atomically(directory / INDEX_FILE, json.dumps({**index, "weight_map": weight_map}, indent=2).encode())


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _fsync_directory(directory: Path) -> None:
    """Make the renames durable (POSIX: a rename is recorded in the directory's own metadata)."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# ------------------------------------------------------------------------------------ delta files
def save_edits_atomically(edits: Sequence[WeightEdit], path: str | Path) -> None:
    """:func:`~mend_kernels.edit.save_edits` through a temporary file and ``os.replace``: the file
    at ``path`` is either the old one or the complete new one."""
    path = Path(path)
    if not path.parent.is_dir():
        raise InvalidInputError(f"cannot write the delta file {path}: directory {path.parent} does not exist")
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        save_edits(edits, temporary)
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def load_with_deltas(directory: str | Path, deltas: Sequence[str | Path], **from_pretrained) -> nn.Module:
    """Load a checkpoint with ``AutoModelForCausalLM.from_pretrained`` and merge delta files into it,
    in order (fp32 accumulation, one rounding per delta). For the unmerged side path instead, load
    the model alone and run it under ``lowrank_edited(model, load_edits(path))``.

    Example:
        >>> model = load_with_deltas("llama-13b/", ["fact-1.safetensors"], dtype=torch.bfloat16)  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM

    SafetensorsCheckpoint.open(directory)  # the package's errors for missing or corrupt checkpoints
    edits = [load_edits(path) for path in deltas]  # every delta readable before any loading
    model = AutoModelForCausalLM.from_pretrained(directory, **from_pretrained).eval()
    for delta in edits:
        apply_edits(model, [_on_device_of(model, edit) for edit in delta], keep_original=False)
    return model


def _on_device_of(model: nn.Module, edit: WeightEdit) -> WeightEdit:
    weight = dict(model.named_parameters()).get(edit.name)  # an unknown name is apply_edits' TargetError
    device = weight.device if weight is not None else edit.u.device
    return WeightEdit(edit.name, edit.layout, edit.u.to(device), edit.delta.to(device), edit.scale.to(device))


# ------------------------------------------------------------------------------------ accelerate offload
@contextmanager
def offloaded_weights_attached(model: nn.Module) -> Iterator[nn.Module]:
    """Make a model dispatched with CPU offload (accelerate ``cpu_offload`` / ``dispatch_model`` with
    an offloaded device map) editable in place: for the duration, each offloaded module holds its
    offloaded CPU tensors themselves and its hook stops moving them, so ``editor.edit(model, ...)``
    and ``apply_edits`` change the offloaded weights, which the hooks use afterwards.

    Only CPU execution of CPU-held offloaded weights is supported (disk offload keeps no tensors
    to edit; raise rather than edit a copy).

    Example:
        >>> cpu_offload(model, execution_device="cpu")                        # doctest: +SKIP
        >>> with offloaded_weights_attached(model):
        ...     editor.edit(model, input_ids, attention_mask, labels)
    """
    attached = []
    try:
        for module in model.modules():
            hook = getattr(module, "_hf_hook", None)
            hooks = getattr(hook, "hooks", (hook,))  # SequentialHook chains several
            for inner in hooks:
                if getattr(inner, "offload", False):
                    _attach_offloaded(module, inner)
                    attached.append((module, inner))
        yield model
    finally:
        for module, hook in attached:
            for name, _ in _parameters_and_buffers(module):
                if "." not in name and name in hook.weights_map:
                    _set_tensor(module, name, torch.empty_like(_get_tensor(module, name), device="meta"))
            hook.offload = True


def _attach_offloaded(module: nn.Module, hook) -> None:
    if torch.device(hook.execution_device or "cpu").type != "cpu":
        raise InvalidInputError(
            f"{type(module).__name__} is offloaded for execution on {hook.execution_device}: offloaded weights "
            "can be edited in place for CPU execution only (edit a checkpoint on disk with StreamedModel)"
        )
    for name, tensor in list(_parameters_and_buffers(module)):
        if "." in name or name not in hook.weights_map:
            continue
        stored = hook.weights_map[name]
        if not isinstance(stored, torch.Tensor) or stored.device.type != "cpu" or stored.dtype != tensor.dtype:
            raise InvalidInputError(f"offloaded {name} of {type(module).__name__} is not held as a CPU tensor "
                                    "(disk offload?): it cannot be edited in place")
        module_tensor = _get_tensor(module, name)
        requires_grad = isinstance(module_tensor, nn.Parameter) and module_tensor.requires_grad
        _set_tensor(module, name, stored)
        if requires_grad:
            module._parameters[name].requires_grad_(True)
    hook.offload = False
