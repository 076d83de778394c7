"""Jobs that talk to nodes (queue ``dispatch``): ExecuteTask and StopTaskExecution."""

from __future__ import annotations

import logging

from celery import Task, shared_task

from models import tasks
from models.db import Database
from orchestration import dispatcher, outcomes
from orchestration.runtime import runtime

log = logging.getLogger(__name__)


def _mark_running(db: Database, task_id: str, attempt: int, reason: str) -> bool:
    from models.tables import utcnow

    def work(session) -> bool:  # type: ignore[no-untyped-def]
        task = tasks.get(session, task_id)
        if task is None:
            return False
        return tasks.transition(
            session,
            task,
            to=tasks.RUNNING,
            expected={tasks.ASSIGNED},
            at_attempt=attempt,
            reason=reason,
            started_at=utcnow(),
        )

    return db.transaction(work)


@shared_task(name="pool.dispatch.execute", bind=True)
def execute(self: Task, task_id: str, attempt: int) -> str:
    """Send an ASSIGNED task to its node. Accepted → RUNNING; refused/unreachable → next attempt."""
    rt = runtime(self.app)
    outcome = dispatcher.execute(rt.db, rt.lifecycle.storage, rt.signer, rt.channels, rt.settings, task_id, attempt)
    if outcome.stale:
        return "stale"
    if outcome.accepted:
        _mark_running(rt.db, task_id, attempt, f"accepted by node: {outcome.reason}")
        return "running"
    if outcomes.requeue(rt.db, rt.settings, task_id, attempt, outcome.reason, node_caused=True):
        rt.lifecycle.request_matching(countdown=rt.settings.DISPATCH_BACKOFF_SECONDS)
    return f"requeued: {outcome.reason}"


@shared_task(name="pool.dispatch.stop", bind=True)
def stop(self: Task, task_id: str) -> str:
    """Tell the node to stop; the task is STOPPED whatever the node says (or if it is gone)."""
    rt = runtime(self.app)
    said = dispatcher.stop_execution(rt.db, rt.signer, rt.channels, rt.settings, task_id)
    outcomes.stop(rt.db, task_id, f"stopped by its owner ({said})")
    rt.lifecycle.request_matching()
    return said
