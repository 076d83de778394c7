"""A closed-loop gRPC load generator: C calls in flight on one asyncio channel, for T seconds."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import grpc


async def _run(
    target: str,
    method: str,
    make: Callable[[int], tuple[Any, list[tuple[str, str]]]],
    response_type: Any,
    concurrency: int,
    seconds: float,
    limit: int | None = None,
) -> tuple[int, int]:
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(
            method, request_serializer=lambda m: m.SerializeToString(), response_deserializer=response_type.FromString
        )
        done = errors = 0
        stop = time.monotonic() + seconds

        async def worker(offset: int) -> None:
            nonlocal done, errors
            i = offset
            while time.monotonic() < stop and (limit is None or i < limit):
                request, metadata = make(i)
                try:
                    await call(request, metadata=metadata, timeout=10)
                    done += 1
                except grpc.aio.AioRpcError:
                    errors += 1
                i += concurrency

        await asyncio.gather(*(worker(n) for n in range(concurrency)))
        return done, errors


def rate(
    target: str,
    method: str,
    make: Callable[[int], tuple[Any, list[tuple[str, str]]]],
    response_type: Any,
    *,
    concurrency: int = 64,
    seconds: float = 5.0,
    limit: int | None = None,
) -> tuple[float, int]:
    """(successful calls per second, errors) of a closed loop against ``target``, for ``seconds``
    or until the calls numbered 0 … ``limit`` - 1 were made."""
    started = time.monotonic()
    done, errors = asyncio.run(_run(target, method, make, response_type, concurrency, seconds, limit))
    return done / (time.monotonic() - started), errors
