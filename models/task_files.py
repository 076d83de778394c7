"""A task's small files kept in the database (table ``task_files``) instead of its folder.

Each is written in the transaction that records it: a task's zip with the task (its upload), a
result with the report that brings it. Names are those of the files they stand for.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import delete, exists, insert, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from models.prepared import Prepared
from models.tables import Task, TaskFile, table_of
from models.tasks import TERMINAL

TASK_ZIP, RESULT_ZIP = "task.zip", "result.zip"
_files = table_of(TaskFile)
_NEW = Prepared(insert(_files))


def add(session: Session, task_pk: int, name: str, data: bytes | memoryview) -> None:
    """Keep ``data`` as the task's new file ``name`` (IntegrityError when it has one already)."""
    _NEW.execute(session, {"task_pk": task_pk, "name": name, "data": bytes(data)})


def _replacing(insert_of: Any) -> Any:
    upsert = insert_of(_files)
    return upsert.on_conflict_do_update(index_elements=["task_pk", "name"], set_={"data": upsert.excluded.data})


_REPLACE = {
    "postgresql": Prepared(_replacing(pg_insert)),
    "sqlite": Prepared(_replacing(sqlite_insert)),
}  # built once: a report's path


def put(session: Session, task_pk: int, name: str, data: bytes | memoryview) -> None:
    """Keep ``data`` as the task's file ``name``, replacing the one it had."""
    statement = _REPLACE[session.get_bind().dialect.name]
    statement.execute(session, {"task_pk": task_pk, "name": name, "data": bytes(data)})


def get(session: Session, task_pk: int, name: str) -> bytes | None:
    return session.scalar(select(_files.c.data).where(_files.c.task_pk == task_pk, _files.c.name == name))


def get_many(session: Session, task_pks: Iterable[int], name: str) -> dict[int, bytes]:
    """The file ``name`` of each of the tasks that has one, by task primary key."""
    pks = list(task_pks)
    if not pks:
        return {}
    query = select(_files.c.task_pk, _files.c.data).where(_files.c.name == name, _files.c.task_pk.in_(pks))
    return {pk: data for pk, data in session.execute(query)}


def drop(session: Session, task_pks: Iterable[int], name: str) -> int:
    """Remove the file ``name`` of those tasks; how many there were."""
    pks = list(task_pks)
    if not pks:
        return 0
    result = session.execute(delete(_files).where(_files.c.name == name, _files.c.task_pk.in_(pks)))
    return int(result.rowcount)  # type: ignore[attr-defined]


def drop_ended_task_zips(session: Session) -> int:
    """Remove the zips of tasks that will not run again (in a terminal status); how many."""
    tasks = table_of(Task)
    ended = exists().where(tasks.c.id == _files.c.task_pk, tasks.c.status.in_(sorted(TERMINAL)))
    result = session.execute(delete(_files).where(_files.c.name == TASK_ZIP, ended))
    return int(result.rowcount)  # type: ignore[attr-defined]
