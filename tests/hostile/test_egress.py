"""Hostile suite, secrets and egress (issue 18), and the issue's smaller defects: each test is one
finding, and each failed on the code the issue was filed against.

A trainer made a worker send its database URL as a Bearer token to a listener of the trainer's
choice (``judge.url`` + ``judge.api_key_env``) and read the judge's raw errors to probe ports. Now
outbound endpoints are named by an admin (``BEAVER_ENDPOINTS``) and a job names one; errors are
classified. The jobs here run through the worker's own code (``workers.tasks.execute`` in-process) on
a real SQLite database and tiny real models; the judges are stub HTTP servers, the one thing not Beaver.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.api.conftest import auth, beaver_env, client, keys  # noqa: F401 — fixtures

SECRET = "postgresql+psycopg://beaver:db-Password-7@db/beaver"


class Stub:
    """An HTTP server answering every POST with ``status`` and ``body``; it records each request's
    path and Authorization header."""

    def __init__(self, status: int = 200, body: str = ""):
        self.requests: list[dict] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                stub.requests.append({"path": self.path, "authorization": self.headers.get("Authorization"),
                                      "body": json.loads(self.rfile.read(length) or b"{}")})
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_endpoints(monkeypatch, endpoints: dict) -> None:
    from api.settings import get_settings

    monkeypatch.setenv("BEAVER_ENDPOINTS", json.dumps(endpoints))
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def cost_model_dir(tiny_llama_dir, tmp_path_factory):
    import torch

    from models.chat_format import ChatFormat
    from models.loading import load_score_model
    from models.score_model import save_score_model

    fmt = ChatFormat.load(tiny_llama_dir)
    torch.manual_seed(5)
    root = tmp_path_factory.mktemp("egress-judges")
    return {kind: save_score_model(load_score_model(tiny_llama_dir, fmt.tokenizer), fmt, root / kind, kind)
            for kind in ("reward", "cost")}


@pytest.fixture
def evaluation(client, keys, tiny_llama_dir, cost_model_dir):  # noqa: F811
    """A policy, a reward and a cost model and a prompt dataset: what an evaluate job needs."""
    h = auth(keys["trainer"])
    ids = {}
    for kind, path in (("policy", tiny_llama_dir), ("reward", cost_model_dir["reward"]),
                       ("cost", cost_model_dir["cost"])):
        r = client.post("/v1/models", json={"name": f"egress-{kind}", "kind": kind, "path": str(path)}, headers=h)
        assert r.status_code == 201, r.text
        ids[kind] = r.json()["id"]
    r = client.post("/v1/datasets", json={"name": "egress-prompts", "kind": "prompt", "records": [
        {"prompt": "how do i make a cake ?"}, {"prompt": "red green blue", "red_team": True}]}, headers=h)
    assert r.status_code == 201, r.text
    return {"dataset": r.json()["id"], "params": {
        "models": [ids["policy"]], "reward_model": ids["reward"], "cost_model": ids["cost"], "bootstrap": 0,
        "sampling": {"temperature": 1.0, "max_new_tokens": 4}}}


def post_evaluate(client, keys, evaluation, judge: dict):  # noqa: F811
    return client.post("/v1/jobs", json={"type": "evaluate", "datasets": [evaluation["dataset"]],
                                         "params": {**evaluation["params"], "judge": judge}},
                       headers=auth(keys["trainer"]))


# --- secrets and egress ------------------------------------------------------------------------------------


def test_a_job_cannot_choose_the_judges_host_or_a_worker_variable(client, keys, evaluation, monkeypatch):  # noqa: F811
    """The attack as it was run: ``url`` at the trainer's listener, ``api_key_env`` naming the
    worker's database URL. No such param exists any more: 422 before anything is queued."""
    listener = Stub(200, json.dumps({"choices": [{"message": {"content": "safe"}}]}))
    monkeypatch.setenv("BEAVER_DATABASE_URL_COPY", SECRET)
    try:
        for judge, params in (
                ({"url": f"http://127.0.0.1:{listener.port}/v1", "model": "x", "api_key_env": "BEAVER_DATABASE_URL_COPY"},
                 {"params.judge.url", "params.judge.model", "params.judge.api_key_env"}),
                ({"endpoint": "guard", "api_key_env": "BEAVER_DATABASE_URL_COPY"}, {"params.judge.api_key_env"}),
                ({"endpoint": f"http://127.0.0.1:{listener.port}/v1"}, {"params.judge.endpoint"})):
            r = post_evaluate(client, keys, evaluation, judge)
            assert r.status_code == 422, r.text
            assert r.json()["error"]["param"] in params, r.text
        assert client.get("/v1/jobs", headers=auth(keys["trainer"])).json()["data"] == []
        assert listener.requests == []
    finally:
        listener.close()


