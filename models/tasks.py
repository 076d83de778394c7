"""Tasks in the system of record: guarded state transitions with an event per change.

``PENDING → ASSIGNED → RUNNING → COMPLETED | FAILED``; ``STOPPING → STOPPED`` on a user stop;
``ASSIGNED/RUNNING → PENDING`` for the next attempt when dispatch fails or the node is lost.
Every transition is an UPDATE guarded on the current status (and attempt), so two workers racing
on one task cannot both move it; the winner writes the event row in the same transaction.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from models import bulk
from models.prepared import Prepared
from models.tables import Node, Task, TaskEvent, User, table_of, utcnow

PENDING, ASSIGNED, RUNNING = "PENDING", "ASSIGNED", "RUNNING"
COMPLETED, FAILED, STOPPING, STOPPED = "COMPLETED", "FAILED", "STOPPING", "STOPPED"
TERMINAL = frozenset({COMPLETED, FAILED, STOPPED})
ACTIVE = frozenset({ASSIGNED, RUNNING})  # on a node
REPORTABLE = ACTIVE | {STOPPING}  # its node's reports are taken


@dataclass(frozen=True)
class TaskView:
    pk: int
    task_id: str
    owner: str
    owner_id: int
    owner_credit: int
    status: str
    attempt: int
    node_pk: int | None
    node_id: str
    node_owner_id: int | None
    needs: dict[str, int]
    gpu_name: str
    location: str
    max_minutes: int
    zip_digest: str
    excluded_nodes: tuple[str, ...]
    pending_reason: str
    message: str
    reported_outcome: str
    result_sha256: str
    result_size: int
    result_pruned: bool
    price_per_minute: int
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    accrued_until: datetime | None


NEED_FIELDS = ("cpu_score", "memory_gb", "gpu_score", "gpu_memory_gb")


_TASK_COLUMNS = (
    "id", "task_id", "status", "attempt", "node_pk", *NEED_FIELDS, "gpu_name", "location", "max_minutes",
    "zip_digest", "excluded_nodes", "pending_reason", "message", "reported_outcome", "result_sha256",
    "result_size", "result_pruned", "price_per_minute", "created_at", "updated_at", "started_at", "accrued_until",
)  # fmt: skip


_tasks, _users, _nodes = (table_of(t) for t in (Task, User, Node))


def _select():  # type: ignore[no-untyped-def]
    """The columns of a TaskView, as a Core statement on the tables: plain rows, no ORM layers."""
    return (
        select(
            *(_tasks.c[c] for c in _TASK_COLUMNS),
            _users.c.username,
            _users.c.id.label("owner_id"),
            _users.c.credit_score,
            _nodes.c.node_id,
            _nodes.c.owner_id.label("node_owner_id"),
        )
        .select_from(_tasks.join(_users, _users.c.id == _tasks.c.owner_id))
        .outerjoin(_nodes, _nodes.c.id == _tasks.c.node_pk)
    )


def _view(row: Any) -> TaskView:
    return TaskView(
        pk=row.id,
        task_id=row.task_id,
        owner=row.username,
        owner_id=row.owner_id,
        owner_credit=row.credit_score,
        status=row.status,
        attempt=row.attempt,
        node_pk=row.node_pk,
        node_id=row.node_id or "",
        node_owner_id=row.node_owner_id,
        needs={f: getattr(row, f) for f in NEED_FIELDS},
        gpu_name=row.gpu_name,
        location=row.location,
        max_minutes=row.max_minutes,
        zip_digest=row.zip_digest,
        excluded_nodes=tuple(row.excluded_nodes.split()),
        pending_reason=row.pending_reason,
        message=row.message,
        reported_outcome=row.reported_outcome,
        result_sha256=row.result_sha256,
        result_size=row.result_size,
        result_pruned=row.result_pruned,
        price_per_minute=row.price_per_minute,
        created_at=row.created_at,
        updated_at=row.updated_at,
        started_at=row.started_at,
        accrued_until=row.accrued_until,
    )


# Built once: a statement object reused keeps its cache key, so each call only binds its parameters.
_BY_TASK_ID = Prepared(_select().where(_tasks.c.task_id == bindparam("task_id")))
_BY_TASK_IDS = _select().where(_tasks.c.task_id.in_(bindparam("task_ids", expanding=True)))


def get(session: Session, task_id: str) -> TaskView | None:
    row = _BY_TASK_ID.execute(session, {"task_id": task_id}).first()
    return _view(row) if row else None


def get_many(session: Session, task_ids: Iterable[str]) -> list[TaskView]:
    ids = list(task_ids)
    return [_view(row) for row in session.execute(_BY_TASK_IDS, {"task_ids": ids}).all()] if ids else []


def list_for(session: Session, owner_id: int | None, limit: int = 1000) -> list[TaskView]:
    query = _select().order_by(Task.created_at.desc(), Task.id.desc()).limit(limit)
    if owner_id is not None:
        query = query.where(Task.owner_id == owner_id)
    return [_view(row) for row in session.execute(query).all()]


def transition(
    session: Session,
    task: TaskView,
    *,
    to: str,
    expected: Iterable[str],
    reason: str,
    at_attempt: int | None = None,
    node_id: str = "",
    **values: object,
) -> bool:
    """Move ``task`` to ``to`` if it is still in one of ``expected`` (and at ``at_attempt``, when given).

    Returns False, writing nothing, when another actor moved it first. The row is locked for
    the rest of the caller's transaction.
    """
    allowed = set(expected)
    row = session.execute(select(Task.status, Task.attempt).where(Task.id == task.pk).with_for_update()).one_or_none()
    if row is None or row.status not in allowed or (at_attempt is not None and row.attempt != at_attempt):
        return False
    now = utcnow()
    result = session.execute(
        update(Task)
        .where(Task.id == task.pk, Task.status == row.status, Task.attempt == row.attempt)
        .values(status=to, updated_at=now, **values)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    session.add(
        TaskEvent(
            task_pk=task.pk,
            at=now,
            from_status=row.status,
            to_status=to,
            attempt=int(values.get("attempt", row.attempt)),  # type: ignore[call-overload]
            node_id=node_id or task.node_id,
            reason=reason[:300],
        )
    )
    return True


@dataclass(frozen=True)
class Move:
    """One task of :func:`transition_many`: its expected attempt, the event's reason and node, and
    the values to set (every move of one call sets the same columns)."""

    task: TaskView
    at_attempt: int
    reason: str
    node_id: str = ""
    values: dict[str, object] | None = None


def lock(session: Session, pks: list[int]) -> dict[int, tuple[str, int]]:
    """Lock task rows for the rest of the transaction, in id order; each one's (status, attempt)."""
    query = select(Task.id, Task.status, Task.attempt).where(Task.id.in_(pks)).order_by(Task.id).with_for_update()
    return {pk: (status, attempt) for pk, status, attempt in session.execute(query)}


