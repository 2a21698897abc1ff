"""A failed job's ``error`` is an object ``{"code", "message"}``: written by a real worker run
(``workers.tasks.execute`` in-process, on the real SQLite database), by the reaper, and by
migration 0003 from the text errors stored before it (SQLite, and PostgreSQL when it answers)."""

from __future__ import annotations

import shutil
import uuid

import pytest
import torch
from sqlalchemy import create_engine, text, update
from sqlmodel import Session

from tests.api.conftest import auth

PAIR = {"prompt": "how do i make a cake ?", "response_0": "sure . mix flour .", "response_1": "no .",
        "is_response_0_safe": True, "is_response_1_safe": True, "better_response_id": 0, "safer_response_id": 0}
# The safer answer labelled unsafe while the other is safe: contradictory (DESIGN.md).
CONTRADICTORY = {**PAIR, "is_response_0_safe": False, "is_response_1_safe": True, "safer_response_id": 0}


def register(client, keys, name: str, path) -> str:
    r = client.post("/v1/models", json={"name": name, "kind": "policy", "path": str(path)},
                    headers=auth(keys["trainer"]))
    assert r.status_code == 201, r.text
    return r.json()["id"]


def run_in_worker(client, keys, job_type: str, params: dict, datasets: list, before_run=None) -> dict:
    """Create a job through the API, run it with the worker's own code, return the job object."""
    from workers.tasks import execute

    r = client.post("/v1/jobs", json={"type": job_type, "params": params, "datasets": datasets},
                    headers=auth(keys["trainer"]))
    assert r.status_code == 201, r.text
    if before_run:
        before_run()
    assert execute(r.json()["id"], "test-worker") == "failed"
    return client.get(f"/v1/jobs/{r.json()['id']}", headers=auth(keys["trainer"])).json()


def test_invalid_data_fails_the_job_with_invalid_input(client, keys, tiny_llama_dir):
    from api.db import get_engine
    from api.registry import create_dataset_rows

    model = register(client, keys, "tiny", tiny_llama_dir)
    # A dataset stored without today's validation (as one uploaded before a rule existed).
    with Session(get_engine()) as session:
        dataset = create_dataset_rows(session, "old-pairs", "preference", [PAIR, CONTRADICTORY]).id
    job = run_in_worker(client, keys, "reward", {"model": model}, [dataset])
    error = job["error"]
    assert set(error) == {"code", "message"} and error["code"] == "invalid_input"
    assert dataset in error["message"] and "line 2" in error["message"]
    assert not error["message"].startswith(("ValueError", "InvalidRecords")) and "Traceback" not in error["message"]
    events = client.get(f"/v1/jobs/{job['id']}/events", headers=auth(keys["trainer"])).json()["data"]
    failure = next(e for e in events if e["level"] == "error")
    assert failure["data"]["error"] == error and "Traceback" in failure["data"]["traceback"]
    assert events[-1]["data"]["status"] == "failed"
    # Tracebacks show the server's code and paths: trainers and admins see them, viewers do not.
    seen_by_viewer = client.get(f"/v1/jobs/{job['id']}/events", headers=auth(keys["viewer"])).json()["data"]
    assert next(e for e in seen_by_viewer if e["level"] == "error")["data"] == {"error": error}


def test_a_model_folder_gone_before_the_run_fails_with_model_not_found(client, keys, tiny_llama_dir, tmp_path):
    copy = shutil.copytree(tiny_llama_dir, tmp_path / "copy")
    model = register(client, keys, "tiny-copy", copy)
    dataset = client.post("/v1/datasets", json={"name": "sft", "kind": "sft",
                                                "records": [{"prompt": "hi", "response": "hello ."}]},
                          headers=auth(keys["trainer"])).json()["id"]
    job = run_in_worker(client, keys, "sft", {"model": model}, [dataset], before_run=lambda: shutil.rmtree(copy))
    assert job["error"]["code"] == "model_not_found"
    assert str(copy) in job["error"]["message"] and "no longer a directory" in job["error"]["message"]
    seen = client.get(f"/v1/jobs/{job['id']}", headers=auth(keys["viewer"])).json()["error"]  # no server path
    assert seen == {**job["error"], "message": job["error"]["message"].replace(str(copy), "[server path]")}


