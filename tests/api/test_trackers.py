"""``report_to``: a tiny sft job run by the worker's own code (``execute``, the job in its own process)
logs its events' metrics under the same names to TensorBoard (read back with TensorBoard's event
reader), MLflow (a SQLite store: MLflow 3 keeps its file store for reading old runs only) and W&B (offline mode); a tracker that fails never fails the job."""

from __future__ import annotations

import json

import pytest
from sqlmodel import Session, select

from tests.api.conftest import auth

RECORDS = [{"prompt": f"say {w}", "response": f"{w} . {w} ."} for w in
           ("red", "blue", "green", "gold", "salt", "milk", "rain", "snow")]


def sft_job(client, keys, tiny_llama_dir, report_to) -> str:
    """An sft job of 2 optimizer steps (8 records, batch 4, one epoch), run to its end; returns its id."""
    from workers.tasks import execute

    model = client.post("/v1/models", json={"name": "tiny", "kind": "policy", "path": str(tiny_llama_dir)},
                        headers=auth(keys["trainer"])).json()["id"]
    dataset = client.post("/v1/datasets", json={"name": "sft", "kind": "sft", "records": RECORDS},
                          headers=auth(keys["trainer"])).json()["id"]
    r = client.post("/v1/jobs", json={"type": "sft", "datasets": [dataset], "params": {
        "model": model, "epochs": 1, "batch_size": 4, "max_length": 32, "report_to": report_to}},
        headers=auth(keys["trainer"]))
    assert r.status_code == 201, r.text
    assert execute(r.json()["id"], "test-worker") == "succeeded"
    return r.json()["id"]


def step_events(job_id: str) -> list[dict]:
    from api.db import get_engine
    from api.tables import JobEvent

    with Session(get_engine()) as session:
        return [e.data for e in session.exec(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id))
                if "train/loss" in e.data]


def messages(job_id: str) -> list[str]:
    from api.db import get_engine
    from api.tables import JobEvent

    with Session(get_engine()) as session:
        return [e.message for e in session.exec(select(JobEvent).where(JobEvent.job_id == job_id))]


def test_tensorboard_mlflow_and_wandb_log_the_events_metrics(client, keys, tiny_llama_dir, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from api.settings import get_settings

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    job_id = sft_job(client, keys, tiny_llama_dir, ["tensorboard", "mlflow", "wandb"])
    events = step_events(job_id)
    assert [e["step"] for e in events] == [1, 2]
    assert not [m for m in messages(job_id) if "report_to" in m]  # every tracker stayed on

    # TensorBoard: event files among the job's files, holding train/loss at each step with the event's value.
    files = [f["name"] for f in client.get(f"/v1/jobs/{job_id}/files", headers=auth(keys["viewer"])).json()["data"]]
    assert any(name.startswith("attempt-1/tensorboard/events.out.tfevents") for name in files), files
    board = EventAccumulator(str(get_settings().resolved_artifacts_dir / job_id / "attempt-1" / "tensorboard"))
    board.Reload()
    loss = board.Scalars("train/loss")
    assert [s.step for s in loss] == [1, 2]
    assert [s.value for s in loss] == pytest.approx([e["train/loss"] for e in events], rel=1e-6)
    assert "train/lr" in board.Tags()["scalars"]

    # MLflow: a run named after the job, the same metric under the same name, the job's params.
    client_ = mlflow.MlflowClient(tracking_uri=store)
    runs = client_.search_runs([e.experiment_id for e in client_.search_experiments()])
    (run,) = [r for r in runs if r.info.run_name == job_id]
    history = client_.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [e["step"] for e in events]
    assert [m.value for m in history] == pytest.approx([e["train/loss"] for e in events])
    assert run.data.params["epochs"] == "1" and run.data.params["optim.lr"] == json.dumps(2e-5)
    assert run.info.status == "FINISHED"

    # W&B offline: the run's file in the attempt's hidden .wandb folder (not among the job's files). wandb
    # ships no reader of it; its history records hold the metric's name as protobuf text.
    offline = list((get_settings().resolved_artifacts_dir / job_id / "attempt-1" / ".wandb").glob("wandb/offline-run-*"))
    assert len(offline) == 1
    (run_file,) = offline[0].glob("*.wandb")
    assert b"train/loss" in run_file.read_bytes() and job_id.encode() in run_file.read_bytes()
    assert not any(".wandb" in name for name in files)


def test_a_failing_tracker_never_fails_the_job(client, keys, tiny_llama_dir, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://nowhere")
    job_id = sft_job(client, keys, tiny_llama_dir, ["mlflow", "tensorboard"])
    said = [m for m in messages(job_id) if m.startswith("report_to")]
    assert len(said) == 1 and "mlflow could not start" in said[0] and "the job goes on" in said[0], said
    job = client.get(f"/v1/jobs/{job_id}", headers=auth(keys["viewer"])).json()
    assert job["status"] == "succeeded" and "train/loss" in job["metrics"]
    files = [f["name"] for f in client.get(f"/v1/jobs/{job_id}/files", headers=auth(keys["viewer"])).json()["data"]]
    assert any("/tensorboard/events.out.tfevents" in name for name in files)  # the others go on


def test_report_to_is_checked_when_the_job_is_created(client, keys, tiny_llama_dir):
    model = client.post("/v1/models", json={"name": "tiny", "kind": "policy", "path": str(tiny_llama_dir)},
                        headers=auth(keys["trainer"])).json()["id"]
    for report_to, param in ((["comet"], "params.report_to[0]"), (["wandb", "wandb"], "params.report_to"),
                             ("tensorboard", "params.report_to")):
        r = client.post("/v1/jobs", json={"type": "reward", "params": {"model": model, "report_to": report_to}},
                        headers=auth(keys["trainer"]))
        assert r.status_code == 422 and r.json()["error"]["param"] == param, (report_to, r.text)
