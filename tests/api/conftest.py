"""In-process API tests on a real SQLite database (or, with the ``database`` fixture, a real PostgreSQL
schema as well) and the embedded broker (no worker needed)."""

from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from api.cli import clear_caches


@pytest.fixture
def beaver_env(tmp_path, tmp_path_factory, monkeypatch):
    """A fresh BEAVER_HOME with a migrated SQLite database. The tests' model folders live under
    pytest's base temporary directory, so that is the model root (BEAVER_MODEL_ROOTS)."""
    monkeypatch.setenv("BEAVER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("BEAVER_MODEL_ROOTS", str(tmp_path_factory.getbasetemp()))
    for name in ("BEAVER_DATABASE_URL", "BEAVER_BROKER_URL", "BEAVER_RESULT_BACKEND", "BEAVER_MAX_UPLOAD_MB",
                 "BEAVER_MAX_BODY_MB"):
        monkeypatch.delenv(name, raising=False)
    clear_caches()
    from api.db import upgrade

    (tmp_path / "home").mkdir()
    upgrade()
    yield tmp_path / "home"
    clear_caches()


@pytest.fixture
def keys(beaver_env) -> dict[str, str]:
    """One API key per role."""
    from api.db import get_engine
    from api.deps import create_key

    out = {}
    with Session(get_engine()) as session:
        for role in ("admin", "trainer", "annotator", "viewer"):
            out[role] = create_key(session, role, role)[1]
    return out


@pytest.fixture
def client(keys):
    from api.app import create_app

    with TestClient(create_app()) as c:
        yield c


@pytest.fixture
def live_server(keys):
    """The app under a real uvicorn server in a thread (same process, same settings); yields its port."""
    import socket
    import threading
    import time

    import uvicorn

    from api.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield port
    server.should_exit = True
    thread.join(timeout=10)


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="session")
def score_model_dir(tiny_llama_dir, tmp_path_factory):
    """A reward model on the tiny Llama, saved the way Beaver saves one (LlamaForSequenceClassification,
    its tokenizer and chat template); random head."""
    import torch

    from models.chat_format import ChatFormat
    from models.loading import load_score_model
    from models.score_model import save_score_model

    fmt = ChatFormat.load(tiny_llama_dir)
    torch.manual_seed(3)
    return save_score_model(load_score_model(tiny_llama_dir, fmt.tokenizer), fmt,
                            tmp_path_factory.mktemp("score") / "reward", "reward")


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, beaver_env, monkeypatch):
    """The embedded SQLite database, or a fresh PostgreSQL schema (skipped when none answers)."""
    if request.param == "sqlite":
        yield request.param
        return
    import psycopg

    from api.cli import clear_caches
    from api.db import get_engine, upgrade
    from tests.integration.conftest import PG_URL, _require_team_services

    _require_team_services()
    schema = f"beaver_api_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_URL.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    monkeypatch.setenv("BEAVER_DATABASE_URL", f"{PG_URL}?options=-csearch_path%3D{schema}")
    clear_caches()
    upgrade()
    try:
        yield request.param
    finally:
        get_engine().dispose()
        with psycopg.connect(PG_URL.replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")
