"""Secrets the pool keeps in its data directory when none are configured."""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

log = logging.getLogger(__name__)


def load_or_create_jwt_secret(configured: str | None, data_dir: Path) -> str:
    """The configured secret, else the one kept in ``data_dir``, else a new one saved there (0600).

    Keeping it means tokens survive restarts. Raises OSError when the data dir is not writable.
    """
    if configured:
        return configured
    path = data_dir / "jwt_secret"
    if path.exists():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    # O_EXCL: if two processes race, one creates the file and the other reads it.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(secret)
    log.warning("JWT_SECRET_KEY is not set: generated one and kept it in %s", path)
    return secret
