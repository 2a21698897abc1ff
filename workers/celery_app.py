"""The Celery app. Broker and backend come from settings: an embedded SQLite broker by default,
Redis for a team. Start a worker with ``beaver worker`` (or ``celery -A workers.celery_app worker``)."""

from __future__ import annotations

from celery import Celery, signals

from api.settings import celery_config, get_settings

settings = get_settings()
if settings.resolved_broker_url.startswith("sqla+"):
    from api.queue import embedded_broker_tuning

    embedded_broker_tuning()

app = Celery("beaver", include=["workers.tasks"])
app.conf.update(celery_config(settings))


@signals.worker_init.connect
def _on_worker_init(**_):
    if settings.torch_threads > 0:
        import torch

        torch.set_num_threads(settings.torch_threads)


@signals.worker_ready.connect
def _on_worker_ready(sender=None, **_):
    # A job left "running" by a worker that died is re-queued or failed before new work starts.
    from workers.reaper import reap_orphans, start_reaper_thread

    hostname = getattr(sender, "hostname", None)
    reap_orphans(own_hostname=hostname)
    start_reaper_thread()
