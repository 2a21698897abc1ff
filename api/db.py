"""Database engine, sessions and migrations (SQLite embedded, PostgreSQL for teams).

Sessions under concurrency (issue 12): an API process holds at most ``BEAVER_DB_POOL_SIZE``
database sessions at once (default ``BEAVER_API_THREADS``, the threadpool that runs sync routes),
and its connection pool has exactly that many connections, so taking a connection never waits for
another request. A request waits for a session *before* it takes a thread, in order of arrival, at
most ``BEAVER_QUEUE_TIMEOUT_SECONDS``; then ``DatabaseBusy`` (429 with Retry-After). Before, the pool
(5 + 10) was smaller than the threadpool (40): threads blocked on the pool while requests holding
connections waited for a thread, until the pool's 30 s timeout made 500s. A session is held while a
route runs; an async route that awaits an engine calls ``release`` first. Connections per process:
``BEAVER_DB_POOL_SIZE`` + ``BEAVER_DB_MAX_OVERFLOW`` (the overflow: the health snapshot thread, a
route's second transaction).

One budget per request (issue 18): every wait a request makes — a session for its key check, one for its
route, then a served model to take it up — comes out of one ``BEAVER_QUEUE_TIMEOUT_SECONDS``, so a request
is taken up or refused within it, not within each wait (a POST to /v1/score could wait three timeouts with
no 429).
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Any, Callable

import anyio
import anyio.to_thread
from anyio.lowlevel import RunVar
from sqlalchemy import event, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlmodel import Session, create_engine

from api.settings import get_settings, mask_url

MIGRATIONS_DIR = Path(str(files("api.migrations")))  # migrations/ of the repository, installed as package data


class DatabaseUnavailable(RuntimeError):
    pass


@lru_cache
def get_engine(url: str | None = None) -> Engine:
    settings = get_settings()
    url = url or settings.resolved_database_url
    pool = {"pool_size": settings.resolved_db_pool_size, "max_overflow": settings.db_max_overflow,
            "pool_timeout": settings.queue_timeout_seconds}
    if url.startswith("sqlite"):
        Path(url.split("///", 1)[1]).parent.mkdir(parents=True, exist_ok=True) if "///" in url else None
        in_memory = "///" not in url or ":memory:" in url  # one connection, no pool to size
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                               **({} if in_memory else pool))

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            # WAL lets the API read while the worker writes; NORMAL sync is safe under WAL.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
    else:
        engine = create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": 5}, **pool)
    return engine


def check_database(url: str | None = None) -> None:
    """Fail fast, in one line naming the (masked) URL, when the database cannot be reached."""
    url = url or get_settings().resolved_database_url
    try:
        with get_engine(url).connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as e:  # noqa: BLE001 — any driver error means the same thing to the user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DatabaseUnavailable(f"cannot reach database {mask_url(url)}: {reason}") from None


def upgrade(url: str | None = None) -> None:
    """``alembic upgrade head`` on the configured database."""
    from alembic import command
    from alembic.config import Config

    url = url or get_settings().resolved_database_url
    check_database(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["engine"] = get_engine(url)
    command.upgrade(cfg, "head")


# --- sessions under concurrency -------------------------------------------------------------------

class DatabaseBusy(RuntimeError):
    """Every database session of this process stayed in use for the whole queue timeout (→ 429)."""

    retry_after = 1  # seconds, for the Retry-After header


class Slot:
    """One of the process's ``BEAVER_DB_POOL_SIZE`` sessions; ``release`` gives it back, once."""

    def __init__(self, semaphore: anyio.Semaphore):
        self._semaphore = semaphore

    def release(self) -> None:
        if self._semaphore is not None:
            self._semaphore, semaphore = None, self._semaphore
            semaphore.release()


_SLOTS: RunVar[anyio.Semaphore] = RunVar("beaver_db_slots")  # one per event loop (tests run several)
_SLOT = "beaver.slot"  # where a request's session keeps its slot (``Session.info``)
# The seconds the current request may still wait (a one-item list: the tasks a request starts spend it too);
# None outside a request: each wait gets the whole timeout.
_BUDGET: ContextVar[list[float] | None] = ContextVar("beaver_queue_budget", default=None)


def start_queue_budget() -> None:
    """Give the current request its queue budget (the request limits do, as a request arrives)."""
    _BUDGET.set([get_settings().queue_timeout_seconds])


def queue_budget() -> float:
    """How long the current request may still wait in a queue."""
    budget = _BUDGET.get()
    return get_settings().queue_timeout_seconds if budget is None else max(0.0, budget[0])


async def acquire_slot() -> Slot:
    """Wait, in order of arrival, at most the request's queue budget for a session slot (a request whose
    budget is spent takes a free slot, but does not wait for one)."""
    settings = get_settings()
    try:
        semaphore = _SLOTS.get()
    except LookupError:
        semaphore = anyio.Semaphore(settings.resolved_db_pool_size)
        _SLOTS.set(semaphore)
    timeout, start = queue_budget(), time.monotonic()
    try:
        if timeout > 0:
            with anyio.move_on_after(timeout):
                await semaphore.acquire()
                return Slot(semaphore)
        else:
            try:
                semaphore.acquire_nowait()
                return Slot(semaphore)
            except anyio.WouldBlock:
                pass
    finally:
        if (budget := _BUDGET.get()) is not None:
            budget[0] -= time.monotonic() - start
    raise DatabaseBusy(f"the server is busy: all {settings.resolved_db_pool_size} database sessions stayed in use "
                       f"for {settings.queue_timeout_seconds:g} s; retry after {DatabaseBusy.retry_after} s")


async def get_session():
    """A route's session (the ``SessionDep`` dependency), in a slot held until the route returns."""
    slot = await acquire_slot()
    session = Session(get_engine())
    session.info[_SLOT] = slot
    try:
        yield session
    finally:
        await release(session)


async def release(session: Session) -> None:
    """Close a route's session and give its slot back, e.g. before awaiting an engine: a scoring
    request must not hold a connection while it waits for the model. Don't use the session after."""
    slot = session.info.pop(_SLOT, None)
    try:
        with anyio.CancelScope(shield=True):  # a client that went away must not leak the slot
            # Its own limiter: giving a connection back never queues behind requests for threads.
            await anyio.to_thread.run_sync(session.close, limiter=anyio.CapacityLimiter(1))
    finally:
        if slot is not None:
            slot.release()


async def run_db(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(session, *args)`` in a worker thread, with a short session of its own in a slot: database
    work of async code that has no route session (the request limits' key check, event streams)."""
    slot = await acquire_slot()

    def call():
        with Session(get_engine()) as session:
            return fn(session, *args)

    try:
        return await anyio.to_thread.run_sync(call)
    except PoolTimeout:  # every connection in use, overflow included: the server is busy all the same
        raise DatabaseBusy("the server is busy: no database connection came free in time") from None
    finally:
        slot.release()


def size_threadpool() -> None:
    """This event loop's threadpool gets ``BEAVER_API_THREADS`` threads (from the app's lifespan)."""
    anyio.to_thread.current_default_thread_limiter().total_tokens = get_settings().api_threads
