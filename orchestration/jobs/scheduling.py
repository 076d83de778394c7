"""Matching jobs (queue ``scheduling``)."""

from __future__ import annotations

from celery import Task, shared_task

from orchestration import scheduler
from orchestration.lifecycle import DISPATCH_MANY
from orchestration.runtime import runtime


@shared_task(name="pool.scheduling.match", bind=True)
def match(self: Task) -> int:
    """Place a batch of due PENDING tasks and enqueue their dispatch; how many were placed."""
    rt = runtime(self.app)
    rt.lifecycle.matching_started()
    placed = scheduler.match_pending(rt.db, rt.catalog, rt.settings, rng=rt.rng)
    size = rt.settings.DISPATCH_BATCH
    for start in range(0, len(placed), size):
        rt.lifecycle.jobs.send(DISPATCH_MANY, placed[start : start + size])
    if len(placed) >= rt.settings.MATCH_BATCH:
        rt.lifecycle.request_matching(countdown=0)  # more may be waiting
    return len(placed)
