"""Secrets the pool generates on first use (the JWT secret, the signing key), when several of its
processes start together, as `up`'s servers do: every one reads the one kept, whole.

Each round starts its processes at once (a barrier) on a fresh data directory; before the secret
was linked into place whole, a process that lost the race could read the winner's file before it
was written, and fail (the key) or go on with an empty secret (the JWT one).
"""

from __future__ import annotations

import multiprocessing
import stat
from pathlib import Path
from typing import Any

import pytest

from orchestration.signing import PoolSigner
from pool.secrets import keep_once, load_or_create_jwt_secret

PROCESSES = 8
ROUNDS = 10


def _signing_key(path: str, barrier: Any) -> str:
    barrier.wait()
    return PoolSigner.load_or_create(Path(path)).public_key_pem


def _jwt_secret(folder: str, barrier: Any) -> str:
    barrier.wait()
    return load_or_create_jwt_secret(None, Path(folder))


@pytest.mark.parametrize("what", ["signing key", "jwt secret"])
def test_processes_starting_together_all_read_the_one_kept(tmp_path: Path, what: str) -> None:
    context = multiprocessing.get_context("fork")
    with context.Manager() as manager, context.Pool(PROCESSES) as workers:
        for number in range(ROUNDS):
            folder = tmp_path / f"data{number}"
            barrier = manager.Barrier(PROCESSES)
            if what == "signing key":
                calls = [(str(folder / "pool_ed25519.pem"), barrier)] * PROCESSES
                read = workers.starmap(_signing_key, calls)
            else:
                read = workers.starmap(_jwt_secret, [(str(folder), barrier)] * PROCESSES)
            assert len(set(read)) == 1 and read[0], f"round {number}: {len(set(read))} different secrets"
            assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []  # no staged file left


def test_a_kept_file_is_private_and_never_replaced(tmp_path: Path) -> None:
    path = tmp_path / "deeper" / "secret"

    assert keep_once(path, lambda: b"first") == (b"first", True)
    assert keep_once(path, lambda: pytest.fail("made again although kept")) == (b"first", False)
    assert path.read_bytes() == b"first"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
