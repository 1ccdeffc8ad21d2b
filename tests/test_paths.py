"""Client paths: relative to the working directory, confined to roots, no tricks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmmgate.core.paths import PathPolicy
from vmmgate.errors import PathRefused


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A working directory (kernel and snapshot root) and a secret outside it."""
    (tmp_path / "work" / "snaps").mkdir(parents=True)
    (tmp_path / "work" / "vmlinuz").write_bytes(b"kernel")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("canary")
    return tmp_path


@pytest.fixture
def policy(tree: Path) -> PathPolicy:
    """Roots: the working directory only."""
    work = tree / "work"
    return PathPolicy(cwd=work, kernel_roots=(work,), snapshot_roots=(work,))


def test_relative_and_absolute_kernels(policy: PathPolicy, tree: Path) -> None:
    """Relative paths resolve against the working directory."""
    expected = tree / "work" / "vmlinuz"
    assert policy.kernel("vmlinuz") == expected
    assert policy.kernel("./snaps/../vmlinuz") == expected
    assert policy.kernel(str(expected)) == expected


@pytest.mark.parametrize(
    "raw", ["../outside/secret", "/etc/passwd", "snaps/../../outside/secret", "/"]
)
def test_escapes_are_refused_naming_roots_and_setting(
    policy: PathPolicy, raw: str
) -> None:
    """Outside the roots: the error names the roots and the setting."""
    with pytest.raises(PathRefused, match="outside the allowed kernel roots") as info:
        policy.kernel(raw)
    assert "VMMGATE_KERNEL_ROOTS" in str(info.value)
    assert str(policy.cwd) in str(info.value)


def test_final_symlink_out_of_root_is_refused(policy: PathPolicy, tree: Path) -> None:
    """A symlink inside a root pointing outside is judged by its target."""
    (tree / "work" / "link").symlink_to(tree / "outside" / "secret")
    with pytest.raises(PathRefused, match="outside"):
        policy.kernel("link")
    with pytest.raises(PathRefused, match="outside"):
        policy.snapshot_target("link", "cpu_snapshot_path")


def test_refusal_never_tells_where_a_symlink_points(
    policy: PathPolicy, tree: Path
) -> None:
    """Outside a root through a link, or into a missing directory: the error shows the
    client's own spelling, never the link's target."""
    (tree / "work" / "link").symlink_to(tree / "outside" / "secret")
    (tree / "work" / "door").symlink_to(tree / "outside" / "hidden-dir")
    (tree / "work" / "inner").symlink_to(tree / "work" / "snaps" / "missing-dir")
    (tree / "work" / "dangling").symlink_to(tree / "work" / "snaps" / "missing-dir")
    for call in (
        lambda: policy.kernel("dangling"),
        lambda: policy.kernel("link"),
        lambda: policy.snapshot_target("door/new", "cpu_snapshot_path"),
        lambda: policy.snapshot_target("inner/new", "cpu_snapshot_path"),
    ):
        with pytest.raises(PathRefused) as info:
            call()
        message = str(info.value)
        assert "secret" not in message and "hidden-dir" not in message, message
        assert "missing-dir" not in message, message


def test_intermediate_symlink_out_of_root_is_refused(
    policy: PathPolicy, tree: Path
) -> None:
    """A symlinked directory leading out is refused, for reading and writing."""
    (tree / "work" / "door").symlink_to(tree / "outside")
    with pytest.raises(PathRefused, match="outside"):
        policy.snapshot_source("door/secret", "cpu_snapshot_path")
    with pytest.raises(PathRefused, match="outside"):
        policy.snapshot_target("door/new", "cpu_snapshot_path")
    assert (tree / "outside" / "secret").read_text() == "canary"
    assert not (tree / "outside" / "new").exists()


def test_symlink_inside_root_is_fine(policy: PathPolicy, tree: Path) -> None:
    """A symlink that stays inside the root resolves to its target."""
    (tree / "work" / "current").symlink_to("vmlinuz")
    assert policy.kernel("current") == tree / "work" / "vmlinuz"


def test_dangling_symlink_out_is_refused_for_writing(
    policy: PathPolicy, tree: Path
) -> None:
    """A dangling link to outside cannot be used to create a file there."""
    (tree / "work" / "trap").symlink_to(tree / "outside" / "created")
    with pytest.raises(PathRefused, match="outside"):
        policy.snapshot_target("trap", "memory_snapshot_path")


