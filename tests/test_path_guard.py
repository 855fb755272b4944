"""The `path_guard` policy against real calls in forked children (supervisor.testing)."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from supervisor.errors import ConfigError
from supervisor.policy import PolicySet
from supervisor.testing import load, run_policy

ROOT = Path(__file__).resolve().parent.parent
PATH_GUARD = ROOT / "policies" / "path_guard.py"


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path, PolicySet]:
    guarded = tmp_path / "guarded"
    free = tmp_path / "free"
    guarded.mkdir()
    free.mkdir()
    return guarded, free, load(PATH_GUARD, prefixes=[str(guarded)])


def test_mkdir_under_a_prefix_is_denied_and_elsewhere_allowed_unchecked(
        tree: tuple[Path, Path, PolicySet]) -> None:
    guarded, free, policy = tree
    denied = run_policy(policy, lambda: os.mkdir(guarded / "sub"))
    assert denied.errno == errno.EACCES
    assert not (guarded / "sub").exists()
    assert denied.decided() == ["deny"]
    allowed = run_policy(policy, lambda: os.mkdir(free / "sub"))
    assert allowed.errno == 0 and (free / "sub").is_dir()
    [seen] = allowed.decisions
    assert seen.kind == "allow" and seen.decision.unchecked  # a path was read: advisory
    # The prefix itself is guarded, a sibling with the same name start is not.
    assert run_policy(policy, lambda: os.rmdir(guarded)).errno == errno.EACCES
    assert run_policy(policy, lambda: os.mkdir(f"{guarded}-not")).errno == 0


def test_relative_and_dotdot_paths_are_resolved_against_the_callers_cwd(
        tree: tuple[Path, Path, PolicySet]) -> None:
    guarded, free, policy = tree

    def sneaky() -> None:
        os.chdir(free)
        os.mkdir("../guarded/./x/..//y")

    assert run_policy(policy, sneaky).errno == errno.EACCES
    assert not (guarded / "y").exists()

    def dirfd() -> None:
        fd = os.open(guarded, os.O_RDONLY | os.O_DIRECTORY)
        os.mkdir("z", dir_fd=fd)

    assert run_policy(policy, dirfd).errno == errno.EACCES
    assert not (guarded / "z").exists()


def test_writing_opens_are_denied_read_only_opens_decided_on_flags(
        tree: tuple[Path, Path, PolicySet]) -> None:
    guarded, _free, policy = tree
    (guarded / "file").write_text("keep")

    def write() -> None:
        with open(guarded / "file", "w") as f:
            f.write("lost")

    assert run_policy(policy, write).errno == errno.EACCES
    assert (guarded / "file").read_text() == "keep"
    read = run_policy(policy, lambda: (guarded / "file").read_text())
    assert read.value == "keep"
    assert [s.decision.unchecked for s in read.decisions if s.syscall == "openat"] == [False]
    create = run_policy(policy, lambda: os.close(os.open(guarded / "new", os.O_CREAT)))
    assert create.errno == errno.EACCES and not (guarded / "new").exists()


def test_unlink_and_rename_in_either_direction_are_denied(
        tree: tuple[Path, Path, PolicySet]) -> None:
    guarded, free, policy = tree
    (guarded / "g").write_text("")
    (free / "f").write_text("")
    assert run_policy(policy, lambda: os.unlink(guarded / "g")).errno == errno.EACCES
    assert run_policy(policy, lambda: os.rename(guarded / "g", free / "g")).errno == \
        errno.EACCES
    assert run_policy(policy, lambda: os.rename(free / "f", guarded / "f")).errno == \
        errno.EACCES
    assert (guarded / "g").exists() and (free / "f").exists()
    assert run_policy(policy, lambda: os.rename(free / "f", free / "f2")).errno == 0
    assert run_policy(policy, lambda: os.unlink(free / "f2")).errno == 0


def test_paths_are_seen_in_the_callers_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    policy = load(PATH_GUARD, prefixes=["/etc"], errno="EROFS")

    def in_chroot() -> list[int]:
        os.chroot(root)
        os.chdir("/etc")
        results = []
        for path in ("/etc/a", "b", "../etc/c", "/tmp/../etc/d"):
            try:
                os.mkdir(path)
                results.append(0)
            except OSError as exc:
                results.append(exc.errno or -1)
        return results

    trial = run_policy(policy, in_chroot)
    assert trial.value == [errno.EROFS] * 4
    assert list((root / "etc").iterdir()) == []


@pytest.mark.parametrize("options, key", [
    ({"prefixes": ["etc"]}, "policy[0].options.prefixes[0]"),
    ({"prefixes": ["/etc", 3]}, "policy[0].options.prefixes[1]"),
    ({"prefixes": "/etc"}, "policy[0].options.prefixes"),
    ({"errno": "EWHATEVER"}, "policy[0].options.errno"),
    ({"prefix": ["/etc"]}, "policy[0].options.prefix"),
    ({"mode": "strict"}, "policy[0].options.mode"),
    ({"emulation_rate": -1.0}, "policy[0].options.emulation_rate"),
])
def test_options_are_validated_naming_the_key(options: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(PATH_GUARD, **options)
    assert info.value.key == key


def test_without_prefixes_nothing_is_read(tmp_path: Path) -> None:
    check: Callable[[], None] = lambda: os.mkdir(tmp_path / "x")  # noqa: E731
    trial = run_policy(load(PATH_GUARD), check)
    assert trial.errno == 0
    assert [s.decision.unchecked for s in trial.decisions] == [False]


def test_a_prefix_written_with_a_leading_double_slash_guards_its_directory(
        tmp_path: Path) -> None:
    # posixpath.normpath keeps a leading "//" (POSIX leaves its meaning open); the kernel
    # takes it as "/", and so are the paths checked: a prefix "//x" must guard /x.
    guarded = tmp_path / "guarded"
    guarded.mkdir()
    policy = load(PATH_GUARD, prefixes=[f"/{guarded}"])
    assert run_policy(policy, lambda: os.mkdir(guarded / "sub")).errno == errno.EACCES
    assert not (guarded / "sub").exists()


def test_paths_are_normalised_as_normpath_does_with_or_without_its_shortcut() -> None:
    """The path check skips normpath for paths that are normal already: for every path
    the result is what normpath gave (with a leading "//" made "/"), and so the answer."""
    import itertools
    import posixpath
    import sys

    from supervisor.plugins import module_name

    load(PATH_GUARD, prefixes=["/g", "/h/", "/"], name="pg_norm")
    module = sys.modules[module_name("pg_norm")]
    parts = [b"", b"/", b"//", b"a", b".", b"..", b".a", b"a.", b"...", b"/./", b"/../"]
    seen = 0
    for count in range(1, 5):
        for combo in itertools.product(parts, repeat=count):
            path = b"/" + b"/".join(combo)
            expected = b"/" + posixpath.normpath(path).lstrip(b"/")
            assert module.normalised_path(path) == expected, path
            for prefixes in ((b"/g",), (b"/g", b"/h"), (b"/",), (b"/a/.a",)):
                old = any(expected == p or expected.startswith(p.rstrip(b"/") + b"/")
                          for p in prefixes)
                assert module.is_guarded(expected, prefixes) == old, (expected, prefixes)
            seen += 1
    assert seen > 10_000


def test_each_refusal_names_its_own_path_past_the_kept_refusals(
        tree: tuple[Path, Path, PolicySet]) -> None:
    """Refusals are kept per path (path_guard._denied, emptied when full): each answer,
    and so each audit line, still names its own path, repeated or not, before and after
    the table was emptied."""
    guarded, _free, policy = tree
    names = [f"d{i}" for i in range(70)] + ["d0", "d69", "d0", "d1"]

    def make_them() -> list[int]:
        got = []
        for name in names:
            try:
                os.mkdir(guarded / name)
                got.append(0)
            except OSError as exc:
                got.append(exc.errno or -1)
        return got

    trial = run_policy(policy, make_them)
    assert trial.value == [errno.EACCES] * len(names)
    assert [(s.decision.errno, s.decision.reason) for s in trial.decisions] == [
        (errno.EACCES, f"mkdir {guarded}/{name} is under a guarded prefix")
        for name in names]


def test_refusals_naming_a_containers_paths_stay_out_of_the_shared_deny_cache(
        tree: tuple[Path, Path, PolicySet], monkeypatch: pytest.MonkeyPatch) -> None:
    """deny() keeps up to 4,096 answers, by reason, for every policy of the daemon and
    for as long as it runs. path_guard's reasons name the caller's path (up to 4 KiB, 16
    KiB once escaped): a container making distinct refused calls must not fill that
    cache (up to 64 MiB kept, and every other policy's new reasons no longer cached)."""
    from supervisor import policy as policy_module

    guarded, _free, policy = tree
    name = "n" * 200

    def refused_calls() -> list[int]:
        pipe, _ = os.pipe()  # a dirfd that is no directory: the base is not resolved
        errnos = []
        for i in range(100):
            for path, dir_fd in ((guarded / f"{i}{name}", None), (f"{i}{name}", pipe)):
                try:
                    os.mkdir(path, dir_fd=dir_fd)
                    errnos.append(0)
                except OSError as exc:
                    errnos.append(exc.errno or -1)
        return errnos

    # An empty cache: one filled by earlier tests of the process keeps nothing more.
    monkeypatch.setattr(policy_module, "_DENY", {})
    before = len(policy_module._DENY)
    trial = run_policy(policy, refused_calls)
    assert trial.value == [errno.EACCES] * 200
    assert len(policy_module._DENY) - before < 10
    reasons = [s.decision.reason for s in trial.decisions]
    assert reasons[0] == f"mkdir {guarded}/0{name} is under a guarded prefix"
    assert reasons[1].startswith("cannot resolve the base of b'0nnn"), reasons[1]
