"""The Redis work an RPC leaves for the jobs after its commit, sent for many RPCs in one round trip.

An upload asks for matching and a TaskCompleted queues its outcome for archival: a Redis round
trip each, which under a burst costs the gRPC server more than some of its SQL. A
:class:`FollowupSender` gathers what concurrent handlers ask for and one thread sends it all in
one pipeline. Each handler still waits for its own request to be sent and sees its error, so an
RPC answers only once its follow-up is queued (or says UNAVAILABLE when it cannot be), exactly as
when it sent the request itself; alone, a handler waits for one round trip, as before.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import redis

from orchestration.enqueue import Coalesced


class _Batch:
    """What handlers asked for since the last send, and the outcome they wait for."""

    __slots__ = ("done", "error", "pushes", "wanted")

    def __init__(self) -> None:
        self.wanted: dict[int, Coalesced] = {}
        self.pushes: dict[str, list[str]] = {}
        self.done = threading.Event()
        self.error: BaseException | None = None

    def __bool__(self) -> bool:
        return bool(self.wanted or self.pushes)


class FollowupSender:
    """Requests for coalesced jobs and pushes onto Redis lists, sent by a thread in batches.

    ``on_push_failure(key, items)`` handles the items of a push that Redis refused (the lifecycle
    sends them as jobs through the broker instead); an exception it raises reaches the handlers
    of that batch, as does one from sending a job.
    """

    def __init__(self, client: redis.Redis, *, on_push_failure: Callable[[str, list[str]], None]) -> None:
        self.redis = client
        self.on_push_failure = on_push_failure
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._batch = _Batch()
        self._closed = False
        self._thread: threading.Thread | None = None

    def request(self, job: Coalesced, *, push: tuple[str, str] | None = None) -> None:
        """Ask for ``job`` (after pushing ``push = (key, item)``); returns once sent, or raises."""
        with self._lock:
            if self._closed:  # shutting down: this handler sends its own
                batch = _Batch()
                queued = False
            else:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="followups", daemon=True)
                    self._thread.start()
                batch, queued = self._batch, True
            batch.wanted[id(job)] = job
            if push is not None:
                batch.pushes.setdefault(push[0], []).append(push[1])
            if queued:
                self._ready.notify()
        if queued:
            batch.done.wait()
        else:
            self._send(batch)
        if batch.error is not None:
            raise batch.error

    def close(self) -> None:
        """Send what is waiting and stop the thread."""
        with self._lock:
            self._closed = True
            self._ready.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._batch and not self._closed:
                    self._ready.wait()
                batch, self._batch = self._batch, _Batch()
                closing = self._closed
            if batch:
                self._send(batch)
            if closing:
                return

    def _send(self, batch: _Batch) -> None:
        try:
            wanted = list(batch.wanted.values())
            try:
                with self.redis.pipeline(transaction=False) as pipe:
                    for key, items in batch.pushes.items():
                        pipe.rpush(key, *items)
                    for job in wanted:
                        job.stage_request(pipe)
                    replies = pipe.execute()
                took = replies[len(batch.pushes) + 1 :: 2]
            except redis.RedisError:
                for key, items in batch.pushes.items():
                    self.on_push_failure(key, items)
                took = [True] * len(wanted)  # without Redis every request sends a job (see Coalesced)
            for job, took_flag in zip(wanted, took, strict=True):
                if took_flag:
                    job.jobs.send(job.job)
        except Exception as error:  # the handlers waiting for this batch report it
            batch.error = error
        finally:
            batch.done.set()
