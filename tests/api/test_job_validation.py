"""POST /v1/jobs checks every model a job names and every dataset's kind before queueing it: what
cannot work is a 422 naming the param, never a 201 that fails later. Real SQLite database, the
in-process app, real model folders; the Hugging Face cache is a real cache layout in a temporary
directory, and the online checks run huggingface_hub's own client against a local HTTP server."""

from __future__ import annotations

import json
import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlmodel import Session

from tests.api.conftest import auth

PREFERENCE = {"prompt": "how do i make a cake ?", "response_0": "sure . mix flour .", "response_1": "no .",
              "is_response_0_safe": True, "is_response_1_safe": True, "better_response_id": 0,
              "safer_response_id": 0}


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache of the test's own, and the hub switched off."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture
def registry(client, keys, tiny_llama_dir, score_model_dir) -> dict:
    """A registered policy, reward and cost model, a round, and one dataset of each kind."""
    h = auth(keys["trainer"])
    ids = {}
    for kind, path in (("policy", tiny_llama_dir), ("reward", score_model_dir), ("cost", score_model_dir)):
        r = client.post("/v1/models", json={"name": f"tiny-{kind}", "kind": kind, "path": str(path)}, headers=h)
        assert r.status_code == 201, r.text
        ids[kind] = r.json()["id"]
    r = client.post("/v1/rounds", json={"name": "beaver-v0", "policy": ids["policy"]}, headers=h)
    assert r.status_code == 201, r.text
    for kind, record in (("prompt", {"prompt": "hi"}), ("sft", {"prompt": "hi", "response": "hello ."}),
                         ("preference", PREFERENCE)):
        r = client.post("/v1/datasets", json={"name": f"{kind}-data", "kind": kind, "records": [record]}, headers=h)
        assert r.status_code == 201, r.text
        ids[kind + "_data"] = r.json()["id"]
    return ids


def post_job(client, keys, job_type: str, datasets: list, **params):
    return client.post("/v1/jobs", json={"type": job_type, "params": params, "datasets": datasets},
                       headers=auth(keys["trainer"]))


def assert_422(r, param: str, *words: str) -> str:
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    for word in words:
        assert word in error["message"], (word, error["message"])
    return error["message"]


def ppo_params(ids: dict, **overrides) -> dict:
    return {"model": ids["policy"], "reward_model": ids["reward"], "cost_model": ids["cost"], **overrides}


# --- references that name nothing ------------------------------------------------------------------

def test_unknown_references_are_422_naming_the_param(client, keys, registry, tmp_path):
    sft = [registry["sft_data"]]
    message = assert_422(post_job(client, keys, "sft", sft, model="no-such-model"), "params.model", "'no-such-model'")
    assert "not a registered model" in message and "HF_HUB_OFFLINE" in message
    assert_422(post_job(client, keys, "sft", sft, model=str(tmp_path / "nowhere" / "x" / "y")), "params.model",
               "not a registered model id or name, a round name, a local directory or a Hugging Face hub id")
    r = client.post("/v1/jobs", json={"type": "ppo_lag", "datasets": [registry["prompt_data"]],
                                      "params": ppo_params(registry, cost_model="cost-nope")},
                    headers=auth(keys["trainer"]))
    assert_422(r, "params.cost_model", "'cost-nope'")
    assert client.get("/v1/jobs", headers=auth(keys["trainer"])).json()["data"] == []


def test_local_directory_without_config_json(client, keys, registry, tmp_path):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"\0")
    assert_422(post_job(client, keys, "sft", [registry["sft_data"]], model=str(folder)), "params.model",
               str(folder), "no config.json")


def test_registered_model_that_lost_its_directory(client, keys, registry, tiny_llama_dir, tmp_path):
    copy = shutil.copytree(tiny_llama_dir, tmp_path / "copy")
    model = client.post("/v1/models", json={"name": "moved", "kind": "policy", "path": str(copy)},
                        headers=auth(keys["trainer"])).json()
    shutil.rmtree(copy)
    assert_422(post_job(client, keys, "sft", [registry["sft_data"]], model=model["id"]), "params.model",
               str(copy), "no longer a directory")


# --- references of the wrong kind ----------------------------------------------------------------

