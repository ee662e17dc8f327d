"""Predicted peak memory of an edit and of a meta-training step, for any transformers causal LM config.

The model is built from its config on the meta device (no memory), so parameter counts, the edited
weights (the preset's) and the block sizes are exact; activations follow a per-token model of a
transformer block. Four approaches are estimated:

- ``mend_kernels edit``: weights + activations of the edited blocks only (the row capture builds no
  graph below them and forms no weight gradient) + captured and edited rows + the LM head's logits;
  the update is a rank-k update in place (no W-sized tensor).
- ``mend_kernels streamed edit``: the same with only the resident modules in memory (edited
  blocks, embeddings, final norm, LM head) plus one streamed block (:mod:`mend_kernels.streaming`).
- ``reference edit`` (the reference code's pattern, benchmarks/naive.py): every weight requires grad,
  so the backward runs through all blocks and forms a gradient of the size of the model, and each
  edited weight gets a dense pseudo-gradient and a new dense weight.
- the meta-training step of each: editor, its gradients and Adam's two moments in fp32; the package
  keeps the edit as a low-rank side path (streamed: :class:`~mend_kernels.streaming.StreamedMetaTrainer`),
  the reference keeps the dense edited weights for backward.

Validated against measured tensor-allocator peaks at small sizes (tests/test_memory_estimator.py).

Example:
    >>> from transformers import GPT2Config
    >>> estimates = estimate(GPT2Config(), dtype=torch.float32, tokens=24)   # doctest: +SKIP
    >>> print(format_estimates(estimates))                                   # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import InvalidInputError
from .streaming import _lowest_edited_block
from .targets import EditTarget, resolve_targets

# Bytes saved for backward per token of one block, in units of the element size: ~10 hidden-sized
# tensors (norms, q, k, v, attention output, residuals) and 4 intermediate-sized ones (MLP input
# projections, activation, product).
HIDDEN_TENSORS_PER_BLOCK = 10
INTERMEDIATE_TENSORS_PER_BLOCK = 4
# fp32 (tokens, in + out) rows kept per edited weight: the captured (u, delta) and the editor's
# output (u~, delta~); the editor's intermediates are transient, one weight at a time.
ROW_COPIES = 2


@dataclass(frozen=True)
class ModelFacts:
    """What the estimate needs of a model, read off its meta-device instance."""

    parameter_bytes: int
    element_size: int
    n_blocks: int
    block_bytes: int  # the largest block
    hidden: int
    heads: int
    vocab: int
    targets: tuple[EditTarget, ...]
    n_edited_blocks: int
    resident_bytes: int  # what a streamed edit keeps in memory: all but the blocks below the edited ones

    @property
    def intermediate(self) -> int:
        return max(max(t.n_in, t.n_out) for t in self.targets)


@dataclass
class Estimate:
    """A predicted peak in bytes and what it is made of."""

    approach: str
    total_bytes: int = 0
    parts: dict[str, int] = field(default_factory=dict)

    def add(self, part: str, nbytes: float) -> Estimate:
        self.parts[part] = self.parts.get(part, 0) + int(nbytes)
        self.total_bytes += int(nbytes)
        return self


def load_config(path_or_json: str | Path):
    """A transformers config from a checkpoint directory, a config.json file or a JSON string."""
    from transformers import AutoConfig

    path = Path(path_or_json)
    try:
        if path.is_dir():
            return AutoConfig.from_pretrained(path)
        data = json.loads(path.read_text() if path.is_file() else str(path_or_json))
        model_type = data.pop("model_type")
        return AutoConfig.for_model(model_type, **data)
    except (OSError, ValueError, KeyError) as exc:
        if isinstance(exc, json.JSONDecodeError) or not path.exists():
            raise InvalidInputError(f"--config must be a checkpoint directory, a config.json or a JSON string "
                                    f"with a model_type; got {str(path_or_json)[:80]!r}: {exc}") from exc
        raise InvalidInputError(f"cannot read the config {path}: {exc}") from exc


def model_facts(config, dtype: torch.dtype, inner_params=None) -> ModelFacts:
    """Sizes of the model of ``config`` in ``dtype`` and its edited weights (the preset's by default)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    targets = resolve_targets(model, inner_params)
    blocks_name, lowest = _lowest_edited_block(model, targets)
    blocks = model.get_submodule(blocks_name)
    element = torch.empty((), dtype=dtype).element_size()
    parameter_bytes = _bytes(model)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    edited_blocks = {int(t.name.split(blocks_name + ".")[1].split(".")[0]) for t in targets}
    return ModelFacts(
        parameter_bytes=parameter_bytes,
        element_size=element,
        n_blocks=len(blocks),
        block_bytes=max(_bytes(block) for block in blocks),
        hidden=text.hidden_size,
        heads=text.num_attention_heads,
        vocab=text.vocab_size,
        targets=tuple(targets),
        n_edited_blocks=len(edited_blocks),
        resident_bytes=parameter_bytes - sum(_bytes(blocks[index]) for index in range(lowest)),
    )


def _bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def editor_parameter_count(targets, rank: int = 1920, n_hidden: int = 1) -> int:
    """Parameters of a shared MEND editor (one per weight shape; SPEC section 3)."""
    groups: dict[str, list[EditTarget]] = {}
    for target in targets:
        groups.setdefault(target.shape_key, []).append(target)
    total = len(targets)  # step sizes
    for members in groups.values():
        dim = members[0].n_in + members[0].n_out
        r = min(rank, dim)
        total += (n_hidden + 1) * (2 * r * dim + dim + 2 * len(members) * dim)
    return total


def _block_activations(facts: ModelFacts, tokens: int, sequence: int) -> int:
    per_token = HIDDEN_TENSORS_PER_BLOCK * facts.hidden + INTERMEDIATE_TENSORS_PER_BLOCK * facts.intermediate
    return tokens * (per_token + facts.heads * sequence) * facts.element_size


def _rows(facts: ModelFacts, tokens: int) -> int:
    return sum(ROW_COPIES * tokens * (t.n_in + t.n_out) * 4 for t in facts.targets)


def _logits(facts: ModelFacts, tokens: int) -> int:
    return tokens * facts.vocab * (facts.element_size + 2 * 4)  # logits, their fp32 copy, its gradient


def _dense_updates(facts: ModelFacts) -> tuple[int, int]:
    """(bytes of the new dense weights kept, largest fp32 pseudo-gradient) of the reference code."""
    sizes = [t.n_in * t.n_out for t in facts.targets]
    return sum(sizes) * facts.element_size, max(sizes) * 4


def estimate_edit(facts: ModelFacts, *, tokens: int, edits: int = 1, rank: int = 1920) -> list[Estimate]:
    """Peak of one edit of ``edits`` requests of ``tokens`` tokens, for the three approaches."""
    n = tokens * edits
    editor = 4 * editor_parameter_count(facts.targets, rank)
    top = (_block_activations(facts, n, tokens) * facts.n_edited_blocks + _rows(facts, n) + _logits(facts, n))
    package = (Estimate("mend_kernels edit").add("weights", facts.parameter_bytes).add("editor", editor)
               .add("activations and rows", top))
    streamed = (Estimate("mend_kernels streamed edit").add("resident weights", facts.resident_bytes)
                .add("one streamed block", facts.block_bytes).add("editor", editor).add("activations and rows", top))
    kept, pseudo_gradient = _dense_updates(facts)
    backward = _block_activations(facts, n, tokens) * facts.n_blocks + _logits(facts, n)
    reference = (Estimate("reference edit").add("weights", facts.parameter_bytes).add("editor", editor)
                 .add("weight gradients", facts.parameter_bytes)
                 .add("activations or dense updates", max(backward, kept + 3 * pseudo_gradient) + _rows(facts, n)))
    return [package, streamed, reference]


def estimate_meta_training_step(facts: ModelFacts, *, tokens: int, edits: int = 1, rank: int = 1920) -> list[Estimate]:
    """Peak of one meta-training step (edit, paraphrase and locality batches of ``edits`` x ``tokens``)."""
    n = tokens * edits
    editor_state = 4 * 4 * editor_parameter_count(facts.targets, rank)  # fp32 parameters, gradients, 2 Adam moments
    upper = _block_activations(facts, n, tokens) * facts.n_edited_blocks
    # capture, then the paraphrase and locality forwards through the side path, kept for backward
    package_top = 3 * upper + 3 * _rows(facts, n) + 4 * _logits(facts, n)
    package = (Estimate("mend_kernels meta-training step").add("weights", facts.parameter_bytes)
               .add("editor and Adam state", editor_state).add("activations and rows", package_top))
    streamed = (Estimate("mend_kernels streamed meta-training step").add("resident weights", facts.resident_bytes)
                .add("one streamed block", facts.block_bytes).add("editor and Adam state", editor_state)
                .add("activations and rows", package_top))
    kept, pseudo_gradient = _dense_updates(facts)
    every_block = _block_activations(facts, n, tokens) * facts.n_blocks
    dense_kept = kept + sum(t.n_in * t.n_out for t in facts.targets) * 4  # W~ and fp32 pseudo-gradient per weight
    reference = (Estimate("reference meta-training step").add("weights", facts.parameter_bytes)
                 .add("editor and Adam state", editor_state).add("weight gradients", facts.parameter_bytes)
                 .add("dense edited weights", dense_kept + 2 * pseudo_gradient)
                 .add("activations and rows", 2 * every_block + 3 * _rows(facts, n) + 4 * _logits(facts, n)))
    return [package, streamed, reference]


def estimate(config, *, dtype: torch.dtype = torch.bfloat16, tokens: int = 24, edits: int = 1,
             rank: int = 1920, inner_params=None) -> list[Estimate]:
    """Every estimate for ``config``: the three edit approaches, then the three meta-training steps."""
    if tokens < 1 or edits < 1:
        raise InvalidInputError(f"tokens and edits must be >= 1, got {tokens} and {edits}")
    facts = model_facts(config, dtype, inner_params)
    return estimate_edit(facts, tokens=tokens, edits=edits, rank=rank) + estimate_meta_training_step(
        facts, tokens=tokens, edits=edits, rank=rank)


def format_estimates(estimates: list[Estimate]) -> str:
    """A table: approach, total GiB, and its parts."""
    lines = [f"{'approach':<34} {'peak GiB':>9}  parts (GiB)"]
    for item in estimates:
        parts = ", ".join(f"{name} {value / 2**30:.2f}" for name, value in item.parts.items())
        lines.append(f"{item.approach:<34} {item.total_bytes / 2**30:>9.2f}  {parts}")
    return "\n".join(lines)
