"""The Python client (api/client.py) and the CLI's remote commands on it, against a real platform
(``beaver api`` + a real worker in subprocesses): upload → submit a tiny sft job → follow it → pull
its model into a folder ``from_pretrained`` loads; errors as ``BeaverError`` with the API's code; the
CLI's exit codes (0 succeeded, 1 failed or cancelled, 3 refused by the API, 4 unreachable)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from api.client import BeaverError, Client
from tests.integration.conftest import REPO, Platform, _free_port

pytestmark = pytest.mark.integration

SFT_RECORDS = [{"prompt": f"question {i} ?", "response": "sure . step 1 : mix flour ."} for i in range(12)]
SFT_PARAMS = {"epochs": 1, "batch_size": 4, "optim": {"lr": 1e-3}}


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    """One embedded platform: the client speaks HTTP only, the same to either backend (test_platform.py
    runs the API over both); one platform keeps the shared CPUs free."""
    home = tmp_path_factory.mktemp("beaver-client")
    env = {"BEAVER_HOME": str(home), "BEAVER_ORPHAN_AFTER_SECONDS": "8", "BEAVER_HEARTBEAT_SECONDS": "1",
           "BEAVER_MODEL_ROOTS": str(tmp_path_factory.getbasetemp())}
    p = Platform("embedded", env, home)
    try:
        p.start()
        yield p
    finally:
        p.stop()


@pytest.fixture(scope="module")
def beaver(platform) -> Client:
    with Client(platform.url, platform.keys["admin"]) as client:
        yield client


@pytest.fixture(scope="module")
def base(beaver, tiny_llama_dir) -> str:
    return beaver.register_model("tiny-client-base", "policy", str(tiny_llama_dir))["id"]


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_upload_submit_follow_and_pull_a_model_from_pretrained_loads(beaver, base, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    dataset = beaver.upload_dataset(write_jsonl(tmp_path / "chats.jsonl", SFT_RECORDS), kind="sft")
    assert dataset["name"] == "chats" and dataset["num_records"] == len(SFT_RECORDS)
    assert list(beaver.records(dataset["id"])) == SFT_RECORDS
    assert dataset["id"] in [d["id"] for d in beaver.list_datasets()]

    job = beaver.submit("sft", {"model": base, **SFT_PARAMS}, [dataset["id"]])
    events = list(beaver.follow(job["id"]))  # returns once the job has ended
    statuses = [e["data"]["status"] for e in events if "status" in e["data"]]
    assert statuses == ["queued", "running", "succeeded"]
    steps = [e["data"] for e in events if "total_steps" in e["data"]]
    assert steps and steps[-1]["step"] == steps[-1]["total_steps"]
    assert [e["id"] for e in events] == sorted({e["id"] for e in events})  # each once, in order
    assert [e["id"] for e in beaver.events(job["id"])] == [e["id"] for e in events]

    done = beaver.wait(job["id"])
    assert done["status"] == "succeeded" and len(done["result_models"]) == 1
    assert beaver.list_jobs(status="succeeded", job_type="sft")[0]["id"] == job["id"]
    model = beaver.get_model(done["result_models"][0])
    pulled = beaver.pull_model(model["id"], tmp_path / "pulled")
    # The pulled folder is the server's, file for file, and transformers loads it.
    served = {p.relative_to(model["path"]).as_posix() for p in Path(model["path"]).rglob("*")
              if p.is_file()}
    assert {p.relative_to(pulled).as_posix() for p in pulled.rglob("*") if p.is_file()} == served
    loaded = AutoModelForCausalLM.from_pretrained(pulled)
    weights = load_file(f"{model['path']}/model.safetensors")
    for name, tensor in loaded.state_dict().items():
        if name in weights:
            assert torch.equal(tensor, weights[name].to(tensor.dtype)), name


def test_a_parquet_file_uploads_with_a_column_map(beaver, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"question": r["prompt"], "answer": r["response"]} for r in SFT_RECORDS]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "qa.parquet")
    dataset = beaver.upload_dataset(tmp_path / "qa.parquet", "sft", column_map={"question": "prompt",
                                                                                "answer": "response"})
    assert dataset["name"] == "qa" and list(beaver.records(dataset["id"])) == SFT_RECORDS


def test_errors_are_beaver_errors_with_the_api_code(beaver, base, platform):
    dataset = beaver.upload_dataset(SFT_RECORDS[:4], kind="sft", name="few")["id"]
    with pytest.raises(BeaverError) as bad:
        beaver.submit("sft", {"model": base, "epochs": 0}, [dataset])
    assert (bad.value.status, bad.value.code, bad.value.param) == (422, "invalid_request", "params.epochs")
    with pytest.raises(BeaverError) as missing:
        beaver.submit("sft", {"model": base}, ["ds-nope"])
    assert (missing.value.status, missing.value.code, missing.value.param) == (404, "not_found", "datasets[0]")
    with pytest.raises(BeaverError) as bad_record:
        beaver.upload_dataset([{"prompt": "no response"}], kind="sft", name="broken")
    assert bad_record.value.status == 422 and bad_record.value.details
    with pytest.raises(BeaverError) as unauthorized, Client(platform.url, "bvr-not-a-key") as stranger:
        stranger.list_jobs()
    assert (unauthorized.value.status, unauthorized.value.code) == (401, "unauthorized")
    with pytest.raises(BeaverError) as unreachable, Client(f"http://127.0.0.1:{_free_port()}", "k") as nowhere:
        nowhere.list_jobs()
    assert (unreachable.value.status, unreachable.value.code) == (0, "unreachable")


def beaver_cli(platform, *args: str, key: str | None = None) -> subprocess.CompletedProcess:
    """``beaver ARGS`` as a user runs it: a subprocess, URL and key from the environment."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "BEAVER_URL": platform.url,
           "BEAVER_API_KEY": key or platform.keys["trainer"]}
    return subprocess.run([sys.executable, "-m", "api.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_cli_runs_a_job_to_success_and_pulls_its_model(platform, base, tmp_path):
    from transformers import AutoModelForCausalLM

    upload = beaver_cli(platform, "datasets", "upload", write_jsonl(tmp_path / "cli-chats.jsonl", SFT_RECORDS),
                        "--kind", "sft")
    assert upload.returncode == 0, upload.stderr
    dataset = upload.stdout.strip()
    assert dataset.startswith("ds-")
    listed = beaver_cli(platform, "datasets", "list", "--json")
    assert dataset in [d["id"] for d in json.loads(listed.stdout)]

    (tmp_path / "sft.yaml").write_text(f"model: {base}\nepochs: 1\nbatch_size: 4\noptim:\n  lr: 1.0e-2\n")
    submit = beaver_cli(platform, "jobs", "submit", "sft", "--params", str(tmp_path / "sft.yaml"),
                        "--set", "optim.lr=1e-3", "--dataset", dataset)
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip()
    follow = beaver_cli(platform, "jobs", "follow", job)
    assert follow.returncode == 0, follow.stderr
    assert f"{job} succeeded" in follow.stdout and "running" in follow.stderr  # its messages, then the outcome

    jobs = json.loads(beaver_cli(platform, "jobs", "list", "--json", "--type", "sft").stdout)
    mine = next(j for j in jobs if j["id"] == job)
    assert mine["params"]["optim"]["lr"] == 1e-3 and mine["params"]["batch_size"] == 4  # the file, then --set
    assert job in beaver_cli(platform, "jobs", "list").stdout

    pull = beaver_cli(platform, "models", "pull", job, str(tmp_path / "model"))  # a job id: the model it made
    assert pull.returncode == 0, pull.stderr
    AutoModelForCausalLM.from_pretrained(tmp_path / "model")


def test_cli_exit_codes_for_a_failed_and_a_cancelled_job(platform, base, tiny_llama_dir, tmp_path):
    dataset = beaver_cli(platform, "datasets", "upload", write_jsonl(tmp_path / "c.jsonl", SFT_RECORDS),
                         "--kind", "sft").stdout.strip()
    # A model folder without its weights passes the POST's check (it has a config.json); the worker fails on it.
    broken = tmp_path / "no-weights"
    shutil.copytree(tiny_llama_dir, broken)
    for weights in broken.glob("*.safetensors"):
        weights.unlink()
    (tmp_path / "broken.json").write_text(json.dumps({"model": str(broken), "epochs": 1}))
    job = beaver_cli(platform, "jobs", "submit", "sft", "--params", str(tmp_path / "broken.json"),
                     "--dataset", dataset).stdout.strip()
    failed = beaver_cli(platform, "jobs", "follow", job)
    assert failed.returncode == 1 and f"{job} failed: model_not_found" in failed.stderr, failed.stderr

    long = beaver_cli(platform, "jobs", "submit", "sft", "--set", f"model={base}", "--set", "epochs=500",
                      "--dataset", dataset).stdout.strip()
    cancel = beaver_cli(platform, "jobs", "cancel", long)
    assert cancel.returncode == 0 and long in cancel.stdout, cancel.stderr
    cancelled = beaver_cli(platform, "jobs", "follow", long)
    assert cancelled.returncode == 1 and f"{long} cancelled" in cancelled.stderr
    again = beaver_cli(platform, "jobs", "cancel", long)  # already over: the API's 409
    assert again.returncode == 3 and "409 conflict" in again.stderr


def test_cli_exit_codes_for_refusals_and_an_unreachable_api(platform, base, tmp_path):
    bad_key = beaver_cli(platform, "jobs", "list", key="bvr-not-a-key")
    assert bad_key.returncode == 3 and "401 unauthorized" in bad_key.stderr
    viewer = beaver_cli(platform, "jobs", "submit", "dataset_stats", key=platform.keys["viewer"])
    assert viewer.returncode == 3 and "403 forbidden" in viewer.stderr
    bad_params = beaver_cli(platform, "jobs", "submit", "sft", "--set", f"model={base}", "--set", "epochs=0",
                            "--dataset", "ds-nope")
    assert bad_params.returncode == 3 and "(param params.epochs)" in bad_params.stderr
    (tmp_path / "list.yaml").write_text("- not\n- a mapping\n")
    usage = beaver_cli(platform, "jobs", "submit", "sft", "--params", str(tmp_path / "list.yaml"))
    assert usage.returncode == 2 and "mapping" in usage.stderr
    nowhere = beaver_cli(platform, "--url", f"http://127.0.0.1:{_free_port()}", "rounds", "list")
    assert nowhere.returncode == 4 and "cannot reach" in nowhere.stderr
    assert json.loads(beaver_cli(platform, "rounds", "list", "--json").stdout) == []


def readme_block(after: str, fence: str) -> str:
    readme = (REPO / "README.md").read_text()
    return readme.split(after, 1)[1].split(f"```{fence}\n", 1)[1].split("```\n", 1)[0]


def test_the_readmes_worked_example_runs_as_written(platform, base, tmp_path, monkeypatch):
    """The README's CLI example and its notebook lines, word for word but for the hub model (none here)."""
    from transformers import AutoModelForCausalLM

    script = readme_block("A worked example", "bash").replace("Qwen/Qwen2.5-0.5B-Instruct", base)
    env = {**os.environ, "PYTHONPATH": str(REPO), "BEAVER_URL": platform.url,
           "BEAVER_API_KEY": platform.keys["trainer"], "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "succeeded; models: model-" in out.stdout
    AutoModelForCausalLM.from_pretrained(tmp_path / "my-model")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BEAVER_URL", platform.url)
    monkeypatch.setenv("BEAVER_API_KEY", platform.keys["trainer"])
    dataset_id = Client().list_datasets(limit=1)[0]["id"]  # the example's; its sft.yaml names the base
    scope = {"dataset_id": dataset_id}
    exec(readme_block("The same from Python", "python"), scope)  # noqa: S102 — the README's own lines
    assert scope["job"]["status"] == "succeeded" and scope["job"]["params"]["optim"]["lr"] == 1e-5


def test_cli_imports_a_hugging_face_dataset_and_exports_it_as_parquet_and_jsonl(platform, tmp_path, monkeypatch):
    """`beaver datasets import` on a save_to_disk folder (the hub unreachable: HF_HUB_OFFLINE=1), renaming
    columns; `beaver datasets export` gives back the same records in both formats."""
    import datasets
    import pyarrow.parquet as pq

    rows = [{"question": r["prompt"], "answer": r["response"]} for r in SFT_RECORDS]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "qa"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # beaver_cli passes the environment on
    out = beaver_cli(platform, "datasets", "import", str(tmp_path / "qa"), "--split", "train", "--kind", "sft",
                     "--column", "question=prompt", "--column", "answer=response", key=platform.keys["trainer"])
    assert out.returncode == 0, out.stderr
    dataset_id = out.stdout.strip()
    assert "qa:train: 12 sft records" in out.stderr
    missing = beaver_cli(platform, "datasets", "import", str(tmp_path / "qa"), "--split", "test", "--kind", "sft",
                         key=platform.keys["trainer"])
    assert missing.returncode == 2 and "no split 'test'" in missing.stderr

    for fmt in ("parquet", "jsonl"):
        out = beaver_cli(platform, "datasets", "export", dataset_id, str(tmp_path / f"qa.{fmt}"), "--format", fmt)
        assert out.returncode == 0, out.stderr
    assert pq.read_table(tmp_path / "qa.parquet").to_pylist() == SFT_RECORDS
    lines = (tmp_path / "qa.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == SFT_RECORDS
    nowhere = beaver_cli(platform, "datasets", "export", "ds-nope", str(tmp_path / "x.jsonl"))
    assert nowhere.returncode == 3 and "404" in nowhere.stderr and not (tmp_path / "x.jsonl").exists()
