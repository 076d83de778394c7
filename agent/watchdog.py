"""The watchdog: runs one command of a task to its end and makes sure nothing of it survives.

It starts the command (:func:`agent.sandbox.spawn`), hands each output line to a callback,
and every half second samples the task's processes: over the memory limit (summed over all
of them) or at the process limit (a fork bomb) it kills them outright; past the wall-clock
limit, or when the task is stopped, it sends SIGTERM and SIGKILLs what is left two seconds
later. When the command exits by itself, whatever it left running is watched for a moment (a
fork bomb left behind is still a fork bomb) and then killed.
"""

from __future__ import annotations

import collections
import logging
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent import docker, outcome, sandbox

log = logging.getLogger("agent.watchdog")

MAX_LINE = 16 * 1024
SAMPLE_SECONDS = 0.5
TAIL_LINES = 40
LEFT_BEHIND_SECONDS = 3.0  # how long what a command left running is watched for a fork bomb


@dataclass
class Ending:
    """How one command ended: its exit status, and the agent's reason when the agent killed it."""

    returncode: int
    killed_for: str | None
    tail: collections.deque[str]


class Watchdog:
    """Runs the commands of one task in ``cwd``, as ``user``, until ``stop_reason()`` says otherwise."""

    def __init__(self, *, cwd: Path, user: sandbox.TaskUser | None, stop_reason: Callable[[], str | None]) -> None:
        self.cwd = cwd
        self.user = user
        self.stop_reason = stop_reason
        self.usage = (0.0, 0)  # (CPU percent summed over processes, memory bytes), last sample

    def run(
        self,
        argv: list[str],
        env: dict[str, str],
        on_line: Callable[[str], None],
        *,
        timeout: float,
        limits: sandbox.ProcessLimits,
        container: str | None = None,
        timeout_reason: str | None = None,
    ) -> Ending:
        """Run ``argv`` to its end; every process of it is gone on return. Never raises for
        the command's sake: a command that cannot start ends with a reason.

        ``container`` names the Docker container the command runs (the command is then the
        ``docker`` client, started unconfined; stopping it also runs ``docker kill``).
        """
        tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        if self.stop_reason():
            return Ending(-1, self.stop_reason(), tail)
        confined = container is None
        user = self.user if confined else None
        try:
            proc = sandbox.spawn(argv, cwd=self.cwd, env=env, limits=limits if confined else None, user=user)
        except OSError as error:
            return Ending(-1, f"cannot start {argv[0]}: {error}", tail)
        tree = sandbox.ProcessTree(proc.pid, user)
        reader = threading.Thread(target=_read_lines, args=(proc, on_line, tail), daemon=True)
        reader.start()
        killed_for, polite = self._supervise(proc, tree, limits, timeout, timeout_reason, confined)
        if killed_for is None and confined:
            killed_for = _left_behind(tree, limits.nproc)
            polite = killed_for is None
        if container and killed_for:
            subprocess.run(docker.kill_argv(container), capture_output=True, timeout=30, check=False)
        tree.kill(grace=2.0 if polite else 0.0)
        returncode = proc.wait()
        reader.join(timeout=2.0)
        return Ending(returncode, killed_for, tail)

    def _supervise(
        self,
        proc: subprocess.Popen[bytes],
        tree: sandbox.ProcessTree,
        limits: sandbox.ProcessLimits,
        timeout: float,
        timeout_reason: str | None,
        confined: bool,
    ) -> tuple[str | None, bool]:
        """Wait for ``proc``: (why the agent must kill it, or None; whether to ask politely first)."""
        start = time.monotonic()
        next_sample = start
        at_process_limit = 0
        while True:
            try:
                proc.wait(timeout=0.1)
                return None, True
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            reason = self.stop_reason()
            if reason:
                return reason, True
            if now - start > timeout:
                return timeout_reason or outcome.wall_clock_reason(timeout), True
            if now < next_sample:
                continue
            next_sample = now + SAMPLE_SECONDS
            cpu, memory, threads = tree.usage()
            self.usage = (cpu, memory)
            if not confined:
                continue
            at_process_limit = at_process_limit + 1 if threads >= near_limit(limits.nproc) else 0
            if at_process_limit >= 2:
                return outcome.process_reason(limits.nproc), False
            if memory > limits.memory_mb * 1024 * 1024 and not at_process_limit:
                return outcome.memory_reason(limits.memory_mb), False


def near_limit(nproc: int) -> int:
    """The thread count taken as "at the process limit" (samples race with forks and exits)."""
    return nproc - max(1, nproc // 16)


def _left_behind(tree: sandbox.ProcessTree, nproc: int, window: float = LEFT_BEHIND_SECONDS) -> str | None:
    """Watch what the command left running for up to ``window`` seconds: a fork bomb's reason, or None.

    A command that leaves nothing returns at once. The window is long enough for a fork bomb that
    backgrounds itself (``:(){ :|:& };:`` exits 0 at once) to be seen at the process limit on a
    busy machine, where each look at the process tree is slow: with one second it was once taken
    for a task that completed."""
    deadline = time.monotonic() + window
    while time.monotonic() < deadline:
        _, _, threads = tree.usage()
        if threads == 0:
            return None
        if threads >= near_limit(nproc):
            return outcome.process_reason(nproc)
        time.sleep(0.1)
    return None


def _read_lines(proc: subprocess.Popen[bytes], on_line: Callable[[str], None], tail: collections.deque[str]) -> None:
    stdout = proc.stdout
    assert stdout is not None
    for raw in iter(lambda: stdout.readline(MAX_LINE), b""):
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        tail.append(line)
        try:
            on_line(line)
        except Exception:  # a reporting problem must not stop reading (the pipe would fill)
            log.exception("output callback failed")
