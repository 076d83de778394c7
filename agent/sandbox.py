"""Processes of a task: started confined, tracked while they run, and all killed at the end.

A task's processes run in their own session and process group, niced, with rlimits set
before the command is executed (CPU seconds, address space, open files, file size, processes,
no core dumps) by the launcher (:mod:`agent.launch`, which replaces ``preexec_fn``: see there
why), and with a scrubbed environment (nothing of the agent's environment leaks in).

When the agent runs as root, every running task gets its own unprivileged user
(:mod:`agent.taskusers`: a uid with no ``/etc/passwd`` entry, default 43000–43255). Running as
a separate user is what makes ``RLIMIT_NPROC`` work (the kernel counts processes per real uid
and does not enforce the limit for root), keeps tasks from signalling or reading the agent and
each other, and lets the agent find and kill every process of the task, including ones that
left the process group (``setsid``) and were re-parented. The workspace is handed to that user
before the task starts.

As an ordinary user the agent cannot switch users: tasks run as the agent's user, the process
limit is set to the user's current process count plus the task's allowance (approximate), and
escaped processes are found through the descendants the watchdog has seen.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

LAUNCHER = Path(__file__).with_name("launch.py")
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
KILL_BINARY = shutil.which("kill", path=SAFE_PATH)


@dataclass(frozen=True)
class ProcessLimits:
    """rlimits of one task's processes (each process; the watchdog also sums memory over all)."""

    memory_mb: int
    cpu_seconds: int
    nproc: int
    nofile: int
    file_size_mb: int


@dataclass(frozen=True)
class TaskUser:
    uid: int
    gid: int


def hand_over(path: Path, user: TaskUser | None) -> None:
    """Make ``path`` (recursively) belong to ``user``, private to it (0700 at the top)."""
    if user is None:
        return
    for folder, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            os.lchown(os.path.join(folder, name), user.uid, user.gid)
    os.lchown(path, user.uid, user.gid)
    path.chmod(0o700)


