"""How a task ended, in words its owner can act on ("killed: memory limit 512 MB exceeded")."""

from __future__ import annotations

import re
import signal
from collections.abc import Sequence
from dataclasses import dataclass

MEMORY_SIGNS = re.compile(r"MemoryError|Cannot allocate memory|std::bad_alloc|out of memory", re.IGNORECASE)
FORK_SIGNS = re.compile(r"fork: retry|Resource temporarily unavailable|BlockingIOError|can't start new thread")
STOPPED = "stopped by the pool"
SHUTTING_DOWN = "agent shutting down"


@dataclass(frozen=True)
class Outcome:
    """The end of one task: what the node reports in FinishTask (or TaskCompleted)."""

    success: bool
    reason: str  # "completed", or why it failed
    result_zip: bytes = b""
    exit_code: int | None = None


def duration_text(seconds: float) -> str:
    """``600`` → ``10 min``, ``6`` → ``6 s``, ``90`` → ``1.5 min``."""
    if seconds < 60:
        return f"{seconds:g} s"
    return f"{seconds / 60:g} min"


def wall_clock_reason(seconds: float) -> str:
    return f"killed: wall-clock limit {duration_text(seconds)}"


def memory_reason(memory_mb: int) -> str:
    return f"killed: memory limit {memory_mb} MB exceeded"


def process_reason(nproc: int) -> str:
    return f"killed: process limit {nproc} reached (fork bomb?)"


def explain_exit(
    returncode: int,
    *,
    killed_for: str | None,
    tail: Sequence[str],
    memory_mb: int,
    nproc: int,
    cpu_seconds: int,
    file_size_mb: int,
    docker: bool = False,
) -> tuple[bool, str]:
    """(success, reason) for a process that exited with ``returncode`` (negative: a signal).

    ``killed_for`` is the agent's own reason when it killed the task (stop, limits); it wins.
    ``tail`` (the last output lines) turns a bare "exit code 1" into "memory limit … exceeded"
    when the task died of a failed allocation or fork under its rlimits.
    """
    if killed_for:
        return False, killed_for
    if returncode == 0:
        return True, "completed"
    text = "\n".join(tail[-20:])
    if returncode < 0:
        signum = -returncode
        if signum == signal.SIGXCPU:
            return False, f"killed: CPU time limit {cpu_seconds} s exceeded"
        if signum == signal.SIGXFSZ:
            return False, f"killed: file size limit {file_size_mb} MB exceeded"
        return False, f"killed by signal {_signal_name(signum)}"
    if docker and returncode == 137:
        return False, f"exit code 137 (killed; likely the memory limit {memory_mb} MB)"
    if MEMORY_SIGNS.search(text):
        return False, f"memory limit {memory_mb} MB exceeded (exit code {returncode})"
    if FORK_SIGNS.search(text):
        return False, f"process limit {nproc} reached (exit code {returncode})"
    return False, f"exit code {returncode}"


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)