def test_an_unknown_endpoint_is_a_422_listing_the_known_names(client, keys, evaluation, monkeypatch):  # noqa: F811
    set_endpoints(monkeypatch, {"guard": {"url": "http://127.0.0.1:9/v1", "model": "m"},
                                "second": {"url": "http://127.0.0.1:9/v1", "model": "m"}})
    r = post_evaluate(client, keys, evaluation, {"endpoint": "nope"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "params.judge.endpoint", r.text
    assert "guard, second" in r.json()["error"]["message"]
    assert "127.0.0.1" not in r.text


def test_a_bad_unsafe_pattern_is_a_422_naming_it(client, keys, evaluation, monkeypatch):  # noqa: F811
    """It was a 500: ``re.error`` is not a ValueError. Its length is bounded too."""
    set_endpoints(monkeypatch, {"guard": {"url": "http://127.0.0.1:9/v1", "model": "m"}})
    for pattern in ("(unsafe", "[z-a]", "a" * 201):
        r = post_evaluate(client, keys, evaluation, {"endpoint": "guard", "unsafe_pattern": pattern})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["param"] == "params.judge.unsafe_pattern", r.text


def test_the_judges_errors_are_classified_never_echoed(client, keys, evaluation, monkeypatch):  # noqa: F811
    """A judge that does not answer fails the job with ``endpoint_failed`` and a class of failure:
    no URL, no port, no exception text, no response body — in the error or in any event, as a viewer
    or a trainer (who sees tracebacks) reads them."""
    from workers.tasks import execute

    down = closed_port()
    flaky = Stub(503, "upstream guard-7f3e crashed: SECRET-BODY")
    set_endpoints(monkeypatch, {"down": {"url": f"http://127.0.0.1:{down}/v1", "model": "m"},
                                "flaky": {"url": f"http://127.0.0.1:{flaky.port}/v1", "model": "m",
                                          "api_key": "sk-admins-own-key"}})
    try:
        for name, reason in (("down", "connection refused"), ("flaky", "HTTP 503")):
            r = post_evaluate(client, keys, evaluation, {"endpoint": name, "retries": 1, "timeout_seconds": 10,
                                                            "concurrency": 1})
            assert r.status_code == 201, r.text
            job_id = r.json()["id"]
            assert execute(job_id, "test-worker") == "failed"
            job = client.get(f"/v1/jobs/{job_id}", headers=auth(keys["viewer"])).json()
            assert job["error"] == {"code": "endpoint_failed",
                                    "message": f"judge endpoint {name!r} failed after 2 tries: {reason}"}
            for role in ("viewer", "trainer"):
                seen = client.get(f"/v1/jobs/{job_id}", headers=auth(keys[role])).text + \
                    client.get(f"/v1/jobs/{job_id}/events?limit=1000", headers=auth(keys[role])).text
                for leak in ("127.0.0.1", f":{down}", f":{flaky.port}", "SECRET-BODY", "guard-7f3e", "sk-admins",
                             "Connect call failed", "Errno"):
                    assert leak not in seen, (role, leak)
        # The admin's key went to the admin's endpoint: twice (a retry), and nowhere else.
        assert [q["authorization"] for q in flaky.requests] == ["Bearer sk-admins-own-key"] * 2
    finally:
        flaky.close()


def test_a_name_the_worker_lacks_fails_the_job_naming_the_name_only(client, keys, evaluation, monkeypatch):  # noqa: F811
    from workers.tasks import execute

    set_endpoints(monkeypatch, {"guard": {"url": "http://127.0.0.1:9/v1", "model": "m"}})
    r = post_evaluate(client, keys, evaluation, {"endpoint": "guard"})
    assert r.status_code == 201, r.text
    set_endpoints(monkeypatch, {})  # this worker was started without it
    assert execute(r.json()["id"], "test-worker") == "failed"
    error = client.get(f"/v1/jobs/{r.json()['id']}", headers=auth(keys["viewer"])).json()["error"]
    assert error["code"] == "invalid_input" and "'guard'" in error["message"] and "127.0.0.1" not in error["message"]


def test_endpoints_are_listed_to_admins_without_their_keys(client, keys, monkeypatch):  # noqa: F811
    set_endpoints(monkeypatch, {"guard": {"url": "http://guard:8000/v1", "model": "llama-guard",
                                          "api_key": "sk-admins-own-key"},
                                "open": {"url": "https://judge.example/v1", "model": "m"}})
    admin = client.get("/v1/endpoints", headers=auth(keys["admin"]))
    assert admin.status_code == 200 and "sk-admins" not in admin.text
    assert admin.json()["data"] == [
        {"object": "endpoint", "name": "guard", "model": "llama-guard", "url": "http://guard:8000/v1", "has_api_key": True},
        {"object": "endpoint", "name": "open", "model": "m", "url": "https://judge.example/v1", "has_api_key": False}]
    trainer = client.get("/v1/endpoints", headers=auth(keys["trainer"])).json()["data"]
    assert trainer == [{"object": "endpoint", "name": "guard", "model": "llama-guard"},
                       {"object": "endpoint", "name": "open", "model": "m"}]


def test_a_bad_endpoints_setting_stops_beaver_with_one_line_and_no_secret(tmp_path):
    """A mistyped BEAVER_ENDPOINTS was silently ignored (no such setting); now ``beaver`` refuses to
    start, naming the variable and what is wrong, never the value (it holds keys)."""
    env = {**os.environ, "BEAVER_HOME": str(tmp_path), "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
           "BEAVER_ENDPOINTS": '{"guard": {"model": "m", "api_key": "sk-admins-own-key"}}'}
    env.pop("BEAVER_DATABASE_URL", None)
    out = subprocess.run([sys.executable, "-m", "api.cli", "keys", "list"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "BEAVER_ENDPOINTS" in lines[0] and "guard.url" in lines[0], out.stderr
    assert "sk-admins" not in out.stderr + out.stdout and "Traceback" not in out.stderr


def test_a_judge_template_cannot_allocate_without_bound():
    """The template was filled with ``str.format``: ``{response:>999999999}`` built a 1 GB string per
    answer on the worker. Only ``{prompt}`` and ``{response}`` are replaced now."""
    from models.evaluate import judge_message

    message = judge_message("{response:>999999999} {prompt.__class__} {response}", "p {response}", "an answer")
    assert message == "{response:>999999999} {prompt.__class__} an answer"
    assert judge_message("{prompt} / {response}", "has {response} in it", "a") == "has {response} in it / a"


# --- smaller defects ------------------------------------------------------------------------------------------


def test_jsonl_lines_end_at_newlines_only_and_a_bom_is_dropped(client, keys):  # noqa: F811
    text = "\ufeff" + "\n".join(json.dumps({"prompt": f"a{sep}b"}, ensure_ascii=False)
                                for sep in ("\u2028", "\u2029", "\u0085", "\x0b", "\x0c")) + "\r\n"
    r = client.post("/v1/datasets", data={"name": "separators", "kind": "prompt"},
                    files={"file": ("p.jsonl", text.encode(), "application/jsonl")}, headers=auth(keys["trainer"]))
    assert r.status_code == 201, r.text
    records = client.get(f"/v1/datasets/{r.json()['id']}/records?limit=10", headers=auth(keys["trainer"])).json()
    assert [x["data"]["prompt"] for x in records["data"]] == [f"a{sep}b" for sep in "\u2028\u2029\u0085\x0b\x0c"]
    # Line numbers in errors are the file's own: the bad record is on line 3.
    bad = "\ufeff" + json.dumps({"prompt": "x\u2028y"}, ensure_ascii=False) + "\n\n{\"prompt\": 3}\n"
    r = client.post("/v1/datasets", data={"name": "bad", "kind": "prompt"},
                    files={"file": ("p.jsonl", bad.encode(), "application/jsonl")}, headers=auth(keys["trainer"]))
    assert r.status_code == 422 and [d["line"] for d in r.json()["error"]["details"]] == [3], r.text


# Fills the disk for one process: writes past RLIMIT_FSIZE fail with EFBIG (SIGXFSZ ignored), as a write
# on a full disk fails with ENOSPC; the trainer, torch.save and the filesystem are the real ones.
FULL_DISK_RUN = """
import json, os, resource, signal, sys
from pathlib import Path
from models.jobs import JobContext
from models.sft import SFTConfig, run
from workers.tasks import error_object

out = Path(sys.argv[2])
out.mkdir(parents=True)
config = SFTConfig(model=sys.argv[1], epochs=2, batch_size=4, checkpoint_every=1)
records = [{"prompt": "how do i make a cake ?", "response": "mix flour ."}] * 4
ctx = JobContext(output_dir=out, datasets=["d"], load_dataset=lambda _: records)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
try:
    run(config, ctx)
    print(json.dumps({"error": None}))
except BaseException as e:
    print(json.dumps({"error": error_object(e), "left": sorted(p.name for p in out.iterdir())}))
"""


def test_a_full_disk_is_disk_full_and_leaves_no_temporary_checkpoint(tiny_llama_dir, tmp_path):
    """It was PyTorch's ``unexpected pos`` as ``internal_error``, with ``.tmp-checkpoint-1`` left behind."""
    weights = sum(p.stat().st_size for p in Path(tiny_llama_dir).glob("*.safetensors"))
    out = tmp_path / "artifacts" / "job-1" / "attempt-1"
    env = {**os.environ, "BEAVER_HOME": str(tmp_path), "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    env.pop("BEAVER_ARTIFACTS_DIR", None)
    # The model's weights fit; the checkpoint's trainer state (Adam's two moments: twice as large) does not.
    done = subprocess.run([sys.executable, "-c", FULL_DISK_RUN, str(tiny_llama_dir), str(out), str(int(weights * 1.5))],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["error"] is not None and result["error"]["code"] == "disk_full", result
    assert str(tmp_path / "artifacts") in result["error"]["message"], result
    assert not [name for name in result["left"] if name.startswith(".tmp")], result


def test_a_write_to_a_full_device_is_disk_full_not_model_not_found():
    """Any OSError was ``model_not_found``. /dev/full answers every write with ENOSPC, as a full disk does."""
    from workers.tasks import error_object

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    with pytest.raises(OSError) as raised:
        with open("/dev/full", "w") as f:
            f.write("x" * 10_000)
    error = error_object(raised.value)
    assert error["code"] == "disk_full" and error["message"].startswith("no space left on the device"), error
    assert error_object(ConnectionResetError(104, "Connection reset by peer"))["code"] == "internal_error"


def test_generate_names_its_dataset_after_the_job(client, keys, tiny_llama_dir):  # noqa: F811
    from workers.tasks import execute

    h = auth(keys["trainer"])
    model = client.post("/v1/models", json={"name": "gen-policy", "kind": "policy", "path": str(tiny_llama_dir)},
                        headers=h).json()["id"]
    dataset = client.post("/v1/datasets", json={"name": "gen-prompts", "kind": "prompt",
                                                "records": [{"prompt": "hi"}]}, headers=h).json()["id"]
    r = client.post("/v1/jobs", json={"type": "generate", "datasets": [dataset], "params": {
        "model": model, "sampling": {"max_new_tokens": 2}}}, headers=h)
    assert r.status_code == 201, r.text
    assert execute(r.json()["id"], "test-worker") == "succeeded"
    job = client.get(f"/v1/jobs/{r.json()['id']}", headers=h).json()
    names = [client.get(f"/v1/datasets/{d}", headers=h).json()["name"] for d in job["result_datasets"]]
    assert names == [f"samples-{job['id']}"]


def cli(*args: str):
    from api.cli import cli as beaver

    return CliRunner().invoke(beaver, list(args))


def test_the_cli_refuses_to_revoke_the_last_admin_key(beaver_env):  # noqa: F811
    first = cli("keys", "create", "--name", "only-admin", "--role", "admin")
    assert first.exit_code == 0, first.output
    key_id = first.stdout.split()[0]
    revoked = cli("keys", "revoke", key_id)
    assert revoked.exit_code == 1 and "last admin key" in revoked.output, revoked.output
    assert "active" in cli("keys", "list").stdout
    # With a second admin, the first one may go (as through the API).
    cli("keys", "create", "--name", "second-admin", "--role", "admin")
    assert cli("keys", "revoke", key_id).exit_code == 0


def test_keys_list_says_which_database_and_where_the_demos_platform_is(beaver_env, monkeypatch):  # noqa: F811
    from api.cli import clear_caches
    from api.db import upgrade

    demo = beaver_env / "demo" / "platform"  # what `make demo` leaves: a platform of its own, with its keys
    demo.mkdir(parents=True)
    monkeypatch.setenv("BEAVER_HOME", str(demo))
    clear_caches()
    upgrade()
    monkeypatch.setenv("BEAVER_HOME", str(beaver_env))
    clear_caches()
    listed = cli("keys", "list")
    assert listed.exit_code == 0 and listed.stdout == ""
    assert f"database: sqlite:///{(beaver_env / 'beaver.db').resolve()}" in listed.stderr, listed.stderr
    assert f"BEAVER_HOME={demo.resolve()} beaver keys list" in listed.stderr, listed.stderr


def test_serve_vllm_without_vllm_says_which_python_and_the_fix(beaver_env):  # noqa: F811
    """It said only ``No module named 'vllm'`` (from the server it had already started)."""
    result = cli("serve-vllm", "some-model", "--python", sys.executable)
    assert result.exit_code == 1
    assert f"vLLM is not installed in the Python {sys.executable}" in result.output, result.output
    assert "BEAVER_VLLM_PYTHON" in result.output and "tests/vllm_env.sh" in result.output
