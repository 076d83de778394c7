"""The Prometheus endpoint, scraped while a real pool runs: it parses, and its numbers are the pool's."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from api.job_events import JobEvents
from api.metrics import MetricsEndpoint, PoolCollector, start_metrics
from models import ledger
from models.db import Database
from protos import nodepool_pb2 as pb
from tests.harness import PoolHarness, bearer
from tests.scripted_worker import ScriptedWorker
from tests.tasks_support import FAST, code_of, upload, wait_status

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(endpoint: MetricsEndpoint) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{endpoint.port}/metrics", timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def metrics_of() -> Iterator[Callable[..., MetricsEndpoint]]:
    started: list[MetricsEndpoint] = []

    def start(pool: PoolHarness, **kwargs: bool) -> MetricsEndpoint:
        endpoint = start_metrics(pool.ctx, host="127.0.0.1", port=0, **kwargs)
        started.append(endpoint)
        return endpoint

    yield start
    for endpoint in started:
        endpoint.stop()


def test_scraped_during_a_run_the_numbers_match_the_pool(
    make_pool, sqlite_url: str, celery_worker_for, workers: list, metrics_of: Callable[..., MetricsEndpoint]
) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool(database_url=sqlite_url, **FAST)
    celery_worker_for(pool)
    endpoint = metrics_of(pool)  # before any job runs, so their events are heard
    before = scrape(endpoint)
    workers.append(ScriptedWorker(pool, label="a", memory_gb=16, cpu_score=1000))
    workers.append(ScriptedWorker(pool, label="b", memory_gb=8, cpu_score=500, docker_status="disabled"))
    name, token = pool.new_user()
    done = upload(pool, token)
    waiting = upload(pool, token, memory_gb=32)  # more than any node has: stays PENDING
    wait_status(pool, token, done, "COMPLETED")
    _, stranger = pool.new_user()
    assert code_of(pool.master.PollTaskStatus, pb.PollTaskStatusRequest(task_id=done), metadata=bearer(stranger))
    assert not pool.users.Login(pb.LoginRequest(username=name, password="wrong-password")).success

    deadline = time.monotonic() + 15
    while True:  # job events arrive a little after the jobs end
        samples = scrape(endpoint)
        count = value(
            samples, "hivemind_job_duration_seconds_count", job="pool.archival.archive_many", outcome="succeeded"
        )
        if count >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.3)

    assert value(samples, "hivemind_metrics_database_up") == 1
    nodes = pool.nodes.GetNodeList(pb.GetNodeListRequest(), metadata=bearer(token)).nodes
    online = sum(1 for n in nodes if n.status != "offline")
    assert online == 2
    assert value(samples, "hivemind_nodes", tier="normal", status="online") == 1
    assert value(samples, "hivemind_nodes", tier="low", status="online") == 1
    assert sum(value(samples, "hivemind_nodes", tier=t, status="online") for t in ("high", "normal", "low")) == online

    listed = pool.master.GetAllTasks(pb.GetAllTasksRequest(), metadata=bearer(token)).tasks
    assert {t.task_id: t.status for t in listed} == {done: "COMPLETED", waiting: "PENDING"}
    assert value(samples, "hivemind_tasks", status="COMPLETED") == 1
    assert value(samples, "hivemind_tasks", status="PENDING") == 1
    assert value(samples, "hivemind_tasks", status="RUNNING") == 0

    assert value(samples, "hivemind_resources_total", dimension="memory_gb") == 24
    assert value(samples, "hivemind_resources_total", dimension="cpu_score") == 1500
    assert value(samples, "hivemind_resources_available", dimension="memory_gb") == 24  # nothing running now

    with pool.ctx.db.reading() as session:
        audit = ledger.audit(session)
    assert value(samples, "hivemind_ledger_cpt", account="minted") == audit.minted
    assert value(samples, "hivemind_ledger_cpt", account="balances") == audit.balances
    assert value(samples, "hivemind_ledger_cpt", account="escrow") == audit.escrow > 0  # the pending task's
    assert value(samples, "hivemind_ledger_cpt", account="pending") == audit.pending
    assert value(samples, "hivemind_users") == 4  # two node owners, the submitter, the stranger

    def grew(name: str, **labels: str) -> float:
        return value(samples, name, **labels) - value(before, name, **labels)

    assert grew("hivemind_rpc_duration_seconds_count", method="UploadTask") == 2
    assert grew("hivemind_rpc_errors_total", method="PollTaskStatus", code="PERMISSION_DENIED") == 1
    assert grew("hivemind_rpc_refusals_total", method="Login") == 1
    assert count >= 1, "the archival job's duration was recorded from the worker's events"
    job_count = "hivemind_job_duration_seconds_count"
    assert value(samples, job_count, job="pool.dispatch.execute_many", outcome="succeeded") >= 1
    assert value(samples, job_count, job="pool.scheduling.match", outcome="succeeded") >= 1
    assert ("hivemind_queue_messages", (("queue", "dispatch"),)) in samples


def test_state_gauges_on_each_database(
    pool: PoolHarness, workers: list, metrics_of: Callable[..., MetricsEndpoint]
) -> None:
    endpoint = metrics_of(pool, job_events=False)
    workers.append(ScriptedWorker(pool, memory_gb=4))
    _, token = pool.new_user()
    upload(pool, token)  # no Celery worker here: it stays PENDING
    samples = scrape(endpoint)
    assert value(samples, "hivemind_nodes", tier="normal", status="online") == 1
    assert value(samples, "hivemind_tasks", status="PENDING") == 1
    assert value(samples, "hivemind_resources_total", dimension="memory_gb") == 4
    assert value(samples, "hivemind_ledger_cpt", account="escrow") > 0
    minted = value(samples, "hivemind_ledger_cpt", account="minted")
    held = sum(value(samples, "hivemind_ledger_cpt", account=a) for a in ("balances", "escrow", "pending"))
    assert minted == held == 2 * pool.settings.INITIAL_BALANCE


def test_a_database_outage_is_a_value_not_a_failed_scrape(tmp_path) -> None:  # type: ignore[no-untyped-def]
    broken = Database(f"sqlite:///{tmp_path / 'missing' / 'pool.db'}")
    families = {family.name: family for family in PoolCollector(broken).collect()}
    assert families["hivemind_metrics_database_up"].samples[0].value == 0
    assert "hivemind_tasks" not in families


def test_job_events_become_durations() -> None:
    jobs = JobEvents(app=None, remember=2)  # type: ignore[arg-type]
    jobs.handle({"type": "task-received", "uuid": "a", "name": "pool.dispatch.execute"})
    jobs.handle({"type": "task-started", "uuid": "a", "timestamp": 100.0})
    jobs.handle({"type": "task-succeeded", "uuid": "a", "runtime": 0.25, "timestamp": 100.3})
    jobs.handle({"type": "task-received", "uuid": "b", "name": "pool.archival.archive"})
    jobs.handle({"type": "task-started", "uuid": "b", "timestamp": 200.0})
    jobs.handle({"type": "task-failed", "uuid": "b", "timestamp": 202.0})
    jobs.handle({"type": "task-succeeded", "uuid": "never-received", "runtime": 9.0})
    for uuid in "xyz":
        jobs.handle({"type": "task-received", "uuid": uuid, "name": "pool.scheduling.match"})

    observed = {
        (s.labels["job"], s.labels["outcome"]): s.value
        for family in jobs.seconds.collect()
        for s in family.samples
        if s.name.endswith("_sum")
    }
    assert observed == {("pool.dispatch.execute", "succeeded"): 0.25, ("pool.archival.archive", "failed"): 2.0}
    assert len(jobs._jobs) == 2  # bounded memory
