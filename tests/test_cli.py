"""The `hivemind` CLI end to end: a real pool (gRPC server, Celery worker), a real worker node on
loopback, and the CLI invoked through its typer app exactly as the console script runs it."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import zipfile
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner, Result

from cli.main import app
from protos import nodepool_pb2 as pb
from tests.harness import PoolHarness, bearer, unique_name
from tests.scripted_worker import Script, ScriptedWorker
from tests.tasks_support import FAST

PASSWORD = "a-long-enough-password"
Hivemind = Callable[..., Result]


@pytest.fixture
def config_home(tmp_path: Path) -> Path:
    return tmp_path / "config"


@pytest.fixture
def cli_pool(make_pool: Callable[..., PoolHarness], sqlite_url: str, celery_worker_for) -> PoolHarness:  # type: ignore[no-untyped-def]
    # 1 CPT a second, so even a short task visibly costs something
    pool = make_pool(database_url=sqlite_url, **{**FAST, "MAX_TASK_MINUTES": 1, "PRICE_BASE": 60_000})
    celery_worker_for(pool, wait_ready=False)
    return pool


@pytest.fixture
def hivemind(config_home: Path, tmp_path: Path) -> Hivemind:
    """Run ``hivemind ARGS`` against a pool (address via HIVEMIND_POOL), with its own config dir."""

    def run(pool: PoolHarness | str, *args: str) -> Result:
        address = pool if isinstance(pool, str) else pool.address
        env = {"XDG_CONFIG_HOME": str(config_home), "HIVEMIND_POOL": address, "COLUMNS": "200"}
        return CliRunner().invoke(app, list(args), env=env)

    return run


def project(root: Path) -> Path:
    (root / "pkg").mkdir(parents=True)
    (root / "main.py").write_text("print(6 * 7)\n")
    (root / "pkg" / "util.py").write_text("X = 1\n")
    for junk in (".git/config", "__pycache__/main.cpython-311.pyc", ".venv/lib/site.py", "pkg/__pycache__/u.pyc"):
        (root / junk).parent.mkdir(parents=True, exist_ok=True)
        (root / junk).write_text("junk")
    return root


def test_a_user_runs_a_task_from_a_folder_to_its_result(
    cli_pool: PoolHarness, workers: list, hivemind: Hivemind, config_home: Path, tmp_path: Path
) -> None:
    pool = cli_pool
    worker = ScriptedWorker(pool, script=Script(run_seconds=1.5))
    workers.append(worker)
    name = unique_name("cli")

    assert hivemind(pool, "register", name, "--password", PASSWORD).exit_code == 0
    taken = hivemind(pool, "register", name, "--password", PASSWORD)
    assert taken.exit_code == 1 and taken.stderr.startswith("error: ") and len(taken.stderr.splitlines()) == 1

    wrong = hivemind(pool, "login", name, "--password", "not-the-password")
    assert wrong.exit_code == 2 and "invalid username or password" in wrong.stderr
    not_yet = hivemind(pool, "balance")
    assert not_yet.exit_code == 2 and "not logged in" in not_yet.stderr and "hivemind login" in not_yet.stderr

    logged_in = hivemind(pool, "login", name, "--password", PASSWORD)
    assert logged_in.exit_code == 0, logged_in.output
    credentials = config_home / "hivemind" / "credentials.json"
    assert stat.S_IMODE(credentials.stat().st_mode) == 0o600
    assert stat.S_IMODE(credentials.parent.stat().st_mode) == 0o700
    token = json.loads(credentials.read_text())["pools"][pool.address]["token"]
    assert token and token not in logged_in.output

    before = json.loads(hivemind(pool, "--json", "balance").stdout)["balance"]
    assert before == pool.settings.INITIAL_BALANCE

    submitted = hivemind(pool, "--json", "submit", str(project(tmp_path / "job")), "--memory-gb", "1")
    assert submitted.exit_code == 0, submitted.output
    task_id = json.loads(submitted.stdout)["task_id"]
    assert task_id.startswith("job-") and json.loads(submitted.stdout)["files"] == 2

    watched = hivemind(pool, "status", task_id, "--watch", "--interval", "0.2")
    assert watched.exit_code == 0, watched.output
    assert "COMPLETED" in watched.stdout.splitlines()[-2]  # the last change, then where to look next

    logs = hivemind(pool, "logs", task_id)
    assert logs.exit_code == 0 and "hello from the node" in logs.stdout and "low disk" in logs.stdout
    as_json = json.loads(hivemind(pool, "--json", "logs", task_id).stdout)
    assert as_json["output"] == list(worker.script.lines) and as_json["status"] == "COMPLETED"

    saved = tmp_path / "out" / "result.zip"
    saved.parent.mkdir()
    fetched = hivemind(pool, "result", task_id, "-o", str(saved))
    assert fetched.exit_code == 0, fetched.output
    assert saved.read_bytes() == worker.script.result

    after = json.loads(hivemind(pool, "--json", "balance").stdout)["balance"]
    assert after < before and after == pool.balance(token)
    listed = json.loads(hivemind(pool, "--json", "tasks").stdout)
    assert [(t["task_id"], t["status"], t["node"]) for t in listed] == [(task_id, "COMPLETED", worker.node_id)]
    assert worker.node_id in hivemind(pool, "nodes").stdout
    assert "not waiting for a node" in hivemind(pool, "why", task_id).stdout
    history = json.loads(hivemind(pool, "--json", "history", task_id).stdout)["transitions"]
    assert [(h["from"], h["to"], h["attempt"]) for h in history] == [
        ("", "PENDING", 0),
        ("PENDING", "ASSIGNED", 1),
        ("ASSIGNED", "RUNNING", 1),
        ("RUNNING", "COMPLETED", 1),
    ]
    assert history[1]["node"] == worker.node_id and history[0]["reason"] == "uploaded"
    shown = hivemind(pool, "history", task_id)
    assert shown.exit_code == 0 and "uploaded" in shown.stdout and "COMPLETED" in shown.stdout, shown.output
    followed = hivemind(pool, "logs", task_id, "--follow", "--interval", "0.2")  # ended: prints and returns
    assert followed.exit_code == 0 and "hello from the node" in followed.stdout, followed.output

    missing = hivemind(pool, "status", "no-such-task")
    assert missing.exit_code == 1 and missing.stderr == "error: no task 'no-such-task'\n"
    assert hivemind(pool, "result", "no-such-task").exit_code == 1

    assert hivemind(pool, "logout").exit_code == 0
    assert hivemind(pool, "balance").exit_code == 2


def test_why_a_task_waits_stop_and_transfer(
    make_pool: Callable[..., PoolHarness], sqlite_url: str, workers: list, hivemind: Hivemind, tmp_path: Path
) -> None:
    pool = make_pool(database_url=sqlite_url)  # no Celery worker: nothing but the RPCs moves the task
    workers.append(ScriptedWorker(pool, memory_gb=16))
    name, friend = pool.register(), pool.register()
    assert hivemind(pool, "login", name, "--password", "correct-horse-battery").exit_code == 0
    archive = tmp_path / "task.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("main.py", "print('hi')\n")
        handle.writestr("data.bin", os.urandom(3 << 20), zipfile.ZIP_STORED)  # several UploadTaskStream pieces

    submitted = hivemind(pool, "submit", str(archive), "--memory-gb", "32", "--task-id", "big-one")
    assert submitted.exit_code == 0, submitted.output
    assert pool.ctx.lifecycle.storage.task_zip("big-one").read_bytes() == archive.read_bytes()
    why = hivemind(pool, "why", "big-one")
    assert why.exit_code == 0 and "no online node has memory_gb ≥ 32" in why.stdout
    assert json.loads(hivemind(pool, "--json", "why", "big-one").stdout)["filters"]["memory_gb"] == 1
    stopped = hivemind(pool, "stop", "big-one")
    assert stopped.exit_code == 0 and "stopped" in stopped.stdout
    assert hivemind(pool, "status", "big-one", "--watch").exit_code == 1  # it ended, but not COMPLETED

    start = hivemind(pool, "--json", "balance")
    balance = json.loads(start.stdout)["balance"]
    for _ in range(2):  # the same key twice: paid once
        sent = hivemind(pool, "transfer", friend, "25", "--key", "gift-1")
        assert sent.exit_code == 0, sent.output
    assert json.loads(hivemind(pool, "--json", "balance").stdout)["balance"] == balance - 25
    broke = hivemind(pool, "transfer", friend, str(10**9))
    assert broke.exit_code == 1 and "insufficient balance" in broke.stderr
    not_zip = tmp_path / "notes.txt"
    not_zip.write_text("hello")
    assert hivemind(pool, "submit", str(not_zip)).exit_code == 2


def test_an_unreachable_pool_exits_3_through_the_console_script(dead_port: int, tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("hivemind")
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path), "HIVEMIND_POOL": f"127.0.0.1:{dead_port}"}
    ran = subprocess.run(
        [str(script), "login", "someone", "--password", PASSWORD], env=env, capture_output=True, text=True, timeout=60
    )
    assert ran.returncode == 3, ran.stderr
    assert ran.stderr == (
        f"error: cannot reach the pool at 127.0.0.1:{dead_port}: is it running? "
        "(set --pool HOST:PORT or HIVEMIND_POOL)\n"
    )
    usage = subprocess.run([str(script), "transfer", "bob", "-5"], env=env, capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2


def test_operator_view_of_a_pending_task_through_the_cli(make_pool, sqlite_url: str, hivemind: Hivemind) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool(database_url=sqlite_url, OPERATORS=["boss"])
    _, owner = pool.new_user()
    reply = pool.master.UploadTask(
        pb.UploadTaskRequest(task_id="theirs", task_zip=_zip(), memory_gb=1), metadata=bearer(owner)
    )
    assert reply.success, reply.message
    pool.register("boss")
    assert hivemind(pool, "login", "boss", "--password", "correct-horse-battery").exit_code == 0
    why = json.loads(hivemind(pool, "--json", "why", "theirs").stdout)
    assert why == {
        "task_id": "theirs",
        "status": "PENDING",
        "reason": "no node is registered",
        "filters": dict.fromkeys(
            ["offline", "trust", "cpu_score", "memory_gb", "gpu_score", "gpu_memory_gb", "gpu_name", "task_cap"], 0
        ),
    }


def _zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as handle:
        handle.writestr("main.py", "print(1)\n")
    return buffer.getvalue()


class OlderPool(grpc.GenericRpcHandler):
    """A pool of a version without UploadTaskStream: forwards every other call to ``channel``."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.asked: list[str] = []

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method  # type: ignore[attr-defined]
        self.asked.append(method.rsplit("/", 1)[-1])
        if method.endswith("/UploadTaskStream"):
            return None
        forward = self.channel.unary_unary(method)  # bytes in, bytes out

        def call(request: bytes, context: grpc.ServicerContext) -> bytes:
            auth = [(k, v) for k, v in context.invocation_metadata() if k == "authorization"]
            return forward(request, metadata=auth, timeout=30)  # type: ignore[no-any-return]

        return grpc.unary_unary_rpc_method_handler(call)


