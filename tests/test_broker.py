"""The broker transport: one publishing client per channel, on a real Redis."""

from __future__ import annotations

import threading
import uuid

import redis

from orchestration import broker
from orchestration.app import create_celery
from pool.settings import Settings


def _settings(redis_url: str) -> Settings:
    prefix = f"test-broker-{uuid.uuid4().hex[:8]}:"
    return Settings(_env_file=None, REDIS_URL=redis_url, CELERY_KEY_PREFIX=prefix)  # type: ignore[call-arg]


def _queued(redis_url: str, settings: Settings, queue: str) -> int:
    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.llen(f"{settings.CELERY_KEY_PREFIX}{queue}"))
    finally:
        client.delete(f"{settings.CELERY_KEY_PREFIX}{queue}")
        client.close()


def test_redis_urls_get_the_pool_transport_under_their_own_scheme() -> None:
    app = create_celery(Settings(_env_file=None, REDIS_URL="redis://127.0.0.1:6379/3"))  # type: ignore[call-arg]
    connection = app.connection_for_write()
    assert isinstance(connection.transport, broker.Transport)
    # Flower measures queues through the URL the connection gives back: it must still say redis.
    assert connection.as_uri(include_password=True) == "redis://127.0.0.1:6379/3"
    for url in ("rediss://cache.example:6380/0", "redis://127.0.0.1:6379/3"):
        assert isinstance(app.connection_for_write(url).transport, broker.Transport)
    # Sentinel and other brokers keep kombu's own transports.
    assert not isinstance(app.connection_for_write("sentinel://127.0.0.1:26379").transport, broker.Transport)
    assert app.connection_for_write("amqp://guest@127.0.0.1//").transport_cls == "amqp"


def test_a_channel_publishes_every_message_through_one_client(redis_url: str) -> None:
    settings = _settings(redis_url)
    app = create_celery(settings)
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        assert isinstance(channel, broker.Channel)
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second
        with app.producer_or_acquire() as producer:
            for n in range(25):
                app.send_task("pool.maintenance.audit_ledger", args=(n,), producer=producer, ignore_result=True)
            events = app.events.Dispatcher(connection, enabled=True)
            for _ in range(25):
                events.send("task-started", uuid="x")  # fanout: published, kept by nobody
        with channel.conn_or_acquire() as after:
            assert after is first
        # A client given by the caller is used as it is.
        given = redis.Redis.from_url(redis_url)
        with channel.conn_or_acquire(given) as used:
            assert used is given
        given.close()

        # After a fork (or a reconnect) the channel's pools are new: so is its client.
        channel._disconnect_pools()
        with channel.conn_or_acquire() as fresh:
            assert fresh is not first and fresh.connection_pool is channel.pool
        app.send_task("pool.maintenance.audit_ledger", args=(99,), ignore_result=True)
    assert _queued(redis_url, settings, "maintenance") == 26


def test_threads_sending_at_once_lose_nothing(redis_url: str) -> None:
    settings = _settings(redis_url)
    app = create_celery(settings)
    errors: list[BaseException] = []

    def send(thread: int) -> None:
        try:
            for n in range(100):
                app.send_task("pool.archival.archive", args=(f"t{thread}-{n}", 1), ignore_result=True)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert _queued(redis_url, settings, "archival") == 800
