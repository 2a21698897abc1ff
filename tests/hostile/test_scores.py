"""Hostile tests, issue 18 "every score is of the answer it claims": one per finding, each failing on
the code before the fix (347aae8).

- a conversation longer than a score model reads lost its answer (the cut kept the head and the
  turn close), so two answers to a long prompt got one score: /v1/score, evaluate, PPO's scorer,
  and a reward job on long prompts "succeeded" at accuracy 0;
- an sft job with no assistant token within max_length "succeeded" with loss 0;
- /v1/chat/compare scored each round with its own models;
- /v1/moderations needed a model;
- reward and cost jobs ignored checkpoint_every.
"""

from __future__ import annotations

import random

import pytest
import torch

from tests.api.conftest import auth, beaver_env, keys  # noqa: F401 — fixtures of the in-process app

LONG_PROMPT = "how do i make a cake ? " * 120  # ~720 words: longer than the tiny models' 512 positions
GOOD, BAD = "sure . step 1 : mix flour . step 2 : add eggs .", "sorry , i can not help with that ."


def save_head(base_dir, out_dir, score_type: str, seed: int):
    """A score model on the tiny Llama with a visible random head (a fresh one is near 0)."""
    from models.chat_format import ChatFormat
    from models.loading import load_score_model
    from models.score_model import save_score_model

    fmt = ChatFormat.load(base_dir)
    torch.manual_seed(seed)
    model = load_score_model(base_dir, fmt.tokenizer)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    return save_score_model(model, fmt, out_dir, score_type)


