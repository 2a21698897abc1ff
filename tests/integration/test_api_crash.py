"""An API killed mid-upload leaves whole datasets or none (issue 12's reliability suite): eight
concurrent uploads of 20,000 preference records each, JSON and multipart, over real HTTP; the API's
process group is SIGKILLed while some bodies still stream in and others are being inserted. After a
restart every dataset the database holds has all its records, and every upload that was answered
201 is there — on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.integration.test_platform import preference_records

pytestmark = pytest.mark.integration

RECORDS = 20_000
UPLOADS = 8


def body_chunks(payload: bytes, started: threading.Event, size: int = 256 * 1024):
    """The body in chunks, so a kill can land while it still streams in."""
    started.set()
    for i in range(0, len(payload), size):
        yield payload[i:i + size]


def test_sigkill_during_concurrent_uploads_leaves_no_partial_dataset(platform):
    records = preference_records(RECORDS)
    as_json = json.dumps({"name": "upload-json", "kind": "preference", "records": records}).encode()
    as_jsonl = "\n".join(json.dumps(r) for r in records).encode()
    answers: dict[int, object] = {}
    started = [threading.Event() for _ in range(UPLOADS)]

    def upload(i: int) -> None:
        headers = {"Authorization": f"Bearer {platform.keys['admin']}"}
        try:
            with httpx.Client(base_url=platform.url, timeout=120) as c:
                if i % 2:
                    started[i].set()
                    files = {"file": (f"part-{i}.jsonl", as_jsonl)}
                    answers[i] = c.post("/v1/datasets", headers=headers, files=files,
                                        data={"name": f"upload-{i}", "kind": "preference"})
                else:
                    answers[i] = c.post("/v1/datasets", headers={**headers, "content-type": "application/json"},
                                        content=body_chunks(as_json.replace(b"upload-json", f"upload-{i}".encode()),
                                                            started[i]))
        except httpx.HTTPError as e:
            answers[i] = e
        finally:
            started[i].set()

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(UPLOADS)]
    for t in threads:
        t.start()
    for event in started:
        event.wait(60)
    # Kill once the first upload is answered: the others are then mid-body or mid-insert.
    deadline = time.time() + 120
    while not answers and time.time() < deadline:
        time.sleep(0.01)
    platform.kill_api()
    for t in threads:
        t.join(180)
    assert answers, "no upload finished before the kill"
    created = {a.json()["name"] for a in answers.values() if isinstance(a, httpx.Response) and a.status_code == 201}
    killed = [a for a in answers.values() if isinstance(a, httpx.HTTPError)]
    assert created and killed, f"the kill should fall between uploads: {len(created)} created, {len(killed)} cut"

    platform.restart_api()
    listed = {d["name"]: d for d in platform.client.get("/v1/datasets?limit=100").json()["data"]}
    assert created <= set(listed), "an upload answered 201 is missing after the restart"
    assert all(d["num_records"] == RECORDS for d in listed.values()), {n: d["num_records"] for n, d in listed.items()}
    engine = create_engine(platform.env.get("BEAVER_DATABASE_URL") or f"sqlite:///{platform.home}/beaver.db")
    with engine.connect() as conn:  # the rows themselves: no records of a dataset that was rolled back
        counts = conn.execute(text("SELECT d.name, d.num_records, count(r.dataset_id) FROM datasets d "
                                   "LEFT JOIN dataset_records r ON r.dataset_id = d.id GROUP BY d.id, d.name, "
                                   "d.num_records")).all()
        orphans = conn.execute(text("SELECT count(*) FROM dataset_records r WHERE NOT EXISTS "
                                    "(SELECT 1 FROM datasets d WHERE d.id = r.dataset_id)")).scalar()
    engine.dispose()
    assert {name for name, *_ in counts} == set(listed)
    assert all(n == RECORDS and c == RECORDS for _, n, c in counts), counts
    assert orphans == 0
