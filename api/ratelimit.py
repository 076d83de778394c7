"""Rate limits kept in Redis: registrations per peer, failed logins per username and per peer.

Repeated bad passwords first slow down (each further attempt must wait twice as long after the
last failure), then lock out for a while. When Redis cannot be reached the limits are skipped
with a warning: an outage of the cache must not lock every user out.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import redis

from models.errors import RateLimited

log = logging.getLogger(__name__)

# A peer (one address, maybe many people behind NAT) gets this many times a username's allowance.
PEER_FACTOR = 5


@dataclass(frozen=True)
class LoginPolicy:
    free_failures: int = 5
    lockout_after: int = 20
    lockout_seconds: int = 900
    window_seconds: int = 900

    def scaled(self, factor: int) -> LoginPolicy:
        return LoginPolicy(
            self.free_failures * factor, self.lockout_after * factor, self.lockout_seconds, self.window_seconds
        )


def login_delay(failures: int, policy: LoginPolicy) -> float:
    """Seconds that must pass after the last failure before another attempt is heard."""
    if failures < policy.free_failures:
        return 0.0
    if failures >= policy.lockout_after:
        return float(policy.lockout_seconds)
    return float(min(2 ** (failures - policy.free_failures + 1), policy.lockout_seconds))


class RateLimiter:
    def __init__(
        self, client: redis.Redis, *, registrations_per_minute: int, login: LoginPolicy, prefix: str = "hm:rl"
    ) -> None:
        self._redis = client
        self._registrations = registrations_per_minute
        self._login = login
        self._prefix = prefix

    def check_registration(self, peer: str, *, now: float | None = None) -> None:
        """Count one registration attempt from ``peer``; RateLimited past the per-minute limit."""
        now = time.time() if now is None else now
        minute = int(now // 60)
        key = f"{self._prefix}:reg:{peer}:{minute}"
        try:
            pipe = self._redis.pipeline()
            pipe.incr(key)
            pipe.expire(key, 120)
            count = int(pipe.execute()[0])
        except redis.RedisError as error:
            log.warning("registration rate limit skipped: redis unavailable (%s)", error)
            return
        if count > self._registrations:
            raise RateLimited(
                "too many registrations from your address; try again in a minute", retry_after=60 - now % 60
            )

    def check_login(self, username: str, peer: str, *, now: float | None = None) -> None:
        """RateLimited when this username or peer must still wait after earlier failures."""
        now = time.time() if now is None else now
        for key, policy in (
            (self._user_key(username), self._login),
            (self._peer_key(peer), self._login.scaled(PEER_FACTOR)),
        ):
            try:
                state = self._redis.hgetall(key)
            except redis.RedisError as error:
                log.warning("login rate limit skipped: redis unavailable (%s)", error)
                return
            if not state:
                continue
            failures = int(state.get(b"n", 0))
            last = float(state.get(b"last", 0))
            wait = last + login_delay(failures, policy) - now
            if wait > 0:
                raise RateLimited(f"too many failed logins; try again in {int(wait) + 1} s", retry_after=wait)

    def record_login_failure(self, username: str, peer: str, *, now: float | None = None) -> None:
        now = time.time() if now is None else now
        try:
            pipe = self._redis.pipeline()
            for key in (self._user_key(username), self._peer_key(peer)):
                pipe.hincrby(key, "n", 1)
                pipe.hset(key, "last", now)
                pipe.expire(key, max(self._login.window_seconds, self._login.lockout_seconds))
            pipe.execute()
        except redis.RedisError as error:
            log.warning("could not record a failed login: redis unavailable (%s)", error)

    def record_login_success(self, username: str) -> None:
        try:
            self._redis.delete(self._user_key(username))
        except redis.RedisError as error:
            log.warning("could not reset login failures: redis unavailable (%s)", error)

    def _user_key(self, username: str) -> str:
        return f"{self._prefix}:login:user:{username.lower()}"

    def _peer_key(self, peer: str) -> str:
        return f"{self._prefix}:login:peer:{peer}"
