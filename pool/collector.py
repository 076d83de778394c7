"""The garbage collector in the pool's long-running processes: what a process holds from its start
is not scanned again.

CPython's cyclic collector makes a full collection whenever enough objects have survived into
its oldest generation, and a full collection walks every object the process tracks: the
modules', classes' and functions' of everything it imported too, some 100,000–150,000 in a gRPC
server or a Celery worker of the pool. On a busy 2-core machine one such collection stopped the
process for 100–800 ms every 5–25 s, with every thread of it waiting: the calls in flight,
a matching job, a dispatch. Those objects live as long as the process does. :func:`settle`
collects once and moves what survives into the permanent generation (``gc.freeze``), which no
collection scans; a full collection then walks only what the process made since.

What is frozen is still freed when its last reference goes; only garbage in reference cycles
among frozen objects would stay, and what a process holds from its start is not garbage.
"""

from __future__ import annotations

import gc


def settle() -> None:
    """Collect what is garbage now, then keep every surviving object out of later collections.

    Call it once a process has imported and built what it keeps for its life, before it starts
    serving; again after a fork, for what the child built. Each call freezes only what is new.
    """
    gc.collect()
    gc.freeze()
