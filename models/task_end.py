"""PostgreSQL, one statement: a node's report of its task's end, checked and written together.

The common report (FinishTask from the node the live attempt runs on, its first verdict, output
that fits under the task's line limit, a result small enough for the database) needs no read
beforehand: the statement's own conditions are the reporter's checks, and its row lock holds
them. When they do not all hold it writes nothing, and the caller takes the general path, which
says why (refusals) or handles what this one leaves to it (a cut output, a task being stopped,
a verdict recorded before).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Connection, LargeBinary, bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.types import String

from models import task_files
from models.tables import UtcDateTime
from models.tasks import ACTIVE

_RECORD_END_PG = text(
    f"""
    WITH ended AS (
        UPDATE tasks SET output_lines = tasks.output_lines + :line_count,
            reported_outcome = :outcome, message = :message, updated_at = :now
        FROM nodes
        WHERE tasks.task_id = :task_id AND nodes.id = tasks.node_pk AND nodes.owner_id = :user_id
            AND (:node_id = '' OR lower(nodes.node_id) = lower(:node_id))
            AND (:attempt = 0 OR tasks.attempt = :attempt)
            AND tasks.status IN ({", ".join(f"'{status}'" for status in sorted(ACTIVE))})
            AND tasks.reported_outcome = '' AND tasks.output_lines + :line_count <= :max_lines
        RETURNING tasks.id, tasks.attempt
    ), output AS (
        INSERT INTO task_output (task_pk, attempt, line)
        SELECT ended.id, ended.attempt, given.line
        FROM ended, unnest(CAST(:lines AS TEXT[])) WITH ORDINALITY AS given(line, n) ORDER BY given.n
    ), result AS (
        INSERT INTO task_files (task_pk, name, data)
        SELECT ended.id, '{task_files.RESULT_ZIP}', :result FROM ended WHERE :has_result
        ON CONFLICT (task_pk, name) DO UPDATE SET data = excluded.data
    )
    SELECT attempt FROM ended
    """
).bindparams(
    bindparam("now", type_=UtcDateTime()),
    bindparam("lines", type_=ARRAY(String())),
    bindparam("result", type_=LargeBinary()),
)


def record_end_pg(
    conn: Connection,
    *,
    task_id: str,
    user_id: int,
    node_id: str,
    attempt: int,
    lines: list[str],
    max_lines: int,
    outcome: str,
    message: str,
    now: datetime,
    result: bytes | None,
) -> int | None:
    """Record the verdict ``outcome`` (with ``message``), ``lines`` of output as given, and
    ``result`` (when not None) as the task's kept result, if ``user_id`` owns the node that the
    task's live attempt runs on (named ``node_id`` and at ``attempt``, when not empty or 0), no
    verdict was recorded yet and the lines fit under ``max_lines``; that attempt. None, with
    nothing written, otherwise. Run in autocommit (Database.alone)."""
    return conn.execute(
        _RECORD_END_PG,
        {
            "task_id": task_id,
            "user_id": user_id,
            "node_id": node_id,
            "attempt": attempt,
            "lines": lines,
            "line_count": len(lines),
            "max_lines": max_lines,
            "outcome": outcome,
            "message": message,
            "now": now,
            "result": result,
            "has_result": result is not None,
        },
    ).scalar()
