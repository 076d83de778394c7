"""Where task and result zips live on disk. Every path is derived from a validated task id."""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from models.errors import InvalidArgument, TooLarge

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
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self._areas = {area: (self.root / area).resolve() for area in ("tasks", "archive")}

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

    @classmethod
    def write(cls, path: Path, data: bytes | memoryview) -> None:
        """Write durably and atomically: a reader sees the old file or the whole new one."""
        os.replace(cls.stage(path, data), path)

    @classmethod
    def stage(cls, path: Path, data: bytes | memoryview) -> Path:
        """Write ``data`` durably to a new hidden file beside ``path``; ``os.replace`` it into place."""
        view = memoryview(data)
        staged, _, _ = cls.stage_pieces(
            path, (view[start : start + WRITE_CHUNK] for start in range(0, len(view), WRITE_CHUNK))
        )
        return staged

    @staticmethod
    def stage_pieces(
        path: Path,
        pieces: Iterable[bytes | memoryview],
        *,
        limit: int | None = None,
        digest: bool = False,
        check: Callable[[Path], object] | None = None,
    ) -> tuple[Path, int, str]:
        """Write ``pieces`` one after another, durably, to a new hidden file beside ``path``.

        (the file, its size, its sha256 when ``digest`` else ""). TooLarge as soon as more than
        ``limit`` bytes arrive. Each large piece is hashed on a background thread while the next
        one is received and written (hashlib and file writes release the GIL), and ``check(file)``,
        if given, runs while the file is flushed to disk. Whatever goes wrong (the pieces'
        iterator and ``check`` may raise too), the file is removed before the error propagates.

        A file of DROP_CACHED_BYTES or more is dropped from the page cache once it is on disk: it
        is read again only when a task is dispatched, and the pages it gives back are the ones the
        next large upload is written into. Otherwise each large upload takes memory the machine
        has not touched yet, which on a virtual machine whose free memory goes back to its host
        costs a fault into the host per page: writing 100 MiB took 250 ms that way, 36 ms into
        pages freed by the upload before it (bench/notes.md).
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        hasher = hashlib.sha256() if digest else None
        hashing: Future[None] | None = None  # at most one piece at a time: the hash keeps their order
        size = flushed = 0
        try:
            with open(temporary, "wb") as handle:
                for piece in pieces:
                    size += len(piece)
                    if limit is not None and size > limit:
                        raise TooLarge(f"the zip is more than {limit} bytes, the limit")
                    handle.write(piece)
                    if hasher is not None:
                        if hashing is not None:
                            hashing.result()
                            hashing = None
                        if len(piece) >= BACKGROUND_HASH_BYTES:
                            hashing = background().submit(hasher.update, piece)
                        else:
                            hasher.update(piece)
                    if START_WRITEBACK and size - flushed >= WRITE_CHUNK:
                        # Send what was written to disk now (DONTNEED starts writeback of dirty pages,
                        # which stay cached), so the fsync below waits for the tail, not the whole file.
                        handle.flush()
                        os.posix_fadvise(handle.fileno(), flushed, size - flushed, os.POSIX_FADV_DONTNEED)
                        flushed = size
                handle.flush()  # what the buffer holds, before the fsync
                if check is None:
                    os.fsync(handle.fileno())
                else:
                    syncing = background().submit(os.fsync, handle.fileno())
                    try:
                        check(temporary)
                    finally:
                        syncing.result()
                if hashing is not None:
                    hashing.result()
                if START_WRITEBACK and size >= DROP_CACHED_BYTES:  # clean now: DONTNEED frees them
                    os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        return temporary, size, hasher.hexdigest() if hasher is not None else ""

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
