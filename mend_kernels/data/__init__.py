"""Edit-request data: the package's synthetic counterfactual world, its tokenizer, and file loaders."""

from .formats import counterfact_example, load_counterfact, load_edit_file, load_zsre, zsre_example
from .synthetic import RELATIONS, EditExample, Fact, Relation, World, make_world
from .tokenizer import train_word_tokenizer

__all__ = [
    "RELATIONS",
    "EditExample",
    "Fact",
    "Relation",
    "World",
    "counterfact_example",
    "load_counterfact",
    "load_edit_file",
    "load_zsre",
    "make_world",
    "train_word_tokenizer",
    "zsre_example",
]
