"""Loaders for the public edit formats users already have on disk: zsRE (MEND/EasyEdit) and CounterFact."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InvalidInputError
from .synthetic import EditExample


def _records(path: str | Path) -> list[dict]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"cannot read edit records from {path}: {exc}") from exc
    if not isinstance(data, list) or not all(isinstance(record, dict) for record in data):
        raise InvalidInputError(f"{path} must hold a JSON list of objects (one per edit)")
    if not data:
        raise InvalidInputError(f"{path} holds no edit records")
    return data


def _field(record: dict, index: int, *keys: str):
    value = record
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            raise InvalidInputError(f"edit record {index} has no field {'.'.join(keys)!r}")
        value = value[key]
    return value


def zsre_example(record: dict, index: int = 0) -> EditExample:
    """One zsRE record (keys src, alt, rephrase, loc, loc_ans; answers/pred optional)."""
    answers = record.get("answers") or [record.get("pred", "")]
    return EditExample(
        prompt=_field(record, index, "src"),
        target=_field(record, index, "alt"),
        old_target=answers[0] if answers else "",
        paraphrases=(_field(record, index, "rephrase"),),
        locality=((_field(record, index, "loc"), _field(record, index, "loc_ans")),),
    )


def counterfact_example(record: dict, index: int = 0) -> EditExample:
    """One CounterFact record: requested_rewrite, paraphrase_prompts, neighborhood_prompts.

    Neighbourhood prompts are about other subjects that share the true object, so their expected
    answer is ``target_true``.
    """
    subject = _field(record, index, "requested_rewrite", "subject")
    true_object = _field(record, index, "requested_rewrite", "target_true", "str")
    return EditExample(
        prompt=_field(record, index, "requested_rewrite", "prompt").format(subject),
        target=_field(record, index, "requested_rewrite", "target_new", "str"),
        old_target=true_object,
        paraphrases=tuple(_field(record, index, "paraphrase_prompts")),
        locality=tuple((prompt, true_object) for prompt in _field(record, index, "neighborhood_prompts")),
    )


def load_zsre(path: str | Path) -> list[EditExample]:
    return [zsre_example(record, index) for index, record in enumerate(_records(path))]


def load_counterfact(path: str | Path) -> list[EditExample]:
    return [counterfact_example(record, index) for index, record in enumerate(_records(path))]


def load_edit_file(path: str | Path) -> list[EditExample]:
    """zsRE or CounterFact records, recognised by their keys."""
    records = _records(path)
    parse = counterfact_example if "requested_rewrite" in records[0] else zsre_example
    return [parse(record, index) for index, record in enumerate(records)]
