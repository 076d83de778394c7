"""Sending jobs from the API side: by name, onto named queues, after the commit."""

from __future__ import annotations

import contextlib
from typing import Any

import redis
from celery import Celery
from redis.client import Pipeline

from orchestration.app import create_celery
from pool.settings import Settings


class JobQueue:
    def __init__(self, app: Celery) -> None:
        self.app = app

    @classmethod
    def from_settings(cls, settings: Settings) -> JobQueue:
        return cls(create_celery(settings))

    def send(self, name: str, *args: Any, job_id: str | None = None, countdown: float | None = None) -> str:
        """Enqueue job ``name`` (routed to its queue by the app's routes); returns the job id.

        Nobody waits for these jobs' results, so none is kept: sending touches only the broker.
        Raises kombu's OperationalError when the broker cannot be reached.
        """
        result = self.app.send_task(name, args=args, task_id=job_id, countdown=countdown, ignore_result=True)
        return str(result.id)


# Coalesced.finished: drop the flag (KEYS[1]); when work is wanted anyway (ARGV[1] = 1) or was
# asked for meanwhile (KEYS[2]), take the flag again for the next job (1: send it), else 0.
_FINISH = """
redis.call('DEL', KEYS[1])
if ARGV[1] ~= '1' and redis.call('EXISTS', KEYS[2]) == 0 then
    return 0
end
redis.call('SET', KEYS[1], '1', 'EX', ARGV[2])
return 1
"""


class Coalesced:
    """At most one job of a kind queued or running; requests meanwhile fold into one more run.

    ``request`` marks work as wanted and sends the job unless one holds the flag. The job calls
    ``started`` (the wants so far are its to serve) and ``finished``, which drops the flag and
    sends the next job if work was wanted meanwhile. Under a burst, jobs thus take ever larger
    batches instead of many jobs taking one item each. With a ``pause``, that next job starts
    so many seconds later (unless a full batch waits already), to gather a larger batch: for
    work nobody waits on, where fewer jobs matter more than a few tenths of a second. The flag
    expires after ``ttl`` seconds, so a job killed mid-way delays the next by that much at most.
    Without Redis every request sends a job: better a duplicate than none.
    """

    def __init__(
        self, client: redis.Redis, jobs: JobQueue, job: str, key: str, ttl: int = 10, pause: float = 0.0
    ) -> None:
        self.redis, self.jobs, self.job, self.ttl, self.pause = client, jobs, job, ttl, pause
        self._flag, self._wanted = f"{key}:job", f"{key}:wanted"
        self._finish = client.register_script(_FINISH)  # its digest, computed here: no round trip

    def request(self) -> None:
        try:
            with self.redis.pipeline(transaction=False) as pipe:  # one round trip for both
                self.stage_request(pipe)
                _, took_flag = pipe.execute()
            if not took_flag:
                return
        except redis.RedisError:
            pass
        self.jobs.send(self.job)

    def stage_request(self, pipe: Pipeline) -> None:
        """Add the request's two commands to ``pipe``; the second's reply says whether it took the
        flag, and so must send the job (:class:`~orchestration.followups.FollowupSender`)."""
        pipe.set(self._wanted, "1", ex=self.ttl * 6)
        pipe.set(self._flag, "1", nx=True, ex=self.ttl)

    def busy(self) -> bool:
        """Whether a job holds the flag (queued or running); False when Redis cannot say."""
        try:
            return bool(self.redis.exists(self._flag))
        except redis.RedisError:
            return False

    def started(self) -> None:
        with contextlib.suppress(redis.RedisError):
            self.redis.delete(self._wanted)

    def finished(self, *, more: bool = False, waiting: bool = False) -> None:
        """Drop the flag, and send the next job if work was wanted meanwhile or ``waiting`` says
        some waits: at once if ``more`` says a full batch waits, else after the pause. The flag's
        release and the look at the wants are one atomic script, one round trip."""
        try:
            if not self._finish(keys=[self._flag, self._wanted], args=[int(more or waiting), self.ttl]):
                return
        except redis.RedisError:
            if not (more or waiting):
                return
        self.jobs.send(self.job, countdown=None if more or not self.pause else self.pause)
