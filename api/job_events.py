"""Job durations for the metrics endpoint, from the task events the Celery workers already send
(as Flower uses them): nothing runs inside the workers, and any worker started any way counts."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any

from celery import Celery
from prometheus_client import Histogram

log = logging.getLogger("api.metrics")


class JobEvents:
    """Job durations from the workers' Celery task events, recorded by a daemon thread."""

    def __init__(self, app: Celery, *, remember: int = 10_000) -> None:
        self.app = app
        self.seconds = Histogram(
            "hivemind_job_duration_seconds",
            "Run time of a Celery job, by job name and outcome (succeeded, failed).",
            ["job", "outcome"],
            registry=None,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )
        self._jobs: OrderedDict[str, tuple[str, float | None]] = OrderedDict()  # uuid -> (name, started)
        self._remember = remember
        self._stop = threading.Event()
        self._receiver: Any = None
        self._thread = threading.Thread(target=self._run, name="job-events", daemon=True)

    def handle(self, event: dict[str, Any]) -> None:
        """Take one task event: learn names and start times, observe durations at the end."""
        kind, uuid = event.get("type", ""), event.get("uuid", "")
        if kind in ("task-received", "task-sent") and event.get("name"):
            self._jobs[uuid] = (event["name"], self._jobs.get(uuid, ("", None))[1])
        elif kind == "task-started" and uuid in self._jobs:
            self._jobs[uuid] = (self._jobs[uuid][0], event.get("timestamp"))
        elif kind in ("task-succeeded", "task-failed") and uuid in self._jobs:
            name, started = self._jobs.pop(uuid)
            runtime = event.get("runtime")
            if runtime is None and started is not None:
                runtime = max(0.0, float(event.get("timestamp", started)) - started)
            if runtime is not None:
                self.seconds.labels(name, kind.removeprefix("task-")).observe(float(runtime))
        while len(self._jobs) > self._remember:
            self._jobs.popitem(last=False)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._receiver is not None:
            self._receiver.should_stop = True
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self.app.connection_for_read() as conn:
                    self._receiver = self.app.events.Receiver(conn, handlers={"*": self.handle}, routing_key="task.#")
                    if self._stop.is_set():
                        return
                    self._receiver.capture(limit=None, timeout=None, wakeup=False)
            except Exception as error:  # the broker went away: retry, never kill the server
                log.warning("metrics: job events interrupted (%s); retrying", type(error).__name__)
                self._stop.wait(5)
