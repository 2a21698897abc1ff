"""Issue 18, hostile: every size a user sends is bounded where it is accepted, /openapi.json says so, and a
server too busy to start a request answers 429 instead of keeping it waiting.

Each test failed on 347aae8: a billion-token generate was a 201 (and took a worker down); no bound was
declared; a negative ``limit`` was a 400 the schema allowed, NUL in a query was refused with no pattern
in the schema, OPTIONS was a bare 405; and a request queued behind a busy model waited with no 429.
The real app in-process on a real SQLite database, real tiny models, the embedded broker (no worker)."""

from __future__ import annotations

import threading

import pytest
from fastapi.testclient import TestClient

from api.cli import clear_caches
from tests.api.conftest import auth, beaver_env, client, keys, score_model_dir  # noqa: F401 — fixtures

PREFERENCE = {"prompt": "how do i make a cake ?", "response_0": "sure . mix flour .", "response_1": "no .",
              "is_response_0_safe": True, "is_response_1_safe": True, "better_response_id": 0,
              "safer_response_id": 0}


@pytest.fixture
def registry(client, keys, tiny_llama_dir, score_model_dir) -> dict:  # noqa: F811
    """A registered policy (context 512), reward and cost models, and a dataset of each kind with 4
    records: every job below is one the server accepts but for the size under test."""
    h = auth(keys["trainer"])
    ids = {}
    for kind, path in (("policy", tiny_llama_dir), ("reward", score_model_dir), ("cost", score_model_dir)):
        r = client.post("/v1/models", json={"name": f"tiny-{kind}", "kind": kind, "path": str(path)}, headers=h)
        assert r.status_code == 201, r.text
        ids[kind] = r.json()["id"]
    for kind, record in (("prompt", {"prompt": "hi"}), ("sft", {"prompt": "hi", "response": "hello ."}),
                         ("preference", PREFERENCE)):
        r = client.post("/v1/datasets", json={"name": f"{kind}-data", "kind": kind, "records": [record] * 4},
                        headers=h)
        assert r.status_code == 201, r.text
        ids[kind] = r.json()["id"]
    return ids


def jobs_of(registry: dict) -> dict:
    """One job of each type that POST /v1/jobs accepts as it is."""
    models = {"model": registry["policy"]}
    judges = {"reward_model": registry["reward"], "cost_model": registry["cost"]}
    return {
        "generate": ({**models, "sampling": {"max_new_tokens": 8}}, "prompt"),
        "evaluate": ({"models": [registry["policy"]], **judges, "sampling": {"max_new_tokens": 8}}, "prompt"),
        "sft": ({**models, "max_length": 64}, "sft"),
        "dpo": ({**models, "max_length": 64}, "preference"),
        "reward": ({**models, "max_length": 64}, "preference"),
        "ppo_lag": ({**models, **judges, "max_length": 64, "sampling": {"max_new_tokens": 8}}, "prompt"),
        "dataset_stats": ({}, "prompt"),
    }


def post_job(client, keys, registry, job_type: str, params: dict | None = None, nested: dict | None = None):  # noqa: F811
    """POST the accepted job of ``job_type`` with ``params`` on top (``nested``: merged into a nested object)."""
    base, kind = jobs_of(registry)[job_type]
    body = {**base, **(params or {})}
    for name, values in (nested or {}).items():
        body[name] = {**body.get(name, {}), **values}
    return client.post("/v1/jobs", json={"type": job_type, "params": body, "datasets": [registry[kind]]},
                       headers=auth(keys["trainer"]))


def assert_422(r, param: str, *words: str) -> str:
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    for word in words:
        assert word in error["message"], (word, error["message"])
    return error["message"]


# --- the finding: a billion new tokens -------------------------------------------------------------------

