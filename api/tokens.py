"""User access tokens: HS256 JWTs whose subject is the username."""

from __future__ import annotations

import time
from dataclasses import dataclass

import jwt

from models.errors import Unauthenticated

ISSUER = "hivemind-node-pool"


@dataclass(frozen=True)
class Caller:
    """Who is calling, as proven by a token."""

    username: str
    user_id: int = 0
    is_operator: bool = False


class TokenCodec:
    """Issues and verifies tokens. Verified tokens are remembered until they expire, so a node that
    heartbeats every few seconds costs one dictionary look-up, not an HMAC and a JSON parse."""

    CACHE_SIZE = 200_000

    def __init__(self, secret: str, lifetime_hours: float) -> None:
        self._secret = secret
        self._lifetime = int(lifetime_hours * 3600)
        self._verified: dict[str, tuple[str, int, float]] = {}

    def issue(self, username: str, user_id: int = 0, *, now: float | None = None) -> str:
        issued = int(now if now is not None else time.time())
        claims = {"sub": username, "uid": user_id, "iat": issued, "exp": issued + self._lifetime, "iss": ISSUER}
        return jwt.encode(claims, self._secret, algorithm="HS256")

    def verify(self, token: str) -> tuple[str, int]:
        """(username, user id) of a valid token. Raises Unauthenticated for anything else."""
        known = self._verified.get(token)
        if known is not None:
            if time.time() < known[2]:
                return known[0], known[1]
            self._verified.pop(token, None)
        try:
            claims = jwt.decode(
                token, self._secret, algorithms=["HS256"], issuer=ISSUER, options={"require": ["sub", "exp", "iat"]}
            )
        except jwt.ExpiredSignatureError as error:
            raise Unauthenticated("token expired: log in again") from error
        except jwt.PyJWTError as error:
            raise Unauthenticated("invalid token") from error
        subject, uid = claims.get("sub"), claims.get("uid", 0)
        if not isinstance(subject, str) or not subject or not isinstance(uid, int):
            raise Unauthenticated("invalid token")
        if len(self._verified) >= self.CACHE_SIZE:
            self._verified.clear()  # crude but bounded; re-verifying is only slower
        self._verified[token] = (subject, uid, float(claims["exp"]))
        return subject, uid
