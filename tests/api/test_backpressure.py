"""Backpressure instead of stalls (issue 12): an API process holds at most ``BEAVER_DB_POOL_SIZE``
database sessions, its connection pool has exactly as many connections, and a request that finds
every session busy for ``BEAVER_QUEUE_TIMEOUT_SECONDS`` gets 429 with Retry-After — never the pool's
30 s wait and 500. In-process on SQLite; tests/integration/test_load.py drives a real server over
HTTP, and bench/load.py measures it."""

from __future__ import annotations

import anyio
import pytest
from fastapi.testclient import TestClient

from api.cli import clear_caches
from tests.api.conftest import auth


def test_the_pool_has_one_connection_per_session_and_defaults_to_the_threadpool(beaver_env, monkeypatch):
    from api.db import get_engine
    from api.settings import get_settings

    monkeypatch.setenv("BEAVER_API_THREADS", "24")
    clear_caches()
    assert get_settings().resolved_db_pool_size == 24 and get_engine().pool.size() == 24
    monkeypatch.setenv("BEAVER_DB_POOL_SIZE", "7")
    monkeypatch.setenv("BEAVER_QUEUE_TIMEOUT_SECONDS", "2.5")
    clear_caches()
    assert get_engine().pool.size() == 7 and get_engine().pool.timeout() == 2.5


def test_a_request_waits_for_a_free_session_then_is_refused(beaver_env, monkeypatch):
    from api.db import DatabaseBusy, acquire_slot

    monkeypatch.setenv("BEAVER_DB_POOL_SIZE", "1")
    monkeypatch.setenv("BEAVER_QUEUE_TIMEOUT_SECONDS", "0.05")
    clear_caches()

    async def main():
        held = await acquire_slot()
        with pytest.raises(DatabaseBusy, match="all 1 database sessions"):
            await acquire_slot()
        async with anyio.create_task_group() as tg:  # a waiter gets the session as soon as it comes free
            got = []

            async def wait():
                got.append(await acquire_slot())

            tg.start_soon(wait)
            await anyio.sleep(0.01)
            held.release()
            held.release()  # once only: a second release gives back nothing
        got[0].release()
        (await acquire_slot()).release()

    anyio.run(main)


def test_every_route_but_health_answers_429_with_retry_after_when_all_sessions_are_busy(keys, monkeypatch):
    from api.app import create_app
    from api.db import acquire_slot

    monkeypatch.setenv("BEAVER_DB_POOL_SIZE", "1")
    monkeypatch.setenv("BEAVER_QUEUE_TIMEOUT_SECONDS", "0.05")
    clear_caches()
    with TestClient(create_app()) as client:
        held = client.portal.call(acquire_slot)  # another request holds the only session
        refused = [client.get("/v1/datasets", headers=auth(keys["viewer"])),  # the route's own session
                   client.post("/v1/datasets", headers=auth(keys["annotator"]),  # the key check before the body
                               json={"name": "d", "kind": "prompt", "records": [{"prompt": "hi"}]})]
        for r in refused:
            assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
            assert r.json()["error"]["code"] == "rate_limited" and "busy" in r.json()["error"]["message"]
        assert client.get("/v1/health").status_code == 200  # from memory: needs no session
        client.portal.call(held.release)
        assert client.get("/v1/datasets", headers=auth(keys["viewer"])).status_code == 200


def test_a_connection_that_does_not_come_free_in_time_is_a_429_too(keys, monkeypatch):
    """The pool's own wait, past BEAVER_DB_MAX_OVERFLOW (connections used outside the sessions):
    still the server being busy, never a 500."""
    from api.app import create_app
    from api.db import get_engine

    for name, value in (("BEAVER_DB_POOL_SIZE", "1"), ("BEAVER_DB_MAX_OVERFLOW", "0"),
                        ("BEAVER_QUEUE_TIMEOUT_SECONDS", "0.05"), ("BEAVER_HEALTH_REFRESH_SECONDS", "60")):
        monkeypatch.setenv(name, value)
    clear_caches()
    with TestClient(create_app()) as client:
        with get_engine().connect():  # the only connection, taken outside any session
            refused = [client.get("/v1/datasets", headers=auth(keys["viewer"])),
                       client.post("/v1/datasets", headers=auth(keys["annotator"]),
                                   json={"name": "d", "kind": "prompt", "records": [{"prompt": "hi"}]})]
        for r in refused:
            assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
        assert client.get("/v1/datasets", headers=auth(keys["viewer"])).status_code == 200


def test_openapi_declares_429_on_every_route_that_waits_for_a_session(client):
    spec = client.get("/openapi.json").json()
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            assert ("429" in operation["responses"]) == (path != "/v1/health"), f"{method.upper()} {path}"
