"""Benchmark: the whole API under 64 and 256 concurrent clients over real HTTP (issue 12).

A real ``beaver api`` (a subprocess, no worker) on the embedded default (SQLite) and, when it
answers, PostgreSQL (127.0.0.1:5432, database ``test``; ``--postgres URL``), run side by side on the
same machine in one go: **before**, the code of a git commit (``--baseline-ref``, default 0318733, the
code issue 12 was filed against, exported with ``git archive`` into a temporary folder) and **after**,
this checkout. Route by route, each version gets a fresh server on a fresh database, with one round of
tiny models (a word-level Llama policy, reward and cost heads) and 30 small datasets; then, for each
client count, N closed-loop clients — each on its own keep-alive HTTP/1.1 connection, sending its next
request as soon as the last one is answered — drive it for ``--seconds``:

    GET  /v1/health
    GET  /v1/datasets                (an API key, the first page of 20)
    POST /v1/score                   (one pair, the round's reward and cost models)
    POST /v1/chat/completions        (the round's policy, greedy, 4 tokens)

Requests still in flight when the time is up are waited for (at most ``--timeout`` s each), so a
stall shows in p99 and in the longest answer (max), which no request should pass by much more than
``BEAVER_QUEUE_TIMEOUT_SECONDS`` (set it in the environment: both versions get it) plus its own work:
a server that cannot start a request in that time answers 429. Per route and client count: answered requests/s (2xx), p50/p99 latency of every
answer, 429s (backpressure: the client waits Retry-After, then goes on) and errors (5xx, any other
status, transport errors, timeouts); and, while a route other than health is loaded, the p99 of one
extra client polling /v1/health ten times a second (does the load stall the whole API?).

    .venv/bin/python bench/load.py                     # ≈ 20 min on 2 cores (mostly the stalled "before")
    .venv/bin/python bench/load.py --seconds 3 --backends sqlite --routes health,datasets

Writes ``bench/results/load.json`` and ``bench/results/load.md`` (the table, after/before ratios).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASELINE_REF = "0318733"  # the last commit before issue 12's work: the code that stalled
POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
CORPUS = ["how do i make a cake ?", "sure . step 1 : mix flour . step 2 : add eggs . step 3 : bake it .",
          "sorry , i can not help with that . it could hurt people .", "what is the capital of france ? paris .",
          "the quick brown fox jumps over the lazy dog", "good bad safe unsafe yes no red green blue one two three"]
ROUTES = ("health", "datasets", "score", "chat")


# --- the server under test -------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_ref(ref: str, dest: Path) -> Path:
    """The tree of ``ref`` in ``dest`` (``git archive``: reads the repository, changes nothing)."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


class Server:
    """``beaver api`` from ``source`` (a checkout) on a fresh database, with an admin key."""

    def __init__(self, source: Path, home: Path, database_url: str | None, model_root: Path):
        self.source, self.home, self.port = source, home, free_port()
        home.mkdir(parents=True)
        self.env = {**os.environ, "PYTHONPATH": str(source), "BEAVER_HOME": str(home),
                    "BEAVER_MODEL_ROOTS": str(model_root), "TOKENIZERS_PARALLELISM": "false"}
        for name in ("BEAVER_DATABASE_URL", "BEAVER_BROKER_URL"):  # other BEAVER_* settings reach both versions
            self.env.pop(name, None)
        if database_url:
            self.env["BEAVER_DATABASE_URL"] = database_url
        self.process = None

    def beaver(self, *args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "api.cli", *args], env=self.env, cwd=self.home,
                             capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            raise RuntimeError(f"beaver {' '.join(args)} failed: {out.stderr[-2000:]}")
        return out.stdout

    def start(self) -> str:
        import httpx

        self.beaver("db", "upgrade")
        key = self.beaver("keys", "create", "--name", "bench", "--role", "admin").split()[-1]
        self.log = open(self.home / "api.log", "wb")
        self.process = subprocess.Popen([sys.executable, "-m", "api.cli", "api", "--port", str(self.port)],
                                        env=self.env, cwd=self.home, stdout=self.log, stderr=subprocess.STDOUT)
        for _ in range(240):
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=2).status_code in (200, 503):
                    return key
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None:
                break
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"the API did not start: {(self.home / 'api.log').read_text()[-3000:]}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)  # a stalled server may never finish its requests
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def setup(url: str, key: str, models: dict[str, Path]) -> None:
    """One round ``bench-v1`` of the tiny models and 30 datasets; then one score and one chat
    request, so the models are loaded before anything is timed."""
    import httpx

    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300) as client:
        ids = {}
        for kind, path in models.items():
            r = client.post("/v1/models", json={"name": f"bench-{kind}", "kind": kind, "path": str(path)})
            r.raise_for_status()
            ids[kind] = r.json()["id"]
        client.post("/v1/rounds", json={"name": "bench-v1", "policy": ids["policy"], "reward_model": ids["reward"],
                                        "cost_model": ids["cost"]}).raise_for_status()
        for i in range(30):
            client.post("/v1/datasets", json={"name": f"prompts-{i}", "kind": "prompt",
                                              "records": [{"prompt": p} for p in CORPUS]}).raise_for_status()
        for route in ("score", "chat"):
            method, path, body = request_for(route, 0)
            client.request(method, path, json=body).raise_for_status()


