"""A seeded world of fictional people and their facts: the package's own counterfactual-edit task.

Every person (a made-up single-word name) has one object per relation (city, job, language,
instrument, colour). Each relation has six prompt templates: four are used in meta-training and two
are held out, so generalisation is measured on phrasings the editor never saw (the base model saw
them all in pretraining, as a real model has seen many phrasings of a fact). Edit requests replace
a person's object with another one; locality examples are facts about other people. People are
split into train / validation / test, so held-out edits are about people the editor never edited.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

SYLLABLES = (
    "ka", "lo", "mi", "ren", "tas", "vo", "dri", "sel", "mon", "pha", "quo", "zen", "bri", "tul", "fa", "gor",
    "xi", "nel", "da", "rum", "po", "shi", "vek", "ul", "bar", "te", "ol", "wyn", "cor", "ith",
)


@dataclass(frozen=True)
class Relation:
    name: str
    objects: tuple[str, ...]
    templates: tuple[str, ...]  # "{}" is the subject; the object follows the prompt
    n_train_templates: int = 4

    @property
    def train_templates(self) -> tuple[str, ...]:
        return self.templates[: self.n_train_templates]

    @property
    def heldout_templates(self) -> tuple[str, ...]:
        return self.templates[self.n_train_templates :]


RELATIONS = (
    Relation(
        "city",
        ("Ostrava", "Belmora", "Quillon", "Tarsk", "Vellin", "Marrow", "Dunhaven", "Koresh", "Palisa", "Yorrin"),
        ("{} lives in", "{} resides in", "The home of {} is in", "{} has a house in",
         "{} is a resident of", "The town where {} lives is"),
    ),
    Relation(
        "job",
        ("baker", "pilot", "painter", "doctor", "farmer", "lawyer", "sailor", "teacher", "miner", "tailor"),
        ("{} works as a", "By profession {} is a", "The job of {} is", "{} earns a living as a",
         "{} is employed as a", "Everyone knows {} is a"),
    ),
    Relation(
        "language",
        ("Vashti", "Orinese", "Talmic", "Kesh", "Lumran", "Dravic", "Sorean", "Embric", "Quelan", "Mirth"),
        ("{} speaks", "The mother tongue of {} is", "{} grew up speaking", "The language of {} is",
         "{} talks in", "At home {} speaks"),
    ),
    Relation(
        "instrument",
        ("violin", "drum", "flute", "harp", "piano", "trumpet", "cello", "lute", "oboe", "guitar"),
        ("{} plays the", "The instrument of {} is the", "{} performs on the", "{} practises the",
         "On stage {} plays the", "{} is skilled at the"),
    ),
    Relation(
        "colour",
        ("red", "blue", "green", "amber", "violet", "grey", "white", "black", "teal", "gold"),
        ("The favourite colour of {} is", "{} likes the colour", "{} prefers the colour", "{} always wears",
         "The colour {} loves is", "{} paints everything"),
    ),
)


@dataclass(frozen=True)
class Fact:
    subject: str
    relation: Relation
    object: str

    def prompt(self, template_index: int) -> str:
        return self.relation.templates[template_index].format(self.subject)


@dataclass(frozen=True)
class EditExample:
    """One edit request with its equivalence (paraphrase) and locality examples."""

    prompt: str
    target: str
    old_target: str
    paraphrases: tuple[str, ...]
    locality: tuple[tuple[str, str], ...]  # (prompt, the base model's answer in the world)


@dataclass
class World:
    """People, their facts, and the splits of the counterfactual-edit task."""

    people: list[str]
    facts: dict[tuple[str, str], Fact]
    splits: dict[str, list[str]] = field(default_factory=dict)
    relations: tuple[Relation, ...] = RELATIONS

    def sentences(self) -> list[str]:
        """The pretraining corpus: every fact in every phrasing, as '<prompt> <object> .'."""
        return [
            f"{fact.prompt(t)} {fact.object} ." for fact in self.facts.values() for t in range(len(fact.relation.templates))
        ]

    def edit_examples(self, split: str, n: int, *, heldout: bool, n_locality: int = 1, seed: int = 0) -> list[EditExample]:
        """``n`` edit requests about people of ``split``; ``heldout`` picks the held-out paraphrases.

        The edit prompt always uses a training template; paraphrases use the other training
        templates (meta-training) or the held-out ones (evaluation). Locality examples are facts of
        the same relation about people outside the split, in any phrasing: the neighbours an edit
        most easily spills onto (like CounterFact's neighbourhood prompts).
        """
        rng = random.Random(f"{seed}-{split}-{heldout}")
        people = self.splits[split]
        others = [p for p in self.people if p not in set(people)] or people
        examples = []
        for _ in range(n):
            subject = rng.choice(people)
            relation = rng.choice(self.relations)
            fact = self.facts[(subject, relation.name)]
            target = rng.choice([o for o in relation.objects if o != fact.object])
            edit_template = rng.randrange(relation.n_train_templates)
            pool = (
                range(relation.n_train_templates, len(relation.templates))
                if heldout
                else [t for t in range(relation.n_train_templates) if t != edit_template]
            )
            locality = []
            for _ in range(n_locality):  # same relation, other person: the facts an edit most easily spills onto
                other = self.facts[(rng.choice(others), relation.name)]
                locality.append((other.prompt(rng.randrange(len(relation.templates))), other.object))
            examples.append(
                EditExample(
                    prompt=fact.prompt(edit_template),
                    target=target,
                    old_target=fact.object,
                    paraphrases=tuple(fact.prompt(t) for t in pool),
                    locality=tuple(locality),
                )
            )
        return examples


def _name(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize()


def make_world(n_people: int = 400, seed: int = 0, split_fractions: tuple[float, float] = (0.6, 0.2)) -> World:
    """A deterministic world of ``n_people`` people; splits 'train', 'val', 'test' by person."""
    if n_people < 5:
        raise ValueError(f"n_people must be at least 5, got {n_people}")
    rng = random.Random(seed)
    names: set[str] = set()
    reserved = {o.lower() for r in RELATIONS for o in r.objects}
    while len(names) < n_people:
        name = _name(rng)
        if name.lower() not in reserved:
            names.add(name)
    people = sorted(names)
    rng.shuffle(people)
    facts = {(p, r.name): Fact(p, r, rng.choice(r.objects)) for p in people for r in RELATIONS}
    n_train = int(split_fractions[0] * n_people)
    n_val = int(split_fractions[1] * n_people)
    splits = {"train": people[:n_train], "val": people[n_train : n_train + n_val], "test": people[n_train + n_val :]}
    return World(people, facts, splits)
