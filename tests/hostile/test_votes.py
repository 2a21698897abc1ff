"""Issue 18, hostile: every arena vote is of answers the server produced, and the leaderboard means what
it says. One test per finding; each failed on the code before the fix (347aae8).

The attacker speaks whichever request shape the server takes: the arena's old one (the pane's whole
conversation in ``messages``, the vote's ``answers``) first and, where that is refused as no longer
accepted, the new one (``turn`` and ``message``). So each test asks "can a client do this at all",
not "does this one request fail"."""

from __future__ import annotations

import json

import pytest

from tests.api.conftest import auth, beaver_env, keys  # noqa: F401 — fixtures: a fresh platform, a key per role
from tests.api.test_serving import app_client, score_dirs  # noqa: F401 — fixtures: a round beaver-v1 and its models

FABRICATED = ["FABRICATED answer the round never wrote", "another FABRICATED answer"]
QUESTION = "how do i make a cake ?"


@pytest.fixture
def arena(app_client, keys):  # noqa: F811
    """Rounds beaver-v1 and beaver-v2, and a second annotator (a key of another person)."""
    from sqlmodel import Session

    from api.db import get_engine
    from api.deps import create_key

    ids = app_client.ids
    r = app_client.post("/v1/rounds", json={"name": "beaver-v2", "policy": ids["policy"], "reward_model": ids["reward"],
                                            "cost_model": ids["cost"]}, headers=auth(keys["trainer"]))
    assert r.status_code == 201, r.text
    with Session(get_engine()) as session:
        app_client.mallory = auth(create_key(session, "mallory", "annotator")[1])
    app_client.alice = auth(keys["annotator"])
    return app_client


def no_longer_taken(r) -> bool:
    """The server refused a field of the old shape as no longer accepted (422 naming it)."""
    return r.status_code == 422 and r.json()["error"].get("param") in ("messages", "answers")


def chat(c, battle: str, side: int, headers: dict, turn: int = 1, message: str = QUESTION):
    old = {"side": side, "messages": [{"role": "user", "content": message}], "max_tokens": 8, "temperature": 0}
    r = c.post(f"/v1/arena/battles/{battle}/chat", json=old, headers=headers)
    if no_longer_taken(r):
        r = c.post(f"/v1/arena/battles/{battle}/chat", headers=headers,
                   json={"side": side, "turn": turn, "message": message, "max_tokens": 8, "temperature": 0})
    return r


def vote(c, battle: str, headers: dict, turn: int = 1, sides=(0, 1), answers=FABRICATED):
    choice = {"turn": turn, "sides": list(sides), "helpful": "a", "safe": [True, True], "safer": "tie"}
    old = {**choice, "messages": [{"role": "user", "content": QUESTION}], "answers": list(answers)}
    r = c.post(f"/v1/arena/battles/{battle}/votes", json=old, headers=headers)
    if no_longer_taken(r):
        r = c.post(f"/v1/arena/battles/{battle}/votes", json=choice, headers=headers)
    return r


def battle_of(c, headers: dict, answered: bool = True) -> str:
    r = c.post("/v1/arena/battles", json={}, headers=headers)
    assert r.status_code == 201, r.text
    battle = r.json()["id"]
    if answered:
        for side in (0, 1):
            assert chat(c, battle, side, headers).status_code == 200
    return battle


def stored_votes(c) -> list[dict]:
    datasets = [d for d in c.get("/v1/datasets?limit=1000", headers=c.alice).json()["data"] if d["name"] == "arena-votes"]
    if not datasets:
        return []
    return [r["data"] for r in c.get(f"/v1/datasets/{datasets[0]['id']}/records?limit=1000",
                                     headers=c.alice).json()["data"]]


def test_a_vote_with_fabricated_answers_does_not_store_them(arena):
    c = arena
    battle = battle_of(c, c.alice)
    r = vote(c, battle, c.alice)
    stored = stored_votes(c)
    assert not any(FABRICATED[0] in json.dumps(v) or FABRICATED[1] in json.dumps(v) for v in stored), stored
    if r.status_code == 201:  # the vote counts, on the answers the panes were sent
        sent = [a["content"] for a in c.get(f"/v1/arena/battles/{battle}", headers=c.alice).json()["turns"][0]["answers"]]
        assert [stored[-1]["response_0"], stored[-1]["response_1"]] == sent


