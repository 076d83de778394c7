"""Flower settings for the pool: ``celery -A orchestration flower --conf=deploy/flowerconfig.py``.

``hivemind-pool up --flower`` passes this file when it is there. It shows each job's arguments by
name (``task_id='t-1', attempt=2`` instead of ``['t-1', 2]``) and adds the args and result columns
to the tasks page. Basic auth is not set here: use ``FLOWER_BASIC_AUTH=user:password``.
"""

from __future__ import annotations

import ast
import functools
import inspect
from typing import Any

tasks_columns = "name,args,state,result,received,runtime,worker,uuid"


@functools.cache
def parameter_names(job: str) -> tuple[str, ...] | None:
    """The argument names of job ``job`` (a ``pool.*`` Celery task), or None when it is not ours."""
    if not job.startswith("pool."):
        return None
    from orchestration.celery import app  # the app Flower runs with; imported late, once

    app.loader.import_default_modules()  # the job modules (workers import them; Flower need not have)
    try:
        run = app.tasks[job].run
    except KeyError:
        return None
    return tuple(inspect.signature(run).parameters)


def named_args(job: str, args: str) -> str:
    """``"['t-1', 2]"`` → ``"task_id='t-1', attempt=2"`` for our jobs; anything else unchanged."""
    names = parameter_names(job)
    try:
        values = ast.literal_eval(args) if names is not None else None
    except (ValueError, SyntaxError):
        return args
    if not isinstance(values, list | tuple) or len(values) != len(names or ()):
        return args
    return ", ".join(f"{name}={value!r}" for name, value in zip(names or (), values, strict=True))


def format_task(task: Any) -> Any:
    """Flower's hook: called with a copy of each task it displays."""
    if getattr(task, "name", None) and isinstance(getattr(task, "args", None), str):
        task.args = named_args(task.name, task.args)
    return task
