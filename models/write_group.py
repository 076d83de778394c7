"""Group commit: short write transactions that a process's threads ask for at the same time,
run one after another in ONE transaction.

SQLite takes one writer at a time, and a write transaction costs more than its statements:
``BEGIN IMMEDIATE`` (and, under load, the wait for another process's writer), the commit, the
session around them. An upload's transaction took about 700 µs in a quiet process, 390 µs a
task when eight were run in one transaction (bench/notes.md). Under a burst the server's handler
threads queue for the process's writer anyway; with a group, the thread whose turn it is runs
the works of every thread waiting behind it, and each of them is answered when that commit is.

A work that raises rolls back its whole group, whose works are then run again one by one, each
in a transaction of its own: each caller sees its own result or its own error, exactly as
without a group. When the database itself is unavailable (busy past its timeout, or gone), every
caller of the group is told so at once, rather than after one wait for each of them.

A work may thus run twice, as :meth:`models.db.Database.transaction` may retry it: it must be safe
to run again, and must not depend on the thread it runs on.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sqlalchemy.orm import Session

from models.errors import Unavailable

T = TypeVar("T")
LIMIT = 64  # works in one transaction at most: the writer is not held for long by one group


@dataclass
class _Write(Generic[T]):
    work: Callable[[Session], T]
    done: bool = False
    result: Any = None
    error: BaseException | None = None
    # Released when the write is done, or when its thread is to lead the next group.
    woken: Any = field(default_factory=threading.Lock)


class WriteGroups:
    """Runs ``transaction(work)`` for a group of works at once (see the module's docstring).

    ``transaction`` runs a callable in one write transaction, retrying what can be retried.

    One thread leads at a time: it commits the first LIMIT works queued (its own first among
    them), wakes their threads, and hands the lead to the thread of the next work queued, if any.
    A thread is woken once, when its work is done or when it is to lead, never to find that
    neither is the case: with dozens of handler threads queued, waking them all after each commit
    had the server's threads spend more of its CPU being woken than committing.
    """

    def __init__(self, transaction: Callable[[Callable[[Session], Any]], Any]) -> None:
        self._transaction = transaction
        self._lock = threading.Lock()
        self._queued: list[_Write[Any]] = []
        self._leading = False  # a thread leads, or has been handed the lead: queued works are its

    def run(self, work: Callable[[Session], T]) -> T:
        """``work``'s result once its group has committed; its own error if it raised."""
        mine: _Write[T] = _Write(work)
        mine.woken.acquire()
        with self._lock:
            self._queued.append(mine)
            waits, self._leading = self._leading, True
        if waits:
            mine.woken.acquire()  # until done, or handed the lead
        if not mine.done:
            self._lead()
        if mine.error is not None:
            raise mine.error
        return mine.result  # type: ignore[no-any-return]

    def _lead(self) -> None:
        """Commit the first LIMIT works queued (the leader's first among them); wake their
        threads, and the next work's to lead."""
        with self._lock:
            group, self._queued = self._queued[:LIMIT], self._queued[LIMIT:]
        try:
            self._commit(group)
        finally:
            with self._lock:
                following = self._queued[0] if self._queued else None
                self._leading = following is not None
            for write in group:
                write.woken.release()
            if following is not None:
                following.woken.release()

    def _commit(self, group: list[_Write[Any]]) -> None:
        try:
            if len(group) > 1:
                try:
                    results = self._transaction(lambda session: [write.work(session) for write in group])
                except Unavailable as error:  # the database's, not one write's: each caller is told at once
                    for write in group:
                        write.error, write.done = Unavailable(str(error)), True
                        write.error.__cause__ = error
                    return
                except Exception:  # whose error it was is found by running them one by one
                    pass
                else:
                    for write, result in zip(group, results, strict=True):
                        write.result, write.done = result, True
                    return
            for write in group:
                try:
                    write.result = self._transaction(write.work)
                except Exception as error:  # handed to the caller it belongs to
                    write.error = error
                write.done = True
        finally:  # interrupted (KeyboardInterrupt, SystemExit): nobody waits for ever
            for write in group:
                if not write.done:
                    write.error, write.done = RuntimeError("the write was interrupted before it committed"), True
