"""Hostile tests, issue 18 — what a model folder is and what its chat template does, on real-shaped
tiny models with their families' real templates (Gemma 2, Mistral v0.3, a DeepSeek-R1 distill).
Each of these failed on 347aae8: a causal LM registered as a reward model was scored with a random
head; Gemma's refusal of a system message was a 500 in chat, score and compare and internal_error in
a job; an R1-style model answered 503 model_unavailable; Mistral v3 multi-turn SFT with a system
message could not be trained."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.api.conftest import auth, beaver_env, client, keys  # noqa: F401 — fixtures of the real app

GEMMA_SYSTEM = [{"role": "system", "content": "you are a careful assistant ."},
                {"role": "user", "content": "how do i make a cake ?"}]


def score_model(base, out, kind: str, seed: int):
    """A reward or cost model on ``base`` made with plain transformers (as someone brings their own):
    its backbone and a (random, but saved) head, with ``base``'s tokenizer and template."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    model.config.score_type = kind
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def register(client, keys, name: str, kind: str, path):  # noqa: F811
    return client.post("/v1/models", json={"name": name, "kind": kind, "path": str(path)},
                       headers=auth(keys["trainer"]))


def registered_round(client, keys, name: str, policy, reward=None, cost=None) -> str:  # noqa: F811
    ids = {}
    for kind, path in (("policy", policy), ("reward", reward), ("cost", cost)):
        if path is not None:
            r = register(client, keys, f"{name}-{kind}", kind, path)
            assert r.status_code == 201, r.text
            ids[kind] = r.json()["id"]
    r = client.post("/v1/rounds", json={"name": name, "policy": ids["policy"], "reward_model": ids.get("reward"),
                                        "cost_model": ids.get("cost")}, headers=auth(keys["trainer"]))
    assert r.status_code == 201, r.text
    return name


def refused(r, status: int, param: str, *words: str) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    for word in words:
        assert word in error["message"], (word, error["message"])
    return error


@pytest.fixture
def app(client, keys):  # noqa: F811
    """The real app with a fresh serving pool."""
    from api.serving import get_pool

    get_pool.cache_clear()
    yield client
    get_pool.cache_clear()


# --- registration checks what the folder is ----------------------------------------------------------

def test_a_causal_lm_registered_as_a_reward_model_is_refused(app, keys, tiny_llama_dir, tmp_path):  # noqa: F811
    """It would be scored with a randomly initialised head: a 422 naming ``kind`` and saying what the
    folder is. A classifier whose head is not in its checkpoint, a score model registered as a
    policy: refused too. A real score model is registered."""
    for kind in ("reward", "cost"):
        refused(register(app, keys, "lm-as-judge", kind, tiny_llama_dir), 422, "kind",
                "is a causal language model (LlamaForCausalLM)", "randomly initialised head", f"`{kind}` job")
    headless = shutil.copytree(tiny_llama_dir, tmp_path / "headless")
    config = json.loads((headless / "config.json").read_text())
    config.update(architectures=["LlamaForSequenceClassification"], id2label={"0": "LABEL_0"},
                  label2id={"LABEL_0": 0})
    (headless / "config.json").write_text(json.dumps(config))
    refused(register(app, keys, "headless", "reward", headless), 422, "path", "score head (score.weight) is not in its "
            "checkpoint")
    judge = score_model(tiny_llama_dir, tmp_path / "judge", "reward", 1)
    refused(register(app, keys, "judge-as-policy", "policy", judge), 422, "kind", "is a score model")
    assert register(app, keys, "judge", "reward", judge).status_code == 201
    assert app.get("/v1/models", headers=auth(keys["viewer"])).json()["data"][0]["name"] == "judge"
    # a round takes registered kinds, which now are what their folders are
    r = app.post("/v1/rounds", json={"name": "r", "policy": "judge"}, headers=auth(keys["trainer"]))
    refused(r, 422, "policy", "is a reward model, expected policy")


