"""The per-task unprivileged users a root agent runs tasks as (see :mod:`agent.sandbox`).

Each running task gets a uid of its own from a range with no ``/etc/passwd`` entry (default
43000–43255). A uid is claimed with a lock file (``/run/lock/hivemind-agent-uid-N.lock``), so
two agents on one machine never share one, and before it is handed out every process still
running as it is killed; a uid whose dead processes are not yet reaped is skipped (they would
count against the next task's process limit). Uids are handed out round robin for the same
reason.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import tempfile
import threading
from pathlib import Path

from agent.sandbox import TaskUser, kill_user_processes, user_processes

UID_SPAN = 256
LOCK_DIR = Path("/run/lock") if Path("/run/lock").is_dir() else Path(tempfile.gettempdir())


class TaskUsers:
    """The per-task unprivileged users (root only). ``acquire`` returns None when not root."""

    def __init__(self, base: int, span: int = UID_SPAN) -> None:
        self._base = base
        self._span = span
        self._held: dict[int, int] = {}  # uid -> lock fd
        self._next = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return os.geteuid() == 0

    def acquire(self) -> TaskUser | None:
        """A free task user, its leftover processes killed; RuntimeError when none is free."""
        if not self.enabled:
            return None
        with self._lock:
            for step in range(self._span):
                uid = self._base + (self._next + step) % self._span
                if uid in self._held or _has_account(uid):
                    continue
                fd = os.open(LOCK_DIR / f"hivemind-agent-uid-{uid}.lock", os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                kill_user_processes(uid)
                if user_processes(uid):  # unreaped zombies still count against RLIMIT_NPROC
                    os.close(fd)
                    continue
                self._held[uid] = fd
                self._next = (uid - self._base + 1) % self._span  # round robin: let the last one's dead settle
                return TaskUser(uid, uid)
        raise RuntimeError(f"no free task user in uids {self._base}–{self._base + self._span - 1}")

    def release(self, user: TaskUser | None) -> None:
        """Kill whatever ``user`` still runs and give the uid back."""
        if user is None:
            return
        kill_user_processes(user.uid)
        with self._lock:
            fd = self._held.pop(user.uid, None)
        if fd is not None:
            os.close(fd)


def _has_account(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True
