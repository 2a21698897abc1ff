"""The ``evaluate`` job through the REST API and a real worker (issue 13): two rounds answer a
prompt dataset, one reference pair (the newest round's, filled in by the API) scores every answer, an
external OpenAI-compatible judge — a stub server here, the one thing not Beaver — judges safety with
retries; the results come back as metrics, a JSON report and a plot over the files routes, and the
answers as a samples dataset; the same job run again (another judge concurrency) gives the same
samples; the leaderboard shows it. The judge is an endpoint the platform's admin named in
BEAVER_ENDPOINTS (issue 18): the job names it, the worker sends the admin's key to the admin's URL."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from tests.integration.conftest import _free_port
from tests.integration.test_platform import upload

pytestmark = pytest.mark.integration

PROMPTS = [{"prompt": "how do i make a cake ?", "red_team": False}, {"prompt": "red green blue", "red_team": True},
           {"prompt": "what is the capital of france ?", "red_team": False},
           {"prompt": "the quick brown fox", "red_team": True}]
GUARD_KEY = "sk-guard-test-key"


class Judge:
    """A stub OpenAI-compatible guard model: "unsafe" when the judged answer holds an odd number of
    words; the first request after each ``reset`` fails with 503 (the job must retry), and a request
    without the admin's key gets 401."""

    def __init__(self):
        self.requests, self.port = [], _free_port()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.requests.append(body)
                if self.headers.get("Authorization") != f"Bearer {GUARD_KEY}" or len(judge.requests) == 1:
                    self.send_response(503 if len(judge.requests) == 1 else 401)
                    self.end_headers()
                    return
                answer = body["messages"][0]["content"].split("Assistant: ", 1)[1].split("\nReply", 1)[0]
                verdict = "unsafe" if len(answer.split()) % 2 else "safe"
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": verdict}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def reset(self) -> "Judge":
        self.requests = []
        return self

    @staticmethod
    def unsafe(answer: str) -> bool:
        return len(answer.split()) % 2 == 1


@pytest.fixture(scope="module")
def judge():
    judge = Judge()
    yield judge
    judge.server.shutdown()


@pytest.fixture(scope="module")
def platform_env(judge) -> dict:
    """The platform's admin names the judge: its URL, model and key live in the API's and the worker's
    settings, never in a job."""
    return {"BEAVER_ENDPOINTS": json.dumps({"guard": {"url": f"http://127.0.0.1:{judge.port}/v1",
                                                      "model": "guard-model", "api_key": GUARD_KEY}})}


@pytest.fixture(scope="module")
def rounds(platform, tiny_llama_dir, tmp_path_factory) -> dict:
    """r1 (the tiny policy) and r2 (another tiny policy, newer: its judges are the default)."""
    from models.chat_format import ChatFormat
    from models.loading import load_score_model
    from models.score_model import save_score_model
    from models.tiny import build_tiny_llama
    from tests.conftest import TINY_CORPUS

    root = tmp_path_factory.mktemp("evaluate-models")
    policies = {"r1": tiny_llama_dir, "r2": build_tiny_llama(root / "policy-2", TINY_CORPUS, seed=7)}
    fmt, ids = ChatFormat.load(tiny_llama_dir), {}
    for seed, kind in ((1, "reward"), (2, "cost")):
        torch.manual_seed(seed)
        path = save_score_model(load_score_model(tiny_llama_dir, fmt.tokenizer), fmt, root / kind, kind)
        ids[kind] = platform.client.post("/v1/models", json={"name": f"eval-{kind}", "kind": kind,
                                                             "path": str(path)}).json()["id"]
    for name, path in policies.items():
        policy = platform.client.post("/v1/models", json={"name": f"{name}-policy", "kind": "policy",
                                                          "path": str(path)}).json()["id"]
        r = platform.client.post("/v1/rounds", json={"name": f"{name}-{platform.name}", "policy": policy,
                                                     "reward_model": ids["reward"], "cost_model": ids["cost"]})
        assert r.status_code == 201, r.text
    return ids


def evaluate(platform, dataset: str, concurrency: int, batch_size: int = 32) -> dict:
    r = platform.client.post("/v1/jobs", json={"type": "evaluate", "datasets": [dataset], "params": {
        "models": [f"r1-{platform.name}", f"r2-{platform.name}"], "samples_per_prompt": 2, "bootstrap": 200,
        "batch_size": batch_size,
        "sampling": {"temperature": 1.0, "max_new_tokens": 8},
        "judge": {"endpoint": "guard", "concurrency": concurrency, "retries": 2}}})
    assert r.status_code == 201, r.text
    job = platform.wait_job(r.json()["id"], timeout=300)
    assert job["status"] == "succeeded", job
    return job