def test_registered_models_of_the_wrong_kind(client, keys, registry):
    ids, prompts, sft = registry, [registry["prompt_data"]], [registry["sft_data"]]
    # "causal": a policy, never a score model
    assert_422(post_job(client, keys, "sft", sft, model=ids["reward"]), "params.model",
               "is a registered reward model, not a policy model")
    assert_422(post_job(client, keys, "dpo", [ids["preference_data"]], model=ids["policy"], reference=ids["cost"]),
               "params.reference", "is a registered cost model")
    # "score": reward_model a reward model, cost_model a cost model; a round stands for its policy
    assert_422(post_job(client, keys, "ppo_lag", prompts, **ppo_params(ids, reward_model=ids["cost"])),
               "params.reward_model", "is a registered cost model, not a reward model")
    assert_422(post_job(client, keys, "ppo_lag", prompts, **ppo_params(ids, cost_model=ids["reward"])),
               "params.cost_model", "is a registered reward model, not a cost model")
    assert_422(post_job(client, keys, "ppo", prompts, **ppo_params(ids, reward_model=ids["policy"])),
               "params.reward_model", "is a registered policy model")
    assert_422(post_job(client, keys, "ppo", prompts, **ppo_params(ids, reward_model="beaver-v0")),
               "params.reward_model", "is a round, which stands for its policy here")
    # "any": a backbone may be any model
    for backbone in (ids["policy"], ids["cost"], "beaver-v0"):
        r = post_job(client, keys, "reward", [ids["preference_data"]], model=backbone)
        assert r.status_code == 201, r.text
    r = post_job(client, keys, "ppo_lag", prompts, **ppo_params(ids, reward_critic=ids["reward"], model="beaver-v0"))
    assert r.status_code == 201, r.text
    assert r.json()["params"]["model"] == "beaver-v0" and r.json()["params"]["objective"] == "lagrangian"


def test_local_folders_are_judged_by_their_architectures(client, keys, registry, tiny_llama_dir, score_model_dir):
    ids, prompts = registry, [registry["prompt_data"]]
    assert_422(post_job(client, keys, "sft", [ids["sft_data"]], model=str(score_model_dir)), "params.model",
               "is a score model (LlamaForSequenceClassification), not a causal language model")
    assert_422(post_job(client, keys, "generate", prompts, model=str(score_model_dir)), "params.model",
               "LlamaForSequenceClassification")
    assert_422(post_job(client, keys, "ppo_lag", prompts, **ppo_params(ids, cost_model=str(tiny_llama_dir))),
               "params.cost_model", "is a LlamaForCausalLM, not a score model (*ForSequenceClassification)")
    r = post_job(client, keys, "ppo_lag", prompts, **ppo_params(ids, model=str(tiny_llama_dir),
                                                                 reward_model=str(score_model_dir),
                                                                 cost_model=str(score_model_dir)))
    assert r.status_code == 201, r.text
    r = post_job(client, keys, "cost", [ids["preference_data"]], model=str(score_model_dir))
    assert r.status_code == 201, r.text



def test_several_cost_models_are_checked_like_cost_model(client, keys, registry):
    """``cost_models``: each entry's model is checked as cost_model is (422 naming its index), names are
    unique, and the list replaces the one-constraint form rather than joining it."""
    ids, prompts = registry, [registry["prompt_data"]]
    good = [{"model": ids["cost"], "threshold": 0.0, "name": "violence"},
            {"model": ids["cost"], "threshold": 0.5, "name": "privacy"}]
    params = dict(model=ids["policy"], reward_model=ids["reward"], constraint="per_prompt")
    r = post_job(client, keys, "ppo_lag", prompts, cost_models=good, **params)
    assert r.status_code == 201, r.text
    assert [c["name"] for c in r.json()["params"]["cost_models"]] == ["violence", "privacy"]
    assert r.json()["params"]["constraint"] == "per_prompt"
    bad_ref = [good[0], {**good[1], "model": "cost-nope"}]
    assert_422(post_job(client, keys, "ppo_lag", prompts, cost_models=bad_ref, **params),
               "params.cost_models[1].model", "'cost-nope'", "not a registered model")
    assert_422(post_job(client, keys, "ppo_lag", prompts, cost_models=[{**good[0], "model": ids["reward"]}], **params),
               "params.cost_models[0].model", "is a registered reward model, not a cost model")
    assert_422(post_job(client, keys, "ppo_lag", prompts, cost_models=[good[0], {**good[1], "name": "violence"}],
                        **params), "params.cost_models", "names must differ")
    assert_422(post_job(client, keys, "ppo_lag", prompts, cost_models=good, cost_model=ids["cost"], **params),
               "params.cost_models", "not both")
    assert_422(post_job(client, keys, "ppo_lag", prompts, cost_models=[{**good[0], "name": "Violence!"}], **params),
               "params.cost_models[0].name", "a-z")
    assert_422(post_job(client, keys, "ppo_lag", prompts, cost_models=[good[0]] * 9, **params),
               "params.cost_models")
    assert_422(post_job(client, keys, "ppo_shaping", prompts, cost_models=good, **params), "params.cost_models",
               "one cost_model")

