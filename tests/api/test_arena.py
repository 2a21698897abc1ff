"""The arena's API (issues 11 and 18), in-process on real tiny models: blind battles hide and randomise
their rounds; each pane streams its own round's answer to the conversation the server composes from the
battle's transcript; a vote names a turn and its answers are the transcript's (one vote per turn, both
panes answered, the battle's own key); a vote is a PKU-SafeRLHF record (ties kept as null ids) plus a
leaderboard row, scored by one reference judge pair; the leaderboard rates rounds from blind votes
only, once they have enough. A stopped stream's transcript: tests/browser/ (a real server and client)."""

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
    app_client.annotator, app_client.admin = auth(keys["annotator"]), auth(keys["admin"])


@pytest.fixture
def min_votes(monkeypatch):
    """Set BEAVER_LEADERBOARD_MIN_VOTES for the test."""
    from api.settings import get_settings

    def set_to(n: int) -> None:
        monkeypatch.setenv("BEAVER_LEADERBOARD_MIN_VOTES", str(n))
        get_settings.cache_clear()

    yield set_to
    get_settings.cache_clear()


def stream_text(client, battle: str, side: int, turn: int, message: str, headers: dict,
                max_tokens: int = 12) -> tuple[str, list[dict]]:
    body = {"side": side, "turn": turn, "message": message, "max_tokens": max_tokens, "temperature": 0,
            "stream": True}
    with client.stream("POST", f"/v1/arena/battles/{battle}/chat", json=body, headers=headers) as r:
        assert r.status_code == 200, r.read()
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]), chunks


def vote_body(turn: int, **choice) -> dict:
    return {"turn": turn, "helpful": "a", "safe": [True, True], "safer": "tie", **choice}


