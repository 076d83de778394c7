"""Shared pieces of the benchmarks: servers in their own processes, rounds, statistics, the report."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from protos import nodepool_pb2 as pb
from protos import nodepool_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parent.parent
SECRET = "bench-secret-bench-secret-bench-secret-0123456789"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive ports that are free now (a replica's port is the first + N)."""
    while True:
        first = free_port()
        try:
            with contextlib.ExitStack() as stack:
                for port in range(first + 1, first + count):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue


@dataclass(frozen=True)
class Figure:
    """One measured quantity over rounds: median and spread."""

    name: str
    unit: str
    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> str:
        return f"{min(self.samples):.4g}–{max(self.samples):.4g}"


@dataclass(frozen=True)
class Comparison:
    """Ours against the raw baseline of the same run; ``higher_is_better`` for rates."""

    title: str
    ours: Figure
    raw: Figure
    target: str
    higher_is_better: bool = True

    @property
    def ratio(self) -> float:
        """ours / raw; NaN when the baseline's median is zero (a memory growth can be), which no
        ratio target meets."""
        return self.ours.median / self.raw.median if self.raw.median else math.nan

    def row(self) -> str:
        ratio = "–" if math.isnan(self.ratio) else f"{self.ratio:.2f}×"
        return (
            f"| {self.title} | {self.ours.median:.4g} {self.ours.unit} ({self.ours.spread}) | "
            f"{self.raw.median:.4g} {self.raw.unit} ({self.raw.spread}) | {ratio} | {self.target} |"
        )


def pool_env(data_dir: Path, redis_url: str, **extra: object) -> dict[str, str]:
    env = {
        **os.environ,
        "DATA_DIR": str(data_dir),
        "REDIS_URL": redis_url,
        "JWT_SECRET_KEY": SECRET,
        "BCRYPT_ROUNDS": "4",
        "REGISTRATIONS_PER_PEER_PER_MINUTE": "1000000",
        "GRPC_SERVER_HOST": "127.0.0.1",
        "LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
    }
    env.update({key: str(value) for key, value in extra.items()})
    return env


@contextmanager
def process(argv: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A child process in its own group, stopped (and its group killed) on exit."""
    with log.open("wb") as out:
        child = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield child
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGTERM)
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()


def wait_serving(port: int, child: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.NodeManagerServiceStub(channel)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()[-2000:]}")
        try:
            stub.HealthCheck(pb.HealthCheckRequest(), timeout=1)
            channel.close()
            return
        except grpc.RpcError:
            time.sleep(0.2)
    raise RuntimeError(f"server not serving after {timeout}s:\n{log.read_text()[-2000:]}")


def machine() -> dict[str, str]:
    import celery
    import sqlalchemy

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": f"{cpu} × {os.cpu_count()}",
        "memory": f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
        "python": sys.version.split()[0],
        "grpcio": grpc.__version__,
        "celery": celery.__version__,
        "sqlalchemy": sqlalchemy.__version__,
        "os": platform.platform(),
    }


@contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A new folder for a benchmark's files (its databases, logs, zips), removed afterwards. Kept,
    and named on stderr, when the benchmark fails or the environment sets BENCH_KEEP=1."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield work
    except BaseException:
        print(f"the benchmark's files are kept in {work}", file=sys.stderr)
        raise
    if os.environ.get("BENCH_KEEP"):
        print(f"the benchmark's files are kept in {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
