"""A real agent through pool outages: it registers again only when the pool no longer knows it.

The pool takes a registration of a node it knows as a restart of that node and moves the tasks
the node runs to their next attempt. So an agent that merely lost the pool for a while (the pool
restarted, the network dropped) must go on heartbeating and reporting, and its running task must
finish on the attempt it started; only a pool that forgot the node gets it registered again.

The agent is the real one (``agent.node.serve``, what ``hivemind-agent run`` calls) on loopback,
in this process so it can heartbeat every half second; the pool is real, with a Celery worker.
"""

from __future__ import annotations

import functools
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent import session
from agent.node import serve
from api.context import build_context
from api.server import create_server
from models import nodes as node_rows
from models import schema
from models import tasks as task_rows
from orchestration.credit import set_credit
from protos import nodepool_pb2 as pb
from tests.agent_fixtures import TEST_MACHINE, agent_settings, work_dir
from tests.harness import PASSWORD, PoolHarness, bearer, unique_name
from tests.tasks_support import FAST, sweep, task_zip, upload, wait_status

__all__ = ["work_dir"]  # fixture, used by name

pytestmark = pytest.mark.timeout(180)

HEARTBEAT_SECONDS = 0.5
# Longer than one call's retries, as a real pool restart may be: the agent then sees its calls
# fail, not merely delayed. The restart test scales the agent's backoff down by BACKOFF_FACTOR
# (a call's six tries then wait 0.8 to 1.6 s in all, against 8 to 16 s) to keep the outage short.
OUTAGE_SECONDS = 5.0
BACKOFF_FACTOR = 0.05


def sleeper(seconds: int) -> str:
    """A task's main.py: prints "started", sleeps, prints "finished"."""
    return f'import time\nprint("started", flush=True)\ntime.sleep({seconds})\nprint("finished", flush=True)\n'


def held(go: Path, *, at_most: int) -> str:
    """A task's main.py: prints "started", waits until ``go`` exists (``at_most`` seconds at most),
    prints "finished"."""
    return (
        f"import os, time\nprint('started', flush=True)\ndeadline = time.time() + {at_most}\n"
        f"while not os.path.exists({str(go)!r}) and time.time() < deadline:\n    time.sleep(0.1)\n"
        "print('finished', flush=True)\n"
    )


@pytest.fixture
def go() -> Iterator[Path]:
    """Where a test says a held task may finish: in a folder of its own that the task's user (not
    the agent's) may look into, not under pytest's private one."""
    folder = Path(tempfile.mkdtemp(prefix="hm-go-"))
    folder.chmod(0o711)
    yield folder / "go"
    shutil.rmtree(folder, ignore_errors=True)


@dataclass
class Agent:
    node_id: str
    stopping: threading.Event
    thread: threading.Thread


@pytest.fixture
def start_agent(work_dir: Path, unused_port: int) -> Iterator[Callable[[PoolHarness, str], Agent]]:
    """Run a real agent for ``owner`` against a pool until the test ends."""
    started: list[Agent] = []

    def start(pool: PoolHarness, owner: str) -> Agent:
        settings = agent_settings(
            work_dir, pool=pool.address, username=owner, password=PASSWORD, port=unused_port,
            bind="127.0.0.1", docker="never", heartbeat_seconds=HEARTBEAT_SECONDS, usage_seconds=1.0,
        )  # fmt: skip
        stopping = threading.Event()
        thread = threading.Thread(target=serve, args=(settings, TEST_MACHINE, stopping), name="agent", daemon=True)
        thread.start()
        agent = Agent(settings.node_id, stopping, thread)
        started.append(agent)
        wait_for(lambda: heartbeating_since(pool, owner, 0.0), "the agent to register")
        return agent

    yield start
    for agent in started:
        agent.stopping.set()
        agent.thread.join(timeout=60)


@contextmanager
def pool_away(pool: PoolHarness, **fresh: Any) -> Iterator[None]:
    """The pool's gRPC server is down for the block (its database, Redis and Celery worker stay up);
    then a new server answers on the same port, with the same settings except ``fresh``."""
    pool.server.stop(grace=None).wait()
    try:
        yield
    finally:
        pool.ctx.close()
        settings = pool.settings.model_copy(update=fresh)
        ctx = build_context(settings)
        schema.upgrade(ctx.db.engine)
        server, port = create_server(ctx, f"127.0.0.1:{pool.port}")
        server.start()
        assert port == pool.port
        pool.settings, pool.ctx, pool.server = settings, ctx, server


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def listed(pool: PoolHarness, owner: str) -> pb.WorkerNodeInfo | None:
    """The owner's node as the pool lists it, or None when the pool does not know it."""
    reply = pool.nodes.GetNodeList(pb.GetNodeListRequest(), metadata=bearer(pool.login(owner)), timeout=5)
    return next((node for node in reply.nodes if node.node_id == owner), None)


def heartbeating_since(pool: PoolHarness, owner: str, since: float) -> bool:
    """The pool lists the node online, with a heartbeat (or registration) newer than ``since``."""
    node = listed(pool, owner)
    return node is not None and node.status != "offline" and node.last_heartbeat > since


def task_row(pool: PoolHarness, task_id: str) -> task_rows.TaskView:
    with pool.ctx.db.reading() as session:
        found = task_rows.get(session, task_id)
    assert found is not None
    return found


