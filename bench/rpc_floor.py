"""What the pipeline's gRPC calls cost: how many a task takes (:func:`rpc_counts`, from the pool
server's own counters; :class:`Calls`), and what a bare call costs this machine, CPU per unary
call, client and server together (:func:`cpu_per_call`).

The pipeline's tasks each take several calls (the upload, the node's reports, ExecuteTask, a
share of the fleet's heartbeats). This measures the CPU one such call costs with nothing behind
it: the bare echo server (:mod:`bench.echo_server`, the pool's server options) answering
ReportStatus, called by a client in its own process at a fixed rate (open loop, the way the
pipeline's calls arrive rather than as fast as possible: grpcio's cost per call falls as the
rate rises). Both processes' CPU is read from the kernel over the run.

Run alone: ``python -m bench.rpc_floor [RATE] [SECONDS]``.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil

from bench.common import REPO, Figure, free_port, pool_env, process, scratch, wait_serving
from protos import nodepool_pb2 as pb
from protos import nodepool_pb2_grpc as pb_grpc

TOKEN = "x" * 160  # about the size of a node's bearer token


async def _paced(target: str, rate: float, seconds: float) -> int:
    """ReportStatus at ``rate`` calls/s for ``seconds``; how many were answered."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.NodeManagerServiceStub(channel)
        request = pb.ReportStatusRequest(node_id="floor", status_message="Idle")
        metadata = (("authorization", f"Bearer {TOKEN}"),)
        await stub.ReportStatus(request, metadata=metadata, timeout=10)
        answered = 0
        calls: set[asyncio.Task[None]] = set()

        async def one() -> None:
            nonlocal answered
            await stub.ReportStatus(request, metadata=metadata, timeout=10)
            answered += 1

        start = time.monotonic()
        for i in range(int(rate * seconds)):
            call = asyncio.create_task(one())
            calls.add(call)
            call.add_done_callback(calls.discard)
            ahead = start + (i + 1) / rate - time.monotonic()
            if ahead > 0.002:
                await asyncio.sleep(ahead)
        if calls:
            await asyncio.wait(set(calls))
        return answered


def cpu_per_call(rate: float, seconds: float = 4.0) -> float:
    """Microseconds of CPU (client and server processes) per bare unary call at ``rate`` calls/s."""
    with scratch("hm-bench-floor-") as work:
        return _cpu_per_call(work, rate, seconds)


def _cpu_per_call(work: Path, rate: float, seconds: float) -> float:
    port = free_port()
    env = pool_env(work, "redis://127.0.0.1:1/0")  # the echo server reads its options only
    with process([sys.executable, "-m", "bench.echo_server", str(port)], env, work / "echo.log") as echo:
        wait_serving(port, echo, work / "echo.log")
        server = psutil.Process(echo.pid)
        before = sum(server.cpu_times()[:2])
        client = subprocess.run(
            [sys.executable, "-m", "bench.rpc_floor", "--client", f"127.0.0.1:{port}", str(rate), str(seconds)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        served = sum(server.cpu_times()[:2]) - before
    client_cpu, answered = (float(v) for v in client.stdout.split())
    return 1e6 * (served + client_cpu) / answered


def rpc_counts(metrics_ports: Sequence[int]) -> dict[str, float]:
    """Calls answered so far by the pool's gRPC server processes, by method (their Prometheus endpoints)."""
    counts: dict[str, float] = {}
    for port in metrics_ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
            text = reply.read().decode()
        found = re.findall(r'^hivemind_rpc_duration_seconds_count\{method="(\w+)"\} (\S+)$', text, re.MULTILINE)
        for method, count in found:
            counts[method] = counts.get(method, 0.0) + float(count)
    return counts


@dataclass(frozen=True)
class Calls:
    """The gRPC calls a task took in the burst rounds, and what bare calls cost the machine."""

    per_task: dict[str, float]  # by method, as the pool's server counted them, plus ExecuteTask (one a task)
    bare_us: Figure  # CPU per bare unary call, client and server (bench.rpc_floor), at the burst's call rate
    call_rate: float  # calls/s the pool's server answered during the burst rounds

    @property
    def total(self) -> float:
        return sum(self.per_task.values())

    def floor_ms(self) -> float:
        """CPU per task of its calls alone, were each as cheap as a bare one."""
        return self.total * self.bare_us.median / 1000


def _client(target: str, rate: float, seconds: float) -> None:
    start = os.times()
    answered = asyncio.run(_paced(target, rate, seconds))
    end = os.times()
    print(end.user - start.user + end.system - start.system, answered)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--client"]:
        _client(sys.argv[2], float(sys.argv[3]), float(sys.argv[4]))
    else:
        rate = float(sys.argv[1]) if len(sys.argv) > 1 else 1000.0
        seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 4.0
        print(f"{cpu_per_call(rate, seconds):.0f} µs of CPU per call at {rate:g}/s")
