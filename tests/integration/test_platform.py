"""End to end through HTTP, a real worker process, a real database and a real broker — on the
embedded default and on PostgreSQL + Redis."""

from __future__ import annotations

import json
import random
import shutil

import pytest

pytestmark = pytest.mark.integration


def preference_records(n: int, seed: int = 0) -> list[dict]:
    """Separable pairs: the better/safer answer says "good"/"safe" words, the other "bad"/"unsafe"."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        good = " ".join(rng.choice(["good", "safe", "yes"]) for _ in range(rng.randint(2, 6)))
        bad = " ".join(rng.choice(["bad", "unsafe", "no"]) for _ in range(rng.randint(2, 6)))
        flip = rng.random() < 0.5
        records.append({"prompt": f"question {rng.choice(['one', 'two', 'three'])} ?",
                        "response_0": bad if flip else good, "response_1": good if flip else bad,
                        "is_response_0_safe": not flip, "is_response_1_safe": flip,
                        "better_response_id": 1 if flip else 0, "safer_response_id": 1 if flip else 0})
    return records


def upload(platform, records, kind="preference", name="pairs") -> str:
    r = platform.client.post("/v1/datasets", json={"name": name, "kind": kind, "records": records})
    assert r.status_code == 201, r.text
    return r.json()["id"]


@pytest.fixture(scope="module")
def base_model(platform, tiny_llama_dir) -> str:
    r = platform.client.post("/v1/models", json={"name": "tiny-base", "kind": "policy", "path": str(tiny_llama_dir)})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_dataset_stats_job_goes_queued_running_succeeded(platform):
    ds = upload(platform, preference_records(50))
    job = platform.client.post("/v1/jobs", json={"type": "dataset_stats", "datasets": [ds]}).json()
    assert job["status"] == "queued" and job["progress"] is None and job["attempt"] == 0
    done = platform.wait_job(job["id"])
    assert done["status"] == "succeeded", done
    # one dataset read: step 1 of 1 (issue 21's progress), no ETA once over
    assert done["progress"] == {"step": 1, "total_steps": 1, "percent": 100.0, "eta_seconds": None}
    assert done["attempt"] == 1
    stats = done["metrics"][ds]
    assert stats["records"] == 50 and stats["better_is_safer"] == 1.0 and stats["safe_ratio"] == 0.5
    assert done["started_at"] >= done["created_at"] and done["finished_at"] >= done["started_at"]
    statuses = [e["data"]["status"] for e in platform.client.get(f"/v1/jobs/{job['id']}/events").json()["data"]
                if "status" in e["data"]]
    assert statuses == ["queued", "running", "succeeded"]


def test_events_stream_as_sse(platform):
    ds = upload(platform, preference_records(5))
    job = platform.client.post("/v1/jobs", json={"type": "dataset_stats", "datasets": [ds]}).json()
    events, ended = [], None
    with platform.client.stream("GET", f"/v1/jobs/{job['id']}/events",
                                headers={"Accept": "text/event-stream"}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                payload = json.loads(line[6:])
                if kind == "end":
                    ended = payload
                    break
                events.append(payload)
    assert ended == {"status": "succeeded"}
    assert events[-1]["data"]["status"] == "succeeded"


def test_viewer_cannot_submit_jobs(platform):
    r = platform.client.post("/v1/jobs", json={"type": "dataset_stats"},
                             headers={"Authorization": f"Bearer {platform.keys['viewer']}"})
    assert r.status_code == 403


def test_bad_reference_is_refused_and_a_failing_job_ends_with_an_error_object(platform, tiny_llama_dir, tmp_path):
    ds = upload(platform, preference_records(8))
    r = platform.client.post("/v1/jobs", json={"type": "reward", "params": {"model": "model-does-not-exist"},
                                               "datasets": [ds]})
    assert r.status_code == 422 and r.json()["error"]["param"] == "params.model"
    assert "model-does-not-exist" in r.json()["error"]["message"]
    # A model folder without its weights passes the check (it has a config.json); the worker fails on it.
    broken = tmp_path / "no-weights"
    shutil.copytree(tiny_llama_dir, broken)
    for weights in broken.glob("*.safetensors"):
        weights.unlink()
    r = platform.client.post("/v1/jobs", json={"type": "reward", "params": {"model": str(broken)}, "datasets": [ds]})
    assert r.status_code == 201, r.text
    done = platform.wait_job(r.json()["id"])
    assert done["status"] == "failed"
    error = done["error"]
    assert error["code"] == "model_not_found" and str(broken) in error["message"], error
    assert not error["message"].startswith("OSError") and "Traceback" not in error["message"]
    events = platform.client.get(f"/v1/jobs/{done['id']}/events?limit=1000").json()["data"]
    assert any(e["level"] == "error" and "Traceback" in e["data"].get("traceback", "") for e in events)


def _slow_reward_job(platform, base_model, epochs: int) -> dict:
    ds = upload(platform, preference_records(120))
    params = {"model": base_model, "epochs": epochs, "batch_size": 8, "log_every": 2, "optim": {"lr": 1e-3},
              "eval_split": 0.1}
    r = platform.client.post("/v1/jobs", json={"type": "reward", "params": params, "datasets": [ds]})
    assert r.status_code == 201, r.text
    return r.json()


def test_cancel_running_job_stops_it(platform, base_model):
    job = _slow_reward_job(platform, base_model, epochs=200)
    platform.wait_event(job["id"], lambda e: "step" in e["data"] and e["data"]["step"] >= 2)
    progress = platform.client.get(f"/v1/jobs/{job['id']}").json()["progress"]
    assert progress["step"] >= 2 and progress["total_steps"] > progress["step"]  # 200 epochs: far from done
    assert 0 <= progress["percent"] < 100 and progress["eta_seconds"] >= 0
    assert platform.client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "running"
    done = platform.wait_job(job["id"], timeout=60)
    assert done["status"] == "cancelled"
    assert done["result_models"] == []


def test_killed_worker_leaves_no_job_running(platform, base_model):
    job = _slow_reward_job(platform, base_model, epochs=3)
    platform.wait_event(job["id"], lambda e: "step" in e["data"] and e["data"]["step"] >= 2)
    platform.kill_worker()
    assert platform.client.get(f"/v1/jobs/{job['id']}").json()["status"] == "running"
    platform.start_worker()  # its reaper re-queues the job once the heartbeat has expired
    platform.wait_event(job["id"], lambda e: e["message"].startswith("re-queued"), timeout=90)
    done = platform.wait_job(job["id"], timeout=240)
    assert done["status"] == "succeeded", done
    assert len(done["result_models"]) == 1
    model = platform.client.get(f"/v1/models/{done['result_models'][0]}").json()
    assert model["kind"] == "reward"


def test_reward_and_cost_jobs_register_their_models(platform, base_model):
    ds = upload(platform, preference_records(96, seed=3))
    params = {"model": base_model, "epochs": 4, "batch_size": 16, "optim": {"lr": 2e-3}, "log_every": 2,
              "eval_split": 0.25}
    jobs = {t: platform.client.post("/v1/jobs", json={"type": t, "params": params, "datasets": [ds]}).json()
            for t in ("reward", "cost")}
    for score_type, job in jobs.items():
        done = platform.wait_job(job["id"])
        assert done["status"] == "succeeded", done
        assert done["progress"]["percent"] == 100.0 and done["progress"]["step"] == done["metrics"]["train/steps"]
        model = platform.client.get(f"/v1/models/{done['result_models'][0]}").json()
        assert model["kind"] == score_type and model["job_id"] == job["id"]
        assert model["metrics"]["eval/accuracy"] >= 0.9
        events = platform.client.get(f"/v1/jobs/{job['id']}/events?limit=1000").json()["data"]
        assert any("train/loss" in e["data"] for e in events)
    cost_model = platform.client.get(f"/v1/jobs/{jobs['cost']['id']}").json()["result_models"][0]
    assert platform.client.get(f"/v1/models/{cost_model}").json()["metrics"]["eval/sign_accuracy"] >= 0.9