def test_a_vote_on_an_unanswered_turn_is_refused(arena):
    c = arena
    battle = battle_of(c, c.alice, answered=False)
    r = vote(c, battle, c.alice, answers=["an answer nobody was sent", "nor this one"])
    assert r.status_code == 409, r.text
    assert "Model A has not answered turn 1" in r.json()["error"]["message"]
    assert chat(c, battle, 0, c.alice).status_code == 200  # one pane answered: still not a turn to vote on
    r = vote(c, battle, c.alice)
    assert r.status_code == 409 and "Model B" in r.json()["error"]["message"], r.text
    assert stored_votes(c) == []


def test_a_vote_or_chat_on_another_users_battle_is_refused(arena):
    c = arena
    battle = battle_of(c, c.alice)
    r = vote(c, battle, c.mallory)
    assert r.status_code == 404, r.text
    assert chat(c, battle, 0, c.mallory, turn=2, message="and then ?").status_code == 404
    assert c.get(f"/v1/arena/battles/{battle}", headers=c.mallory).status_code == 404
    assert stored_votes(c) == []


def test_swapping_sides_cannot_vote_twice_on_a_turn(arena):
    c = arena
    battle = battle_of(c, c.alice)
    assert vote(c, battle, c.alice, sides=(0, 1)).status_code == 201
    again = vote(c, battle, c.alice, sides=(1, 0))
    assert again.status_code == 409, again.text
    assert len(stored_votes(c)) == 1
    assert c.get("/v1/leaderboard", headers=c.alice).json()["votes"]["total"] == 1


def test_one_vote_does_not_rank_a_round_with_a_zero_width_interval(arena):
    c = arena
    battle = battle_of(c, c.alice)
    assert vote(c, battle, c.alice).status_code == 201
    board = c.get("/v1/leaderboard", headers=c.alice).json()
    for row in board["helpfulness"] + board["harmlessness"]:
        assert row["ci"][1] - row["ci"][0] > 100, row  # ranked from one vote: certainty from nothing
    listed = {row["model"] for row in board["helpfulness"]} | {u["model"] for u in board.get("unranked", [])}
    assert listed == {"beaver-v1", "beaver-v2"}


def test_ten_identical_votes_are_not_a_zero_width_interval():
    from models.leaderboard import Battle, leaderboard

    for row in leaderboard([Battle("a", "b", 1.0)] * 10):
        assert row.ci[1] - row.ci[0] > 100, row


def test_the_model_judged_table_shows_names_and_the_red_team_harmful_ratio(arena):
    from sqlmodel import Session, select

    from api.db import get_engine
    from api.tables import Job, Model, Round

    c = arena
    with Session(get_engine()) as s:
        round_id = s.exec(select(Round.id).where(Round.name == "beaver-v2")).one()
        s.add(Model(id="model-baseline7", name="ppo-reward-only", kind="policy", path="/tmp/x"))
        metrics = {}
        for ref in (round_id, "model-baseline7"):  # harmful over all prompts: 0.1; over red-team prompts: 0.8
            metrics |= {f"{ref}/harmful_ratio": 0.1, f"{ref}/red_team/harmful_ratio": 0.8, f"{ref}/reward": 1.0}
        s.add(Job(id="job-eval7", type="evaluate", status="succeeded", queue="cpu", metrics=metrics,
                  params={"models": [round_id, "model-baseline7"]}))
        s.commit()
    (evaluation,) = c.get("/v1/leaderboard", headers=c.alice).json()["evaluations"]
    shown = evaluation["models"]
    assert isinstance(shown, list), shown  # rows with names, not a map of whatever ids the job was given
    assert [m["name"] for m in shown] == ["beaver-v2", "ppo-reward-only"]
    assert [m["red_team_harmful_ratio"] for m in shown] == [0.8, 0.8]
