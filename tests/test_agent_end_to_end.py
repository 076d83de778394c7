"""The reference agent (`hivemind-agent run`, a real process) against the real pool and Celery.

The agent runs tasks as sandboxed subprocesses here (no Docker engine on this machine; the Docker
path is covered up to the engine call in test_agent_docker.py).
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from protos import nodepool_pb2 as pb
from tests.agent_fixtures import work_dir  # noqa: F401  (fixture)
from tests.harness import REPO, PoolHarness, bearer
from tests.tasks_support import FAST, upload, wait_status

MAIN = """\
import os, time
a, b = open("input.txt").read().split()
for i in range(3):
    print("line", i, flush=True)
os.makedirs("output", exist_ok=True)
with open("output/product.txt", "w") as f:
    f.write(str(int(a) * int(b)))
print("done")
"""
SPAWNER = """\
import subprocess, time
for _ in range(3):
    subprocess.Popen(["sleep", "300"])
print("children started", flush=True)
time.sleep(300)
"""
HOG = "data = []\nwhile True:\n    data.append(bytearray(32 * 1024 * 1024))\n"


def zipped(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return buffer.getvalue()


@pytest.fixture
def agent_pool(  # type: ignore[no-untyped-def]
    make_pool,
    sqlite_url: str,
    celery_worker_for,
    in_background,
    unused_port: int,
    tmp_path: Path,
    work_dir: Path,  # noqa: F811
):
    pool: PoolHarness = make_pool(
        database_url=sqlite_url, **{**FAST, "DISPATCH_TIMEOUT": 20.0, "NODE_HEARTBEAT_TIMEOUT": 60.0}
    )
    celery_worker_for(pool)  # up before the agent starts: the agent's CPU benchmark needs the cores to itself
    owner, _ = pool.new_user()
    log_path = tmp_path / "agent.log"
    agent = start_agent(pool.address, owner, unused_port, work_dir, log_path)
    # The agent's node is low tier without Docker: vouch for the submitter so it may use it.
    from orchestration.credit import set_credit

    submitter, submitter_token = pool.new_user()
    set_credit(pool.ctx.db, pool.settings, submitter, 100, "test submitter")
    yield pool, submitter_token, agent, log_path
    stop_agent(agent, in_background)


def start_agent(pool: str, owner: str, port: int, work: Path, log_path: Path, *options: str) -> subprocess.Popen[bytes]:
    """`hivemind-agent run` for ``owner``'s node (subprocesses, no Docker) against ``pool``, with
    ``options`` besides, its output in ``log_path``; once it says it serves."""
    env = {**os.environ, "HIVEMIND_PASSWORD": "correct-horse-battery", "PYTHONUNBUFFERED": "1"}
    argv = [
        *(sys.executable, "-m", "agent", "run", "--pool", pool, "--username", owner, *options),
        *("--port", str(port), "--bind", "127.0.0.1", "--docker", "never"),
        *("--work-dir", str(work), "--task-memory-mb", "256"),
    ]
    with log_path.open("wb") as log:
        agent = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while "serving on port" not in log_path.read_text() and time.monotonic() < deadline:
        assert agent.poll() is None, log_path.read_text()
        time.sleep(0.05)
    assert "serving on port" in log_path.read_text(), log_path.read_text()
    return agent


def stop_agent(agent: subprocess.Popen[bytes], in_background: Callable[[Callable[[], object]], None]) -> None:
    """SIGTERM, then its wait (a SIGKILL after 20 s) left to ``in_background``."""
    if agent.poll() is None:
        agent.send_signal(signal.SIGTERM)
        in_background(lambda: _wait_or_kill(agent))


def _wait_or_kill(agent: subprocess.Popen[bytes]) -> None:
    try:
        agent.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(agent.pid, signal.SIGKILL)
        agent.wait(timeout=10)


def test_task_runs_on_the_agent_and_its_output_comes_back(agent_pool) -> None:
    pool, token, _, log = agent_pool
    task_id = upload(pool, token, task_zip=zipped({"main.py": MAIN, "input.txt": "6 7"}))
    done = wait_status(pool, token, task_id, {"COMPLETED", "FAILED"}, timeout=90)
    assert done.status == "COMPLETED", (done.message, log.read_text()[-3000:])
    assert "line 0" in done.output and "done" in done.output
    result = pool.master.GetTaskResult(pb.GetTaskResultRequest(task_id=task_id), metadata=bearer(token)).result_zip
    with zipfile.ZipFile(io.BytesIO(result)) as archive:
        names = archive.namelist()
        product = [n for n in names if n.endswith("product.txt")]
        assert product and archive.read(product[0]) == b"42"


def test_stop_kills_the_task_and_its_children(agent_pool) -> None:
    pool, token, agent, _ = agent_pool
    since = time.time()
    task_id = upload(pool, token, task_zip=zipped({"main.py": SPAWNER}))
    deadline = time.monotonic() + 60
    while "children started" not in wait_status(pool, token, task_id, "RUNNING", timeout=60).output:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    sleepers = [
        p
        for p in psutil.process_iter(["cmdline", "create_time"])  # this task's, not other tests'
        if p.info["cmdline"] == ["sleep", "300"] and p.info["create_time"] >= since - 1
    ]
    assert len(sleepers) >= 3
    assert pool.master.StopTask(pb.StopTaskRequest(task_id=task_id), metadata=bearer(token)).success
    wait_status(pool, token, task_id, "STOPPED", timeout=30)
    deadline = time.monotonic() + 15
    alive = sleepers
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in sleepers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == []
    assert agent.poll() is None


def test_memory_hog_fails_with_a_reason_and_the_agent_stays_up(agent_pool) -> None:
    pool, token, agent, _ = agent_pool
    task_id = upload(pool, token, task_zip=zipped({"main.py": HOG}))
    failed = wait_status(pool, token, task_id, {"FAILED", "COMPLETED"}, timeout=90)
    assert failed.status == "FAILED" and "memory" in failed.message, failed.message
    assert agent.poll() is None
