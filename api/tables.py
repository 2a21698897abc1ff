"""SQLModel tables. Every change here ships with an Alembic migration in ``migrations/versions``.

Ids are ``<prefix>-<12 hex of ms time><8 random hex>``: unique, and sorting by id sorts by
creation time, which is what cursor pagination (``?after=``) walks.
"""

from __future__ import annotations

import os
import time
from typing import Any

from sqlalchemy import JSON, Column, Index
from sqlmodel import Field, SQLModel


def new_id(prefix: str) -> str:
    return f"{prefix}-{int(time.time() * 1000):012x}{os.urandom(4).hex()}"


def now() -> int:
    return int(time.time())


ROLES = ("admin", "trainer", "annotator", "viewer")
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL_STATES = ("succeeded", "failed", "cancelled")

# A failed job's ``error`` is ``{"code": <one of these>, "message": <what happened>}``; the message
# never starts with an exception's class name, and a traceback, when there is one, is in the job's events.
JOB_ERROR_CODES = {
    "invalid_input": "the params or the data cannot work (ValueError, invalid records, bad params)",
    "model_not_found": "a model reference names nothing loadable, or its files are missing or unreadable",
    "out_of_memory": "the job ran out of GPU or CPU memory",
    "disk_full": "a write failed for want of room (no space left, a quota, a file size limit): the message names "
                 "the device's folder",
    "endpoint_failed": "an outbound endpoint (an evaluate job's judge) failed: the message says how (connection "
                       "refused, timed out, HTTP 503, …), never its URL or reply",
    "rollout_engine_failed": "the job's rollout engine (vLLM) could not start, exited, or failed a request (a weight "
                             "sync, a generation): the message says how; its output is rollout-engine.log in the "
                             "attempt's artifacts folder",
    "worker_lost": "the worker running the job died, and the job had no attempts left",
    "rank_failed": "the job's process (or a rank of a multi-rank job) died without an error of its own (killed, e.g. "
                   "out of host memory)",
    "broker_unavailable": "the job could not be queued: the Celery broker did not answer",
    "internal_error": "anything else (a bug: the traceback is in the job's events)",
    "job_failed": "a job that failed before errors had codes (its old text is the message)",
}


def job_error(code: str, message: str) -> dict:
    """A job's ``error`` object."""
    if code not in JOB_ERROR_CODES:
        raise ValueError(f"unknown job error code {code!r}")
    return {"code": code, "message": message}


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_keys"
    id: str = Field(primary_key=True)
    name: str
    role: str
    key_hash: str = Field(index=True, unique=True)  # sha256 of the key; the key itself is never stored
    prefix: str  # first characters, so a person can tell keys apart
    created_at: int = Field(default_factory=now)
    revoked_at: int | None = None


class Dataset(SQLModel, table=True):
    __tablename__ = "datasets"
    id: str = Field(primary_key=True)
    name: str = Field(index=True)
    kind: str
    num_records: int = 0
    stats: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_by: str | None = None
    created_at: int = Field(default_factory=now)


class DatasetRecord(SQLModel, table=True):
    __tablename__ = "dataset_records"
    dataset_id: str = Field(foreign_key="datasets.id", primary_key=True, ondelete="CASCADE")
    idx: int = Field(primary_key=True)
    data: dict = Field(sa_column=Column(JSON, nullable=False))


class Job(SQLModel, table=True):
    """A job row; ``error`` is a ``job_error`` object (codes in ``JOB_ERROR_CODES``) once it failed."""

    __tablename__ = "jobs"
    id: str = Field(primary_key=True)
    type: str = Field(index=True)
    status: str = Field(default="queued", index=True)
    params: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    datasets: list = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    queue: str
    world_size: int = 1  # ranks the job runs on (models/distributed.py); > 1 only for training jobs
    metrics: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    error: dict | None = Field(default=None, sa_column=Column(JSON(none_as_null=True)))
    result_models: list = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    result_datasets: list = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    cancel_requested: bool = False
    attempts: int = 0
    worker: str | None = None  # identity of the worker running the current attempt (see Worker)
    # running: its runner's last beat; queued: when it was re-queued or its message re-sent (workers/reaper.py)
    heartbeat_at: float | None = None
    idempotency_key: str | None = None
    created_by: str | None = None
    created_at: int = Field(default_factory=now)
    started_at: int | None = None
    finished_at: int | None = None

    __table_args__ = (Index("ix_jobs_idempotency", "created_by", "idempotency_key", unique=True),)