def test_a_billion_token_generate_is_a_422_at_post_and_nothing_is_queued(client, keys, registry):
    assert post_job(client, keys, registry, "generate").status_code == 201  # the same job, sized sanely
    r = post_job(client, keys, registry, "generate", nested={"sampling": {"max_new_tokens": 1_000_000_000}})
    assert_422(r, "params.sampling.max_new_tokens", "BEAVER_MAX_JOB_TOKENS")
    assert len(client.get("/v1/jobs", headers=auth(keys["trainer"])).json()["data"]) == 1


# --- tokens by the model's context -----------------------------------------------------------------------

def test_tokens_are_bounded_by_the_models_context(client, keys, registry):
    """The tiny policy's context is 512 tokens (config.json's max_position_embeddings); 600 is under the
    tokens cap but does not fit it."""
    for job_type in ("generate", "evaluate", "ppo_lag"):
        r = post_job(client, keys, registry, job_type, nested={"sampling": {"max_new_tokens": 600}})
        assert_422(r, "params.sampling.max_new_tokens", "512")
    for job_type in ("sft", "dpo", "reward", "ppo_lag"):
        assert_422(post_job(client, keys, registry, job_type, {"max_length": 1024}), "params.max_length",
                   "context", "512")
    assert_422(post_job(client, keys, registry, "evaluate", {"max_length": 1024}), "params.max_length", "512")
    # An answer leaves room for a prompt: the whole context is too much too.
    assert_422(post_job(client, keys, registry, "generate", nested={"sampling": {"max_new_tokens": 512}}),
               "params.sampling.max_new_tokens", "room for a prompt")
    # PPO's prompt and answer share max_length.
    r = post_job(client, keys, registry, "ppo_lag", {"max_length": 64}, nested={"sampling": {"max_new_tokens": 64}})
    assert_422(r, "params.sampling.max_new_tokens", "max_length")
    assert client.get("/v1/jobs", headers=auth(keys["trainer"])).json()["data"] == []
    assert post_job(client, keys, registry, "generate", nested={"sampling": {"max_new_tokens": 511}}).status_code == 201


# --- counts by settings: caps an admin can raise ---------------------------------------------------------

def test_counts_are_capped_by_settings_and_an_admin_can_raise_the_caps(keys, registry, monkeypatch, tiny_llama_dir):
    from api.app import create_app

    monkeypatch.setenv("BEAVER_MAX_JOB_SAMPLES", "10")
    monkeypatch.setenv("BEAVER_MAX_JOB_STEPS", "5")
    monkeypatch.setenv("BEAVER_MAX_JOB_BATCH", "8")
    clear_caches()
    with TestClient(create_app()) as client:  # noqa: F811
        # 4 prompts × 3 answers = 12 answers; × 2 models for evaluate.
        message = assert_422(post_job(client, keys, registry, "generate", {"samples_per_prompt": 3}),
                             "params.samples_per_prompt", "12 answers", "BEAVER_MAX_JOB_SAMPLES")
        assert "4 prompts" in message
        assert_422(post_job(client, keys, registry, "evaluate", {"samples_per_prompt": 2, "models": [
            registry["policy"], str(tiny_llama_dir)]}), "params.samples_per_prompt", "16 answers")
        assert_422(post_job(client, keys, registry, "generate", {"samples_per_prompt": 11}),
                   "params.samples_per_prompt", "≤ 10", "BEAVER_MAX_JOB_SAMPLES")
        # 3 epochs × ⌈4 records / 1⌉ = 12 optimizer steps; epochs and PPO's steps directly.
        assert_422(post_job(client, keys, registry, "sft", {"epochs": 3, "batch_size": 1}), "params.epochs",
                   "12 optimizer steps", "BEAVER_MAX_JOB_STEPS")
        assert_422(post_job(client, keys, registry, "dpo", {"epochs": 6}), "params.epochs", "BEAVER_MAX_JOB_STEPS")
        assert_422(post_job(client, keys, registry, "ppo_lag", {"steps": 6}), "params.steps", "BEAVER_MAX_JOB_STEPS")
        assert_422(post_job(client, keys, registry, "reward", {"batch_size": 9}), "params.batch_size",
                   "BEAVER_MAX_JOB_BATCH")
        assert_422(post_job(client, keys, registry, "ppo_lag", {"micro_batch_size": 9}), "params.micro_batch_size")
        assert post_job(client, keys, registry, "generate", {"samples_per_prompt": 2}).status_code == 201
    monkeypatch.setenv("BEAVER_MAX_JOB_SAMPLES", "12")
    clear_caches()
    with TestClient(create_app()) as client:  # noqa: F811
        assert post_job(client, keys, registry, "generate", {"samples_per_prompt": 3}).status_code == 201


