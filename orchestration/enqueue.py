"""Sending jobs from the API side: by name, onto named queues, after the commit."""

from __future__ import annotations

from typing import Any

from celery import Celery

from orchestration.app import create_celery
from pool.settings import Settings


class JobQueue:
    def __init__(self, app: Celery) -> None:
        self.app = app

    @classmethod
    def from_settings(cls, settings: Settings) -> JobQueue:
        return cls(create_celery(settings))

    def send(self, name: str, *args: Any, job_id: str | None = None, countdown: float | None = None) -> str:
        """Enqueue job ``name`` (routed to its queue by the app's routes); returns the job id.

        Nobody waits for these jobs' results, so none is kept: sending touches only the broker.
        Raises kombu's OperationalError when the broker cannot be reached.
        """
        result = self.app.send_task(name, args=args, task_id=job_id, countdown=countdown, ignore_result=True)
        return str(result.id)
