"""Staging a zip in pieces: large pieces are written and hashed on two lanes of their own while the
caller receives the next ones; whatever fails, the staged file is removed and no lane is left."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash

from models.errors import Cancelled, TooLarge
from orchestration.storage import BACKGROUND_HASH_BYTES, DROP_CACHED_BYTES, Lane, TaskStorage

REPO = Path(__file__).resolve().parent.parent
PIECE = BACKGROUND_HASH_BYTES


def lanes_alive() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("storage-")]


def staged_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(".task.zip.")]


def test_small_and_large_pieces_in_any_order_are_written_and_hashed_in_order(tmp_path: Path) -> None:
    small = [os.urandom(100), os.urandom(3000)]
    large = [os.urandom(PIECE + n) for n in range(12)]  # more than a lane holds waiting
    pieces: list[bytes | memoryview] = [*small, *large, os.urandom(7), memoryview(os.urandom(PIECE * 2))[5:]]
    data = b"".join(bytes(p) for p in pieces)

    staged, size, digest = TaskStorage(tmp_path).stage_pieces(tmp_path / "task.zip", iter(pieces), digest=True)

    assert staged.read_bytes() == data
    assert (size, digest) == (len(data), "xxh3-128:" + xxhash.xxh3_128(data).hexdigest())
    assert lanes_alive() == []


def test_the_check_sees_the_whole_file(tmp_path: Path) -> None:
    data = os.urandom(PIECE * 3)
    seen: list[bytes] = []
    staged, _, _ = TaskStorage(tmp_path).stage_pieces(
        tmp_path / "task.zip",
        (data[i : i + PIECE] for i in range(0, len(data), PIECE)),
        check=lambda p: seen.append(p.read_bytes()),
    )
    assert seen == [data] and staged.read_bytes() == data


@pytest.mark.parametrize("failure", [TooLarge, Cancelled, ValueError])
def test_a_stream_that_fails_after_large_pieces_leaves_no_file_and_no_lane(tmp_path: Path, failure: type) -> None:
    def pieces() -> Iterator[bytes]:
        for _ in range(10):
            yield os.urandom(PIECE)
        if failure is not TooLarge:
            raise failure("the stream broke off")
        yield os.urandom(PIECE)

    with pytest.raises(failure):
        TaskStorage(tmp_path).stage_pieces(tmp_path / "task.zip", pieces(), limit=10 * PIECE, digest=True)
    assert staged_files(tmp_path) == []
    assert lanes_alive() == []


def test_a_check_that_refuses_leaves_no_file_and_no_lane(tmp_path: Path) -> None:
    def refuse(path: Path) -> None:
        raise ValueError("no zip")

    with pytest.raises(ValueError, match="no zip"):
        TaskStorage(tmp_path).stage_pieces(
            tmp_path / "task.zip", (os.urandom(PIECE) for _ in range(4)), digest=True, check=refuse
        )
    assert staged_files(tmp_path) == []
    assert lanes_alive() == []


WRITE_FAILS = """
import os, resource, signal, sys
from pathlib import Path
from orchestration.storage import BACKGROUND_HASH_BYTES as PIECE, TaskStorage
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails with EFBIG instead
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
folder = Path(sys.argv[1])
try:
    pieces = (os.urandom(PIECE) for _ in range(limit // PIECE + 5))
    TaskStorage(folder).stage_pieces(folder / "task.zip", pieces, digest=True)
except OSError as error:
    print("raised", error.errno, sorted(p.name for p in folder.iterdir()))
"""


@pytest.mark.parametrize("limit", [3 * PIECE, DROP_CACHED_BYTES + 3 * PIECE], ids=["cached", "direct"])
def test_a_write_that_fails_on_its_lane_is_raised_to_the_caller_and_the_file_removed(
    tmp_path: Path, limit: int
) -> None:
    """A real failing write: the file size limit (RLIMIT_FSIZE) of a child process, reached by a
    write through the page cache, or past it (the file grows direct past DROP_CACHED_BYTES)."""
    child = subprocess.run(
        [sys.executable, "-c", WRITE_FAILS, str(tmp_path), str(limit)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.split() == ["raised", "27", "[]"]  # EFBIG, nothing left in the folder


def test_a_lane_runs_its_jobs_in_order_and_raises_the_first_failure_then_skips_the_rest() -> None:
    done: list[int] = []
    lane = Lane("storage-test", depth=2)
    for n in range(20):
        lane.put(functools.partial(done.append, n))
    lane.finish()
    assert done == list(range(20))

    failing = Lane("storage-test", depth=2)
    failing.put(lambda: done.append(100))
    failing.put(lambda: 1 / 0)
    failing.put(lambda: done.append(101))  # skipped: a job before it failed
    with pytest.raises(ZeroDivisionError):
        failing.finish()
    assert done[-1] == 100
    assert lanes_alive() == []


def test_an_abandoned_lane_skips_what_waits_and_ends() -> None:
    started, release = threading.Event(), threading.Event()
    ran: list[int] = []
    lane = Lane("storage-test", depth=4)

    def hold() -> None:
        started.set()
        release.wait(10)

    lane.put(hold)
    started.wait(10)
    for n in range(4):
        lane.put(functools.partial(ran.append, n))
    threading.Timer(0.2, release.set).start()
    lane.abandon()
    assert ran == [] and lanes_alive() == []
