"""A task's workspace: safe extraction of its zip, its entrypoint, and its result zip.

Extraction refuses the whole zip on any bad entry (SPEC §3): not a zip, too many entries, too
large once uncompressed, a suspicious compression ratio, absolute paths, ``..``, symlinks,
device files, encrypted entries. Nothing is written until every entry has been checked, and
files are written with ``O_EXCL | O_NOFOLLOW`` into a fresh directory.

The result zip is the task root's ``output/`` folder when the task made one, else every file
the task created or changed (inputs it left alone, caches and the task's venv are not included;
the venv lives outside the workspace). Symlinks and special files the task made are skipped;
files are opened without following links, so a task cannot make the agent read outside it.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import stat
import subprocess
import time
import zipfile
import zlib
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

log = logging.getLogger("agent.workspace")

ENTRYPOINTS = ("run.sh", "main.py", "app.py", "run.py", "start.py")  # HiveMind's convention, in order
IGNORED_TOP = frozenset({"__MACOSX"})
SKIPPED_DIRS = frozenset({"__pycache__", ".cache", ".local", ".config"})
OUTPUT_DIR = "output"
COPY_CHUNK = 1 << 16


class UnsafeZip(Exception):
    """The task zip is refused; ``str(error)`` names the entry and the reason."""


class ResultTooLarge(Exception):
    """The task's result zip would exceed the configured limit."""


@dataclass(frozen=True)
class ZipLimits:
    max_entries: int = 10_000
    max_total_bytes: int = 1 << 30  # uncompressed
    max_ratio: float = 200.0  # uncompressed / compressed, per entry and overall
    ratio_floor_bytes: int = 1 << 20  # entries smaller than this are not ratio-checked


def entry_problem(info: zipfile.ZipInfo) -> str | None:
    """Why one zip entry is unsafe, or None when it may be extracted."""
    name = info.filename.replace("\\", "/")
    if not name or "\x00" in name:
        return "empty or NUL in the name"
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    parts = PurePosixPath(name).parts
    if ".." in parts:
        return "'..' in the path"
    if any(len(part.encode()) > 255 for part in parts) or len(name) > 1024:
        return "name too long"
    if info.flag_bits & 0x1:
        return "encrypted entry"
    mode = info.external_attr >> 16
    kind = stat.S_IFMT(mode)
    if kind == stat.S_IFLNK:
        return "symbolic link"
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        return "device, pipe or socket"
    return None


def check(archive: zipfile.ZipFile, limits: ZipLimits) -> list[zipfile.ZipInfo]:
    """The entries of ``archive`` once all are found safe; UnsafeZip otherwise."""
    entries = archive.infolist()
    if len(entries) > limits.max_entries:
        raise UnsafeZip(f"too many entries: {len(entries)} > {limits.max_entries}")
    total = compressed = 0
    seen: set[str] = set()
    for info in entries:
        problem = entry_problem(info)
        if problem:
            raise UnsafeZip(f"entry {info.filename!r}: {problem}")
        key = info.filename.replace("\\", "/").rstrip("/")
        if key in seen:
            raise UnsafeZip(f"entry {info.filename!r}: duplicate name")
        seen.add(key)
        total += info.file_size
        compressed += info.compress_size
        if info.file_size > limits.ratio_floor_bytes and info.file_size > limits.max_ratio * max(info.compress_size, 1):
            raise UnsafeZip(f"entry {info.filename!r}: compression ratio over {limits.max_ratio:g} (zip bomb?)")
    if total > limits.max_total_bytes:
        raise UnsafeZip(f"uncompressed size {total} bytes exceeds {limits.max_total_bytes}")
    if total > limits.ratio_floor_bytes and total > limits.max_ratio * max(compressed, 1):
        raise UnsafeZip(f"overall compression ratio over {limits.max_ratio:g} (zip bomb?)")
    return entries


def extract(data: bytes, dest: Path, limits: ZipLimits | None = None) -> list[str]:
    """Check the zip ``data`` and extract it into the empty directory ``dest``; the file names written.

    Raises UnsafeZip (nothing of a refused zip is written, except when an entry turns out to
    be larger than declared, in which case ``dest`` holds a partial tree the caller discards).
    """
    limits = limits or ZipLimits()
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, ValueError) as error:
        # NotImplementedError: a zip version past what zipfile reads
        raise UnsafeZip(f"not a zip file ({error})") from None
    with archive:
        entries = check(archive, limits)
        dest.mkdir(parents=True, exist_ok=True)
        written: list[str] = []
        budget = limits.max_total_bytes
        for info in entries:
            name = info.filename.replace("\\", "/")
            target = dest.joinpath(*PurePosixPath(name).parts)
            try:
                if info.is_dir() or name.endswith("/"):
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError):  # a file where a folder goes: "a", then "a/b"
                raise UnsafeZip(f"entry {info.filename!r}: clashes with another entry") from None
            executable = bool((info.external_attr >> 16) & 0o100)
            try:
                budget -= _copy_entry(archive, info, target, 0o755 if executable else 0o644, budget)
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, ValueError) as error:
                # ValueError: a directory pointing before the archive's start ("negative seek value")
                raise UnsafeZip(f"entry {info.filename!r}: corrupt or unsupported ({error})") from None
            written.append(name)
    return written


def _copy_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, mode: int, budget: int) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    size = 0
    try:
        fd = os.open(target, flags, mode)
    except FileExistsError:
        raise UnsafeZip(f"entry {info.filename!r}: clashes with another entry") from None
    with os.fdopen(fd, "wb") as out, archive.open(info) as source:
        while chunk := source.read(COPY_CHUNK):
            size += len(chunk)
            if size > info.file_size or size > budget:
                raise UnsafeZip(f"entry {info.filename!r}: larger than it declares (zip bomb?)")
            out.write(chunk)
    return size


