"""mend_kernels: fast, memory-lean MEND model editing (Mitchell et al., ICLR 2022).

Quick start::

    import mend_kernels as mk
    editor = mk.MENDEditor.for_model(model)                      # identity-initialised editor
    handle = editor.edit(model, prompts=["The Eiffel Tower is in"], targets=["Rome"], tokenizer=tok)
    handle.revert()                                              # restores the weights bit for bit
"""

from . import data, functional, integrations, memory, metrics, ops, streaming, train
from .capture import RowCapture, capture_edit_rows
from .edit import EditHandle, WeightEdit, apply_edits, load_edits, lowrank_edited, save_edits
from .editor import EditorConfig, MENDEditor, ShapeGroupEditor
from .errors import (
    BackendUnavailableError,
    CheckpointError,
    InvalidInputError,
    MendError,
    NonFiniteError,
    StaleEditError,
    TargetError,
)
from .functional import broadcast_edits, capture_rows, temporarily_edited
from .losses import token_nll
from .requests import encode_requests
from .streaming import StreamedMetaTrainer, StreamedModel, load_with_deltas, offloaded_weights_attached
from .targets import PRESETS, EditTarget, resolve_targets, unwrap_model
from .train import MetaTrainer, TrainConfig

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "CheckpointError",
    "EditHandle",
    "EditTarget",
    "EditorConfig",
    "InvalidInputError",
    "MENDEditor",
    "MendError",
    "MetaTrainer",
    "NonFiniteError",
    "PRESETS",
    "RowCapture",
    "ShapeGroupEditor",
    "StaleEditError",
    "StreamedMetaTrainer",
    "StreamedModel",
    "TargetError",
    "TrainConfig",
    "WeightEdit",
    "__version__",
    "apply_edits",
    "broadcast_edits",
    "capture_edit_rows",
    "capture_rows",
    "data",
    "encode_requests",
    "functional",
    "integrations",
    "load_edits",
    "load_with_deltas",
    "lowrank_edited",
    "memory",
    "metrics",
    "offloaded_weights_attached",
    "ops",
    "resolve_targets",
    "save_edits",
    "streaming",
    "temporarily_edited",
    "token_nll",
    "train",
    "unwrap_model",
]
