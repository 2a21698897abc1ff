"""Every bad input of issue 12 is a 4xx in the one error shape, naming the field — never a 500.
The real app in-process, on a real SQLite database and on a real PostgreSQL schema (where NUL, NaN,
long names and 32-bit ids break other things than on SQLite), with the embedded broker (no worker
runs here)."""

from __future__ import annotations

import json
import re

import pytest

from tests.api.conftest import auth


@pytest.fixture(autouse=True)
def on_both_databases(database):
    """Every test here runs on SQLite and on PostgreSQL (autouse: before the keys are made)."""

CHAT = {"model": "no-such-round", "messages": [{"role": "user", "content": "hi"}]}


def error_of(r, status: int, param: str | None = "-", code: str | None = None) -> dict:
    """The error of a response that must have ``status``; ``param`` (unless "-") and ``code`` checked."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and {"code", "message", "param"} <= set(body["error"]), body
    error = body["error"]
    if param != "-":
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    assert "Traceback" not in error["message"]
    return error


def raw_json(client, path: str, text: str, key: str, method: str = "POST"):
    headers = {**auth(key), "content-type": "application/json"}
    return client.request(method, path, content=text.encode(), headers=headers)


def post(client, path: str, body, headers: dict):
    """POST ``body`` as ASCII JSON (``\\ud800`` escaped, as a client in any language may send it)."""
    return client.post(path, content=json.dumps(body).encode(), headers={**headers, "content-type": "application/json"})


def make_dataset(client, keys) -> str:
    r = client.post("/v1/datasets", json={"name": "prompts", "kind": "prompt", "records": [{"prompt": "hi"}]},
                    headers=auth(keys["admin"]))
    assert r.status_code == 201, r.text
    return r.json()["id"]


# --- invalid JSON: one status (400) and one shape on every route with a body ---------------------------

def test_invalid_json_is_400_invalid_json_on_every_route(client, keys):
    posts = [path.replace("{job_id}", "job-x") for path, ops in client.app.openapi()["paths"].items() if "post" in ops]
    assert len(posts) >= 10
    for path in posts:
        for headers in ({"content-type": "application/json"}, {}):  # no content type is read as JSON too
            r = client.post(path, content=b'{"name": "x", ', headers={**auth(keys["admin"]), **headers})
            error = error_of(r, 400, param=None, code="invalid_json")
            assert error["message"].startswith("body is not valid JSON"), (path, error)


# --- seeds and integers -------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [2 ** 64, 2 ** 63, -(2 ** 63) - 1, 10 ** 30])
def test_seed_out_of_64_bits_is_422_on_chat_stream_and_compare(client, keys, seed):
    for path, body in (("/v1/chat/completions", CHAT), ("/v1/chat/completions", {**CHAT, "stream": True}),
                       ("/v1/chat/compare", {"models": ["no-such-round"], "messages": CHAT["messages"]})):
        error = error_of(client.post(path, json={**body, "seed": seed}, headers=auth(keys["viewer"])), 422, "seed")
        assert "64 bits" in error["message"]


def test_the_engine_refuses_a_seed_out_of_64_bits_too():
    from models.engine import InvalidRequestError, SamplingParams

    assert SamplingParams(seed=2 ** 63 - 1).seed == 2 ** 63 - 1
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(seed=2 ** 64)
    assert e.value.param == "seed"


def test_integers_are_range_checked_everywhere(client, keys):
    r = client.post("/v1/jobs", json={"type": "dataset_stats", "params": {"percentiles": [50, 2 ** 70]}},
                    headers=auth(keys["trainer"]))
    error_of(r, 422, "params.percentiles.1")
    vote = {"turn": 2 ** 64, "helpful": "a", "safe": [True, True], "safer": "tie"}
    error_of(client.post("/v1/arena/battles/battle-x/votes", json=vote, headers=auth(keys["annotator"])), 422, "turn")
    # An integer of more digits than Python converts is refused as out of range, not a 500.
    r = raw_json(client, "/v1/jobs", '{"type": "dataset_stats", "params": {"seed": ' + "9" * 5000 + "}}",
                 keys["trainer"])
    error_of(r, 422)
    assert client.get("/v1/jobs", headers=auth(keys["trainer"])).json()["data"] == []


# --- strings: lone surrogates and NUL -------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["\ud800", "a\x00b"], ids=["lone-surrogate", "nul"])
def test_lone_surrogates_and_nul_are_refused_in_every_string(client, keys, bad):
    h = auth(keys["admin"])
    messages = [{"role": "user", "content": f"hello {bad}"}]
    error_of(post(client, "/v1/chat/completions", {**CHAT, "messages": messages}, h), 422, "messages.0.content")
    error_of(post(client, "/v1/chat/compare", {"models": ["m"], "messages": messages}, h), 422, "messages.0.content")
    records = [{"prompt": "p"}]
    error_of(post(client, "/v1/datasets", {"name": f"data{bad}", "kind": "prompt", "records": records}, h), 422, "name")
    records = [{"prompt": f"p{bad}"}]
    error_of(post(client, "/v1/datasets", {"name": "data", "kind": "prompt", "records": records}, h), 422,
             "records.0.prompt")
    error_of(post(client, "/v1/models", {"name": f"m{bad}", "kind": "policy", "path": "/x"}, h), 422, "name")
    error_of(post(client, "/v1/keys", {"name": f"k{bad}", "role": "viewer"}, h), 422, "name")
    error_of(post(client, "/v1/jobs", {"type": "dataset_stats", "params": {f"k{bad}": 1}}, h), 422,
             "params")  # a key of an object
    # In a JSONL upload, the line and field are named.
    lines = json.dumps({"prompt": "fine"}) + "\n" + json.dumps({"prompt": f"bad {bad}"})
    r = client.post("/v1/datasets", data={"name": "jsonl", "kind": "prompt"},
                    files={"file": ("d.jsonl", lines.encode())}, headers=h)
    error = error_of(r, 422, "prompt")
    assert error["details"] == [{"line": 2, "field": "prompt", "message": error["details"][0]["message"]}]
    assert client.get("/v1/datasets", headers=h).json()["data"] == []


def test_nul_and_bad_bytes_in_form_fields_and_the_url(client, keys):
    h = auth(keys["admin"])
    files = {"file": ("d.jsonl", b'{"prompt": "p"}')}
    r = client.post("/v1/datasets", data={"name": "a\x00b", "kind": "prompt"}, files=files, headers=h)
    error_of(r, 422, "name")
    # The UTF-8-style bytes of a lone surrogate are not UTF-8: refused, whatever the form parser makes of them.
    body = (b'--B\r\nContent-Disposition: form-data; name="name"\r\n\r\nx\xed\xa0\x80\r\n'
            b'--B\r\nContent-Disposition: form-data; name="kind"\r\n\r\nprompt\r\n'
            b'--B\r\nContent-Disposition: form-data; name="file"; filename="d.jsonl"\r\n\r\n'
            b'{"prompt": "p"}\r\n--B--\r\n')
    r = client.post("/v1/datasets", content=body, headers={**h, "content-type": "multipart/form-data; boundary=B"})
    assert r.status_code == 201, r.text  # the form parser reads bytes that are not UTF-8 as Latin-1: valid text
    r.json()["name"].encode("utf-8")
    error_of(client.get("/v1/jobs?status=a%00b", headers=h), 422, "status")
    error_of(client.get("/v1/datasets?after=%00", headers=h), 422, "after")
    error_of(client.get("/v1/jobs/job-%00", headers=h), 422, "path")
    assert len(client.get("/v1/datasets", headers=h).json()["data"]) == 1


# --- cursors: after and Last-Event-ID -------------------------------------------------------------------

@pytest.mark.parametrize("after", [2 ** 63, 2 ** 64, 2 ** 31, -1])
def test_after_out_of_range_on_records_and_events(client, keys, after):
    h = auth(keys["trainer"])
    dataset = make_dataset(client, keys)
    job = client.post("/v1/jobs", json={"type": "dataset_stats", "datasets": [dataset]}, headers=h).json()
    error_of(client.get(f"/v1/datasets/{dataset}/records?after={after}", headers=h), 422, "after")
    error_of(client.get(f"/v1/jobs/{job['id']}/events?after={after}", headers=h), 422, "after")
    # The largest id an INTEGER column holds is a fine cursor: an empty page, not an overflow.
    assert client.get(f"/v1/datasets/{dataset}/records?after={2 ** 31 - 1}", headers=h).json()["data"] == []


@pytest.mark.parametrize("last_event_id", ["9" * 30, str(2 ** 63), "²", "-1"])
def test_a_huge_or_bad_last_event_id_is_422_not_a_cut_stream(client, keys, last_event_id):
    h = auth(keys["trainer"])
    job = client.post("/v1/jobs", json={"type": "dataset_stats", "datasets": [make_dataset(client, keys)]},
                      headers=h).json()
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=h)  # over, so a stream ends
    stream = {**h, "Accept": "text/event-stream"}
    r = client.get(f"/v1/jobs/{job['id']}/events", headers={**stream, "Last-Event-ID": last_event_id.encode("latin-1")})
    error_of(r, 422, "Last-Event-ID")
    r = client.get(f"/v1/jobs/{job['id']}/events", headers={**stream, "Last-Event-ID": "1"})
    assert r.status_code == 200 and "event: end" in r.text and '"id": 1,' not in r.text
    assert '"id": 2,' in r.text  # resumed after event 1


# --- nesting depth --------------------------------------------------------------------------------------

def nested(depth: int, inner: str = "1") -> str:
    return "[" * depth + inner + "]" * depth


def test_json_nested_100k_deep_is_refused_on_every_route(client, keys):
    deep = nested(100_000)
    for path, text in (("/v1/jobs", deep), ("/v1/jobs", '{"type": "dataset_stats", "params": {"x": ' + deep + "}}"),
                       ("/v1/chat/completions", deep), ("/v1/models", deep),
                       ("/v1/datasets", '{"name": "d", "kind": "prompt", "records": ' + deep + "}")):
        error = error_of(raw_json(client, path, text, keys["admin"]), 422)
        assert "nested deeper than 64 levels" in error["message"], (path, error)
    r = client.post("/v1/datasets", data={"name": "d", "kind": "prompt"},
                    files={"file": ("d.jsonl", ('{"prompt": "p"}\n{"prompt": ' + deep + "}").encode())},
                    headers=auth(keys["admin"]))
    error = error_of(r, 422)
    assert error["details"][0]["line"] == 2 and "nested deeper" in error["details"][0]["message"]


def test_nesting_is_bounded_at_64_levels_naming_the_field(client, keys):
    h = auth(keys["trainer"])
    deep = {"a": 1}
    for _ in range(70):
        deep = {"a": deep}
    error = error_of(client.post("/v1/jobs", json={"type": "dataset_stats", "params": {"x": deep}}, headers=h), 422,
                     "params")
    assert "64 levels" in error["message"]
    shallow = {"a": 1}
    for _ in range(10):
        shallow = {"a": shallow}
    r = client.post("/v1/models", json={"name": "m", "kind": "policy", "path": "/nowhere", "metrics": shallow},
                    headers=h)
    error_of(r, 422, "path")  # ten levels are fine: the request gets as far as the path check


# --- NaN and Infinity -----------------------------------------------------------------------------------

@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_nan_and_infinity_are_refused_everywhere(client, keys, constant):
    admin = keys["admin"]
    cases = [("/v1/jobs", '{"type": "dataset_stats", "params": {"percentiles": [%s]}}', "params.percentiles.0"),
             ("/v1/models", '{"name": "m", "kind": "policy", "path": "/x", "metrics": {"loss": %s}}', "metrics.loss"),
             ("/v1/rounds", '{"name": "r", "policy": "p", "metrics": {"win": %s}}', "metrics.win"),
             ("/v1/moderations", '{"model": "m", "input": "text", "threshold": %s}', "threshold"),
             ("/v1/chat/completions", '{"model": "m", "messages": [{"role": "user", "content": "hi"}], '
                                      '"guard_threshold": %s}', "guard_threshold"),
             ("/v1/datasets", '{"name": "d", "kind": "prompt", "records": [{"prompt": "p", "score": %s}]}',
              "records.0.score")]
    for path, template, param in cases:
        error = error_of(raw_json(client, path, template % constant, admin), 422, param)
        assert "finite number" in error["message"], (path, error)
    r = client.post("/v1/datasets", data={"name": "d", "kind": "prompt"},
                    files={"file": ("d.jsonl", ('{"prompt": "p", "score": %s}' % constant).encode())},
                    headers=auth(admin))
    error = error_of(r, 422, "score")
    assert error["details"][0]["line"] == 1
    assert client.get("/v1/datasets", headers=auth(admin)).json()["data"] == []
    assert client.get("/v1/jobs", headers=auth(admin)).json()["data"] == []


# --- names and sizes ------------------------------------------------------------------------------------

def test_names_have_length_limits(client, keys):
    h = auth(keys["admin"])
    huge = "n" * 1_000_000  # a 1 MB name: the upload route's body limit is far larger
    error = error_of(client.post("/v1/datasets", json={"name": huge, "kind": "prompt", "records": [{"prompt": "p"}]},
                                 headers=h), 422, "name")
    assert "at most 200" in error["message"]
    r = client.post("/v1/datasets", data={"name": "n" * 10_000, "kind": "prompt"},
                    files={"file": ("d.jsonl", b'{"prompt": "p"}')}, headers=h)
    error_of(r, 422, "name")
    error_of(client.post("/v1/models", json={"name": "n" * 10_000, "kind": "policy", "path": "/x"}, headers=h), 422,
             "name")
    error_of(client.post("/v1/keys", json={"name": "n" * 10_000, "role": "viewer"}, headers=h), 422, "name")
    error_of(client.post("/v1/jobs", json={"type": "t" * 10_000}, headers=h), 422, "type")
    r = client.post("/v1/jobs", json={"type": "dataset_stats"}, headers={**h, "Idempotency-Key": "k" * 300})
    error_of(r, 422, "idempotency-key")
    assert client.get("/v1/datasets", headers=h).json()["data"] == []


def test_bodies_over_the_limit_are_413(client, keys, monkeypatch):
    from api.settings import get_settings

    h = auth(keys["viewer"])
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * (1024 * 1024)}]}  # just over 1 MB
    error = error_of(client.post("/v1/chat/completions", json=big, headers=h), 413, code="payload_too_large")
    assert "BEAVER_MAX_BODY_MB" in error["message"]
    monkeypatch.setenv("BEAVER_MAX_BODY_MB", "2")
    get_settings.cache_clear()
    error_of(client.post("/v1/chat/completions", json=big, headers=h), 404, "model")  # within 2 MB: on to the model


# --- Idempotency-Key --------------------------------------------------------------------------------------

def test_idempotency_key_with_another_body_is_409(client, keys):
    dataset, other = make_dataset(client, keys), make_dataset(client, keys)
    h = {**auth(keys["trainer"]), "Idempotency-Key": "pay-1"}
    first = client.post("/v1/jobs", json={"type": "dataset_stats", "datasets": [dataset]}, headers=h)
    assert first.status_code == 201, first.text
    again = client.post("/v1/jobs", json={"type": "dataset_stats", "datasets": [dataset], "params": {}}, headers=h)
    assert again.status_code == 201 and again.json()["id"] == first.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    for body in ({"type": "dataset_stats", "datasets": [dataset], "params": {"percentiles": [10]}},
                 {"type": "dataset_stats", "datasets": [other]},
                 {"type": "generate", "datasets": [dataset], "params": {"model": "m"}}):
        error = error_of(client.post("/v1/jobs", json=body, headers=h), 409, "Idempotency-Key", "conflict")
        assert first.json()["id"] in error["message"]
    # Keys are per API key: another trainer's same key is a new job.
    other_trainer = client.post("/v1/keys", json={"name": "t2", "role": "trainer"}, headers=auth(keys["admin"])).json()
    r = client.post("/v1/jobs", json={"type": "dataset_stats", "datasets": [dataset]},
                    headers={**auth(other_trainer["key"]), "Idempotency-Key": "pay-1"})
    assert r.status_code == 201 and r.json()["id"] != first.json()["id"]


def test_a_job_the_broker_never_got_is_sent_again_on_retry(client, keys, monkeypatch):
    from api.cli import clear_caches

    dataset = make_dataset(client, keys)
    h = {**auth(keys["trainer"]), "Idempotency-Key": "retry-me"}
    body = {"type": "dataset_stats", "datasets": [dataset]}
    monkeypatch.setenv("BEAVER_BROKER_URL", "redis://127.0.0.1:1/0")  # nothing listens there
    clear_caches()
    error = error_of(client.post("/v1/jobs", json=body, headers=h), 503)
    assert "same Idempotency-Key" in error["message"]
    failed = client.get("/v1/jobs", headers=h).json()["data"][0]
    assert failed["status"] == "failed" and failed["error"]["code"] == "broker_unavailable"
    error_of(client.post("/v1/jobs", json=body, headers=h), 503)  # still down: still failed, same job
    monkeypatch.delenv("BEAVER_BROKER_URL")
    clear_caches()  # the broker is back (the embedded one)
    r = client.post("/v1/jobs", json=body, headers=h)
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["id"] == failed["id"] and job["status"] == "queued" and job["error"] is None
    assert job["finished_at"] is None
    events = client.get(f"/v1/jobs/{job['id']}/events", headers=h).json()["data"]
    assert events[-1]["message"].startswith("queued on cpu again")
    assert len(client.get("/v1/jobs", headers=h).json()["data"]) == 1
    # A queued job is not sent twice: a further retry returns it as it is.
    assert client.post("/v1/jobs", json=body, headers=h).json()["status"] == "queued"
    assert len(client.get(f"/v1/jobs/{job['id']}/events", headers=h).json()["data"]) == len(events)


# --- keys, the page, what viewers see --------------------------------------------------------------------

def test_the_last_admin_key_cannot_be_revoked(client, keys):
    admin = auth(keys["admin"])
    listed = client.get("/v1/keys", headers=admin).json()["data"]
    first_admin = next(k for k in listed if k["role"] == "admin")
    error = error_of(client.delete(f"/v1/keys/{first_admin['id']}", headers=admin), 409)
    assert "last admin key" in error["message"]
    second = client.post("/v1/keys", json={"name": "admin-2", "role": "admin"}, headers=admin).json()
    assert client.delete(f"/v1/keys/{first_admin['id']}", headers=auth(second["key"])).status_code == 200
    assert client.get("/v1/keys", headers=admin).status_code == 401  # revoked
    error_of(client.delete(f"/v1/keys/{second['id']}", headers=auth(second["key"])), 409)
    viewer = next(k for k in listed if k["role"] == "viewer")
    assert client.delete(f"/v1/keys/{viewer['id']}", headers=auth(second["key"])).status_code == 200


def test_the_page_has_a_csp_that_allows_its_own_script_and_no_framing(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.headers["X-Frame-Options"] == "DENY"
    csp = r.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "connect-src 'self'" in csp
    # Every script is a file of this server (one per view, the vendored uPlot): no inline script runs.
    scripts = re.findall(r"<script(\s[^>]*)?>(.*?)</script>", r.text, flags=re.S)
    assert scripts and all('src="/static/' in attributes and not body for attributes, body in scripts)
    assert csp.split("script-src")[1].split(";")[0].strip() == "'self'"


def test_viewers_see_no_server_paths(client, keys, tiny_llama_dir):
    r = client.post("/v1/models", json={"name": "tiny", "kind": "policy", "path": str(tiny_llama_dir)},
                    headers=auth(keys["trainer"]))
    assert r.status_code == 201 and r.json()["path"] == str(tiny_llama_dir.resolve())
    model = r.json()["id"]
    for role in ("viewer", "annotator"):
        h = auth(keys[role])
        assert "path" not in client.get(f"/v1/models/{model}", headers=h).json()
        assert all("path" not in m for m in client.get("/v1/models", headers=h).json()["data"])
        assert str(tiny_llama_dir) not in client.get("/v1/models", headers=h).text
    for role in ("trainer", "admin"):
        got = client.get(f"/v1/models/{model}", headers=auth(keys[role])).json()
        assert got["path"] == str(tiny_llama_dir.resolve())
    # A job given a local folder: its params, listing and events show viewers no server path.
    ds = client.post("/v1/datasets", headers=auth(keys["trainer"]), json={"name": "p", "kind": "preference", "records": [{
        "prompt": "q", "response_0": "a", "response_1": "b", "is_response_0_safe": True, "is_response_1_safe": True,
        "better_response_id": 0, "safer_response_id": 0}]}).json()["id"]
    job = client.post("/v1/jobs", headers=auth(keys["trainer"]), json={
        "type": "reward", "datasets": [ds], "params": {"model": str(tiny_llama_dir)}}).json()["id"]
    for path in (f"/v1/jobs/{job}", "/v1/jobs", f"/v1/jobs/{job}/events"):
        seen = client.get(path, headers=auth(keys["viewer"]))
        assert seen.status_code == 200 and str(tiny_llama_dir) not in seen.text, (path, seen.text[:300])
    assert client.get(f"/v1/jobs/{job}", headers=auth(keys["viewer"])).json()["params"]["model"] == "[server path]"
    assert client.get(f"/v1/jobs/{job}", headers=auth(keys["trainer"])).json()["params"]["model"] == str(tiny_llama_dir)


def test_viewers_see_no_tracebacks_in_job_events(client, keys):
    from sqlmodel import Session

    from api.db import get_engine
    from api.registry import add_event

    h = auth(keys["trainer"])
    job = client.post("/v1/jobs", json={"type": "dataset_stats", "datasets": [make_dataset(client, keys)]},
                      headers=h).json()
    error = {"code": "internal_error", "message": "boom"}
    with Session(get_engine()) as session:  # as the worker writes a failure
        add_event(session, job["id"], "internal_error: boom",
                  {"error": error, "traceback": 'Traceback (most recent call last):\n  File "/srv/beaver/x.py"'},
                  level="error")
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=h)
    for role, sees in (("viewer", False), ("annotator", False), ("trainer", True), ("admin", True)):
        events = client.get(f"/v1/jobs/{job['id']}/events", headers=auth(keys[role])).json()["data"]
        failure = next(e for e in events if e["level"] == "error")
        assert failure["data"]["error"] == error and ("traceback" in failure["data"]) == sees, role
        stream = client.get(f"/v1/jobs/{job['id']}/events", headers={**auth(keys[role]), "Accept": "text/event-stream"})
        assert ("Traceback" in stream.text) == sees and "event: end" in stream.text, role
