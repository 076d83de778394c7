"""The end of an attempt: the one statement PostgreSQL records the common FinishTask with, the
general path it leaves the rest to, and the output line cap both keep.

On PostgreSQL a FinishTask from the node the live attempt runs on, with its first verdict, output
that fits and a small result, is checked and written by one statement
(:func:`models.task_end.record_end_pg`); anything else, and every report on SQLite, takes the
general path. The statement is called here directly on the pool's own database, and through the
real gRPC server for what a node sees.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import select

from models import task_files, task_output, tasks
from models.tables import Task
from models.task_output import TRUNCATION_MARKER
from orchestration.reports import Reporter, record_end_alone
from tests.harness import PoolHarness
from tests.scripted_worker import Script, result_zip
from tests.tasks_support import FAST, poll, wait_status
from tests.test_finish_task import Held, hold_a_task

MAX_LINES = 6  # the node sends Script().lines (3) as it begins


@pytest.fixture
def capped(make_pool: Callable[..., PoolHarness], database_url: str, celery_worker_for, workers: list) -> Held:
    """A task RUNNING on a node that holds it, on a pool keeping at most MAX_LINES lines a task."""
    pool = make_pool(database_url=database_url, OUTPUT_MAX_LINES=MAX_LINES, **FAST)
    celery_worker_for(pool, wait_ready=False)
    return hold_a_task(pool, workers)


def current(held: Held) -> tasks.TaskView:
    with held.pool.ctx.db.reading() as session:
        task = tasks.get(session, held.task_id)
    assert task is not None
    return task


def reporter(held: Held, **fields: object) -> Reporter:
    task = current(held)
    assert task.node_owner_id is not None
    given: dict[str, object] = {"user_id": task.node_owner_id, "username": held.node.owner, "node_id": task.node_id}
    return Reporter(**{**given, **fields})  # type: ignore[arg-type]


def end(held: Held, who: Reporter, lines: list[str], result: bytes | None = None) -> int | None:
    db = held.pool.ctx.db
    return record_end_alone(db, who, held.task_id, lines, True, "done", max_lines=MAX_LINES, result=result)


def counted_lines(held: Held) -> int:
    """The task's count of kept lines, which the line cap is checked against."""
    with held.pool.ctx.db.reading() as session:
        return int(session.scalar(select(Task.output_lines).where(Task.task_id == held.task_id)) or 0)


def kept_lines(held: Held) -> list[str]:
    with held.pool.ctx.db.reading() as session:
        return task_output.output(session, current(held).pk)


@pytest.mark.parametrize("lines", [["a", "b", "c"], ["a", "b", "c", "d"]], ids=["fits", "over"])
def test_finish_task_keeps_output_up_to_the_cap_and_marks_the_cut_once(capped: Held, lines: list[str]) -> None:
    reply = capped.finish(success=True, attempt=1, output="\n".join(lines), result_zip=result_zip())

    assert (reply.success, reply.message) == (True, "completion recorded")
    done = wait_status(capped.pool, capped.submitter, capped.task_id, "COMPLETED")
    if len(lines) <= MAX_LINES - len(Script().lines):
        assert list(done.output) == [*Script().lines, *lines]
    else:
        marker = TRUNCATION_MARKER.format(limit=MAX_LINES)
        assert list(done.output) == [*Script().lines, *lines[:3], marker]


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_one_statement_records_the_common_end_on_postgres(capped: Held) -> None:
    result = result_zip("one statement\n")

    assert end(capped, reporter(capped, attempt=1), ["x", "y"], result) == 1

    task = current(capped)
    assert (task.status, task.reported_outcome, task.message) == ("RUNNING", "success", "done")
    assert kept_lines(capped) == [*Script().lines, "x", "y"]
    assert counted_lines(capped) == len(Script().lines) + 2
    assert capped.pool.kept_file(capped.task_id, task_files.RESULT_ZIP) == result
    # A second verdict is left to the general path, which says it was recorded before.
    assert end(capped, reporter(capped), []) is None
    assert capped.finish(success=False, attempt=1).message == "completion already recorded"


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
@pytest.mark.parametrize(
    "change, lines",
    [
        ({"attempt": 2}, []),
        ({"node_id": "someone/else"}, []),
        ({"node_id": "a\x00b"}, []),  # a name PostgreSQL's text cannot hold
        ({"user_id": -1}, []),
        ({}, ["1", "2", "3", "4"]),  # over the cap: the general path cuts it
    ],
    ids=["stale-attempt", "other-node", "nul-in-node", "other-owner", "over-the-cap"],
)
def test_one_statement_writes_nothing_when_the_report_needs_the_general_path(
    capped: Held, change: dict[str, object], lines: list[str]
) -> None:
    assert end(capped, reporter(capped, **change), lines, result_zip()) is None

    assert current(capped).reported_outcome == ""
    assert counted_lines(capped) == len(Script().lines)
    assert kept_lines(capped) == list(Script().lines)
    assert capped.pool.kept_file(capped.task_id, task_files.RESULT_ZIP) is None


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_sqlite_takes_the_general_path(capped: Held) -> None:
    assert end(capped, reporter(capped), ["x"]) is None
    assert poll(capped.pool, capped.submitter, capped.task_id).status == "RUNNING"
    assert current(capped).reported_outcome == ""
