"""A zip's members read as its bytes arrive, so that checking it once it is whole costs little.

:func:`~orchestration.policies.zips.inspect_zip` expands every member to measure it, which for a
streamed upload means reading the whole file again after the last piece. :class:`ZipStream` is
given the pieces as they arrive (on a thread of its own, beside the write and the hash) and
walks the local file headers in order, expanding each member as ``ZipFile.open`` would: stored
data is checksummed, deflated data expanded and checksummed. Once the file is whole,
``inspect_zip`` takes a member's size from here only when its central directory entry agrees
with what was read in every field ``ZipFile`` reads it by; every other member is read from the
file as before. The walk stops at the first thing it does not follow (the central directory,
data prepended to the archive, a data descriptor, zip64 sizes, encryption, another method), and
everything after that is read from the file: the verdict is always the one reading the file
would give.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from zlib_ng import zlib_ng

LOCAL_HEADER = struct.Struct("<4sHHHHHLLLHH")  # signature, version, flags, method, time, date, crc, sizes, lengths
LOCAL_SIGNATURE = b"PK\x03\x04"
STORED, DEFLATED = 0, 8
UTF8_NAME = 0x800
UNFOLLOWED_FLAGS = 0x1 | 0x8 | 0x20 | 0x40  # encrypted, data descriptor, patch data, strong encryption
ZIP64_SIZE = 0xFFFFFFFF
EXPAND_STEP = 1 << 20  # bytes of output a deflated member is expanded by at a time


@dataclass(frozen=True)
class ReadMember:
    """A member read in full as it arrived: what ``ZipFile.open`` would find at its offset."""

    name: str  # decoded as ZipFile decodes a local header's name
    method: int
    compress_size: int
    size: int  # bytes its data expands to
    crc: int  # CRC-32 of those bytes
    end: int  # offset just past its data


@dataclass(frozen=True)
class _Header:
    offset: int
    name: str
    method: int
    compress_size: int
    size: int  # as the header declares it


class ZipStream:
    """Give it a zip's bytes in order (:meth:`feed`); :attr:`members` maps the offset of each
    local header it read a member at to that :class:`ReadMember`.

    It never raises for what it is given, and it expands no more than ``max_total_bytes``
    altogether, nor a member past the size its header declares or ``max_ratio`` times its
    compressed size (once past 1 MiB), the bounds inspect_zip applies.
    """

    def __init__(self, *, max_total_bytes: int, max_ratio: int) -> None:
        self.members: dict[int, ReadMember] = {}
        self._budget, self._max_ratio = max_total_bytes, max_ratio
        self._offset = 0  # bytes taken so far: the offset of the next one
        self._pending = bytearray()  # a local header, gathered until whole
        self._header: _Header | None = None  # the member whose data is arriving
        self._left = 0  # compressed bytes of it still to come
        self._spoiled = False  # its data will not be taken: skipped, not expanded
        self._expander: zlib._Decompress | None = None
        self._expanded = self._crc = 0
        self._stopped = False

    def feed(self, piece: bytes | memoryview) -> None:
        view = memoryview(piece).cast("B")
        while view and not self._stopped:
            view = self._gather(view) if self._header is None else self._take(view)

    # The local header: 30 bytes, then the name and the extra field.

    def _gather(self, view: memoryview) -> memoryview:
        need = LOCAL_HEADER.size
        if len(self._pending) >= LOCAL_HEADER.size:
            need += sum(LOCAL_HEADER.unpack_from(self._pending)[-2:])
        grab = min(need - len(self._pending), len(view))
        self._pending += view[:grab]
        self._offset += grab
        if len(self._pending) == LOCAL_HEADER.size:
            if bytes(self._pending[:4]) != LOCAL_SIGNATURE:  # the central directory, or what it does not follow
                self._stopped = True
            elif sum(LOCAL_HEADER.unpack_from(self._pending)[-2:]) == 0:
                self._begin()
        elif len(self._pending) == need:
            self._begin()
        return view[grab:]

    def _begin(self) -> None:
        _, _, flags, method, _, _, _, compress_size, size, name_length, _ = LOCAL_HEADER.unpack_from(self._pending)
        raw_name = bytes(self._pending[LOCAL_HEADER.size : LOCAL_HEADER.size + name_length])
        offset = self._offset - len(self._pending)
        self._pending.clear()
        if flags & UNFOLLOWED_FLAGS or method not in (STORED, DEFLATED) or ZIP64_SIZE in (compress_size, size):
            self._stopped = True  # where its data ends, or what it expands to, is not read here
            return
        try:
            name = raw_name.decode("utf-8" if flags & UTF8_NAME else "cp437")
        except UnicodeDecodeError:
            self._stopped = True
            return
        self._header = _Header(offset, name, method, compress_size, size)
        self._left, self._expanded, self._crc = compress_size, 0, 0
        bomb = size > self._max_ratio * max(compress_size, 1) and size > 1 << 20
        self._spoiled = bomb or size > self._budget or (method == STORED and size != compress_size)
        self._expander = zlib.decompressobj(-15) if method == DEFLATED and not self._spoiled else None
        if not self._left:
            self._end()

    # The member's data: checksummed as it is, or as it expands.

    def _take(self, view: memoryview) -> memoryview:
        data, rest = view[: self._left], view[self._left :]
        self._left -= len(data)
        self._offset += len(data)
        if not self._spoiled:
            if self._expander is None:
                self._count(data)
            else:
                self._expand(data)
        if not self._left:
            self._end()
        return rest

    def _expand(self, data: memoryview | bytes) -> None:
        assert self._expander is not None and self._header is not None
        try:
            while data and not self._spoiled:
                if self._expander.eof:  # compressed bytes past the end of the deflate stream
                    self._spoiled = True
                    return
                out = self._expander.decompress(data, EXPAND_STEP)
                self._count(out)
                data = self._expander.unconsumed_tail
        except zlib.error:
            self._spoiled = True

    def _count(self, data: memoryview | bytes) -> None:
        assert self._header is not None
        self._expanded += len(data)
        if self._expanded > self._header.size:
            self._spoiled = True
            return
        self._crc = zlib_ng.crc32(data, self._crc)  # the same CRC-32 as zlib's, computed with SIMD

    def _end(self) -> None:
        header, expander = self._header, self._expander
        assert header is not None
        self._header = self._expander = None
        self._budget -= self._expanded
        whole = expander is None or (expander.eof and not expander.unused_data)
        if not self._spoiled and whole and self._expanded == header.size:
            self.members[header.offset] = ReadMember(
                header.name, header.method, header.compress_size, self._expanded, self._crc, self._offset
            )
