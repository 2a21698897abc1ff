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


def send_job(job_id: str, queue: str) -> None:
    try:
        celery_client().send_task(RUN_JOB_TASK, args=[job_id], queue=queue, retry=True,
                                  retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5})
    except Exception as e:  # noqa: BLE001 — kombu raises many types for one meaning
        raise BrokerUnavailable(f"cannot reach broker {mask_url(get_settings().resolved_broker_url)}: {e}") from None
