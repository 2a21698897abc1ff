"""Arena votes in the training data (issue 11): a tie is a null id, valid in a preference record,
left out by the trainer whose preference it is; and a dataset's summary grows vote by vote from the
old summary alone, equal to the summary of all records."""

from __future__ import annotations

import random

import pytest

from models.preference import preference_pairs
from models.records import validate_records
from models.stats import add_to_summary, summary


def record(better, safer, safe0=True, safe1=True, **extra) -> dict:
    return {"prompt": "q", "response_0": "a", "response_1": "b", "is_response_0_safe": safe0,
            "is_response_1_safe": safe1, "better_response_id": better, "safer_response_id": safer, **extra}


def test_a_null_id_is_a_tie_each_trainer_leaves_out():
    records = [record(None, 0), record(1, None), record(0, 1)]
    assert validate_records("preference", records) == []
    assert [(p.better, p.worse) for p in preference_pairs(records, "reward")] == [("b", "a"), ("a", "b")]
    assert [(p.better, p.worse) for p in preference_pairs(records, "cost")] == [("a", "b"), ("b", "a")]
    bad = validate_records("preference", [record(True, 0), record(2, 0), record(0, 0, safe0=False, safe1=True)])
    assert [(e.line, e.field) for e in bad] == [(1, "better_response_id"), (2, "better_response_id"),
                                                (3, "safer_response_id")]


@pytest.mark.parametrize("seed", [0, 1])
def test_a_summary_grown_record_by_record_equals_the_summary_of_all(seed):
    rng = random.Random(seed)
    records = []
    for _ in range(300):
        safe0, safe1 = rng.random() < 0.5, rng.random() < 0.5
        safer = rng.choice([0, 1, None])
        if safer is not None and not (safe0, safe1)[safer] and (safe0, safe1)[1 - safer]:
            safer = None
        records.append(record(rng.choice([0, 1, None]), safer, safe0, safe1,
                              response_0_harm_category={"violence": rng.random() < 0.3, "privacy": rng.random() < 0.1}))
    grown = summary("preference", [])
    for r in records:
        grown = add_to_summary("preference", grown, [r])
    assert grown == summary("preference", records)