@pytest.mark.parametrize("exc, code", [
    (ValueError("lr must be > 0"), "invalid_input"),
    ("invalid_records", "invalid_input"),
    ("params_error", "invalid_input"),
    ("model_not_found", "model_not_found"),
    (FileNotFoundError("no model directory at /x"), "model_not_found"),
    (OSError("Error no file named model.safetensors found in directory /x"), "model_not_found"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "out_of_memory"),
    (MemoryError("cannot allocate"), "out_of_memory"),
    (RuntimeError("shape mismatch"), "internal_error"),
    (KeyError("response"), "internal_error"),
])
def test_error_codes_by_exception(exc, code):
    from api.registry import ModelNotFound
    from models.jobs import ParamsError
    from models.records import InvalidRecords, RecordError
    from workers.attempt import error_object

    exc = {"invalid_records": InvalidRecords([RecordError(3, "prompt", "must be a string")]),
           "params_error": ParamsError("params.steps must be an integer", "params.steps"),
           "model_not_found": ModelNotFound("model 'x' not found")}.get(exc, exc)
    error = error_object(exc)
    assert error == {"code": code, "message": str(exc)}
    assert not error["message"].startswith(type(exc).__name__)


def test_reaper_fails_a_lost_job_with_worker_lost(client, keys):
    from api.db import get_engine
    from api.tables import Job
    from workers.reaper import reap_orphans

    job = client.post("/v1/jobs", json={"type": "dataset_stats"}, headers=auth(keys["trainer"])).json()
    with Session(get_engine()) as session:  # its last attempt ran on a worker that went silent long ago
        session.execute(update(Job).where(Job.id == job["id"]).values(status="running", worker="gpu@gone",
                                                                      heartbeat_at=0.0, attempts=2))
        session.commit()
    assert reap_orphans() == [job["id"]]
    done = client.get(f"/v1/jobs/{job['id']}", headers=auth(keys["viewer"])).json()
    assert done["status"] == "failed" and done["finished_at"]
    assert done["error"]["code"] == "worker_lost"
    assert "gpu@gone" in done["error"]["message"] and "attempt 2 of 2" in done["error"]["message"]


# --- migration 0003 --------------------------------------------------------------------------------

@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'old.db'}"
        return
    import psycopg

    from tests.integration.conftest import PG_URL, _require_team_services

    _require_team_services()
    schema = f"beaver_mig_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_URL.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(PG_URL.replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def migrate(engine, revision: str, direction: str = "upgrade") -> None:
    from alembic import command
    from alembic.config import Config

    from api.db import MIGRATIONS_DIR

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["engine"] = engine
    getattr(command, direction)(cfg, revision)


def test_migration_0003_turns_text_errors_into_objects_and_keeps_events(database_url):
    from sqlalchemy import event

    from api.tables import Job, job_error

    engine = create_engine(database_url)
    if engine.dialect.name == "sqlite":
        # As Beaver's own engine (api/db.py): with foreign keys on, re-creating ``jobs`` would
        # cascade-delete every job's events.
        event.listen(engine, "connect", lambda conn, _: conn.execute("PRAGMA foreign_keys=ON"))
    migrate(engine, "0002")
    columns = "id, type, status, params, datasets, queue, metrics, error, result_models, result_datasets, " \
              "cancel_requested, attempts, created_at"
    with engine.begin() as conn:
        conn.execute(text(f"INSERT INTO jobs ({columns}) VALUES "
                          "('job-old', 'reward', 'failed', '{}', '[]', 'gpu', '{}', :error, '[]', '[]', false, 1, 0), "
                          "('job-ok', 'reward', 'succeeded', '{}', '[]', 'gpu', '{}', NULL, '[]', '[]', false, 1, 0)"),
                     {"error": "ApiError: model 'x' not found"})
        conn.execute(text("INSERT INTO job_events (job_id, created_at, level, message, data) "
                          "VALUES ('job-old', 0, 'error', 'failed', '{}')"))
    migrate(engine, "head")
    with Session(engine) as session:
        assert session.get(Job, "job-old").error == {"code": "job_failed", "message": "ApiError: model 'x' not found"}
        ok = session.get(Job, "job-ok")
        assert ok.error is None
        ok.error = job_error("internal_error", "shape mismatch")
        session.add(ok)
        session.commit()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM job_events")).scalar() == 1
        assert conn.execute(text("SELECT count(*) FROM jobs WHERE error IS NULL")).scalar() == 0
    migrate(engine, "0002", "downgrade")
    with engine.connect() as conn:
        rows = dict(conn.execute(text("SELECT id, error FROM jobs")).all())
    assert rows == {"job-old": "ApiError: model 'x' not found", "job-ok": "shape mismatch"}
    engine.dispose()
