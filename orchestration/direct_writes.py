"""The rest of a file written past the page cache (``O_DIRECT``): large task zips (see
:meth:`orchestration.storage.TaskStorage.stage_pieces`)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os

DIRECT_IO = hasattr(os, "O_DIRECT")  # Linux and most other Unixes; not macOS
DIRECT_ALIGN = 4096  # offsets, sizes and buffer addresses of direct writes: a page, a multiple of any sector
DIRECT_BUFFER = 1 << 20


class _PyBuffer(ctypes.Structure):
    """CPython's ``Py_buffer`` (a stable ABI since 3.11): what ``PyObject_GetBuffer`` fills in."""

    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]


def copy_released(target: int, source: bytes | memoryview) -> None:
    """Copy the bytes of ``source`` (a contiguous buffer) to the address ``target`` with the
    interpreter lock released, as a slice assignment would copy them holding it.

    The copy into the aligned buffer is most of a direct write's CPU: held under the lock, it
    would keep the thread receiving the next pieces (grpcio's, which needs the lock to hand each
    message over) waiting for a core's worth of memcpy. ``ctypes.memmove`` releases the lock, and
    the buffer's export keeps ``source`` alive and unmoved meanwhile. BufferError when ``source``
    is not contiguous."""
    held = _PyBuffer()
    _get_buffer(source, ctypes.byref(held), 0)
    try:
        ctypes.memmove(target, held.buf, held.len)
    finally:
        _release_buffer(ctypes.byref(held))


class DirectWrites:
    """The rest of a file written past the page cache (``O_DIRECT``), from ``offset`` on.

    A large upload written through the page cache costs the kernel a copy of every byte into
    pages of its own (some 40 ms of CPU for 100 MiB on the benchmark's machine, beside the
    receive on the same two cores), pages that are then written to disk and dropped anyway.
    Direct writes go from a buffer of this process to the disk: the pieces are copied into an
    aligned buffer and written from it a buffer at a time, about half that CPU, the copy half of
    it (bench/notes.md, twenty-seventh pass).

    Direct writes need offsets, sizes and addresses aligned to the device's blocks: the bytes up
    to the first aligned offset and the tail after the last whole block are written through the
    page cache. When the file system refuses direct writes (at ``fcntl`` or at the first write:
    ``EINVAL``), the rest is written through the page cache as before. The data is durable only
    after the caller's ``fsync``, as with any write.
    """

    def __init__(self, fd: int, offset: int, *, align: int = DIRECT_ALIGN, buffer: int = DIRECT_BUFFER) -> None:
        self.fd, self.align = fd, align
        self.head = -offset % align  # bytes through the page cache before the first aligned offset
        self.offset = offset + self.head  # where the buffer's first byte goes in the file
        self.buffer: mmap.mmap | None = mmap.mmap(-1, buffer)  # page-aligned
        self._anchor: ctypes.c_char | None = ctypes.c_char.from_buffer(self.buffer)  # an export: no close under it
        self._address = ctypes.addressof(self._anchor)
        self.filled = 0
        self.direct = False  # set once the head is written

    def write(self, piece: bytes | memoryview) -> None:
        view = memoryview(piece).cast("B")
        if self.head:
            head, view = view[: self.head], view[self.head :]
            self._write_all(head)
            self.head -= len(head)
            if self.head:
                return
        if not self.direct and self.buffer is not None and not self._set_direct(True):
            self._release()  # refused by this file system: through the page cache
        while view and self.buffer is not None:
            taken = min(len(view), len(self.buffer) - self.filled)
            copy_released(self._address + self.filled, view[:taken])
            self.filled += taken
            view = view[taken:]
            if self.filled == len(self.buffer):
                self._drain(self.filled)
        if view:  # the file system refused direct writes: through the page cache
            self._write_all(view)

    def finish(self) -> None:
        """Write what the buffer holds (its tail through the page cache); direct writes end."""
        if self.buffer is not None:
            whole = self.filled - self.filled % self.align
            if whole:
                self._drain(whole)
            if self.buffer is not None and self.filled:
                self._set_direct(False)
                self._write_all(memoryview(self.buffer)[: self.filled])
                self.filled = 0
        self.close()

    def close(self) -> None:
        if self.direct:
            self._set_direct(False)
        self._release()

    def _drain(self, size: int) -> None:
        """Write the first ``size`` bytes of the buffer (a multiple of the alignment) and keep the rest."""
        assert self.buffer is not None
        try:
            self._write_all(memoryview(self.buffer)[:size])
        except OSError as error:
            if error.errno != errno.EINVAL or not self.direct:
                raise
            # Refused by this file system after all (its blocks larger than the alignment, say):
            # this buffer, from its start whatever went before the refusal, and the rest through
            # the page cache.
            self._set_direct(False)
            held = bytes(memoryview(self.buffer)[: self.filled])
            self._release()
            os.lseek(self.fd, self.offset, os.SEEK_SET)
            self._write_all(memoryview(held))
            return
        self.offset += size
        rest = self.filled - size
        if rest:
            self.buffer.move(0, size, rest)
        self.filled = rest

    def _write_all(self, view: memoryview) -> None:
        while view:
            view = view[os.write(self.fd, view) :]

    def _set_direct(self, on: bool) -> bool:
        flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        try:
            fcntl.fcntl(self.fd, fcntl.F_SETFL, flags | os.O_DIRECT if on else flags & ~os.O_DIRECT)
        except OSError as error:
            if error.errno != errno.EINVAL:
                raise
            return False
        self.direct = on
        return on

    def _release(self) -> None:
        if self.buffer is not None:
            # A failed write's traceback may still hold a view of it: then it is unmapped once that goes.
            self._anchor = None
            with contextlib.suppress(BufferError):
                self.buffer.close()
            self.buffer = None
        self.direct = False