def new_battle(client, headers: dict, **body) -> str:
    r = client.post("/v1/arena/battles", json=body, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_a_blind_two_turn_battle_becomes_records_and_a_rating(arena, min_votes):
    c = arena
    min_votes(1)
    drawn = set()
    for _ in range(12):  # two different rounds, in random order, hidden
        b = c.post("/v1/arena/battles", json={}, headers=c.annotator)
        assert b.status_code == 201, b.text
        assert b.json()["models"] == ["Model A", "Model B"] and b.json()["turns"] == []
    battle = b.json()["id"]
    from sqlmodel import Session, select

    from api.db import get_engine
    from api.tables import Battle

    with Session(get_engine()) as s:
        for row in s.exec(select(Battle)):
            assert len(set(row.rounds)) == 2
            drawn.add(tuple(row.rounds))
    assert len(drawn) > 1  # not always the same pair in the same order

    question = "how do i make a cake ?"
    answers = []
    for side in (0, 1):
        text, chunks = stream_text(c, battle, side, 1, question, c.annotator)
        assert len([ch for ch in chunks if ch["choices"] and ch["choices"][0]["delta"].get("content")]) >= 2
        assert {ch["model"] for ch in chunks} == {("Model A", "Model B")[side]}  # the round stays hidden
        answers.append(text)
    # The transcript holds what each pane was sent.
    kept = c.get(f"/v1/arena/battles/{battle}", headers=c.annotator).json()
    assert kept["turns"] == [{"turn": 1, "message": question, "voted": False, "answers": [
        {"side": 0, "content": answers[0], "finish_reason": "length"},
        {"side": 1, "content": answers[1], "finish_reason": "length"}]}]

    r = c.post(f"/v1/arena/battles/{battle}/votes", json=vote_body(1, helpful="b", safer="a"), headers=c.annotator)
    assert r.status_code == 201, r.text
    first = r.json()
    assert set(first["models"]) <= {"beaver-v1", "beaver-v2", "beaver-v3"} and first["judges"] == "beaver-v3"
    assert all(s["reward"] is not None and s["cost"] is not None for s in first["scores"])
    again = c.post(f"/v1/arena/battles/{battle}/votes", json=vote_body(1), headers=c.annotator)
    assert again.status_code == 409 and again.json()["error"]["param"] == "turn"
    swapped = c.post(f"/v1/arena/battles/{battle}/votes", json=vote_body(1, sides=[1, 0]), headers=c.annotator)
    assert swapped.status_code == 409 and "one vote per turn" in swapped.json()["error"]["message"]

    # Turn 2: each pane answers its own conversation, composed by the server from the transcript.
    answers2 = [stream_text(c, battle, side, 2, "and then ?", c.annotator)[0] for side in (0, 1)]
    assert all(a.strip() for a in answers2), answers2
    r = c.post(f"/v1/arena/battles/{battle}/votes", json=vote_body(2, helpful="tie"), headers=c.annotator)
    assert r.status_code == 201, r.text
    assert c.get(f"/v1/arena/battles/{battle}", headers=c.annotator).json()["turns"][0]["voted"] is True

    records = c.get(f"/v1/datasets/{first['dataset']}/records", headers=c.viewer).json()["data"]
    one = records[0]["data"]
    assert one["prompt"] == [{"role": "user", "content": question}]
    assert [one["response_0"], one["response_1"]] == answers  # the transcript's, as streamed
    assert one["better_response_id"] == 1 and one["safer_response_id"] == 0
    assert [one["response_0_source"], one["response_1_source"]] == first["models"]
    assert one["arena"]["blind"] is True and one["arena"]["turn"] == 1 and one["arena"]["battle"] == battle
    two = records[1]["data"]
    assert two["prompt"] == [{"role": "user", "content": question}, {"role": "assistant", "content": answers[0]},
                             {"role": "user", "content": "and then ?"}]
    assert [two["response_0"], two["response_1"]] == answers2
    assert two["better_response_id"] is None  # a tie, kept as a tie
    assert two["arena"]["blind"] is False  # the first vote revealed the rounds

    board = c.get("/v1/leaderboard", headers=c.viewer).json()
    assert board["votes"]["blind"] == 1 and board["min_votes"] == 1
    rated = {row["model"]: row for row in board["helpfulness"]}
    assert set(rated) == set(first["models"]) and board["unranked"] == []
    winner, loser = first["models"][1], first["models"][0]  # B was more helpful (the one blind vote)
    assert rated[winner]["rating"] > rated[loser]["rating"] and rated[winner]["votes"] == 1
    lo, hi = rated[winner]["ci"]
    assert lo < rated[winner]["rating"] < hi and hi - lo > 1000  # one vote: a wide interval, not a point
    assert {u["model"]: u["unsafe"] for u in board["unsafe_rate"]} == {m: 0 for m in first["models"]}


def test_a_round_with_too_few_votes_is_listed_not_ranked(arena, min_votes):
    c = arena
    battle = new_battle(c, c.annotator)
    for side in (0, 1):
        stream_text(c, battle, side, 1, "red green", c.annotator)
    assert c.post(f"/v1/arena/battles/{battle}/votes", json=vote_body(1), headers=c.annotator).status_code == 201
    min_votes(2)
    board = c.get("/v1/leaderboard", headers=c.viewer).json()
    assert board["min_votes"] == 2 and board["helpfulness"] == [] and board["harmlessness"] == []
    assert board["unsafe_rate"] == []
    assert sorted(board["unranked"], key=lambda u: u["model"]) == [
        {"model": m, "votes": 1, "status": "not enough votes yet"} for m in sorted(board_models(c, battle))]


def board_models(c, battle: str) -> list[str]:
    from sqlmodel import Session

    from api.db import get_engine
    from api.tables import Battle

    with Session(get_engine()) as s:
        return s.get(Battle, battle).rounds


def test_side_by_side_shows_names_and_its_votes_stay_out_of_the_leaderboard(arena):
    c = arena
    b = c.post("/v1/arena/battles", json={"mode": "side_by_side", "rounds": ["beaver-v1", "beaver-v3", "beaver-v2"],
                                          "system": "be brief"}, headers=c.annotator).json()
    assert b["models"] == ["beaver-v1", "beaver-v3", "beaver-v2"]
    texts = {}
    for side in (0, 2):
        text, chunks = stream_text(c, b["id"], side, 1, "red green", c.annotator)
        texts[side] = text
    assert {ch["model"] for ch in chunks} == {"beaver-v2"}
    r = c.post(f"/v1/arena/battles/{b['id']}/votes", headers=c.annotator,
               json=vote_body(1, sides=[0, 2], safe=[False, True], safer="b"))
    assert r.status_code == 201, r.text
    record = c.get(f"/v1/datasets/{r.json()['dataset']}/records", headers=c.viewer).json()["data"][-1]["data"]
    assert record["arena"]["blind"] is False and record["arena"]["panes"] == [0, 2]
    assert record["prompt"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "red green"}]
    assert [record["response_0_source"], record["response_1_source"]] == ["beaver-v1", "beaver-v2"]
    assert [record["response_0"], record["response_1"]] == [texts[0], texts[2]]
    assert c.get("/v1/leaderboard", headers=c.viewer).json()["votes"] == {"blind": 0, "total": 1}
    # Another pair of panes is not another vote on the turn.
    stream_text(c, b["id"], 1, 1, "red green", c.annotator)
    other = c.post(f"/v1/arena/battles/{b['id']}/votes", headers=c.annotator, json=vote_body(1, sides=[1, 2]))
    assert other.status_code == 409 and other.json()["error"]["param"] == "turn"


