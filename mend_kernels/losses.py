"""Losses of MEND: the edit loss (token-mean NLL of the target tokens)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_nll(logits: torch.Tensor, labels: torch.Tensor, *, shift_labels: bool) -> torch.Tensor:
    """Mean negative log-likelihood over the label tokens (labels == -100 are ignored).

    With ``shift_labels`` (causal LMs) the logits at position t predict the label at t + 1.
    Computed in float32 whatever the logits' dtype.
    """
    if shift_labels:
        logits, labels = logits[:, :-1], labels[:, 1:]
    n_tokens = (labels != IGNORE_INDEX).sum()
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total / n_tokens
