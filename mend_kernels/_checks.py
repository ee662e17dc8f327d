"""Argument checks shared by the ops and the editor API: each failure names the argument."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from .errors import InvalidInputError, NonFiniteError

WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LAYOUTS = ("linear", "conv1d")  # nn.Linear stores W as (out, in), GPT-2's Conv1D as (in, out)


def check_tensor(
    name: str,
    value: object,
    *,
    ndim: int | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    device: torch.device | None = None,
    shape: Sequence[int | None] | None = None,
    min_rows: int | None = None,
    contiguous: bool = False,
) -> torch.Tensor:
    """Check a tensor argument; ``None`` in ``shape`` accepts any size in that dimension."""
    if not isinstance(value, torch.Tensor):
        raise InvalidInputError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise InvalidInputError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if value.dtype not in dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise InvalidInputError(f"{name} must have dtype {names}, got {value.dtype}")
    if device is not None and value.device != torch.device(device):
        raise InvalidInputError(f"{name} is on {value.device}, expected {device}")
    if shape is not None:
        if len(shape) != value.dim() or any(
            want is not None and want != got for want, got in zip(shape, value.shape)
        ):
            expected = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise InvalidInputError(f"{name} must have shape {expected}, got {tuple(value.shape)}")
    if min_rows is not None and value.shape[0] < min_rows:
        raise InvalidInputError(f"{name} must have at least {min_rows} row(s), got {value.shape[0]}")
    if contiguous and not value.is_contiguous():
        raise InvalidInputError(f"{name} must be contiguous, got strides {value.stride()}")
    return value


def check_finite(name: str, value: torch.Tensor) -> None:
    """Raise NonFiniteError if ``value`` holds NaN or infinity (one host sync)."""
    if value.is_meta or bool(torch.isfinite(value).all()):
        return
    n_nan = int(torch.isnan(value).sum())
    n_inf = value.numel() - n_nan - int(torch.isfinite(value).sum())
    raise NonFiniteError(f"{name} contains {n_nan} NaN and {n_inf} infinite value(s)")


def check_layout(layout: str, name: str = "layout") -> None:
    if layout not in LAYOUTS:
        raise InvalidInputError(f"{name} must be one of {LAYOUTS}, got {layout!r}")


def check_frozen_weight(weight: torch.Tensor, layout: str, like: torch.Tensor, like_name: str) -> tuple[int, int]:
    """(in, out) of a linear layer's weight that must match ``like``'s dtype and device."""
    check_layout(layout)
    check_tensor("weight", weight, ndim=2, device=like.device)
    if weight.dtype != like.dtype:
        raise InvalidInputError(f"weight must have {like_name}'s dtype {like.dtype}, got {weight.dtype}")
    n_in, n_out = weight.shape[::-1] if layout == "linear" else weight.shape
    return n_in, n_out


def check_frozen_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layout: str) -> tuple[int, int]:
    """(in, out) after checking a frozen linear layer's input, weight and bias (the edited layers' ops)."""
    check_tensor("x", x, dtypes=WEIGHT_DTYPES)
    if x.dim() < 1:
        raise InvalidInputError(f"x must have at least 1 dimension (..., in), got shape {tuple(x.shape)}")
    n_in, n_out = check_frozen_weight(weight, layout, x, "x")
    if x.shape[-1] != n_in:
        expected = "(out, in)" if layout == "linear" else "(in, out)"
        raise InvalidInputError(
            f"x must have shape (..., {n_in}) to match weight {tuple(weight.shape)} {expected} "
            f"for layout {layout!r}, got {tuple(x.shape)}"
        )
    if bias is not None:
        check_tensor("bias", bias, device=x.device, shape=(n_out,))
        if bias.dtype != x.dtype:
            raise InvalidInputError(f"bias must have x's dtype {x.dtype}, got {bias.dtype}")
    return n_in, n_out
