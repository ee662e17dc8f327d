"""Edit requests as model inputs: validation of token batches and tokenisation of text requests."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ._checks import check_tensor
from .errors import InvalidInputError
from .losses import IGNORE_INDEX

_INT_DTYPES = (torch.int64, torch.int32)


@dataclass
class EditBatch:
    """Token ids of one or more edit requests; labels are -100 except on the target tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    decoder_input_ids: torch.Tensor | None = None

    def model_inputs(self) -> dict[str, torch.Tensor]:
        inputs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.decoder_input_ids is not None:
            inputs["decoder_input_ids"] = self.decoder_input_ids
        return inputs


def input_device(model: nn.Module) -> torch.device:
    """The device the model's token ids must be on (that of its input embedding)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and hasattr(embeddings, "weight"):
        return embeddings.weight.device
    return next(model.parameters()).device


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def make_batch(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    shift_labels: bool,
) -> EditBatch:
    """Validate a token batch for ``model``; every request must have at least one target token."""
    device = input_device(model)
    check_tensor("input_ids", input_ids, ndim=2, dtypes=_INT_DTYPES, device=device, min_rows=1)
    if input_ids.shape[1] == 0:
        raise InvalidInputError("input_ids has no tokens (shape (batch, 0))")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    check_tensor("attention_mask", attention_mask, device=device, shape=tuple(input_ids.shape))
    encoder_decoder = is_encoder_decoder(model)
    label_shape = (input_ids.shape[0], None) if encoder_decoder else tuple(input_ids.shape)
    check_tensor("labels", labels, ndim=2, dtypes=_INT_DTYPES, device=device, shape=label_shape)
    scored = labels[:, 1:] if shift_labels else labels
    empty_rows = (scored == IGNORE_INDEX).all(dim=1).nonzero().flatten().tolist()
    if empty_rows:
        raise InvalidInputError(
            f"labels of request(s) {empty_rows} have no target token (all -100"
            f"{' after the causal shift' if shift_labels else ''}): nothing to edit towards"
        )
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    for name, ids in (("input_ids", input_ids), ("labels", labels[labels != IGNORE_INDEX])):
        if ids.numel() and (int(ids.min()) < 0 or (vocab is not None and int(ids.max()) >= vocab)):
            raise InvalidInputError(f"{name} holds token ids outside [0, {vocab}) of the model's vocabulary")
    decoder_input_ids = None
    if encoder_decoder:
        if not hasattr(model, "prepare_decoder_input_ids_from_labels"):
            raise InvalidInputError(f"{type(model).__name__} cannot build decoder inputs from labels")
        decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=labels.long())
    return EditBatch(input_ids.long(), attention_mask, labels.long(), decoder_input_ids)


def encode_requests(
    tokenizer,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    encoder_decoder: bool = False,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Tokenise (prompt, target) pairs into ``input_ids``, ``attention_mask`` and ``labels``.

    Decoder-only models see ``prompt + target`` with labels on the target tokens only; a space is put
    between them unless one is already there. Encoder-decoder models read the prompt and are labelled
    with the target. Batches are right-padded; padding is masked and labelled -100.

    Example:
        >>> batch = encode_requests(tok, ["The capital of France is"], ["Rome"])  # doctest: +SKIP
    """
    if isinstance(prompts, str) or isinstance(targets, str):
        raise InvalidInputError("prompts and targets must be lists of strings, not a single string")
    if len(prompts) != len(targets) or not prompts:
        raise InvalidInputError(f"need as many prompts as targets (>= 1), got {len(prompts)} and {len(targets)}")
    for index, target in enumerate(targets):
        if not target.strip():
            raise InvalidInputError(f"target {index} is empty: nothing to edit towards")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise InvalidInputError("the tokenizer has neither a pad nor an eos token to pad with")
    rows = []
    for prompt, target in zip(prompts, targets):
        if encoder_decoder:
            source = tokenizer(prompt)["input_ids"]
            rows.append((source, tokenizer(target)["input_ids"]))
        else:
            joined = target if prompt.endswith(" ") or target.startswith(" ") else " " + target
            prompt_ids = tokenizer(prompt)["input_ids"]
            target_ids = tokenizer(joined, add_special_tokens=False)["input_ids"]
            rows.append((prompt_ids + target_ids, [IGNORE_INDEX] * len(prompt_ids) + target_ids))
    return _pad(rows, pad_id, torch.device(device))


def _pad(rows: list[tuple[list[int], list[int]]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    label_width = max(len(labels) for _, labels in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), label_width), IGNORE_INDEX, dtype=torch.long)
    for index, (ids, row_labels) in enumerate(rows):
        input_ids[index, : len(ids)] = torch.tensor(ids)
        attention_mask[index, : len(ids)] = 1
        labels[index, : len(row_labels)] = torch.tensor(row_labels)
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device), "labels": labels.to(device)}
