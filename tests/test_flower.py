"""Flower, as operators run it (`celery -A orchestration flower`), against a real pool's broker and worker."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestration.app import QUEUES
from pool.settings import Settings
from pool.up import FLOWER_CONFIG, children
from tests.harness import REPO, PoolHarness

AUTH = ("ops", "flower-secret")


class Flower:
    def __init__(self, pool: PoolHarness, port: int, log_path: Path) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        env = {**os.environ, **pool.env, "FLOWER_BASIC_AUTH": ":".join(AUTH), "PYTHONUNBUFFERED": "1"}
        argv = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "orchestration",
            "flower",
            f"--port={port}",
            "--address=127.0.0.1",
        ]
        argv.append(f"--conf={FLOWER_CONFIG}")  # as `hivemind-pool up --flower` and compose run it
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def get(self, path: str, *, auth: tuple[str, str] | None = AUTH) -> Any:
        request = urllib.request.Request(self.base + path)
        if auth:
            request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
        with urllib.request.urlopen(request, timeout=10) as reply:
            body = reply.read().decode()
        return json.loads(body) if body.lstrip().startswith(("{", "[")) else body

    def until(self, path: str, test: Callable[[Any], bool], timeout: float = 30) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"flower exited:\n{self.log_path.read_text()}")
            try:
                last = self.get(path)
                if test(last):
                    return last
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.1)
        raise AssertionError(f"{path} never satisfied the test; last answer {last!r}\n{self.log_path.read_text()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=5)


@pytest.fixture
def flower_for(tmp_path: Path, unused_port: int) -> Iterator[Callable[[PoolHarness], Flower]]:
    started: list[Flower] = []

    def start(pool: PoolHarness) -> Flower:
        flower = Flower(pool, unused_port, tmp_path / "flower.log")
        started.append(flower)
        return flower

    yield start
    for flower in started:
        flower.stop()


def test_flower_shows_our_queues_a_worker_and_a_finished_job(
    make_pool: Callable[..., PoolHarness], sqlite_url: str, celery_worker_for, flower_for
) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool(database_url=sqlite_url)
    flower = flower_for(pool)
    worker = celery_worker_for(pool, wait_ready=False)  # it starts while Flower does

    # Flower gathers a worker's entry from several broadcast inspections, each with its own
    # timeout: on a busy machine the entry can come before its queues do, so wait for those.
    def with_queues(found: dict) -> bool:  # type: ignore[type-arg]
        return any(worker.name in name and "active_queues" in info for name, info in found.items())

    workers = flower.until("/api/workers?refresh=1", with_queues)
    (info,) = [info for name, info in workers.items() if worker.name in name]
    assert {queue["name"] for queue in info["active_queues"]} == set(QUEUES)
    lengths = flower.get("/api/queues/length")
    assert {queue["name"] for queue in lengths["active_queues"]} == set(QUEUES)

    job = pool.ctx.jobs.app.send_task("pool.maintenance.audit_ledger")
    assert job.get(timeout=30)["ok"] is True
    tasks = flower.until("/api/tasks", lambda found: found.get(job.id, {}).get("state") == "SUCCESS")
    seen = tasks[job.id]
    assert seen["name"] == "pool.maintenance.audit_ledger" and worker.name in seen["worker"]
    assert "minted" in seen["result"]

    archive = pool.ctx.jobs.app.send_task("pool.archival.archive", args=("no-such-task", 2))
    assert archive.get(timeout=30) == "unknown"
    flower.until("/api/tasks", lambda found: found.get(archive.id, {}).get("state") == "SUCCESS")
    table = flower.get(
        "/tasks/datatable?draw=1&start=0&length=50&search%5Bvalue%5D=&order%5B0%5D%5Bcolumn%5D=0"
        "&columns%5B0%5D%5Bdata%5D=received&order%5B0%5D%5Bdir%5D=desc"
    )
    shown = {row["uuid"]: row for row in table["data"]}
    assert shown[archive.id]["args"] == "task_id='no-such-task', attempt=2"  # named, by deploy/flowerconfig.py
    assert shown[archive.id]["name"] == "pool.archival.archive"

    with pytest.raises(urllib.error.HTTPError) as refused:
        flower.get("/api/workers", auth=None)
    assert refused.value.code == 401
    with pytest.raises(urllib.error.HTTPError) as wrong:
        flower.get("/", auth=("ops", "guess"))
    assert wrong.value.code == 401


def test_up_runs_flower_with_our_config_and_only_locally_without_auth(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, DATA_DIR=tmp_path)  # type: ignore[call-arg]
    (flower,) = [c for c in children(settings, flower=True, flower_port=5599, concurrency=1) if c.name == "flower"]
    assert flower.argv[-4:] == ["flower", "--port=5599", "--address=127.0.0.1", f"--conf={FLOWER_CONFIG}"]
    guarded = settings.model_copy(update={"FLOWER_BASIC_AUTH": "ops:secret"})
    (flower,) = [c for c in children(guarded, flower=True, flower_port=5599, concurrency=1) if c.name == "flower"]
    assert "--address=127.0.0.1" not in flower.argv and not any("secret" in arg for arg in flower.argv)