def registrations(caplog: pytest.LogCaptureFixture, node_id: str) -> int:
    """How often the pool logged a registration of ``node_id`` (first, or again)."""
    return sum(
        getattr(r, "event", "") == "node_registered" and getattr(r, "node_id", "") == node_id for r in caplog.records
    )


@pytest.fixture
def agent_pool(make_pool, sqlite_url: str, celery_worker_for) -> tuple[PoolHarness, str, str]:  # type: ignore[no-untyped-def]
    """A pool with a Celery worker, a node owner, and a submitter trusted to use a low-tier node."""
    pool: PoolHarness = make_pool(
        database_url=sqlite_url, **{**FAST, "DISPATCH_TIMEOUT": 20.0, "NODE_HEARTBEAT_TIMEOUT": 60.0}
    )
    celery_worker_for(pool)
    owner = pool.register(unique_name("node"))
    submitter, token = pool.new_user()
    set_credit(pool.ctx.db, pool.settings, submitter, 100, "test submitter")  # the agent's node is low tier
    return pool, owner, token


def test_a_pool_restart_does_not_requeue_the_task_the_agent_is_running(
    agent_pool: tuple[PoolHarness, str, str],
    start_agent,
    go: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level("INFO")
    monkeypatch.setattr(session, "compute_backoff", functools.partial(session.compute_backoff, factor=BACKOFF_FACTOR))
    pool, owner, token = agent_pool
    agent = start_agent(pool, owner)
    task_id = upload(pool, token, task_zip=task_zip({"main.py": held(go, at_most=60)}))
    wait_for(lambda: "started" in wait_status(pool, token, task_id, "RUNNING", timeout=60).output, "the task to start")
    assert task_row(pool, task_id).attempt == 1

    with pool_away(pool):
        time.sleep(OUTAGE_SECONDS)
    back = time.time()
    wait_for(lambda: heartbeating_since(pool, owner, back), "the agent to heartbeat the restarted pool")
    time.sleep(10 * HEARTBEAT_SECONDS)  # long enough for an agent that registers again to have done so

    running = task_row(pool, task_id)
    assert (running.status, running.attempt) == ("RUNNING", 1)
    go.touch()
    done = wait_status(pool, token, task_id, {"COMPLETED", "FAILED"}, timeout=90)
    assert done.status == "COMPLETED", done.message
    assert "finished" in done.output
    assert task_row(pool, task_id).attempt == 1
    assert registrations(caplog, agent.node_id) == 1  # only when the agent started


def test_a_pool_that_forgot_the_node_gets_it_registered_again(
    make_pool, sqlite_url: str, tmp_path: Path, start_agent, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    pool: PoolHarness = make_pool(database_url=sqlite_url)
    owner = pool.register(unique_name("node"))
    backup = tmp_path / "backup.db"  # taken before the node registered: accounts, no nodes
    live = sqlite_url.removeprefix("sqlite:///")
    with closing(sqlite3.connect(live)) as source, closing(sqlite3.connect(backup)) as copy:
        source.backup(copy)
    agent = start_agent(pool, owner)
    assert registrations(caplog, agent.node_id) == 1

    # The pool comes back restored from that backup, its live state (Redis) gone with the rest.
    with pool_away(pool, DATABASE_URL=f"sqlite:///{backup}", REDIS_KEY_PREFIX=unique_name("hmtest")):
        time.sleep(1.0)
    wait_for(lambda: heartbeating_since(pool, owner, 0.0), "the agent to register with the restored pool")
    assert registrations(caplog, agent.node_id) == 2


def test_a_node_expired_during_a_long_outage_comes_back_by_heartbeating(
    agent_pool: tuple[PoolHarness, str, str], start_agent
) -> None:
    pool, owner, token = agent_pool
    start_agent(pool, owner)
    task_id = upload(pool, token, task_zip=task_zip({"main.py": sleeper(3)}))
    wait_for(lambda: "started" in wait_status(pool, token, task_id, "RUNNING", timeout=60).output, "the task to start")

    with pool_away(pool):  # silent for longer than the heartbeat timeout, and the sweep runs meanwhile
        sweep(pool)  # the first sweep of a pool seeds every online node with a fresh heartbeat
        pool.ctx.heartbeats.beat(owner, "Running 1 task", now=time.time() - 3600)
        sweep(pool)
        wait_for(lambda: task_row(pool, task_id).status == "PENDING", "the sweep to requeue the task")
        assert node_in_db(pool, owner) == "offline"
    back = time.time()

    # The pool moved the task on, as it should for a node it lost; the node comes back by itself,
    # and beat's recovery sweep (kicked here) gives the task its next attempt.
    wait_for(lambda: heartbeating_since(pool, owner, back), "the expired node to come back online")
    done = wait_status(pool, token, task_id, {"COMPLETED", "FAILED"}, timeout=90, kick=True)
    assert (done.status, task_row(pool, task_id).attempt) == ("COMPLETED", 2), done.message


def node_in_db(pool: PoolHarness, node_id: str) -> str:
    """The node's status in the pool's database, or "" when it has no such node."""
    with pool.ctx.db.reading() as session:
        record = node_rows.get(session, node_id)
    return record.status if record else ""
