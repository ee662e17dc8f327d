"""editor_mlp: MEND's editor network on captured rows (normalisation + low-rank residual layers).

Contract, for rows x = concat(u, delta) (n, D) of one edited weight and L stacked layers:

    z = (x - mean) / (std + eps)                                   # running statistics, (D,)
    for j in range(L):
        a = (z @ down_proj[j].T) @ up_proj[j].T + bias[j]          # rank-r residual branch
        z = z + clamp(a * scale[j] + shift[j], min=0)
    return z                                                       # concat(u~, delta~)

``scale``/``shift`` (L, D) are the rows of the edited weight's mode (layer-specific scale and shift).
clamp(min=0) rather than relu: its gradient at exactly 0 is 1, as in the reference code, which
matters at the identity initialisation where every pre-activation is 0. Differentiable in all inputs.
"""

from __future__ import annotations

import torch

from ._dispatch import Op

EDITOR_MLP = Op("editor_mlp")


def editor_mlp(
    rows: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    down_proj: torch.Tensor,
    up_proj: torch.Tensor,
    bias: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    eps: float = 1e-7,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Map captured rows concat(u, delta) to concat(u~, delta~); see the module docstring.

    Shapes: rows (n, D), mean/std (D,), down_proj (L, r, D), up_proj (L, D, r),
    bias/scale/shift (L, D); all float32.
    """
    _, impl = EDITOR_MLP.select(rows.device, backend)
    return impl(rows, mean, std, down_proj, up_proj, bias, scale, shift, eps)


@EDITOR_MLP.register("reference")
def _editor_mlp_reference(rows, mean, std, down_proj, up_proj, bias, scale, shift, eps):
    z = (rows - mean) / (std + eps)
    for layer in range(down_proj.shape[0]):
        pre_activation = torch.addmm(bias[layer], z @ down_proj[layer].t(), up_proj[layer].t())
        z = z + (pre_activation * scale[layer] + shift[layer]).clamp(min=0)
    return z
