"""Helpers for task tests: zips, uploads, waiting for a status."""

from __future__ import annotations

import io
import time
import uuid
import zipfile

import grpc

from orchestration import dispatcher
from protos import nodepool_pb2 as pb
from tests.harness import PoolHarness, bearer

FAST = dict(
    NODE_HEARTBEAT_TIMEOUT=2.0,
    STALE_ASSIGNED_SECONDS=2.0,
    DISPATCH_BACKOFF_SECONDS=0.1,
    DISPATCH_BACKOFF_MAX=0.5,
    DISPATCH_TIMEOUT=5.0,
    MAX_TASK_ATTEMPTS=3,
    MAX_TASK_MINUTES=10,
)
ZIP_DATE = (2026, 1, 1, 0, 0, 0)
KICK_EVERY = 0.2  # seconds between the recovery sweeps wait_status(kick=True) runs


def task_zip(files: dict[str, str] | None = None) -> bytes:
    """A zip of ``files``, the same bytes whenever it is built (its entries' dates are fixed: dated
    by the clock, two zips of the same files built on either side of a two-second step differ)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, text in (files or {"main.py": "print('hello')\n", "input.txt": "6 7\n"}).items():
            archive.writestr(zipfile.ZipInfo(name, date_time=ZIP_DATE), text, zipfile.ZIP_DEFLATED)
    return buffer.getvalue()


def upload(pool: PoolHarness, token: str, task_id: str | None = None, **fields: object) -> str:
    task_id = task_id or f"t-{uuid.uuid4().hex[:12]}"
    request = pb.UploadTaskRequest(
        task_id=task_id,
        task_zip=fields.pop("task_zip", task_zip()),  # type: ignore[arg-type]
        cpu_score=100,
        memory_gb=1,
        location="Any",
        gpu_name="Any",
    )
    for key, value in fields.items():
        setattr(request, key, value)
    reply = pool.master.UploadTask(request, metadata=bearer(token))
    assert reply.success, reply.message
    return task_id


def poll(pool: PoolHarness, token: str, task_id: str) -> pb.PollTaskStatusResponse:
    return pool.master.PollTaskStatus(pb.PollTaskStatusRequest(task_id=task_id), metadata=bearer(token))


def wait_status(
    pool: PoolHarness, token: str, task_id: str, wanted: set[str] | str, timeout: float = 30, kick: bool = False
) -> pb.PollTaskStatusResponse:
    """Poll until the task reaches one of ``wanted``; with ``kick``, run the recovery sweeps meanwhile
    (as beat would, but every few tenths of a second)."""
    wanted = {wanted} if isinstance(wanted, str) else wanted
    deadline = time.monotonic() + timeout
    last, kicked = None, 0.0
    while time.monotonic() < deadline:
        last = poll(pool, token, task_id)
        if last.status in wanted:
            return last
        if kick and time.monotonic() - kicked >= KICK_EVERY:
            sweep(pool)
            kicked = time.monotonic()
        time.sleep(0.05)
    raise AssertionError(f"task {task_id} stayed {last.status if last else '?'}: {last.message if last else ''}")


def sweep(pool: PoolHarness) -> None:
    """What beat would do: expire silent nodes, reclaim, re-drive lost work."""
    app = pool.ctx.jobs.app
    for name in ("pool.maintenance.expire_heartbeats", "pool.maintenance.recover_tasks"):
        app.send_task(name).get(timeout=30)


def code_of(call, *args, **kwargs) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    try:
        call(*args, **kwargs)
    except grpc.RpcError as error:
        return error.code()  # type: ignore[no-any-return]
    raise AssertionError("the call succeeded")


def dispatch_now(pool: PoolHarness, task_id: str, attempt: int = 1) -> dispatcher.Outcome:
    """Send a placed task to its node from this process, as the dispatch job does; its outcome."""
    return dispatcher.execute(
        pool.ctx.db,
        pool.ctx.lifecycle.storage,
        pool.ctx.signer,
        dispatcher.Channels(1 << 20),
        pool.settings,
        task_id,
        attempt,
    )
