"""Turn what the user submits (a folder or a zip) into the bytes of a task zip."""

from __future__ import annotations

import io
import os
import re
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cli.errors import USAGE, CliError

EXCLUDED_DIRS = frozenset({".git", "__pycache__", ".venv"})
Advance = Callable[[int], None]


@dataclass(frozen=True)
class Packed:
    data: bytes
    files: int
    skipped_links: int = 0


def files_to_pack(folder: Path) -> tuple[list[Path], int]:
    """Regular files under ``folder`` (sorted, without .git, __pycache__ or .venv) and how many symlinks were left out.

    Symlinks are left out because the pool refuses zips that contain them.
    """
    found: list[Path] = []
    links = 0
    for root, dirs, names in os.walk(folder):
        links += sum(1 for d in dirs if os.path.islink(os.path.join(root, d)))
        dirs[:] = sorted(d for d in dirs if d not in EXCLUDED_DIRS and not os.path.islink(os.path.join(root, d)))
        for name in sorted(names):
            path = Path(root, name)
            if path.is_symlink():
                links += 1
            elif path.is_file():
                found.append(path)
    return found, links


def pack(path: Path, advance: Advance | None = None) -> Packed:
    """The task zip for ``path``: a zip file as it is, or a folder zipped (``advance(bytes)`` as it goes).

    Raises CliError (usage) when the path is neither a folder nor a zip, or a folder has no files.
    """
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise CliError(f"{path} is not a zip file; submit a folder or a .zip", USAGE)
        data = path.read_bytes()
        if advance:
            advance(len(data))
        return Packed(data, files=len(zipfile.ZipFile(io.BytesIO(data)).namelist()))
    if not path.is_dir():
        raise CliError(f"{path} is neither a folder nor a zip file", USAGE)
    files, links = files_to_pack(path)
    if not files:
        raise CliError(f"{path} has no files to submit", USAGE)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in files:
            archive.write(file, file.relative_to(path).as_posix())
            if advance:
                advance(file.stat().st_size)
    return Packed(buffer.getvalue(), files=len(files), skipped_links=links)


def total_size(path: Path) -> int:
    """Bytes ``pack`` will read (for a progress bar)."""
    if path.is_dir():
        return sum(f.stat().st_size for f in files_to_pack(path)[0])
    return path.stat().st_size if path.is_file() else 0


def default_task_id(path: Path) -> str:
    """A fresh task id from the folder or zip name: ``<name>-<8 hex>``, within the pool's id rules."""
    stem = path.resolve().name.removesuffix(".zip")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip(".-")[:40] or "task"
    return f"{name}-{uuid.uuid4().hex[:8]}"
