"""Uploads: a task's zip staged, checked and recorded with its escrow, then put in place.

A zip of at most INLINE_ZIP_BYTES is kept in the database, inserted with the task's row and
escrow (``models.task_files``). A larger one is written (durably) to a staging file first,
outside the transaction; the task's row and escrow are inserted, and the zip moved into place
inside that transaction (SQLite) or right after its commit (PostgreSQL, where one statement
writes it all: ``uploads.insert_alone``).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from models import tasks
from models.db import Database
from models.errors import Cancelled
from orchestration import uploads
from orchestration.storage import TaskStorage
from pool.settings import Settings


@dataclass(frozen=True)
class Asker:
    """A user asking about tasks (identity from the token)."""

    user_id: int
    username: str
    is_operator: bool = False


class Intake:
    """UploadTask and UploadTaskStream; ``on_created`` is called after each new task's commit."""

    def __init__(
        self, db: Database, storage: TaskStorage, settings: Settings, *, on_created: Callable[[], None]
    ) -> None:
        self.db, self.storage, self.settings, self.on_created = db, storage, settings, on_created
        self._accounts_seen: set[tuple[str, int]] = set()  # (username, id) pairs found in the database

    def upload(self, caller: Asker, request: uploads.UploadRequest) -> tuple[str, bool]:
        """Store and record a task and escrow its price, then ``on_created()``; (task_id, newly created).

        A small zip (INLINE_ZIP_BYTES) is inserted with the task. A larger one is written
        (durably) to a staging file first, outside the transaction; the transaction that inserts
        the task moves it into place, so neither a repeat nor an upload that loses a race for the
        task id touches the stored zip. A large zip is checked while it is written; a zip the
        check refuses is removed again.
        """
        request = uploads.validate(request, caller.username, self.settings)
        if request.size <= self.settings.INLINE_ZIP_BYTES:
            return self._keep_inline(caller, request)
        path = self.storage.task_zip(request.task_id)
        try:
            staged = self.storage.stage(path, request.task_zip)
        except BaseException:
            request.checked()  # a refused zip says so, rather than what went wrong with storage
            raise
        try:
            request.checked()
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        return self._record(caller, request, path, staged)

    def upload_pieces(
        self,
        caller: Asker,
        request: uploads.UploadRequest,
        pieces: Iterable[bytes | memoryview],
        *,
        wanted: Callable[[], bool] = lambda: True,
    ) -> tuple[str, bool]:
        """:meth:`upload` of a zip that arrives in ``pieces`` (UploadTaskStream); ``request``'s own
        task_zip is ignored. The fields are checked before any piece is read; each piece is written
        as it arrives, and the zip checked once it is whole.

        ``wanted()`` is asked once the zip is whole and checked, just before the task is recorded:
        a client that cancels after its last piece may show the server a stream that simply ended
        (gRPC's request iterator stops the same way for both), but by then the cancellation has
        arrived. One that lands after the commit is too late: the task stays, as any call's would.
        """
        request = uploads.validate_fields(request, caller.username, self.settings)
        pieces, small = _whole_within(iter(pieces), self.settings.INLINE_ZIP_BYTES)
        if small is not None:  # the whole zip came within INLINE_ZIP_BYTES: kept as UploadTask keeps it
            request = uploads.with_zip(replace(request, task_zip=small), self.settings)
            request.checked()
            _still(wanted)
            return self._keep_inline(caller, request)
        path = self.storage.task_zip(request.task_id)
        limit = self.settings.MAX_FILE_SIZE

        arriving = uploads.zip_stream(self.settings)  # its members read as they arrive, not again after

        def check(staged: Path) -> None:
            uploads.check_zip(staged, limit=limit, settings=self.settings, what="task_zip", read=arriving.members)

        staged, size, digest = self.storage.stage_pieces(
            path, pieces, limit=limit, digest=True, check=check, reader=arriving.feed
        )
        request = replace(request, task_zip=b"", zip_size=size, zip_digest=uploads.ZipDigest(digest))
        _still(wanted, staged)
        return self._record(caller, request, path, staged)

    def _keep_inline(self, caller: Asker, request: uploads.UploadRequest) -> tuple[str, bool]:
        """:meth:`_record` of a task whose zip is kept in the database with it, once checked."""
        request.checked()  # a zip of BACKGROUND_HASH_BYTES or more is checked on another thread
        return self._record(caller, replace(request, kept_inline=True), None, None)

    def _record(
        self, caller: Asker, request: uploads.UploadRequest, path: Path | None, staged: Path | None
    ) -> tuple[str, bool]:
        """Insert the task whose zip is ``staged`` (beside ``path``) and move the zip into place, or
        whose zip is kept with it in the database (both None); (task id, whether this call created it)."""
        known = caller.user_id if (caller.username.lower(), caller.user_id) in self._accounts_seen else None
        try:
            if not self.db.is_sqlite and uploads.escrow_amount(request, self.settings) > 0:
                owner_id = uploads.insert_alone(self.db, request, caller.username, self.settings, owner_id=known)
                if staged is not None and path is not None:
                    os.replace(staged, path)  # after the commit (see uploads.insert_alone)
            else:
                owner_id = self._insert_in_transaction(caller, request, path, staged, known)
        except IntegrityError:  # the task id exists: a repeat of this upload, or another one?
            with self.db.reading() as session:
                existing = tasks.get(session, request.task_id)
            if existing is None:
                raise
            uploads.check_repeat(existing, request, caller.user_id, staged)
            if staged is None or path is None:
                return request.task_id, False
            if existing.status not in tasks.TERMINAL and not path.exists() and staged.exists():
                os.replace(staged, path)  # the first upload committed but stopped before placing its zip
            return request.task_id, False
        finally:
            if staged is not None:
                staged.unlink(missing_ok=True)
        if owner_id == caller.user_id:  # accounts are never deleted: no need to look this one up again
            self._accounts_seen.add((caller.username.lower(), caller.user_id))
        self.on_created()
        uploads.log_uploaded(request, caller.username, self.settings)
        return request.task_id, True

    def _insert_in_transaction(
        self, caller: Asker, request: uploads.UploadRequest, path: Path | None, staged: Path | None, known: int | None
    ) -> int:
        """The task and its escrow in one transaction, the zip moved into place inside it."""
        placed = False

        def work(session: Session) -> int:
            nonlocal placed
            owner_id = uploads.insert(session, request, caller.username, self.settings, owner_id=known)
            if staged is not None and path is not None and staged.exists():
                os.replace(staged, path)
                placed = True
            return owner_id

        # Grouped with other uploads of this process (SQLite): should its group roll back, the work
        # runs again alone. The zip was put in place while this transaction held the one writer
        # and its insert had succeeded, so no committed task owned that path; run again, the work
        # finds the zip placed already, and an upload of the same id committed in between has
        # replaced it with its own (this one's insert then fails as a clash).
        try:
            return self.db.transaction(work, grouped=True)
        except Exception:
            if placed and path is not None:  # the commit failed after the zip was put in place
                with self.db.reading() as session:
                    if tasks.get(session, request.task_id) is None:
                        path.unlink(missing_ok=True)
            raise


Piece = bytes | memoryview


def _still(wanted: Callable[[], bool], staged: Path | None = None) -> None:
    """Cancelled (the ``staged`` zip removed) unless the uploader still ``wanted()`` the task."""
    if not wanted():
        if staged is not None:
            staged.unlink(missing_ok=True)
        raise Cancelled("the upload stream was cancelled before the task was recorded")


def _whole_within(pieces: Iterator[Piece], limit: int) -> tuple[Iterator[Piece], bytes | None]:
    """((), the whole zip) when the pieces come to at most ``limit`` bytes; else (every piece,
    those read already first, None)."""
    head: list[Piece] = []
    size = 0
    for piece in pieces:
        head.append(piece)
        size += len(piece)
        if size > limit:
            return itertools.chain(head, pieces), None
    return iter(()), b"".join(head)
