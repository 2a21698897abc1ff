"""Job creation, validation, idempotency and cancel-before-start, against the real embedded broker
(no worker runs here, so jobs stay queued; tests/integration runs them)."""

from tests.api.conftest import auth


def make_dataset(client, key):
    r = client.post("/v1/datasets", json={"name": "p", "kind": "prompt", "records": [{"prompt": "hi"}]},
                    headers=auth(key))
    return r.json()["id"]


def test_create_get_list(client, keys):
    ds = make_dataset(client, keys["trainer"])
    r = client.post("/v1/jobs", json={"type": "dataset_stats", "datasets": [ds], "params": {"percentiles": [50]}},
                    headers=auth(keys["trainer"]))
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["status"] == "queued" and job["queue"] == "cpu" and job["params"] == {"percentiles": [50]}
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth(keys["viewer"])).json()["status"] == "queued"
    listed = client.get("/v1/jobs?status=queued", headers=auth(keys["viewer"])).json()
    assert [j["id"] for j in listed["data"]] == [job["id"]]
    events = client.get(f"/v1/jobs/{job['id']}/events", headers=auth(keys["viewer"])).json()
    assert events["data"][0]["data"]["status"] == "queued"


def test_params_are_validated_at_create_time(client, keys):
    h = auth(keys["trainer"])
    r = client.post("/v1/jobs", json={"type": "nope"}, headers=h)
    assert r.status_code == 400 and "dataset_stats" in r.json()["error"]["message"]
    r = client.post("/v1/jobs", json={"type": "dataset_stats", "params": {"percentile": [5]}}, headers=h)
    assert r.status_code == 422 and r.json()["error"]["param"] == "params.percentile"
    r = client.post("/v1/jobs", json={"type": "dataset_stats", "params": {"percentiles": ["x"]}}, headers=h)
    assert r.status_code == 422 and r.json()["error"]["param"] == "params.percentiles[0]"
    r = client.post("/v1/jobs", json={"type": "dataset_stats", "datasets": ["ds-missing"]}, headers=h)
    assert r.status_code == 404 and r.json()["error"]["param"] == "datasets[0]"
    r = client.post("/v1/jobs", json={"type": "dataset_stats", "colour": 1}, headers=h)
    assert r.status_code == 422
    assert client.get("/v1/jobs", headers=h).json()["data"] == []


def test_idempotency_key_returns_the_same_job(client, keys):
    h = {**auth(keys["trainer"]), "Idempotency-Key": "abc-1"}
    first = client.post("/v1/jobs", json={"type": "dataset_stats"}, headers=h).json()
    second = client.post("/v1/jobs", json={"type": "dataset_stats"}, headers=h).json()
    assert first["id"] == second["id"]
    other = client.post("/v1/jobs", json={"type": "dataset_stats"}, headers={**h, "Idempotency-Key": "abc-2"}).json()
    assert other["id"] != first["id"]
    ds = make_dataset(client, keys["trainer"])
    assert client.post("/v1/jobs", json={"type": "dataset_stats", "datasets": [ds]}, headers=h).status_code == 409


def test_cancel_queued_job(client, keys):
    h = auth(keys["trainer"])
    job = client.post("/v1/jobs", json={"type": "dataset_stats"}, headers=h).json()
    r = client.post(f"/v1/jobs/{job['id']}/cancel", headers=h)
    assert r.status_code == 200 and r.json()["status"] == "cancelled" and r.json()["finished_at"]
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=h).status_code == 409
    assert client.post("/v1/jobs/job-nope/cancel", headers=h).status_code == 404
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(keys["viewer"])).status_code == 403


def test_unreachable_broker_fails_the_job_with_503(client, keys, monkeypatch):
    from api.cli import clear_caches

    monkeypatch.setenv("BEAVER_BROKER_URL", "redis://:hunter2@127.0.0.1:1/0")
    clear_caches()
    r = client.post("/v1/jobs", json={"type": "dataset_stats"}, headers=auth(keys["trainer"]))
    assert r.status_code == 503
    message = r.json()["error"]["message"]
    assert "127.0.0.1:1" in message and "hunter2" not in message
    job = client.get("/v1/jobs", headers=auth(keys["trainer"])).json()["data"][0]
    assert job["status"] == "failed" and job["error"]["code"] == "broker_unavailable"
    assert "broker" in job["error"]["message"] and "hunter2" not in job["error"]["message"]
