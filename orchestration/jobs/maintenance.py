"""Maintenance jobs run by beat (queue ``maintenance``): sweeps, accrual, retention, the ledger audit.

Each is idempotent and safe to run twice or to overlap with itself.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from functools import partial
from typing import Any

from celery import Task, shared_task
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from models import ledger, task_files, tasks
from models.tables import Task as TaskRow
from models.tables import utcnow
from orchestration import nodes, recovery, settlement
from orchestration.runtime import runtime

log = logging.getLogger(__name__)


@shared_task(name="pool.maintenance.audit_ledger", bind=True)
def audit_ledger(self: Task) -> dict[str, Any]:
    """Check that Σ balances + Σ escrow + Σ pending = Σ minted; log loudly when it does not."""
    with runtime(self.app).db.reading() as session:
        report = ledger.audit(session)
    if report.ok:
        log.info(
            "ledger balances: minted=%d balances=%d escrow=%d pending=%d",
            report.minted,
            report.balances,
            report.escrow,
            report.pending,
        )
    else:
        log.error("LEDGER DOES NOT BALANCE: %s", "; ".join(report.problems))
    return {
        "ok": report.ok,
        "minted": report.minted,
        "balances": report.balances,
        "escrow": report.escrow,
        "pending": report.pending,
        "problems": list(report.problems),
    }


@shared_task(name="pool.maintenance.expire_heartbeats", bind=True)
def expire_heartbeats(self: Task) -> int:
    """Nodes silent past NODE_HEARTBEAT_TIMEOUT go offline; their tasks move to the next attempt.

    Returns how many allocations were freed.
    """
    rt = runtime(self.app)
    released = nodes.expire_silent_nodes(rt.db, rt.heartbeats, timeout=rt.settings.NODE_HEARTBEAT_TIMEOUT)
    rt.lifecycle.ended_early([(r.task_id, r.attempt) for r in released], "node lost (no heartbeat)", node_caused=True)
    return len(released)


@shared_task(name="pool.maintenance.reclaim_resources", bind=True)
def reclaim_resources(self: Task) -> dict[str, int]:
    """Release allocations of vanished nodes and ended tasks; repair availability drift; drop the
    zips kept in the database of tasks that will not run again."""
    rt = runtime(self.app)
    freed, repaired = nodes.reclaim(rt.db)
    rt.lifecycle.ended_early([(r.task_id, r.attempt) for r in freed], "node gone", node_caused=True)
    dropped = rt.db.transaction(task_files.drop_ended_task_zips)
    return {"released": len(freed), "repaired": len(repaired), "task_zips_dropped": dropped}


@shared_task(name="pool.maintenance.recover_tasks", bind=True)
def recover_tasks(self: Task) -> dict[str, int]:
    """Re-drive tasks whose job was lost: re-match, re-dispatch, re-archive, re-stop, time out."""
    return recovery.recover(runtime(self.app).lifecycle)


ACCRUAL_BATCH = 200


@shared_task(name="pool.maintenance.accrue_rewards", bind=True)
def accrue_rewards(self: Task) -> int:
    """Meter every running task up to now: escrow → the node's pending reward. CPT moved."""
    rt = runtime(self.app)
    now = utcnow()
    # A task that reported its outcome is metered when it is settled; one that started within the
    # last interval has earned next to nothing yet (and is metered at settlement if it ends first).
    young = now - timedelta(seconds=rt.settings.ACCRUAL_INTERVAL_SECONDS)
    with rt.db.reading() as session:
        running = [
            t.task_id
            for t in tasks.in_status(session, [tasks.RUNNING], limit=100_000)
            if not t.reported_outcome and t.started_at is not None and t.started_at <= young
        ]
    moved = 0
    for start in range(0, len(running), ACCRUAL_BATCH):  # one transaction per batch, not per task
        moved += rt.db.transaction(
            partial(settlement.accrue_many, task_ids=running[start : start + ACCRUAL_BATCH], now=now)
        )
    return moved


def _mark_pruned(session: Session, *, task_pk: int) -> None:
    session.execute(update(TaskRow).where(TaskRow.id == task_pk).values(result_pruned=True))
    task_files.drop(session, [task_pk], task_files.RESULT_ZIP)


@shared_task(name="pool.maintenance.prune_results", bind=True)
def prune_results(self: Task) -> int:
    """Delete archived results older than RESULT_RETENTION_DAYS; how many were pruned."""
    rt = runtime(self.app)
    cutoff = utcnow() - timedelta(days=rt.settings.RESULT_RETENTION_DAYS)
    with rt.db.reading() as session:
        old = session.execute(
            select(TaskRow.id, TaskRow.task_id).where(
                TaskRow.finished_at < cutoff, TaskRow.result_pruned.is_(False), TaskRow.result_sha256 != ""
            )
        ).all()
    for task_pk, task_id in old:
        rt.lifecycle.storage.prune_archive(task_id)
        rt.db.transaction(partial(_mark_pruned, task_pk=task_pk))
    return len(old)
