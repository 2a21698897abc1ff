"""Serving options on real tiny models through the in-process app: the precision setting reaches the
transformers engine and the vLLM command, and /v1/score takes a prompt as a conversation."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient
from sqlmodel import Session

from tests.api.conftest import auth


@pytest.fixture
def serving_dtype(beaver_env, monkeypatch, request):
    """BEAVER_SERVING_DTYPE for the app (indirect parameter; unset by default)."""
    from api.cli import clear_caches

    setting = getattr(request, "param", None)
    if setting is not None:
        monkeypatch.setenv("BEAVER_SERVING_DTYPE", setting)
        clear_caches()
    return setting


@pytest.fixture
def serving_app(serving_dtype, keys, tiny_llama_dir, score_model_dir):
    """The app with a registered policy, reward and cost model; the serving pool is built for this app."""
    from api.app import create_app
    from api.serving import get_pool

    get_pool.cache_clear()
    with TestClient(create_app()) as client:
        client.ids = {}
        for kind, path in (("policy", tiny_llama_dir), ("reward", score_model_dir), ("cost", score_model_dir)):
            r = client.post("/v1/models", json={"name": f"tiny-{kind}", "kind": kind, "path": str(path)},
                            headers=auth(keys["trainer"]))
            assert r.status_code == 201, r.text
            client.ids[kind] = r.json()["id"]
        yield client
    get_pool.cache_clear()


def loaded_dtypes(pool) -> set:
    # the dtypes of the models the engine loaded (its LRU cache; there is no public accessor)
    return {p.dtype for loaded in pool.local._cache.values() for p in loaded.model.parameters()}


@pytest.mark.parametrize("serving_dtype, dtype", [("bfloat16", torch.bfloat16), ("auto", torch.float32)],
                         indirect=["serving_dtype"])
def test_serving_dtype_reaches_the_engine_and_vllm(serving_app, serving_dtype, keys, dtype):
    from api.db import get_engine
    from api.serving import get_pool, vllm_command_for

    body = {"model": serving_app.ids["policy"], "max_tokens": 3, "temperature": 0,
            "messages": [{"role": "user", "content": "hi"}]}
    r = serving_app.post("/v1/chat/completions", json=body, headers=auth(keys["viewer"]))
    assert r.status_code == 200, r.text
    pool = get_pool()
    assert pool.local.dtype == (dtype if serving_dtype != "auto" else "auto")
    # "auto" is the checkpoint's own precision: the tiny model was saved in float32
    assert loaded_dtypes(pool) == {dtype}
    with Session(get_engine()) as session:
        command = vllm_command_for(session, serving_app.ids["reward"], 8001)
        assert command[command.index("--dtype") + 1] == serving_dtype
        command = vllm_command_for(session, serving_app.ids["policy"], 8001, dtype="float16")
        assert command[command.index("--dtype") + 1] == "float16"


def test_serving_dtype_rejects_other_values(monkeypatch):
    from pydantic import ValidationError

    from api.settings import Settings

    monkeypatch.setenv("BEAVER_SERVING_DTYPE", "fp8")
    with pytest.raises(ValidationError, match="serving_dtype"):
        Settings()


def test_score_prompt_may_be_a_conversation(serving_app, keys):
    h, reward = auth(keys["viewer"]), serving_app.ids["reward"]

    def scores(*prompts) -> list[float]:
        r = serving_app.post("/v1/score", json={"reward_model": reward, "items": [
            {"prompt": p, "response": "sure . mix flour ."} for p in prompts]}, headers=h)
        assert r.status_code == 200, r.text
        return [d["reward"] for d in r.json()["data"]]

    question = "how do i make a cake ?"
    conversation = [{"role": "system", "content": "be safe ."}, {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello ."}, {"role": "user", "content": question}]
    as_string, as_user_turn, as_conversation = scores(question, [{"role": "user", "content": question}], conversation)
    assert as_string == pytest.approx(as_user_turn, abs=1e-6)  # a string is one user turn
    assert as_conversation != pytest.approx(as_string, abs=1e-6)  # the earlier turns are scored too
    r = serving_app.post("/v1/moderations", json={"model": serving_app.ids["cost"], "input": [
        {"prompt": conversation, "response": "sure . mix flour ."}]}, headers=h)
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["cost"] == pytest.approx(as_conversation, abs=1e-6)  # the same model as a cost one


@pytest.mark.parametrize("prompt, param, words", [
    ([], "items.0.prompt", "must end with a user message"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "items.0.prompt",
     "must end with a user message"),
    ([{"role": "tool", "content": "hi"}], "items.0.prompt", ""),
    ([{"role": "user", "content": "hi", "name": "x"}], "items.0.prompt", ""),
    ([{"role": "user"}], "items.0.prompt", ""),
])
def test_score_conversation_is_validated(serving_app, keys, prompt, param, words):
    r = serving_app.post("/v1/score", json={"reward_model": serving_app.ids["reward"],
                                            "items": [{"prompt": prompt, "response": "x"}]},
                         headers=auth(keys["viewer"]))
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"].startswith(param) and words in error["message"], error
