"""Evaluation of editing methods: efficacy, generalisation, locality, perplexity drawdown, latency.

Each edit is applied alone to the unedited model and undone afterwards, as in the paper. Field
names follow EasyEdit/ROME: efficacy (reliability) = edit success on the edit prompt,
generalisation = edit success on held-out paraphrases, locality = fraction of the locality
predictions left unchanged. Edit success means every target token is the argmax under teacher forcing.

Methods compared (the paper's baselines): MEND, fine-tuning the same weights (FT) and FT with a KL
locality term (FT+KL).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .data.synthetic import EditExample
from .editor import MENDEditor
from .losses import IGNORE_INDEX, token_nll
from .requests import encode_requests, is_encoder_decoder
from .targets import EditTarget
from .train import all_tokens_correct, answer_positions, locality_kl

Undo = Callable[[], None]


@dataclass
class EditScores:
    """Scores of one edit (or their mean over many)."""

    efficacy: float
    generalization: float
    locality: float
    locality_kl: float
    ppl_drawdown: float  # relative perplexity increase on held-out text: ppl_after / ppl_before - 1
    latency_ms: float


class Scorer:
    """Forward passes shared by every metric, on one model and tokenizer."""

    def __init__(self, model: nn.Module, tokenizer, shift_labels: bool):
        self.model, self.tokenizer, self.shift = model, tokenizer, shift_labels
        self.device = next(model.parameters()).device

    def encode(self, prompts: Sequence[str], targets: Sequence[str]) -> dict[str, torch.Tensor]:
        return encode_requests(
            self.tokenizer, list(prompts), list(targets), encoder_decoder=is_encoder_decoder(self.model), device=self.device
        )

    @torch.no_grad()
    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if is_encoder_decoder(self.model):
            inputs["decoder_input_ids"] = self.model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
        return self.model(**inputs).logits

    def success(self, prompts: Sequence[str], targets: Sequence[str]) -> torch.Tensor:
        batch = self.encode(prompts, targets)
        return all_tokens_correct(self.logits(batch), batch["labels"], self.shift)


    @torch.no_grad()
    def perplexity(self, texts: Sequence[str], batch_size: int = 64) -> float:
        total, count = 0.0, 0
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start : start + batch_size])
            encoded = self.tokenizer(chunk, padding=True, return_tensors="pt").to(self.device)
            labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, IGNORE_INDEX)
            logits = self.model(**encoded).logits
            n = int((labels[:, 1:] != IGNORE_INDEX).sum())
            total += token_nll(logits, labels, shift_labels=True).item() * n
            count += n
        return math.exp(total / count)


def mend_method(editor: MENDEditor) -> Callable:
    """MEND: one in-place edit from the trained editor (eval mode: statistics frozen)."""
    editor.eval()

    def apply(model: nn.Module, scorer: Scorer, example: EditExample) -> Undo:
        handle = editor.edit(model, prompts=[example.prompt], targets=[example.target], tokenizer=scorer.tokenizer)
        return handle.revert

    return apply


@dataclass
class FineTuneConfig:
    """FT / FT+KL baseline: Adam on the edited weights until the edit succeeds or ``max_steps``."""

    lr: float = 1e-3
    max_steps: int = 20
    kl_weight: float = 0.0  # > 0 gives FT+KL
    n_locality: int = 4


def fine_tune_method(targets: Sequence[EditTarget], config: FineTuneConfig, locality_pool: Sequence[tuple[str, str]], seed: int = 0):
    """FT (``kl_weight == 0``) or FT+KL on the same weights MEND edits."""
    rng = random.Random(seed)

    def apply(model: nn.Module, scorer: Scorer, example: EditExample) -> Undo:
        weights = [model.get_parameter(t.name) for t in targets]
        originals = [w.detach().clone() for w in weights]
        flags = [(p, p.requires_grad) for p in model.parameters()]
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        for weight in weights:
            weight.requires_grad_(True)
        batch = scorer.encode([example.prompt], [example.target])
        local = rng.sample(list(locality_pool), min(config.n_locality, len(locality_pool)))
        loc_batch = scorer.encode([p for p, _ in local], [a for _, a in local]) if config.kl_weight else None
        base_loc = scorer.logits(loc_batch) if loc_batch is not None else None
        optimizer = torch.optim.Adam(weights, lr=config.lr)
        try:
            for _ in range(config.max_steps):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                if bool(all_tokens_correct(logits.detach(), batch["labels"], scorer.shift).all()):
                    break
                loss = token_nll(logits, batch["labels"], shift_labels=scorer.shift)
                if loc_batch is not None:
                    edited = model(input_ids=loc_batch["input_ids"], attention_mask=loc_batch["attention_mask"]).logits
                    loss = loss + config.kl_weight * locality_kl(base_loc, edited, answer_positions(loc_batch["labels"], scorer.shift))
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        finally:
            for parameter, flag in flags:
                parameter.requires_grad_(flag)

        def undo() -> None:
            with torch.no_grad():
                for weight, original in zip(weights, originals):
                    weight.copy_(original)

        return undo

    return apply


def evaluate(
    method: Callable,
    model: nn.Module,
    tokenizer,
    examples: Sequence[EditExample],
    corpus: Sequence[str],
    *,
    shift_labels: bool = True,
    progress: bool = False,
    desc: str = "evaluating",
) -> tuple[EditScores, list[EditScores]]:
    """Mean and per-edit scores of ``method`` over ``examples``, each edit alone on the unedited model."""
    from tqdm.auto import tqdm

    scorer = Scorer(model, tokenizer, shift_labels)
    base_ppl = scorer.perplexity(corpus)
    per_edit = []
    for example in tqdm(examples, disable=not progress, desc=desc):
        loc_batch = scorer.encode([p for p, _ in example.locality], [a for _, a in example.locality])
        loc_mask = answer_positions(loc_batch["labels"], scorer.shift)
        base_loc = scorer.logits(loc_batch)
        start = time.perf_counter()
        undo = method(model, scorer, example)
        latency = time.perf_counter() - start
        try:
            edited_loc = scorer.logits(loc_batch)
            unchanged = base_loc.argmax(-1) == edited_loc.argmax(-1)
            per_edit.append(
                EditScores(
                    efficacy=scorer.success([example.prompt], [example.target]).float().mean().item(),
                    generalization=scorer.success(example.paraphrases, [example.target] * len(example.paraphrases))
                    .float()
                    .mean()
                    .item(),
                    locality=(unchanged & loc_mask).sum().item() / loc_mask.sum().item(),
                    locality_kl=locality_kl(base_loc, edited_loc, loc_mask).item(),
                    ppl_drawdown=scorer.perplexity(corpus) / base_ppl - 1.0,
                    latency_ms=1000.0 * latency,
                )
            )
        finally:
            undo()
    return mean_scores(per_edit), per_edit


def mean_scores(scores: Sequence[EditScores]) -> EditScores:
    fields = asdict(scores[0])
    return EditScores(**{name: sum(getattr(s, name) for s in scores) / len(scores) for name in fields})
