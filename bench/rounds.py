"""One round of the pipeline benchmark: a burst (or a steady offered load) of tiny tasks uploaded
by several clients, each on its own connection, and when each task reached its node
(ExecuteTask, as the fleet noted it) and COMPLETED (in the pool's database)."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

import grpc
from sqlalchemy import func, select

from bench import stage
from models.tables import Task
from protos import nodepool_pb2 as pb
from protos import nodepool_pb2_grpc as pb_grpc

CLIENTS = 8
IN_FLIGHT_PER_CLIENT = 4


async def _upload(
    target: str, tokens: list[str], task_ids: list[str], payload: bytes, rate: float | None
) -> dict[str, float]:
    """Upload ``task_ids`` from len(tokens) clients, each on its own channel; closed loop with a
    few calls in flight per client, or open loop at ``rate`` per second. When each was accepted."""
    accepted: dict[str, float] = {}
    start = time.monotonic()
    queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
    for i, task_id in enumerate(task_ids):
        queue.put_nowait((i, task_id))

    async def client(token: str) -> None:
        # Each client on its own connection, as separate machines are: a pool of several server
        # processes on one port shares connections between them, not calls.
        async with grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            stub = pb_grpc.MasterNodeServiceStub(channel)
            metadata = (("authorization", f"Bearer {token}"),)

            async def one() -> None:
                while not queue.empty():
                    i, task_id = queue.get_nowait()
                    if rate:
                        await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
                    request = pb.UploadTaskRequest(
                        task_id=task_id, task_zip=payload, cpu_score=100, memory_gb=1, location="Any", gpu_name="Any"
                    )
                    reply = await stub.UploadTask(request, metadata=metadata, timeout=60)
                    if not reply.success:
                        raise RuntimeError(f"upload refused: {reply.message}")
                    accepted[task_id] = time.monotonic()

            await asyncio.gather(*(one() for _ in range(IN_FLIGHT_PER_CLIENT if not rate else 64)))

    await asyncio.gather(*(client(token) for token in tokens))
    return accepted


def completed(engine: object, task_ids: set[str], prefix: str, at_least: int, timeout: float) -> float:
    """When (monotonic) at least ``at_least`` tasks named ``prefix…`` were COMPLETED (polled every 50 ms)."""
    deadline = time.monotonic() + timeout
    query = select(func.count()).select_from(Task).where(Task.task_id.like(f"{prefix}%"), Task.status == "COMPLETED")
    while time.monotonic() < deadline:
        with engine.connect() as conn:  # type: ignore[attr-defined]
            if conn.execute(query).scalar_one() >= at_least:
                return time.monotonic()
        time.sleep(0.05)
    raise RuntimeError(f"only some of {len(task_ids)} tasks completed in {timeout}s")


@dataclass
class Round:
    to_dispatch: float  # tasks/s
    to_completed: float
    p50_ms: float
    p99_ms: float
    upload_rate: float


def pipeline_round(
    target: str, tokens: list[str], fleet: stage.Fleet, engine: object, tasks: int, rate: float | None = None
) -> Round:
    prefix = f"b{uuid.uuid4().hex[:8]}-"
    ids = [f"{prefix}{i:05d}" for i in range(tasks)]
    before = fleet.read().get("received", 0)
    accepted = asyncio.run(_upload(target, tokens, ids, stage.tiny_zip(), rate))
    uploaded = time.monotonic()
    fleet.wait("received", before + tasks, timeout=600)
    done = completed(engine, set(ids), prefix, tasks, timeout=600)
    arrivals = fleet.arrivals()
    first = min(accepted.values())
    last_arrival = max(arrivals[i] for i in ids)
    latencies = [(arrivals[i] - accepted[i]) * 1000 for i in ids]
    return Round(
        tasks / (last_arrival - first),
        tasks / (done - first),
        stage.percentile(latencies, 0.5),
        stage.percentile(latencies, 0.99),
        tasks / (uploaded - first),
    )
