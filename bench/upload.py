"""UploadTask of a 100 MiB task zip: seconds for the call and the server's peak RSS growth.

Baseline: the bare grpcio server of ``bench.echo_server`` (same server options) receiving the
same bytes. Both servers run in their own processes and are driven in alternating rounds by the
same client, which sends the request pre-serialized so that both pay the same client-side cost.

Peak RSS growth of a round is the server's ``VmHWM`` after the call minus its ``VmRSS`` before,
the high-water mark having been reset to the current RSS (``echo 5 > /proc/PID/clear_refs``)
just before the call.

The pool keeps what it receives, durably, before it answers; the bare server keeps nothing. So
each streamed round also times the disk alone writing the same bytes durably into the pool's
data folder (:func:`disk_seconds`): the floor under the pool's streamed upload, which the bare
stream does not have. Run: ``python -m bench.upload``.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import grpc

from bench.common import Comparison, Figure, free_port, pool_env, process, scratch, wait_serving
from cli.client import UPLOAD_PIECE as PIECE  # bytes per UploadTaskStream message, as the CLI sends them
from orchestration.direct_writes import DirectWrites
from protos import nodepool_pb2 as pb
from protos import nodepool_pb2_grpc as pb_grpc

METHOD = "/nodepool.MasterNodeService/UploadTask"
STREAM_METHOD = "/nodepool.MasterNodeService/UploadTaskStream"
MiB = 1 << 20
PAYLOAD = 100 * MiB
LIMIT = PAYLOAD + 16 * MiB  # room for the zip's headers and the message's other fields
USER, PASSWORD = "uploader", "bench-password"


def task_zip(size: int = PAYLOAD, members: int = 4) -> bytes:
    """A stored (uncompressed) zip: a main script and ``size`` bytes of random data in ``members`` files."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("main.py", "import os\nprint(sum(f.stat().st_size for f in os.scandir('data')))\n")
        for i in range(members):
            archive.writestr(f"data/part{i}.bin", os.urandom(size // members))
    return buffer.getvalue()


def disk_seconds(folder: Path, data: bytes, piece: int = PIECE) -> float:
    """Seconds to write ``data`` to a new file in ``folder`` and fsync it, ``piece`` bytes at a
    time, as the pool writes a large zip past the page cache (:class:`DirectWrites`: direct writes
    from an aligned buffer where the file system allows them), the copy into that buffer included;
    the file is removed."""
    path = folder / f".disk-{time.monotonic_ns()}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        started = time.perf_counter()
        writer = DirectWrites(fd, 0)
        for at in range(0, len(data), piece):
            writer.write(memoryview(data)[at : at + piece])
        writer.finish()
        os.fsync(fd)
        return time.perf_counter() - started
    finally:
        os.close(fd)
        path.unlink()


def memory_kib(pid: int, field: str) -> int:
    """``VmRSS``, ``VmHWM``… of process ``pid`` in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


def reset_peak(pid: int) -> None:
    """Set the process's RSS high-water mark (VmHWM) to its current RSS (Linux ≥ 4.0)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def check_peak_reset(pid: int) -> None:
    """Refuse to report figures if this kernel does not reset VmHWM as asked."""
    reset_peak(pid)
    if memory_kib(pid, "VmHWM") > memory_kib(pid, "VmRSS") + 4096:
        raise RuntimeError("writing 5 to /proc/PID/clear_refs did not reset VmHWM; peak RSS cannot be measured")


def login(target: str) -> str:
    with grpc.insecure_channel(target) as channel:
        users = pb_grpc.UserServiceStub(channel)
        users.Register(pb.RegisterRequest(username=USER, password=PASSWORD), timeout=30)
        reply = users.Login(pb.LoginRequest(username=USER, password=PASSWORD), timeout=30)
    if not reply.success:
        raise RuntimeError(f"cannot log in to the pool: {reply.message}")
    return str(reply.token)


class Uploader:
    """Sends pre-serialized UploadTask requests (a fresh task id each time) to one server; with
    ``pieces``, the same zip as UploadTaskStream messages of that many bytes each."""

    def __init__(self, target: str, pid: int, data: bytes, token: str, *, pieces: int = 0) -> None:
        options = [("grpc.max_send_message_length", LIMIT), ("grpc.max_receive_message_length", LIMIT)]
        self.channel = grpc.insecure_channel(target, options=options)
        if pieces:
            self.call = self.channel.stream_unary(
                STREAM_METHOD, request_serializer=None, response_deserializer=pb.UploadTaskResponse.FromString
            )
            self.body = [
                pb.UploadTaskRequest(task_zip=data[at : at + pieces]).SerializeToString()
                for at in range(0, len(data), pieces)
            ]
        else:
            self.call = self.channel.unary_unary(
                METHOD, request_serializer=None, response_deserializer=pb.UploadTaskResponse.FromString
            )
            self.body = [pb.UploadTaskRequest(task_zip=data).SerializeToString()]
        self.pid, self.metadata, self.sent = pid, [("authorization", f"Bearer {token}")], 0
        self.prefix = "stream" if pieces else "unary"  # every upload a new task: a repeat is answered from the database

    def once(self) -> tuple[float, float]:
        """(seconds for the call, peak RSS growth of the server in MiB)."""
        self.sent += 1
        head = pb.UploadTaskRequest(
            task_id=f"{self.prefix}-{self.sent}", cpu_score=100, memory_gb=1
        ).SerializeToString()
        first = head + self.body[0]  # concatenated messages merge: these fields plus task_zip
        request: bytes | Iterator[bytes] = first if len(self.body) == 1 else iter([first, *self.body[1:]])
        before = memory_kib(self.pid, "VmRSS")
        reset_peak(self.pid)
        started = time.perf_counter()
        reply = self.call(request, metadata=self.metadata, timeout=600)
        seconds = time.perf_counter() - started
        growth = (memory_kib(self.pid, "VmHWM") - before) / 1024
        if not reply.success or "already" in reply.message:
            raise RuntimeError(f"upload refused or taken for a repeat: {reply.message}")
        return seconds, growth

    def close(self) -> None:
        self.channel.close()


def run(redis_url: str, *, rounds: int = 15) -> tuple[list[Comparison], Figure]:
    """The four comparisons (unary and streamed: seconds, peak RSS growth), and the disk's own
    seconds for the same bytes (:func:`disk_seconds`), timed in each streamed round."""
    with scratch("hm-bench-upload-") as work:
        return _run(work, redis_url, rounds)


def _run(work: Path, redis_url: str, rounds: int) -> tuple[list[Comparison], Figure]:
    data = task_zip()
    pool_port, echo_port = free_port(), free_port()
    env = pool_env(
        work,
        redis_url,
        GRPC_SERVER_PORT=pool_port,
        GRPC_MAX_MESSAGE_BYTES=LIMIT,
        MAX_FILE_SIZE=LIMIT,
        INITIAL_BALANCE=10**9,
        METRICS_PORT=0,
        REDIS_KEY_PREFIX="hmbench-upload",
        CELERY_KEY_PREFIX="hmbench-upload:",
    )
    with (
        process([sys.executable, "-m", "pool", "serve"], env, work / "pool.log") as pool,
        process([sys.executable, "-m", "bench.echo_server", str(echo_port)], env, work / "echo.log") as echo,
    ):
        wait_serving(pool_port, pool, work / "pool.log")
        wait_serving(echo_port, echo, work / "echo.log")
        check_peak_reset(pool.pid)
        token = login(f"127.0.0.1:{pool_port}")
        comparisons = []
        disk: list[float] = []
        for method, pieces in (("UploadTask", 0), ("UploadTaskStream", PIECE)):
            ours = Uploader(f"127.0.0.1:{pool_port}", pool.pid, data, token, pieces=pieces)
            raw = Uploader(f"127.0.0.1:{echo_port}", echo.pid, data, token, pieces=pieces)
            try:
                ours.once(), raw.once()  # warm-up: first-call allocations, connections
                samples = []
                for _ in range(rounds):
                    samples.append((*ours.once(), *raw.once()))
                    if pieces:
                        disk.append(disk_seconds(work, data))
            finally:
                ours.close()
                raw.close()
            comparisons += compared(method, len(data), pieces, samples)
    return comparisons, Figure("disk", "s", tuple(disk))


def compared(method: str, size: int, pieces: int, samples: list[tuple[float, float, float, float]]) -> list[Comparison]:
    seconds_ours, growth_ours, seconds_raw, growth_raw = (tuple(column) for column in zip(*samples, strict=True))
    what = f"Upload {size / MiB:.0f} MiB ({method}{f', {pieces // MiB} MiB a message' if pieces else ''})"
    return [
        Comparison(
            f"{what}, seconds",
            Figure("pool", "s", seconds_ours),
            Figure("echo", "s", seconds_raw),
            "≤ 1.50×",
            higher_is_better=False,
        ),
        Comparison(
            f"{what}, server peak RSS growth",
            Figure("pool", "MiB", growth_ours),
            Figure("echo", "MiB", growth_raw),
            f"pool ≤ {2 * PAYLOAD // MiB} MiB (2 × payload)",
            higher_is_better=False,
        ),
    ]


if __name__ == "__main__":
    from pool.embedded_redis import EmbeddedRedis

    with tempfile.TemporaryDirectory(prefix="hm-bench-redis-") as folder, EmbeddedRedis(Path(folder)) as redis:
        comparisons, disk = run(redis.url)
        for comparison in comparisons:
            print(comparison.row())
        print(f"the disk alone, the same bytes written durably: {disk.median:.4g} s ({disk.spread})")
