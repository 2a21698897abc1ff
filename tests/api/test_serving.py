"""Serving over HTTP on real tiny models: the real ``openai`` client against Beaver (models list,
chat, streaming), /v1/score = the trainer's evaluation scores, /v1/moderations flags, compare,
guard mode, and the documented 4xx errors."""

from __future__ import annotations

import json

import pytest
import torch

from tests.api.conftest import auth

PAIRS = [("how do i make a cake ?", "sure . step 1 : mix flour . step 2 : add eggs ."),
         ("how do i make a cake ?", "sorry , i can not help with that ."),
         ("what is the capital of france ?", "paris is the capital ."),
         ("", "bad unsafe"), ("", "good safe yes"), ("red green", "blue blue blue one two three")]


def save_head(base_dir, out_dir, score_type: str, seed: int):
    from models.chat_format import ChatFormat
    from models.loading import load_score_model
    from models.score_model import save_score_model

    fmt = ChatFormat.load(base_dir)
    torch.manual_seed(seed)
    return save_score_model(load_score_model(base_dir, fmt.tokenizer), fmt, out_dir, score_type)


@pytest.fixture(scope="module")
def score_dirs(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("serving-models")
    return save_head(tiny_llama_dir, root / "reward", "reward", 3), save_head(tiny_llama_dir, root / "cost", "cost", 4)


@pytest.fixture
def app_client(keys, tiny_llama_dir, score_dirs):
    """The app with the serving routers, a registered round 'beaver-v1' (policy, reward, cost)."""
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.routers import chat, scores
    from api.serving import get_pool

    get_pool.cache_clear()
    app = create_app()
    if not any(getattr(r, "path", "") == "/v1/chat/completions" for r in app.routes):
        app.include_router(chat.router)
        app.include_router(scores.router)
    with TestClient(app) as client:
        ids = {}
        for name, kind, path in (("tiny-policy", "policy", tiny_llama_dir), ("tiny-reward", "reward", score_dirs[0]),
                                 ("tiny-cost", "cost", score_dirs[1])):
            r = client.post("/v1/models", json={"name": name, "kind": kind, "path": str(path)},
                            headers=auth(keys["trainer"]))
            assert r.status_code == 201, r.text
            ids[kind] = r.json()["id"]
        r = client.post("/v1/rounds", json={"name": "beaver-v1", "policy": ids["policy"], "reward_model": ids["reward"],
                                            "cost_model": ids["cost"]}, headers=auth(keys["trainer"]))
        assert r.status_code == 201, r.text
        client.ids = ids
        yield client
    get_pool.cache_clear()


def openai_client(app_client, key):
    import openai

    return openai.OpenAI(base_url=str(app_client.base_url) + "/v1", api_key=key, http_client=app_client, max_retries=0)


def test_openai_client_lists_models_chats_and_streams(app_client, keys):
    client = openai_client(app_client, keys["viewer"])
    assert "beaver-v1" in [m.id for m in client.models.list().data]
    messages = [{"role": "user", "content": "how do i make a cake ?"}]
    first = client.chat.completions.create(model="beaver-v1", messages=messages, temperature=0, max_tokens=12)
    again = client.chat.completions.create(model=app_client.ids["policy"], messages=messages, temperature=0,
                                           max_tokens=12)
    assert first.choices[0].message.content and first.choices[0].message.content == again.choices[0].message.content
    assert first.usage.completion_tokens <= 12 and first.choices[0].finish_reason in ("stop", "length")

    chunks = list(client.chat.completions.create(model="beaver-v1", messages=messages, temperature=0, max_tokens=12,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == first.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == first.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == first.usage.completion_tokens

    seeded = [client.chat.completions.create(model="beaver-v1", messages=messages, temperature=1.0, top_p=0.9,
                                             seed=5, max_tokens=10).choices[0].message.content for _ in range(2)]
    assert seeded[0] == seeded[1]
    words = first.choices[0].message.content.split()
    stopped = client.chat.completions.create(model="beaver-v1", messages=messages, temperature=0, max_tokens=12,
                                             stop=[words[-1]])
    assert words[-1] not in stopped.choices[0].message.content


def test_score_equals_the_trainers_evaluation_scores(app_client, keys, score_dirs):
    from models.evaluation import pair_scores
    from models.chat_format import ChatFormat
    from models.loading import load_score_model
    from models.preference import PreferencePair, tokenize_pairs

    r = app_client.post("/v1/score", json={"model": "beaver-v1", "items": [{"prompt": p, "response": a}
                                                                          for p, a in PAIRS]},
                        headers=auth(keys["viewer"]))
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    for score_dir, field in zip(score_dirs, ("reward", "cost")):
        fmt = ChatFormat.load(score_dir)
        model = load_score_model(score_dir, fmt.tokenizer)
        pairs = [PreferencePair(p, a, a, True, True) for p, a in PAIRS]
        expected, _ = pair_scores(model, tokenize_pairs(fmt, pairs), fmt.tokenizer.pad_token_id)
        assert max(abs(d[field] - e) for d, e in zip(data, expected.tolist())) < 1e-4
    assert all(d["safe"] == (d["cost"] <= 0) for d in data)

    only_cost = app_client.post("/v1/score", json={"cost_model": app_client.ids["cost"],
                                                   "items": [{"prompt": "", "response": "bad"}]},
                                headers=auth(keys["viewer"])).json()["data"][0]
    assert only_cost["reward"] is None and only_cost["cost"] is not None


def test_moderations_flag_exactly_the_costs_above_threshold(app_client, keys):
    scored = app_client.post("/v1/score", json={"model": "beaver-v1", "items": [{"prompt": "", "response": a}
                                                                              for _, a in PAIRS]},
                             headers=auth(keys["viewer"])).json()["data"]
    costs = sorted(d["cost"] for d in scored)
    threshold = (costs[2] + costs[3]) / 2  # half the answers above, half below
    r = app_client.post("/v1/moderations", json={"model": "beaver-v1", "input": [a for _, a in PAIRS],
                                                  "threshold": threshold}, headers=auth(keys["viewer"]))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "beaver-v1" and body["cost_model"] == app_client.ids["cost"]
    flags = [res["flagged"] for res in body["results"]]
    assert flags == [d["cost"] > threshold for d in scored] and sum(flags) == 3
    for res, d in zip(body["results"], scored):
        assert res["categories"]["unsafe"] == res["flagged"] and res["threshold"] == threshold
        assert abs(res["cost"] - d["cost"]) < 1e-5 and abs(res["reward"] - d["reward"]) < 1e-5
        assert 0 < res["category_scores"]["unsafe"] < 1

    one = app_client.post("/v1/moderations", json={"model": app_client.ids["cost"], "input": "bad unsafe"},
                          headers=auth(keys["viewer"])).json()
    assert len(one["results"]) == 1 and one["results"][0]["flagged"] == (one["results"][0]["cost"] > 0)
    pairs = app_client.post("/v1/moderations", json={"model": "beaver-v1", "input": [
        {"prompt": p, "response": a} for p, a in PAIRS[:2]]}, headers=auth(keys["viewer"]))
    assert pairs.status_code == 200 and len(pairs.json()["results"]) == 2


def test_compare_and_guard(app_client, keys):
    messages = [{"role": "user", "content": "how do i make a cake ?"}]
    r = app_client.post("/v1/chat/compare", json={"models": ["beaver-v1", app_client.ids["policy"]],
                                                  "messages": messages, "temperature": 0, "max_tokens": 8},
                        headers=auth(keys["viewer"]))
    assert r.status_code == 200, r.text
    body = r.json()
    answers = body["answers"]
    assert answers[0]["message"]["content"] == answers[1]["message"]["content"]
    assert answers[0]["reward"] is not None and answers[0]["safe"] == (answers[0]["cost"] <= 0)
    # one reference pair scores every answer, a bare policy's too: the same answer, the same scores
    assert (body["judges"], body["reward_model"], body["cost_model"]) == (
        "beaver-v1", app_client.ids["reward"], app_client.ids["cost"])
    assert [answers[1]["reward"], answers[1]["cost"]] == pytest.approx([answers[0]["reward"], answers[0]["cost"]],
                                                                       abs=1e-5)  # batched together: float noise

    plain = app_client.post("/v1/chat/completions", json={"model": "beaver-v1", "messages": messages,
                                                          "temperature": 0, "max_tokens": 8},
                            headers=auth(keys["viewer"])).json()["choices"][0]
    cost = answers[0]["cost"]
    for threshold, refused in ((cost - 1.0, True), (cost + 1.0, False)):
        r = app_client.post("/v1/chat/completions", json={"model": "beaver-v1", "messages": messages, "temperature": 0,
                                                          "max_tokens": 8, "guard": True, "guard_threshold": threshold},
                            headers=auth(keys["viewer"]))
        choice = r.json()["choices"][0]
        assert choice["guarded"] is refused and abs(choice["cost"] - cost) < 1e-5
        if refused:
            assert choice["finish_reason"] == "content_filter"
            assert choice["message"]["content"] != plain["message"]["content"]
        else:
            assert choice["message"]["content"] == plain["message"]["content"]

    # a guarded stream: the answer arrives in one delta once scored, the flag on the last chunk
    with app_client.stream("POST", "/v1/chat/completions", headers=auth(keys["viewer"]), json={
            "model": "beaver-v1", "messages": messages, "temperature": 0, "max_tokens": 8, "stream": True,
            "guard": True, "guard_threshold": cost - 1.0}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert events[-1]["choices"][0]["guarded"] is True and events[-1]["choices"][0]["finish_reason"] == "content_filter"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) != plain["message"]["content"]


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ("/v1/chat/completions", {"model": "beaver-v1", "messages": []}, 422, "messages"),
    ("/v1/chat/completions", {"model": "beaver-v1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
     422, "max_tokens"),
    ("/v1/chat/completions", {"model": "beaver-v1", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ("/v1/chat/completions", {"model": "beaver-v1", "messages": [{"role": "user", "content": "hi"}], "tools": []},
     400, "tools"),
    ("/v1/score", {"model": "beaver-v1", "items": [{"prompt": "", "response": "x"}] * 257}, 413, "items"),
    ("/v1/score", {"model": "nope", "items": [{"prompt": "", "response": "x"}]}, 404, "model"),
    ("/v1/moderations", {"model": "beaver-v1", "input": ["x"] * 300}, 413, "input"),
])
def test_bad_requests_get_the_documented_error(app_client, keys, path, body, status, param):
    r = app_client.post(path, json=body, headers=auth(keys["viewer"]))
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_a_model_that_fails_to_load_is_503_and_the_rest_keeps_serving(app_client, keys, tmp_path, tiny_llama_dir):
    import shutil

    broken = shutil.copytree(tiny_llama_dir, tmp_path / "broken")
    r = app_client.post("/v1/models", json={"name": "broken", "kind": "policy", "path": str(broken)},
                        headers=auth(keys["trainer"]))
    assert r.status_code == 201, r.text
    # Registration checked the folder; broken afterwards, it no longer loads.
    (broken / "config.json").write_text('{"model_type": "llama", "hidden_size": "huge"}')
    messages = [{"role": "user", "content": "hi"}]
    failed = app_client.post("/v1/chat/completions", json={"model": r.json()["id"], "messages": messages},
                             headers=auth(keys["viewer"]))
    assert failed.status_code == 503 and "unavailable" in failed.json()["error"]["message"]
    ok = app_client.post("/v1/chat/completions", json={"model": "beaver-v1", "messages": messages, "max_tokens": 4},
                         headers=auth(keys["viewer"]))
    assert ok.status_code == 200
    assert app_client.post("/v1/chat/completions", json={"model": "beaver-v1", "messages": messages}).status_code == 401


def test_scoring_and_chat_hold_no_database_session_while_the_engine_works(app_client, keys, monkeypatch):
    """Issue 12: a request gives its session back before it awaits the engine, so requests waiting
    for a model never keep others from the database."""
    import anyio

    from api.db import acquire_slot
    from api.settings import get_settings
    from models.engine import TransformersEngine

    seen, one_at_a_time = [], anyio.Lock()  # reward and cost are scored at once
    for name in ("score", "complete"):
        async def observed(self, *args, _real=getattr(TransformersEngine, name), _name=name, **kwargs):
            async with one_at_a_time:
                # Every session of the process is free now (else the last acquire waits, then raises).
                slots = [await acquire_slot() for _ in range(get_settings().resolved_db_pool_size)]
                for slot in slots:
                    slot.release()
            seen.append(_name)
            return await _real(self, *args, **kwargs)

        monkeypatch.setattr(TransformersEngine, name, observed)
    messages = [{"role": "user", "content": "how do i make a cake ?"}]
    for path, body in (("/v1/score", {"model": "beaver-v1", "items": [{"prompt": "hi", "response": "paris"}]}),
                       ("/v1/chat/completions", {"model": "beaver-v1", "messages": messages, "max_tokens": 4}),
                       ("/v1/chat/compare", {"models": ["beaver-v1"], "messages": messages, "max_tokens": 4}),
                       ("/v1/moderations", {"model": "beaver-v1", "input": "paris"})):
        r = app_client.post(path, json=body, headers=auth(keys["viewer"]))
        assert r.status_code == 200, r.text
    assert seen == ["score", "score", "complete", "complete", "score", "score", "score", "score"]


def test_an_answer_the_judges_cannot_read_is_a_422_naming_it_in_every_scoring_route(app_client, keys):
    """The tiny models read 512 positions: an answer longer than that is never scored, and the error
    names it in the request's own terms."""
    long = "red " * 600
    for path, body, param in (
            ("/v1/score", {"model": "beaver-v1", "items": [{"prompt": "", "response": "x"},
                                                            {"prompt": "", "response": long}]}, "items.1.response"),
            ("/v1/moderations", {"model": "beaver-v1", "input": long}, "input"),
            ("/v1/moderations", {"input": ["x", "y", long]}, "input.2"),
            ("/v1/moderations", {"input": [{"prompt": "hi", "response": long}]}, "input.0.response")):
        r = app_client.post(path, json=body, headers=auth(keys["viewer"]))
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["param"] == param and "model" in error["message"] and "reads at most 512" in error["message"]


def test_compare_with_a_named_reward_model_says_which_models_scored(app_client, keys):
    r = app_client.post("/v1/chat/compare", json={"models": ["beaver-v1"], "reward_model": app_client.ids["reward"],
                                                  "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
                        headers=auth(keys["viewer"]))
    assert r.status_code == 200, r.text
    body = r.json()
    assert "judges" not in body  # not the reference round's pair as such: the ids say what scored
    assert body["reward_model"] == app_client.ids["reward"] and body["cost_model"] == app_client.ids["cost"]
