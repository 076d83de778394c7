"""Task zips: what is extracted, what is refused, which entrypoint runs, what the result holds."""

from __future__ import annotations

import io
import os
import stat
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import workspace
from agent.workspace import UnsafeZip, ZipLimits
from tests.agent_fixtures import make_zip, raw_zip

REG, LNK, CHR, FIFO = stat.S_IFREG | 0o644, stat.S_IFLNK | 0o777, stat.S_IFCHR | 0o644, stat.S_IFIFO | 0o644


def test_a_good_zip_is_extracted_with_its_folders_and_exec_bits(tmp_path: Path) -> None:
    data = make_zip({"main.py": "print(1)", "data/input.txt": "hello", "run.sh": "echo hi"}, executable=("run.sh",))

    names = workspace.extract(data, tmp_path / "ws")

    assert sorted(names) == ["data/input.txt", "main.py", "run.sh"]
    assert (tmp_path / "ws" / "data" / "input.txt").read_text() == "hello"
    assert os.stat(tmp_path / "ws" / "run.sh").st_mode & 0o100
    assert not os.stat(tmp_path / "ws" / "main.py").st_mode & 0o100


@pytest.mark.parametrize(
    ("entries", "reason"),
    [
        ([("../evil.txt", b"x", REG)], "'..' in the path"),
        ([("ok/../../evil.txt", b"x", REG)], "'..' in the path"),
        ([("..\\evil.txt", b"x", REG)], "'..' in the path"),
        ([("/etc/evil", b"x", REG)], "absolute path"),
        ([("C:/evil", b"x", REG)], "absolute path"),
        ([("link", b"/etc/passwd", LNK)], "symbolic link"),
        ([("dev", b"", CHR)], "device, pipe or socket"),
        ([("fifo", b"", FIFO)], "device, pipe or socket"),
        ([("main.py", b"x", REG), ("main.py", b"y", REG)], "duplicate name"),
    ],
)
def test_unsafe_entries_refuse_the_whole_zip_and_write_nothing(
    tmp_path: Path, entries: list[tuple[str, bytes, int]], reason: str
) -> None:
    data = raw_zip([("main.py", b"print(1)", REG), *entries] if entries[0][0] != "main.py" else entries)
    dest = tmp_path / "deep" / "ws"

    with pytest.raises(UnsafeZip, match=reason.replace("(", r"\(").replace(")", r"\)")):
        workspace.extract(data, dest)

    assert not dest.exists()
    assert not (tmp_path / "deep" / "evil.txt").exists()
    assert not (tmp_path / "evil.txt").exists()


def test_a_zip_slip_cannot_write_outside_the_workspace(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    data = raw_zip([("main.py", b"print(1)", REG), ("../outside.txt", b"pwned", REG)])

    with pytest.raises(UnsafeZip):
        workspace.extract(data, tmp_path / "ws")

    assert not outside.exists()


@pytest.mark.parametrize("data", [b"", b"not a zip at all", b"PK\x03\x04 truncated"])
def test_something_that_is_not_a_zip_is_refused(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(UnsafeZip, match="not a zip file"):
        workspace.extract(data, tmp_path / "ws")


def test_a_zip_bomb_is_refused_by_its_ratio(tmp_path: Path) -> None:
    data = make_zip({"main.py": "print(1)", "zeros.bin": b"\0" * (20 * 2**20)})

    with pytest.raises(UnsafeZip, match="compression ratio"):
        workspace.extract(data, tmp_path / "ws")


def test_a_zip_larger_than_allowed_once_uncompressed_is_refused(tmp_path: Path) -> None:
    data = make_zip({"main.py": "print(1)", "big.bin": os.urandom(300_000)})

    with pytest.raises(UnsafeZip, match="uncompressed size"):
        workspace.extract(data, tmp_path / "ws", ZipLimits(max_total_bytes=200_000))


def test_too_many_entries_are_refused(tmp_path: Path) -> None:
    data = make_zip({f"f{i}.txt": "x" for i in range(30)})

    with pytest.raises(UnsafeZip, match="too many entries: 30 > 20"):
        workspace.extract(data, tmp_path / "ws", ZipLimits(max_entries=20))


def test_an_entry_larger_than_it_declares_is_caught_while_copying(tmp_path: Path) -> None:
    data = bytearray(make_zip({"main.py": "print('hello world, hello world')"}))
    # lower the declared size in both headers: the data now inflates to more than declared
    for marker, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.index(marker) + offset
        data[at : at + 4] = (4).to_bytes(4, "little")

    with pytest.raises(UnsafeZip, match="corrupt"):
        workspace.extract(bytes(data), tmp_path / "ws")


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        ({"run.sh", "main.py"}, "run.sh"),
        ({"main.py", "app.py", "run.py", "start.py"}, "main.py"),
        ({"app.py", "run.py", "start.py"}, "app.py"),
        ({"run.py", "start.py"}, "run.py"),
        ({"start.py", "helper.py"}, "start.py"),
        ({"helper.py", "README.md"}, None),
        (set(), None),
    ],
)
def test_entrypoint_choice_follows_the_hivemind_convention(names: set[str], expected: str | None) -> None:
    assert workspace.choose_entrypoint(names) == expected


