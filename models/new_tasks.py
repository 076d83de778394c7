"""A task's birth: its row, PENDING at attempt 0, and its first event, in the upload's transaction
(on PostgreSQL also in one statement with its escrow: :func:`create_escrowed_pg`)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import BigInteger, Connection, LargeBinary, TextClause, bindparam, insert, literal, select, text
from sqlalchemy.orm import Session

from models import ledger, task_files
from models.prepared import Prepared
from models.tables import Task, TaskEvent, UtcDateTime, table_of, utcnow
from models.tasks import NEED_FIELDS, PENDING

_tasks = table_of(Task)


@dataclass(frozen=True)
class NewTask:
    """What an upload inserts: the task, PENDING at attempt 0."""

    task_id: str
    owner_id: int
    needs: dict[str, int]
    gpu_name: str
    location: str
    max_minutes: int
    zip_digest: str
    zip_size: int
    price_per_minute: int

    def row(self) -> dict[str, object]:
        return {
            "task_id": self.task_id,
            "owner_id": self.owner_id,
            "status": PENDING,
            "attempt": 0,
            "gpu_name": self.gpu_name,
            "location": self.location,
            "max_minutes": self.max_minutes,
            "zip_digest": self.zip_digest,
            "zip_size": self.zip_size,
            "price_per_minute": self.price_per_minute,
            "excluded_nodes": "",
            "pending_reason": "waiting for a node",
            "message": "",
            "reported_outcome": "",
            "output_lines": 0,
            "output_truncated": False,
            "result_sha256": "",
            "result_size": 0,
            "result_pruned": False,
            **self.needs,
        }


def create(session: Session, task: NewTask, *, task_zip: bytes | memoryview | None = None) -> int:
    """Insert the task, PENDING at attempt 0, with its "uploaded" event (and ``task_zip``, when
    given, as its zip kept in the database: :mod:`models.task_files`); its primary key.

    IntegrityError when ``task_id`` exists already (the caller tells a repeat from a clash)."""
    row = task.row()
    if session.get_bind().dialect.name == "postgresql":  # the task and its first event in one round trip
        pk = int(session.execute(_NEW_TASK_WITH_EVENT_PG, {**row, "at": utcnow()}).scalar_one())
    else:
        pk = int(_NEW_TASK.execute(session, row).scalar_one())
        _NEW_EVENT.execute(
            session, {"task_pk": pk, "from_status": "", "to_status": PENDING, "attempt": 0, "reason": "uploaded"}
        )
    if task_zip is not None:
        task_files.add(session, pk, task_files.TASK_ZIP, task_zip)
    return pk


def create_escrowed_pg(
    conn: Connection,
    task: NewTask,
    *,
    payer_key: str,
    escrow_prefix: str,
    amount: int,
    memo: str,
    task_zip: bytes | memoryview | None = None,
) -> int | None:
    """PostgreSQL, one statement: :func:`create` (with ``task_zip`` kept in the database, when
    given), and ``amount`` taken from ``payer_key`` into the task's new escrow account (key
    ``escrow_prefix`` + its primary key), as ledger.fund_new_account does. The task's primary
    key; None, with nothing written, when the payer cannot cover it.

    Run in autocommit (Database.alone), the payer's balance row is locked only while the server
    runs the statement and commits it. IntegrityError when ``task_id`` exists already."""
    params = {
        **task.row(),
        "payer_key": payer_key,
        "escrow_prefix": escrow_prefix,
        "amount": amount,
        "memo": memo,
        "entry_kind": "escrow",
        "kind": "escrow",
        "user_id": task.owner_id,
        "now": utcnow(),
    }
    if task_zip is None:
        found = conn.execute(_NEW_ESCROWED_TASK_PG, params).scalar()
    else:
        found = conn.execute(_NEW_ESCROWED_TASK_WITH_ZIP_PG, {**params, "task_zip": bytes(task_zip)}).scalar()
    return None if found is None else int(found)


_NEW_TASK = Prepared(insert(_tasks).returning(_tasks.c.id))
_events = table_of(TaskEvent)
_NEW_EVENT = Prepared(insert(_events))
_NEW_TASK_COLUMNS = (
    "task_id", "owner_id", "status", "attempt", "gpu_name", "location", "max_minutes", "zip_digest", "zip_size",
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
_NOW_COLUMNS = ("next_attempt_at", "created_at", "updated_at")  # what SQLAlchemy's inserts default to utcnow()


def _escrowed_task_pg(*, with_zip: bool) -> TextClause:
    kept_zip = (
        f", task_zip AS (INSERT INTO task_files (task_pk, name, data) "
        f"SELECT id, '{task_files.TASK_ZIP}', :task_zip FROM new_task)"
        if with_zip
        else ""
    )
    statement = text(
        f"""
        WITH {ledger.PAYER_PG}, new_task AS (
            INSERT INTO tasks ({", ".join(_NEW_TASK_COLUMNS)}, {", ".join(_NOW_COLUMNS)})
            SELECT {", ".join(f":{c}" for c in _NEW_TASK_COLUMNS)}, {", ".join(":now" for _ in _NOW_COLUMNS)}
            FROM payer RETURNING id
        ), first_event AS (
            INSERT INTO task_events (task_pk, at, from_status, to_status, attempt, node_id, reason)
            SELECT id, :now, '', '{PENDING}', 0, '', 'uploaded' FROM new_task
        ){kept_zip}, {ledger.funding_pg("CAST(:escrow_prefix AS VARCHAR) || new_task.id", "payer, new_task")}
        SELECT new_task.id FROM new_task, account, debit, credit
        """
    ).bindparams(bindparam("now", type_=UtcDateTime()), bindparam("amount", type_=BigInteger()))
    return statement.bindparams(bindparam("task_zip", type_=LargeBinary())) if with_zip else statement


_NEW_ESCROWED_TASK_PG = _escrowed_task_pg(with_zip=False)
_NEW_ESCROWED_TASK_WITH_ZIP_PG = _escrowed_task_pg(with_zip=True)
