"""A Python client of Beaver's REST API (sync, httpx): what the ``beaver`` CLI's remote commands, the
demo and notebooks use. Every failure is a ``BeaverError`` with the API's error object::

    from api.client import Client
    beaver = Client("http://127.0.0.1:8000", "bvr-…")   # or BEAVER_URL / BEAVER_API_KEY
    job = beaver.wait(beaver.submit("sft", {"model": "Qwen/Qwen2.5-0.5B-Instruct"}, ["ds-…"])["id"])

It imports nothing of the server (no torch, no database): it runs wherever httpx does.
"""

from __future__ import annotations

import json
import os
import tarfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx

TERMINAL = ("succeeded", "failed", "cancelled")
DEFAULT_URL = "http://127.0.0.1:8000"


class BeaverError(Exception):
    """An API error: HTTP ``status`` (0: the server could not be reached), the API's ``code``
    (``invalid_request``, ``not_found``, ``unauthorized``, …), its ``message``, and the ``param`` it names."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None,
                 details: list | None = None):
        super().__init__(f"{code}: {message}" + (f" (param {param})" if param else ""))
        self.status, self.code, self.message, self.param, self.details = status, code, message, param, details

    @classmethod
    def from_response(cls, r: httpx.Response) -> BeaverError:
        try:
            error = r.json()["error"]
            return cls(r.status_code, error.get("code") or "error", error.get("message") or "", error.get("param"),
                       error.get("details"))
        except (ValueError, KeyError, TypeError, AttributeError):  # not Beaver's error object (a proxy's page)
            return cls(r.status_code, "http_error", f"HTTP {r.status_code}: {r.text[:300]}")


class Client:
    """Beaver's REST API. ``url`` and ``key`` default to ``BEAVER_URL`` (else http://127.0.0.1:8000)
    and ``BEAVER_API_KEY``."""

    def __init__(self, url: str | None = None, key: str | None = None, timeout: float = 120.0):
        self.url = (url or os.environ.get("BEAVER_URL") or DEFAULT_URL).rstrip("/")
        key = key or os.environ.get("BEAVER_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    # --- transport ------------------------------------------------------------------------------

    def request(self, method: str, path: str, **kwargs) -> Any:
        """One call; the decoded JSON body, or ``BeaverError``."""
        try:
            r = self.http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise BeaverError(0, "unreachable", f"cannot reach {self.url}: {e or type(e).__name__}") from None
        if r.status_code >= 400:
            raise BeaverError.from_response(r)
        return r.json() if r.content else None

    def get(self, path: str, **params) -> Any:
        """GET ``path`` with the query ``params`` (None left out); with none, a query in ``path`` is kept
        (httpx drops it when params are given)."""
        params = {k: v for k, v in params.items() if v is not None}
        return self.request("GET", path, params=params or None)

    def post(self, path: str, body: dict | None = None, **kwargs) -> Any:
        return self.request("POST", path, json=body, **kwargs)

    def pages(self, path: str, cursor: str = "id", limit: int = 100, after: str | int | None = None,
              **params) -> Iterator[dict]:
        """Every item of a paginated list (``?after=&limit=``), page by page, after the cursor ``after``."""
        while True:
            page = self.get(path, after=after, limit=limit, **params)
            yield from page["data"]
            if not page.get("has_more") or not page["data"]:
                return
            after = page["data"][-1][cursor]

    # --- keys (admin) ---------------------------------------------------------------------------

    def create_key(self, name: str, role: str) -> dict:
        """A new API key; its ``key`` is shown only in this answer."""
        return self.post("/v1/keys", {"name": name, "role": role})

    def list_keys(self) -> list[dict]:
        return self.get("/v1/keys")["data"]

    def revoke_key(self, key_id: str) -> dict:
        return self.request("DELETE", f"/v1/keys/{key_id}")

    # --- datasets -------------------------------------------------------------------------------

    def upload_dataset(self, source: str | Path | Iterable[dict], kind: str, name: str | None = None,
                       column_map: dict[str, str] | None = None) -> dict:
        """Upload a file (``source`` a path: JSONL, Parquet, or a tar/zip of a ``save_to_disk`` folder; the
        server tells them apart by their bytes) or records (a list of dicts) as a dataset of ``kind``
        (preference, prompt, sft, …); name defaults to the file's stem; ``column_map`` renames a file's
        columns to the record's fields ({"question": "prompt"}). Validated whole by the server."""
        if isinstance(source, (str, Path)):
            path = Path(source)
            stem = Path(path.stem).stem if path.suffix == ".gz" else path.stem  # train.tar.gz → train
            form = {"name": name or stem, "kind": kind}
            if column_map:
                form["column_map"] = json.dumps(column_map)
            with path.open("rb") as f:
                return self.request("POST", "/v1/datasets", data=form,
                                    files={"file": (path.name, f, "application/octet-stream")})
        if name is None:
            raise ValueError("records need a name")
        body = {"name": name, "kind": kind, "records": list(source)}
        if column_map:
            body["column_map"] = column_map
        return self.post("/v1/datasets", body)

    def list_datasets(self, limit: int | None = None) -> list[dict]:
        """Datasets, newest first (``limit``: at most this many)."""
        return _take(self.pages("/v1/datasets"), limit)

    def get_dataset(self, dataset_id: str) -> dict:
        return self.get(f"/v1/datasets/{dataset_id}")

    def records(self, dataset_id: str) -> Iterator[dict]:
        """A dataset's records, in upload order."""
        for item in self.pages(f"/v1/datasets/{dataset_id}/records", cursor="index", limit=1000):
            yield item["data"]

    def download_dataset(self, dataset_id: str, path: str | Path, format: str = "jsonl") -> Path:
        """A dataset's records as a file: ``jsonl`` (one record a line) or ``parquet``, streamed by the
        server's export (``GET /v1/datasets/{id}/export``)."""
        return self._stream_to(f"/v1/datasets/{dataset_id}/export", Path(path), params={"format": format})

    def import_hub_dataset(self, hub_id: str, split: str, kind: str, name: str | None = None,
                           column_map: dict[str, str] | None = None, config: str | None = None) -> dict:
        """Load one split of a Hugging Face dataset where this client runs (the local cache; the hub unless
        ``HF_HUB_OFFLINE=1``; or a ``save_to_disk`` / data-files folder) and upload it as Parquet.
        Needs the ``hf`` extra (``datasets``); ``api.hub.HubImportError`` says what could not be loaded."""
        import tempfile

        from api.hub import NAME_MAX, load_hub_dataset

        dataset = load_hub_dataset(hub_id, split, config)
        label = Path(hub_id).name if Path(hub_id).is_dir() else hub_id
        with tempfile.TemporaryDirectory(prefix="beaver-import-") as tmp:
            path = Path(tmp) / "data.parquet"
            dataset.to_parquet(str(path))
            return self.upload_dataset(path, kind, name or f"{label}:{split}"[:NAME_MAX], column_map)

    # --- jobs -----------------------------------------------------------------------------------

    def submit(self, job_type: str, params: dict | None = None, datasets: Iterable[str] = (), world_size: int = 1,
               idempotency_key: str | None = None) -> dict:
        """Create a job; the server checks params, datasets and models first (a 4xx names the param)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        body = {"type": job_type, "params": params or {}, "datasets": list(datasets), "world_size": world_size}
        return self.post("/v1/jobs", body, headers=headers)

    def list_jobs(self, status: str | None = None, job_type: str | None = None, limit: int | None = None) -> list[dict]:
        """Jobs, newest first, optionally of one status or type."""
        return _take(self.pages("/v1/jobs", status=status, type=job_type), limit)

    def get_job(self, job_id: str) -> dict:
        return self.get(f"/v1/jobs/{job_id}")

    def cancel(self, job_id: str) -> dict:
        """Cancel a job (queued: at once; running: within seconds). 409 if it already ended."""
        return self.post(f"/v1/jobs/{job_id}/cancel")

    def events(self, job_id: str, after: int = 0) -> list[dict]:
        """A job's events so far, oldest first (after the event id ``after``)."""
        return list(self.pages(f"/v1/jobs/{job_id}/events", cursor="id", limit=1000, after=after or None))

    def follow(self, job_id: str, after: int = 0, reconnect_seconds: float = 1.0) -> Iterator[dict]:
        """A job's events as they are written (server-sent events), until it ends; a dropped stream is
        resumed after the last event seen, so none is lost or repeated."""
        while True:
            try:
                with self.http.stream("GET", f"/v1/jobs/{job_id}/events", params={"after": after} if after else None,
                                      headers={"Accept": "text/event-stream"}, timeout=httpx.Timeout(30, read=None)) as r:
                    if r.status_code >= 400:
                        r.read()
                        raise BeaverError.from_response(r)
                    kind = None
                    for line in r.iter_lines():
                        if line.startswith("event: "):
                            kind = line[7:]
                        elif line.startswith("data: "):
                            if kind == "end":
                                return
                            event = json.loads(line[6:])
                            after = event["id"]
                            yield event
            except httpx.TransportError:
                pass  # the connection dropped (a restarted API, a proxy's idle timeout): resume
            if self.get_job(job_id)["status"] in TERMINAL and not self.get(
                    f"/v1/jobs/{job_id}/events", after=after or None, limit=1)["data"]:
                return
            time.sleep(reconnect_seconds)

    def wait(self, job_id: str, poll_seconds: float = 1.0, timeout: float | None = None) -> dict:
        """The job once it has ended (succeeded, failed or cancelled); ``TimeoutError`` past ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            if job["status"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
            time.sleep(poll_seconds)

    def files(self, job_id: str) -> list[dict]:
        """A job's reports, plots and logs (``name``, ``bytes``, ``content_type``)."""
        return self.get(f"/v1/jobs/{job_id}/files")["data"]

    def download_file(self, job_id: str, name: str, path: str | Path) -> Path:
        return self._stream_to(f"/v1/jobs/{job_id}/files/{name}", Path(path))

    def _stream_to(self, url: str, path: Path, **kwargs) -> Path:
        """A streamed body into ``path`` (written whole or not at all: a temporary file renamed at the end)."""
        part = path.with_name(path.name + ".part")
        try:
            with self.http.stream("GET", url, **kwargs) as r:
                if r.status_code >= 400:
                    r.read()
                    raise BeaverError.from_response(r)
                with part.open("wb") as f:
                    for chunk in r.iter_bytes():
                        f.write(chunk)
        except httpx.TransportError as e:
            part.unlink(missing_ok=True)
            raise BeaverError(0, "unreachable", f"cannot reach {self.url}: {e or type(e).__name__}") from None
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        part.replace(path)
        return path

    # --- models and rounds ----------------------------------------------------------------------

    def list_models(self, kind: str | None = None) -> list[dict]:
        """Rounds and registered models (``kind``: policy, reward, cost or round)."""
        return self.get("/v1/models", kind=kind)["data"]

    def get_model(self, ref: str) -> dict:
        """A model by id or name, or a round by name."""
        return self.get(f"/v1/models/{ref}")

    def register_model(self, name: str, kind: str, path: str, metrics: dict | None = None) -> dict:
        """Register a Hugging Face folder on the server (under a model root) as a policy, reward or cost model."""
        return self.post("/v1/models", {"name": name, "kind": kind, "path": path, "metrics": metrics or {}})

    def pull_model(self, ref: str, directory: str | Path) -> Path:
        """Download a model (id or name; a round name: its policy) and unpack it into ``directory``,
        a folder ``from_pretrained`` loads. The archive streams: a 16 GB model never sits in memory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with self.http.stream("GET", f"/v1/models/{ref}/archive", timeout=httpx.Timeout(30, read=600)) as r:
            if r.status_code >= 400:
                r.read()
                raise BeaverError.from_response(r)
            with tarfile.open(fileobj=_Stream(r.iter_raw()), mode="r|") as tar:
                for member in tar:
                    # Members are "<model name>/<file>": the files go straight into ``directory``.
                    parts = member.name.split("/", 1)
                    if len(parts) < 2 or not member.isfile():
                        continue
                    member.name = parts[1]
                    tar.extract(member, directory, filter="data")  # "data": no absolute path, no "..", no links
        return directory

    def list_rounds(self, limit: int | None = None) -> list[dict]:
        """Safe RLHF rounds, newest first."""
        return _take(self.pages("/v1/rounds"), limit)

    def get_round(self, ref: str) -> dict:
        return self.get(f"/v1/rounds/{ref}")

    def create_round(self, name: str, policy: str, reward_model: str | None = None, cost_model: str | None = None,
                     metrics: dict | None = None) -> dict:
        return self.post("/v1/rounds", {"name": name, "policy": policy, "reward_model": reward_model,
                                        "cost_model": cost_model, "metrics": metrics or {}})

    # --- serving --------------------------------------------------------------------------------

    def score(self, model: str, items: list[tuple[str, str] | dict]) -> list[dict]:
        """Reward and cost of (prompt, response) pairs by a round's (or score model's) judges; safe ⇔ cost ≤ 0."""
        body = [i if isinstance(i, dict) else {"prompt": i[0], "response": i[1]} for i in items]
        return self.post("/v1/score", {"model": model, "items": body})["data"]

    def chat(self, model: str, messages: list[dict] | str, **options) -> str:
        """A round's (or policy's) answer; ``options``: OpenAI's (temperature, max_tokens, seed, …)."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        answer = self.post("/v1/chat/completions", {"model": model, "messages": messages, **options})
        return answer["choices"][0]["message"]["content"]


