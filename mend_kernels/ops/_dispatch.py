"""One op contract, several implementations: how a backend is chosen for a call.

Every op in :mod:`mend_kernels.ops` is an :class:`Op` with implementations registered per backend:

- ``triton``    Triton kernels (CUDA tensors; CPU tensors when TRITON_INTERPRET=1 is set),
- ``cuda``      compiled CUDA kernels from ``csrc/cuda`` (module ``mend_kernels._C_cuda``),
- ``cpu``       compiled C++ kernels from ``csrc/cpu`` (module ``mend_kernels._C``),
- ``reference`` pure PyTorch, always present, correct on every device: the test oracle.

Selection: the explicit ``backend=`` argument, else the environment variable
``MEND_KERNELS_BACKEND`` (for the ops that implement that backend), else the best backend available
for the tensor's device. An explicit or environment choice that cannot run raises
:class:`BackendUnavailableError` saying why; it never falls back silently, so a benchmark of one
backend measures that backend.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Callable

import torch

from .. import _native
from ..errors import BackendUnavailableError, InvalidInputError

BACKENDS = ("triton", "cuda", "cpu", "reference")
ENV_VAR = "MEND_KERNELS_BACKEND"

# Best first, per device type; "reference" ends every list.
_PREFERENCE = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpu", "reference"),
}


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_status(name: str) -> BackendStatus:
    """Whether a backend can run on this machine at all, and why not."""
    if name == "reference":
        return BackendStatus(name, True, "pure PyTorch, always available")
    if name == "cpu":
        ok, reason = _native.status(_native.CPU_MODULE)
        return BackendStatus(name, ok, "compiled C++ kernels" if ok else reason)
    if name == "cuda":
        ok, reason = _native.status(_native.CUDA_MODULE)
        if not ok:
            return BackendStatus(name, False, reason)
        if not torch.cuda.is_available():
            return BackendStatus(name, False, "compiled, but torch sees no CUDA device")
        return BackendStatus(name, True, "compiled CUDA kernels")
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return BackendStatus(name, False, "triton is not installed (pip install triton)")
        if torch.cuda.is_available():
            return BackendStatus(name, True, "Triton on CUDA")
        if triton_interpreter_enabled():
            return BackendStatus(name, True, "Triton interpreter on CPU (TRITON_INTERPRET=1)")
        return BackendStatus(name, False, "no CUDA device; set TRITON_INTERPRET=1 to interpret on CPU")
    raise InvalidInputError(f"backend must be one of {BACKENDS}, got {name!r}")


def _runs_on(backend: str, device: torch.device) -> bool:
    if backend == "reference":
        return True
    if backend in ("cpu", "cuda"):
        return device.type == backend
    return device.type == "cuda" or (device.type == "cpu" and triton_interpreter_enabled())


class Op:
    """An op contract with one implementation per backend.

    >>> op = Op("scale")
    >>> @op.register("reference")
    ... def _scale_reference(x): return 2 * x
    >>> op.select(torch.device("cpu"), "reference")[0]
    'reference'
    """

    def __init__(self, name: str):
        self.name = name
        self._impls: dict[str, Callable] = {}

    def register(self, backend: str) -> Callable[[Callable], Callable]:
        if backend not in BACKENDS:
            raise InvalidInputError(f"backend must be one of {BACKENDS}, got {backend!r}")

        def decorator(fn: Callable) -> Callable:
            self._impls[backend] = fn
            return fn

        return decorator

    @property
    def backends(self) -> tuple[str, ...]:
        """The backends this op implements, best first."""
        return tuple(b for b in BACKENDS if b in self._impls)

    def impl(self, backend: str) -> Callable:
        if backend not in self._impls:
            raise InvalidInputError(f"op {self.name} has no {backend!r} implementation (it has {self.backends})")
        return self._impls[backend]

    def select(self, device: torch.device, backend: str | None = None) -> tuple[str, Callable]:
        """(name, implementation) for a call on ``device``; see the module docstring for the rules."""
        name = _choose(self, device.type, backend)
        return name, self._impls[name]

    def choose(self, device: torch.device, backend: str | None = None) -> str:
        if backend:
            self._check_requested(backend, device, "backend=")
            return backend
        requested = os.environ.get(ENV_VAR)
        # The environment sets a preference for every op; ops without that backend keep their default.
        if requested and (requested not in BACKENDS or requested in self._impls):
            self._check_requested(requested, device, f"{ENV_VAR}=")
            return requested
        for candidate in _PREFERENCE.get(device.type, ("reference",)):
            if candidate in self._impls and backend_status(candidate).available:
                return candidate
        return "reference"

    def _check_requested(self, requested: str, device: torch.device, source: str) -> None:
        if requested not in BACKENDS:
            raise InvalidInputError(f"{source}{requested!r}: expected one of {BACKENDS}")
        if requested not in self._impls:
            raise BackendUnavailableError(
                f"op {self.name} has no {requested!r} implementation (it has {self.backends})"
            )
        status = backend_status(requested)
        if not status.available:
            raise BackendUnavailableError(f"backend {requested!r} for op {self.name}: {status.reason}")
        if not _runs_on(requested, device):
            raise BackendUnavailableError(
                f"backend {requested!r} for op {self.name} cannot run on {device} tensors"
            )


@torch.compiler.assume_constant_result
def _choose(op: Op, device_type: str, backend: str | None) -> str:
    # Under torch.compile the choice is made once, eagerly, and baked into the graph as a constant:
    # it inspects modules and the environment, which Dynamo does not trace.
    return op.choose(torch.device(device_type), backend)
