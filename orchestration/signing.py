"""The pool's Ed25519 identity: it signs every ExecuteTask/StopTaskExecution call it makes.

Workers verify the ``authorization: Bearer`` token of those calls against the public key the pool
publishes (``NodeManagerService.GetPoolPublicKey``). A token is good for one node (``aud``), one
task and attempt, one action, and a minute.
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pool.secrets import keep_once

log = logging.getLogger(__name__)

ISSUER = "hivemind-node-pool"
ALGORITHM = "EdDSA"
TOKEN_SECONDS = 60


def _new_key_pem() -> bytes:
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class PoolSigner:
    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key_pem = (
            private_key.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )

    @classmethod
    def load_or_create(cls, path: Path) -> PoolSigner:
        """The key kept at ``path``, generated there (mode 0600) on first use.

        Raises OSError when the file cannot be read or written, ValueError when it is not an
        Ed25519 private key.
        """
        pem, created = keep_once(path, _new_key_pem)  # processes starting together all read the one kept
        if created:
            log.warning("generated the pool's signing key at %s", path)
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} is not an Ed25519 private key")
        return cls(key)

    def sign(self, *, node_id: str, task_id: str, attempt: int, action: str, now: float | None = None) -> str:
        """A token for one call: ``action`` is ``execute`` or ``stop``."""
        issued = int(now if now is not None else time.time())
        claims = {
            "iss": ISSUER,
            "aud": node_id,
            "sub": "pool",
            "task_id": task_id,
            "attempt": attempt,
            "action": action,
            "iat": issued,
            "exp": issued + TOKEN_SECONDS,
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, self._key, algorithm=ALGORITHM)