@pytest.fixture(scope="module")
def score_dirs(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-scores")
    return {name: save_head(tiny_llama_dir, root / name, name.split("-")[0], seed)
            for name, seed in (("reward-1", 3), ("cost-1", 4), ("reward-2", 5), ("cost-2", 6))}


@pytest.fixture
def app(keys, tiny_llama_dir, score_dirs):  # noqa: F811
    """The in-process app with a policy, two reward and two cost models, and two rounds:
    beaver-v1 (reward-1, cost-1) and, newer, beaver-v2 (reward-2, cost-2), both on the same policy."""
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.serving import get_pool

    get_pool.cache_clear()
    with TestClient(create_app()) as client:
        ids = {}
        for name, kind, path in (("policy", "policy", tiny_llama_dir), *((n, n.split("-")[0], p)
                                                                         for n, p in score_dirs.items())):
            r = client.post("/v1/models", json={"name": name, "kind": kind, "path": str(path)},
                            headers=auth(keys["trainer"]))
            assert r.status_code == 201, r.text
            ids[name] = r.json()["id"]
        for v in (1, 2):
            r = client.post("/v1/rounds", json={"name": f"beaver-v{v}", "policy": ids["policy"],
                                                "reward_model": ids[f"reward-{v}"], "cost_model": ids[f"cost-{v}"]},
                            headers=auth(keys["trainer"]))
            assert r.status_code == 201, r.text
        client.ids = ids
        yield client
    get_pool.cache_clear()


# --- a score model always sees its answer ----------------------------------------------------------

def test_two_answers_to_a_long_prompt_get_different_scores_through_v1_score(app, keys):  # noqa: F811
    r = app.post("/v1/score", json={"model": "beaver-v1", "items": [
        {"prompt": LONG_PROMPT, "response": GOOD}, {"prompt": LONG_PROMPT, "response": BAD}]},
        headers=auth(keys["viewer"]))
    assert r.status_code == 200, r.text
    first, second = r.json()["data"]
    assert abs(first["reward"] - second["reward"]) > 1e-3 and abs(first["cost"] - second["cost"]) > 1e-3


def test_an_answer_longer_than_the_score_model_reads_is_a_422_naming_it(app, keys):  # noqa: F811
    r = app.post("/v1/score", json={"model": "beaver-v1", "items": [
        {"prompt": "hi", "response": GOOD}, {"prompt": "hi", "response": GOOD}, {"prompt": "", "response": LONG_PROMPT}]},
        headers=auth(keys["viewer"]))
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == "items.2.response" and "reads at most 512" in error["message"]


def test_evaluate_scores_each_answer_to_a_long_prompt_not_the_prompt(tiny_llama_dir, score_dirs, tmp_path):
    """Two policies answer one long prompt differently: the reference models must score the answers."""
    from models.evaluate import EvaluateConfig, run
    from models.generation import SamplingConfig
    from models.jobs import JobContext
    from models.tiny import build_tiny_llama
    from tests.conftest import TINY_CORPUS

    other = build_tiny_llama(tmp_path / "other", TINY_CORPUS, seed=1)
    config = EvaluateConfig(models=[str(tiny_llama_dir), str(other)], reward_model=str(score_dirs["reward-1"]),
                            cost_model=str(score_dirs["cost-1"]), max_length=64, bootstrap=0, samples_per_prompt=2,
                            sampling=SamplingConfig(temperature=1.0, max_new_tokens=8))
    (tmp_path / "out").mkdir()
    run(config, JobContext(output_dir=tmp_path / "out", datasets=["p"],
                           load_dataset=lambda d: [{"prompt": "how do i make a cake ? " * 40}]))
    import json

    rows = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and len({r["response"] for r in rows}) == 4  # four different answers …
    assert len({round(r["reward"], 6) for r in rows}) == 4  # … four different scores
    assert len({round(r["cost"], 6) for r in rows}) == 4


def test_ppo_scores_the_rollouts_answer_when_the_conversation_is_cut(tiny_llama_dir, score_dirs):
    """Two rollouts of one long prompt that differ in their answer's last word read as two conversations."""
    from models.chat_format import ChatFormat
    from models.loading import load_score_model
    from models.ppo_lag import Rollout, ScoreModelScorer

    fmt = ChatFormat.load(tiny_llama_dir)
    prompt = fmt.prompt_ids("how do i make a cake ? " * 20)
    answers = [fmt.encode(" sure . mix flour"), fmt.encode(" sure . mix eggs")]
    rollout = Rollout(prompts=[None, None], prompt_ids=[prompt, prompt], response_ids=answers,
                      responses=["sure . mix flour", "sure . mix eggs"])
    scorer = ScoreModelScorer(load_score_model(score_dirs["reward-1"], fmt.tokenizer), fmt, fmt, max_length=48)
    first, second = scorer.inputs(rollout)
    tail = len(fmt.turn_close + fmt.turn_suffix)
    assert len(first) == 48 and first != second and first[-tail - 1] == answers[0][-1]
    reward = scorer.score_rollout(rollout)
    assert abs(reward[0] - reward[1]) > 1e-4


def long_prompt_pairs(n: int, seed: int = 0) -> list[dict]:
    """Separable preference pairs whose prompts are far longer than the job's max_length: the better
    answer says "good"/"safe"/"yes", the other "bad"/"unsafe"/"no"."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        good = " ".join(rng.choice(["good", "safe", "yes"]) for _ in range(rng.randint(2, 5)))
        bad = " ".join(rng.choice(["bad", "unsafe", "no"]) for _ in range(rng.randint(2, 5)))
        b = rng.randint(0, 1)
        records.append({"prompt": " ".join(rng.choices("red green blue one two three four five".split(), k=80)),
                        f"response_{b}": good, f"response_{1 - b}": bad, f"is_response_{b}_safe": True,
                        f"is_response_{1 - b}_safe": False, "better_response_id": b, "safer_response_id": b})
    return records


def test_a_reward_job_on_long_prompts_learns_the_answers(tiny_llama_dir, tmp_path):
    from models.jobs import JobContext, parse_params
    from models.score_training import run_reward

    config = parse_params("reward", {"model": str(tiny_llama_dir), "epochs": 4, "batch_size": 8, "eval_split": 0.0,
                                     "max_length": 32, "optim": {"lr": 2e-3, "warmup_ratio": 0.0}})
    result = run_reward(config, JobContext(output_dir=tmp_path, datasets=["d"],
                                           load_dataset=lambda d: long_prompt_pairs(32)))
    assert result.metrics["train_eval/accuracy"] >= 0.9


# --- sft with nothing to learn ----------------------------------------------------------------------

def test_sft_with_no_assistant_token_within_max_length_is_invalid_input(tiny_llama_dir, tmp_path):
    from models.jobs import JobContext
    from models.sft import SFTConfig, run
    from workers.tasks import error_object

    records = [{"prompt": "how do i make a cake ? " * 10, "response": GOOD} for _ in range(4)]
    with pytest.raises(ValueError) as failure:
        run(SFTConfig(model=str(tiny_llama_dir), max_length=16, epochs=1, batch_size=2),
            JobContext(output_dir=tmp_path, datasets=["d"], load_dataset=lambda d: records))
    error = error_object(failure.value)
    assert error["code"] == "invalid_input" and "none of the 4" in error["message"] and "max_length 16" in error["message"]
    assert not (tmp_path / "policy").exists()  # no copy of the base registered


# --- compare and moderations use one reference pair --------------------------------------------------

def test_compare_scores_every_round_with_one_reference_pair(app, keys):  # noqa: F811
    r = app.post("/v1/chat/compare", json={"models": ["beaver-v1", "beaver-v2"], "temperature": 0, "max_tokens": 6,
                                           "messages": [{"role": "user", "content": "how do i make a cake ?"}]},
                 headers=auth(keys["viewer"]))
    assert r.status_code == 200, r.text
    body = r.json()
    a, b = body["answers"]
    assert a["message"]["content"] == b["message"]["content"]  # one policy, greedy: one answer …
    assert a["reward"] == pytest.approx(b["reward"], abs=1e-5)  # … one pair: one score
    assert a["cost"] == pytest.approx(b["cost"], abs=1e-5)
    # the newest round with both models is the reference, and the response says so
    assert body["judges"] == "beaver-v2" and a["reward_model"] == b["reward_model"] == app.ids["reward-2"]
    assert body["cost_model"] == app.ids["cost-2"]


def test_moderations_without_a_model_use_the_reference_pair(app, keys):  # noqa: F811
    r = app.post("/v1/moderations", json={"input": ["sorry , i can not help with that .", "bad unsafe"]},
                 headers=auth(keys["viewer"]))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "beaver-v2" and body["cost_model"] == app.ids["cost-2"]
    explicit = app.post("/v1/moderations", json={"model": "beaver-v2", "input": ["sorry , i can not help with that .",
                                                                                 "bad unsafe"]},
                        headers=auth(keys["viewer"])).json()
    assert [x["cost"] for x in body["results"]] == pytest.approx([x["cost"] for x in explicit["results"]], abs=1e-5)


# --- reward and cost checkpoints -----------------------------------------------------------------------

def test_a_resumed_reward_job_ends_with_the_weights_of_an_uninterrupted_one(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file

    from models.jobs import JobContext, parse_params
    from models.score_training import run_reward
    from tests.integration.test_platform import preference_records

    params = {"model": str(tiny_llama_dir), "epochs": 2, "batch_size": 8, "eval_split": 0.0, "checkpoint_every": 3,
              "log_every": 1, "dtype": "float32", "optim": {"lr": 1e-3, "warmup_ratio": 0.0}}
    records = preference_records(32)

    def job(out, resume_from=None):
        events = []
        run_reward(parse_params("reward", params), JobContext(
            output_dir=out, datasets=["d"], load_dataset=lambda d: records, report=events.append,
            resume_from=resume_from))
        return events

    whole = job(tmp_path / "whole")  # 32 pairs / 8 × 2 epochs = 8 steps, checkpoints at 3 and 6
    checkpoints = [e["checkpoint"] for e in whole if "checkpoint" in e]
    assert [c.rsplit("-", 1)[1] for c in checkpoints] == ["3", "6"]
    resumed = job(tmp_path / "resumed", resume_from=checkpoints[0])  # killed after step 3
    assert min(e["step"] for e in resumed if "train/loss" in e) == 4
    a, b = load_file(str(tmp_path / "whole" / "model" / "model.safetensors")), \
        load_file(str(tmp_path / "resumed" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
