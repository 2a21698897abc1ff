"""Job size (issue 10), in-process: ``world_size`` is checked, stored and routed — a job of N ranks
goes to ``<queue>-N``, which only workers offering N ranks or more consume — and a job no live
worker can hold says so in its first event. The ranks themselves: tests/integration/test_ranks.py."""

from __future__ import annotations

import time

from sqlmodel import Session

from api.queue import job_queue, worker_queues
from tests.api.conftest import auth


def test_queue_names_route_a_job_only_to_workers_that_can_hold_it():
    assert job_queue("gpu", 1) == "gpu" and job_queue("gpu", 8) == "gpu-8"
    assert worker_queues("gpu,cpu", 1) == "gpu,cpu"
    assert worker_queues("gpu,cpu", 4) == "gpu,gpu-2,gpu-3,gpu-4,cpu"  # cpu jobs run on one rank
    assert "gpu-4" not in worker_queues("gpu", 2).split(",")


def dataset(client, keys) -> str:
    r = client.post("/v1/datasets", json={"name": "p", "kind": "preference", "records": [{
        "prompt": "q", "response_0": "a", "response_1": "b", "is_response_0_safe": True, "is_response_1_safe": False,
        "better_response_id": 0, "safer_response_id": 0}]}, headers=auth(keys["admin"]))
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_world_size_is_stored_routed_and_refused_where_it_cannot_run(client, keys, tiny_llama_dir):
    h = auth(keys["trainer"])
    data = dataset(client, keys)
    body = {"type": "reward", "datasets": [data], "params": {"model": str(tiny_llama_dir)}, "world_size": 2}
    job = client.post("/v1/jobs", json=body, headers=h)
    assert job.status_code == 201, job.text
    assert (job.json()["world_size"], job.json()["queue"]) == (2, "gpu-2")
    first = client.get(f"/v1/jobs/{job.json()['id']}/events", headers=h).json()["data"][0]["message"]
    assert first.startswith("queued on gpu-2; no live worker takes 2-rank jobs") and "--ranks 2" in first

    for bad, param in (({"type": "dataset_stats", "datasets": [data], "world_size": 2}, "world_size"),
                       ({**body, "world_size": 0}, "world_size"), ({**body, "world_size": 2 ** 40}, "world_size")):
        r = client.post("/v1/jobs", json=bad, headers=h)
        assert r.status_code == 422 and r.json()["error"]["param"] == param, r.text
    one = client.post("/v1/jobs", json={**body, "world_size": 1}, headers=h).json()
    assert (one["world_size"], one["queue"]) == (1, "gpu")

    # The same Idempotency-Key with another world_size is another job: 409.
    key = {**h, "Idempotency-Key": "k-1"}
    assert client.post("/v1/jobs", json=body, headers=key).status_code == 201
    r = client.post("/v1/jobs", json={**body, "world_size": 4}, headers=key)
    assert r.status_code == 409, r.text


def test_no_waiting_note_when_a_live_worker_consumes_the_queue(client, keys, tiny_llama_dir):
    from api.db import get_engine
    from api.tables import Worker

    with Session(get_engine()) as session:
        session.add(Worker(id="w/h:1:aa", name="w", host="h", pid=1, queues="gpu,gpu-2,cpu", heartbeat_at=time.time()))
        session.commit()
    body = {"type": "reward", "datasets": [dataset(client, keys)], "params": {"model": str(tiny_llama_dir)},
            "world_size": 2}
    job = client.post("/v1/jobs", json=body, headers=auth(keys["trainer"])).json()
    first = client.get(f"/v1/jobs/{job['id']}/events", headers=auth(keys["trainer"])).json()["data"][0]["message"]
    assert first == "queued on gpu-2"