def transition_many(
    session: Session,
    moves: list[Move],
    *,
    to: str,
    expected: Iterable[str],
    locked: dict[int, tuple[str, int]] | None = None,
) -> list[Move]:
    """:func:`transition` for many tasks with three statements: lock the rows (in id order), one
    multi-row UPDATE, one INSERT of the events. The moves made; a task another actor moved first
    (not in ``expected``, or at another attempt) is left out and nothing is written for it.
    ``locked``: what :func:`lock` returned for these rows earlier in the same transaction (they
    stay locked until it ends, so they are not locked again)."""
    if not moves:
        return []
    allowed = set(expected)
    rows = locked if locked is not None else lock(session, [m.task.pk for m in moves])
    made = [m for m in moves if (r := rows.get(m.task.pk)) and r[0] in allowed and r[1] == m.at_attempt]
    if not made:
        return []
    now = utcnow()
    bulk.update_rows(
        session, Task, [{"id": m.task.pk, "status": to, "updated_at": now, **(m.values or {})} for m in made]
    )
    bulk.insert_rows(
        session,
        TaskEvent,
        [
            {
                "task_pk": m.task.pk,
                "at": now,
                "from_status": rows[m.task.pk][0],
                "to_status": to,
                "attempt": int((m.values or {}).get("attempt", rows[m.task.pk][1])),  # type: ignore[call-overload]
                "node_id": m.node_id or m.task.node_id,
                "reason": m.reason[:300],
            }
            for m in made
        ],
    )
    return made


def set_fields(session: Session, task_pk: int, **values: object) -> None:
    session.execute(update(Task).where(Task.id == task_pk).values(**values))


HISTORY_LIMIT = 500  # transitions shown at most: a task has a few per attempt, MAX_TASK_ATTEMPTS attempts


@dataclass(frozen=True)
class Transition:
    at: datetime
    from_status: str
    to_status: str
    attempt: int
    node_id: str
    reason: str


def history(session: Session, task_pk: int, limit: int = HISTORY_LIMIT) -> list[Transition]:
    """The task's last ``limit`` recorded transitions, oldest first."""
    newest = session.execute(
        select(
            TaskEvent.at,
            TaskEvent.from_status,
            TaskEvent.to_status,
            TaskEvent.attempt,
            TaskEvent.node_id,
            TaskEvent.reason,
        )
        .where(TaskEvent.task_pk == task_pk)
        .order_by(TaskEvent.id.desc())
        .limit(limit)
    ).all()
    return [Transition(*row) for row in reversed(newest)]


def due_pending(session: Session, now: datetime, limit: int) -> list[TaskView]:
    query = _select().where(Task.status == PENDING, Task.next_attempt_at <= now).order_by(Task.id).limit(limit)
    return [_view(row) for row in session.execute(query).all()]


def any_pending(session: Session) -> bool:
    """Whether some task is PENDING, due or not (one index look-up)."""
    return session.execute(select(Task.id).where(Task.status == PENDING).limit(1)).first() is not None


def in_status(
    session: Session, statuses: Iterable[str], *, updated_before: datetime | None = None, limit: int = 1000
) -> list[TaskView]:
    query = _select().where(Task.status.in_(list(statuses))).order_by(Task.id).limit(limit)
    if updated_before is not None:
        query = query.where(Task.updated_at < updated_before)
    return [_view(row) for row in session.execute(query).all()]
