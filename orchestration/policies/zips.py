"""Zip safety checks for task and result archives, done before anything is stored.

The archive must be a real zip whose every entry is a regular file or folder with a relative
path that stays inside the archive; the entry count, the total uncompressed size and the
compression ratio are bounded (zip bombs). Sizes are verified by streaming each entry, so a
header that lies about its size is caught too. A zip that arrived in pieces may have had its
entries streamed as it arrived (:mod:`orchestration.policies.zipstream`); those are not read again.
"""

from __future__ import annotations

import bisect
import collections
import io
import stat
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, BinaryIO

from orchestration.policies.zipstream import UNFOLLOWED_FLAGS, ReadMember


class UnsafeZip(ValueError):
    """The archive is not a zip, or is one the pool will not accept (the message says why)."""


@dataclass(frozen=True)
class ZipLimits:
    max_entries: int = 10_000
    max_total_bytes: int = 1 << 30
    max_ratio: int = 200


@dataclass(frozen=True)
class ZipSummary:
    entries: int
    total_bytes: int
    names: tuple[str, ...]


def safe_member_name(name: str) -> str:
    """The entry name if it is a safe relative path, else UnsafeZip."""
    if not name:
        raise UnsafeZip("an entry has an empty name")
    if "\x00" in name:
        raise UnsafeZip(f"entry {name!r} has a NUL byte in its name")
    normalized = name.replace("\\", "/")
    if normalized.startswith("/") or (len(normalized) > 1 and normalized[1] == ":"):
        raise UnsafeZip(f"entry {name!r} has an absolute path")
    if ".." in PurePosixPath(normalized).parts:
        raise UnsafeZip(f"entry {name!r} climbs out of the archive with '..'")
    return normalized


class BufferReader(io.RawIOBase):
    """A read-only, seekable file over a bytes-like buffer, which it does not copy.

    ``io.BytesIO`` copies anything but ``bytes``, such as the memoryview of a received upload.
    """

    def __init__(self, data: bytes | memoryview) -> None:
        super().__init__()
        self._view = memoryview(data).cast("B")
        self._at = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._at

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """As ``io.BytesIO.seek``: ValueError for a negative absolute position, else clamped at 0."""
        if whence == io.SEEK_SET and offset < 0:
            raise ValueError(f"negative seek value {offset}")
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._at, io.SEEK_END: len(self._view)}[whence]
        self._at = max(base + offset, 0)
        return self._at

    def read(self, size: int | None = -1) -> bytes:
        end = len(self._view) if size is None or size < 0 else self._at + size
        chunk = bytes(self._view[self._at : end])
        self._at += len(chunk)
        return chunk

    def readinto(self, buffer: Any) -> int:
        target = memoryview(buffer).cast("B")
        chunk = self._view[self._at : self._at + len(target)]
        target[: len(chunk)] = chunk
        self._at += len(chunk)
        return len(chunk)


def inspect_zip(
    data: bytes | memoryview | BinaryIO, limits: ZipLimits = ZipLimits(), read: Mapping[int, ReadMember] | None = None
) -> ZipSummary:
    """Check ``data`` (the zip, or a file open on it) as described above; UnsafeZip with a
    person-readable reason otherwise. ``read``: members read already as the zip arrived
    (:class:`~orchestration.policies.zipstream.ZipStream`), taken where they agree with the
    central directory instead of being read again."""
    try:
        archive = zipfile.ZipFile(data if hasattr(data, "read") else BufferReader(data))  # type: ignore[arg-type]
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, ValueError, OSError) as error:
        # NotImplementedError: a zip version past what zipfile reads
        raise UnsafeZip(f"not a valid zip archive ({error})") from error
    with archive:
        infos = archive.infolist()
        if len(infos) > limits.max_entries:
            raise UnsafeZip(f"too many entries ({len(infos)} > {limits.max_entries})")
        sizes = _sizes_read(archive, infos, read) if read else {}
        total = 0
        names = []
        for info in infos:
            name = safe_member_name(info.filename)
            mode = info.external_attr >> 16
            if mode and stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
                kind = "a symlink" if stat.S_ISLNK(mode) else "a special file"
                raise UnsafeZip(f"entry {name!r} is {kind}; only files and folders are allowed")
            if info.flag_bits & 0x1:
                raise UnsafeZip(f"entry {name!r} is encrypted")
            if info.file_size > limits.max_ratio * max(info.compress_size, 1) and info.file_size > 1 << 20:
                raise UnsafeZip(f"entry {name!r} expands {info.file_size // max(info.compress_size, 1)}× (zip bomb?)")
            total += _measured_size(archive, info, limits.max_total_bytes - total, sizes.get(id(info)))
            names.append(name)
        return ZipSummary(entries=len(infos), total_bytes=total, names=tuple(names))


def _sizes_read(
    archive: zipfile.ZipFile, infos: list[zipfile.ZipInfo], read: Mapping[int, ReadMember]
) -> dict[int, int]:
    """{id(info): size} for each central directory entry whose member was read as the zip
    arrived, in agreement with every field ``ZipFile.open`` reads it by: at the same offset, the
    same name, method, sizes and CRC-32, readable (no flag ZipFile refuses), and overlapping
    nothing (one entry per offset, its data ending before the next entry's or the directory)."""
    starts = sorted({info.header_offset for info in infos} | {archive.start_dir})
    at_offset = collections.Counter(info.header_offset for info in infos)
    sizes = {}
    for info in infos:
        member = read.get(info.header_offset)
        if (
            member is not None
            and at_offset[info.header_offset] == 1
            and member.end <= _next(starts, info.header_offset)
            and not info.flag_bits & UNFOLLOWED_FLAGS
            and (member.name, member.method, member.compress_size, member.size, member.crc)
            == (info.orig_filename, info.compress_type, info.compress_size, info.file_size, info.CRC)
        ):
            sizes[id(info)] = member.size
    return sizes


def _next(starts: list[int], offset: int) -> int:
    """The first of ``starts`` past ``offset``; -1 when there is none."""
    following = bisect.bisect_right(starts, offset)
    return starts[following] if following < len(starts) else -1


def _measured_size(archive: zipfile.ZipFile, info: zipfile.ZipInfo, budget: int, read: int | None = None) -> int:
    if info.is_dir():
        return 0
    if info.file_size > budget:
        raise UnsafeZip("the archive expands past the size limit (zip bomb?)")
    if read is not None:  # read in full as the zip arrived, exactly as below
        return read
    size = 0
    try:
        with archive.open(info) as member:
            while chunk := member.read(1 << 20):
                size += len(chunk)
                if size > budget or size > info.file_size:
                    raise UnsafeZip("the archive expands past the size it declares (zip bomb?)")
    except UnsafeZip:
        raise
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, NotImplementedError, RuntimeError, ValueError) as error:
        # ValueError: a central directory pointing before the archive's start ("negative seek value")
        raise UnsafeZip(f"entry {info.filename!r} cannot be read ({error})") from error
    return size
