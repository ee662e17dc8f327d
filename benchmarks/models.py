"""The models and edit requests the end-to-end benchmarks run on: random-initialised, built locally.

GPT-2 at its four published sizes and a Llama-architecture model of similar sizes (head size 64,
SwiGLU width ~8/3 of the hidden size, no grouped-query attention). Weights are random: the
benchmarks measure time and memory, which do not depend on what the weights know.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

# (hidden size, layers, heads) of GPT-2 small, medium, large and XL.
SIZES = {"small": (768, 12, 12), "medium": (1024, 24, 16), "large": (1280, 36, 20), "xl": (1600, 48, 25)}
FAMILIES = ("gpt2", "llama")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ModelSpec:
    family: str
    size: str

    @property
    def name(self) -> str:
        return f"{self.family}-{self.size}"


def parse_spec(name: str) -> ModelSpec:
    family, _, size = name.partition("-")
    if family not in FAMILIES or size not in SIZES:
        raise ValueError(f"model must be <family>-<size> with family in {FAMILIES} and size in {tuple(SIZES)}, got {name!r}")
    return ModelSpec(family, size)


def build_model(spec: ModelSpec, dtype: torch.dtype) -> torch.nn.Module:
    """The random-initialised model in ``dtype``, in eval mode (seeded: the same weights every time)."""
    hidden, layers, heads = SIZES[spec.size]
    torch.manual_seed(0)
    if spec.family == "gpt2":
        config = GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, vocab_size=50257, n_positions=1024)
        model = GPT2LMHeadModel(config)
    else:
        intermediate = 256 * round(8 * hidden / 3 / 256)
        config = LlamaConfig(
            hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
            intermediate_size=intermediate, vocab_size=32000, max_position_embeddings=1024,
        )
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def edit_requests(n_edits: int, n_tokens: int, vocab_size: int, *, target_tokens: int = 4, seed: int = 0):
    """(input_ids, attention_mask, labels) of ``n_edits`` requests of ``n_tokens`` tokens each.

    The last ``target_tokens`` tokens of each request are its target (labels = -100 elsewhere), as
    in a prompt followed by the new answer.
    """
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (n_edits, n_tokens), generator=generator)
    labels = torch.full_like(input_ids, -100)
    labels[:, -target_tokens:] = input_ids[:, -target_tokens:]
    return input_ids, torch.ones_like(input_ids), labels
