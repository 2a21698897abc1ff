"""The Celery app. Broker and backend come from settings: an embedded SQLite broker by default,
Redis for a team. Start a worker with ``beaver worker`` (or ``celery -A workers.celery_app worker``)."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import threading
import time

from celery import Celery, signals

from api.settings import celery_config, get_settings

settings = get_settings()
if settings.resolved_broker_url.startswith("sqla+"):
    from api.queue import embedded_broker_tuning

    embedded_broker_tuning()

app = Celery("beaver", include=["workers.tasks"])
app.conf.update(celery_config(settings))
# A worker rides out a broker restart of any length (the API, which only sends, gives up after a
# few tries and answers 503); `beaver worker` still fails fast when the broker is down at start.
app.conf.broker_connection_max_retries = None

# This worker's identity, set at start-up: what ``jobs.worker`` and the workers table hold. The
# node name (--name) is for people and may be shared; the identity never is (issue 12: two workers
# named beaver@%h re-queued each other's running jobs). A prefork pool's children inherit it: one
# identity per `beaver worker`, whose jobs are told apart by their attempt number (the fence).
_identity: str | None = None


def worker_identity(name: str | None = None) -> str:
    """``<name>/<host>:<pid>:<random hex>``, made once per worker process."""
    global _identity
    if _identity is None:
        host = socket.gethostname()
        _identity = f"{name or f'beaver@{host}'}/{host}:{os.getpid()}:{secrets.token_hex(3)}"
    return _identity


@signals.worker_init.connect
def _on_worker_init(sender=None, **_):
    if settings.torch_threads > 0:
        import torch

        torch.set_num_threads(settings.torch_threads)
    worker_identity(getattr(sender, "hostname", None))
    _exit_with_supervisor()


@signals.worker_ready.connect
def _on_worker_ready(sender=None, **_):
    # Jobs whose heartbeat expired (their worker died) are re-queued or failed before new work
    # starts; then a thread keeps this worker's row in the registry fresh and keeps reaping.
    from workers import ranks
    from workers.reaper import reap_orphans, start_reaper_thread

    queues = sorted(app.amqp.queues.consume_from or app.amqp.queues)
    reap_orphans()
    start_reaper_thread(worker=worker_identity(), name=getattr(sender, "hostname", None) or "", queues=queues)
    if not type(getattr(sender, "pool", None)).__module__.endswith("prefork"):
        ranks.prepare_spare()  # jobs run from this process: its spare is ready for the first one


@signals.worker_process_init.connect
def _on_pool_process_init(**_):
    from workers import ranks

    ranks.prepare_spare()  # a prefork pool's child runs jobs: a spare of its own


@signals.worker_shutting_down.connect
def _on_worker_shutting_down(**_):
    # Celery's warm shutdown waits for the running job: its processes are stopped instead (STOP,
    # then killed after BEAVER_CANCEL_GRACE_SECONDS) and the job is left for the reaper to re-queue.
    # This runs in a signal handler: it only sets a flag.
    from workers import ranks

    ranks.stopping.set()


@signals.worker_shutdown.connect
def _on_worker_shutdown(**_):
    # A worker that stops cleanly leaves the registry at once; a killed one ages out of it.
    from workers import ranks
    from workers.reaper import unregister_worker

    ranks.close_spare()
    if _identity is not None:
        unregister_worker(_identity)


@signals.worker_process_shutdown.connect
def _on_pool_process_shutdown(**_):
    from workers import ranks

    ranks.close_spare()


def _exit_with_supervisor() -> None:
    """A worker started by ``beaver up`` stops when ``beaver up`` is gone, even killed outright
    (``BEAVER_SUPERVISOR_PID``): a warm shutdown (its job's processes stopped), then an exit."""
    pid = int(os.environ.get("BEAVER_SUPERVISOR_PID", "0"))
    if not pid:
        return

    from workers.ranks import alive

    def watch():
        while alive(pid):
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(settings.cancel_grace_seconds + 15)  # the job's processes are stopped within the grace
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="watch-supervisor").start()
