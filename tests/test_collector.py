"""What the pool's and the agent's processes keep from their start is left out of the garbage
collector's passes (``pool.collector``, ``agent.server.settle``), and every Celery process of the
pool settles as it starts: the worker's main process, each of its pool processes, beat.

Each check runs in an interpreter of its own, so that freezing does not reach this test session.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SETTLES = """
import gc, json, weakref
from {module} import settle

class Node:
    pass

kept = Node()
kept.me = kept  # a cycle still in use
dead = Node()
dead.me = dead  # a cycle nobody holds: garbage
gone = weakref.ref(dead)
del dead
settle()
frozen = gc.get_freeze_count()
later = Node()
later.me = later
gc.collect()
walked = gc.get_objects()  # what the collector's passes walk
print(json.dumps({{
    "garbage_freed": gone() is None,
    "frozen": frozen,
    "kept_walked": any(o is kept for o in walked),
    "later_walked": any(o is later for o in walked),
}}))
"""

SIGNALS = """
import gc, json
import orchestration.celery
from celery.signals import beat_init, worker_init, worker_process_init

frozen = {}
signals = {"worker_init": worker_init, "worker_process_init": worker_process_init, "beat_init": beat_init}
for name, signal in signals.items():
    gc.unfreeze()
    signal.send(sender=None)
    frozen[name] = gc.get_freeze_count()
gc.unfreeze()
print(json.dumps(frozen))
"""


def _run(script: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("module", ["pool.collector", "agent.server"])
def test_settle_frees_garbage_then_keeps_what_lives_out_of_later_passes(module: str) -> None:
    seen = _run(SETTLES.format(module=module))

    assert seen["garbage_freed"] is True  # collected first, not frozen with the rest
    assert isinstance(seen["frozen"], int) and seen["frozen"] > 1_000  # the imports, at least
    assert seen["kept_walked"] is False  # what lived at settle() is no longer walked
    assert seen["later_walked"] is True  # what came after still is


def test_every_celery_process_of_the_pool_settles_as_it_starts() -> None:
    frozen = _run(SIGNALS)

    assert set(frozen) == {"worker_init", "worker_process_init", "beat_init"}
    for name, count in frozen.items():
        assert isinstance(count, int) and count > 1_000, f"{name}: {count} objects frozen"
