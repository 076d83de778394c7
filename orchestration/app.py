"""The Celery application: queues, routes, reliability settings and the beat schedule."""

from __future__ import annotations

from datetime import timedelta

from celery import Celery
from kombu import Queue

from orchestration import broker
from pool.settings import Settings

QUEUES = ("scheduling", "dispatch", "maintenance", "archival")
MATCHING_QUEUE = "scheduling"  # one matching job at a time; `up` gives it a worker of its own

# Job names are "pool.<queue>.<what>"; the queue is the second part.
ROUTES = {f"pool.{queue}.*": {"queue": queue} for queue in QUEUES}

JOB_MODULES = (
    "orchestration.jobs.maintenance",
    "orchestration.jobs.scheduling",
    "orchestration.jobs.dispatch",
    "orchestration.jobs.archival",
)


def beat_schedule(settings: Settings) -> dict[str, dict[str, object]]:
    """Periodic jobs. Each is idempotent and safe to overlap, so a doubled beat does no harm."""
    return {
        "expire-heartbeats": {"task": "pool.maintenance.expire_heartbeats", "schedule": timedelta(seconds=5)},
        "reclaim-resources": {"task": "pool.maintenance.reclaim_resources", "schedule": timedelta(seconds=30)},
        "audit-ledger": {"task": "pool.maintenance.audit_ledger", "schedule": timedelta(minutes=10)},
        "recover-tasks": {"task": "pool.maintenance.recover_tasks", "schedule": timedelta(seconds=10)},
        "accrue-rewards": {
            "task": "pool.maintenance.accrue_rewards",
            "schedule": timedelta(seconds=settings.ACCRUAL_INTERVAL_SECONDS),
        },
        "prune-results": {"task": "pool.maintenance.prune_results", "schedule": timedelta(hours=1)},
        # The matcher follows the nodes' changes while no task waits; one not run in time is
        # dropped (the next one does its work), and nobody reads what one returns.
        "refresh-node-catalog": {
            "task": "pool.scheduling.refresh_catalog",
            "schedule": timedelta(seconds=settings.CATALOG_REFRESH_SECONDS),
            "options": {"expires": settings.CATALOG_REFRESH_SECONDS, "ignore_result": True},
        },
    }


def _transport_options(settings: Settings) -> dict[str, object]:
    options: dict[str, object] = {"visibility_timeout": 300}
    if settings.CELERY_KEY_PREFIX:
        options["global_keyprefix"] = settings.CELERY_KEY_PREFIX
    return options


def create_celery(settings: Settings) -> Celery:
    broker.install()
    app = Celery("hivemind-pool", broker=settings.broker_url, backend=settings.redis_url, include=list(JOB_MODULES))
    app.conf.update(
        task_queues=[Queue(name) for name in QUEUES],
        task_default_queue="maintenance",
        task_routes=ROUTES,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # A job is acknowledged only when done, and re-delivered if its worker dies mid-way;
        # every job is idempotent, so running one twice is harmless.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=_transport_options(settings),
        result_expires=3600,
        task_track_started=True,
        # Events for Flower.
        worker_send_task_events=True,
        task_send_sent_event=True,
        broker_connection_retry_on_startup=True,
        beat_schedule=beat_schedule(settings),
        timezone="UTC",
    )
    app.pool_settings = settings  # type: ignore[attr-defined]
    return app
