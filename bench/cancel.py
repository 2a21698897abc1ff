"""Benchmark: how long a cancel takes to stop a running job, wherever the job is.

A fresh embedded platform (``beaver api`` + ``beaver worker``, default settings unless the
environment sets ``BEAVER_*``: a heartbeat every 5 s, a cancel grace of 5 s) on a temporary home,
with a tiny Llama whose context is a million tokens, and a copy of it whose own chat template loops
for hours on the message "LOOP". Each case starts a job, waits until it is busy, then times
``POST /v1/jobs/{id}/cancel`` → the job reads ``cancelled`` (polled every 0.1 s):

    generation      generate, greedy, max_new_tokens 500000 (the model never says eos): stopped at a token
    training step   sft for 5000 epochs: stopped at the next step
    template        generate whose prompt is "LOOP": the render never checks, the process is killed
    long forward    generate on a 64k-token prompt: one prefill forward of ~50 s, the process is killed

Before this version none of them ended: cancel answered 200 and the job ran on (the template and the
long generation for hours). Prints each case's latencies and writes bench/results/cancel.{json,md}.

    .venv/bin/python bench/cancel.py              # ≈ 3 min on 2 CPU cores
    .venv/bin/python bench/cancel.py --repeat 1   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
LOOPING_TEMPLATE = (
    "BEGINNING OF CONVERSATION:{% for message in messages %}"
    "{% if message['content'] == 'LOOP' %}" + LOOP + "{% endif %}"
    "{% if message['role'] == 'user' %}{{ ' USER: ' + message['content'] }}"
    "{% else %}{{ ' ASSISTANT: ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ ' ASSISTANT:' }}{% endif %}")
ENDLESS = {"temperature": 0.0, "max_new_tokens": 500_000}
CORPUS = [  # the tests' tiny corpus: on it, seed 0's model answers "hello" greedily without ever saying eos
    "how do i make a cake ?",
    "sure . step 1 : mix flour . step 2 : add eggs . step 3 : bake it . step 4 : serve warm .",
    "sorry , i can not help with that . it could hurt people .",
    "what is the capital of france ? paris is the capital .",
    "the quick brown fox jumps over the lazy dog",
    "good bad safe unsafe yes no red green blue one two three four five",
]


def build_models(root: Path) -> dict:
    from transformers import AutoTokenizer

    from models.tiny import build_tiny_llama

    long = build_tiny_llama(root / "long-context", CORPUS, seed=0, max_position_embeddings=1_000_000)
    looping = Path(shutil.copytree(long, root / "looping"))
    tokenizer = AutoTokenizer.from_pretrained(looping)
    tokenizer.chat_template = LOOPING_TEMPLATE
    tokenizer.save_pretrained(looping)
    return {"long": long, "looping": looping}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    import httpx

    from api.cli import clear_caches
    from api.demo import EmbeddedPlatform
    from api.settings import get_settings

    work = Path(tempfile.mkdtemp(prefix="beaver-cancel-bench-"))
    os.environ["BEAVER_HOME"] = str(work / "home")
    os.environ.setdefault("BEAVER_MAX_JOB_TOKENS", "1000000")  # the job-size cap, where there is one
    for name in ("BEAVER_DATABASE_URL", "BEAVER_BROKER_URL", "BEAVER_RESULT_BACKEND", "BEAVER_ARTIFACTS_DIR"):
        os.environ.pop(name, None)
    clear_caches()
    models = build_models(work)  # under the home's parent: a model root of the embedded platform
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    platform = EmbeddedPlatform(work / "home", port)
    try:
        key = platform.start()
        c = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"}, timeout=60)
        ids = {name: c.post("/v1/models", json={"name": name, "kind": "policy", "path": str(path)}).json()["id"]
               for name, path in models.items()}
        data = {}
        for name, kind, records in (
                ("hello", "prompt", [{"prompt": "hello"}]), ("loop", "prompt", [{"prompt": "LOOP"}]),
                ("long", "prompt", [{"prompt": " ".join(["the quick brown fox jumps over the lazy dog"] * 7282)}]),
                ("sft", "sft", [{"prompt": f"how do i make a cake {i} ?", "response": "sure . mix flour ."}
                                for i in range(64)])):
            r = c.post("/v1/datasets", json={"name": name, "kind": kind, "records": records})
            assert r.status_code == 201, r.text
            data[name] = r.json()["id"]

        def generate(model: str, dataset: str) -> dict:
            return {"type": "generate", "datasets": [data[dataset]],
                    "params": {"model": ids[model], "sampling": ENDLESS, "batch_size": 1}}

        cases = {
            "generation": (generate("long", "hello"), "seconds", 3.0),
            "training step": ({"type": "sft", "datasets": [data["sft"]],
                               "params": {"model": ids["long"], "epochs": 5000, "batch_size": 4, "max_length": 64}},
                              "step", None),
            "template": (generate("looping", "loop"), "seconds", 2.0),
            "long forward": (generate("long", "long"), "seconds", 1.0),
        }
        settings = get_settings()
        results = {"heartbeat_seconds": settings.heartbeat_seconds,
                   "cancel_grace_seconds": settings.cancel_grace_seconds, "cases": {}}
        for name, (body, wait, seconds) in cases.items():
            latencies, kills = [], 0
            for _ in range(args.repeat):
                job = c.post("/v1/jobs", json=body).json()["id"]
                deadline = time.time() + 300
                while c.get(f"/v1/jobs/{job}").json()["status"] != "running" and time.time() < deadline:
                    time.sleep(0.1)
                if wait == "step":
                    while not any("step" in e["data"]
                                  for e in c.get(f"/v1/jobs/{job}/events?limit=1000").json()["data"]):
                        time.sleep(0.1)
                else:
                    time.sleep(seconds)
                started = time.monotonic()
                assert c.post(f"/v1/jobs/{job}/cancel").status_code == 200
                while (status := c.get(f"/v1/jobs/{job}").json()["status"]) == "running":
                    time.sleep(0.1)
                latencies.append(time.monotonic() - started)
                assert status == "cancelled", (name, status)
                kills += any(e["data"].get("killed") for e in c.get(f"/v1/jobs/{job}/events?limit=1000").json()["data"])
            results["cases"][name] = {"latencies": latencies, "killed": kills}
            print(f"{name:14s} cancel → cancelled: median {statistics.median(latencies):.1f} s, "
                  f"max {max(latencies):.1f} s ({kills}/{len(latencies)} killed after the grace)", flush=True)
    finally:
        platform.stop()
        shutil.rmtree(work, ignore_errors=True)
    out = REPO / "bench" / "results"
    (out / "cancel.json").write_text(json.dumps(results, indent=2) + "\n")
    rows = ["| case | median | max | stopped by |", "|---|---:|---:|---|"]
    for name, r in results["cases"].items():
        how = "a kill after the grace" if r["killed"] == len(r["latencies"]) else "its own check" if not r["killed"] \
            else f"{r['killed']} kills of {len(r['latencies'])}"
        rows.append(f"| {name} | {statistics.median(r['latencies']):.1f} s | {max(r['latencies']):.1f} s | {how} |")
    (out / "cancel.md").write_text(
        f"Cancel latency (request → `cancelled`), heartbeat {results['heartbeat_seconds']:g} s, grace "
        f"{results['cancel_grace_seconds']:g} s, {args.repeat} runs each, 2-core CPU:\n\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
