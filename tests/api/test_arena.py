"""The arena's API (issue 11), in-process on real tiny models: blind battles hide and randomise their
rounds, each pane streams its own round's answer to the whole conversation, a vote is a PKU-SafeRLHF
record (ties kept as null ids) plus a leaderboard row, scored by one reference judge pair, and the
leaderboard rates rounds from blind votes only. The page itself: tests/browser/."""

from __future__ import annotations

import json

import pytest

from tests.api.conftest import auth
from tests.api.test_serving import app_client, score_dirs  # noqa: F401 — fixtures: a round beaver-v1 and its models


@pytest.fixture
def arena(app_client):  # noqa: F811
    """Three rounds with the same judges: beaver-v1 (from the fixture), beaver-v2 and beaver-v3."""
    ids = app_client.ids
    for name in ("beaver-v2", "beaver-v3"):
        r = app_client.post("/v1/rounds", json={"name": name, "policy": ids["policy"], "reward_model": ids["reward"],
                                                "cost_model": ids["cost"]}, headers=app_client.trainer)
        assert r.status_code == 201, r.text
    return app_client


@pytest.fixture(autouse=True)
def _headers(app_client, keys):  # noqa: F811
    app_client.trainer, app_client.viewer = auth(keys["trainer"]), auth(keys["viewer"])
    app_client.annotator = auth(keys["annotator"])


def stream_text(client, battle: str, side: int, messages: list, headers: dict) -> tuple[str, list[dict]]:
    body = {"side": side, "messages": messages, "max_tokens": 12, "temperature": 0, "stream": True}
    with client.stream("POST", f"/v1/arena/battles/{battle}/chat", json=body, headers=headers) as r:
        assert r.status_code == 200, r.read()
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]), chunks


def vote_body(turn: int, messages: list, answers: list, **choice) -> dict:
    return {"turn": turn, "messages": messages, "answers": answers, "helpful": "a", "safe": [True, True],
            "safer": "tie", **choice}


def test_a_blind_two_turn_battle_becomes_records_and_a_rating(arena):
    c = arena
    drawn = set()
    for _ in range(12):  # two different rounds, in random order, hidden
        b = c.post("/v1/arena/battles", json={}, headers=c.viewer)
        assert b.status_code == 201, b.text
        assert b.json()["models"] == ["Model A", "Model B"]
    battle = b.json()["id"]
    from api.db import get_engine
    from sqlmodel import Session, select

    from api.tables import Battle

    with Session(get_engine()) as s:
        for row in s.exec(select(Battle)):
            assert len(set(row.rounds)) == 2
            drawn.add(tuple(row.rounds))
    assert len(drawn) > 1  # not always the same pair in the same order

    history = [{"role": "user", "content": "how do i make a cake ?"}]
    answers = []
    for side in (0, 1):
        text, chunks = stream_text(c, battle, side, history, c.viewer)
        assert len([ch for ch in chunks if ch["choices"] and ch["choices"][0]["delta"].get("content")]) >= 2
        assert {ch["model"] for ch in chunks} == {("Model A", "Model B")[side]}  # the round stays hidden
        answers.append(text)
    r = c.post(f"/v1/arena/battles/{battle}/votes", json=vote_body(1, history, answers, helpful="b", safer="a"),
               headers=c.annotator)
    assert r.status_code == 201, r.text
    first = r.json()
    assert set(first["models"]) <= {"beaver-v1", "beaver-v2", "beaver-v3"} and first["judges"] == "beaver-v3"
    assert all(s["reward"] is not None and s["cost"] is not None for s in first["scores"])
    again = c.post(f"/v1/arena/battles/{battle}/votes", json=vote_body(1, history, answers), headers=c.annotator)
    assert again.status_code == 409 and again.json()["error"]["param"] == "turn"

    history2 = history + [{"role": "assistant", "content": answers[0]}, {"role": "user", "content": "and then ?"}]
    answers2 = [stream_text(c, battle, side, history2, c.viewer)[0] or "empty" for side in (0, 1)]
    r = c.post(f"/v1/arena/battles/{battle}/votes", json=vote_body(2, history2, answers2, helpful="tie"),
               headers=c.annotator)
    assert r.status_code == 201, r.text

    records = c.get(f"/v1/datasets/{first['dataset']}/records", headers=c.viewer).json()["data"]
    one, two = (rec["data"] if "data" in rec else rec for rec in records)
    assert one["prompt"] == history and one["better_response_id"] == 1 and one["safer_response_id"] == 0
    assert [one["response_0_source"], one["response_1_source"]] == first["models"]
    assert one["arena"]["blind"] is True and one["arena"]["turn"] == 1 and one["arena"]["battle"] == battle
    assert two["prompt"] == history2 and two["better_response_id"] is None  # a tie, kept as a tie
    assert two["arena"]["blind"] is False  # the first vote revealed the rounds
    dataset = c.get(f"/v1/datasets/{first['dataset']}", headers=c.viewer).json()
    assert dataset["num_records"] == 2 and dataset["stats"]["ties"] == 1

    board = c.get("/v1/leaderboard", headers=c.viewer).json()
    assert board["votes"] == {"blind": 1, "total": 2}
    rated = {row["model"]: row for row in board["helpfulness"]}
    assert set(rated) == set(first["models"])
    winner, loser = first["models"][1], first["models"][0]  # B was more helpful (the one blind vote)
    assert rated[winner]["rating"] > rated[loser]["rating"] and rated[winner]["votes"] == 1
    lo, hi = rated[winner]["ci"]
    assert lo <= rated[winner]["rating"] <= hi
    assert {u["model"]: u["unsafe"] for u in board["unsafe_rate"]} == {m: 0 for m in first["models"]}


