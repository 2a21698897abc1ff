"""In-process API tests on a real SQLite database and the embedded broker (no worker needed)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from api.cli import clear_caches


@pytest.fixture
def beaver_env(tmp_path, monkeypatch):
    """A fresh BEAVER_HOME with a migrated SQLite database."""
    monkeypatch.setenv("BEAVER_HOME", str(tmp_path / "home"))
    for name in ("BEAVER_DATABASE_URL", "BEAVER_BROKER_URL", "BEAVER_RESULT_BACKEND", "BEAVER_MAX_UPLOAD_MB"):
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


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}
