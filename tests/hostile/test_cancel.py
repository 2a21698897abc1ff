"""Issue 18, "every job bounded, every job cancellable": what a user sends cannot hold a worker.

Found: a ``generate`` job with ``max_new_tokens: 1000000000`` grew its worker to 13.6 GB (every row's
random draws made up front) and its cancel answered 200 and did nothing; a ``chat_template`` with
two nested ``range(100000)`` loops held a worker at 100 % CPU past its cancel; ``beaver up`` killed
while its worker's job hung left that worker running on its own. Now a job runs in a process of its
own that checks for a stop at every token and is killed when it does not stop within
``BEAVER_CANCEL_GRACE_SECONDS`` (a template render, a long forward), a job's own template is
rendered once at ``POST /v1/jobs`` with a time and an output limit, and the worker goes with
``beaver up``. Each test below failed on the code before (347aae8), but two that guard the fixes
from going too far: real templates still pass at POST, and ``beaver up`` stopped with SIGTERM
(which already stopped its worker, after 20 s) still does.

Each cancel prints its latency (request → ``cancelled``); the README's "cancel stops a job within
N s" comes from these runs and ``bench/cancel.py``. Nothing here asserts a duration.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from models.generation import Sampler, SamplingConfig
from models.jobs import JobCancelled
from tests.api.conftest import auth, beaver_env, client, keys  # noqa: F401 — fixtures
from tests.conftest import TINY_CORPUS
from tests.integration.conftest import Platform

# A safe-rlhf template that loops for hours on one message ("LOOP"): any probe of the template (at
# registration, at POST) renders it in no time; a job whose data holds that message does not.
LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
DATA_LOOPING_TEMPLATE = (
    "BEGINNING OF CONVERSATION:{% for message in messages %}"
    "{% if message['content'] == 'LOOP' %}" + LOOP + "{% endif %}"
    "{% if message['role'] == 'system' %}{{ ' SYSTEM: ' + message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ ' USER: ' + message['content'] }}"
    "{% else %}{{ ' ASSISTANT: ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ ' ASSISTANT:' }}{% endif %}")
ENDLESS = {"temperature": 0.0, "max_new_tokens": 500_000}  # greedy: this model loops and never says eos


# --- the sampler -------------------------------------------------------------------------------------------


def test_a_huge_max_new_tokens_costs_no_memory_up_front(tiny_llama_dir):
    """Before, every row drew ``torch.rand(max_new_tokens)`` first: 8 TB asked for here. Now the draws
    come a chunk at a time, and an answer that ends early is the one a small limit gives."""
    from models.chat_format import ChatFormat
    from models.loading import load_causal_lm

    fmt = ChatFormat.load(tiny_llama_dir, padding_side="left")
    model = load_causal_lm(tiny_llama_dir, fmt.tokenizer).eval()
    sampler = Sampler(model, fmt.tokenizer.pad_token_id, fmt.eos_ids)
    ids = [fmt.prompt_ids(p) for p in ("how do i make a cake ?", "red green blue")]
    small = sampler.generate(ids, SamplingConfig(max_new_tokens=2000), seed=3)
    assert small.response_mask.sum(1).max() < 2000  # every answer ended at an eos of its own
    huge = sampler.generate(ids, SamplingConfig(max_new_tokens=10**12), seed=3)
    assert torch.equal(huge.sequences, small.sequences) and torch.equal(huge.log_probs, small.log_probs)


def test_a_generation_stops_at_the_token_its_stop_check_turns_true(tiny_llama_dir):
    from models.chat_format import ChatFormat
    from models.loading import load_causal_lm

    fmt = ChatFormat.load(tiny_llama_dir, padding_side="left")
    model = load_causal_lm(tiny_llama_dir, fmt.tokenizer).eval()
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) == 7

    with pytest.raises(JobCancelled):
        Sampler(model, fmt.tokenizer.pad_token_id, fmt.eos_ids).generate(
            [fmt.prompt_ids("hello")] * 4, SamplingConfig(**ENDLESS), seed=0, should_stop=stop)
    assert len(calls) == 7  # one check per token, and nothing sampled after the stop


# --- a job's own template, rendered at POST time -------------------------------------------------------------


@pytest.fixture
def policy(client, keys, tiny_llama_dir):  # noqa: F811
    r = client.post("/v1/models", json={"name": "tiny", "kind": "policy", "path": str(tiny_llama_dir)},
                    headers=auth(keys["trainer"]))
    assert r.status_code == 201, r.text
    prompts = client.post("/v1/datasets", json={"name": "p", "kind": "prompt", "records": [{"prompt": "hi"}]},
                          headers=auth(keys["trainer"])).json()["id"]
    sft = client.post("/v1/datasets", json={"name": "s", "kind": "sft",
                                            "records": [{"prompt": "hi", "response": "hello ."}]},
                      headers=auth(keys["trainer"])).json()["id"]
    return {"model": r.json()["id"], "prompt": prompts, "sft": sft}


def post_with_template(client, keys, policy, template: str, job_type: str = "generate"):  # noqa: F811
    return client.post("/v1/jobs", json={"type": job_type, "datasets": [policy["sft" if job_type == "sft" else "prompt"]],
                                         "params": {"model": policy["model"], "chat_template": template}},
                       headers=auth(keys["trainer"]))


@pytest.mark.parametrize("template, why", [
    (LOOP, "did not finish rendering a 4-message conversation within 2 s"),
    ("{{ 'x' * 1000000000 }}", "needs more than 256 MiB"),
    ("{% for i in range(100000) %}{{ messages | tojson }}{% endfor %}", "renders more than 262144 characters"),
    ("{% for m in messages %}{{ m['content'] }}", "does not compile"),
    ("{{ raise_exception('no chat here') }}", "raises on a user, assistant, user conversation: no chat here"),
    ("{{ ''.__class__.__mro__ }}", "unsafe"),
    ("{# " + "x" * 70_000 + " #}", "at most 65,536"),
])
def test_a_jobs_template_that_hangs_blows_up_or_fails_is_refused_at_post(client, keys, policy, template, why):  # noqa: F811
    r = post_with_template(client, keys, policy, template)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == "params.chat_template" and why in error["message"], error


def test_training_jobs_templates_are_rendered_at_post_too(client, keys, policy):  # noqa: F811
    r = post_with_template(client, keys, policy, LOOP, "sft")
    assert r.status_code == 422 and r.json()["error"]["param"] == "params.chat_template", r.text


def test_real_templates_pass_including_one_that_refuses_system_messages(client, keys, policy):  # noqa: F811
    chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    gemma = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
             "supported') }}{% endif %}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
             "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
    for template in (chatml, gemma, DATA_LOOPING_TEMPLATE):
        r = post_with_template(client, keys, policy, template)
        assert r.status_code == 201, r.text


# --- cancel reaches a job wherever it is -------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """A tiny Llama with a context of a million tokens (so bounds by the context allow what we need),
    and a copy whose own chat template loops on the message "LOOP"."""
    import shutil

    from transformers import AutoTokenizer

    from models.tiny import build_tiny_llama

    long = build_tiny_llama(tmp_path_factory.mktemp("long-context"), TINY_CORPUS, seed=0,
                            max_position_embeddings=1_000_000)
    looping = Path(shutil.copytree(long, tmp_path_factory.mktemp("looping") / "model"))
    tokenizer = AutoTokenizer.from_pretrained(looping)
    tokenizer.chat_template = DATA_LOOPING_TEMPLATE
    tokenizer.save_pretrained(looping)
    return {"long": long, "looping": looping}


def platform_env(home: Path, tmp_path_factory) -> dict:
    return {"BEAVER_HOME": str(home), "BEAVER_HEARTBEAT_SECONDS": "1", "BEAVER_CANCEL_GRACE_SECONDS": "2",
            "BEAVER_MODEL_ROOTS": str(tmp_path_factory.getbasetemp()),
            "BEAVER_MAX_JOB_TOKENS": "1000000"}  # the job-size cap, where there is one: these jobs are meant to be long


@pytest.fixture(scope="module")
def platform(tmp_path_factory, models):
    home = tmp_path_factory.mktemp("beaver-cancel")
    p = Platform("embedded", platform_env(home, tmp_path_factory), home)
    try:
        p.start()
        p.ids = register(p, models)
        yield p
    finally:
        p.stop()


def register(p: Platform, models: dict) -> dict:
    ids = {}
    for name, path in models.items():
        r = p.client.post("/v1/models", json={"name": name, "kind": "policy", "path": str(path)})
        assert r.status_code == 201, r.text
        ids[f"model:{name}"] = r.json()["id"]
    for name, prompt in (("hello", "hello"), ("loop", "LOOP"),
                         ("long", " ".join(["the quick brown fox jumps over the lazy dog"] * 3641))):  # 32769 words
        r = p.client.post("/v1/datasets", json={"name": name, "kind": "prompt", "records": [{"prompt": prompt}]})
        assert r.status_code == 201, r.text
        ids[f"prompts:{name}"] = r.json()["id"]
    return ids


def start_generate(p: Platform, model: str, dataset: str) -> str:
    r = p.client.post("/v1/jobs", json={"type": "generate", "datasets": [p.ids[f"prompts:{dataset}"]],
                                        "params": {"model": p.ids[f"model:{model}"], "sampling": ENDLESS,
                                                   "batch_size": 1}})
    assert r.status_code == 201, r.text
    job = r.json()["id"]
    p.wait_job(job, states=("running",), timeout=120)
    return job


def job_process(p: Platform, job: str, timeout: float = 10) -> int:
    """The pid of the job's process, from the first line of its log."""
    log = p.home / "artifacts" / job / "attempt-1" / "ranks.log"
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = re.search(r"process (\d+)", log.read_text()) if log.exists() else None
        if found:
            return int(found.group(1))
        time.sleep(0.2)
    raise AssertionError(f"no job process named in {log}")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def wait_gone(pids, timeout: float = 60) -> list[int]:
    deadline = time.time() + timeout
    while time.time() < deadline and any(alive(pid) for pid in pids):
        time.sleep(0.2)
    return [pid for pid in pids if alive(pid)]