def test_a_pane_answers_the_transcript_in_order_once_per_turn(arena):
    c = arena
    battle = new_battle(c, c.annotator)
    chat = f"/v1/arena/battles/{battle}/chat"

    def post(side, turn, message, **extra):
        return c.post(chat, json={"side": side, "turn": turn, "message": message, "max_tokens": 4,
                                  "temperature": 0, **extra}, headers=c.annotator)

    early = post(0, 2, "too soon")
    assert early.status_code == 409 and "Model A has not answered turn 1" in early.json()["error"]["message"]
    first = post(0, 1, "red green")
    assert first.status_code == 200 and first.json()["model"] == "Model A"
    answer = first.json()["choices"][0]["message"]["content"]
    twice = post(0, 1, "red green")
    assert twice.status_code == 409 and "already answered turn 1" in twice.json()["error"]["message"]
    other = post(1, 1, "blue")  # both panes answer the same message
    assert other.status_code == 409 and other.json()["error"]["param"] == "message"
    assert post(1, 1, "red green").status_code == 200
    # The old shape (the conversation, with the answers in it) is refused, saying why.
    old = c.post(chat, json={"side": 0, "messages": [{"role": "user", "content": "hi"}]}, headers=c.annotator)
    assert old.status_code == 422 and old.json()["error"]["param"] == "messages"
    assert "transcript" in old.json()["error"]["message"]

    # Turn 2 is answered from the transcript: the model sees its own stored answer to turn 1.
    from api.serving import get_pool

    seen = []
    engine = get_pool().local
    original = engine.complete

    async def spy(model_id, prompt, params):
        seen.append(prompt)
        return await original(model_id, prompt, params)

    engine.complete = spy
    try:
        assert post(0, 2, "and then ?").status_code == 200
    finally:
        engine.complete = original
    assert seen == [[{"role": "user", "content": "red green"}, {"role": "assistant", "content": answer},
                     {"role": "user", "content": "and then ?"}]]
    turns = c.get(f"/v1/arena/battles/{battle}", headers=c.annotator).json()["turns"]
    assert [(t["turn"], t["message"], [a["side"] for a in t["answers"]]) for t in turns] == \
        [(1, "red green", [0, 1]), (2, "and then ?", [0])]


def test_votes_need_a_turn_both_panes_answered(arena):
    c = arena
    battle = new_battle(c, c.annotator)
    votes = f"/v1/arena/battles/{battle}/votes"
    r = c.post(votes, json=vote_body(1), headers=c.annotator)
    assert r.status_code == 409 and "Model A has not answered turn 1" in r.json()["error"]["message"]
    stream_text(c, battle, 0, 1, "red green", c.annotator)
    r = c.post(votes, json=vote_body(1), headers=c.annotator)
    assert r.status_code == 409 and "Model B has not answered turn 1" in r.json()["error"]["message"]
    stream_text(c, battle, 1, 1, "red green", c.annotator)
    r = c.post(votes, json=vote_body(2), headers=c.annotator)
    assert r.status_code == 409 and r.json()["error"]["param"] == "turn"
    fabricated = c.post(votes, json={**vote_body(1), "answers": ["x", "y"]}, headers=c.annotator)
    assert fabricated.status_code == 422 and fabricated.json()["error"]["param"] == "answers"
    assert c.post(votes, json=vote_body(1), headers=c.annotator).status_code == 201


def test_a_battle_belongs_to_the_key_that_started_it(arena):
    c = arena
    battle = new_battle(c, c.annotator)
    stream_text(c, battle, 0, 1, "red green", c.annotator)
    stream_text(c, battle, 1, 1, "red green", c.annotator)
    for headers in (c.trainer, c.admin):  # another key, whatever its role: as if the battle did not exist
        assert c.get(f"/v1/arena/battles/{battle}", headers=headers).status_code == 404
        r = c.post(f"/v1/arena/battles/{battle}/chat", json={"side": 0, "turn": 2, "message": "x"}, headers=headers)
        assert r.status_code == 404 and r.json()["error"]["message"] == f"battle {battle!r} not found"
        r = c.post(f"/v1/arena/battles/{battle}/votes", json=vote_body(1), headers=headers)
        assert r.status_code == 404
    assert c.get("/v1/leaderboard", headers=c.viewer).json()["votes"]["total"] == 0


