"""The recovery sweep (beat): work whose job was lost to a crash or a broker restart, re-driven."""

from __future__ import annotations

from datetime import timedelta

from models import tasks
from models.tables import utcnow
from orchestration import outcomes
from orchestration.lifecycle import DISPATCH, STOP, Lifecycle


def recover(lifecycle: Lifecycle) -> dict[str, int]:
    """Beat: re-drive work whose job was lost (crash, broker restart). Safe to run any time."""
    now = utcnow()
    stale = now - timedelta(seconds=lifecycle.settings.STALE_ASSIGNED_SECONDS)
    with lifecycle.db.reading() as session:
        due = tasks.due_pending(session, now, 1)
        assigned = tasks.in_status(session, [tasks.ASSIGNED], updated_before=stale)
        # outcomes reported a while ago and still not settled (their archival job was lost)
        finishing = [t for t in tasks.in_status(session, tasks.ACTIVE, updated_before=stale) if t.reported_outcome]
        stopping = tasks.in_status(session, [tasks.STOPPING], updated_before=stale)
        overdue = [
            t
            for t in tasks.in_status(session, [tasks.RUNNING])
            if t.started_at and now - t.started_at > timedelta(minutes=t.max_minutes + 2)
        ]
    if due:
        lifecycle.request_matching()
    for task in assigned:
        lifecycle.jobs.send(DISPATCH, task.task_id, task.attempt)
    for task in finishing:
        lifecycle.request_archival(task.task_id, task.attempt)
    for task in stopping:
        lifecycle.jobs.send(STOP, task.task_id)
    for task in overdue:
        outcomes.requeue(
            lifecycle.db,
            lifecycle.settings,
            task.task_id,
            task.attempt,
            f"timed out after {task.max_minutes} min",
            node_caused=True,
        )
    return {
        "assigned": len(assigned),
        "finishing": len(finishing),
        "stopping": len(stopping),
        "overdue": len(overdue),
        "pending": len(due),
    }
