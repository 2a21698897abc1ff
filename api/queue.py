"""Sending jobs to Celery by task *name*: the API never imports worker code."""

from __future__ import annotations

from functools import lru_cache

from api.settings import celery_config, get_settings, mask_url

RUN_JOB_TASK = "beaver.run_job"


class BrokerUnavailable(RuntimeError):
    pass


@lru_cache
def celery_client():
    from celery import Celery

    if get_settings().resolved_broker_url.startswith("sqla+"):
        embedded_broker_tuning()
    return Celery("beaver", **celery_config(get_settings()))


def embedded_broker_tuning() -> None:
    # kombu's SQLAlchemy transport polls its table; its interval is a class attribute only
    # (broker_transport_options go to create_engine). 0.2 s keeps job start latency low.
    from kombu.transport import sqlalchemy as sqla_transport

    sqla_transport.Transport.polling_interval = 0.2


def job_queue(queue: str, world_size: int) -> str:
    """The queue of a job on ``world_size`` ranks: its type's queue, with the rank count when > 1
    (``gpu-4``), so only a worker that can hold 4 ranks ever receives it."""
    return queue if world_size == 1 else f"{queue}-{world_size}"


def worker_queues(queues: str, ranks: int) -> str:
    """What a worker with ``ranks`` ranks consumes: each of ``queues`` (comma-separated) and, for
    training queues, the queues of every job size up to ``ranks`` (gpu, gpu-2, …, gpu-N)."""
    out = []
    for queue in (q.strip() for q in queues.split(",") if q.strip()):
        out.append(queue)
        if queue != "cpu":
            out += [job_queue(queue, n) for n in range(2, ranks + 1)]
    return ",".join(out)


def default_ranks() -> int:
    """Ranks a worker offers by default: the GPUs it sees, or 1 on a CPU host."""
    import torch

    return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1


def send_job(job_id: str, queue: str) -> None:
    """Queue a job's message. A client whose connection broke is rebuilt and tried once more: the
    embedded broker's first send, racing a worker that creates the broker's tables at the same
    moment, failed with "'NoneType' object has no attribute 'client'" and left the client unusable."""
    for attempt in (1, 2):
        try:
            celery_client().send_task(RUN_JOB_TASK, args=[job_id], queue=queue, retry=True,
                                      retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5})
            return
        except Exception as e:  # noqa: BLE001 — kombu raises many types for one meaning
            celery_client.cache_clear()
            if attempt == 2:
                raise BrokerUnavailable(f"cannot reach broker {mask_url(get_settings().resolved_broker_url)}: "
                                        f"{e}") from None
