"""A task's birth: its row, PENDING at attempt 0, and its first event, in the upload's transaction."""

from __future__ import annotations

from sqlalchemy import bindparam, insert, literal, select
from sqlalchemy.orm import Session

from models.tables import Task, TaskEvent, table_of, utcnow
from models.tasks import NEED_FIELDS, PENDING

_tasks = table_of(Task)


def create(
    session: Session,
    *,
    task_id: str,
    owner_id: int,
    needs: dict[str, int],
    gpu_name: str,
    location: str,
    max_minutes: int,
    zip_sha256: str,
    zip_size: int,
    price_per_minute: int,
) -> int:
    """Insert the task, PENDING at attempt 0, with its "uploaded" event; its primary key.

    IntegrityError when ``task_id`` exists already (the caller tells a repeat from a clash)."""
    row = {
        "task_id": task_id,
        "owner_id": owner_id,
        "status": PENDING,
        "attempt": 0,
        "gpu_name": gpu_name,
        "location": location,
        "max_minutes": max_minutes,
        "zip_sha256": zip_sha256,
        "zip_size": zip_size,
        "price_per_minute": price_per_minute,
        "excluded_nodes": "",
        "pending_reason": "waiting for a node",
        "message": "",
        "reported_outcome": "",
        "output_lines": 0,
        "output_truncated": False,
        "result_sha256": "",
        "result_size": 0,
        "result_pruned": False,
        **needs,
    }
    if session.get_bind().dialect.name == "postgresql":  # the task and its first event in one round trip
        return int(session.execute(_NEW_TASK_WITH_EVENT_PG, {**row, "at": utcnow()}).scalar_one())
    pk = int(session.execute(_NEW_TASK, row).scalar_one())
    session.execute(
        _NEW_EVENT, {"task_pk": pk, "from_status": "", "to_status": PENDING, "attempt": 0, "reason": "uploaded"}
    )
    return pk


_NEW_TASK = insert(_tasks).returning(_tasks.c.id)
_events = table_of(TaskEvent)
_NEW_EVENT = insert(_events)
_NEW_TASK_COLUMNS = (
    "task_id", "owner_id", "status", "attempt", "gpu_name", "location", "max_minutes", "zip_sha256", "zip_size",
    "price_per_minute", "excluded_nodes", "pending_reason", "message", "reported_outcome", "output_lines",
    "output_truncated", "result_sha256", "result_size", "result_pruned", *NEED_FIELDS,
)  # fmt: skip
_new_task = (
    insert(_tasks).values({c: bindparam(c, type_=_tasks.c[c].type) for c in _NEW_TASK_COLUMNS}).returning(_tasks.c.id)
).cte("new_task")
_NEW_TASK_WITH_EVENT_PG = select(_new_task.c.id).add_cte(
    insert(_events)
    .from_select(
        ["task_pk", "at", "from_status", "to_status", "attempt", "node_id", "reason"],
        select(
            _new_task.c.id,
            bindparam("at", type_=_events.c.at.type),
            literal(""),
            literal(PENDING),
            literal(0),
            literal(""),
            literal("uploaded"),
        ),
    )
    .cte("first_event")
)
