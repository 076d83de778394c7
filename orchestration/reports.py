"""What nodes report about a running task: output, logs, usage, results and completion.

Every report is accepted only from the owner of the node that the task's current attempt is
assigned to, and only while that attempt is live; a report naming an older attempt is refused.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis
from sqlalchemy import bindparam, literal, update
from sqlalchemy.orm import Session

from models import task_end, task_files, task_output, tasks
from models.db import Database
from models.errors import InvalidArgument, NotFound, PermissionDenied, Refused, TooLarge
from models.prepared import Prepared
from models.tables import Task, table_of, utcnow
from orchestration import economy
from orchestration.storage import validate_task_id

MAX_LOG_PAYLOAD = 1 << 20
MAX_OUTPUT_PAYLOAD = 1 << 20


@dataclass(frozen=True)
class Reporter:
    """Who reports: the caller's identity from the token, and what the message says."""

    user_id: int
    username: str
    node_id: str = ""  # when the message names a node
    attempt: int = 0  # when the message names an attempt


def authorize(session: Session, reporter: Reporter, task_id: str) -> tasks.TaskView:
    """The task, if ``reporter`` may report on its current attempt; the right error otherwise."""
    task = tasks.get(session, validate_task_id(task_id))
    if task is None:
        raise NotFound(f"no task {task_id!r}")
    if task.node_owner_id is None or task.node_owner_id != reporter.user_id:
        raise PermissionDenied(f"task {task_id} is not assigned to a node of yours")
    if reporter.node_id and reporter.node_id.lower() != task.node_id.lower():
        raise PermissionDenied(f"task {task_id} is not assigned to node {reporter.node_id}")
    if reporter.attempt and reporter.attempt != task.attempt:
        raise Refused(f"report for attempt {reporter.attempt} refused: the current attempt is {task.attempt}")
    if task.status not in tasks.REPORTABLE:
        raise Refused(f"task {task_id} is {task.status}; it takes no more reports")
    return task


def authorized(db: Database, reporter: Reporter, task_id: str) -> tasks.TaskView:
    """:func:`authorize` on a read of its own, before a write that holds the attempt to it.

    On SQLite the read then runs beside other processes' writes instead of inside the one write
    transaction the database takes at a time; the write's own conditions (the same attempt, still
    taking reports) decide, and a second look says why a write found them gone (:func:`moved_on`).
    """
    with db.reading() as session:
        return authorize(session, reporter, task_id)


def moved_on(read: tasks.TaskView, now: tasks.TaskView) -> Refused:
    """The refusal for a report whose task moved on to attempt ``now`` after :func:`authorized`
    found it at ``read`` (a report of a task that takes no more reports is refused by
    :func:`authorized` itself)."""
    return Refused(f"report for attempt {read.attempt} refused: the current attempt is {now.attempt}")


def _append(
    db: Database, reporter: Reporter, task_id: str, write: Callable[[Session, tasks.TaskView], int | None]
) -> int:
    """A report added to its task: checked on a read of its own (:func:`authorized`), then
    ``write(session, task)``, which holds it to the attempt that read found live and returns None
    when the task moved on meanwhile (refused, nothing written). On SQLite the write is grouped
    with the other short writes of the process (:mod:`models.write_group`)."""
    task = authorized(db, reporter, task_id)
    kept = db.transaction(lambda session: write(session, task), grouped=True)
    if kept is None:
        raise moved_on(task, authorized(db, reporter, task_id))
    return kept


def output_lines(output: str) -> list[str]:
    """The lines of a node's output report; TooLarge when it is too long for one message."""
    if len(output) > MAX_OUTPUT_PAYLOAD:
        raise TooLarge(f"output is over {MAX_OUTPUT_PAYLOAD} characters; send it in smaller pieces")
    return output.splitlines()


def store_output(db: Database, reporter: Reporter, task_id: str, output: str, *, max_lines: int) -> int:
    lines = output_lines(output) or [""]
    return _append(
        db,
        reporter,
        task_id,
        lambda session, task: task_output.append_output(session, task.pk, task.attempt, lines, max_lines=max_lines),
    )


def _seconds(value: object, default: float) -> float:
    """A record's timestamp, when it is a finite number a float can hold; ``default`` otherwise."""
    if not isinstance(value, (int, float)):
        return default
    try:
        seconds = float(value)
    except OverflowError:  # an integer beyond any float
        return default
    return seconds if math.isfinite(seconds) else default


def parse_logs(raw: str, timestamp: int) -> list[tuple[float, str, str]]:
    """Log records from a StoreLogs payload: a JSON object, a list of them, or a JSON string."""
    if len(raw) > MAX_LOG_PAYLOAD:
        raise TooLarge(f"logs are over {MAX_LOG_PAYLOAD} characters; send them in smaller pieces")
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as error:  # ValueError: bad JSON, or an integer too long to read
        raise InvalidArgument(f"logs must be JSON ({error.__class__.__name__})") from error
    items = value if isinstance(value, list) else [value]
    default_ts = float(timestamp) if timestamp > 0 else time.time()
    records = []
    for item in items:
        if isinstance(item, str):
            records.append((default_ts, "info", item))
        elif isinstance(item, dict):
            ts = _seconds(item.get("ts", item.get("timestamp")), default_ts)
            level = item.get("level", "info")
            message = item.get("message", item.get("msg", ""))
            records.append((ts, str(level)[:16], message if isinstance(message, str) else json.dumps(message)))
        else:
            raise InvalidArgument("each log record must be a JSON object or string")
    return records


