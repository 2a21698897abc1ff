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
