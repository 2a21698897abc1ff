from api.db import get_engine
from sqlmodel import Session, select

from api.tables import ApiKey
from tests.api.conftest import auth


def test_health_needs_no_key(client):
    r = client.get("/v1/health")
    assert r.status_code == 200 and r.json()["database"] == "ok"
    assert r.json()["status"] == "degraded" and r.json()["problems"] == ["no worker alive"]  # none runs here


def test_missing_wrong_and_malformed_keys_get_401(client):
    assert client.get("/v1/datasets").status_code == 401
    r = client.get("/v1/datasets", headers=auth("bvr_not-a-key"))
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "unauthorized"
    assert client.get("/v1/datasets", headers={"Authorization": "Basic abc"}).status_code == 401


def test_keys_are_hashed_at_rest(client, keys):
    with Session(get_engine()) as session:
        stored = [k.key_hash for k in session.exec(select(ApiKey))]
    assert stored and all(key not in stored for key in keys.values())
    assert all(len(h) == 64 for h in stored)


def test_roles(client, keys):
    body = {"type": "dataset_stats", "datasets": []}
    r = client.post("/v1/jobs", json=body, headers=auth(keys["viewer"]))
    assert r.status_code == 403
    assert "viewer" in r.json()["error"]["message"]
    assert client.post("/v1/jobs", json=body, headers=auth(keys["annotator"])).status_code == 403
    assert client.get("/v1/jobs", headers=auth(keys["viewer"])).status_code == 200
    assert client.post("/v1/keys", json={"name": "x", "role": "viewer"}, headers=auth(keys["trainer"])).status_code == 403


def test_admin_creates_and_revokes_keys(client, keys):
    r = client.post("/v1/keys", json={"name": "ci", "role": "trainer"}, headers=auth(keys["admin"]))
    assert r.status_code == 201
    new = r.json()
    assert new["key"].startswith("bvr_") and "key_hash" not in new
    assert client.get("/v1/jobs", headers=auth(new["key"])).status_code == 200
    assert client.delete(f"/v1/keys/{new['id']}", headers=auth(keys["admin"])).status_code == 200
    assert client.get("/v1/jobs", headers=auth(new["key"])).status_code == 401
    r = client.post("/v1/keys", json={"name": "x", "role": "root"}, headers=auth(keys["admin"]))
    assert r.status_code == 422 and r.json()["error"]["param"] == "role"
