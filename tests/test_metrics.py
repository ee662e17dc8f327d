"""Metrics on hand-made cases with known answers, and the FT / FT+KL baselines."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

import mend_kernels as mk
from mend_kernels.data import EditExample, make_world, train_word_tokenizer
from mend_kernels.metrics import FineTuneConfig, Scorer, evaluate, fine_tune_method, mend_method
from mend_kernels.targets import resolve_targets


@pytest.fixture(scope="module")
def setup():
    world = make_world(20, seed=2)
    tokenizer = train_word_tokenizer(world.sentences())
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=32, vocab_size=len(tokenizer))
    model = transformers.GPT2LMHeadModel(config).eval()
    return world, tokenizer, model


def predicted_word(scorer: Scorer, prompt: str) -> str:
    batch = scorer.tokenizer([prompt], return_tensors="pt")
    with torch.no_grad():
        token = scorer.model(**batch).logits[0, -1].argmax().item()
    return scorer.tokenizer.decode([token]).strip()


def examples_with_model_answers(world, scorer, n=4):
    """Edit requests whose 'target' is what the model already predicts: a no-op edit succeeds."""
    out = []
    for example in world.edit_examples("test", n, heldout=True, n_locality=2):
        out.append(
            EditExample(
                prompt=example.prompt,
                target=predicted_word(scorer, example.prompt),
                old_target=example.old_target,
                paraphrases=example.paraphrases[:1],
                locality=tuple((p, predicted_word(scorer, p)) for p, _ in example.locality),
            )
        )
    return out


def state(model):
    return {name: value.clone() for name, value in model.state_dict().items()}


def no_op(model, scorer, example):
    return lambda: None


def test_a_no_op_edit_towards_the_models_own_answer_scores_perfectly(setup):
    world, tokenizer, model = setup
    scorer = Scorer(model, tokenizer, shift_labels=True)
    examples = examples_with_model_answers(world, scorer)
    corpus = world.sentences()[:16]
    mean, per_edit = evaluate(no_op, model, tokenizer, examples, corpus)
    assert len(per_edit) == len(examples)
    assert mean.efficacy == 1.0 and mean.locality == 1.0
    assert mean.locality_kl == pytest.approx(0.0, abs=1e-6) and mean.ppl_drawdown == pytest.approx(0.0, abs=1e-6)


def test_wrong_targets_fail_and_a_destructive_edit_breaks_locality(setup):
    world, tokenizer, model = setup
    scorer = Scorer(model, tokenizer, shift_labels=True)
    examples = examples_with_model_answers(world, scorer, n=2)
    wrong = [EditExample(e.prompt, "<unk>", e.old_target, e.paraphrases, e.locality) for e in examples]
    before = state(model)

    def scramble(model, scorer, example):
        head = model.lm_head.weight
        saved = head.detach().clone()
        with torch.no_grad():
            head.copy_(torch.randn_like(head) * 10)
        return lambda: head.data.copy_(saved)

    mean, _ = evaluate(scramble, model, tokenizer, wrong, world.sentences()[:16])
    assert mean.efficacy == 0.0 and mean.locality < 1.0 and mean.ppl_drawdown > 0.0 and mean.locality_kl > 0.0
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())


def test_perplexity_is_the_exponent_of_the_token_mean_nll(setup):
    world, tokenizer, model = setup
    scorer = Scorer(model, tokenizer, shift_labels=True)
    text = world.sentences()[0]
    batch = tokenizer([text], return_tensors="pt")
    labels = batch["input_ids"]
    with torch.no_grad():
        nll = mk.token_nll(model(**batch).logits, labels, shift_labels=True).item()
    assert scorer.perplexity([text]) == pytest.approx(math.exp(nll), rel=1e-5)


@pytest.mark.parametrize("kl_weight", [0.0, 1.0])
def test_fine_tuning_baselines_make_the_edit_and_undo_restores_the_model(setup, kl_weight):
    world, tokenizer, model = setup
    targets = resolve_targets(model)
    examples = world.edit_examples("test", 3, heldout=True)
    pool = [pair for e in world.edit_examples("train", 10, heldout=False) for pair in e.locality]
    method = fine_tune_method(targets, FineTuneConfig(lr=1e-2, max_steps=50, kl_weight=kl_weight), pool)
    before = state(model)
    flags = [p.requires_grad for p in model.parameters()]
    mean, _ = evaluate(method, model, tokenizer, examples, world.sentences()[:16])
    assert mean.efficacy == 1.0
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == flags and all(p.grad is None for p in model.parameters())


def test_mend_method_edits_and_reverts(setup):
    world, tokenizer, model = setup
    editor = mk.MENDEditor.for_model(model, rank=16)
    warmup = world.edit_examples("train", 2, heldout=False)
    editor.edit(model, prompts=[e.prompt for e in warmup], targets=[e.target for e in warmup], tokenizer=tokenizer).revert()
    before = state(model)
    mean, per_edit = evaluate(mend_method(editor), model, tokenizer, world.edit_examples("test", 2, heldout=True), world.sentences()[:8])
    assert len(per_edit) == 2 and mean.latency_ms > 0
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
