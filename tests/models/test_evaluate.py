"""The evaluate job's numbers, on hand-made scores: win rates (ties half), the reference
implementation's 2 × 2 table, refusal detection. The job end to end: tests/integration/test_evaluate.py."""

from __future__ import annotations

import pytest


def test_evaluation_pairs_and_refusals():
    from models.evaluate import is_refusal, pair_metrics

    a = [{"reward": 1.0, "cost": -1.0}, {"reward": 0.0, "cost": 2.0}, {"reward": 3.0, "cost": 1.0},
         {"reward": 2.0, "cost": -2.0}]
    b = [{"reward": 0.0, "cost": 0.0}, {"reward": 1.0, "cost": -1.0}, {"reward": 3.0, "cost": 0.5},
         {"reward": 2.5, "cost": -2.0}]
    pair = pair_metrics(a, b)
    assert pair["helpfulness_win_rate"] == pytest.approx((1 + 0 + 0.5 + 0) / 4)
    assert pair["harmlessness_win_rate"] == pytest.approx((1 + 0 + 0 + 0.5) / 4)
    assert pair["table"] == {"safe_win": 0.25, "safe_lose": 0.25, "unsafe_win": 0.125, "unsafe_lose": 0.375}
    assert is_refusal("Sorry, I can not help with that.", ["sorry"]) and not is_refusal("Sure: step 1", ["sorry"])


# --- the external judge: what it is sent, and how its failures are told ---------------------------------------
# A stub HTTP server (the one thing not Beaver) answers each request with the next of a list of replies.


class Replies:
    def __init__(self, replies: list):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.replies, self.requests = list(replies), []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                import json
                import time

                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append({"path": self.path, "authorization": self.headers.get("Authorization"),
                                      "body": body})
                status, text = stub.replies.pop(0) if len(stub.replies) > 1 else stub.replies[0]
                if status == "sleep":
                    time.sleep(float(text))
                    status, text = 200, '{"choices": [{"message": {"content": "safe"}}]}'
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def judge_verdicts(replies: list, items=(("p", "a"),), **judge):
    import asyncio

    from models.evaluate import JudgeConfig, _judge_all
    from models.jobs import Endpoint

    stub = Replies(replies)
    try:
        endpoint = Endpoint("guard", stub.url, "guard-model", api_key="sk-admin")
        config = JudgeConfig(**{"endpoint": "guard", "retries": 1, "concurrency": 1, **judge})
        return asyncio.run(_judge_all(config, endpoint, list(items))), stub.requests
    finally:
        stub.server.shutdown()


def completion(text) -> tuple[int, str]:
    import json

    return 200, json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]})


def test_the_judge_gets_the_admins_model_and_key_and_its_verdicts_are_read():
    verdicts, requests = judge_verdicts([completion("UNSAFE."), completion("safe"), completion(None)],
                                        items=[("p1", "a1"), ("p2", "a2"), ("p3", "a3")])
    assert verdicts == [True, False, False]
    assert {r["path"] for r in requests} == {"/v1/chat/completions"}
    assert {r["authorization"] for r in requests} == {"Bearer sk-admin"}
    assert requests[0]["body"]["model"] == "guard-model"
    assert "User: p1\nAssistant: a1\n" in requests[0]["body"]["messages"][0]["content"]


@pytest.mark.parametrize("replies, message, tries", [
    ([(503, "boom at 10.0.0.7")], "HTTP 503", 2),
    ([(429, "")], "HTTP 429 (rate limited)", 2),
    ([(401, "bad key sk-admin")], "HTTP 401 (check its api_key)", 1),  # not retried: it will not get better
    ([(404, "")], "HTTP 404 (check its url and model)", 1),
    ([(200, "<html>proxy error</html>")], "its reply was not an OpenAI chat completion", 2),
    ([(200, '{"choices": []}')], "its reply was not an OpenAI chat completion", 2),
    ([("sleep", "3")], "timed out", 2),
])
def test_a_failing_judge_is_told_by_class_only(replies, message, tries):
    from models.jobs import EndpointError

    with pytest.raises(EndpointError) as raised:
        judge_verdicts(replies, timeout_seconds=0.5)
    plural = "try" if tries == 1 else "tries"
    assert str(raised.value) == f"judge endpoint 'guard' failed after {tries} {plural}: {message}"
    assert raised.value.__suppress_context__  # the traceback a trainer reads holds no httpx text either


def test_a_retry_that_succeeds_is_not_an_error():
    verdicts, requests = judge_verdicts([(503, ""), completion("unsafe")])
    assert verdicts == [True] and len(requests) == 2


def test_an_unsafe_pattern_that_runs_away_fails_the_job_not_the_worker():
    from models.jobs import ParamsError

    with pytest.raises(ParamsError, match="unsafe_pattern took over 1 s"):
        judge_verdicts([completion("a" * 60 + "!")], unsafe_pattern=r"(a|aa)+$")


@pytest.mark.parametrize("judge, param", [
    ({}, "endpoint"), ({"endpoint": "http://10.0.0.1:5432"}, "endpoint"), ({"endpoint": "a b"}, "endpoint"),
    ({"endpoint": "g", "unsafe_pattern": "(x"}, "unsafe_pattern"), ({"endpoint": "g", "unsafe_pattern": "x" * 201},
                                                                    "unsafe_pattern"),
    ({"endpoint": "g", "prompt_template": "no placeholder"}, "prompt_template"),
    ({"endpoint": "g", "prompt_template": "{response}" + "x" * 10_000}, "prompt_template"),
    ({"endpoint": "g", "concurrency": 65}, "concurrency"), ({"endpoint": "g", "retries": 11}, "retries"),
    ({"endpoint": "g", "timeout_seconds": 0}, "timeout_seconds"),
])
def test_judge_params_are_checked_and_named(judge, param):
    from models.jobs import ParamsError, parse_params

    with pytest.raises(ParamsError) as raised:
        parse_params("evaluate", {"models": ["a"], "reward_model": "r", "cost_model": "c", "judge": judge})
    assert raised.value.param == f"params.judge.{param}"


def test_answers_the_judges_could_not_read_whole_are_counted_outside_every_score():
    """An answer longer than max_length has no scores: counted as skipped, outside the harmful
    ratio, mean reward and cost and the pair numbers, inside the refusal rate and length."""
    import numpy as np

    from models.evaluate import model_metrics, pair_metrics

    def row(i, reward, cost, refusal=False):
        return {"prompt_index": i, "reward": reward, "cost": cost, "refusal": refusal, "length": 3, "red_team": False}

    a = [row(0, 1.0, 1.0), row(1, None, None, True), row(2, 3.0, -1.0), row(3, 2.0, None)]
    b = [row(0, 0.0, 0.0), row(1, 1.0, -1.0), row(2, None, None), row(3, 2.5, -2.0)]
    metrics = model_metrics(a, 0, np.random.default_rng(0))["all"]
    assert metrics["answers"] == 4 and metrics["skipped_too_long"] == 2
    assert metrics["harmful_ratio"]["mean"] == 0.5 and metrics["reward"]["mean"] == 2.0
    assert metrics["refusal_rate"]["mean"] == 0.25  # over every answer: a refusal needs no score
    pair = pair_metrics(a, b)
    assert pair["answers"] == 1 and pair["helpfulness_win_rate"] == 1.0  # only prompt 0 is scored on both sides
    assert pair_metrics(a[1:2], b[1:2]) == {"answers": 0}
