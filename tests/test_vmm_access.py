"""The VMM's access rules without QEMU: the secret it reads, the calls it takes,
the directories it opens (real pipes, real directories and symlinks)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmmgate.vmm.access import SnapshotRoots, read_secret
from vmmgate.vmm.errors import InvalidRequest, SnapshotIOError
from vmmgate.vmm.rpcserver import Dispatcher
from vmmgate.vmm.targets import check_targets

SECRET = "ab" * 32


def pipe_with(data: bytes) -> int:
    """Return the read end of a pipe holding ``data`` and then end of file."""
    read_fd, write_fd = os.pipe()
    os.write(write_fd, data)
    os.close(write_fd)
    return read_fd


def test_the_secret_is_read_to_the_end_and_its_descriptor_closed() -> None:
    fd = pipe_with(SECRET.encode() + b"\n")
    assert read_secret(fd) == SECRET
    with pytest.raises(OSError):
        os.fstat(fd)


@pytest.mark.parametrize(
    "data",
    [b"", b"short", b"\xff" * 40, b"a" * 40 + b" " + b"b" * 40, b"x" * 5000],
    ids=["empty", "short", "not-ascii", "space", "too-long"],
)
def test_a_bad_secret_is_refused_without_showing_it(data: bytes) -> None:
    with pytest.raises(ValueError) as caught:
        read_secret(pipe_with(data))
    if data:
        assert data[:8].decode("latin-1") not in str(caught.value)


def test_the_dispatcher_requires_the_secret_first_and_knows_only_its_table() -> None:
    done: list[tuple] = []
    dispatcher = Dispatcher({"pause": lambda *a: done.append(a) or "Success"}, SECRET)
    call = dispatcher.lookup("pause")
    assert call is not None
    for args in [
        (),
        ("nope",),
        (SECRET[:-1],),
        (42,),
        (None, SECRET),
        (SECRET.upper(),),
    ]:
        with pytest.raises(RuntimeError, match="^unauthorized: "):
            call(*args)
    assert done == []
    assert call(SECRET) == "Success" and done == [()]
    assert dispatcher.lookup("__init__") is None
    assert dispatcher.lookup("_wrap") is None
    # Without a secret: the original protocol, arguments as they come.
    open_one = Dispatcher({"pause": lambda *a: a})
    assert open_one.lookup("pause")("x", 1) == ("x", 1)  # type: ignore[misc]


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    """root/{sub/, link -> outside, file -> outside/victim}, and outside/victim."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "victim").write_text("keep\n")
    (root / "link").symlink_to(outside, target_is_directory=True)
    (root / "file").symlink_to(outside / "victim")
    return root, outside


def opened(roots: SnapshotRoots, target: Path) -> Path:
    """Open ``target``'s directory as the writer does; return where it really is."""
    fd = roots.open_dir(target, "cpu_snapshot_path")
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    finally:
        os.close(fd)


def test_roots_open_only_real_directories_below_them(tree: tuple[Path, Path]) -> None:
    root, outside = tree
    roots = SnapshotRoots([root])
    assert opened(roots, root / "sub" / "x") == root / "sub"
    assert opened(roots, root / "x") == root
    assert opened(roots, root / "sub" / ".." / "sub" / "x") == root / "sub"
    for target, words in [
        (outside / "x", "outside this VMM's snapshot roots"),
        (root / ".." / "outside" / "x", "outside this VMM's snapshot roots"),
        (root / "link" / "x", "symbolic link"),
        (root / "file" / "x", "not a directory"),
    ]:
        with pytest.raises(InvalidRequest, match=words):
            opened(roots, target)
    with pytest.raises(SnapshotIOError, match="no such directory"):
        opened(roots, root / "missing" / "x")
    # Unconfined (a VMM started by hand): opened by its path, links followed.
    assert opened(SnapshotRoots(), root / "link" / "x") == outside


def test_a_root_named_through_a_symlink_matches_its_resolved_targets(
    tree: tuple[Path, Path], tmp_path: Path
) -> None:
    root, _ = tree
    alias = tmp_path / "alias"
    alias.symlink_to(root, target_is_directory=True)
    roots = SnapshotRoots([alias])
    assert opened(roots, root / "sub" / "x") == root / "sub"
    assert opened(roots, alias / "sub" / "x") == root / "sub"


def test_check_targets_refuses_a_final_symlink_and_one_file_twice(
    tree: tuple[Path, Path],
) -> None:
    root, outside = tree
    roots = SnapshotRoots([root])
    with pytest.raises(InvalidRequest, match="is a symbolic link"):
        check_targets(root / "file", root / "m", 0, roots)
    with pytest.raises(InvalidRequest, match="same file"):
        check_targets(root / "sub" / "a", root / "sub" / ".." / "sub" / "a", 0, roots)
    with check_targets(root / "sub" / "c", root / "sub" / "m", 0, roots) as targets:
        assert targets.cpu.path == root / "sub" / "c"
    assert (outside / "victim").read_text() == "keep\n"
