"""Secrets the pool keeps in its data directory when none are configured."""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def keep_once(path: Path, make: Callable[[], bytes]) -> tuple[bytes, bool]:
    """What ``make()`` gives, kept at ``path`` (mode 0600), unless a file is there already (then
    ``make`` is not called); (what the file holds, whether this call wrote it).

    The file appears whole or not at all: it is written and synced under a name of its own, then
    linked in place, which fails if another process linked its own first. So processes that start
    together (``up``'s servers) all read the one that was kept, never a file half written.
    """
    if path.exists():
        return path.read_bytes(), False
    data = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(staged, path)
        except FileExistsError:
            return path.read_bytes(), False  # another process kept its own first
    finally:
        staged.unlink(missing_ok=True)
    return data, True


def load_or_create_jwt_secret(configured: str | None, data_dir: Path) -> str:
    """The configured secret, else the one kept in ``data_dir``, else a new one saved there (0600).

    Keeping it means tokens survive restarts. Raises OSError when the data dir is not writable.
    """
    if configured:
        return configured
    path = data_dir / "jwt_secret"
    kept, created = keep_once(path, lambda: secrets.token_urlsafe(48).encode())
    if created:
        log.warning("JWT_SECRET_KEY is not set: generated one and kept it in %s", path)
    return kept.decode().strip()
