"""The gRPC server's follow-ups (matching requests, outcomes queued for archival) on a real Redis:
many handler threads share round trips, each returns only once its own request is in Redis, and
a Redis that is gone reaches the callers as the error their RPC answers with."""

from __future__ import annotations

import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, ClassVar

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from orchestration.enqueue import Coalesced, JobQueue
from orchestration.followups import FollowupSender
from pool.settings import Settings


class SentJobs:
    """Records the jobs that would go to the broker, for the cases whose broker is unreachable."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.lock = threading.Lock()

    def send(self, name: str, *args: Any, **_: Any) -> str:
        with self.lock:
            self.sent.append(name)
        return name


class CountingRedis(redis.Redis):
    """A real client that counts the pipelines it executes."""

    round_trips = 0

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        type(self).round_trips += 1
        return super().pipeline(*args, **kwargs)


@pytest.fixture
def client(redis_url: str) -> redis.Redis:
    CountingRedis.round_trips = 0
    return CountingRedis.from_url(redis_url)


def test_concurrent_requests_share_round_trips_and_each_returns_once_its_own_is_sent(
    client: redis.Redis, redis_url: str
) -> None:
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    settings = Settings(_env_file=None, REDIS_URL=redis_url, CELERY_KEY_PREFIX=f"{prefix}:")  # type: ignore[call-arg]
    jobs = JobQueue.from_settings(settings)
    matching = Coalesced(client, jobs, "pool.scheduling.match", f"{prefix}:matching")
    archival = Coalesced(client, jobs, "pool.archival.archive_many", f"{prefix}:archival")
    sender = FollowupSender(client, on_push_failure=lambda key, items: None)
    to_archive = f"{prefix}:to-archive"

    def complete(n: int) -> int:
        sender.request(archival, push=(to_archive, f"1:task-{n}"))
        # returned: this caller's outcome is in Redis already, whatever the others are doing
        return int(f"1:task-{n}".encode() in client.lrange(to_archive, 0, -1))

    def upload(_: int) -> None:
        sender.request(matching)

    try:
        with ThreadPoolExecutor(16) as pool:
            seen = list(pool.map(complete, range(400)))
            list(pool.map(upload, range(400)))
    finally:
        sender.close()
    assert sum(seen) == 400
    assert sorted(client.lrange(to_archive, 0, -1)) == sorted(f"1:task-{n}".encode() for n in range(400))
    assert CountingRedis.round_trips < 800  # 800 requests alone would each be a round trip
    # each kind's job went to the broker once: its flag stays set until that job runs (Coalesced)
    assert client.llen(f"{prefix}:scheduling") == 1 and client.llen(f"{prefix}:archival") == 1


def test_with_redis_gone_outcomes_go_to_the_fallback_and_a_failing_send_reaches_the_caller(client: redis.Redis) -> None:
    gone = redis.Redis(host="127.0.0.1", port=1, retry=Retry(NoBackoff(), 0))  # nothing listens on port 1
    fallen_back: list[tuple[str, list[str]]] = []
    jobs = SentJobs()
    matching = Coalesced(gone, jobs, "match", "gone:matching")  # type: ignore[arg-type]
    sender = FollowupSender(gone, on_push_failure=lambda key, items: fallen_back.append((key, items)))
    try:
        sender.request(matching, push=("gone:to-archive", "1:t"))  # without Redis every request sends its job
        assert fallen_back == [("gone:to-archive", ["1:t"])] and jobs.sent == ["match"]

        class BrokerDown(SentJobs):
            def send(self, name: str, *args: Any, **_: Any) -> str:
                raise ConnectionError("broker unreachable")

        unreachable = Coalesced(gone, BrokerDown(), "match", "gone:matching")  # type: ignore[arg-type]
        with pytest.raises(ConnectionError, match="broker unreachable"):
            sender.request(unreachable)
        sender.request(matching)  # the sender itself carries on
        assert jobs.sent == ["match", "match"]
    finally:
        sender.close()
    sender.request(matching)  # after close a caller sends its own
    assert jobs.sent == ["match", "match", "match"]


def test_a_coalesced_job_with_a_pause_sends_its_follow_on_later_unless_a_full_batch_waits(
    client: redis.Redis, redis_url: str
) -> None:
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    settings = Settings(_env_file=None, REDIS_URL=redis_url, CELERY_KEY_PREFIX=f"{prefix}:")  # type: ignore[call-arg]
    archival = Coalesced(client, JobQueue.from_settings(settings), "pool.archival.archive_many", prefix, pause=5)
    queue = f"{prefix}:archival"

    def etas() -> list[object]:
        return [json.loads(m)["headers"]["eta"] for m in client.lrange(queue, 0, -1)]

    archival.request()  # nothing running: the job goes at once
    assert etas() == [None]
    client.delete(queue)  # a worker took it
    archival.started()
    archival.request()  # work arrives while it runs: folded into one follow-on job, sent when it ends
    archival.request()
    assert etas() == []
    archival.finished()
    (eta,) = etas()
    assert eta is not None and 4 < (datetime.fromisoformat(str(eta)) - datetime.now(UTC)).total_seconds() <= 5
    client.delete(queue)
    archival.started()
    archival.finished()  # nothing wanted meanwhile, nothing waiting: no job
    assert etas() == []
    archival.finished(waiting=True)  # the job saw work left: the next one after the pause
    assert len(etas()) == 1 and etas()[0] is not None
    client.delete(queue)
    archival.finished(more=True)  # a full batch waits: at once
    assert etas() == [None]


def test_a_coalesced_job_ends_in_one_round_trip_and_sends_one_follow_on_for_many_requests(
    redis_url: str,
) -> None:
    class CountingCommands(redis.Redis):
        commands: ClassVar[list[str]] = []

        def execute_command(self, *args: Any, **options: Any) -> Any:
            self.commands.append(str(args[0]))
            return super().execute_command(*args, **options)

    client = CountingCommands.from_url(redis_url)
    jobs = SentJobs()
    matching = Coalesced(client, jobs, "match", f"t-{uuid.uuid4().hex[:8]}")  # type: ignore[arg-type]
    matching.request()
    matching.started()
    matching.finished()  # the first time, the script is loaded too
    assert jobs.sent == ["match"]

    matching.request()  # a job again
    matching.started()
    matching.request()  # two requests while it runs: one follow-on
    matching.request()
    CountingCommands.commands.clear()
    matching.finished()
    assert CountingCommands.commands == ["EVALSHA"]
    assert jobs.sent == ["match", "match", "match"]
    assert matching.busy()  # the follow-on holds the flag
    matching.started()
    CountingCommands.commands.clear()
    matching.finished()  # nothing asked for meanwhile: the flag is dropped, no job
    assert CountingCommands.commands == ["EVALSHA"]
    assert jobs.sent == ["match", "match", "match"] and not matching.busy()
