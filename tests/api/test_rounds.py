"""A round records the chat template its policy was trained with, read from the policy's artifact
metadata: a real SFT job (run by the worker's own code, in-process) trains the policy."""

from __future__ import annotations

import hashlib

from tests.api.conftest import auth


def test_round_shows_the_chat_template_of_its_policy(client, keys, tiny_llama_dir):
    from transformers import AutoTokenizer

    from workers.tasks import execute

    h, viewer = auth(keys["trainer"]), auth(keys["viewer"])
    base = client.post("/v1/models", json={"name": "tiny-base", "kind": "policy", "path": str(tiny_llama_dir)},
                       headers=h).json()["id"]
    data = client.post("/v1/datasets", json={"name": "sft", "kind": "sft", "records": [
        {"prompt": "how do i make a cake ?", "response": "sure . mix flour ."}]}, headers=h).json()["id"]
    job = client.post("/v1/jobs", json={"type": "sft", "params": {"model": base, "epochs": 1, "batch_size": 1},
                                        "datasets": [data]}, headers=h).json()
    assert execute(job["id"], "test-worker") == "succeeded"
    policy = client.get(f"/v1/jobs/{job['id']}", headers=viewer).json()["result_models"][0]
    saved = AutoTokenizer.from_pretrained(client.get(f"/v1/models/{policy}", headers=h).json()["path"])  # staff only
    # The word-level model has no template of its own: it trained with (and saved) Safe RLHF's.
    expected = {"source": "safe-rlhf", "sha256": hashlib.sha256(saved.chat_template.encode()).hexdigest()[:16]}

    for name, model in (("beaver-v1", policy), ("beaver-v0", base)):
        r = client.post("/v1/rounds", json={"name": name, "policy": model}, headers=h)
        assert r.status_code == 201, r.text
        want = expected if name == "beaver-v1" else None  # a hand-registered base model has no record
        assert r.json()["chat_template"] == want
        assert client.get(f"/v1/rounds/{name}", headers=viewer).json()["chat_template"] == want
        assert client.get(f"/v1/models/{name}", headers=viewer).json()["chat_template"] == want
    listed = {r["name"]: r["chat_template"] for r in client.get("/v1/rounds", headers=viewer).json()["data"]}
    assert listed == {"beaver-v1": expected, "beaver-v0": None}
    rounds_as_models = client.get("/v1/models?kind=round", headers=viewer).json()["data"]
    as_models = {m["id"]: m["chat_template"] for m in rounds_as_models}
    assert as_models == listed
