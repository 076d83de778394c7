"""Group commit on SQLite: the short writes a process's threads ask for at the same time share one
transaction, and each caller still gets its own result or its own error, as if it had written
alone. On PostgreSQL ``grouped`` changes nothing: its transactions run side by side. And
``Database.alone``, each statement a transaction of its own, on SQLite as on PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.orm import Session

from models.db import Database
from models.errors import Refused, Unavailable
from models.write_group import LIMIT, WriteGroups


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    db = Database(database_url, pool_size=8)
    db.transaction(lambda s: s.execute(sa.text("CREATE TABLE notes (n INTEGER PRIMARY KEY, by_thread TEXT)")))
    yield db
    db.dispose()


def _notes(db: Database) -> list[int]:
    with db.reading() as session:
        return list(session.execute(sa.text("SELECT n FROM notes ORDER BY n")).scalars())


def _counting(db: Database) -> list[int]:
    """Records, for each write transaction the groups start, how many works it ran (-1: one work)."""
    sizes: list[int] = []
    plain = db.transaction

    def transaction(work: Callable[[Session], Any]) -> Any:
        def counted(session: Session) -> Any:
            result = work(session)
            sizes.append(len(result) if isinstance(result, list) else -1)
            return result

        return plain(counted)

    db._groups._transaction = transaction  # the groups' transactions, as the Database makes them
    return sizes


def _note(n: int) -> Callable[[Session], int]:
    def work(session: Session) -> int:
        session.execute(sa.text("INSERT INTO notes (n, by_thread) VALUES (:n, :t)"), {"n": n, "t": "x"})
        return n * 10

    return work


def _queue_behind_a_slow_write(db: Database, works: list[Callable[[Session], int]]) -> list[Any]:
    """Runs a first write that waits until every one of ``works`` is queued behind it, then lets
    it commit; what each of ``works`` returned or raised, in order."""
    started, release = threading.Event(), threading.Event()

    def slow(session: Session) -> int:
        started.set()
        assert release.wait(10)
        return _note(0)(session)

    first = threading.Thread(target=db.transaction, args=(slow,), kwargs={"grouped": True})
    first.start()
    assert started.wait(10)

    def call(work: Callable[[Session], int]) -> Any:
        try:
            return db.transaction(work, grouped=True)
        except BaseException as error:  # the test looks at it
            return error

    with ThreadPoolExecutor(len(works)) as pool:
        futures = [pool.submit(call, work) for work in works]
        while len(db._groups._queued) < len(works):  # each is queued behind the slow write
            threading.Event().wait(0.01)
        release.set()
        first.join(10)
        return [future.result(timeout=10) for future in futures]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_writes_queued_behind_another_commit_together_each_with_its_own_result(db: Database) -> None:
    sizes = _counting(db)
    answers = _queue_behind_a_slow_write(db, [_note(n) for n in range(1, 9)])
    assert answers == [n * 10 for n in range(1, 9)]
    assert _notes(db) == list(range(9))
    assert sizes == [-1, 8]  # the slow write alone, then the eight queued behind it in one transaction


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_failing_write_is_refused_alone_and_the_rest_of_its_group_commits(db: Database) -> None:
    sizes = _counting(db)

    def refused(session: Session) -> int:
        _note(100)(session)  # written, then the work fails: this row must not stay
        raise Refused("not this one")

    def clash(session: Session) -> int:
        return _note(3)(session)  # the same key as another write of its group

    works = [_note(1), refused, _note(2), _note(3), clash, _note(4)]
    answers = _queue_behind_a_slow_write(db, works)
    assert answers[0] == 10 and answers[2] == 20 and answers[3] == 30 and answers[5] == 40
    assert isinstance(answers[1], Refused) and str(answers[1]) == "not this one"
    assert isinstance(answers[4], sa.exc.IntegrityError)
    assert _notes(db) == [0, 1, 2, 3, 4]
    # the slow write; the group of six rolled back (it counted nothing); then each alone, four committed
    assert sizes == [-1] * 5


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_when_the_database_is_unavailable_the_whole_group_is_told_at_once(db: Database) -> None:
    tries: list[int] = []
    plain = db.transaction

    def transaction(work: Callable[[Session], Any]) -> Any:
        tries.append(1)
        if len(tries) > 1:  # the slow write went through; then the writer stays busy past its timeout
            raise Unavailable("the database is busy or unavailable; try again shortly")
        return plain(work)

    db._groups._transaction = transaction
    answers = _queue_behind_a_slow_write(db, [_note(n) for n in range(1, 6)])
    assert all(isinstance(answer, Unavailable) and "busy" in str(answer) for answer in answers)
    assert len({id(answer) for answer in answers}) == 5  # each caller raises an error of its own
    assert len(tries) == 2  # the slow write, then the group: not one more wait for each of its writes
    assert _notes(db) == [0]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_an_interrupted_group_answers_every_caller(db: Database) -> None:
    def interrupted(session: Session) -> int:
        raise KeyboardInterrupt

    answers = _queue_behind_a_slow_write(db, [_note(1), interrupted, _note(2)])
    # the thread that ran the group sees the interruption; the others are told their write did not commit
    assert sorted(type(answer).__name__ for answer in answers) == ["KeyboardInterrupt", "RuntimeError", "RuntimeError"]
    assert all("interrupted" in str(answer) for answer in answers if isinstance(answer, RuntimeError))
    assert _notes(db) == [0]
    assert db.transaction(_note(5), grouped=True) == 50  # the groups go on afterwards


def test_many_threads_writing_grouped_lose_nothing_and_share_transactions(db: Database) -> None:
    """Read-modify-write of one counter, safe only if each work sees the ones before it."""
    db.transaction(lambda s: s.execute(sa.text("CREATE TABLE counter (n INTEGER NOT NULL)")))
    db.transaction(lambda s: s.execute(sa.text("INSERT INTO counter VALUES (0)")))
    sizes = _counting(db)

    lock = "" if db.is_sqlite else " FOR UPDATE"  # SQLite: the one writer is the lock

    def bump(session: Session) -> int:
        n = int(session.execute(sa.text(f"SELECT n FROM counter{lock}")).scalar_one())
        session.execute(sa.text("UPDATE counter SET n = :n"), {"n": n + 1})
        return n + 1

    with ThreadPoolExecutor(8) as pool:
        seen = list(pool.map(lambda _: db.transaction(bump, grouped=True), range(400)))
    with db.reading() as session:
        assert session.execute(sa.text("SELECT n FROM counter")).scalar_one() == 400
    assert sorted(seen) == list(range(1, 401))  # each caller got the value its own work saw
    if db.is_sqlite:
        assert sum(abs(size) for size in sizes) == 400
        assert any(size > 1 for size in sizes), sizes  # eight threads at once: some writes were grouped
    else:
        assert sizes == []  # PostgreSQL: no groups


def test_what_a_work_writes_alone_is_committed_statement_by_statement(db: Database) -> None:
    def two(conn: Connection) -> int:
        conn.execute(sa.text("INSERT INTO notes (n) VALUES (1)"))
        return int(conn.execute(sa.text("INSERT INTO notes (n) VALUES (2) RETURNING n")).scalar_one())

    assert db.alone(two) == 2
    assert _notes(db) == [1, 2]

    def then_clash(conn: Connection) -> None:
        conn.execute(sa.text("INSERT INTO notes (n) VALUES (3)"))
        conn.execute(sa.text("INSERT INTO notes (n) VALUES (1)"))  # exists: this one fails

    with pytest.raises(sa.exc.IntegrityError):
        db.alone(then_clash)
    assert _notes(db) == [1, 2, 3]  # the statement before the failing one stays: it was committed


def test_past_limit_the_lead_passes_on_and_every_thread_gets_its_own_answer() -> None:
    """More threads than one group takes: the leader hands the lead to the next work queued."""
    sizes: list[int] = []
    one_at_a_time = threading.Lock()

    def transaction(works: Callable[[Any], Any]) -> Any:
        with one_at_a_time:
            time.sleep(0.005)  # long enough for the other threads to queue behind this one
            result = works(None)
            sizes.append(len(result) if isinstance(result, list) else 1)
            return result

    groups = WriteGroups(transaction)
    threads = 3 * LIMIT
    start = threading.Barrier(threads)

    def write(n: int) -> int:
        start.wait()
        return groups.run(lambda _session: n * n)

    with ThreadPoolExecutor(threads) as pool:
        answers = list(pool.map(write, range(threads), timeout=30))
    assert answers == [n * n for n in range(threads)]
    assert sum(sizes) == threads and max(sizes) == LIMIT
