"""Run the pool's processes (gRPC server, Celery worker, beat, ...) as one unit for ``hivemind-pool up``.

Each child runs in its own process group so that stopping it also stops whatever it forked (Celery's
pool processes), and so that a Ctrl-C in the terminal reaches only us: we then stop the children in
an orderly way, SIGTERM first and SIGKILL for whatever is still there after the timeout. Their
output is merged into ours, one line at a time, prefixed with the child's name.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from types import FrameType
from typing import TextIO

from pool import priority

READY_LINE = "HiveMind Node Pool is ready"


@dataclass(frozen=True)
class Child:
    """A command to run; it counts as ready once a line of its output matches ``ready_pattern``."""

    name: str
    argv: list[str]
    ready_pattern: str | None = None
    nice: int = 0  # steps below the supervisor's CPU priority (pool.priority)


class Supervisor:
    """Starts children, relays their output, announces readiness, and stops them all together.

    ``env`` is the children's whole environment (pass ``{**os.environ, ...}`` to extend ours).
    """

    def __init__(self, children: list[Child], env: dict[str, str], *, out: TextIO = sys.stdout) -> None:
        self._children = children
        self._env = env
        self._out = out
        width = max((len(child.name) for child in children), default=0) + 2
        self._prefixes = {child.name: f"[{child.name}]".ljust(width) + " " for child in children}
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._readers: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._pending = {child.name for child in children if child.ready_pattern is not None}
        self._ready = threading.Event()
        self._wake = threading.Event()  # A child's output ended or a stop signal arrived.
        self._ready_message = ""
        self._started = False
        self._stop_signal: int | None = None

    @property
    def pids(self) -> dict[str, int]:
        """Process id (and process group id) of each started child, by name."""
        return {name: process.pid for name, process in self._processes.items()}

    def start(self, ready_message: str = "") -> None:
        """Start every child; ``ready_message`` is appended to the ready line once all are ready.

        Raises OSError (after stopping the children already started) if a command cannot be run.
        """
        self._ready_message = ready_message
        try:
            for child in self._children:
                process = subprocess.Popen(
                    child.argv,
                    env=self._env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                self._processes[child.name] = process
                problem = priority.lower(process.pid, child.nice)
                if problem:
                    self._print(f"{child.name} kept a higher CPU priority than asked: {problem}")
                reader = threading.Thread(target=self._relay, args=(child, process), daemon=True)
                reader.start()
                self._readers.append(reader)
        except BaseException:
            self.stop()
            raise
        with self._lock:
            self._started = True
            self._announce_if_ready()

    def wait_ready(self, timeout: float) -> bool:
        """True once every child with a ready pattern has matched; False on timeout or if a child exited."""
        deadline = time.monotonic() + timeout
        while not self._ready.wait(min(0.1, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline or self._exited() is not None:
                return False
        return True

    def run_until_signal(self) -> int:
        """Block until SIGINT/SIGTERM or until a child exits, then stop all children.

        Returns 0 when stopped by a signal, else the exit code of the child that exited (1 if that
        code was 0 or a signal). Must be called from the main thread (Python's rule for signals).
        """
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while self._stop_signal is None:
                exited = self._exited()
                if exited is not None:
                    name, code = exited
                    self._print(f"{name} exited unexpectedly with code {code}; stopping the others")
                    return code if code > 0 else 1
                self._wake.wait(0.5)
                self._wake.clear()
            self._print(f"received {signal.Signals(self._stop_signal).name}; stopping")
            return 0
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every child's process group, SIGKILL the groups after ``timeout`` seconds in total.

        Safe to call more than once. Children are reaped; their output is relayed to the end.
        """
        for process in self._processes.values():
            if process.poll() is None:
                self._signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in self._processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(max(0.0, deadline - time.monotonic()))
        # Also for groups whose leader is gone: forked helpers may have outlived it.
        for process in self._processes.values():
            self._signal_group(process, signal.SIGKILL)
            process.wait()
        for reader in self._readers:
            reader.join(timeout=1.0)

    def _relay(self, child: Child, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        pattern = re.compile(child.ready_pattern) if child.ready_pattern is not None else None
        with process.stdout:
            for raw in iter(process.stdout.readline, b""):
                line = raw.decode(errors="replace").rstrip("\r\n")
                with self._lock:
                    self._write(self._prefixes[child.name] + line)
                    if pattern is not None and child.name in self._pending and pattern.search(line):
                        self._pending.discard(child.name)
                        self._announce_if_ready()
        self._wake.set()

    def _announce_if_ready(self) -> None:
        # Called with the lock held, so the ready line is printed exactly once.
        if self._started and not self._pending and not self._ready.is_set():
            self._write(f"{READY_LINE}: {self._ready_message}" if self._ready_message else READY_LINE)
            self._ready.set()

    def _exited(self) -> tuple[str, int] | None:
        for name, process in self._processes.items():
            code = process.poll()
            if code is not None:
                return name, code
        return None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stop_signal = signum
        self._wake.set()

    def _print(self, message: str) -> None:
        with self._lock:
            self._write(f"[supervisor] {message}")

    def _write(self, line: str) -> None:
        self._out.write(line + "\n")
        self._out.flush()

    @staticmethod
    def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
