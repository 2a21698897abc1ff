"""``GET /v1/health`` answers from a snapshot (issue 12): no database work per request, the workers
the registry has heard from, and 503 once the database stops answering. In-process, on SQLite;
tests/integration/test_exactly_once.py checks it against real workers and a locked PostgreSQL."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient
from sqlalchemy import event
from sqlmodel import Session


def test_health_opens_no_database_connection_per_request(keys, monkeypatch):
    from api.app import create_app
    from api.cli import clear_caches
    from api.db import get_engine

    monkeypatch.setenv("BEAVER_HEALTH_REFRESH_SECONDS", "60")  # no refresh while the requests run
    clear_caches()
    checkouts = []
    with TestClient(create_app()) as client:
        event.listen(get_engine(), "checkout", lambda *_: checkouts.append(1))
        answers = [client.get("/v1/health") for _ in range(50)]
    assert {r.status_code for r in answers} == {200} and checkouts == []


def test_health_lists_the_workers_heard_from_within_the_orphan_period(client):
    from api.db import get_engine
    from api.tables import Worker
    from workers.reaper import beat_worker

    beat_worker("beaver@h/h:1:aa", "beaver@h", ["cpu", "gpu"])
    with Session(get_engine()) as session:  # a worker killed long ago, not yet removed by a reaper
        session.add(Worker(id="beaver@h/h:2:bb", name="beaver@h", host="h", pid=2, heartbeat_at=0.0))
        session.commit()
    client.app.state.health.refresh()
    body = client.get("/v1/health").json()
    assert body["status"] == "ok" and body["problems"] == [] and body["workers"]["alive"] == 1
    (worker,) = body["workers"]["data"]
    assert worker["id"] == "beaver@h/h:1:aa" and worker["queues"] == ["cpu", "gpu"] and worker["running"] == []
    assert body["queue"] == {"depth": 0, "by_queue": {}, "oldest": None}
    assert body["jobs"] == {"running": 0, "orphaned": 0}


def test_health_is_503_when_the_database_stops_answering(client, monkeypatch):
    from api.cli import clear_caches

    assert client.get("/v1/health").json()["database"] == "ok"
    monkeypatch.setenv("BEAVER_DATABASE_URL", "postgresql+psycopg://nobody@127.0.0.1:1/none")
    clear_caches()
    t = time.time()
    client.app.state.health.refresh()
    r = client.get("/v1/health")
    assert r.status_code == 503 and time.time() - t < 10
    assert r.json()["database"] == "unavailable" and "database unavailable" in r.json()["problems"]
    assert r.json()["database_error"]
