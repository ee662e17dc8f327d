"""The fused ops of mend_kernels, one file each, dispatched per backend (see ``_dispatch``).

Public functional entry points:

- :func:`rank_update_`     in-place ``W += s * alpha * delta~^T u~`` for Linear and Conv1D layouts
- :func:`rank_updates_`    the same on several weights of any shapes, dtypes and layouts in one call
- :func:`running_moments_` vectorised merge of the editor's normalisation statistics
- :func:`editor_mlp`       the editor network on captured rows
"""

from ._dispatch import BACKENDS, ENV_VAR, BackendStatus, Op, backend_status
from .capture_linear import CAPTURE_LINEAR, capture_linear
from .editor_mlp import EDITOR_MLP, editor_mlp
from .lowrank_linear import LOWRANK_LINEAR, lowrank_linear
from .rank_update import RANK_UPDATE, RANK_UPDATES, rank_update_, rank_updates_
from .running_moments import RUNNING_MOMENTS, running_moments_

ALL_OPS = (RANK_UPDATE, RANK_UPDATES, RUNNING_MOMENTS, EDITOR_MLP, LOWRANK_LINEAR, CAPTURE_LINEAR)

__all__ = [
    "ALL_OPS",
    "BACKENDS",
    "ENV_VAR",
    "BackendStatus",
    "Op",
    "backend_status",
    "capture_linear",
    "editor_mlp",
    "lowrank_linear",
    "rank_update_",
    "rank_updates_",
    "running_moments_",
]
