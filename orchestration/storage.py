"""Where task and result zips live on disk. Every path is derived from a validated task id."""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import queue
import re
import shutil
import threading
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

from models.errors import InvalidArgument, TooLarge
from orchestration.digests import ZIP_DIGEST, zip_hasher
from orchestration.direct_writes import DIRECT_IO, DirectWrites
from pool.settings import Settings

TASK_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
WRITE_CHUNK = 4 << 20
BACKGROUND_HASH_BYTES = 1 << 20  # smaller data is hashed at once: a thread hand-off would cost more
START_WRITEBACK = hasattr(os, "posix_fadvise")  # Linux; not macOS
# A staged file this large leaves the page cache once it is on disk (see stage_pieces).
DROP_CACHED_BYTES = 16 << 20


def validate_task_id(task_id: str) -> str:
    if not TASK_ID_RE.fullmatch(task_id) or task_id in {".", ".."}:
        raise InvalidArgument("task_id must be 1–64 characters of letters, digits, '_', '.' or '-'")
    return task_id


def sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


@functools.cache
def background() -> ThreadPoolExecutor:
    """Threads for the work beside a large upload (hashing, flushing) that releases the GIL."""
    return ThreadPoolExecutor(max_workers=4, thread_name_prefix="storage")


class TaskStorage:
    """``direct_writes``: large zips are written past the page cache (:class:`DirectWrites`)."""

    def __init__(self, root: Path, *, direct_writes: bool = True) -> None:
        self.root = root.resolve()
        self.direct_writes = direct_writes and DIRECT_IO
        self._areas = {area: (self.root / area).resolve() for area in ("tasks", "archive")}

    @classmethod
    def from_settings(cls, settings: Settings) -> TaskStorage:
        return cls(settings.task_storage_path, direct_writes=settings.TASK_STORAGE_DIRECT_WRITES)

    def _dir(self, area: str, task_id: str) -> Path:
        # A validated id is one path component, neither '.' nor '..': it names a folder right
        # inside the area (resolved once, here, rather than with a stat of every parent per call).
        return self._areas[area] / validate_task_id(task_id)

    def task_zip(self, task_id: str) -> Path:
        return self._dir("tasks", task_id) / "task.zip"

    def result_zip(self, task_id: str) -> Path:
        return self._dir("tasks", task_id) / "result.zip"

    def archived_result(self, task_id: str) -> Path:
        return self._dir("archive", task_id) / "result.zip"

    def write(self, path: Path, data: bytes | memoryview) -> None:
        """Write durably and atomically: a reader sees the old file or the whole new one."""
        os.replace(self.stage(path, data), path)

    def stage(self, path: Path, data: bytes | memoryview) -> Path:
        """Write ``data`` durably to a new hidden file beside ``path``; ``os.replace`` it into place."""
        view = memoryview(data)
        staged, _, _ = self.stage_pieces(
            path, (view[start : start + WRITE_CHUNK] for start in range(0, len(view), WRITE_CHUNK))
        )
        return staged

    def stage_pieces(
        self,
        path: Path,
        pieces: Iterable[bytes | memoryview],
        *,
        limit: int | None = None,
        digest: bool = False,
        check: Callable[[Path], object] | None = None,
        reader: Callable[[bytes | memoryview], object] | None = None,
    ) -> tuple[Path, int, str]:
        """Write ``pieces`` one after another, durably, to a new hidden file beside ``path``.

        (the file, its size, its digest (``digests.zip_digest``) when ``digest`` else ""). TooLarge as soon as more than
        ``limit`` bytes arrive. From the first large piece on, the pieces are written and hashed
        on two threads of their own (:class:`Lane`; file writes and hashlib release the GIL) while
        the caller goes on receiving the next ones, and ``check(file)``, if given, runs while the
        file is flushed to disk. ``reader``, if given, is given every piece too, in order (on a
        thread of its own from the first large piece on), and has read them all before ``check``
        runs. Whatever goes wrong (the pieces' iterator, the write, ``reader`` and ``check`` may
        raise), the file is removed before the error propagates.

        A file of DROP_CACHED_BYTES or more is dropped from the page cache once it is on disk: it
        is read again only when a task is dispatched, and the pages it gives back are the ones the
        next large upload is written into. Otherwise each large upload takes memory the machine
        has not touched yet, which on a virtual machine whose free memory goes back to its host
        costs a fault into the host per page: writing 100 MiB took 250 ms that way, 36 ms into
        pages freed by the upload before it (bench/notes.md). With ``direct_writes``, what comes
        past that size goes to disk past the page cache (:class:`DirectWrites`), which saves the
        kernel's copy of it; a smaller file stays cached for the dispatch that reads it soon.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        hasher = zip_hasher() if digest else None
        size = 0
        try:
            with open(temporary, "wb") as handle, _Staging(handle, hasher, reader, self.direct_writes) as staging:
                for piece in pieces:
                    size += len(piece)
                    if limit is not None and size > limit:
                        raise TooLarge(f"the zip is more than {limit} bytes, the limit")
                    staging.add(piece)
                staging.written()
                handle.flush()  # what the buffer holds, before the fsync
                if check is None:
                    os.fsync(handle.fileno())
                else:
                    syncing = background().submit(os.fsync, handle.fileno())
                    try:
                        check(temporary)
                    finally:
                        syncing.result()
                staging.hashed()
                if START_WRITEBACK and size >= DROP_CACHED_BYTES:  # clean now: DONTNEED frees them
                    os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        return temporary, size, f"{ZIP_DIGEST}:{hasher.hexdigest()}" if hasher is not None else ""

    def archive_result(self, task_id: str) -> tuple[str, int] | None:
        """Move the stored result into the archive; (sha256, size) of the archived file, or None.

        Idempotent: when the result was archived already, that file's digest is returned.
        """
        source, target = self.result_zip(task_id), self.archived_result(task_id)
        if source.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(source, target)  # written durably when it was stored; one file system
            except FileNotFoundError:
                pass  # another run of this archival moved it first
            except OSError as error:
                if error.errno != errno.EXDEV:  # the archive on another file system: copy it there
                    raise
                temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
                shutil.copyfile(source, temporary)
                os.replace(temporary, target)
                source.unlink(missing_ok=True)
        if not target.exists():
            return None
        data = target.read_bytes()
        return sha256(data), len(data)

    def discard_task(self, task_id: str) -> None:
        shutil.rmtree(self._dir("tasks", task_id), ignore_errors=True)

    def prune_archive(self, task_id: str) -> None:
        shutil.rmtree(self._dir("archive", task_id), ignore_errors=True)


class Lane:
    """A thread of its own that runs the jobs it is given one after another, in their order.

    At most ``depth`` jobs wait (:meth:`put` blocks past that). Once a job raises, the later ones
    are skipped and the error is raised again by the next :meth:`put` or by :meth:`finish`.
    :meth:`abandon` skips what is still waiting and ends the thread.
    """

    def __init__(self, name: str, depth: int = 8) -> None:
        self._jobs: queue.Queue[Callable[[], object] | None] = queue.Queue(depth)
        self._error: BaseException | None = None
        self._abandoned = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            if self._error is None and not self._abandoned:
                try:
                    job()
                except BaseException as error:  # handed to the thread that gave the job
                    self._error = error

    def put(self, job: Callable[[], object]) -> None:
        if self._error is not None:
            raise self._error
        self._jobs.put(job)

    def finish(self) -> None:
        """Wait for every job given; raise what one of them raised."""
        self._jobs.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abandon(self) -> None:
        self._abandoned = True
        self._jobs.put(None)
        self._thread.join()


class _Staging:
    """The pieces of one staged file, written, hashed and read in order: inline while they are
    small, on a :class:`Lane` each from the first one of BACKGROUND_HASH_BYTES on."""

    def __init__(
        self, handle: BinaryIO, hasher: Any, reader: Callable[[bytes | memoryview], object] | None, direct: bool
    ) -> None:
        self.handle, self.hasher, self.reader, self.direct_writes = handle, hasher, reader, direct
        self.size = self.flushed = 0
        self.direct: DirectWrites | None = None
        self.writing: Lane | None = None
        self.hashing: Lane | None = None
        self.reading: Lane | None = None

    def __enter__(self) -> _Staging:
        return self

    def __exit__(self, kind: object, error: object, traceback: object) -> None:
        if kind is not None:  # the file is about to be removed: nothing more is written to it
            for lane in (self.writing, self.hashing, self.reading):
                if lane is not None:
                    lane.abandon()
            if self.direct is not None:
                self.direct.close()

    def add(self, piece: bytes | memoryview) -> None:
        if self.writing is None and len(piece) >= BACKGROUND_HASH_BYTES:
            self.writing = Lane("storage-write")
            self.hashing = Lane("storage-hash") if self.hasher is not None else None
            self.reading = Lane("storage-read") if self.reader is not None else None
        if self.writing is None:
            self._write(piece)
            if self.hasher is not None:
                self.hasher.update(piece)
            if self.reader is not None:
                self.reader(piece)
            return
        self.writing.put(functools.partial(self._write, piece))
        if self.hashing is not None:
            self.hashing.put(functools.partial(self.hasher.update, piece))
        if self.reading is not None and self.reader is not None:
            self.reading.put(functools.partial(self.reader, piece))

    def _write(self, piece: bytes | memoryview) -> None:
        if self.direct is None and self.direct_writes and self.size >= DROP_CACHED_BYTES:
            # A file this large leaves the page cache once on disk: the rest goes past it.
            self.handle.flush()  # what was written so far, so the direct writes follow it
            self.direct = DirectWrites(self.handle.fileno(), self.size)
        if self.direct is not None:
            self.direct.write(piece)
            self.size += len(piece)
            return
        self.handle.write(piece)
        self.size += len(piece)
        if START_WRITEBACK and self.size - self.flushed >= WRITE_CHUNK:
            # Send what was written to disk now (DONTNEED starts writeback of dirty pages, which
            # stay cached), so the fsync that ends the staging waits for the tail, not the whole file.
            self.handle.flush()
            os.posix_fadvise(self.handle.fileno(), self.flushed, self.size - self.flushed, os.POSIX_FADV_DONTNEED)
            self.flushed = self.size

    def written(self) -> None:
        """Every piece given is in the file (its buffer not yet flushed), and read."""
        if self.writing is not None:
            self.writing.finish()
            self.writing = None
        if self.direct is not None:
            self.direct.finish()
            self.direct = None
        if self.reading is not None:
            self.reading.finish()
            self.reading = None

    def hashed(self) -> None:
        """Every piece given is in the hash."""
        if self.hashing is not None:
            self.hashing.finish()
            self.hashing = None