def scrubbed_env(home: Path, *, path_dirs: list[str], extra: dict[str, str] | None = None) -> dict[str, str]:
    """A fresh environment: PATH, HOME, LANG and a few harmless variables, plus ``extra``."""
    env = {
        "PATH": ":".join([*path_dirs, SAFE_PATH]),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "TMPDIR": str(home),
        "USER": "hivemind-task",
        "LOGNAME": "hivemind-task",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    env.update(extra or {})
    return env


def user_processes(uid: int) -> list[psutil.Process]:
    """Every process whose real uid is ``uid``."""
    return [p for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real == uid]


def launch_argv(argv: list[str], *, limits: ProcessLimits | None, user: TaskUser | None, nice: int = 10) -> list[str]:
    """``argv`` prefixed with the launcher (:mod:`agent.launch`) that confines it, as the agent's
    interpreter runs it. The process limit of a task running as the agent's own user is the
    user's current process count plus the task's allowance (the kernel counts per user)."""
    rlimits: dict[str, list[int]] = {}
    if limits is not None:
        mb = 1024 * 1024
        nproc = limits.nproc if user is not None else len(user_processes(os.getuid())) + limits.nproc
        rlimits = {
            "RLIMIT_CPU": [limits.cpu_seconds, limits.cpu_seconds + 5],
            "RLIMIT_AS": [limits.memory_mb * mb] * 2,
            "RLIMIT_NOFILE": [limits.nofile] * 2,
            "RLIMIT_FSIZE": [limits.file_size_mb * mb] * 2,
            "RLIMIT_CORE": [0, 0],
            "RLIMIT_NPROC": [nproc, nproc],
        }
    config = {
        "uid": user.uid if user else None,
        "gid": user.gid if user else None,
        "parent": os.getpid(),
        "nice": nice,
        "umask": 0o077 if user else 0o022,
        "rlimits": rlimits,
    }
    return [sys.executable, "-I", "-S", str(LAUNCHER), json.dumps(config), "--", *argv]


def spawn(
    argv: list[str],
    *,
    cwd: Path,
    env: dict[str, str],
    limits: ProcessLimits | None,
    user: TaskUser | None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` through the launcher in a new session, stdout and stderr merged into one pipe.

    ``limits`` None starts it without rlimits (the ``docker`` client). No Python runs between
    ``fork`` and ``exec`` here (``subprocess`` uses ``vfork``); see :mod:`agent.launch`. Raises
    OSError when it cannot be started; a command the launcher cannot run exits with 127.
    """
    return subprocess.Popen(
        launch_argv(argv, limits=limits, user=user, nice=10 if limits else 0),
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        close_fds=True,
    )


def _proportional_memory(proc: psutil.Process) -> int:
    try:
        return int(proc.memory_full_info().pss)
    except (psutil.AccessDenied, AttributeError):
        return int(proc.memory_info().rss)


def kill_user_processes(uid: int, rounds: int = 20) -> int:
    """SIGKILL every process of ``uid`` until none is left; how many there were.

    The signal is sent by ``kill -KILL -1`` running *as* ``uid``: the kernel delivers it to
    all the user's processes in one pass that a fork cannot race (a fork bomb cannot refill
    faster than it is emptied). Without ``kill`` on the PATH, processes are killed one by one.
    """
    killed = 0
    for _ in range(rounds):
        victims = [proc for proc in user_processes(uid) if not _is_zombie(proc)]
        if not victims:
            break
        killed += len(victims)
        if KILL_BINARY:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(
                    launch_argv([KILL_BINARY, "-KILL", "-1"], limits=None, user=TaskUser(uid, uid), nice=0),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    timeout=5,
                    check=False,
                )
        else:
            for proc in victims:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
        psutil.wait_procs(victims, timeout=0.1)
    return killed


def _is_zombie(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True  # gone counts as dead


class ProcessTree:
    """Every process of one task: its process group, the descendants seen so far, its user's."""

    def __init__(self, leader: int, user: TaskUser | None) -> None:
        self.leader = leader
        self.user = user
        self._known: dict[int, psutil.Process] = {}
        self.zombies = 0  # dead but not yet reaped: they still count against RLIMIT_NPROC
        self.refresh()

    def refresh(self) -> list[psutil.Process]:
        """Look again; the processes alive now (remembered, so escaped ones are not forgotten)."""
        found: list[psutil.Process] = []
        if self.user is not None:
            found = user_processes(self.user.uid)
        else:
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(self.leader)
                found = [root, *root.children(recursive=True)]
        for proc in found:
            self._known.setdefault(proc.pid, proc)  # keep the first object: cpu_percent needs it
        alive = []
        self.zombies = 0
        for pid, proc in list(self._known.items()):
            try:
                zombie = proc.status() == psutil.STATUS_ZOMBIE
                running = proc.is_running() and not zombie
            except psutil.Error:
                zombie = running = False
            self.zombies += zombie
            if running:
                alive.append(proc)
            else:
                del self._known[pid]
        return alive

    def usage(self) -> tuple[float, int, int]:
        """(CPU percent summed over processes since the last call, memory bytes, threads).

        Memory is the proportional set size (shared pages divided among their sharers), so a
        forked family is not counted several times over. Threads and unreaped zombies,
        because ``RLIMIT_NPROC`` counts every one of the user's.
        """
        cpu, memory, threads = 0.0, 0, 0
        alive = self.refresh()
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                cpu += proc.cpu_percent(None)
                threads += proc.num_threads()
                memory += _proportional_memory(proc)
        return cpu, memory, threads + self.zombies

    def kill(self, grace: float = 2.0) -> None:
        """SIGTERM the group and every known process, SIGKILL what is left after ``grace`` seconds."""
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and self.refresh():
            time.sleep(0.05)
        self._signal_all(signal.SIGKILL)
        if self.user is not None:
            kill_user_processes(self.user.uid)
        psutil.wait_procs(self.refresh(), timeout=1.0)

    def _signal_all(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.leader, signum)
        for proc in self.refresh():
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signum)