# --- every other kind of bound: rates, strings, lists ----------------------------------------------------

BOUNDS = [  # (job type, params, nested params, the param the 422 names)
    ("generate", {"name": "n" * 201}, None, "params.name"),
    ("generate", {"chat_template": "{{ x }}" * 10_000}, None, "params.chat_template"),
    ("generate", {"seed": -1}, None, "params.seed"),
    ("generate", {"batch_size": 0}, None, "params.batch_size"),
    ("generate", None, {"sampling": {"top_k": 2 ** 40}}, "params.sampling.top_k"),
    ("generate", None, {"sampling": {"repetition_penalty": 1e9}}, "params.sampling.repetition_penalty"),
    ("sft", None, {"optim": {"lr": 5.0}}, "params.optim.lr"),
    ("sft", None, {"optim": {"max_grad_norm": 1e30}}, "params.optim.max_grad_norm"),
    ("sft", {"lora": {"r": 1_000_000}}, None, "params.lora.r"),
    ("sft", {"lora": {"target_modules": ["q_proj"] * 1000}}, None, "params.lora.target_modules"),
    ("sft", {"checkpoint_every": 10 ** 12}, None, "params.checkpoint_every"),
    ("dpo", {"beta": 1e12}, None, "params.beta"),
    ("ppo_lag", {"ppo_epochs": 10 ** 9}, None, "params.ppo_epochs"),
    ("ppo_lag", {"episode_cost_window": 10 ** 12}, None, "params.episode_cost_window"),
    ("ppo_lag", {"clip_range": 50.0}, None, "params.clip_range"),
    ("ppo_lag", {"gamma": 2.0}, None, "params.gamma"),
    ("evaluate", {"bootstrap": 10 ** 9}, None, "params.bootstrap"),
    ("evaluate", {"refusal_markers": ["sorry"] * 10_000}, None, "params.refusal_markers"),
    ("evaluate", {"refusal_markers": [""]}, None, "params.refusal_markers[0]"),
    ("evaluate", {"max_prompts": 10 ** 12}, None, "params.max_prompts"),
    ("dataset_stats", {"percentiles": [50, 150]}, None, "params.percentiles[1]"),
    ("dataset_stats", {"percentiles": [50] * 1000}, None, "params.percentiles"),
]


@pytest.mark.parametrize("job_type, params, nested, param", BOUNDS, ids=[b[3] for b in BOUNDS])
def test_each_bound_is_a_422_naming_the_param(client, keys, registry, job_type, params, nested, param):
    assert_422(post_job(client, keys, registry, job_type, params, nested), param)
    assert client.get("/v1/jobs", headers=auth(keys["trainer"])).json()["data"] == []


