"""How a task's attempt ends: requeued, finished (completed/failed), or stopped.

Each function is one transaction around a guarded transition, so it takes effect once however
often its job runs: the allocation is released, CPT settled and credit moved exactly once.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy.orm import Session

from models import allocation, tasks
from models.db import Database
from models.tables import utcnow
from orchestration import economy, settlement
from orchestration.credit import change_credit
from orchestration.policies.backoff import compute_backoff
from pool.settings import Settings

log = logging.getLogger("orchestration.outcomes")


def requeue(db: Database, settings: Settings, task_id: str, attempt: int, reason: str, *, node_caused: bool) -> bool:
    """End ``attempt`` early (dispatch refused, node lost): next attempt, or FAILED when none is left.

    A user stop in progress becomes STOPPED instead. True when the task wants matching again.
    """

    def work(session: Session) -> bool:
        task = tasks.get(session, task_id)
        if task is None or task.attempt != attempt or task.status not in (*tasks.ACTIVE, tasks.STOPPING):
            return False
        now = utcnow()
        if task.status == tasks.STOPPING:
            stop_in(session, task, f"stopped (node gone: {reason})")
            return False
        if task.attempt >= settings.MAX_TASK_ATTEMPTS:
            if not tasks.transition(
                session,
                task,
                to=tasks.FAILED,
                expected=tasks.ACTIVE,
                at_attempt=attempt,
                reason=f"gave up after {attempt} attempts: {reason}",
                finished_at=now,
                message=f"failed after {attempt} attempts; last: {reason}"[:500],
            ):
                return False
            retry = False
        else:
            excluded = " ".join([*task.excluded_nodes, task.node_id][-20:])
            delay = compute_backoff(
                attempt, factor=settings.DISPATCH_BACKOFF_SECONDS, max_backoff=settings.DISPATCH_BACKOFF_MAX
            )
            if not tasks.transition(
                session,
                task,
                to=tasks.PENDING,
                expected=tasks.ACTIVE,
                at_attempt=attempt,
                reason=reason,
                node_pk=None,
                started_at=None,
                accrued_until=None,
                excluded_nodes=excluded,
                next_attempt_at=now + timedelta(seconds=delay),
                pending_reason=f"retrying: {reason}"[:300],
                reported_outcome="",
            ):
                return False
            retry = True
        allocation.release_task(session, task_id, reason[:64])
        economy.refund_pending(session, task, attempt)
        if not retry:
            economy.refund_escrow(session, task)
        if node_caused:
            change_credit(
                session,
                task.node_owner_id,
                -settings.CREDIT_PENALTY,
                f"task {task_id} attempt {attempt}: {reason}",
                settings,
            )
        return retry

    retry = db.transaction(work)
    log.warning(
        "task %s attempt %d ended: %s (%s)",
        task_id,
        attempt,
        reason,
        "will retry" if retry else "no retry",
        extra={"event": "attempt_ended", "task_id": task_id},
    )
    return retry


def finish_in(
    session: Session, settings: Settings, task_id: str, attempt: int, archived: tuple[str, int] | None
) -> str:
    """In the caller's transaction: apply a reported outcome, COMPLETED (node paid, credit up) or
    FAILED (refund). The task's status afterwards."""
    task = tasks.get(session, task_id)
    if task is None or task.attempt != attempt or task.status not in tasks.ACTIVE or not task.reported_outcome:
        return task.status if task else ""
    now = utcnow()
    success = task.reported_outcome == "success"
    to = tasks.COMPLETED if success else tasks.FAILED
    digest, size = archived or ("", 0)
    message = "completed" if success else (task.message or "the task reported failure")
    if not tasks.transition(
        session,
        task,
        to=to,
        expected=tasks.ACTIVE,
        at_attempt=attempt,
        reason=message,
        finished_at=now,
        result_sha256=digest,
        result_size=size,
        message=message,
    ):
        return task.status
    if task.status == tasks.RUNNING:
        economy.accrue(session, task, now)
    allocation.release_task(session, task_id, to.lower())
    if success and task.node_owner_id is not None:
        economy.pay_node(session, task, attempt, task.node_owner_id)
        change_credit(
            session, task.node_owner_id, settings.CREDIT_FOR_COMPLETION, f"completed task {task_id}", settings
        )
    else:
        economy.refund_pending(session, task, attempt)
    economy.refund_escrow(session, task)
    return to


def _log_finished(task_id: str, attempt: int, status: str) -> None:
    log.info(
        "task %s attempt %d finished: %s",
        task_id,
        attempt,
        status,
        extra={"event": "task_finished", "task_id": task_id, "status": status},
    )


def finish(db: Database, settings: Settings, task_id: str, attempt: int, archived: tuple[str, int] | None) -> str:
    """:func:`finish_in` in a transaction of its own. The new status."""
    status = db.transaction(lambda session: finish_in(session, settings, task_id, attempt, archived))
    _log_finished(task_id, attempt, status)
    return status


def finish_many(
    db: Database, settings: Settings, archived: dict[tuple[str, int], tuple[str, int] | None]
) -> dict[tuple[str, int], str]:
    """Settle many reported attempts in ONE transaction (:func:`settlement.settle`, a fixed number
    of statements per batch). Attempts it leaves out, or the whole batch if it fails, go through
    :func:`finish_in` one by one, each in a savepoint: a task that cannot be settled is logged and
    left for the recovery sweep, the others commit."""
    try:
        statuses, left = db.transaction(lambda session: settlement.settle(session, settings, archived))
    except Exception:
        log.exception("could not settle %d attempt(s) as one batch; settling them one at a time", len(archived))
        statuses, left = {}, list(archived)
    if left:
        statuses.update(_finish_each(db, settings, {key: archived[key] for key in left}))
    for (task_id, attempt), status in statuses.items():
        _log_finished(task_id, attempt, status)
    return statuses


def _finish_each(
    db: Database, settings: Settings, archived: dict[tuple[str, int], tuple[str, int] | None]
) -> dict[tuple[str, int], str]:
    def work(session: Session) -> dict[tuple[str, int], str]:
        statuses: dict[tuple[str, int], str] = {}
        for (task_id, attempt), result in archived.items():
            try:
                with session.begin_nested():
                    statuses[(task_id, attempt)] = finish_in(session, settings, task_id, attempt, result)
            except Exception:
                log.exception("could not settle task %s attempt %d; the recovery sweep will retry", task_id, attempt)
        return statuses

    return db.transaction(work)


def stop_in(session: Session, task: tasks.TaskView, reason: str) -> bool:
    """In the caller's transaction: STOPPING/PENDING → STOPPED, node paid for work so far, rest refunded."""
    now = utcnow()
    if not tasks.transition(
        session,
        task,
        to=tasks.STOPPED,
        expected={tasks.STOPPING, tasks.PENDING},
        reason=reason,
        finished_at=now,
        message=reason,
    ):
        return False
    if task.started_at is not None:
        economy.accrue(session, task, now)
    allocation.release_task(session, task.task_id, "stopped")
    if task.node_owner_id is not None and task.attempt > 0:
        economy.pay_node(session, task, task.attempt, task.node_owner_id)
    economy.refund_escrow(session, task)
    return True


def stop(db: Database, task_id: str, reason: str) -> bool:
    """STOPPING (or PENDING) → STOPPED: release, pay the node for the work so far, refund the rest."""

    def work(session: Session) -> bool:
        task = tasks.get(session, task_id)
        return task is not None and stop_in(session, task, reason)

    return db.transaction(work)
