"""One round of the pipeline benchmark: a burst (or a steady offered load) of tiny tasks uploaded
by several clients, each on its own connection, and when each task reached its node
(ExecuteTask, as the fleet noted it) and COMPLETED (in the pool's database). A task's latency
is also split at its match: the ASSIGNED event that the matching job wrote for it."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

import grpc
from sqlalchemy import func, select

from bench import stage
from models.tables import Task, TaskEvent
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


def matched_at(engine: object, prefix: str) -> dict[str, float]:
    """When (wall clock, seconds) each task named ``prefix…`` was first ASSIGNED to a node."""
    query = (
        select(Task.task_id, func.min(TaskEvent.at))
        .join(TaskEvent, TaskEvent.task_pk == Task.id)
        .where(Task.task_id.like(f"{prefix}%"), TaskEvent.to_status == "ASSIGNED")
        .group_by(Task.task_id)
    )
    with engine.connect() as conn:  # type: ignore[attr-defined]
        return {task_id: at.timestamp() for task_id, at in conn.execute(query)}


@dataclass(frozen=True)
class Latency:
    """Percentiles of one round's tasks, in ms: upload accepted → ExecuteTask received, and the
    two legs of it: accepted → matched (ASSIGNED), matched → ExecuteTask received."""

    p50_ms: float
    p99_ms: float
    matched_p50_ms: float
    matched_p99_ms: float
    sent_p50_ms: float
    sent_p99_ms: float

    @classmethod
    def of(cls, accepted: dict[str, float], matched: dict[str, float], arrived: dict[str, float]) -> Latency:
        """From monotonic ``accepted`` and ``arrived`` times and wall-clock ``matched`` ones, by task."""
        offset = time.time() - time.monotonic()  # CLOCK_MONOTONIC is one clock for every process here
        total = [(arrived[i] - accepted[i]) * 1000 for i in accepted]
        to_match = [(matched[i] - offset - accepted[i]) * 1000 for i in accepted]
        to_node = [(arrived[i] + offset - matched[i]) * 1000 for i in accepted]
        p = stage.percentile
        return cls(
            p(total, 0.5), p(total, 0.99), p(to_match, 0.5), p(to_match, 0.99), p(to_node, 0.5), p(to_node, 0.99)
        )


@dataclass
class Round:
    to_dispatch: float  # tasks/s
    to_completed: float
    latency: Latency
    upload_rate: float
    cores: dict[str, float]  # cores each process group kept busy while the tasks were offered (with ``cpu``)

    @property
    def p50_ms(self) -> float:
        return self.latency.p50_ms

    @property
    def p99_ms(self) -> float:
        return self.latency.p99_ms


def pipeline_round(
    target: str,
    tokens: list[str],
    fleet: stage.Fleet,
    engine: object,
    tasks: int,
    rate: float | None = None,
    cpu: stage.CpuTimes | None = None,
) -> Round:
    """A round of ``tasks``: a burst, or offered at ``rate`` a second. With ``cpu`` (whose lap it
    takes), the cores each of its groups kept busy from the first upload to the last one accepted,
    and the whole machine's (``machine``)."""
    prefix = f"b{uuid.uuid4().hex[:8]}-"
    ids = [f"{prefix}{i:05d}" for i in range(tasks)]
    before = fleet.read().get("received", 0)
    if cpu is not None:  # each count divided by the time between its own two readings
        cpu.lap_seconds()
        started, machine = time.monotonic(), stage.busy_seconds()
    accepted = asyncio.run(_upload(target, tokens, ids, stage.tiny_zip(), rate))
    uploaded = time.monotonic()
    cores = {}
    if cpu is not None:
        cores["machine"] = (stage.busy_seconds() - machine) / (time.monotonic() - started)
        spent = cpu.lap_seconds()
        window = time.monotonic() - started
        cores.update({name: seconds / window for name, seconds in spent.items()})
    fleet.wait("received", before + tasks, timeout=600)
    done = completed(engine, set(ids), prefix, tasks, timeout=600)
    arrivals = fleet.arrivals()
    first = min(accepted.values())
    last_arrival = max(arrivals[i] for i in ids)
    return Round(
        tasks / (last_arrival - first),
        tasks / (done - first),
        Latency.of(accepted, matched_at(engine, prefix), arrivals),
        tasks / (uploaded - first),
        cores,
    )
