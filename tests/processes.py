"""Whether a child process the test started is gone, as an operator checking `ps` would judge it."""

from __future__ import annotations

import time

import psutil


def gone(pid: int) -> bool:
    """True when ``pid`` no longer runs.

    A zombie waiting for a parent that does not reap it (e.g. a container's init) counts as gone.
    """
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pid: int, timeout: float = 5.0) -> bool:
    """Poll until ``pid`` is gone; False if it still runs after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
