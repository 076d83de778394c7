"""The pipeline's raw baseline: the pool's own Celery application with one more job that does nothing.

Same broker, serializer, acknowledgement, prefetch and event settings as the pool's worker
(:func:`orchestration.app.create_celery`); the worker is started with the same command line
as ``hivemind-pool up`` starts it. Run: ``celery -A bench.noop_app worker …``.
"""

from __future__ import annotations

from orchestration.app import create_celery
from pool.settings import Settings

app = create_celery(Settings())


@app.task(name="pool.dispatch.noop")
def noop() -> None:
    return None
