"""Pretraining of the demo's small GPT-2-style model on the synthetic world, cached between runs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .data.synthetic import World, make_world
from .data.tokenizer import train_word_tokenizer


@dataclass(frozen=True)
class WorldModelConfig:
    """The synthetic world and the base model trained on it (all of it keys the cache)."""

    n_people: int = 400
    world_seed: int = 0
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    steps: int = 1500
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0

    def cache_key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def cache_root() -> Path:
    """``$MEND_KERNELS_CACHE``, else ``$XDG_CACHE_HOME/mend_kernels``, else ``~/.cache/mend_kernels``."""
    if os.environ.get("MEND_KERNELS_CACHE"):
        return Path(os.environ["MEND_KERNELS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mend_kernels"


def build_model(config: WorldModelConfig, vocab_size: int, pad_id: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(config.seed)
    model_config = GPT2Config(
        n_layer=config.n_layer, n_embd=config.n_embd, n_head=config.n_head, n_positions=32, vocab_size=vocab_size,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=pad_id, eos_token_id=pad_id,
        pad_token_id=pad_id,
    )
    return GPT2LMHeadModel(model_config)


def pretrain(model, tokenizer, sentences: list[str], config: WorldModelConfig, progress: bool = True) -> list[float]:
    """Causal-LM training on ``sentences`` with AdamW and a one-cycle schedule; returns the losses."""
    from tqdm.auto import tqdm

    encoded = tokenizer(sentences, padding=True, return_tensors="pt")
    input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=config.steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(config.seed)
    model.train()
    losses, order, position = [], torch.randperm(len(sentences), generator=generator), 0
    for _ in tqdm(range(config.steps), disable=not progress, desc="pretraining"):
        if position + config.batch_size > len(order):
            order, position = torch.randperm(len(sentences), generator=generator), 0
        batch = order[position : position + config.batch_size]
        position += config.batch_size
        loss = model(input_ids[batch], attention_mask=attention_mask[batch], labels=labels[batch]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return losses


def world_and_model(config: WorldModelConfig = WorldModelConfig(), progress: bool = True) -> tuple[World, object, object]:
    """The world, its tokenizer and the pretrained model: loaded from the cache, or trained and cached.

    The cache entry is written to a temporary directory and renamed into place, so an interrupted
    run never leaves a half-written model behind.
    """
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

    world = make_world(config.n_people, config.world_seed)
    directory = cache_root() / f"world-model-{config.cache_key()}"
    if (directory / "config.json").is_file():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(directory)
        return world, tokenizer, GPT2LMHeadModel.from_pretrained(directory).eval()
    sentences = world.sentences()
    tokenizer = train_word_tokenizer(sentences)
    model = build_model(config, len(tokenizer), tokenizer.pad_token_id)
    pretrain(model, tokenizer, sentences, config, progress)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=".staging-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "world_model.json").write_text(json.dumps(asdict(config)))
        staging.rename(directory)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (directory / "config.json").is_file():  # not a concurrent run that won the rename
            raise
    return world, tokenizer, model
