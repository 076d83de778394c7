"""Entry point for ``celery -A orchestration worker|beat|flower``: the app built from the environment."""

from __future__ import annotations

from typing import Any

from celery.signals import beat_init, setup_logging, worker_init, worker_process_init

from orchestration.app import create_celery
from pool import collector
from pool.logs import configure_logging
from pool.settings import Settings

settings = Settings()
app = create_celery(settings)


@setup_logging.connect
def _configure_logging(**_: Any) -> None:
    # Our format (text or JSON lines) instead of Celery's own.
    configure_logging(settings)


@worker_init.connect
@worker_process_init.connect
@beat_init.connect
def _settle(**_: Any) -> None:
    # A worker's main process before it forks its pool, each pool process after: see pool.collector.
    collector.settle()
