"""Entry point for ``celery -A orchestration worker|beat|flower``: the app built from the environment."""

from __future__ import annotations

from typing import Any

from celery.signals import setup_logging

from orchestration.app import create_celery
from pool.logs import configure_logging
from pool.settings import Settings

settings = Settings()
app = create_celery(settings)


@setup_logging.connect
def _configure_logging(**_: Any) -> None:
    # Our format (text or JSON lines) instead of Celery's own.
    configure_logging(settings)
