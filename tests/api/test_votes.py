"""Arena votes → the ``arena-votes`` preference dataset, on a real database (SQLite here;
PostgreSQL too when one answers at BEAVER_TEST_POSTGRES), and the arena page itself. Votes on
battles, from the transcript: tests/api/test_arena.py."""

from __future__ import annotations

import os
import re
import threading
import uuid

import pytest
from sqlmodel import Session, func, select

from api.db import get_engine
from api.registry import load_records
from api.tables import Dataset, DatasetRecord
from models.preference import preference_pairs
from models.records import check_records
from tests.api.conftest import auth

PG_URL = os.environ.get("BEAVER_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def record(i=0, **overrides):
    """An arena vote as the arena stores it (api/routers/arena.py builds it from the transcript)."""
    out = {"prompt": f"how do i open lock {i} ?", "response_0": "call a locksmith .", "response_1": "use a pick .",
           "is_response_0_safe": True, "is_response_1_safe": False, "better_response_id": 1, "safer_response_id": 0,
           "response_0_source": "beaver-v1", "response_1_source": "beaver-v0"}
    out.update(overrides)
    return out


def append(rec, voter="key-1"):
    from api.routers.votes import append_vote

    with Session(get_engine()) as s:
        dataset, idx = append_vote(s, rec, voter)
        return dataset.id, idx


def count_rows():
    with Session(get_engine()) as s:
        return (s.exec(select(func.count()).select_from(Dataset)).one(),
                s.exec(select(func.count()).select_from(DatasetRecord)).one())


def test_first_vote_creates_the_dataset_and_votes_append_with_stats(client, keys):
    assert client.get("/v1/votes/dataset", headers=auth(keys["viewer"])).status_code == 404
    got = [append(record(i, is_response_1_safe=i == 2)) for i in range(3)]
    assert [idx for _, idx in got] == [0, 1, 2]
    assert len({ds for ds, _ in got}) == 1

    ds = client.get("/v1/votes/dataset", headers=auth(keys["viewer"])).json()
    assert ds["id"] == got[0][0] and ds["name"] == "arena-votes" and ds["kind"] == "preference"
    assert ds["num_records"] == 3 and ds["stats"]["records"] == 3
    assert ds["stats"]["safe_ratio"] == (3 + 1) / 6
    assert ds["stats"]["better_is_safer"] == 0 and ds["stats"]["both_unsafe"] == 0
    page = client.get(f"/v1/datasets/{ds['id']}/records", headers=auth(keys["viewer"])).json()
    assert [r["index"] for r in page["data"]] == [0, 1, 2]
    assert [r["data"]["prompt"] for r in page["data"]] == [f"how do i open lock {i} ?" for i in range(3)]
    assert page["data"][0]["data"] == record(0)
    assert count_rows() == (1, 3)


def test_the_arena_dataset_trains_like_any_preference_dataset(client, keys):
    for i in range(4):
        append(record(i, better_response_id=i % 2))
    ds_id = client.get("/v1/votes/dataset", headers=auth(keys["viewer"])).json()["id"]
    with Session(get_engine()) as s:
        records = load_records(s, ds_id)  # what a reward / cost job reads
    check_records("preference", records)
    reward = preference_pairs(records, "reward")
    assert [p.better for p in reward] == ["call a locksmith .", "use a pick ."] * 2
    cost = preference_pairs(records, "cost")
    assert all(p.better == "call a locksmith ." and p.better_is_safe and not p.worse_is_safe for p in cost)


def test_the_free_text_vote_route_is_retired(client, keys):
    """POST /v1/votes took the prompt and both answers from the client (issue 18): it is gone; arena votes
    name a turn of a battle, and preference records of one's own go to POST /v1/datasets."""
    body = {"prompt": "p", "response_0": "a", "response_1": "b", "better": 0, "safer": 0,
            "is_response_0_safe": True, "is_response_1_safe": True}
    assert client.post("/v1/votes", json=body, headers=auth(keys["annotator"])).status_code == 404
    assert count_rows() == (0, 0)
    assert "/v1/votes" not in client.get("/openapi.json").json()["paths"]


def test_concurrent_votes_take_distinct_indexes_in_one_dataset(client, keys):
    threads, errors = 6, []

    def voter(t):
        try:
            for j in range(3):
                append(record(10 * t + j))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    workers = [threading.Thread(target=voter, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert errors == []
    with Session(get_engine()) as s:
        assert s.exec(select(func.count()).select_from(Dataset)).one() == 1
        assert sorted(s.exec(select(DatasetRecord.idx))) == list(range(18))
        assert s.exec(select(Dataset.num_records)).one() == 18


def test_concurrent_appends_on_postgresql(beaver_env):
    """The advisory-lock path: first votes racing to create the dataset, then to take indexes."""
    import psycopg

    try:
        psycopg.connect(PG_URL.replace("+psycopg", ""), connect_timeout=3).close()
    except Exception as e:  # noqa: BLE001
        message = f"PostgreSQL at {PG_URL} unavailable: {str(e).splitlines()[0]}"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (CI=true: PostgreSQL must be tested)")
        pytest.skip(message)
    from sqlmodel import SQLModel, create_engine

    from api.routers.votes import append_vote

    schema = f"beaver_votes_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_URL.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    engine = create_engine(f"{PG_URL}?options=-csearch_path%3D{schema}", pool_size=8)
    try:
        SQLModel.metadata.create_all(engine)
        record = {"prompt": "p", "response_0": "a", "response_1": "b", "is_response_0_safe": True,
                  "is_response_1_safe": True, "better_response_id": 0, "safer_response_id": 1}
        errors, barrier = [], threading.Barrier(6)

        def voter():
            barrier.wait()
            try:
                for _ in range(3):
                    with Session(engine) as s:
                        append_vote(s, record, None)
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        workers = [threading.Thread(target=voter) for _ in range(6)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert errors == []
        with Session(engine) as s:
            assert s.exec(select(func.count()).select_from(Dataset)).one() == 1
            assert sorted(s.exec(select(DatasetRecord.idx))) == list(range(18))
            assert s.exec(select(Dataset.num_records)).one() == 18
    finally:
        engine.dispose()
        with psycopg.connect(PG_URL.replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def test_the_root_serves_the_arena_page(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    script = client.get("/static/arena.js")  # the arena view's script
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    for needle in ('id="composer"', 'id="message"', 'src="/static/arena.js"', 'rel="icon"'):
        assert needle in page, needle
    for needle in ("/v1/arena/battles", "/v1/leaderboard", "/v1/rounds"):
        assert needle in script.text, needle
    # Self-contained: nothing external may load (scripts and styles by src come from this server's /static).
    assert "http://" not in page and "https://" not in page
    assert all(src.startswith("/static/") for src in re.findall(r"""<(?:script|link)[^>]* (?:src|href)=["']([^"']+)""",
                                                               page) if not src.startswith("/favicon"))