class Worker(SQLModel, table=True):
    """A live worker, as it reports itself every ``heartbeat_seconds``; silent for
    ``orphan_after_seconds`` it counts as lost (``/v1/health`` lists the live ones).

    ``id`` is the worker's identity, ``<name>/<host>:<pid>:<random hex>``: unique per process even when
    two workers share a ``--name``, and what ``Job.worker`` holds while it runs a job."""

    __tablename__ = "workers"
    id: str = Field(primary_key=True)
    name: str  # the Celery node name given with --name (display only)
    host: str
    pid: int
    queues: str = ""  # comma-separated
    started_at: float = Field(default_factory=time.time)
    heartbeat_at: float = Field(default_factory=time.time, index=True)


class JobEvent(SQLModel, table=True):
    __tablename__ = "job_events"
    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(foreign_key="jobs.id", index=True, ondelete="CASCADE")
    created_at: float = Field(default_factory=time.time)
    level: str = "info"
    message: str = ""
    data: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class Model(SQLModel, table=True):
    """A registered model: a directory in Hugging Face format (policy, reward or cost)."""

    __tablename__ = "models"
    id: str = Field(primary_key=True)
    name: str = Field(index=True)
    kind: str  # policy | reward | cost
    path: str
    job_id: str | None = None
    metrics: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: int = Field(default_factory=now)


class Round(SQLModel, table=True):
    """A Safe RLHF round (Beaver-vk): a policy with the reward and cost models that shaped it."""

    __tablename__ = "rounds"
    id: str = Field(primary_key=True)
    name: str = Field(unique=True, index=True)
    policy_model_id: str = Field(foreign_key="models.id")
    reward_model_id: str | None = Field(default=None, foreign_key="models.id")
    cost_model_id: str | None = Field(default=None, foreign_key="models.id")
    metrics: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: int = Field(default_factory=now)


class Battle(SQLModel, table=True):
    """An arena conversation: the rounds in its panes, in position order (in a battle, two drawn at
    random and hidden as "Model A" / "Model B" until a vote)."""

    __tablename__ = "battles"
    id: str = Field(primary_key=True)
    mode: str  # "battle" (blind) | "side_by_side"
    rounds: list = Field(sa_column=Column(JSON, nullable=False))  # round names, pane order
    system: str | None = None
    created_by: str | None = None
    created_at: int = Field(default_factory=now)


class ArenaTurn(SQLModel, table=True):
    """The user's message of one turn of a battle: every pane answers this same message."""

    __tablename__ = "arena_turns"
    battle_id: str = Field(foreign_key="battles.id", primary_key=True)
    turn: int = Field(primary_key=True)  # 1, 2, …
    content: str
    created_at: int = Field(default_factory=now)


class ArenaAnswer(SQLModel, table=True):
    """The transcript: the answer the server sent in one pane for one turn, stored as it is produced.
    A vote's answers are read from here, never from the voter; each pane's next turn is composed from
    here too. ``finish_reason`` is null while the pane is answering; then ``stop`` or ``length`` (the
    engine's), ``content_filter`` (the guard's refusal), ``stopped`` (the client went away: ``content``
    is what had been sent) or ``error`` (the answer failed: what had been sent, maybe nothing)."""

    __tablename__ = "arena_answers"
    battle_id: str = Field(foreign_key="battles.id", primary_key=True)
    turn: int = Field(primary_key=True)
    side: int = Field(primary_key=True)  # the pane, 0 = Model A
    content: str = ""
    finish_reason: str | None = None
    created_at: int = Field(default_factory=now)
    finished_at: int | None = None


class ArenaVote(SQLModel, table=True):
    """One vote on one answered turn: what the leaderboard reads (the same vote is a record of the
    ``arena-votes`` dataset, which training reads). One vote per battle and turn, whichever panes it
    compares."""

    __tablename__ = "arena_votes"
    id: int | None = Field(default=None, primary_key=True)
    battle_id: str = Field(foreign_key="battles.id", index=True)
    turn: int
    sides: str  # the two panes compared, "0,1"
    model_a: str
    model_b: str
    blind: bool
    helpful: str  # a | b | tie | both_bad
    safer: str  # a | b | tie
    a_safe: bool
    b_safe: bool
    dataset_id: str
    record_idx: int
    created_by: str | None = None
    created_at: int = Field(default_factory=now)

    __table_args__ = (Index("ux_arena_votes_battle_turn", "battle_id", "turn", unique=True),)


def public(row: SQLModel, object_name: str, **extra: Any) -> dict:
    """A row as its API object: ``{"object": name, **columns}`` with internals left out."""
    data = row.model_dump()
    data.pop("key_hash", None)
    return {"object": object_name, **data, **extra}
