import json

from sqlmodel import Session, func, select

from api.db import get_engine
from api.tables import Dataset, DatasetRecord
from tests.api.conftest import auth


def pref(i=0, **overrides):
    record = {"prompt": f"question {i} ?", "response_0": "answer a", "response_1": "answer b",
              "is_response_0_safe": True, "is_response_1_safe": False, "better_response_id": 1,
              "safer_response_id": 0, "response_1_harm_category": {"violence": True, "fraud": False}}
    record.update(overrides)
    return record


def count_rows():
    with Session(get_engine()) as s:
        return s.exec(select(func.count()).select_from(Dataset)).one(), s.exec(
            select(func.count()).select_from(DatasetRecord)).one()


def test_json_upload_stats_and_records(client, keys):
    records = [pref(i) for i in range(5)] + [pref(5, is_response_1_safe=True, better_response_id=0)]
    r = client.post("/v1/datasets", json={"name": "pku", "kind": "preference", "records": records},
                    headers=auth(keys["annotator"]))
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["num_records"] == 6
    assert ds["stats"]["safe_ratio"] == (6 + 1) / 12
    assert ds["stats"]["better_is_safer"] == 1 / 6
    assert ds["stats"]["harm_categories"] == {"violence": 6}
    got = client.get(f"/v1/datasets/{ds['id']}", headers=auth(keys["viewer"])).json()
    assert got["id"] == ds["id"]
    page1 = client.get(f"/v1/datasets/{ds['id']}/records?limit=4", headers=auth(keys["viewer"])).json()
    assert [r["index"] for r in page1["data"]] == [0, 1, 2, 3] and page1["has_more"]
    page2 = client.get(f"/v1/datasets/{ds['id']}/records?limit=4&after=3", headers=auth(keys["viewer"])).json()
    assert [r["data"]["prompt"] for r in page2["data"]] == ["question 4 ?", "question 5 ?"]
    assert not page2["has_more"]


def test_jsonl_upload_with_bad_lines_names_each_and_stores_nothing(client, keys):
    lines = [json.dumps(pref(0)), "", json.dumps(pref(1, better_response_id=2)), "{not json",
             json.dumps(pref(3, safer_response_id=1)),  # safer one labelled unsafe, other safe: contradictory
             json.dumps(pref(4))]
    files = {"file": ("data.jsonl", "\n".join(lines).encode(), "application/jsonl")}
    r = client.post("/v1/datasets", data={"name": "bad", "kind": "preference"}, files=files,
                    headers=auth(keys["admin"]))
    assert r.status_code == 422
    err = r.json()["error"]
    assert "line 3" in err["message"] and err["param"] == "better_response_id"
    details = {(d["line"], d["field"]) for d in err["details"]}
    assert details == {(3, "better_response_id"), (4, None), (5, "safer_response_id")}
    assert any("contradictory" in d["message"] for d in err["details"])
    assert count_rows() == (0, 0)


def test_good_jsonl_upload(client, keys):
    body = "\n".join(json.dumps({"prompt": f"p {i}", "red_team": i % 2 == 0}) for i in range(10))
    r = client.post("/v1/datasets", data={"name": "prompts", "kind": "prompt"},
                    files={"file": ("p.jsonl", body.encode())}, headers=auth(keys["trainer"]))
    assert r.status_code == 201, r.text
    assert r.json()["stats"]["red_team_ratio"] == 0.5


def test_bad_kind_name_and_empty(client, keys):
    h = auth(keys["admin"])
    assert client.post("/v1/datasets", json={"name": "x", "kind": "nope", "records": [{}]}, headers=h).json()[
        "error"]["param"] == "kind"
    assert client.post("/v1/datasets", json={"name": "", "kind": "prompt", "records": [{}]}, headers=h).status_code == 422
    assert client.post("/v1/datasets", json={"name": "x", "kind": "prompt", "records": []}, headers=h).status_code == 422
    r = client.post("/v1/datasets", json={"name": "x", "kind": "sft", "records": [{"prompt": "p"}]}, headers=h)
    assert r.status_code == 422 and r.json()["error"]["param"] == "response"
    assert client.post("/v1/datasets", content=b"{oops", headers={**h, "content-type": "application/json"}
                       ).status_code == 400
    assert client.post("/v1/datasets", json={"name": "x", "kind": "prompt", "records": [{"prompt": "p"}]},
                       headers=auth(keys["viewer"])).status_code == 403
    assert count_rows() == (0, 0)


def test_oversize_upload_gets_413(client, keys, monkeypatch):
    from api.settings import get_settings

    monkeypatch.setenv("BEAVER_MAX_UPLOAD_MB", "0.01")  # 10 KiB
    get_settings.cache_clear()
    big = [pref(i, prompt="word " * 50) for i in range(100)]
    r = client.post("/v1/datasets", json={"name": "big", "kind": "preference", "records": big},
                    headers=auth(keys["admin"]))
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    files = {"file": ("big.jsonl", "\n".join(json.dumps(x) for x in big).encode())}
    r = client.post("/v1/datasets", data={"name": "big", "kind": "preference"}, files=files, headers=auth(keys["admin"]))
    assert r.status_code == 413
    assert count_rows() == (0, 0)


def test_pagination_of_datasets(client, keys):
    h = auth(keys["admin"])
    ids = [client.post("/v1/datasets", json={"name": f"d{i}", "kind": "prompt", "records": [{"prompt": "p"}]},
                       headers=h).json()["id"] for i in range(5)]
    first = client.get("/v1/datasets?limit=2", headers=h).json()
    assert [d["id"] for d in first["data"]] == ids[::-1][:2] and first["has_more"]
    rest = client.get(f"/v1/datasets?limit=10&after={first['data'][-1]['id']}", headers=h).json()
    assert [d["id"] for d in rest["data"]] == ids[::-1][2:] and not rest["has_more"]
    r = client.get("/v1/datasets?limit=0", headers=h)  # declared 1…1000 in /openapi.json: FastAPI's 422
    assert r.status_code == 422 and r.json()["error"]["param"] == "limit", r.text
    assert client.get("/v1/datasets/ds-nope", headers=h).status_code == 404
