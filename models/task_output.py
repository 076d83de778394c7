"""What a task printed and logged: output lines and log records, capped per task.

Output lines count against ``OUTPUT_MAX_LINES`` and the cut is marked once in the output itself;
log records past ``LOG_MAX_RECORDS`` are dropped. Text is stored as the database can keep it.
"""

from __future__ import annotations

from sqlalchemy import bindparam, func, insert, literal, select, update
from sqlalchemy.orm import Session

from models.prepared import Prepared
from models.tables import Task, TaskLog, TaskOutput, table_of
from models.tasks import REPORTABLE

TRUNCATION_MARKER = "[output truncated: the pool keeps at most {limit} lines per task]"
_tasks = table_of(Task)


def storable(text: str) -> str:
    """``text`` as the database can keep it: PostgreSQL text holds no NUL, so NUL becomes U+FFFD."""
    return text.replace("\x00", "\ufffd")


def storable_line(line: str) -> str:
    """An output line as the task keeps it: at most 4,000 characters (the column's size), storable."""
    return storable(line[:4000])


# The task, while its attempt is still the one reporting and it still takes reports; locked, so
# that one report at a time counts what it may add.
_LIVE = (
    _tasks.c.id == bindparam("pk"),
    _tasks.c.attempt == bindparam("b_attempt"),
    _tasks.c.status.in_([literal(status) for status in sorted(REPORTABLE)]),  # values bound, not rendered
)
_OUTPUT_COUNT = Prepared(select(_tasks.c.output_lines, _tasks.c.output_truncated).where(*_LIVE).with_for_update())
_LIVE_TASK = Prepared(select(_tasks.c.id).where(*_LIVE).with_for_update())


def append_output(session: Session, task_pk: int, attempt: int, lines: list[str], *, max_lines: int) -> int | None:
    """Append lines, keeping at most ``max_lines`` per task and marking the cut once. Lines kept;
    None, writing nothing, when the task is no longer at ``attempt`` or takes no more reports."""
    found = _OUTPUT_COUNT.execute(session, {"pk": task_pk, "b_attempt": attempt}).first()
    if found is None:
        return None
    current, truncated = found
    room = max(0, max_lines - current)
    kept = [storable_line(line) for line in lines[:room]]
    rows = [{"task_pk": task_pk, "attempt": attempt, "line": line} for line in kept]
    cut = len(kept) < len(lines) and not truncated
    if cut:
        rows.append({"task_pk": task_pk, "attempt": attempt, "line": TRUNCATION_MARKER.format(limit=max_lines)})
    if rows:
        _NEW_OUTPUT.execute_many(session, rows)
    _OUTPUT_KEPT.execute(session, {"pk": task_pk, "lines": current + len(kept), "cut": truncated or cut})
    return len(kept)


_NEW_OUTPUT = Prepared(insert(table_of(TaskOutput)))
_OUTPUT_KEPT = Prepared(
    update(_tasks)
    .where(_tasks.c.id == bindparam("pk"))
    .values(output_lines=bindparam("lines"), output_truncated=bindparam("cut"))
)


def output(session: Session, task_pk: int) -> list[str]:
    return list(session.scalars(select(TaskOutput.line).where(TaskOutput.task_pk == task_pk).order_by(TaskOutput.id)))


def append_logs(
    session: Session, task_pk: int, attempt: int, records: list[tuple[float, str, str]], *, max_records: int
) -> int | None:
    """Append log records, keeping at most ``max_records`` per task. Records kept; None, writing
    nothing, when the task is no longer at ``attempt`` or takes no more reports."""
    if _LIVE_TASK.execute(session, {"pk": task_pk, "b_attempt": attempt}).first() is None:
        return None
    count = session.scalar(select(func.count()).select_from(TaskLog).where(TaskLog.task_pk == task_pk)) or 0
    kept = records[: max(0, max_records - count)]
    session.add_all(
        TaskLog(task_pk=task_pk, attempt=attempt, ts=ts, level=storable(level[:16]), message=storable(message[:4000]))
        for ts, level, message in kept
    )
    return len(kept)


def logs(session: Session, task_pk: int) -> list[TaskLog]:
    return list(session.scalars(select(TaskLog).where(TaskLog.task_pk == task_pk).order_by(TaskLog.id)))