def cancel(p: Platform, job: str) -> tuple[dict, float]:
    """Cancel, wait for the job to end; (the job, seconds from the request to `cancelled`)."""
    started = time.monotonic()
    assert p.client.post(f"/v1/jobs/{job}/cancel").status_code == 200
    done = p.wait_job(job, timeout=120)
    return done, time.monotonic() - started


def killed(p: Platform, job: str) -> bool:
    return any(e["data"].get("killed") for e in p.client.get(f"/v1/jobs/{job}/events?limit=1000").json()["data"])


@pytest.mark.integration
def test_cancel_stops_a_generation_with_a_huge_max_new_tokens_at_its_next_token(platform):
    job = start_generate(platform, "long", "hello")
    time.sleep(3)  # well into the answer (hundreds of tokens)
    done, latency = cancel(platform, job)
    print(f"\ncancel latency, mid-generation: {latency:.1f} s")
    assert done["status"] == "cancelled", done
    assert wait_gone([job_process(platform, job)]) == []


@pytest.mark.integration
def test_cancel_stops_a_job_stuck_in_its_models_own_template(platform):
    """The looping template renders the prompt "LOOP" for hours, in pure Python with no check: the
    job's process is killed after the grace, and the job ends cancelled."""
    job = start_generate(platform, "looping", "loop")
    time.sleep(2)
    done, latency = cancel(platform, job)
    print(f"\ncancel latency, template render: {latency:.1f} s")
    assert done["status"] == "cancelled", done
    assert killed(platform, job)
    assert wait_gone([job_process(platform, job)]) == []


