"""Jobs that talk to nodes (queue ``dispatch``): ExecuteTask and StopTaskExecution."""

from __future__ import annotations

import logging

from celery import Task, shared_task
from sqlalchemy.orm import Session

from models import tasks
from models.db import Database
from models.tables import utcnow
from orchestration import dispatcher, outcomes
from orchestration.runtime import runtime

log = logging.getLogger(__name__)


def _mark_running(db: Database, accepted: list[tuple[tasks.TaskView, int, str]]) -> None:
    """ASSIGNED → RUNNING for every accepted (task as dispatched, attempt, reason), in one
    transaction of three statements: the lock re-reads each task's status and attempt, so the
    tasks are not read again (one that moved on meanwhile is left as it is)."""
    if not accepted:
        return
    started = utcnow()
    moves = [tasks.Move(task, attempt, reason, values={"started_at": started}) for task, attempt, reason in accepted]

    def work(session: Session) -> None:
        tasks.transition_many(session, moves, to=tasks.RUNNING, expected={tasks.ASSIGNED})

    db.transaction(work)


def _dispatch(self: Task, attempts: list[tuple[str, int]]) -> dict[tuple[str, int], dispatcher.Outcome]:
    rt = runtime(self.app)
    results = dispatcher.execute_many(rt.db, rt.lifecycle.storage, rt.signer, rt.channels, rt.settings, attempts)
    accepted = [
        (o.task, attempt, f"accepted by node: {o.reason}")
        for (_, attempt), o in results.items()
        if o.accepted and o.task is not None
    ]
    _mark_running(rt.db, accepted)
    retry = False
    refused = {key: o for key, o in results.items() if not o.accepted and not o.stale}
    for (task_id, attempt), outcome in refused.items():
        retry |= outcomes.requeue(rt.db, rt.settings, task_id, attempt, outcome.reason, node_caused=outcome.node_caused)
        log.info("dispatch of %s attempt %d failed: %s", task_id, attempt, outcome.reason)
    if retry:
        rt.lifecycle.request_matching(countdown=rt.settings.DISPATCH_BACKOFF_SECONDS)
    return results


@shared_task(name="pool.dispatch.execute", bind=True)
def execute(self: Task, task_id: str, attempt: int) -> str:
    """Send an ASSIGNED task to its node. Accepted → RUNNING; refused/unreachable → next attempt."""
    outcome = _dispatch(self, [(task_id, attempt)])[(task_id, attempt)]
    return "stale" if outcome.stale else "running" if outcome.accepted else f"requeued: {outcome.reason}"


@shared_task(name="pool.dispatch.execute_many", bind=True)
def execute_many(self: Task, attempts: list[list[object]]) -> dict[str, int]:
    """:func:`execute` for a batch of (task_id, attempt) pairs, the calls to the nodes in flight at once."""
    results = _dispatch(self, [(str(task_id), int(attempt)) for task_id, attempt in attempts])  # type: ignore[call-overload]
    running = sum(o.accepted for o in results.values())
    stale = sum(o.stale for o in results.values())
    return {"running": running, "requeued": len(results) - running - stale, "stale": stale}


@shared_task(name="pool.dispatch.stop", bind=True)
def stop(self: Task, task_id: str) -> str:
    """Tell the node to stop; the task is STOPPED whatever the node says (or if it is gone)."""
    rt = runtime(self.app)
    said = dispatcher.stop_execution(rt.db, rt.signer, rt.channels, rt.settings, task_id)
    outcomes.stop(rt.db, task_id, f"stopped by its owner ({said})")
    rt.lifecycle.request_matching()
    return said
