"""Reported outcomes waiting for archival: a Redis list of ``attempt:task_id`` items, taken a
batch at a time by one coalesced job (``pool.archival.archive_many``).

Should Redis lose an item, the recovery sweep finds the task by its reported outcome; should
Redis refuse one, it goes to the broker as a job of its own (``pool.archival.archive``).
"""

from __future__ import annotations

from collections.abc import Iterable

import redis

from orchestration.enqueue import Coalesced, JobQueue
from orchestration.followups import FollowupSender

ARCHIVE = "pool.archival.archive"
ARCHIVE_MANY = "pool.archival.archive_many"
BATCH = 100
# A job that follows another while completions keep coming waits this long first, so a burst's
# completions are settled in batches of dozens, not of the few that came in meanwhile.
PAUSE_SECONDS = 0.1


def outcomes(items: Iterable[str | bytes]) -> list[tuple[str, int]]:
    """(task_id, attempt) of each well-formed ``attempt:task_id`` item."""
    found = []
    for item in items:
        attempt, _, task_id = (item.decode() if isinstance(item, bytes) else str(item)).partition(":")
        if attempt.isdigit() and task_id:
            found.append((task_id, int(attempt)))
    return found


class ArchivalQueue:
    def __init__(self, client: redis.Redis, jobs: JobQueue, prefix: str) -> None:
        self.redis, self.jobs = client, jobs
        self.job = Coalesced(client, jobs, ARCHIVE_MANY, f"{prefix}:archival", pause=PAUSE_SECONDS)
        self.key = f"{prefix}:to-archive"

    def push(self, task_id: str, attempt: int, followups: FollowupSender | None = None) -> None:
        """Queue one outcome and ask for the job: through ``followups`` (a round trip shared with
        other callers) if given, else in a round trip of its own."""
        item = f"{attempt}:{task_id}"
        if followups is not None:
            followups.request(self.job, push=(self.key, item))
            return
        try:
            self.redis.rpush(self.key, item)
        except redis.RedisError:
            self.by_jobs(self.key, [item])  # the broker may still be there
            return
        self.job.request()

    def by_jobs(self, _key: str, items: list[str]) -> None:
        """Items Redis refused, each sent as an archival job of its own."""
        for task_id, attempt in outcomes(items):
            self.jobs.send(ARCHIVE, task_id, attempt)

    def take(self) -> list[tuple[str, int]]:
        """Up to BATCH queued outcomes (none when Redis cannot be reached)."""
        try:
            taken = self.redis.lpop(self.key, BATCH) or []
        except redis.RedisError:
            return []
        return list(dict.fromkeys(outcomes(taken if isinstance(taken, list) else [taken])))

    def started(self) -> None:
        self.job.started()

    def finished(self) -> None:
        """The job is done: the next one at once if a full batch waits, after the pause if fewer do."""
        try:
            backlog = int(self.redis.llen(self.key))
        except redis.RedisError:
            backlog = 0
        self.job.finished(more=backlog >= BATCH, waiting=backlog > 0)
