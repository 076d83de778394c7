"""A zip read as it arrives (ZipStream) gives inspect_zip the verdict reading the file gives.

The stream's reading of a member is taken only where it is the reading ZipFile would do; each
case below is judged twice, from the file alone and with what the stream read, and the two
verdicts (the summary, or the refusal's words) must be the same. The cases the stream does
follow must also spare the second reading.
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from collections.abc import Callable, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestration.policies.zips import UnsafeZip, ZipLimits, inspect_zip
from orchestration.policies.zipstream import ReadMember, ZipStream

LIMITS = ZipLimits(max_entries=100, max_total_bytes=8 << 20, max_ratio=200)


class CountingReader(io.BytesIO):
    """A file over the zip that counts the bytes read from it."""

    taken = 0

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        self.taken += len(chunk)
        return chunk


def streamed(data: bytes, piece: int = 4096, limits: ZipLimits = LIMITS) -> dict[int, ReadMember]:
    stream = ZipStream(max_total_bytes=limits.max_total_bytes, max_ratio=limits.max_ratio)
    for at in range(0, len(data), piece):
        stream.feed(memoryview(data)[at : at + piece])
    return stream.members


def verdict(data: bytes, read: dict[int, ReadMember] | None = None, limits: ZipLimits = LIMITS) -> str:
    try:
        return repr(inspect_zip(io.BytesIO(data), limits, read))
    except UnsafeZip as error:
        return f"refused: {error}"


def both(data: bytes, piece: int = 4096) -> tuple[str, str]:
    """(the verdict from the file alone, the verdict with what the stream read)."""
    return verdict(data), verdict(data, streamed(data, piece))


def zip_of(members: Sequence[tuple[str | zipfile.ZipInfo, bytes]], method: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for name, content in members:
            archive.writestr(name, content)
    return buffer.getvalue()


MIXED = [
    ("main.py", b"print('hi')\n"),
    ("data/", b""),
    ("data/empty.bin", b""),
    ("data/random.bin", os.urandom(300_000)),
    ("data/text.txt", b"line of text\n" * 20_000),
    ("data/\u00e9t\u00e9.txt", b"utf-8 name"),
]


@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
@pytest.mark.parametrize("piece", [1, 29, 30, 31, 4096, 1 << 20])
def test_every_member_is_read_as_it_arrives_and_not_again(method: int, piece: int) -> None:
    data = zip_of(MIXED, method)
    read = streamed(data, piece)

    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        infos = archive.infolist()
    assert sorted(read) == sorted(info.header_offset for info in infos)
    assert {m.name: m.size for m in read.values()} == {info.filename: info.file_size for info in infos}
    file = CountingReader(data)
    assert repr(inspect_zip(file, LIMITS, read)) == verdict(data)
    assert file.taken < 4096 + sum(len(name) for name, _ in MIXED) * 4  # the directory and the headers, no data


def test_a_zip_written_to_a_pipe_is_left_to_the_file() -> None:
    class Unseekable(io.RawIOBase):  # zipfile then writes each member's sizes after its data (flag bit 3)
        def __init__(self) -> None:
            self.data = bytearray()

        def writable(self) -> bool:
            return True

        def write(self, b: bytes) -> int:  # type: ignore[override]
            self.data += b
            return len(b)

    sink = Unseekable()
    with zipfile.ZipFile(sink, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in MIXED:
            archive.writestr(name, content)
        with archive.open("streamed.txt", "w") as member:
            member.write(b"written in pieces\n" * 1000)
    data = bytes(sink.data)

    alone, with_stream = both(data)
    assert alone == with_stream and not alone.startswith("refused")
    assert streamed(data) == {}  # where a member's data ends is known only from the directory


def rewrite_local(data: bytes, offset: int, **fields: int) -> bytes:
    """``data`` with fields of the local header at ``offset`` replaced."""
    names = [
        "signature",
        "version",
        "flags",
        "method",
        "time",
        "date",
        "crc",
        "compress_size",
        "size",
        "name_length",
        "extra_length",
    ]
    header = struct.Struct("<4sHHHHHLLLHH")
    values = dict(zip(names, header.unpack_from(data, offset), strict=True))
    values.update(fields)
    return data[:offset] + header.pack(*values.values()) + data[offset + header.size :]


def central_offset(data: bytes, index: int = 0) -> int:
    """Where the ``index``-th central directory entry starts."""
    at = -1
    for _ in range(index + 1):
        at = data.index(b"PK\x01\x02", at + 1)
    return at


def rewrite_central(data: bytes, index: int, **fields: int) -> bytes:
    """``data`` with fields of its ``index``-th central directory entry replaced."""
    layout = {
        "flags": (8, "<H"),
        "method": (10, "<H"),
        "crc": (16, "<L"),
        "compress_size": (20, "<L"),
        "size": (24, "<L"),
        "offset": (42, "<L"),
    }
    out = bytearray(data)
    at = central_offset(data, index)
    for name, value in fields.items():
        position, form = layout[name]
        struct.pack_into(form, out, at + position, value)
    return bytes(out)


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x41]) + data[at + 1 :]


TWO = zip_of([("a.txt", b"alpha " * 500), ("b.bin", os.urandom(5000))])
TWO_DEFLATED = zip_of([("a.txt", b"alpha " * 500), ("b.txt", b"beta " * 5000)], zipfile.ZIP_DEFLATED)
SECOND = TWO.index(b"PK\x03\x04", 1)  # the second local header

with pytest.warns(UserWarning, match="Duplicate name"):
    SAME_NAME = zip_of([("a.txt", b"alpha " * 500), ("a.txt", b"alpha " * 500)])


def trailing_bytes(content: bytes, after: bytes) -> bytes:
    """A zip whose one member is ``content`` deflated, then ``after``, inside its compressed size."""
    packer = zlib.compressobj(wbits=-15)
    data = zip_of([("t.txt", packer.compress(content) + packer.flush() + after)])
    fields = {"method": zipfile.ZIP_DEFLATED, "crc": zlib.crc32(content), "size": len(content)}
    return rewrite_central(rewrite_local(data, 0, **fields), 0, **fields)


HOSTILE: dict[str, Callable[[], bytes]] = {
    "a stored member's data altered (bad CRC)": lambda: flip(TWO, 40),
    "a deflated member's data altered": lambda: flip(TWO_DEFLATED, 60),
    "CRC altered in both headers alike": lambda: rewrite_central(rewrite_local(TWO, 0, crc=1234), 0, crc=1234),
    "the local header's sizes larger than the directory's": lambda: rewrite_local(TWO, 0, compress_size=10, size=10),
    "the directory's sizes smaller than the data": lambda: rewrite_central(TWO, 0, compress_size=100, size=100),
    "the directory's size larger than the data expands to": lambda: rewrite_central(TWO_DEFLATED, 1, size=30_000),
    "the method differs between the headers": lambda: rewrite_local(TWO_DEFLATED, 0, method=0),
    "a name that differs between the headers": lambda: TWO.replace(b"a.txt", b"c.txt", 1),
    "two directory entries for one member": lambda: rewrite_central(SAME_NAME, 1, offset=0),
    "a directory entry pointing into another's data": lambda: rewrite_central(TWO, 1, offset=SECOND - 8),
    "the directory flags a member encrypted": lambda: rewrite_central(TWO, 0, flags=1),
    "the directory flags patch data": lambda: rewrite_central(TWO, 0, flags=0x20),
    "the local header flags a data descriptor": lambda: rewrite_local(TWO, 0, flags=8),
    "a deflated member with bytes after its stream": lambda: trailing_bytes(b"beta " * 5000, b"after the stream"),
    "data before the archive": lambda: b"#!/bin/sh\nexit 0\n" + TWO,
    "a zip bomb": lambda: zip_of([("bomb.txt", b"\0" * (16 << 20))], zipfile.ZIP_DEFLATED),
    "past the total size": lambda: zip_of([("big.bin", b"\0" * ((8 << 20) + 1))], zipfile.ZIP_STORED),
    "truncated": lambda: TWO[:-30],
    "zip64 sizes in the local header": lambda: rewrite_local(TWO, 0, compress_size=0xFFFFFFFF, size=0xFFFFFFFF),
}


@pytest.mark.parametrize("case", HOSTILE, ids=list(HOSTILE))
def test_hostile_zips_get_the_same_verdict(case: str) -> None:
    data = HOSTILE[case]()
    # Byte by byte through every header; an 8 MiB member fed so would take seconds to say the same.
    pieces = (1, 64, 1 << 20) if len(data) <= 1 << 20 else (4093, 1 << 16, 1 << 20)
    for piece in pieces:
        alone, with_stream = both(data, piece)
        assert with_stream == alone


def test_the_cases_compare_refusals_as_well_as_acceptances() -> None:
    refused = {case for case in HOSTILE if verdict(HOSTILE[case]()).startswith("refused")}
    assert refused >= {
        "a stored member's data altered (bad CRC)",
        "a deflated member's data altered",
        "CRC altered in both headers alike",
        "the directory's sizes smaller than the data",
        "a name that differs between the headers",
        "a directory entry pointing into another's data",
        "the directory flags a member encrypted",
        "the directory flags patch data",
        "a zip bomb",
        "past the total size",
        "truncated",
    }


def test_a_bomb_is_not_expanded_past_what_its_header_declares() -> None:
    data = zip_of([("bomb.txt", b"\0" * (4 << 20))], zipfile.ZIP_DEFLATED)
    lying = rewrite_central(rewrite_local(data, 0, size=1000), 0, size=1000)
    stream = ZipStream(max_total_bytes=1 << 30, max_ratio=1 << 30)
    stream.feed(lying)
    assert stream.members == {} and stream._expanded <= 1000 + (1 << 20)
    assert verdict(lying, stream.members, ZipLimits(100, 1 << 30, 1 << 30)).startswith("refused")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    base=st.sampled_from([TWO, TWO_DEFLATED, zip_of(MIXED[:3] + MIXED[5:], zipfile.ZIP_DEFLATED)]),
    changes=st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255)), max_size=4),
    piece=st.sampled_from([1, 7, 100, 4096]),
)
def test_any_bytes_changed_get_the_same_verdict(base: bytes, changes: list[tuple[int, int]], piece: int) -> None:
    data = bytearray(base)
    for at, value in changes:
        data[at % len(data)] = value
    alone, with_stream = both(bytes(data), piece)
    assert with_stream == alone
