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
    matching = rt.lifecycle.matching
    matching.started()
    placed: list[tuple[str, int]] = []
    size = rt.settings.DISPATCH_BATCH

    def dispatch(attempts: list[tuple[str, int]]) -> None:
        for start in range(0, len(attempts), size):
            rt.lifecycle.jobs.send(DISPATCH_MANY, attempts[start : start + size])

    try:
        placed = scheduler.match_pending(rt.db, rt.catalog, rt.settings, rng=rt.rng, placed_then=dispatch)
    finally:
        matching.finished(more=len(placed) >= rt.settings.MATCH_BATCH)  # a full batch: more may be waiting
    return len(placed)


@shared_task(name="pool.scheduling.refresh_catalog", bind=True)
def refresh_catalog(self: Task) -> int:
    """Bring this process's node catalog up to date; how many nodes it read.

    A matching job reads the nodes changed since its process's last look before it places
    anything. After a busy spell that is every node whose allocation changed meanwhile, and the
    first task of the next one waited for it (5,000 tasks: 0.8 s on a 2-core machine). Beat sends
    this job to the matching queue every CATALOG_REFRESH_SECONDS, so the matcher keeps up while
    no task waits, and a freshly started one has its catalog before the first task comes. While
    a matching job is queued or running, which reads the changes itself, it does nothing.
    """
    rt = runtime(self.app)
    if rt.lifecycle.matching.busy():
        return 0
    with rt.db.reading() as session:
        return rt.catalog.refresh(session)
