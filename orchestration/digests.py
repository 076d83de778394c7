"""A task zip's digest, as its row keeps it: ``"<algorithm>:<hex>"``.

It tells a repeated upload from a different one under the same task id, and nothing else: it
is compared only with the digest of the same user's earlier upload under that id (another
user's id is refused before), so it needs no resistance to collisions crafted on purpose, only
to chance ones. New digests are XXH3-128 (100 MiB in 10 ms of a core on the benchmarks'
machine, where BLAKE3 took 34–46 ms and sha256 with the CPU's SHA instructions 73–84 ms).
Tasks uploaded before keep their ``"blake3:<hex>"`` or ``"sha256:<hex>"`` (migration 0004), and
a repeat of such an upload is hashed that way to be compared.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3
import xxhash

ZIP_DIGEST = "xxh3-128"
_HASHERS: dict[str, Callable[[], Any]] = {
    "xxh3-128": xxhash.xxh3_128,
    "blake3": blake3.blake3,
    "sha256": hashlib.sha256,
}
_READ = 4 << 20  # bytes of a file hashed at a time


def zip_hasher(algorithm: str = ZIP_DIGEST) -> Any:
    """A new hasher of ``algorithm`` (ValueError for one not known)."""
    try:
        return _HASHERS[algorithm]()
    except KeyError:
        raise ValueError(f"no such zip digest algorithm: {algorithm!r}") from None


def zip_digest(data: bytes | memoryview, algorithm: str = ZIP_DIGEST) -> str:
    hasher = zip_hasher(algorithm)
    hasher.update(data)
    return f"{algorithm}:{hasher.hexdigest()}"


def file_zip_digest(path: Path, algorithm: str = ZIP_DIGEST) -> str:
    """:func:`zip_digest` of the file at ``path``, read a piece at a time."""
    hasher = zip_hasher(algorithm)
    with path.open("rb") as handle:
        while piece := handle.read(_READ):
            hasher.update(piece)
    return f"{algorithm}:{hasher.hexdigest()}"


def matches(kept: str, digest: str, *, data: bytes | memoryview, staged: Path | None) -> bool:
    """Whether the zip whose digest is ``digest`` is the one ``kept`` names. A ``kept`` digest of
    another algorithm (an upload from before XXH3-128) is compared by hashing the zip that way again:
    ``data``, or the file ``staged`` when ``data`` is empty. One of no known algorithm matches nothing."""
    algorithm = kept.partition(":")[0]
    if algorithm == digest.partition(":")[0]:
        return kept == digest
    try:
        return kept == (zip_digest(data, algorithm) if data or staged is None else file_zip_digest(staged, algorithm))
    except ValueError:
        return False