def test_the_bounds_are_in_the_params_reference_and_in_openapi(keys, monkeypatch):
    from api.app import create_app
    from models.jobs import params_markdown

    reference = params_markdown()
    rows = {}  # the first row of each name: `name` is a job's (a dataset's name), not a cost_models entry's
    for line in reference.splitlines():
        if line.startswith("| `"):
            rows.setdefault(line.split("|")[1].strip(), line)
    assert "BEAVER_MAX_JOB_TOKENS" in rows["`max_new_tokens`"] and "≤ 200 characters" in rows["`name`"]
    monkeypatch.setenv("BEAVER_MAX_JOB_TOKENS", "4096")
    clear_caches()
    with TestClient(create_app()) as client:  # noqa: F811
        spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    body = spec["components"]["schemas"][body["$ref"].split("/")[-1]] if "$ref" in body else body
    variants = {v["properties"]["type"]["const"]: v for v in body["oneOf"]}
    assert set(variants) >= {"generate", "evaluate", "sft", "dpo", "reward", "cost", "ppo_lag", "dataset_stats"}
    generate = variants["generate"]["properties"]["params"]
    assert generate["properties"]["sampling"]["properties"]["max_new_tokens"]["maximum"] == 4096  # the cap at start
    assert generate["properties"]["name"]["maxLength"] == 200 and generate["additionalProperties"] is False
    assert "model" in generate["required"]
    assert variants["generate"]["properties"]["world_size"]["maximum"] == 1  # one rank: 422 above it
    evaluate = variants["evaluate"]["properties"]["params"]["properties"]
    assert evaluate["models"]["maxItems"] == 16 and evaluate["models"]["items"]["maxLength"] == 1000
    assert variants["ppo_lag"]["properties"]["params"]["properties"]["objective"] == {
        "const": "lagrangian", "description": "Set by the job type (ppo_lag, ppo, ppo_shaping), not by params."}


# --- limit, NUL and OPTIONS: the schema and the server agree --------------------------------------------

def query_and_path_parameters(spec: dict):
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            for parameter in operation.get("parameters", []):
                if parameter["in"] in ("query", "path"):
                    yield path, method, parameter


def test_limit_is_declared_and_out_of_range_is_the_declared_422(client, keys):
    spec = client.get("/openapi.json").json()
    limits = [(path, p["schema"]) for path, _, p in query_and_path_parameters(spec) if p["name"] == "limit"]
    assert len(limits) == 5, limits
    for path, schema in limits:
        assert (schema["minimum"], schema["maximum"]) == (1, 1000), path
        assert "422" in spec["paths"][path]["get"]["responses"]
    h = auth(keys["viewer"])
    for url in ("/v1/jobs?limit=-1", "/v1/datasets?limit=0", "/v1/rounds?limit=1001", "/v1/jobs/job-x/events?limit=-5"):
        r = client.get(url, headers=h)
        assert r.status_code == 422 and r.json()["error"]["param"] == "limit", (url, r.text)
    assert client.get("/v1/jobs?limit=1000", headers=h).status_code == 200


def test_every_string_query_and_path_parameter_declares_no_nul(client, keys):
    import re

    spec = client.get("/openapi.json").json()
    strings = 0
    for path, method, parameter in query_and_path_parameters(spec):
        schema = parameter["schema"]
        for option in schema.get("anyOf", [schema]):
            if option.get("type") == "string":
                strings += 1
                pattern = option.get("pattern")
                assert pattern and re.fullmatch(pattern, "job-1") and not re.fullmatch(pattern, "a\x00b"), \
                    (method, path, parameter["name"])
    assert strings >= 15
    h = auth(keys["viewer"])
    for url, param in (("/v1/jobs?type=a%00b", "type"), ("/v1/models?kind=%00", "kind"), ("/v1/rounds?after=%00", "after")):
        r = client.get(url, headers=h)
        assert r.status_code == 422 and r.json()["error"]["param"] == param, r.text


def test_options_answers_the_methods_of_every_path(client):
    spec = client.get("/openapi.json").json()
    for path, operations in spec["paths"].items():
        url = path.replace("{", "").replace("}", "")  # any value of each path parameter
        r = client.options(url)
        assert r.status_code in (200, 204), (path, r.status_code, r.text)
        allowed = {m.strip() for m in r.headers["allow"].split(",")}
        assert allowed - {"OPTIONS", "HEAD"} == {m.upper() for m in operations}, (path, r.headers["allow"])
    r = client.request("PATCH", "/v1/jobs")  # a method the path lacks: 405 naming all it has
    assert r.status_code == 405 and set(r.headers["allow"].replace(" ", "").split(",")) >= {"GET", "POST"}


