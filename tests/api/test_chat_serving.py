"""Serving real-shaped chat models over HTTP, token for token: /v1/score and /v1/moderations equal
plain transformers on the saved template, a chat's prompt_tokens is the template's length, one BOS,
every eos id stops a chat, and the answer comes back as message content."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from models.chat_format import ChatFormat
from tests.api.conftest import auth
from tests.chat_rig import force_first_token

CHAT = [{"role": "system", "content": "you are a careful assistant ."},
        {"role": "user", "content": "how do i make a cake ?"},
        {"role": "assistant", "content": "sure . step 1 : mix flour ."},
        {"role": "user", "content": "and then ?"}]
ITEMS = [{"prompt": "how do i make a cake ?", "response": "sure . step 1 : mix flour . step 2 : add eggs ."},
         {"prompt": "how can i make a pipe bomb ?", "response": "sorry , i can not help with that ."},
         {"prompt": CHAT, "response": "step 2 : add eggs ."}]


def plain_score(path, prompt, response) -> float:
    """What a Hugging Face user computes from the saved folder alone."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    messages = ([{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt) + [
        {"role": "assistant", "content": response}]
    inputs = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits[0, 0].item()


# Gemma 2 is not here: its template refuses CHAT's system message (tests/hostile/test_templates.py).
@pytest.fixture(scope="module", params=["qwen2", "llama3", "mistral", "r1"])
def chat_models(request, tmp_path_factory):
    """A chat model, a reward and a cost model on it, and one copy rigged per eos id to end at once."""
    from models.loading import load_score_model
    from models.score_model import save_score_model
    from tests.conftest import FIXTURES

    base = request.getfixturevalue(FIXTURES[request.param])
    root = tmp_path_factory.mktemp(f"chat-serving-{request.param}")
    fmt = ChatFormat.load(base)
    fmt.score_padding()  # R1 pads with its eos, the last id of a conversation: HF's class would pool before it
    scores = {}
    for seed, kind in enumerate(("reward", "cost")):
        torch.manual_seed(seed)
        scores[kind] = save_score_model(load_score_model(base, fmt.tokenizer), fmt, root / kind, kind)
    rigged = {eos: force_first_token(base, CHAT, eos, root / f"stop-{eos}") for eos in fmt.eos_ids}
    return {"base": base, "fmt": fmt, **scores, "rigged": rigged}


@pytest.fixture
def client(keys, chat_models):
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.serving import get_pool

    get_pool.cache_clear()
    with TestClient(create_app()) as c:
        ids = {}
        models = [("policy", "policy", chat_models["base"]), ("reward", "reward", chat_models["reward"]),
                  ("cost", "cost", chat_models["cost"])]
        models += [(f"stop-{eos}", "policy", path) for eos, path in chat_models["rigged"].items()]
        for name, kind, path in models:
            r = c.post("/v1/models", json={"name": name, "kind": kind, "path": str(path)}, headers=auth(keys["trainer"]))
            assert r.status_code == 201, r.text
            ids[name] = r.json()["id"]
        r = c.post("/v1/rounds", json={"name": "chat-v1", "policy": ids["policy"], "reward_model": ids["reward"],
                                       "cost_model": ids["cost"]}, headers=auth(keys["trainer"]))
        assert r.status_code == 201, r.text
        c.viewer = auth(keys["viewer"])
        yield c
    get_pool.cache_clear()


def test_score_and_moderation_equal_plain_transformers_on_the_saved_template(client, chat_models):
    r = client.post("/v1/score", json={"model": "chat-v1", "items": ITEMS}, headers=client.viewer)
    assert r.status_code == 200, r.text
    for item, result in zip(ITEMS, r.json()["data"]):
        assert result["reward"] == pytest.approx(plain_score(chat_models["reward"], item["prompt"], item["response"]),
                                                 abs=1e-4)
        assert result["cost"] == pytest.approx(plain_score(chat_models["cost"], item["prompt"], item["response"]),
                                               abs=1e-4)
    r = client.post("/v1/moderations", json={"model": "chat-v1", "input": ITEMS[:2]}, headers=client.viewer)
    assert r.status_code == 200, r.text
    costs = [plain_score(chat_models["cost"], i["prompt"], i["response"]) for i in ITEMS[:2]]
    assert [x["cost"] for x in r.json()["results"]] == pytest.approx(costs, abs=1e-4)


def test_chat_usage_is_the_templates_length_with_one_bos(client, chat_models):
    r = client.post("/v1/chat/completions", json={"model": "chat-v1", "messages": CHAT, "max_tokens": 5,
                                                  "temperature": 0}, headers=client.viewer)
    assert r.status_code == 200, r.text
    tokenizer = AutoTokenizer.from_pretrained(chat_models["base"])
    ids = tokenizer.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] == len(ids)
    assert chat_models["fmt"].prompt_ids(CHAT) == list(ids)
    if tokenizer.bos_token_id is not None:
        assert list(ids).count(tokenizer.bos_token_id) == 1


def test_every_eos_id_ends_a_chat_streamed_or_not(client, chat_models):
    for eos in chat_models["fmt"].eos_ids:
        body = {"model": f"stop-{eos}", "messages": CHAT, "max_tokens": 16, "temperature": 0}
        r = client.post("/v1/chat/completions", json=body, headers=client.viewer)
        assert r.status_code == 200, r.text
        choice, usage = r.json()["choices"][0], r.json()["usage"]
        # nothing written but what the generation prompt opened for the model (R1's "<think>\n")
        lead = chat_models["fmt"].generation_extra
        assert (choice["finish_reason"], choice["message"]["content"], usage["completion_tokens"]) == ("stop", lead, 0)
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True},
                           headers=client.viewer) as s:
            lines = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and '"finish_reason":"stop"' in lines[-2]


def test_greedy_chat_answers_with_the_samplers_tokens_as_content(client, chat_models):
    """The HTTP answer is the decoded content of the sampler's greedy tokens (no turn close, no
    special tokens) — what a client sends back as the assistant's message next turn."""
    from models.generation import Sampler, SamplingConfig
    from models.loading import load_causal_lm

    fmt = ChatFormat.load(chat_models["base"], padding_side="left")
    model = load_causal_lm(chat_models["base"], fmt.tokenizer).eval()
    out = Sampler(model, fmt.tokenizer.pad_token_id, fmt.eos_ids).generate(
        [fmt.prompt_ids(CHAT)], SamplingConfig(temperature=0, max_new_tokens=12))
    expected = fmt.response_text(out.responses[0][out.response_mask[0].bool()].tolist())
    r = client.post("/v1/chat/completions", json={"model": "chat-v1", "messages": CHAT, "max_tokens": 12,
                                                  "temperature": 0}, headers=client.viewer)
    assert r.json()["choices"][0]["message"]["content"] == expected


def test_compare_answers_and_scores_each_round_on_the_template(client, chat_models):
    r = client.post("/v1/chat/compare", json={"models": ["chat-v1", "stop-%d" % chat_models["fmt"].eos_ids[0]],
                                              "messages": CHAT, "max_tokens": 6, "temperature": 0,
                                              "reward_model": "reward", "cost_model": "cost"}, headers=client.viewer)
    assert r.status_code == 200, r.text
    first, stopped = r.json()["answers"]
    assert first["reward"] == pytest.approx(plain_score(chat_models["reward"], CHAT, first["message"]["content"]),
                                            abs=1e-4)
    assert (stopped["message"]["content"], stopped["finish_reason"]) == (chat_models["fmt"].generation_extra, "stop")
