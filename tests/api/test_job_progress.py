"""A job's ``progress`` (issue 21): ``{step, total_steps, percent, eta_seconds}`` from its newest reported
step, declared in /openapi.json; the key's own role for the page (``GET /v1/keys/me``). The progress of
jobs a real worker runs is checked in tests/integration/test_platform.py and tests/browser/test_runs.py."""

from __future__ import annotations

import time

from sqlmodel import Session

from api.routers.jobs import job_progress
from api.tables import Job
from tests.api.conftest import auth


def job(status: str = "running", started_at: int | None = 1_000, **metrics) -> Job:
    return Job(id="job-x", type="reward", queue="gpu", status=status, started_at=started_at, metrics=metrics)


def test_progress_from_the_newest_step_with_an_eta_from_the_time_per_step():
    # 5 of 20 steps in 100 s: 20 s a step, 15 steps left
    assert job_progress(job(step=5, total_steps=20), clock=1_100) == {
        "step": 5, "total_steps": 20, "percent": 25.0, "eta_seconds": 300}
    assert job_progress(job(step=1, total_steps=3), clock=1_010)["percent"] == 33.3


def test_no_eta_before_a_first_step_nor_once_the_job_is_over():
    assert job_progress(job(step=0, total_steps=20), clock=1_100) == {
        "step": 0, "total_steps": 20, "percent": 0.0, "eta_seconds": None}
    assert job_progress(job("succeeded", step=20, total_steps=20), clock=1_100) == {
        "step": 20, "total_steps": 20, "percent": 100.0, "eta_seconds": None}
    assert job_progress(job("cancelled", step=7, total_steps=20), clock=1_100)["eta_seconds"] is None


def test_no_progress_without_a_reported_step_and_percent_stays_within_0_and_100():
    assert job_progress(job()) is None
    assert job_progress(job(step=3)) is None  # no total
    assert job_progress(job(step=3, total_steps=0)) is None
    assert job_progress(job(step=3.5, total_steps=10)) is None  # not a step count
    assert job_progress(job(step=30, total_steps=10), clock=1_100)["percent"] == 100.0
    assert job_progress(job(step=-2, total_steps=10), clock=1_100)["percent"] == 0.0


def test_a_job_object_carries_progress_and_attempt(client, keys):
    h = auth(keys["trainer"])
    created = client.post("/v1/jobs", json={"type": "dataset_stats"}, headers=h).json()
    assert created["progress"] is None and created["attempt"] == 0  # queued, never started
    from api.db import get_engine

    with Session(get_engine()) as session:  # as workers.attempt.record_event leaves it after 3 of 12 steps
        row = session.get(Job, created["id"])
        row.status, row.started_at, row.attempts = "running", int(time.time()) - 30, 1
        row.metrics = {"step": 3, "total_steps": 12, "train/loss": 0.5}
        session.add(row)
        session.commit()
    for got in (client.get(f"/v1/jobs/{created['id']}", headers=auth(keys["viewer"])).json(),
                client.get("/v1/jobs", headers=h).json()["data"][0]):
        assert got["attempt"] == 1 and got["metrics"]["train/loss"] == 0.5
        progress = got["progress"]
        assert (progress["step"], progress["total_steps"], progress["percent"]) == (3, 12, 25.0)
        assert 80 <= progress["eta_seconds"] <= 120  # 30-ish s for 3 steps, 9 left


def test_openapi_declares_the_job_object_with_its_progress(client):
    schema = client.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    assert set(components["JobProgress"]["properties"]) == {"step", "total_steps", "percent", "eta_seconds"}
    assert "progress" in components["JobObject"]["properties"] and "attempt" in components["JobObject"]["properties"]
    ok = schema["paths"]["/v1/jobs/{job_id}"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/JobObject"}
    listed = schema["paths"]["/v1/jobs"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert listed == {"$ref": "#/components/schemas/JobList"}


def test_a_key_reads_its_own_role(client, keys):
    for role in ("admin", "trainer", "annotator", "viewer"):
        me = client.get("/v1/keys/me", headers=auth(keys[role])).json()
        assert me["role"] == role and me["object"] == "api_key" and "key_hash" not in me
    assert client.get("/v1/keys/me").status_code == 401
