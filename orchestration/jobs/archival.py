"""Archival jobs (queue ``archival``): final state, settlement, result archived with its sha256."""

from __future__ import annotations

from celery import Task, shared_task

from orchestration.runtime import runtime


@shared_task(name="pool.archival.archive", bind=True)
def archive(self: Task, task_id: str, attempt: int) -> str:
    """Finish a task whose node reported completion; returns the task's status afterwards."""
    return runtime(self.app).lifecycle.archive(task_id, attempt)


@shared_task(name="pool.archival.archive_many", bind=True)
def archive_many(self: Task) -> dict[str, int]:
    """Finish a batch of reported outcomes queued by TaskCompleted; how many reached each status."""
    lifecycle = runtime(self.app).lifecycle
    lifecycle.archival.started()
    try:
        statuses = lifecycle.archive_many(lifecycle.archival.take())
    finally:
        lifecycle.archival.finished()
    counts: dict[str, int] = {}
    for status in statuses.values():
        counts[status] = counts.get(status, 0) + 1
    return counts
