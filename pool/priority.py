"""Lower the CPU priority of a process ``hivemind-pool up`` has just started.

When the cores are full, Linux shares them among runnable threads by their nice values, but on a
kernel with autogroups (``/proc/sys/kernel/sched_autogroup_enabled``, on by default in most
distributions' kernels) it first shares them among *sessions*: each session's threads together get
one share, set by the session's autogroup nice value, whatever their own nice values say. ``up``
starts every child in a session of its own (so that a Ctrl-C reaches only ``up``), so a child is
lowered in both ways: its threads' nice value, and its session's autogroup nice value.

Unprivileged processes may lower a priority, never raise it back; the kernel takes one autogroup
change every 100 ms from them, so a refused one is tried again.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

AUTOGROUP_TRIES = 10
AUTOGROUP_PAUSE = 0.11  # seconds: the kernel's limit is one change per 100 ms
NEW_AUTOGROUP_NICE = 0  # what the kernel gives the autogroup of every new session


def autogroup_nice(pid: int | str = "self") -> int | None:
    """The autogroup nice value of ``pid``'s session; None where the kernel has no autogroups, or
    where ``pid`` runs in none (the kernel shows nothing for the first session's processes, such
    as a container's or a CI runner's)."""
    try:
        text = Path(f"/proc/{pid}/autogroup").read_text()  # "/autogroup-85 nice 0"
    except OSError:
        return None
    words = text.split()
    return int(words[-1]) if len(words) == 3 and words[1] == "nice" else None


def lower(pid: int, steps: int) -> str | None:
    """Run process ``pid`` ``steps`` nice values below this one (at most 19): every thread it has
    now (those it starts later take their creator's value), and its autogroup when it leads a
    session of its own: ``steps`` below the nice value every new session's autogroup starts at, so
    below the other children's, whatever autogroup (or none) this process runs in. None when done,
    else what could not be done (the process runs as it was).
    """
    if steps <= 0:
        return None
    problems = []
    target = min(19, os.getpriority(os.PRIO_PROCESS, 0) + steps)
    try:
        threads = [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except OSError:  # no /proc: the process's main thread
        threads = [pid]
    for tid in threads:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, target)
        except ProcessLookupError:
            if tid == pid:
                return "the process has ended"
            # else a thread that ended meanwhile
        except OSError as error:
            problems.append(f"nice {target}: {error.strerror}")
            break
    if autogroup_nice(pid) is not None and _leads_session(pid):
        problem = _set_autogroup(pid, min(19, NEW_AUTOGROUP_NICE + steps))
        if problem:
            problems.append(problem)
    return "; ".join(problems) or None


def _leads_session(pid: int) -> bool:
    try:
        return os.getsid(pid) == pid
    except OSError:
        return False


def _set_autogroup(pid: int, nice: int) -> str | None:
    for _ in range(AUTOGROUP_TRIES):
        try:
            Path(f"/proc/{pid}/autogroup").write_text(f"{nice}\n")
            return None
        except OSError as error:
            if error.errno != errno.EAGAIN:
                return f"autogroup nice {nice}: {error.strerror}"
        time.sleep(AUTOGROUP_PAUSE)
    return f"autogroup nice {nice}: the kernel kept refusing the change"
