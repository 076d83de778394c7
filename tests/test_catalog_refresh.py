"""Beat keeps the matcher's node catalog current while no task waits (a real worker on the
matching queue, one process, as `up` runs the matcher)."""

from __future__ import annotations

from datetime import timedelta

import redis

from orchestration.app import MATCHING_QUEUE, create_celery
from tests.harness import bearer
from tests.tasks_support import upload, wait_status
from tests.test_nodes_api import node_request

REFRESH = "pool.scheduling.refresh_catalog"


def test_the_matcher_reads_only_the_nodes_changed_since_its_last_look(make_pool, database_url, celery_worker_for):
    pool = make_pool(database_url=database_url)
    owner, token = pool.new_user()

    def register(label: str) -> None:
        reply = pool.nodes.RegisterWorkerNode(node_request(f"{owner}/{label}"), metadata=bearer(token))
        assert reply.success, reply.message

    for label in ("a", "b", "c"):
        register(label)
    celery_worker_for(pool, queues=MATCHING_QUEUE, concurrency=1)
    app = pool.ctx.jobs.app

    def refresh() -> int:
        return app.send_task(REFRESH).get(timeout=30)

    assert refresh() == 3  # a fresh process loads every node
    assert refresh() == 0  # nothing changed since
    register("d")
    assert refresh() == 1

    # A task placed by the same process changes its node: the process took the node's row as its
    # hold left it, so the next look has nothing to read again; a change by anyone else it reads.
    _, submitter = pool.new_user()
    task_id = upload(pool, submitter)
    wait_status(pool, submitter, task_id, "ASSIGNED")  # no dispatch worker here: it stays assigned
    assert refresh() == 0
    register("f")
    assert refresh() == 1

    # While a matching job is queued or running (it holds the flag), the refresh leaves the
    # changes to it; once the flag is gone, the next refresh reads them.
    flag = f"{pool.settings.REDIS_KEY_PREFIX}:matching:job"
    client = redis.Redis.from_url(pool.settings.redis_url)
    register("e")
    client.set(flag, "1", ex=30)
    try:
        assert pool.ctx.lifecycle.matching.busy()  # the flag the matching jobs take
        assert refresh() == 0
    finally:
        client.delete(flag)
        client.close()
    assert refresh() == 1


def test_beat_sends_it_to_the_matching_queue_and_drops_one_not_run_in_time(make_pool) -> None:
    pool = make_pool(CATALOG_REFRESH_SECONDS=1.5)
    app = create_celery(pool.settings)
    entry = app.conf.beat_schedule["refresh-node-catalog"]
    assert entry["task"] == REFRESH
    assert entry["schedule"] == timedelta(seconds=1.5)
    assert entry["options"] == {"expires": 1.5, "ignore_result": True}
    assert app.amqp.router.route({}, REFRESH)["queue"].name == MATCHING_QUEUE
