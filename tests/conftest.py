"""Shared fixtures: tiny random-initialised transformers models of each supported architecture."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter here; set before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import transformers  # noqa: E402

transformers.logging.set_verbosity_error()

VOCAB = 97


def _gpt2():
    config = transformers.GPT2Config(
        n_layer=4, n_embd=24, n_head=2, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


def _gpt_neo():
    config = transformers.GPTNeoConfig(
        num_layers=4, hidden_size=24, num_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
        attention_types=[[["global", "local"], 2]], window_size=8, bos_token_id=0, eos_token_id=0,
    )
    return transformers.GPTNeoForCausalLM(config)


def _gptj():
    config = transformers.GPTJConfig(
        n_layer=4, n_embd=24, n_head=2, rotary_dim=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPTJForCausalLM(config)


def _llama():
    config = transformers.LlamaConfig(
        num_hidden_layers=4, hidden_size=24, intermediate_size=40, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config)


def _bert():
    config = transformers.BertConfig(
        num_hidden_layers=4, hidden_size=24, intermediate_size=40, num_attention_heads=2, vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    return transformers.BertForMaskedLM(config)


def _bart():
    config = transformers.BartConfig(
        encoder_layers=3, decoder_layers=3, d_model=24, encoder_ffn_dim=40, decoder_ffn_dim=40,
        encoder_attention_heads=2, decoder_attention_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None,
    )
    return transformers.BartForConditionalGeneration(config)


def _t5():
    config = transformers.T5Config(
        num_layers=3, num_decoder_layers=3, d_model=24, d_ff=40, d_kv=12, num_heads=2, vocab_size=VOCAB,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return transformers.T5ForConditionalGeneration(config)


MODEL_FACTORIES = {
    "gpt2": _gpt2, "gpt_neo": _gpt_neo, "gptj": _gptj, "llama": _llama, "bert": _bert, "bart": _bart, "t5": _t5,
}


def make_model(kind: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model of ``kind`` in eval mode (dropout off), deterministic in ``seed``."""
    torch.manual_seed(seed)
    return MODEL_FACTORIES[kind]().eval()


def edit_batch(kind: str, n_requests: int = 2, length: int = 9, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token requests for ``make_model(kind)``: labels on the last 3 tokens (or the decoder side)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (n_requests, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    if kind in ("bart", "t5"):
        labels = torch.randint(3, VOCAB, (n_requests, 4), generator=generator)
    elif kind == "bert":
        labels = torch.full_like(input_ids, -100)
        labels[:, -3:] = input_ids[:, -3:]
    else:
        labels = input_ids.clone()
        labels[:, :-3] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.fixture(params=sorted(MODEL_FACTORIES))
def model_kind(request) -> str:
    return request.param
