"""A word-level tokenizer trained on the package's own corpus (no download)."""

from __future__ import annotations

from collections.abc import Iterable

PAD, UNK, EOS = "<pad>", "<unk>", "<eos>"


def train_word_tokenizer(corpus: Iterable[str]):
    """A transformers fast tokenizer with one token per word or punctuation mark in ``corpus``.

    Every word of the synthetic world is then a single token, so an edit target is one token and
    edit success is exact-match on it. Padding is right-sided; the pad id is 0.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    trainer = trainers.WordLevelTrainer(special_tokens=[PAD, UNK, EOS], min_frequency=1)
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD, unk_token=UNK, eos_token=EOS, padding_side="right"
    )