def test_an_evaluation_of_two_rounds_with_an_external_judge(platform, rounds, judge):
    p = platform
    dataset = upload(p, PROMPTS, kind="prompt", name="eval-prompts")
    judge.reset()
    job = evaluate(p, dataset, concurrency=4)
    r1, r2 = f"r1-{p.name}", f"r2-{p.name}"
    assert (job["params"]["reward_model"], job["params"]["cost_model"]) == (rounds["reward"], rounds["cost"])

    samples = [r["data"] for r in p.client.get(f"/v1/datasets/{job['result_datasets'][0]}/records?limit=100")
               .json()["data"]]
    assert len(samples) == 2 * len(PROMPTS) * 2 and {s["policy"] for s in samples} == {r1, r2}
    assert all(s["judge_unsafe"] == Judge.unsafe(s["response"]) for s in samples)
    assert len(judge.requests) == len(samples) + 1  # one retried after the 503; every one with the admin's key
    assert {r["model"] for r in judge.requests} == {"guard-model"}

    files = {f["name"] for f in p.client.get(f"/v1/jobs/{job['id']}/files").json()["data"]}
    assert {"attempt-1/evaluation.json", "attempt-1/evaluation.png"} <= files
    report = p.client.get(f"/v1/jobs/{job['id']}/files/attempt-1/evaluation.json").json()
    for name in (r1, r2):
        mine = [s for s in samples if s["policy"] == name]
        stats = report["models"][name]["all"]
        assert stats["harmful_ratio"]["mean"] == pytest.approx(sum(s["cost"] > 0 for s in mine) / len(mine))
        assert stats["judge_harmful_ratio"]["mean"] == pytest.approx(sum(s["judge_unsafe"] for s in mine) / len(mine))
        assert stats["reward"]["ci"][0] <= stats["reward"]["mean"] <= stats["reward"]["ci"][1]
        assert report["models"][name]["red_team"]["answers"] == 4
        assert job["metrics"][f"{name}/harmful_ratio"] == stats["harmful_ratio"]["mean"]
    pair = report["pairs"][f"{r1} vs {r2}"]
    assert sum(pair["table"].values()) == pytest.approx(1.0)
    assert pair["helpfulness_win_rate"] + report["pairs"][f"{r2} vs {r1}"]["helpfulness_win_rate"] == pytest.approx(1.0)

    # The same job, sampled and scored 3 prompts at a time instead of all at once and judged one request
    # at a time: every answer is the same (a row's draws depend on the seed and its index alone).
    judge.reset()
    again = evaluate(p, dataset, concurrency=1, batch_size=3)
    samples_again = [r["data"] for r in p.client.get(f"/v1/datasets/{again['result_datasets'][0]}/records?limit=100")
                     .json()["data"]]
    assert [(s["policy"], s["prompt"], s["response"]) for s in samples_again] == \
        [(s["policy"], s["prompt"], s["response"]) for s in samples]
    assert len({s["response"] for s in samples}) > 2  # sampled answers, not one repeated string
    for a, b in zip(samples_again, samples):
        assert (a["reward"], a["cost"]) == pytest.approx((b["reward"], b["cost"]), abs=1e-5)

    board = p.client.get("/v1/leaderboard").json()["evaluations"]
    assert board[0]["job"] == again["id"] and [m["name"] for m in board[0]["models"]] == [r1, r2]
    assert [m["red_team_harmful_ratio"] for m in board[0]["models"]] == \
        [again["metrics"][f"{name}/red_team/harmful_ratio"] for name in (r1, r2)]


def test_evaluate_refuses_what_cannot_work(platform, rounds):
    p = platform
    dataset = upload(p, PROMPTS, kind="prompt", name="eval-prompts-bad")
    for params, param in (({"models": []}, "params.models"), ({"models": ["nope"]}, "params.models[0]"),
                          ({"models": [f"r1-{p.name}"], "judge": {"url": "http://x"}}, "params.judge.url"),
                          ({"models": [f"r1-{p.name}"], "judge": {"endpoint": "nope"}}, "params.judge.endpoint")):
        r = p.client.post("/v1/jobs", json={"type": "evaluate", "datasets": [dataset], "params": params})
        assert r.status_code == 422 and r.json()["error"]["param"] == param, r.text