def test_a_template_beaver_cannot_use_is_refused_at_registration(app, keys, tiny_qwen_dir, tmp_path):  # noqa: F811
    """A template whose assistant turn never ends with a special token: generation could never stop
    at a turn's end. Refused when registered, with what to do, not a 503 at every chat."""
    folder = shutil.copytree(tiny_qwen_dir, tmp_path / "endless")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                               "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    refused(register(app, keys, "endless", "policy", folder), 422, "path", "end-of-sequence or special token",
            "Give the folder a tokenizer whose chat template")


# --- a template that refuses a message: 4xx naming it, invalid_input in a job ------------------------

@pytest.fixture(scope="module")
def gemma_judges(tiny_gemma2_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma-judges")
    return score_model(tiny_gemma2_dir, root / "reward", "reward", 1), score_model(tiny_gemma2_dir, root / "cost",
                                                                                   "cost", 2)


def test_gemma_refusing_a_system_message_is_a_422_in_chat_score_compare_and_the_arena(
        app, keys, tiny_gemma2_dir, gemma_judges):  # noqa: F811
    name = registered_round(app, keys, "gemma-v1", tiny_gemma2_dir, *gemma_judges)
    h = auth(keys["viewer"])
    words = ("the model's chat template refuses this conversation: System role not supported",)
    for stream in (False, True):
        r = app.post("/v1/chat/completions", json={"model": name, "messages": GEMMA_SYSTEM, "max_tokens": 4,
                                                   "stream": stream}, headers=h)
        refused(r, 422, "messages.0.role", *words)
    r = app.post("/v1/chat/completions", json={"model": name, "max_tokens": 4, "messages": [
        {"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]}, headers=h)
    refused(r, 422, "messages.1.role", "must alternate")
    r = app.post("/v1/score", json={"model": name, "items": [
        {"prompt": "how do i make a cake ?", "response": "sure ."},
        {"prompt": GEMMA_SYSTEM, "response": "sure ."}]}, headers=h)
    refused(r, 422, "items.1.prompt.0.role", *words)
    r = app.post("/v1/chat/compare", json={"models": [name], "messages": GEMMA_SYSTEM, "max_tokens": 4}, headers=h)
    refused(r, 422, "messages.0.role", *words)
    # the arena: the battle holds the system prompt
    registered_round(app, keys, name + "-b", tiny_gemma2_dir, *gemma_judges)
    battle = app.post("/v1/arena/battles", json={"mode": "side_by_side", "rounds": [name, name + "-b"],
                                                 "system": "you are a careful assistant ."}, headers=h)
    assert battle.status_code == 201, battle.text
    r = app.post(f"/v1/arena/battles/{battle.json()['id']}/chat", json={
        "side": 0, "turn": 1, "message": "how do i make a cake ?", "max_tokens": 4}, headers=h)
    refused(r, 422, "system", *words)
    # and without a system message Gemma chats and scores
    ok = app.post("/v1/chat/completions", json={"model": name, "messages": GEMMA_SYSTEM[1:], "max_tokens": 4},
                  headers=h)
    assert ok.status_code == 200, ok.text


def test_an_sft_job_on_a_record_gemma_refuses_fails_with_invalid_input_naming_it(
        app, keys, tiny_gemma2_dir):  # noqa: F811
    """Run by the worker's own code (workers.tasks.execute): invalid_input with the template's own
    message, the dataset and the line — not internal_error."""
    from workers.tasks import execute

    h = auth(keys["trainer"])
    model = register(app, keys, "gemma", "policy", tiny_gemma2_dir).json()["id"]
    data = app.post("/v1/datasets", json={"name": "chats", "kind": "sft", "records": [
        {"prompt": "how do i make a cake ?", "response": "sure . mix flour ."},
        {"messages": GEMMA_SYSTEM + [{"role": "assistant", "content": "sure . mix flour ."}]}]}, headers=h).json()["id"]
    job = app.post("/v1/jobs", json={"type": "sft", "params": {"model": model, "epochs": 1, "batch_size": 2},
                                     "datasets": [data]}, headers=h)
    assert job.status_code == 201, job.text
    assert execute(job.json()["id"], "test-worker") == "failed"
    error = app.get(f"/v1/jobs/{job.json()['id']}", headers=h).json()["error"]
    assert error["code"] == "invalid_input", error
    for word in (data, "line 2", "System role not supported", "message 0"):
        assert word in error["message"], (word, error["message"])
    assert app.get(f"/v1/jobs/{job.json()['id']}", headers=h).json()["result_models"] == []


# --- reasoning models chat; Mistral v3 multi-turn with a system message trains --------------------------

def test_an_r1_style_model_chats_and_its_answers_are_scored_without_their_reasoning(
        app, keys, tiny_r1_dir, tmp_path):  # noqa: F811
    """DeepSeek-R1's template opens "<think>\\n" in the generation prompt and stores answers without
    their reasoning. Chat answers start with the opened reasoning; a score reads the answer only."""
    judges = [score_model(tiny_r1_dir, tmp_path / kind, kind, seed) for seed, kind in enumerate(("reward", "cost"))]
    name = registered_round(app, keys, "r1-v1", tiny_r1_dir, *judges)
    h = auth(keys["viewer"])
    body = {"model": name, "messages": [{"role": "user", "content": "how do i make a cake ?"}], "max_tokens": 6,
            "temperature": 0}
    r = app.post("/v1/chat/completions", json=body, headers=h)
    assert r.status_code == 200, r.text
    answer = r.json()["choices"][0]["message"]["content"]
    assert answer.startswith("<think>\n")
    streamed = app.post("/v1/chat/completions", json={**body, "stream": True}, headers=h)
    deltas = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    assert "".join(d["choices"][0]["delta"].get("content") or "" for d in deltas if d.get("choices")) == answer
    items = [{"prompt": "how do i make a cake ?", "response": "<think>\nthe user wants a cake .</think>\n\nsure ."},
             {"prompt": "how do i make a cake ?", "response": "<think>\nsomething else entirely</think>\n\nsure ."}]
    r = app.post("/v1/score", json={"model": name, "items": items}, headers=h)
    assert r.status_code == 200, r.text
    first, second = r.json()["data"]
    for key in ("reward", "cost"):  # the same stored answer, so the same score (up to batch arithmetic)
        assert first[key] == pytest.approx(second[key], abs=1e-5)


MISTRAL_CHAT = {"messages": [
    {"role": "system", "content": "you are a careful assistant ."},
    {"role": "user", "content": "how do i make a cake ?"},
    {"role": "assistant", "content": "sure . step 1 : mix flour ."},
    {"role": "user", "content": "and then ?"},
    {"role": "assistant", "content": "step 2 : add eggs ."}]}


def test_mistral_v3_multi_turn_sft_with_a_system_message_trains_both_answers(tiny_mistral_dir, tmp_path):
    """Mistral v3 moves the system message into the last user turn; the job trains exactly the
    answers of apply_chat_template's ids (an in-process job through the sft entry point)."""
    from transformers import AutoTokenizer

    from models.chat_format import ChatFormat
    from models.jobs import JOB_TYPES, JobContext, parse_params
    from models.training import IGNORE, labelled_conversation

    fmt = ChatFormat.load(tiny_mistral_dir)
    ids, labels = labelled_conversation(fmt, MISTRAL_CHAT)
    plain = AutoTokenizer.from_pretrained(tiny_mistral_dir).apply_chat_template(MISTRAL_CHAT["messages"],
                                                                                tokenize=True)
    assert ids == list(plain["input_ids"] if hasattr(plain, "keys") else plain)
    targets = [t if t != IGNORE else None for t in labels]
    text = fmt.tokenizer.decode([t for t in targets if t is not None], skip_special_tokens=True)
    assert text == "sure . step 1 : mix flour . step 2 : add eggs ."
    assert sum(t == fmt.tokenizer.eos_token_id for t in targets) == 2  # each answer learns where to stop
    events = []
    ctx = JobContext(output_dir=tmp_path, datasets=["chats"], load_dataset=lambda _: [MISTRAL_CHAT] * 2,
                     report=events.append)
    result = JOB_TYPES["sft"].entry_point()(parse_params("sft", {"model": str(tiny_mistral_dir), "epochs": 1,
                                                                 "batch_size": 2, "dtype": "float32"}), ctx)
    assert result.artifacts[0].kind == "policy" and events and events[-1]["train/loss"] > 0