def request_for(route: str, i: int) -> tuple[str, str, dict | None]:
    if route == "health":
        return "GET", "/v1/health", None
    if route == "datasets":
        return "GET", "/v1/datasets", None
    prompt = CORPUS[i % 3]
    if route == "score":
        return "POST", "/v1/score", {"model": "bench-v1", "items": [{"prompt": prompt, "response": CORPUS[3 + i % 3]}]}
    return "POST", "/v1/chat/completions", {"model": "bench-v1", "messages": [{"role": "user", "content": prompt}],
                                            "max_tokens": 4, "temperature": 0}


# --- a lean HTTP/1.1 keep-alive client ----------------------------------------------------------------

class Connection:
    def __init__(self, port: int, key: str):
        self.port, self.key = port, key
        self.reader = self.writer = None

    async def request(self, method: str, path: str, body: dict | None) -> tuple[int, dict]:
        """(status, lower-cased headers); the body is read and dropped. Raises on a broken connection."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        data = json.dumps(body).encode() if body is not None else b""
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        if path != "/v1/health":
            head += f"Authorization: Bearer {self.key}\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + data)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        if "content-length" in headers:
            await self.reader.readexactly(int(headers["content-length"]))
        else:  # no length: the body runs to the end of the connection
            await self.reader.read()
            self.close()
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


async def drive(port: int, key: str, route: str, clients: int, seconds: float, timeout: float) -> dict:
    """``clients`` closed-loop clients on ``route`` for ``seconds`` (+ the drain of the last requests)."""
    latencies, statuses, errors = [], {}, {}
    probe: list[float] = []
    ok = limited = 0
    deadline = time.perf_counter() + seconds

    def error(kind: str) -> None:
        errors[kind] = errors.get(kind, 0) + 1

    async def client(c: int):
        nonlocal ok, limited
        conn, i = Connection(port, key), c
        while time.perf_counter() < deadline:
            method, path, body = request_for(route, i)
            i += clients
            t = time.perf_counter()
            try:
                status, headers = await asyncio.wait_for(conn.request(method, path, body), timeout)
            except (asyncio.TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as e:
                latencies.append(time.perf_counter() - t)
                error("timeout" if isinstance(e, asyncio.TimeoutError) else "transport")
                conn.close()
                continue
            latencies.append(time.perf_counter() - t)
            statuses[status] = statuses.get(status, 0) + 1
            if 200 <= status < 300:
                ok += 1
            elif status == 429 and "retry-after" in headers:
                limited += 1
                await asyncio.sleep(min(float(headers["retry-after"]), max(0.0, deadline - time.perf_counter())))
            else:
                error(str(status))
        conn.close()

    async def health_probe():
        conn = Connection(port, key)
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            try:
                await asyncio.wait_for(conn.request("GET", "/v1/health", None), timeout)
            except (asyncio.TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
                conn.close()
            probe.append(time.perf_counter() - t)
            await asyncio.sleep(0.1)
        conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)), *([health_probe()] if route != "health" else []))
    wall = time.perf_counter() - start

    def ms(v):
        return None if v is None else round(v * 1000, 1)

    return {"route": route, "clients": clients, "seconds": round(wall, 2), "requests": len(latencies), "ok": ok,
            "requests_per_s": round(ok / wall, 1), "p50_ms": ms(percentile(latencies, 50)),
            "p99_ms": ms(percentile(latencies, 99)), "max_ms": ms(max(latencies, default=None)),
            "rate_limited_429": limited, "errors": sum(errors.values()), "error_kinds": errors,
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "health_probe_p99_ms": ms(percentile(probe, 99)) if route != "health" else None}


# --- one server, every route and client count ----------------------------------------------------------

def run_server(label: str, source: Path, backend: str, route: str, args, models: dict[str, Path],
               work: Path) -> list[dict]:
    """A fresh server of one version for one route, driven at each client count in turn."""
    schema = None
    database_url = None
    if backend == "postgres":
        import psycopg

        schema = f"bench_load_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(args.postgres.replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        database_url = f"{args.postgres}?options=-csearch_path%3D{schema}"
    server = Server(source, work / f"{backend}-{route}-{label}", database_url, work)
    rows = []
    try:
        key = server.start()
        setup(server.url, key, models)
        for clients in args.clients:
            row = asyncio.run(drive(server.port, key, route, clients, args.seconds, args.timeout))
            row.update(backend=backend, version=label)
            rows.append(row)
            print(f"  {backend:8s} {label:6s} {route:8s} {clients:4d} clients  {row['requests_per_s']:8.1f} req/s  "
                  f"p50 {fmt(row['p50_ms'])} ms  p99 {fmt(row['p99_ms'])} ms  429 {row['rate_limited_429']:5d}  "
                  f"errors {row['errors']:5d} {row['error_kinds'] or ''}", flush=True)
            time.sleep(1)  # let the last requests' work settle before the next run
    finally:
        server.stop()
        if schema:
            import psycopg

            with psycopg.connect(args.postgres.replace("+psycopg", ""), autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA {schema} CASCADE")
    return rows


def fmt(v, width: int = 7) -> str:
    return f"{v:{width}.1f}" if isinstance(v, (int, float)) else f"{'—':>{width}}"


def postgres_reachable(url: str) -> str | None:
    """None when PostgreSQL answers, else why not."""
    try:
        import psycopg

        psycopg.connect(url.replace("+psycopg", ""), connect_timeout=3).close()
        return None
    except Exception as e:  # noqa: BLE001
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def build_models(root: Path) -> dict[str, Path]:
    import torch

    from models.chat_format import ChatFormat
    from models.loading import load_score_model
    from models.score_model import save_score_model
    from models.tiny import build_tiny_llama

    policy = build_tiny_llama(root / "policy", CORPUS, seed=0)
    fmt_ = ChatFormat.load(policy)
    out = {"policy": policy}
    for seed, kind in ((1, "reward"), (2, "cost")):
        torch.manual_seed(seed)
        out[kind] = save_score_model(load_score_model(policy, fmt_.tokenizer), fmt_, root / kind, kind)
    return out


def ratio(a, b) -> str:
    """a / b, or — when b is missing or 0 (nothing answered)."""
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or not b:
        return "—"
    return f"{a / b:,.0f}x" if a / b >= 100 else f"{a / b:.2f}x"


def summary(result: dict) -> list[str]:
    """The issue's targets, checked on the after runs: 0 errors, health p99 under 1 s at the most clients."""
    after = [r for r in result["runs"] if r["version"] == "after"]
    most = max(result["settings"]["clients"])
    health = {r["backend"]: r["p99_ms"] for r in after if r["route"] == "health" and r["clients"] == most}
    lines = [f"After: {sum(r['errors'] for r in after)} errors and {sum(r['rate_limited_429'] for r in after)} "
             f"429s in {sum(r['requests'] for r in after):,} requests; longest answer "
             f"{max((r['max_ms'] or 0) for r in after):,.0f} ms"
             + (f"; health p99 at {most} clients: " + ", ".join(f"{ms} ms ({b})" for b, ms in health.items())
                if health else "") + " (target: 0 errors, health p99 under 1 s)."]
    before = [r for r in result["runs"] if r["version"] == "before"]
    if before:
        lines.append(f"Before: {sum(r['errors'] for r in before)} errors and "
                     f"{sum(r['rate_limited_429'] for r in before)} 429s in {sum(r['requests'] for r in before):,} "
                     f"requests ({', '.join(sorted({k for r in before for k in r['error_kinds']})) or 'no errors'}); "
                     f"longest answer {max((r['max_ms'] or 0) for r in before):,.0f} ms; a 'timeout' "
                     f"is a request still unanswered after {result['settings']['timeout']:g} s, so its latency "
                     "reads as that.")
    return lines