def test_submit_to_a_pool_without_streamed_uploads_sends_one_message(
    make_pool: Callable[..., PoolHarness], sqlite_url: str, hivemind: Hivemind, tmp_path: Path
) -> None:
    pool = make_pool(database_url=sqlite_url)
    older = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    proxy = OlderPool(pool.channel)
    older.add_generic_rpc_handlers((proxy,))
    port = older.add_insecure_port("127.0.0.1:0")
    older.start()
    try:
        address = f"127.0.0.1:{port}"
        name = pool.register()
        assert hivemind(address, "login", name, "--password", "correct-horse-battery").exit_code == 0
        archive = tmp_path / "task.zip"
        with zipfile.ZipFile(archive, "w") as handle:
            handle.writestr("main.py", "print('hi')\n")
            handle.writestr("data.bin", os.urandom(3 << 20), zipfile.ZIP_STORED)
        submitted = hivemind(address, "submit", str(archive), "--task-id", "from-an-older-pool")
        assert submitted.exit_code == 0, submitted.output
        assert pool.ctx.lifecycle.storage.task_zip("from-an-older-pool").read_bytes() == archive.read_bytes()
        assert proxy.asked == ["Login", "UploadTaskStream", "UploadTask"], proxy.asked
    finally:
        older.stop(0)
