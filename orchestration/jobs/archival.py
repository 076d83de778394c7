"""Archival jobs (queue ``archival``): final state, settlement, result archived with its sha256."""

from __future__ import annotations

from celery import Task, shared_task

from orchestration.runtime import runtime


@shared_task(name="pool.archival.archive", bind=True)
def archive(self: Task, task_id: str, attempt: int) -> str:
    """Finish a task whose node reported completion; returns the task's status afterwards."""
    return runtime(self.app).lifecycle.archive(task_id, attempt)
