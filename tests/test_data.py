"""The synthetic counterfactual world, its tokenizer, and the zsRE / CounterFact loaders."""

from __future__ import annotations

import json

import pytest

import mend_kernels as mk
from mend_kernels.data import RELATIONS, load_counterfact, load_edit_file, load_zsre, make_world, train_word_tokenizer


def test_world_is_deterministic_and_split_by_person():
    world, again = make_world(60, seed=3), make_world(60, seed=3)
    assert world.people == again.people and world.sentences() == again.sentences()
    assert make_world(60, seed=4).people != world.people
    splits = [set(world.splits[name]) for name in ("train", "val", "test")]
    assert sum(map(len, splits)) == 60 and not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])


def test_relations_have_disjoint_train_and_heldout_templates():
    for relation in RELATIONS:
        assert len(relation.templates) >= 4 + 2
        assert len(relation.train_templates) >= 4
        assert not set(relation.train_templates) & set(relation.heldout_templates)
        assert all(template.count("{}") == 1 for template in relation.templates)


@pytest.mark.parametrize("heldout", [False, True])
def test_edit_examples_replace_the_object_and_keep_phrasings_apart(heldout):
    world = make_world(50, seed=1)
    test_people = set(world.splits["test"])
    for example in world.edit_examples("test", 40, heldout=heldout, n_locality=2):
        subject = next(p for p in test_people if p in example.prompt)
        relation = next(r for r in RELATIONS if any(t.format(subject) == example.prompt for t in r.train_templates))
        assert example.target != example.old_target and example.target in relation.objects
        assert world.facts[(subject, relation.name)].object == example.old_target
        templates = relation.heldout_templates if heldout else relation.train_templates
        assert all(any(t.format(subject) == p for t in templates) for p in example.paraphrases)
        assert example.prompt not in example.paraphrases
        assert len(example.locality) == 2
        for prompt, answer in example.locality:
            assert subject not in prompt and answer in relation.objects


def test_corpus_states_every_fact_in_every_phrasing_and_tokenises_to_words():
    world = make_world(10)
    sentences = world.sentences()
    assert len(sentences) == 10 * sum(len(r.templates) for r in RELATIONS)
    tokenizer = train_word_tokenizer(sentences)
    fact = next(iter(world.facts.values()))
    ids = tokenizer(f"{fact.prompt(0)} {fact.object}")["input_ids"]
    assert tokenizer.decode(ids[-1:]) == fact.object and tokenizer.unk_token_id not in ids
    assert tokenizer.pad_token_id == 0


ZSRE = [
    {"subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?", "pred": "Trinity College",
     "rephrase": "What university did Watts Humphrey take part in?", "alt": "University of Michigan",
     "answers": ["Illinois Institute of Technology"], "loc": "nq question: who played desmond doss father in hacksaw ridge",
     "loc_ans": "Hugo Weaving", "cond": "Trinity College >> University of Michigan || What university did Watts Humphrey attend?"},
]
COUNTERFACT = [
    {"case_id": 0, "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
     "target_new": {"str": "English", "id": "Q1860"}, "target_true": {"str": "French", "id": "Q150"},
     "subject": "Danielle Darrieux"}, "paraphrase_prompts": ["Shayna does this. Danielle Darrieux is a native speaker of"],
     "neighborhood_prompts": ["The mother tongue of Léon Blum is", "The native language of Montesquieu is"],
     "attribute_prompts": ["J.R.R. Tolkien is a native speaker of"], "generation_prompts": ["Danielle Darrieux's mother tongue is"]},
]


def test_zsre_and_counterfact_loaders(tmp_path):
    (tmp_path / "zsre.json").write_text(json.dumps(ZSRE))
    (tmp_path / "cf.json").write_text(json.dumps(COUNTERFACT))
    (tmp_path / "cf.jsonl").write_text("\n".join(json.dumps(r) for r in COUNTERFACT))
    [zsre] = load_zsre(tmp_path / "zsre.json")
    assert zsre.prompt == ZSRE[0]["src"] and zsre.target == "University of Michigan"
    assert zsre.paraphrases == (ZSRE[0]["rephrase"],) and zsre.locality == ((ZSRE[0]["loc"], "Hugo Weaving"),)
    assert zsre.old_target == "Illinois Institute of Technology"
    [cf] = load_counterfact(tmp_path / "cf.json")
    assert cf.prompt == "The mother tongue of Danielle Darrieux is" and cf.target == "English" and cf.old_target == "French"
    assert cf.locality == (("The mother tongue of Léon Blum is", "French"), ("The native language of Montesquieu is", "French"))
    assert load_edit_file(tmp_path / "cf.jsonl") == [cf] and load_edit_file(tmp_path / "zsre.json") == [zsre]


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "cannot read"),
        (json.dumps({"src": "a"}), "JSON list"),
        (json.dumps([]), "no edit records"),
        (json.dumps([{"src": "q", "alt": "a", "rephrase": "r", "loc": "l"}]), "loc_ans"),
        (json.dumps([{"requested_rewrite": {"prompt": "{} is", "subject": "X"}}]), "target_true"),
    ],
)
def test_malformed_edit_files_raise_clear_errors(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(mk.InvalidInputError, match=message):
        load_edit_file(path)