@pytest.mark.parametrize(
    ("entrypoint", "argv"),
    [("run.sh", ["bash", "run.sh"]), ("main.py", ["/py", "-u", "main.py"]), ("start.py", ["/py", "-u", "start.py"])],
)
def test_entry_command(entrypoint: str, argv: list[str]) -> None:
    assert workspace.entry_command(entrypoint, "/py") == argv


def test_a_zip_wrapped_in_one_folder_runs_from_that_folder(tmp_path: Path) -> None:
    workspace.extract(make_zip({"project/main.py": "print(1)", "__MACOSX/._main.py": "junk"}), tmp_path / "ws")

    root = workspace.task_root(tmp_path / "ws")

    assert root == tmp_path / "ws" / "project"
    assert workspace.choose_entrypoint(workspace.top_level_files(root)) == "main.py"


def _names(data: bytes) -> list[str]:
    return sorted(zipfile.ZipFile(io.BytesIO(data)).namelist())


def test_the_result_is_the_output_folder_when_there_is_one(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    workspace.extract(make_zip({"main.py": "x", "input.txt": "in"}), root)
    before = workspace.snapshot(root)
    (root / "output").mkdir()
    (root / "output" / "result.txt").write_text("42")
    (root / "scratch.tmp").write_text("not part of the result")

    assert _names(workspace.result_zip(root, before, max_bytes=10**6)) == ["output/result.txt"]


def test_without_an_output_folder_the_result_is_what_the_task_created_or_changed(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    workspace.extract(make_zip({"main.py": "x", "input.txt": "in", "notes.txt": "old"}), root)
    before = workspace.snapshot(root)
    (root / "new.txt").write_text("made by the task")
    (root / "notes.txt").write_text("changed by the task")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "x.pyc").write_bytes(b"cache")
    (root / "link").symlink_to("/etc/passwd")

    assert _names(workspace.result_zip(root, before, max_bytes=10**6)) == ["new.txt", "notes.txt"]


def test_what_a_task_names_or_nests_oddly_is_still_in_its_result(tmp_path: Path) -> None:
    """Linux lets a task name a file with any bytes, and nest folders without end."""
    root = tmp_path / "ws"
    output = os.fsencode(root / "output")
    os.makedirs(output + b"/caf\xe9")  # Latin-1, not UTF-8
    (Path(os.fsdecode(output + b"/caf\xe9")) / "menu.txt").write_text("soup")
    try:
        deep = output
        for _ in range(1200):  # deeper than os.walk's and shutil.rmtree's recursion goes
            deep += b"/d"
            os.mkdir(deep)
        Path(os.fsdecode(deep + b"/bottom.txt")).write_text("found")

        data = workspace.result_zip(root, {}, max_bytes=10**6)

        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            assert archive.read("output/caf\ufffd/menu.txt") == b"soup"
            assert archive.read("output" + "/d" * 1200 + "/bottom.txt") == b"found"
    finally:  # the agent removes it afterwards, as pytest's own clean-up (shutil.rmtree) could not
        workspace.remove_tree(root)
    assert not root.exists()


def test_a_result_over_the_limit_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    root.mkdir()
    (root / "big.bin").write_bytes(os.urandom(200_000))

    with pytest.raises(workspace.ResultTooLarge):
        workspace.result_zip(root, {}, max_bytes=100_000)


@pytest.mark.parametrize("names", [("a", "a/b"), ("a/b", "a"), ("a", "a/b/c"), ("a/b", "a/b/c")])
def test_a_file_where_a_folder_goes_is_a_clash(tmp_path: Path, names: tuple[str, str]) -> None:
    with pytest.raises(UnsafeZip, match="clashes with another entry"):
        workspace.extract(make_zip(dict.fromkeys(names, "x")), tmp_path / "ws")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    changes=st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255)), max_size=4),
)
def test_a_zip_with_any_bytes_changed_is_extracted_or_refused_as_unsafe(
    tmp_path_factory: pytest.TempPathFactory, changes: list[tuple[int, int]]
) -> None:
    """A pool could send anything: the agent extracts it or refuses it, and nothing else happens."""
    data = bytearray(CHANGED_BASE)
    for at, value in changes:
        data[at % len(data)] = value
    dest = tmp_path_factory.mktemp("ws") / "ws"
    try:
        written = workspace.extract(bytes(data), dest)
    except UnsafeZip:
        return
    assert all((dest / name).resolve().is_relative_to(dest.resolve()) for name in written)


CHANGED_BASE = make_zip({"main.py": "print(1)\n", "data/notes.txt": "line of text\n" * 200, "data/empty": b""})
