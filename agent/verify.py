"""Verify that an ExecuteTask/StopTaskExecution call really comes from the pool (SPEC §3).

The pool signs each call with its Ed25519 key: a JWT (``EdDSA``) in ``authorization: Bearer``
metadata with claims ``iss``, ``aud`` (the node id), ``sub``, ``task_id``, ``attempt``,
``action`` (``execute``/``stop``), ``iat``, ``exp`` (``iat`` + 60) and ``jti``. A token is good
for one call: its ``jti`` is remembered until it expires, and a second use is refused.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

log = logging.getLogger("agent.verify")

ISSUER = "hivemind-node-pool"
ALGORITHM = "EdDSA"
SUBJECT = "pool"
ACTIONS = ("execute", "stop")
MAX_LIFETIME_S = 300  # the pool issues 60 s tokens; anything much longer is not the pool's
REQUIRED = ["iss", "aud", "sub", "task_id", "attempt", "action", "iat", "exp", "jti"]


class CallRefused(Exception):
    """The call carries no valid pool token; ``str(error)`` says why (answered UNAUTHENTICATED)."""


@dataclass(frozen=True)
class PoolClaims:
    """What a verified pool token allows: one action on one attempt of one task, on one node."""

    node_id: str
    task_id: str
    attempt: int
    action: str
    jti: str
    expires: float


def load_public_key(pem: str | bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from SubjectPublicKeyInfo PEM; ValueError for anything else."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as error:
        raise ValueError(f"not a PEM public key: {error}") from error
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("the pool's key must be an Ed25519 public key")
    return key


def read_key_file(path: Path) -> Ed25519PublicKey:
    """The pool's public key from a PEM file; OSError when unreadable, ValueError when not Ed25519."""
    return load_public_key(path.read_bytes())


def bearer_from(metadata: Iterable[tuple[str, Any]] | None) -> str:
    """The token of ``authorization: Bearer <token>`` metadata; CallRefused when absent or malformed."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            scheme, _, token = str(value).partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise CallRefused("authorization metadata must be 'Bearer <token>'")
            return token.strip()
    raise CallRefused("unsigned call: the pool signs every ExecuteTask/StopTaskExecution")


class ReplayGuard:
    """Remembers the ``jti`` of every accepted token until it expires."""

    def __init__(self, limit: int = 200_000) -> None:
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()
        self._limit = limit
        self._next_purge = 0.0

    def admit(self, jti: str, expires: float, now: float) -> bool:
        """True the first time ``jti`` is seen (and remembers it); False for a replay."""
        with self._lock:
            if now >= self._next_purge or len(self._seen) >= self._limit:
                self._seen = {key: exp for key, exp in self._seen.items() if exp >= now}
                self._next_purge = now + 10
                if len(self._seen) >= self._limit:
                    return False  # flooded with valid tokens: refuse rather than forget
            if jti in self._seen:
                return False
            self._seen[jti] = expires
            return True


class CallVerifier:
    """Checks pool tokens against the pool's public key.

    ``refresh`` (optional) fetches the pool's current PEM; it is tried at most once per
    ``refresh_interval`` seconds when a signature does not verify (the pool may have a new key).
    A key read from a file is never refreshed.
    """

    def __init__(
        self,
        key: Ed25519PublicKey,
        *,
        refresh: Callable[[], str] | None = None,
        clock: Callable[[], float] = time.time,
        leeway: float = 5.0,
        refresh_interval: float = 30.0,
    ) -> None:
        self._key = key
        self._refresh = refresh
        self._clock = clock
        self._leeway = leeway
        self._refresh_interval = refresh_interval
        self._refreshed_at = clock()
        self._replays = ReplayGuard()
        self._lock = threading.Lock()

    def verify(
        self,
        metadata: Iterable[tuple[str, Any]] | None,
        *,
        action: str,
        task_id: str,
        accepts: Callable[[str], bool],
    ) -> PoolClaims:
        """The claims of the call's token, checked for ``action`` on ``task_id``.

        ``accepts(aud)`` says whether the token's audience is a node served here. Raises
        CallRefused (unsigned, bad signature, expired, another node, another task or action,
        replayed).
        """
        token = bearer_from(metadata)
        claims = self._decode(token)
        audience = claims["aud"]
        if not isinstance(audience, str) or not accepts(audience):
            raise CallRefused(f"the token is for node {audience!r}, not a node served here")
        if claims["action"] != action:
            raise CallRefused(f"the token allows {claims['action']!r}, not {action!r}")
        if claims["task_id"] != task_id:
            raise CallRefused(f"the token is for task {claims['task_id']!r}, not {task_id!r}")
        attempt = claims["attempt"]
        if not isinstance(attempt, int) or isinstance(attempt, bool):
            raise CallRefused("the token's attempt claim is not an integer")
        expires = float(claims["exp"])
        if expires - float(claims["iat"]) > MAX_LIFETIME_S:
            raise CallRefused("the token lives longer than the pool's tokens do")
        if not self._replays.admit(str(claims["jti"]), expires + self._leeway, self._clock()):
            raise CallRefused("the token was already used (replay)")
        return PoolClaims(audience, str(claims["task_id"]), attempt, str(claims["action"]), str(claims["jti"]), expires)

    def _decode(self, token: str) -> dict[str, Any]:
        try:
            return self._decode_with(self._key, token)
        except jwt.InvalidSignatureError:
            if not self._refreshed():
                raise CallRefused("the token is not signed by the pool's key") from None
            try:
                return self._decode_with(self._key, token)
            except jwt.InvalidSignatureError:
                raise CallRefused("the token is not signed by the pool's key") from None

    def _decode_with(self, key: Ed25519PublicKey, token: str) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                issuer=ISSUER,
                subject=SUBJECT,
                leeway=self._leeway,
                options={"require": REQUIRED, "verify_aud": False},
            )
        except jwt.InvalidSignatureError:
            raise
        except jwt.ExpiredSignatureError:
            raise CallRefused("the token has expired") from None
        except jwt.MissingRequiredClaimError as error:
            raise CallRefused(f"the token lacks the {error.claim!r} claim") from None
        except jwt.PyJWTError as error:
            raise CallRefused(f"invalid token: {error}") from None
        if claims.get("action") not in ACTIONS:
            raise CallRefused(f"unknown action {claims.get('action')!r}")
        return claims

    def _refreshed(self) -> bool:
        """Fetch the pool's key again if allowed; True when it changed."""
        if self._refresh is None:
            return False
        with self._lock:
            now = self._clock()
            if now - self._refreshed_at < self._refresh_interval:
                return False
            self._refreshed_at = now
            try:
                key = load_public_key(self._refresh())
            except Exception as error:  # the pool may be down or answer garbage; keep the old key
                log.warning("could not refresh the pool's public key: %s", error)
                return False
            old = self._key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            new = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            if old == new:
                return False
            log.warning("the pool's public key changed; using the new one")
            self._key = key
            return True
