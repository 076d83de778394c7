"""Login tokens kept between commands, one per pool, in the user's config directory.

The file is ``$XDG_CONFIG_HOME/hivemind/credentials.json`` (``~/.config/…`` by default), readable
by its owner only (0600, in a 0700 directory). Tokens are never printed.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

FILE_NAME = "credentials.json"


@dataclass(frozen=True)
class Login:
    """Who is logged in to one pool, and the token that proves it."""

    username: str
    token: str = field(repr=False)


def config_dir(environ: Mapping[str, str]) -> Path:
    """``$XDG_CONFIG_HOME/hivemind``, or ``~/.config/hivemind`` when it is unset or not absolute."""
    base = environ.get("XDG_CONFIG_HOME", "")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".config"
    return root / "hivemind"


class CredentialStore:
    """Read and write the credentials file. Writes are atomic and never widen its permissions."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def for_user(cls, environ: Mapping[str, str]) -> CredentialStore:
        return cls(config_dir(environ) / FILE_NAME)

    def _load(self) -> dict[str, dict[str, str]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return {}  # unreadable or damaged: as if logged out; the next login rewrites it
        pools = data.get("pools") if isinstance(data, dict) else None
        return pools if isinstance(pools, dict) else {}

    def get(self, pool: str) -> Login | None:
        """The login kept for ``pool``, or None."""
        entry = self._load().get(pool)
        if isinstance(entry, dict) and entry.get("username") and entry.get("token"):
            return Login(str(entry["username"]), str(entry["token"]))
        return None

    def save(self, pool: str, login: Login) -> None:
        """Keep ``login`` for ``pool`` (replacing any other). Raises OSError when the file cannot be written."""
        pools = self._load()
        pools[pool] = {"username": login.username, "token": login.token}
        self._write(pools)

    def forget(self, pool: str) -> Login | None:
        """Drop the login kept for ``pool``; returns it (None when there was none)."""
        pools = self._load()
        found = self.get(pool)
        if pools.pop(pool, None) is not None:
            self._write(pools)
        return found

    def _write(self, pools: dict[str, dict[str, str]]) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w") as handle:
                os.fchmod(handle.fileno(), 0o600)  # even if the file was left behind with wider rights
                json.dump({"pools": pools}, handle, indent=2)
            os.replace(temporary, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise
