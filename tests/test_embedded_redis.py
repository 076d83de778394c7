"""The embedded Redis: a real redis-server child process on loopback."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from pool.embedded_redis import EmbeddedRedis, EmbeddedRedisError
from tests.processes import gone, wait_gone


def test_serves_redis_on_loopback_until_stopped(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path / "data") as server:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        client.set("greeting", "hello")
        assert client.get("greeting") == b"hello"
        client.close()
        pid, port = server.pid, server.port

    assert gone(pid)
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
    assert (tmp_path / "data" / "redis").is_dir()
    assert server.log_path.is_relative_to(tmp_path / "data")


def test_persists_nothing_and_stop_is_idempotent(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path)
    server.start()
    redis.Redis.from_url(server.url).set("k", "v")
    server.stop()
    server.stop()

    assert not list((tmp_path / "redis").glob("*.rdb"))
    assert not list((tmp_path / "redis").glob("appendonly*"))
    with pytest.raises(EmbeddedRedisError):
        _ = server.url


def test_startup_failure_reports_the_server_log(tmp_path: Path) -> None:
    broken = tmp_path / "broken-redis-server"
    broken.write_text("#!/bin/sh\necho 'FATAL: cannot start for a test reason'\nexit 1\n")
    broken.chmod(0o755)

    with pytest.raises(EmbeddedRedisError, match="cannot start for a test reason"):
        EmbeddedRedis(tmp_path, executable=broken).start()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux only")
def test_server_dies_when_its_parent_is_killed(tmp_path: Path) -> None:
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from pool.embedded_redis import EmbeddedRedis\n"
        "server = EmbeddedRedis(Path(sys.argv[1]))\n"
        "server.start()\n"
        "print(server.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        redis_pid = int(parent.stdout.readline())
        assert not gone(redis_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert wait_gone(redis_pid)
    finally:
        parent.kill()
        parent.wait()