@pytest.mark.integration
def test_cancel_stops_a_job_inside_a_long_forward(platform):
    """A 32k-token prompt: its prefill is one forward of many seconds, with no check inside."""
    job = start_generate(platform, "long", "long")
    done, latency = cancel(platform, job)
    print(f"\ncancel latency, long forward: {latency:.1f} s")
    assert done["status"] == "cancelled", done
    assert killed(platform, job)
    assert wait_gone([job_process(platform, job)]) == []


# --- beaver up stopped while its worker's job hangs ----------------------------------------------------------


def descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout.split()
    children: dict[int, list[int]] = {}
    for child, parent in zip(out[::2], out[1::2]):
        children.setdefault(int(parent), []).append(int(child))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.fixture
def up_with_a_hung_job(tmp_path_factory, models):
    """``beaver up`` whose worker runs a job stuck in a template render; yields (platform, its worker's
    processes: the worker and, since each job has a process of its own, the job's and the spare)."""
    home = tmp_path_factory.mktemp("beaver-up")
    p = Platform("embedded", platform_env(home, tmp_path_factory), home)
    processes: list[int] = []
    try:
        p.start("up")
        p.ids = register(p, models)
        start_generate(p, "looping", "loop")
        time.sleep(2)  # in the render
        worker = int(re.search(r"worker started \(pid (\d+)\)", (p.logs / "up.log").read_text()).group(1))
        processes += [worker, *descendants(worker)]
        yield p, processes
    finally:
        p.stop()
        for pid in processes:  # what a failed test left behind
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.integration
def test_beaver_up_stopped_with_sigterm_stops_its_worker_and_the_hung_job(up_with_a_hung_job):
    p, processes = up_with_a_hung_job
    os.kill(p.api_proc.pid, signal.SIGTERM)
    p.api_proc.wait(timeout=120)
    assert wait_gone(processes) == []


@pytest.mark.integration
def test_beaver_up_killed_outright_takes_its_worker_and_the_hung_job_along(up_with_a_hung_job):
    """SIGKILL (a service manager's stop timeout, a second Ctrl-C before): nothing of the platform may
    stay behind at 100 % CPU."""
    p, processes = up_with_a_hung_job
    os.kill(p.api_proc.pid, signal.SIGKILL)
    p.api_proc.wait(timeout=30)
    assert wait_gone(processes) == []
