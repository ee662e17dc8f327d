"""Loads the compiled extension modules if they were built.

A missing build never fails at import time: :func:`load` raises
:class:`~mend_kernels.errors.BackendUnavailableError` when a kernel is actually called, and
:func:`status` explains why a module is absent (shown by ``mend-kernels info``).
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

from .errors import BackendUnavailableError

CPU_MODULE = "mend_kernels._C"
CUDA_MODULE = "mend_kernels._C_cuda"

_HINT = (
    "reinstall with the native build enabled: "
    "MEND_KERNELS_BUILD_NATIVE=1 pip install --no-build-isolation -e ."
)


@functools.cache
def _try_import(module_name: str) -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module(module_name), "built"
    except ImportError as exc:
        return None, f"{module_name} is not built ({exc}); {_HINT}"


def load(module_name: str) -> ModuleType:
    """Return the extension module, or raise BackendUnavailableError saying why it is missing."""
    module, reason = _try_import(module_name)
    if module is None:
        raise BackendUnavailableError(reason)
    return module


def status(module_name: str) -> tuple[bool, str]:
    """(available, reason) for an extension module, without raising."""
    module, reason = _try_import(module_name)
    return module is not None, reason