def remove_tree(root: Path) -> None:
    """Remove the folder ``root`` and all it holds, as far as it can be; never raises. A task can
    nest folders deeper than shutil.rmtree's recursion goes (RecursionError, even with
    ``ignore_errors``): such a tree is left to ``rm -rf``, which walks it without recursing."""
    try:
        shutil.rmtree(root, ignore_errors=True)
        return
    except RecursionError:
        pass
    try:
        subprocess.run(["rm", "-rf", "--", str(root)], check=False, capture_output=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as error:
        log.warning("could not remove %s: %s", root, error)


def task_root(workspace: Path) -> Path:
    """Where the task's files start: the workspace, or its single top-level folder when the zip
    wrapped everything in one (as "compress folder" does)."""
    children = [child for child in workspace.iterdir() if child.name not in IGNORED_TOP]
    if len(children) == 1 and children[0].is_dir() and not children[0].is_symlink():
        return children[0]
    return workspace


def choose_entrypoint(names: Collection[str]) -> str | None:
    """The entrypoint among the top-level file ``names``: the first of :data:`ENTRYPOINTS` present."""
    for candidate in ENTRYPOINTS:
        if candidate in names:
            return candidate
    return None


def top_level_files(root: Path) -> set[str]:
    return {child.name for child in root.iterdir() if child.is_file() and not child.is_symlink()}


def entry_command(entrypoint: str, python: str) -> list[str]:
    """The argv that runs ``entrypoint`` (relative to the task root) with ``python``."""
    if entrypoint.endswith(".sh"):
        return ["bash", entrypoint]
    return [python, "-u", entrypoint]


Snapshot = dict[str, tuple[int, int]]


def _regular_files(root: Path) -> list[tuple[str, os.stat_result]]:
    """Every regular file under ``root`` by relative path: links not followed, SKIPPED_DIRS left
    out, folders that vanish or cannot be read skipped. Walked with a stack of its own: a task
    can nest its folders deeper than Python's recursion (os.walk's) allows."""
    found = []
    pending = [str(root)]
    while pending:
        try:
            with os.scandir(pending.pop()) as entries:
                listed = list(entries)
        except OSError:
            continue
        for entry in listed:
            try:
                if entry.is_dir(follow_symlinks=False):
                    if entry.name not in SKIPPED_DIRS:
                        pending.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    found.append((os.path.relpath(entry.path, root), entry.stat(follow_symlinks=False)))
            except OSError:
                continue
    return sorted(found, key=lambda item: item[0])


def snapshot(root: Path) -> Snapshot:
    """Size and modification time of every regular file under ``root``, by relative path."""
    return {rel: (info.st_size, info.st_mtime_ns) for rel, info in _regular_files(root)}


def result_zip(root: Path, before: Snapshot, *, max_bytes: int, owner_uid: int | None = None) -> bytes:
    """The result zip (see the module doc). ``owner_uid`` (when the task ran as another user)
    skips files not owned by it, such as hard links to other users' files.

    Raises ResultTooLarge when the zip would exceed ``max_bytes``.
    """
    output = root / OUTPUT_DIR
    if output.is_dir() and not output.is_symlink():
        chosen = [(os.path.join(OUTPUT_DIR, rel), info) for rel, info in _regular_files(output)]
    else:
        chosen = [
            (rel, info) for rel, info in _regular_files(root) if before.get(rel) != (info.st_size, info.st_mtime_ns)
        ]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for rel, _ in chosen:
            _add_file(archive, root, rel, owner_uid, lambda: buffer.tell() > max_bytes)
            if buffer.tell() > max_bytes:
                raise ResultTooLarge(f"the result is larger than {size_text(max_bytes)}")
    data = buffer.getvalue()
    if len(data) > max_bytes:
        raise ResultTooLarge(f"the result is larger than {size_text(max_bytes)}")
    return data


def size_text(size: int) -> str:
    """``52428800`` → ``50 MB``, ``50000`` → ``48.8 KB``."""
    if size >= 2**20:
        return f"{size / 2**20:.3g} MB"
    return f"{size / 2**10:.3g} KB"


def zip_entries(data: bytes) -> int:
    """How many entries the zip ``data`` holds (0 for no data)."""
    if not data:
        return 0
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return len(archive.infolist())


def _add_file(
    archive: zipfile.ZipFile, root: Path, rel: str, owner_uid: int | None, too_large: Callable[[], bool]
) -> None:
    try:
        fd = os.open(root / rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return  # vanished, or replaced by a link: not part of the result
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode) or (owner_uid is not None and info.st_uid != owner_uid):
            return
        entry = zipfile.ZipInfo(_zip_name(rel), date_time=_date_time(info.st_mtime))
        entry.external_attr = (stat.S_IFREG | (info.st_mode & 0o755)) << 16
        entry.compress_type = zipfile.ZIP_DEFLATED
        with archive.open(entry, "w", force_zip64=True) as out:
            while chunk := handle.read(COPY_CHUNK):
                out.write(chunk)
                if too_large():
                    return  # the caller sees the size and refuses the result


def _zip_name(rel: str) -> str:
    """``rel`` as a zip can name it: a name that is not UTF-8 (Linux allows any bytes) with
    U+FFFD for the bytes that are not."""
    return os.fsencode(rel).decode("utf-8", "replace")


def _date_time(mtime: float) -> tuple[int, int, int, int, int, int]:
    parts = time.localtime(max(mtime, 315532800))  # zip dates start in 1980
    return (parts.tm_year, parts.tm_mon, parts.tm_mday, parts.tm_hour, parts.tm_min, parts.tm_sec)
