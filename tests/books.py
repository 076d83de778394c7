"""The checks that prove nothing was lost or paid twice: every task ended once, no allocation is left
held by a finished task, and the ledger and the resource accounting balance.
"""

from __future__ import annotations

import sqlalchemy as sa

from models import allocation, ledger, tasks
from models.tables import Allocation, JournalEntry, Task
from tests.harness import PoolHarness


def rewards_paid(pool: PoolHarness, task_id: str) -> list[int]:
    """The reward entries (CPT) paid for ``task_id``."""
    with pool.ctx.db.reading() as session:
        entries = session.scalars(
            sa.select(JournalEntry.id).where(
                JournalEntry.kind == "reward", JournalEntry.memo == f"reward for task {task_id}"
            )
        ).all()
        return [next(p.amount for p in ledger.postings_of(session, entry) if p.amount > 0) for entry in entries]


def assert_books_close(pool: PoolHarness, task_ids: list[str]) -> None:
    """Every task terminal, once; no allocation held for a finished task; ledger and resources balance."""
    with pool.ctx.db.reading() as session:
        for task_id in task_ids:
            task = tasks.get(session, task_id)
            assert task is not None and task.status in tasks.TERMINAL, (task_id, task and task.status)
            endings = [e for e in tasks.history(session, task.pk) if e.to_status in tasks.TERMINAL]
            assert len(endings) == 1, (task_id, [(e.from_status, e.to_status) for e in endings])
        held = session.execute(
            sa.select(Allocation.task_id, Task.status)
            .join(Task, Task.task_id == Allocation.task_id)
            .where(Allocation.released_at.is_(None), Task.status.in_(sorted(tasks.TERMINAL)))
        ).all()
        assert held == [], f"allocations still held by finished tasks: {held}"
        assert allocation.invariant_violations(session) == []
        report = ledger.audit(session)
        assert report.ok, report.problems
    for task_id in task_ids:
        assert len(rewards_paid(pool, task_id)) <= 1, f"task {task_id} paid more than once"
