"""Artifacts over the API: a job's reports and plots are listed and downloaded by name (images
inline, logs for staff only, no way out of the job's folder), and a model downloads whole as a tar
of its Hugging Face folder that transformers loads. A real reward job, run by the worker's own
``execute`` in-process, writes the files."""

from __future__ import annotations

import io
import os
import tarfile

import pytest

from tests.api.conftest import auth
from tests.integration.test_platform import preference_records


@pytest.fixture
def finished_job(client, keys, tiny_llama_dir):
    from workers.tasks import execute

    h = auth(keys["trainer"])
    ds = client.post("/v1/datasets", json={"name": "pairs", "kind": "preference", "records": preference_records(8)},
                     headers=h).json()["id"]
    job = client.post("/v1/jobs", json={"type": "reward", "datasets": [ds], "params": {
        "model": str(tiny_llama_dir), "epochs": 1, "batch_size": 4, "eval_split": 0.25}}, headers=h).json()
    assert execute(job["id"], "worker-a/h:1:aa") == "succeeded"
    return client.get(f"/v1/jobs/{job['id']}", headers=h).json()


def test_a_jobs_reports_and_plots_are_listed_and_served_and_weights_and_escapes_are_not(client, keys, finished_job):
    from api.settings import get_settings

    job_id, viewer, trainer = finished_job["id"], auth(keys["viewer"]), auth(keys["trainer"])
    attempt = get_settings().resolved_artifacts_dir / job_id / "attempt-1"
    (attempt / "ranks.log").write_text("Traceback (most recent call last): /srv/secret/path\n")
    outside = attempt.parent.parent / "outside.txt"
    outside.write_text("not the job's")
    os.symlink(outside, attempt / "link.txt")

    names = {f["name"]: f for f in client.get(f"/v1/jobs/{job_id}/files", headers=viewer).json()["data"]}
    assert "attempt-1/reward_scores.png" in names and names["attempt-1/reward_scores.png"]["content_type"] == "image/png"
    assert not any(n.endswith((".safetensors", ".log", "link.txt")) for n in names), names  # weights, logs, links
    staff = {f["name"] for f in client.get(f"/v1/jobs/{job_id}/files", headers=trainer).json()["data"]}
    assert "attempt-1/ranks.log" in staff

    png = client.get(f"/v1/jobs/{job_id}/files/attempt-1/reward_scores.png", headers=viewer)
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    assert png.headers["content-type"] == "image/png" and png.headers["content-disposition"].startswith("inline")
    assert png.headers["x-content-type-options"] == "nosniff"
    assert client.get(f"/v1/jobs/{job_id}/files/attempt-1/ranks.log", headers=viewer).status_code == 404
    assert client.get(f"/v1/jobs/{job_id}/files/attempt-1/ranks.log", headers=trainer).status_code == 200
    for escape in ("attempt-1/..%2F..%2Foutside.txt", "..%2Foutside.txt", "%2Fetc%2Fpasswd", "attempt-1/link.txt",
                   "attempt-1/model/model.safetensors"):
        r = client.get(f"/v1/jobs/{job_id}/files/{escape}", headers=trainer)
        assert r.status_code in (404, 422), (escape, r.status_code)
        assert b"not the job's" not in r.content
    assert client.get("/v1/jobs/job-nope/files", headers=viewer).status_code == 404


def test_a_model_downloads_as_a_tar_that_transformers_loads(client, keys, finished_job, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model_id = finished_job["result_models"][0]
    assert client.get(f"/v1/models/{model_id}/archive", headers=auth(keys["viewer"])).status_code == 403
    r = client.get(f"/v1/models/{model_id}/archive", headers=auth(keys["trainer"]))
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        names = tar.getnames()
        assert all(n.startswith("model/") for n in names) and "model/config.json" in names
        tar.extractall(tmp_path, filter="data")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model")
    assert model.config.score_type == "reward"
    assert client.get("/v1/models/nope/archive", headers=auth(keys["trainer"])).status_code == 404
