"""Paths kept inside: a model is registered, and a job loads a local folder, only from under
``BEAVER_MODEL_ROOTS``, checked after symlinks and ``..`` are resolved, with one answer whether or
not a path outside exists. Real app, real SQLite database, real folders and symlinks."""

from __future__ import annotations

import json
import shutil

import pytest
from sqlmodel import Session

from tests.api.conftest import auth


@pytest.fixture
def roots(beaver_env, tmp_path, monkeypatch, tiny_llama_dir):
    """Two model roots holding a real model; beside them, outside, another model folder."""
    from api.settings import get_settings

    a, b = tmp_path / "roots" / "a", tmp_path / "roots" / "b"
    b.mkdir(parents=True)
    shutil.copytree(tiny_llama_dir, a / "llama")
    outside = tmp_path / "outside" / "model"
    outside.mkdir(parents=True)
    (outside / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    monkeypatch.setenv("BEAVER_MODEL_ROOTS", f"{a}:{b}")
    get_settings.cache_clear()
    return {"a": a, "b": b, "inside": a / "llama", "outside": outside}


def register(client, keys, path: str):
    return client.post("/v1/models", json={"name": "m", "kind": "policy", "path": path}, headers=auth(keys["trainer"]))


def refusal(r, param: str, path: str) -> str:
    """The 422's message with the path taken out, to compare refusals of different paths."""
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    return error["message"].replace(repr(path), "PATH")


def test_default_roots_are_the_artifacts_dir_and_home_models(beaver_env, monkeypatch):
    from api.settings import get_settings

    monkeypatch.delenv("BEAVER_MODEL_ROOTS")
    get_settings.cache_clear()
    settings = get_settings()
    assert settings.resolved_model_roots == [settings.resolved_artifacts_dir, (beaver_env / "models").resolve()]


def test_register_only_under_the_roots(client, keys, roots):
    r = register(client, keys, str(roots["inside"]))
    assert r.status_code == 201 and r.json()["path"] == str(roots["inside"])
    # A symlink that stays inside the roots is fine; the stored path is the resolved one.
    (roots["b"] / "alias").symlink_to(roots["inside"])
    r = register(client, keys, str(roots["b"] / "alias"))
    assert r.status_code == 201 and r.json()["path"] == str(roots["inside"])


def test_outside_the_roots_one_answer_whether_or_not_it_exists(client, keys, roots):
    escape_link = roots["a"] / "escape"
    escape_link.symlink_to(roots["outside"])
    existing, missing = str(roots["outside"]), str(roots["outside"].parent / "no-such-model")
    dotdot = f"{roots['a']}/../../outside/model"
    answers = {path: refusal(register(client, keys, path), "path", path)
               for path in (existing, missing, dotdot, str(escape_link), str(escape_link / "sub"), "/etc", "/")}
    assert len(set(answers.values())) == 1, answers  # existence outside does not leak
    assert "not under a model root" in answers[existing] and str(roots["a"]) in answers[existing]
    for relative in ("model", "./model", "../outside/model", "roots/a/llama"):
        assert "not an absolute path" in refusal(register(client, keys, relative), "path", relative)
    assert client.get("/v1/models", headers=auth(keys["admin"])).json()["data"] == []


def test_jobs_load_local_folders_only_under_the_roots(client, keys, roots, monkeypatch):
    from api.settings import get_settings

    h = auth(keys["trainer"])
    sft = client.post("/v1/datasets", json={"name": "sft", "kind": "sft", "records": [
        {"prompt": "how do i make a cake ?", "response": "sure ."}]}, headers=h).json()["id"]

    def job(model: str):
        return client.post("/v1/jobs", json={"type": "sft", "params": {"model": model}, "datasets": [sft]}, headers=h)

    (roots["a"] / "escape").symlink_to(roots["outside"])
    outside = [str(roots["outside"]), str(roots["outside"].parent / "missing"), str(roots["a"] / "escape"),
               f"{roots['a']}/../../outside/model"]
    answers = {p: refusal(job(p), "params.model", p) for p in outside}
    assert len(set(answers.values())) == 1 and "not under a model root" in answers[outside[0]], answers
    assert "not an absolute path" in refusal(job("./llama"), "params.model", "./llama")
    r = job(str(roots["inside"]))
    assert r.status_code == 201, r.text
    # A registered model stays usable by id when the roots change later: registration was the check.
    registered = register(client, keys, str(roots["inside"])).json()["id"]
    monkeypatch.setenv("BEAVER_MODEL_ROOTS", str(roots["b"]))
    get_settings.cache_clear()
    assert job(registered).status_code == 201
    assert job(str(roots["inside"])).status_code == 422


def test_the_worker_resolves_references_through_the_same_check(client, keys, roots):
    from api.db import get_engine
    from api.registry import ModelNotFound, resolve_model_path

    (roots["b"] / "escape").symlink_to(roots["outside"])
    with Session(get_engine()) as session:
        assert resolve_model_path(session, str(roots["inside"])) == str(roots["inside"])
        for ref in (str(roots["outside"]), str(roots["b"] / "escape"), "../outside/model"):
            with pytest.raises(ModelNotFound):
                resolve_model_path(session, ref)