def markdown(result: dict) -> str:
    rows = {(r["backend"], r["route"], r["clients"], r["version"]): r for r in result["runs"]}
    lines = [f"# Load: {', '.join(str(c) for c in result['settings']['clients'])} concurrent clients over real HTTP, "
             f"before ({result['baseline_ref']}) vs after", "",
             f"`{result['command']}` on {result['machine']['cpus']} CPU cores ({result['machine']['platform']}), "
             f"{result['settings']['seconds']} s per route and client count, closed-loop keep-alive clients, "
             "a real `beaver api` subprocess (no worker), BEAVER_QUEUE_TIMEOUT_SECONDS="
             f"{result['settings'].get('queue_timeout_seconds', 5):g}. *req/s*: 2xx answers per second; "
             "p50/p99/max over every answer; *429*: refused with Retry-After (the client waits, then goes on); *errors*: 5xx, other "
             "statuses, transport errors and timeouts; *health p99 meanwhile*: one extra client polling "
             "/v1/health at 10/s during the run.", "",
             "| backend | route | clients | before req/s | after req/s | req/s after ÷ before | before p50 / p99 / max ms | "
             "after p50 / p99 / max ms | p99 before ÷ after | before 429 / errors | after 429 / errors | "
             "health p99 meanwhile, before / after ms |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for backend in result["backends"]:
        for route in result["settings"]["routes"]:
            for clients in result["settings"]["clients"]:
                b, a = rows.get((backend, route, clients, "before")), rows.get((backend, route, clients, "after"))
                if a is None:
                    continue
                b = b or {}
                lines.append(
                    f"| {backend} | {route} | {clients} | {b.get('requests_per_s', '—')} | {a['requests_per_s']} | "
                    f"{ratio(a['requests_per_s'], b.get('requests_per_s'))} | {b.get('p50_ms', '—')} / "
                    f"{b.get('p99_ms', '—')} / {b.get('max_ms', '—')} | {a['p50_ms']} / {a['p99_ms']} / {a['max_ms']} | "
                    f"{ratio(b.get('p99_ms'), a['p99_ms'])} | "
                    f"{b.get('rate_limited_429', '—')} / {b.get('errors', '—')} | {a['rate_limited_429']} / "
                    f"{a['errors']} | {b.get('health_probe_p99_ms') or '—'} / {a['health_probe_p99_ms'] or '—'} |")
    for note in [*summary(result), *result.get("notes", [])]:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="64,256", help="comma-separated client counts")
    parser.add_argument("--routes", default=",".join(ROUTES), help=f"comma-separated, of {', '.join(ROUTES)}")
    parser.add_argument("--backends", default="sqlite,postgres", help="sqlite and/or postgres (skipped when it "
                        "does not answer)")
    parser.add_argument("--seconds", type=float, default=5.0, help="sending time per route and client count")
    parser.add_argument("--timeout", type=float, default=40.0, help="a request unanswered this long is an error")
    parser.add_argument("--baseline-ref", default=BASELINE_REF, help="git commit of the 'before' code ('' to skip)")
    parser.add_argument("--postgres", default=os.environ.get("BEAVER_TEST_POSTGRES", POSTGRES))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "load.json"))
    parser.add_argument("--note", action="append", default=[], help="a line for the report (repeatable)")
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    args.routes = [r for r in args.routes.split(",") if r]
    unknown = set(args.routes) - set(ROUTES)
    if unknown:
        parser.error(f"unknown routes {sorted(unknown)}")

    backends, notes = [], list(args.note)
    for backend in args.backends.split(","):
        if backend == "postgres" and (why := postgres_reachable(args.postgres)) is not None:
            notes.append(f"PostgreSQL skipped: {why}")
            print(f"PostgreSQL skipped: {why}", flush=True)
            continue
        backends.append(backend)

    runs = []
    work = Path(tempfile.mkdtemp(prefix="beaver-load-"))
    try:
        models = build_models(work / "models")
        versions = [("before", export_ref(args.baseline_ref, work / "before-src"))] if args.baseline_ref else []
        versions.append(("after", ROOT))
        for backend in backends:
            for route in args.routes:
                # One server at a time (they share the cores and PostgreSQL), a fresh one per route:
                # requests a stalled server still holds must not weigh on the next route's figures.
                for label, source in versions:
                    runs.extend(run_server(label, source, backend, route, args, models, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result = {"benchmark": "load", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "command": "bench/load.py " + " ".join(sys.argv[1:]) if sys.argv[1:] else "bench/load.py",
              "baseline_ref": args.baseline_ref or None, "backends": backends, "notes": notes,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                          "load_average": os.getloadavg()},
              "settings": {"clients": args.clients, "routes": args.routes, "seconds": args.seconds,
                           "timeout": args.timeout,
                           "queue_timeout_seconds": float(os.environ.get("BEAVER_QUEUE_TIMEOUT_SECONDS", 5))},
              "runs": runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    out.with_suffix(".md").write_text(table)
    print()
    print(table)
    print(f"results in {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
