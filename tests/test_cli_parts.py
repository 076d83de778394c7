"""The CLI's parts without a pool: the token store, packing a folder, and what each gRPC error says."""

from __future__ import annotations

import io
import os
import stat
import zipfile
from pathlib import Path

import grpc
import pytest

from cli.credentials import CredentialStore, Login, config_dir
from cli.errors import REFUSED, UNREACHABLE, USAGE, CliError, from_rpc
from cli.packing import default_task_id, pack


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"XDG_CONFIG_HOME": "/srv/conf"}, Path("/srv/conf/hivemind")),
        ({"XDG_CONFIG_HOME": ""}, Path.home() / ".config" / "hivemind"),
        ({"XDG_CONFIG_HOME": "relative/dir"}, Path.home() / ".config" / "hivemind"),  # the spec says ignore it
        ({}, Path.home() / ".config" / "hivemind"),
    ],
)
def test_config_dir_follows_xdg(environ: dict[str, str], expected: Path) -> None:
    assert config_dir(environ) == expected


def test_tokens_are_kept_per_pool_owner_only_and_never_shown(tmp_path: Path) -> None:
    store = CredentialStore.for_user({"XDG_CONFIG_HOME": str(tmp_path)})
    assert store.get("a:1") is None
    store.save("a:1", Login("alice", "secret-token-a"))
    store.save("b:2", Login("bob", "secret-token-b"))
    assert store.get("a:1") == Login("alice", "secret-token-a")
    assert "secret-token" not in repr(store.get("b:2"))
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    os.chmod(store.path, 0o644)  # someone widened it: the next write narrows it again
    store.save("a:1", Login("alice", "renewed"))
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert store.forget("a:1") == Login("alice", "renewed")
    assert store.get("a:1") is None and store.get("b:2") is not None
    assert store.forget("a:1") is None
    assert [p.name for p in store.path.parent.iterdir()] == ["credentials.json"]  # no temporary files left


def test_a_damaged_credentials_file_reads_as_logged_out(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path / "credentials.json")
    store.path.write_text("{not json")
    assert store.get("a:1") is None
    store.save("a:1", Login("alice", "t"))
    assert store.get("a:1") == Login("alice", "t")


def test_a_folder_is_zipped_without_vcs_caches_virtualenvs_or_links(tmp_path: Path) -> None:
    root = tmp_path / "my job!"
    (root / "data").mkdir(parents=True)
    (root / "main.py").write_text("print(1)\n")
    (root / "data" / "in.txt").write_text("6 7\n")
    for junk in (".git/HEAD", "__pycache__/m.pyc", ".venv/bin/python", "data/__pycache__/x.pyc"):
        (root / junk).parent.mkdir(parents=True, exist_ok=True)
        (root / junk).write_text("junk")
    (root / "link.txt").symlink_to(root / "main.py")
    (root / "outside").symlink_to(tmp_path)
    read: list[int] = []

    packed = pack(root, read.append)

    names = sorted(zipfile.ZipFile(io.BytesIO(packed.data)).namelist())
    assert names == ["data/in.txt", "main.py"]
    assert packed.files == 2 and packed.skipped_links == 2 and sum(read) == 13
    assert default_task_id(root).startswith("my-job-")


def test_a_zip_goes_as_it_is_and_anything_else_is_a_usage_error(tmp_path: Path) -> None:
    archive = tmp_path / "task.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("main.py", "print(1)\n")
    assert pack(archive).data == archive.read_bytes()
    assert default_task_id(archive).startswith("task-")
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "notes.txt", tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(CliError) as caught:
            pack(bad)
        assert caught.value.exit_code == USAGE


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str, trailers: tuple[tuple[str, str], ...] = ()) -> None:
        self._code, self._details, self._trailers = code, details, trailers

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._trailers


S = grpc.StatusCode


@pytest.mark.parametrize(
    ("code", "details", "exit_code", "says"),
    [
        (S.UNAVAILABLE, "failed to connect to all addresses; last error: ...", UNREACHABLE, "cannot reach the pool"),
        (S.UNAVAILABLE, "the database is unavailable; try again shortly", UNREACHABLE, "database is unavailable"),
        (S.DEADLINE_EXCEEDED, "Deadline Exceeded", UNREACHABLE, "did not answer within 30 s"),
        (S.UNAUTHENTICATED, "token expired: log in again", USAGE, "hivemind login"),
        (S.INVALID_ARGUMENT, "task_id must be 1–64 characters", USAGE, "invalid request: task_id"),
        (S.PERMISSION_DENIED, "task t belongs to another user", REFUSED, "belongs to another user"),
        (S.NOT_FOUND, "no task 'x'", REFUSED, "no task 'x'"),
        (S.RESOURCE_EXHAUSTED, "too many failed logins", REFUSED, "retry in 7 s"),
        (S.UNIMPLEMENTED, "Method not found!", REFUSED, "older version"),
        (S.INTERNAL, "internal error; the operator has been told", REFUSED, "the pool failed (INTERNAL)"),
    ],
)
def test_each_grpc_error_becomes_one_actionable_line(
    code: grpc.StatusCode, details: str, exit_code: int, says: str
) -> None:
    error = from_rpc(FakeRpcError(code, details, (("retry-after", "7"),)), "pool:50051", 30.0)
    assert error.exit_code == exit_code
    assert says in str(error) and "\n" not in str(error)