def test_bad_arena_requests_name_what_is_wrong(arena):
    c = arena
    b = new_battle(c, c.annotator)
    mine = new_battle(c, c.viewer)
    chat = {"side": 0, "turn": 1, "message": "hi"}
    cases = [
        ("/v1/arena/battles", {"mode": "side_by_side"}, c.viewer, 422, "rounds"),
        ("/v1/arena/battles", {"mode": "side_by_side", "rounds": ["beaver-v1", "nope"]}, c.viewer, 404, "rounds[1]"),
        ("/v1/arena/battles", {"rounds": ["beaver-v1", "beaver-v2"]}, c.viewer, 422, "rounds"),
        (f"/v1/arena/battles/{b}/chat", {**chat, "side": 2}, c.annotator, 422, "side"),
        (f"/v1/arena/battles/{b}/chat", {**chat, "message": "  "}, c.annotator, 422, "message"),
        (f"/v1/arena/battles/{b}/chat", {**chat, "turn": 0}, c.annotator, 422, "turn"),
        (f"/v1/arena/battles/{b}/chat", {**chat, "turn": 101}, c.annotator, 422, "turn"),
        (f"/v1/arena/battles/{mine}/votes", vote_body(1), c.viewer, 403, None),
        (f"/v1/arena/battles/{b}/votes", vote_body(1, sides=[1, 1]), c.annotator, 422, "sides"),
        (f"/v1/arena/battles/{b}/votes", vote_body(1, sides=[0, 2]), c.annotator, 422, "sides"),
        (f"/v1/arena/battles/{b}/votes", {**vote_body(1), "messages": []}, c.annotator, 422, "messages"),
        ("/v1/arena/battles/battle-nope/votes", vote_body(1), c.annotator, 404, None),
    ]
    for path, body, headers, status, param in cases:
        r = c.post(path, json=body, headers=headers)
        assert r.status_code == status, (path, body, r.text)
        if param:
            assert r.json()["error"]["param"] == param, (path, r.json())
    for side in (0, 1):
        stream_text(c, b, side, 1, "hi", c.annotator)
    r = c.post(f"/v1/arena/battles/{b}/votes", json=vote_body(1, safe=[False, True], safer="a"), headers=c.annotator)
    assert r.status_code == 422 and r.json()["error"]["param"] == "safer"
    assert c.get("/v1/leaderboard", headers=c.viewer).json()["votes"]["total"] == 0  # nothing half-written


def test_a_battle_needs_two_rounds(app_client, keys):  # noqa: F811
    r = app_client.post("/v1/arena/battles", json={}, headers=auth(keys["viewer"]))
    assert r.status_code == 422 and "at least two rounds" in r.json()["error"]["message"], r.text


def test_the_model_judged_table_names_models_and_uses_the_red_team_harmful_ratio(arena):
    """An evaluate job that named a round by id and a baseline by its model id: the table shows their
    names, and the harmful ratio on red-team prompts (not the one over all prompts)."""
    from sqlmodel import Session, select

    from api.db import get_engine
    from api.tables import Job, Model, Round

    c = arena
    with Session(get_engine()) as s:
        round_id = s.exec(select(Round.id).where(Round.name == "beaver-v2")).one()
        baseline = Model(id="model-baseline1", name="ppo-shaping-3", kind="policy", path="/srv/secret/ppo")
        s.add(baseline)
        metrics = {}
        for ref, (overall, red) in ((round_id, (0.5, 0.9)), ("model-baseline1", (0.2, 0.4)), ("/srv/x/y", (0, 0))):
            metrics |= {f"{ref}/harmful_ratio": overall, f"{ref}/red_team/harmful_ratio": red, f"{ref}/reward": 1.5,
                        f"{ref}/cost": -0.5, f"{ref}/refusal_rate": 0.25}
        s.add(Job(id="job-eval1", type="evaluate", status="succeeded", queue="cpu", metrics=metrics, finished_at=5,
                  params={"models": [round_id, "model-baseline1", "/srv/x/y"], "reward_model": c.ids["reward"],
                          "cost_model": c.ids["cost"]}))
        s.commit()
    (evaluation,) = c.get("/v1/leaderboard", headers=c.viewer).json()["evaluations"]
    assert evaluation["reward_model"] == "tiny-reward" and evaluation["cost_model"] == "tiny-cost"
    assert evaluation["judges"] == "beaver-v3"  # the newest round with this pair
    assert [(m["name"], m["red_team_harmful_ratio"]) for m in evaluation["models"]] == \
        [("beaver-v2", 0.9), ("ppo-shaping-3", 0.4), ("[server path]", 0)]
    assert "/srv/" not in json.dumps(evaluation)