# --- no stalled request: a request the model cannot take up gets a 429 -----------------------------------

@pytest.mark.parametrize("route", ["score", "chat"])
def test_a_request_the_busy_model_cannot_take_up_is_a_429(keys, registry, monkeypatch, route):
    """The serving engine takes one request at a time here (one score item per batch, one generation
    group of one row) and its compute thread is held: of three concurrent requests one is taken up
    (and waits for the thread), the two others wait in the engine's queue. Before, they waited as long
    as the model stayed busy, with no 429 (256 clients on 2 cores: seconds past the queue timeout); now
    at most BEAVER_QUEUE_TIMEOUT_SECONDS, then 429 with Retry-After, and nothing of them runs."""
    from api.app import create_app
    from api.serving import get_pool

    monkeypatch.setenv("BEAVER_QUEUE_TIMEOUT_SECONDS", "0.2")
    clear_caches()
    h = auth(keys["viewer"])
    with TestClient(create_app()) as client:  # noqa: F811
        engine = get_pool().local
        engine.max_batch_size = engine.max_generate_batch = engine.max_generate_groups = 1
        r = client.post("/v1/rounds", headers=auth(keys["trainer"]), json={
            "name": "busy-v1", "policy": registry["policy"], "reward_model": registry["reward"],
            "cost_model": registry["cost"]})
        assert r.status_code == 201, r.text
        path, body = (("/v1/score", {"model": "busy-v1", "items": [{"prompt": "hi", "response": "hello ."}]})
                      if route == "score" else
                      ("/v1/chat/completions", {"model": "busy-v1", "max_tokens": 2, "temperature": 0,
                                                "messages": [{"role": "user", "content": "hi"}]}))
        assert client.post(path, json=body, headers=h).status_code == 200  # the model is loaded

        held, answers, answered = threading.Event(), [], threading.Condition()
        engine._compute.submit(held.wait, 120)  # the compute thread is busy until ``held`` is set

        def send():
            r = client.post(path, json=body, headers=h)
            with answered:
                answers.append(r)
                answered.notify_all()

        senders = [threading.Thread(target=send) for _ in range(3)]
        for t in senders:
            t.start()
        with answered:  # the two that wait are answered while the model is still busy (120 s: never here)
            answered.wait_for(lambda: len(answers) >= 2, timeout=120)
            refused = list(answers)
        held.set()
        for t in senders:
            t.join()
        assert len(refused) == 2, [r.status_code for r in answers]
        for r in refused:
            assert r.status_code == 429, r.text
            assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "rate_limited"
            assert "busy" in r.json()["error"]["message"]
        assert sorted(r.status_code for r in answers) == [200, 429, 429]  # the one taken up is served
        assert client.post(path, json=body, headers=h).status_code == 200


def test_a_requests_waits_share_one_queue_timeout(beaver_env, monkeypatch):  # noqa: F811
    """A POST to /v1/score waited for a session for its key check, then for another for its route, then
    for the model: each up to BEAVER_QUEUE_TIMEOUT_SECONDS, three in all before a 429. Now they spend one
    budget: once a wait used it up, later waits take what is free but wait for nothing."""
    import anyio

    from api.db import DatabaseBusy, acquire_slot, queue_budget, start_queue_budget

    monkeypatch.setenv("BEAVER_DB_POOL_SIZE", "1")
    monkeypatch.setenv("BEAVER_QUEUE_TIMEOUT_SECONDS", "0.05")
    clear_caches()

    async def request():
        start_queue_budget()
        assert queue_budget() == 0.05
        held = await acquire_slot()  # free: taken at once
        with pytest.raises(DatabaseBusy):
            await acquire_slot()  # waits out the whole budget
        assert queue_budget() == 0  # … so the model (api.serving) waits only the moment an idle one needs
        held.release()
        (await acquire_slot()).release()  # a free session is still taken

    anyio.run(request)