@pytest.mark.parametrize(
    "raw", ["vm\0linuz", "vm\nlinuz", "a\rb", "\x1b[31m", "x\x7f", ""]
)
def test_control_characters_and_empty(policy: PathPolicy, raw: str) -> None:
    """NUL, newline and other control characters are refused outright."""
    with pytest.raises(PathRefused):
        policy.kernel(raw)


@pytest.mark.parametrize("char", ["\x80", "\x85", "\x9b", "\x9f"])
def test_c1_control_characters_are_refused(
    policy: PathPolicy, tree: Path, char: str
) -> None:
    """C1 controls (U+0080..U+009F: NEL, CSI...) are refused, even naming a real file."""
    name = f"vm{char}linuz"
    (tree / "work" / name).write_bytes(b"kernel")  # exists: only the character is wrong
    with pytest.raises(PathRefused, match="control character"):
        policy.kernel(name)
    with pytest.raises(PathRefused, match="control character"):
        policy.snapshot_target(f"snaps/{name}", "cpu_snapshot_path")


@pytest.mark.parametrize("char", ["\xa0", "\xe9"])
def test_printable_non_ascii_is_accepted(
    policy: PathPolicy, tree: Path, char: str
) -> None:
    """Just past C1 (U+00A0), accented letters: accepted, so the check is not too wide."""
    name = f"vm{char}linuz"
    (tree / "work" / name).write_bytes(b"kernel")
    assert policy.kernel(name) == tree / "work" / name


@pytest.mark.parametrize("raw", ["a" * 5000, "a" * 256, "x/" * 2100, "\ud800"])
def test_overlong_or_unencodable(policy: PathPolicy, raw: str) -> None:
    """Over PATH_MAX, a component over NAME_MAX, or a lone surrogate."""
    with pytest.raises(PathRefused):
        policy.snapshot_target(raw, "cpu_snapshot_path")


def test_missing_and_non_regular_kernels(policy: PathPolicy, tree: Path) -> None:
    """A kernel must exist and be a regular file (not a directory or FIFO)."""
    with pytest.raises(PathRefused, match="does not exist"):
        policy.kernel("nope")
    with pytest.raises(PathRefused, match="not a regular file"):
        policy.kernel("snaps")
    os.mkfifo(tree / "work" / "fifo")
    with pytest.raises(PathRefused, match="not a regular file"):
        policy.kernel("fifo")
    with pytest.raises(PathRefused, match="not a regular file"):
        policy.snapshot_target("fifo", "cpu_snapshot_path")


def test_comma_in_kernel_path_is_refused(policy: PathPolicy, tree: Path) -> None:
    """path=K,starter_file=F would be ambiguous."""
    (tree / "work" / "a,b").write_bytes(b"k")
    with pytest.raises(PathRefused, match="comma"):
        policy.kernel("a,b")


def test_snapshot_targets(policy: PathPolicy, tree: Path) -> None:
    """A target's directory must exist and be writable; the file may exist."""
    assert policy.snapshot_target("snaps/cpu", "c") == tree / "work" / "snaps" / "cpu"
    assert policy.snapshot_target("vmlinuz", "c") == tree / "work" / "vmlinuz"
    with pytest.raises(PathRefused, match="does not exist"):
        policy.snapshot_target("nodir/cpu", "c")
    with pytest.raises(PathRefused, match="not a regular file"):
        policy.snapshot_target("snaps", "c")


@pytest.mark.parametrize(
    "raw", ["-rf", "a b", "$(touch x)", "; rm", "a'b", "<cpu_path>"]
)
def test_odd_names_are_literal(policy: PathPolicy, tree: Path, raw: str) -> None:
    """Shell-looking names are just names under the root."""
    assert policy.snapshot_target(raw, "c") == tree / "work" / raw


def test_several_roots(tree: Path) -> None:
    """A path under any root is accepted."""
    policy = PathPolicy(
        cwd=tree / "work",
        kernel_roots=(tree / "work", tree / "outside"),
        snapshot_roots=(tree / "work",),
    )
    assert policy.kernel("../outside/secret") == tree / "outside" / "secret"
    with pytest.raises(PathRefused, match="VMMGATE_SNAPSHOT_ROOTS"):
        policy.snapshot_source("../outside/secret", "cpu_snapshot_path")
