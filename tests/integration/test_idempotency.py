"""Idempotency-Key under a race, and the bad inputs that broke PostgreSQL, over real HTTP against a
real ``beaver api`` and worker — on the embedded default and on PostgreSQL + Redis."""

from __future__ import annotations

import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytestmark = pytest.mark.integration

RACERS = 24


def upload(platform, name: str = "prompts") -> str:
    r = platform.client.post("/v1/datasets", json={"name": name, "kind": "prompt", "records": [{"prompt": "hi"}]})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def race(platform, body: dict, idempotency_key: str) -> list[httpx.Response]:
    """RACERS clients, each on its own connection, released at once with one key and one body."""
    barrier = threading.Barrier(RACERS)
    headers = {"Authorization": f"Bearer {platform.keys['trainer']}", "Idempotency-Key": idempotency_key}

    def one(_):
        with httpx.Client(base_url=platform.url, timeout=60) as client:
            client.get("/v1/health")  # connected before the barrier, so the POSTs really overlap
            barrier.wait()
            return client.post("/v1/jobs", json=body, headers=headers)

    with ThreadPoolExecutor(RACERS) as pool:
        return list(pool.map(one, range(RACERS)))


def test_concurrent_requests_with_one_key_get_one_job(platform):
    dataset = upload(platform)
    body = {"type": "dataset_stats", "datasets": [dataset]}
    for attempt in range(3):
        key = f"race-{uuid.uuid4().hex}"
        responses = race(platform, body, key)
        assert [r.status_code for r in responses] == [201] * RACERS, [r.text for r in responses if r.status_code != 201]
        ids = {r.json()["id"] for r in responses}
        assert len(ids) == 1, ids
        job_id = ids.pop()
        assert sum(r.headers.get("Idempotent-Replayed") == "true" for r in responses) == RACERS - 1
        done = platform.wait_job(job_id)
        assert done["status"] == "succeeded", done
        events = platform.client.get(f"/v1/jobs/{job_id}/events?limit=1000").json()["data"]
        assert sum(e["message"].startswith("queued on") for e in events) == 1  # sent to the broker once
        assert sum(e["data"].get("status") == "succeeded" for e in events) == 1  # and run once
        trainer = {"Authorization": f"Bearer {platform.keys['trainer']}", "Idempotency-Key": key}
        r = httpx.post(f"{platform.url}/v1/jobs", json={**body, "params": {"percentiles": [5]}}, headers=trainer)
        assert r.status_code == 409 and r.json()["error"]["param"] == "Idempotency-Key", r.text


def test_the_inputs_that_broke_postgresql_are_4xx(platform):
    """NUL in names and records, NaN in records and metrics, a 1 MB name, cursors past INTEGER."""
    c = platform.client
    before = len(c.get("/v1/datasets?limit=1000").json()["data"])
    dataset = upload(platform)

    def refused(r, param: str | None):
        assert 400 <= r.status_code < 500, r.text
        assert r.json()["error"]["param"] == param, r.json()

    def post(path: str, text: str):
        return c.post(path, content=text.encode(), headers={"content-type": "application/json"})

    refused(c.post("/v1/datasets", json={"name": "a\x00b", "kind": "prompt", "records": [{"prompt": "p"}]}), "name")
    refused(c.post("/v1/datasets", json={"name": "ok", "kind": "prompt", "records": [{"prompt": "p\x00"}]}),
            "records.0.prompt")
    refused(c.post("/v1/datasets", data={"name": "a\x00b", "kind": "prompt"},
                   files={"file": ("d.jsonl", b'{"prompt": "p"}')}), "name")
    refused(post("/v1/datasets", '{"name": "ok", "kind": "prompt", "records": [{"prompt": "p", "x": NaN}]}'),
            "records.0.x")
    refused(c.post("/v1/datasets", json={"name": "n" * 1_000_000, "kind": "prompt", "records": [{"prompt": "p"}]}),
            "name")
    refused(post("/v1/models", '{"name": "m", "kind": "policy", "path": "/x", "metrics": {"loss": NaN}}'),
            "metrics.loss")
    refused(post("/v1/rounds", '{"name": "r", "policy": "p", "metrics": {"w": Infinity}}'), "metrics.w")
    refused(c.post("/v1/models", json={"name": "m\x00", "kind": "policy", "path": "/x"}), "name")
    refused(c.post("/v1/chat/completions", content=json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "\ud800"}], "seed": 2 ** 64}).encode(),
        headers={"content-type": "application/json"}), "messages.0.content")
    job = c.post("/v1/jobs", json={"type": "dataset_stats", "datasets": [dataset]}).json()
    for after in (2 ** 31, 2 ** 63):
        refused(c.get(f"/v1/datasets/{dataset}/records?after={after}"), "after")
        refused(c.get(f"/v1/jobs/{job['id']}/events?after={after}"), "after")
    refused(c.get(f"/v1/jobs/{job['id']}/events", headers={"Accept": "text/event-stream", "Last-Event-ID": "9" * 40}),
            "Last-Event-ID")
    refused(c.get("/v1/datasets?after=%00"), "after")
    refused(c.get("/v1/jobs/%00"), "path")
    refused(c.post("/v1/jobs", content=("[" * 100_000 + "]" * 100_000).encode(),
                   headers={"content-type": "application/json"}), None)
    assert len(c.get("/v1/datasets?limit=1000").json()["data"]) == before + 1  # nothing partial stored
    assert c.get("/v1/health").status_code == 200
