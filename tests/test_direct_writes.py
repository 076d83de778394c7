"""Large zips written past the page cache (orchestration/direct_writes.py): only the head and the
tail cached, every byte in order whatever the pieces, the flag set only past the drop size and
only when asked for, a file system's refusal taken in place, and the copy into the aligned
buffer exact."""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestration.direct_writes import DirectWrites, copy_released
from orchestration.storage import DROP_CACHED_BYTES, TaskStorage
from tests.test_staging import PIECE, lanes_alive, staged_files


def pages_cached(path: Path) -> int:
    """How many of the file's pages are in the page cache: mincore(2) over a private mapping of
    the file, which touches none of them."""
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    vector = (ctypes.c_ubyte * pages)()
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_COPY) as mapping:
        start = ctypes.c_char.from_buffer(mapping)
        try:
            if libc.mincore(ctypes.addressof(start), size, vector) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
        finally:
            del start  # the mapping closes only once nothing points into it
    return sum(v & 1 for v in vector)


def direct_writes_refused(folder: Path) -> bool:
    probe = folder / "probe"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
    except OSError:
        return True
    finally:
        os.close(fd)
        probe.unlink()
    return False


def test_direct_writes_leave_only_the_head_and_the_tail_in_the_page_cache(tmp_path: Path) -> None:
    if direct_writes_refused(tmp_path):
        pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT: nothing to see")
    head, body, tail = os.urandom(3000), os.urandom(4 * PIECE), os.urandom(5000)
    path = tmp_path / "file"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.write(fd, head)
        writer = DirectWrites(fd, len(head))
        writer.write(body)
        writer.write(tail)
        writer.finish()
        os.fsync(fd)
    finally:
        os.close(fd)
    pages, cached = -(-path.stat().st_size // mmap.PAGESIZE), pages_cached(path)
    assert cached <= 2, f"{cached} of {pages} pages cached"  # the head's and the tail's
    assert path.read_bytes() == head + body + tail

    written = tmp_path / "written"
    written.write_bytes(head + body + tail)  # the same bytes through the page cache: all of them cached
    assert pages_cached(written) == pages


def open_flags(path_prefix: str) -> int | None:
    """The flags of this process's descriptor open on a file whose path starts with ``path_prefix``."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(path_prefix):
                fields = Path(f"/proc/self/fdinfo/{fd}").read_text().split()
                return int(fields[fields.index("flags:") + 1], 8)
        except (FileNotFoundError, ValueError):
            continue
    return None


@pytest.mark.skipif(not Path("/proc/self/fdinfo").exists(), reason="reads the descriptor's flags in /proc")
@pytest.mark.parametrize("direct", [True, False])
def test_a_file_past_the_drop_size_is_written_direct_unless_turned_off(tmp_path: Path, direct: bool) -> None:
    """The staged file's own descriptor, read in /proc while the stream waits: O_DIRECT once the
    file passes DROP_CACHED_BYTES (TASK_STORAGE_DIRECT_WRITES), never with it off; and before."""
    if direct and direct_writes_refused(tmp_path):
        pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT")
    prefix = str(tmp_path / ".task.zip.")
    seen: dict[str, int | None] = {}

    def written_at_least(size: int) -> int | None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            staged = staged_files(tmp_path)
            if staged and staged[0].stat().st_size >= size:
                return open_flags(prefix)
            time.sleep(0.01)
        raise AssertionError(f"the staged file never reached {size} bytes")

    def pieces() -> Iterator[bytes]:
        for n in range(DROP_CACHED_BYTES // PIECE + 4):
            if n == 4:
                seen["before"] = written_at_least(3 * PIECE)
            yield os.urandom(PIECE)
        seen["past"] = written_at_least(DROP_CACHED_BYTES + 2 * PIECE)
        yield os.urandom(100)

    staged, size, _ = TaskStorage(tmp_path, direct_writes=direct).stage_pieces(tmp_path / "task.zip", pieces())
    assert size == DROP_CACHED_BYTES + 4 * PIECE + 100 == staged.stat().st_size
    assert seen["before"] is not None and not seen["before"] & os.O_DIRECT
    assert seen["past"] is not None and bool(seen["past"] & os.O_DIRECT) == direct
    assert lanes_alive() == []


@pytest.mark.parametrize("head", [0, 3100])
def test_direct_writes_keep_every_byte_in_order_and_end_with_the_flag_cleared(tmp_path: Path, head: int) -> None:
    path = tmp_path / "file"
    first = os.urandom(head)
    pieces = [os.urandom(n) for n in (10, 4096, 700_000, 1 << 20, 3 * (1 << 20) + 1, 1, 4095)]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.write(fd, first)
        writer = DirectWrites(fd, head)
        for piece in pieces:
            writer.write(piece)
        writer.finish()
        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
    finally:
        os.close(fd)
    assert path.read_bytes() == first + b"".join(pieces)


def test_direct_writes_take_views_into_larger_messages(tmp_path: Path) -> None:
    """The pieces of a streamed upload are views into the messages grpcio received (api/upload_wire.py),
    each at an odd offset of its message."""
    path = tmp_path / "file"
    messages = [os.urandom(n) for n in (1_100_003, 2_000_001, 5_000)]
    pieces = [memoryview(message)[7 : len(message) - 3] for message in messages]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        writer = DirectWrites(fd, 0)
        for piece in pieces:
            writer.write(piece)
        writer.finish()
    finally:
        os.close(fd)
    assert path.read_bytes() == b"".join(message[7:-3] for message in messages)


def test_the_copy_into_the_aligned_buffer_copies_exactly_the_view() -> None:
    target = mmap.mmap(-1, 1 << 16)
    anchor = ctypes.c_char.from_buffer(target)
    try:
        source = os.urandom(40_000)
        copy_released(ctypes.addressof(anchor) + 5, memoryview(source)[100:30_100])
        assert target[:5] == bytes(5) and target[5:30_005] == source[100:30_100] and target[30_005:] == bytes(35_531)
        copy_released(ctypes.addressof(anchor), source[:10])
        assert target[:10] == source[:10]
        with pytest.raises(BufferError):  # every other byte: no contiguous block to copy
            copy_released(ctypes.addressof(anchor), memoryview(source)[::2])
    finally:
        del anchor
        target.close()


@pytest.mark.parametrize("head", [0, 1])
def test_direct_writes_the_file_system_refuses_go_through_the_page_cache(tmp_path: Path, head: int) -> None:
    """Blocks of 1,000 bytes: O_DIRECT is set, and the kernel refuses the first direct write (its
    size, or with a head its offset, is no multiple of the device's sectors) with EINVAL; that
    block and the rest are written through the page cache, in their place."""
    if direct_writes_refused(tmp_path):
        pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT already at fcntl")
    path = tmp_path / "file"
    first = os.urandom(head)
    pieces = [os.urandom(n) for n in (2_500_000, 999, 1_000_001)]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.write(fd, first)
        writer = DirectWrites(fd, head, align=1000, buffer=1_000_000)
        writer.write(pieces[0])
        assert writer.buffer is None and not writer.direct  # refused, and the buffer given back
        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
        for piece in pieces[1:]:
            writer.write(piece)
        writer.finish()
    finally:
        os.close(fd)
    assert path.read_bytes() == first + b"".join(pieces)