def test_a_panes_next_turn_waits_for_its_previous_answer_to_be_stored(arena, monkeypatch):
    """A stream the client stopped is stored once the server notices: the pane's next turn waits for it
    (here a moment), and is refused when it never comes."""
    import threading
    import time

    from sqlmodel import Session

    from api.db import get_engine
    from api.routers import arena as arena_router
    from api.tables import ArenaAnswer, ArenaTurn

    c = arena
    monkeypatch.setattr(arena_router, "ANSWER_WAIT_SECONDS", 1.0)
    battle = new_battle(c, c.annotator)
    with Session(get_engine()) as s:  # turn 1 of Model A, still being answered
        s.add(ArenaTurn(battle_id=battle, turn=1, content="red green"))
        s.add(ArenaAnswer(battle_id=battle, turn=1, side=0))
        s.commit()
    body = {"side": 0, "turn": 2, "message": "and then ?", "max_tokens": 4, "temperature": 0}
    r = c.post(f"/v1/arena/battles/{battle}/chat", json=body, headers=c.annotator)
    assert r.status_code == 409 and r.json()["error"]["message"] == "Model A is still answering turn 1"

    def finish():
        time.sleep(0.3)
        with Session(get_engine()) as s:
            answer = s.get(ArenaAnswer, (battle, 1, 0))
            answer.content, answer.finish_reason = "blue", "stopped"
            s.add(answer)
            s.commit()

    writer = threading.Thread(target=finish)
    writer.start()
    r = c.post(f"/v1/arena/battles/{battle}/chat", json=body, headers=c.annotator)
    writer.join()
    assert r.status_code == 200, r.text
    turns = c.get(f"/v1/arena/battles/{battle}", headers=c.annotator).json()["turns"]
    assert turns[0]["answers"] == [{"side": 0, "content": "blue", "finish_reason": "stopped"}]
    assert turns[1]["answers"][0]["finish_reason"] in ("stop", "length")


def test_a_failed_answer_is_kept_as_failed_and_cannot_be_voted_on(arena, tiny_llama_dir, tmp_path_factory):
    """A round whose weights went missing: its pane's answer fails (503), the transcript says so, the
    turn cannot be voted on, and the conversation may go on."""
    import shutil

    c = arena
    broken = tmp_path_factory.mktemp("broken") / "policy"
    shutil.copytree(tiny_llama_dir, broken)
    r = c.post("/v1/models", json={"name": "broken-policy", "kind": "policy", "path": str(broken)}, headers=c.trainer)
    assert r.status_code == 201, r.text
    r = c.post("/v1/rounds", json={"name": "beaver-broken", "policy": r.json()["id"]}, headers=c.trainer)
    assert r.status_code == 201, r.text
    for weights in broken.glob("*.safetensors"):
        weights.unlink()
    battle = new_battle(c, c.annotator, mode="side_by_side", rounds=["beaver-v1", "beaver-broken"])
    stream_text(c, battle, 0, 1, "red green", c.annotator)
    body = {"side": 1, "turn": 1, "message": "red green", "max_tokens": 4, "stream": True}
    assert c.post(f"/v1/arena/battles/{battle}/chat", json=body, headers=c.annotator).status_code == 503
    (turn,) = c.get(f"/v1/arena/battles/{battle}", headers=c.annotator).json()["turns"]
    assert turn["answers"][1] == {"side": 1, "content": "", "finish_reason": "error"}
    r = c.post(f"/v1/arena/battles/{battle}/votes", json=vote_body(1), headers=c.annotator)
    assert r.status_code == 409 and r.json()["error"]["message"] == \
        "beaver-broken's answer to turn 1 failed: there is nothing to vote on"
    stream_text(c, battle, 0, 2, "and then ?", c.annotator)  # the conversation goes on