def load_params(path: str | Path) -> dict:
    """Job params from a YAML or JSON file (a recipe of docs/recipes): a mapping, ``ValueError`` otherwise.
    YAML 1.2's numbers: ``lr: 1e-5`` is a float (PyYAML alone reads YAML 1.1, where it is a string)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        params = json.loads(text) if path.suffix == ".json" else yaml_load(text)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ValueError(f"{path} must hold a mapping of params, not a {type(params).__name__}")
    return params


def yaml_load(text: str) -> Any:
    """``yaml.safe_load`` with YAML 1.2's floats (1e-5, 2E3); a YAML error as ``ValueError``."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                 re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))
    try:
        return yaml.load(text, Loader=Loader)  # noqa: S506 — a SafeLoader
    except yaml.YAMLError as e:
        raise ValueError(str(e)) from None


def _take(items: Iterator[dict], limit: int | None) -> list[dict]:
    out = []
    for item in items:
        if limit is not None and len(out) >= limit:
            break
        out.append(item)
    return out


class _Stream:
    """A file-like ``read()`` over an iterator of byte chunks (what ``tarfile``'s stream mode reads)."""

    def __init__(self, chunks: Iterator[bytes]):
        self.chunks, self.buffer = chunks, b""

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self.buffer) < size:
            chunk = next(self.chunks, None)
            if chunk is None:
                break
            self.buffer += chunk
        if size < 0:
            out, self.buffer = self.buffer, b""
        else:
            out, self.buffer = self.buffer[:size], self.buffer[size:]
        return out