def store_logs(db: Database, reporter: Reporter, task_id: str, raw: str, timestamp: int, *, max_records: int) -> int:
    records = parse_logs(raw, timestamp)
    return _append(
        db,
        reporter,
        task_id,
        lambda session, task: task_output.append_logs(session, task.pk, task.attempt, records, max_records=max_records),
    )


_tasks = table_of(Task)
_RECORD_OUTCOME = Prepared(  # the first verdict wins, while the attempt is the one reporting and on its node
    update(_tasks)
    .where(
        _tasks.c.id == bindparam("pk"),
        _tasks.c.attempt == bindparam("b_attempt"),
        _tasks.c.reported_outcome == "",
        _tasks.c.status.in_([literal(status) for status in sorted(tasks.ACTIVE)]),
    )
    .values(reported_outcome=bindparam("outcome"), message=bindparam("b_message"), updated_at=bindparam("now"))
)


def verdict_message(message: str) -> str:
    """A node's message with its verdict, as the task keeps it."""
    return task_output.storable(message[:500])


def record_end_alone(
    db: Database,
    reporter: Reporter,
    task_id: str,
    lines: list[str],
    success: bool,
    message: str,
    *,
    max_lines: int,
    result: bytes | None = None,
) -> int | None:
    """PostgreSQL: :func:`authorized` and :func:`record_end` in one statement for the common end
    of an attempt (:func:`models.task_end.record_end_pg`); the attempt whose verdict it recorded.
    None, with nothing written, when the report needs the general path."""
    if db.is_sqlite or "\x00" in reporter.node_id:  # PostgreSQL text holds no NUL: no node is named so
        return None
    return db.alone(
        lambda conn: task_end.record_end_pg(
            conn,
            task_id=validate_task_id(task_id),
            user_id=reporter.user_id,
            node_id=reporter.node_id,
            attempt=reporter.attempt,
            lines=[task_output.storable_line(line) for line in lines],
            max_lines=max_lines,
            outcome="success" if success else "failure",
            message=verdict_message(message),
            now=utcnow(),
            result=result,
        )
    )


def record_end(
    db: Database,
    reporter: Reporter,
    task: tasks.TaskView,
    lines: list[str],
    success: bool,
    message: str,
    *,
    max_lines: int,
    result: bytes | None = None,
) -> tuple[int, bool]:
    """The end of ``task``'s attempt, which :func:`authorized` found live: its last output
    ``lines`` (if any), its ``result`` (if given: a zip kept in the database) and the node's
    verdict, in one write; (attempt, whether this call recorded the verdict). The first verdict
    wins; a task being stopped keeps none: the stop decides its end.
    """
    values = {
        "pk": task.pk,
        "b_attempt": task.attempt,
        "outcome": "success" if success else "failure",
        "b_message": verdict_message(message),
        "now": utcnow(),  # the recovery sweep leaves fresh reports to their archival job
    }

    def work(session: Session) -> bool | None:
        if lines and task_output.append_output(session, task.pk, task.attempt, lines, max_lines=max_lines) is None:
            return None  # moved on: nothing written
        if result is not None:
            task_files.put(session, task.pk, task_files.RESULT_ZIP, result)
        if task.status == tasks.STOPPING:
            return False
        return bool(_RECORD_OUTCOME.execute(session, values).rowcount == 1)

    if not lines and result is None and task.status == tasks.STOPPING:
        return task.attempt, False  # nothing to write
    recorded = db.transaction(work, grouped=True)
    if recorded is None:  # the lines found the attempt gone: nothing was written
        raise moved_on(task, authorized(db, reporter, task.task_id))
    if recorded or task.status == tasks.STOPPING:
        return task.attempt, recorded
    now = authorized(db, reporter, task.task_id)  # not recorded: why?
    if now.attempt != task.attempt:
        raise moved_on(task, now)
    return task.attempt, False  # a verdict was recorded first, or the task is being stopped


def record_usage(
    db: Database, client: redis.Redis, prefix: str, reporter: Reporter, task_id: str, usage: dict[str, int]
) -> int:
    """Keep a usage sample (for operators) and answer the CPT the pool itself metered so far."""
    for name, value in usage.items():
        if not 0 <= value <= 100:
            raise InvalidArgument(f"{name} must be a percentage between 0 and 100")
    with db.reading() as session:
        task = authorize(session, reporter, task_id)
        earned = economy.accrued(session, task.pk, task.attempt)
    key = f"{prefix}:usage:{task_id}"
    try:
        pipe = client.pipeline(transaction=False)
        pipe.lpush(key, json.dumps({"ts": time.time(), "attempt": task.attempt, **usage}))
        pipe.ltrim(key, 0, 99)
        pipe.expire(key, 86400)
        pipe.execute()
    except redis.RedisError:
        pass  # samples are informational; losing one loses nothing
    return earned