def test_side_by_side_shows_names_and_its_votes_stay_out_of_the_leaderboard(arena):
    c = arena
    b = c.post("/v1/arena/battles", json={"mode": "side_by_side", "rounds": ["beaver-v1", "beaver-v3", "beaver-v2"],
                                          "system": "be brief"}, headers=c.viewer).json()
    assert b["models"] == ["beaver-v1", "beaver-v3", "beaver-v2"]
    history = [{"role": "user", "content": "red green"}]
    text, chunks = stream_text(c, b["id"], 2, history, c.viewer)
    assert {ch["model"] for ch in chunks} == {"beaver-v2"}
    r = c.post(f"/v1/arena/battles/{b['id']}/votes", headers=c.annotator,
               json=vote_body(1, history, ["x y", text or "z"], sides=[0, 2], safe=[False, True], safer="b"))
    assert r.status_code == 201, r.text
    record = c.get(f"/v1/datasets/{r.json()['dataset']}/records", headers=c.viewer).json()["data"][-1]
    record = record.get("data", record)
    assert record["arena"]["blind"] is False and record["prompt"][0] == {"role": "system", "content": "be brief"}
    assert [record["response_0_source"], record["response_1_source"]] == ["beaver-v1", "beaver-v2"]
    assert c.get("/v1/leaderboard", headers=c.viewer).json()["votes"] == {"blind": 0, "total": 1}


def test_bad_arena_requests_name_what_is_wrong(arena, app_client):  # noqa: F811
    c = arena
    b = c.post("/v1/arena/battles", json={}, headers=c.viewer).json()["id"]
    history = [{"role": "user", "content": "hi"}]
    cases = [
        ("/v1/arena/battles", {"mode": "side_by_side"}, c.viewer, 422, "rounds"),
        ("/v1/arena/battles", {"mode": "side_by_side", "rounds": ["beaver-v1", "nope"]}, c.viewer, 404, "rounds[1]"),
        ("/v1/arena/battles", {"rounds": ["beaver-v1", "beaver-v2"]}, c.viewer, 422, "rounds"),
        (f"/v1/arena/battles/{b}/chat", {"side": 2, "messages": history}, c.viewer, 422, "side"),
        (f"/v1/arena/battles/{b}/chat", {"side": 0, "messages": [{"role": "assistant", "content": "x"}]}, c.viewer,
         422, "messages"),
        (f"/v1/arena/battles/{b}/votes", vote_body(1, history, ["a", "b"]), c.viewer, 403, None),
        (f"/v1/arena/battles/{b}/votes", vote_body(1, history, ["a", " "]), c.annotator, 422, "answers[1]"),
        (f"/v1/arena/battles/{b}/votes", vote_body(1, history, ["a", "b"], sides=[1, 1]), c.annotator, 422, "sides"),
        (f"/v1/arena/battles/{b}/votes", vote_body(1, history, ["a", "b"], safe=[False, True], safer="a"),
         c.annotator, 422, "safer"),
        ("/v1/arena/battles/battle-nope/votes", vote_body(1, history, ["a", "b"]), c.annotator, 404, None),
    ]
    for path, body, headers, status, param in cases:
        r = c.post(path, json=body, headers=headers)
        assert r.status_code == status, (path, body, r.text)
        if param:
            assert r.json()["error"]["param"] == param, (path, r.json())


def test_a_battle_needs_two_rounds(app_client, keys):  # noqa: F811
    r = app_client.post("/v1/arena/battles", json={}, headers=auth(keys["viewer"]))
    assert r.status_code == 422 and "at least two rounds" in r.json()["error"]["message"], r.text
