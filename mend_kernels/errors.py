"""Exceptions raised by mend_kernels.

Every error names the offending argument and what was expected. All of them derive from
:class:`MendError`, so callers can catch the package's errors in one place; each also derives from
the closest built-in exception, so code that catches ``ValueError`` or ``RuntimeError`` keeps working.
"""

from __future__ import annotations


class MendError(Exception):
    """Base class of every error raised by mend_kernels."""


class InvalidInputError(MendError, ValueError):
    """An argument has the wrong shape, dtype, device or value."""


class TargetError(MendError, ValueError):
    """An edited weight is missing from the model or is not a supported layer."""


class NonFiniteError(MendError, FloatingPointError):
    """Captured rows, editor outputs or step sizes contain NaN or infinity."""


class CheckpointError(MendError, ValueError):
    """A checkpoint is corrupt, unsafe to load, or does not match the model."""


class BackendUnavailableError(MendError, RuntimeError):
    """The requested backend is not built, not installed, or cannot run on this device."""


class StaleEditError(MendError, RuntimeError):
    """An edit cannot be reverted because its weights were modified after it was applied."""