# --- Hugging Face hub ids ------------------------------------------------------------------------

def cache_hub_model(cache, repo_id: str, source, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """Lay ``source``'s files out as huggingface_hub caches a download of ``repo_id``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    shutil.copytree(source, snapshot)
    return snapshot


def test_hub_id_not_in_the_cache_while_offline(client, keys, registry, hf_cache):
    message = assert_422(post_job(client, keys, "sft", [registry["sft_data"]], model="acme/tiny-chat"),
                         "params.model", "'acme/tiny-chat'", "local cache", "HF_HUB_OFFLINE")
    assert str(hf_cache) in message


def test_cached_hub_model_is_accepted_and_resolved_to_its_snapshot(client, keys, registry, hf_cache, tiny_llama_dir,
                                                                  score_model_dir):
    from api.db import get_engine
    from api.registry import resolve_model_path

    snapshot = cache_hub_model(hf_cache, "acme/tiny-chat", tiny_llama_dir)
    r = post_job(client, keys, "sft", [registry["sft_data"]], model="acme/tiny-chat")
    assert r.status_code == 201, r.text
    with Session(get_engine()) as session:
        assert resolve_model_path(session, "acme/tiny-chat") == str(snapshot)
    # a cached score model is judged by its config.json like a local folder
    cache_hub_model(hf_cache, "acme/tiny-reward", score_model_dir)
    assert_422(post_job(client, keys, "sft", [registry["sft_data"]], model="acme/tiny-reward"), "params.model",
               "LlamaForSequenceClassification")
    r = post_job(client, keys, "ppo", [registry["prompt_data"]],
                 **ppo_params(registry, reward_model="acme/tiny-reward"))
    assert r.status_code == 201, r.text


class FakeHub(BaseHTTPRequestHandler):
    """The hub's model-info route for two repos; every other repo is missing, as the hub says it."""

    MODELS = {"acme/online-chat": ["Qwen2ForCausalLM"], "acme/online-reward": ["Qwen2ForSequenceClassification"]}

    def do_GET(self):  # noqa: N802 — http.server's name
        repo_id = self.path.split("?")[0].removeprefix("/api/models/")
        if repo_id in self.MODELS:
            body, status, headers = {"id": repo_id, "config": {"architectures": self.MODELS[repo_id]}}, 200, {}
        else:
            body, status, headers = {"error": "Repository not found"}, 404, {"X-Error-Code": "RepoNotFound"}
        data = json.dumps(body).encode()
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", "Content-Length": str(len(data)), **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def online(monkeypatch):
    """The hub switched on (huggingface_hub read HF_HUB_OFFLINE once, at import)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_online_hub_ids_are_looked_up_on_the_hub(client, keys, registry, online, monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    try:
        sft = [registry["sft_data"]]
        r = post_job(client, keys, "sft", sft, model="acme/online-chat")
        assert r.status_code == 201, r.text
        assert_422(post_job(client, keys, "sft", sft, model="acme/missing"), "params.model",
                   "'acme/missing'", "no such model on the Hugging Face hub")
        assert_422(post_job(client, keys, "sft", sft, model="acme/online-reward"), "params.model",
                   "Qwen2ForSequenceClassification")
    finally:
        server.shutdown()
        server.server_close()


def test_unreachable_hub_says_how_to_check_offline(client, keys, registry, online, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    assert_422(post_job(client, keys, "sft", [registry["sft_data"]], model="acme/tiny-chat"), "params.model",
               "'acme/tiny-chat'", "not in the local Hugging Face cache", "not reachable", "HF_HUB_OFFLINE=1")


# --- datasets ------------------------------------------------------------------------------------

def test_datasets_of_the_wrong_kind_or_none(client, keys, registry):
    ids = registry
    assert_422(post_job(client, keys, "sft", [ids["sft_data"], ids["prompt_data"]], model=ids["policy"]),
               "datasets[1]", "'prompt-data'", ids["prompt_data"], "has kind prompt", "sft jobs read sft datasets")
    assert_422(post_job(client, keys, "reward", [ids["sft_data"]], model=ids["policy"]), "datasets[0]",
               "has kind sft", "reward jobs read preference datasets")
    r = post_job(client, keys, "ppo_lag", [ids["prompt_data"], ids["preference_data"], ids["sft_data"]],
                 **ppo_params(ids))
    assert r.status_code == 201, r.text
    assert_422(post_job(client, keys, "sft", [], model=ids["policy"]), "datasets", "sft jobs read sft datasets",
               "at least one")
    assert_422(post_job(client, keys, "generate", [], model=ids["policy"]), "datasets", "at least one")
    r = post_job(client, keys, "sft", ["ds-missing"], model=ids["policy"])
    assert r.status_code == 404 and r.json()["error"]["param"] == "datasets[0]"
    # a job type that reads any kind still takes none
    assert client.post("/v1/jobs", json={"type": "dataset_stats"}, headers=auth(keys["trainer"])).status_code == 201


def test_rollout_engine_vllm_is_refused_where_this_host_knows_vllm_is_missing(client, keys, registry, tmp_path,
                                                                               monkeypatch):
    """The Python the workers run vLLM in (BEAVER_VLLM_PYTHON, else the API's own) is on this host
    without vLLM: 422 naming it and the fix. One this host does not have belongs to a worker's image:
    accepted (that worker decides). hf needs nothing; rollout_gpus needs vllm."""
    import importlib.util
    import sys

    from api.routers.jobs import _VLLM_PROBES
    from api.settings import get_settings

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("Beaver's own Python has vLLM here")
    job = {"model": registry["policy"], "rollout_engine": "vllm"}
    for python in ("", sys.executable):  # unset: the API's own Python, as the embedded worker's
        monkeypatch.setenv("BEAVER_VLLM_PYTHON", python)
        get_settings.cache_clear()
        _VLLM_PROBES.clear()
        message = assert_422(post_job(client, keys, "generate", [registry["prompt_data"]], **job),
                             "params.rollout_engine", "vLLM is not installed", "BEAVER_VLLM_PYTHON")
        assert sys.executable in message
    monkeypatch.setenv("BEAVER_VLLM_PYTHON", str(tmp_path / "gpu-image" / "bin" / "python"))
    get_settings.cache_clear()
    assert post_job(client, keys, "generate", [registry["prompt_data"]], **job).status_code == 201
    assert post_job(client, keys, "generate", [registry["prompt_data"]], model=registry["policy"],
                    rollout_engine="hf").status_code == 201
    assert_422(post_job(client, keys, "ppo_lag", [registry["prompt_data"]], model=registry["policy"],
                        reward_model=registry["reward"], cost_model=registry["cost"], rollout_gpus=2),
               "params.rollout_gpus", "needs rollout_engine vllm")


def test_rollout_engine_vllm_is_accepted_where_this_host_has_it(client, keys, registry, vllm_python, monkeypatch):
    from api.routers.jobs import _VLLM_PROBES
    from api.settings import get_settings

    monkeypatch.setenv("BEAVER_VLLM_PYTHON", vllm_python)
    get_settings.cache_clear()
    _VLLM_PROBES.clear()
    r = post_job(client, keys, "evaluate", [registry["prompt_data"]], models=[registry["policy"]],
                 reward_model=registry["reward"], cost_model=registry["cost"], rollout_engine="vllm")
    assert r.status_code == 201, r.text


def test_a_cost_jobs_harm_categories_must_be_flagged_in_its_datasets(client, keys, registry):
    """harm_categories is checked against the datasets' upload statistics (a misspelt category would
    train a model of nothing), and only a cost job takes it."""
    h = auth(keys["trainer"])
    flagged = {**PREFERENCE, "is_response_1_safe": False, "response_1_harm_category": {"violence": True, "fraud": False}}
    r = client.post("/v1/datasets", json={"name": "flagged", "kind": "preference", "records": [flagged]}, headers=h)
    assert r.status_code == 201, r.text
    data = [registry["preference_data"], r.json()["id"]]
    message = assert_422(post_job(client, keys, "cost", data, model="tiny-policy", harm_categories=["violence", "fruad"]),
                         "params.harm_categories", "'fruad'", "violence")
    assert "'violence'" not in message  # only the unknown name is named as such
    assert_422(post_job(client, keys, "cost", [registry["preference_data"]], model="tiny-policy",
                        harm_categories=["violence"]), "params.harm_categories", "no category at all")
    assert_422(post_job(client, keys, "reward", data, model="tiny-policy", harm_categories=["violence"]),
               "params.harm_categories")
    assert_422(post_job(client, keys, "cost", data, model="tiny-policy", harm_categories=["x"] * 65),
               "params.harm_categories", "at most 64")
    r = post_job(client, keys, "cost", data, model="tiny-policy", harm_categories=["violence"])
    assert r.status_code == 201, r.text
    assert r.json()["params"]["harm_categories"] == ["violence"]
