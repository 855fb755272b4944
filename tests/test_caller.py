"""supervisor.caller, the public "act as the caller" API: each primitive on real system
calls of forked children (supervisor.testing), checked against what the kernel does for
the caller itself. Paths are bytes through the whole chain, non-UTF-8 ones included."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from supervisor import caller
from supervisor.decide import check_result
from supervisor.emulate import IDENTITY_MAP, map_id, parse_id_map
from supervisor.errors import PolicyError
from supervisor.policy import Notification, PolicySet, allow
from supervisor.testing import Trial, run_policy

libc = ctypes.CDLL(None, use_errno=True)
USER = 1234
CLONE_NEWUSER = 0x10000000
NOT_UTF8 = b"caf\xe9-\xff"


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory any user can reach and write (pytest's tmp_path is under 0700)."""
    path = Path(tempfile.mkdtemp(prefix="caller-", dir="/tmp"))
    path.chmod(0o777)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def become_user(uid: int = USER, gid: int = USER, umask: int = 0o022) -> None:
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    os.umask(umask)


def emulating(name: str) -> PolicySet:
    """A policy that does the file calls with supervisor.caller, from the paths it read
    (``grants-mknod``: adding CAP_MKNOD to a mknod)."""
    policy = PolicySet(name)

    @policy.on("mkdir", "mkdirat")
    async def mkdir(n: Notification) -> object:
        at = n.syscall == "mkdirat"
        path = await n.read_path(1 if at else 0)
        return await caller.mkdir(n, path, n.mode(2 if at else 1),
                                  dirfd=n.fd(0) if at else caller.AT_FDCWD)

    @policy.on("openat")
    async def open_(n: Notification) -> object:
        if not n.flags(2) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            return allow()  # reads continue: decided on the flags register
        return await caller.open(n, await n.read_path(1), n.flags(2), n.mode(3),
                                 dirfd=n.fd(0))

    @policy.on("unlink", "rmdir", "unlinkat")
    async def unlink(n: Notification) -> object:
        if n.syscall == "unlinkat":
            return await caller.unlink(n, await n.read_path(1), dirfd=n.fd(0),
                                       rmdir=bool(n.flags(2) & caller.AT_REMOVEDIR))
        return await caller.unlink(n, await n.read_path(0), rmdir=n.syscall == "rmdir")

    @policy.on("chown", "lchown", "fchownat")
    async def chown(n: Notification) -> object:
        if n.syscall == "fchownat":
            return await caller.chown(
                n, await n.read_path(1), n.int32(2), n.int32(3), dirfd=n.fd(0),
                follow_symlinks=not n.flags(4) & caller.AT_SYMLINK_NOFOLLOW)
        return await caller.chown(n, await n.read_path(0), n.int32(1), n.int32(2),
                                  follow_symlinks=n.syscall == "chown")

    @policy.on("mknod", "mknodat")
    async def mknod(n: Notification) -> object:
        at = n.syscall == "mknodat"
        dev = n.uint32(3 if at else 2)
        return await caller.mknod(n, await n.read_path(1 if at else 0), n.mode(2 if at else 1),
                                  os.major(dev), os.minor(dev),
                                  dirfd=n.fd(0) if at else caller.AT_FDCWD,
                                  add_capabilities=1 << caller.CAP_MKNOD
                                  if name == "grants-mknod" else 0)

    return policy


def run(name: str, syscalls: list[str], func: Callable[[], object]) -> Trial:
    """``func`` in a child whose ``syscalls`` (only those) :func:`emulating` answers."""
    return run_policy(emulating(name), func, syscalls=syscalls)


def test_mkdir_owner_umask_and_root(public_dir: Path) -> None:
    """Owned by the caller's fsuid/fsgid, its umask applied, its cwd for a relative
    path; a symlink to / inside the caller's root leads to that root, not the host's."""
    root = public_dir / "root"
    root.mkdir()
    (root / "up").symlink_to("/")

    def as_user() -> None:
        os.chdir(public_dir)
        become_user(umask=0o077)
        os.mkdir(NOT_UTF8, 0o777)

    def in_chroot() -> None:
        os.chroot(root)
        os.mkdir("/up/escaped", 0o755)

    trial = run("mkdir", ["mkdir"], as_user)
    assert trial.errno == 0 and trial.decided() == ["returns"], trial
    st = os.stat(os.fsencode(public_dir) + b"/" + NOT_UTF8)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (USER, USER, 0o700)
    assert run("mkdir", ["mkdir"], in_chroot).errno == 0
    assert (root / "escaped").is_dir() and not os.path.exists("/escaped")


def test_open_injects_the_fd_data_lands_and_cloexec_is_honoured(public_dir: Path) -> None:
    def as_user() -> tuple[list[bool], bytes]:
        become_user()
        cloexec = []
        for flags in (os.O_CLOEXEC, 0):
            # libc's open: os.open would add O_CLOEXEC itself (PEP 446)
            fd = libc.open(os.fsencode(public_dir / f"f{flags}"),
                           os.O_WRONLY | os.O_CREAT | flags, 0o666)
            assert fd >= 0
            os.write(fd, b"written through the injected fd")
            cloexec.append(bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC))
            os.close(fd)
        fd = os.open(os.fsencode(public_dir) + b"/" + NOT_UTF8, os.O_RDWR | os.O_CREAT, 0o600)
        os.write(fd, b"odd name")
        os.lseek(fd, 0, os.SEEK_SET)
        return cloexec, os.read(fd, 100)

    trial = run("open", ["openat"], as_user)
    assert trial.errno == 0 and trial.exception == "", trial
    assert trial.value == ([True, False], b"odd name")
    assert trial.decided() == ["inject_fd"] * 3
    for flags in (os.O_CLOEXEC, 0):
        made = public_dir / f"f{flags}"
        assert made.read_bytes() == b"written through the injected fd"
        st = made.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (USER, USER, 0o644)


def test_open_is_refused_where_the_caller_may_not_write(public_dir: Path) -> None:
    (public_dir / "roots").write_text("root's")
    (public_dir / "roots").chmod(0o644)

    def as_user() -> None:
        become_user()
        os.open(public_dir / "roots", os.O_WRONLY | os.O_TRUNC)

    trial = run("open", ["openat"], as_user)
    assert trial.errno == errno.EACCES and trial.decided() == ["deny"]
    assert (public_dir / "roots").read_text() == "root's"


def test_unlink_and_rmdir_follow_the_sticky_bit(public_dir: Path) -> None:
    """In a sticky directory the caller removes its own names, not root's."""
    sticky = public_dir / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    (sticky / "roots").touch()
    (sticky / "gone").mkdir()

    def as_user() -> list[int]:
        become_user()
        results = []
        for step in (lambda: open(sticky / "mine", "w").close(),
                     lambda: os.unlink(sticky / "mine"),
                     lambda: os.unlink(sticky / "roots"),
                     lambda: os.rmdir(sticky / "gone"),
                     lambda: os.unlink("sticky/nothing", dir_fd=os.open(public_dir,
                                                                        os.O_RDONLY))):
            try:
                step()
                results.append(0)
            except OSError as exc:
                results.append(exc.errno or -1)
        return results

    trial = run("unlink", ["unlink", "rmdir", "unlinkat"], as_user)
    assert trial.value == [0, 0, errno.EPERM, errno.EPERM, errno.ENOENT], trial
    assert (sticky / "roots").exists() and (sticky / "gone").is_dir()
    assert not (sticky / "mine").exists()


def test_chown_follows_the_callers_credentials(public_dir: Path) -> None:
    """Root (CAP_CHOWN in the supervisor's user namespace) gives a file away; a user
    may change only the group, to one of its own groups, and gets EPERM otherwise, as
    the kernel answers it without the supervisor."""
    for name in ("given", "mine", "link-target"):
        (public_dir / name).touch()
    os.chown(public_dir / "mine", USER, USER)
    (public_dir / "link").symlink_to(public_dir / "link-target")

    def as_root() -> None:
        os.chown(public_dir / "given", USER, 4321)
        os.lchown(public_dir / "link", USER, USER)  # the link itself, not its target

    def as_user() -> list[int]:
        os.setgroups([4321])
        os.setresgid(USER, USER, USER)
        os.setresuid(USER, USER, USER)
        results = []
        for uid, gid in ((-1, 4321), (-1, 999), (0, -1), (USER, USER)):
            try:
                os.chown(public_dir / "mine", uid, gid)
                results.append(0)
            except OSError as exc:
                results.append(exc.errno or -1)
        return results

    trial = run("chown", ["chown", "lchown", "fchownat"], as_root)
    assert trial.errno == 0 and set(trial.decided()) == {"returns"}, trial
    given = (public_dir / "given").stat()
    assert (given.st_uid, given.st_gid) == (USER, 4321)
    link = os.lstat(public_dir / "link")
    assert (link.st_uid, (public_dir / "link-target").stat().st_uid) == (USER, 0)

    unsupervised = run_policy(PolicySet("none"), as_user, syscalls=["getppid"])
    os.chown(public_dir / "mine", USER, USER)
    trial = run("chown", ["chown", "lchown", "fchownat"], as_user)
    assert trial.value == unsupervised.value == [0, errno.EPERM, errno.EPERM, 0], trial
    mine = (public_dir / "mine").stat()
    assert (mine.st_uid, mine.st_gid) == (USER, USER)


def test_chown_ids_are_the_callers_namespace_ids(public_dir: Path) -> None:
    """A caller in a user namespace (0 there is 200000 here) names ids of its own
    namespace: its "0" is mapped to 200000, an id it has no mapping for is EINVAL, as
    the kernel says; the kernel's checks apply to the mapped ids."""
    target = public_dir / "nsfile"
    target.touch()
    os.chown(target, 200000, 200000)

    def in_user_namespace() -> list[int]:
        ready_r, ready_w = os.pipe()
        done_r, done_w = os.pipe()
        mapper = os.fork()
        if mapper == 0:  # still in our user namespace, with our capabilities
            try:
                os.close(ready_w)
                if os.read(ready_r, 1):
                    for name in ("uid_map", "gid_map"):
                        with open(f"/proc/{os.getppid()}/{name}", "w") as f:
                            f.write("0 200000 65536\n")
                    os.write(done_w, b"x")
            finally:
                os._exit(0)
        os.close(ready_r)
        os.close(done_w)
        unshared = libc.unshare(CLONE_NEWUSER)
        os.write(ready_w, b"x" if unshared == 0 else b"")
        os.close(ready_w)
        mapped = os.read(done_r, 1)
        os.waitpid(mapper, 0)
        assert unshared == 0 and mapped, ctypes.get_errno()
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
        results = []
        for uid, gid in ((0, 0), (-1, 0), (70000, -1), (-1, 70000)):
            try:
                os.chown(target, uid, gid)
                results.append(0)
            except OSError as exc:
                results.append(exc.errno or -1)
        return results

    trial = run("chown", ["chown", "fchownat"], in_user_namespace)
    assert trial.value == [0, 0, errno.EINVAL, errno.EINVAL], trial
    assert (target.stat().st_uid, target.stat().st_gid) == (200000, 200000)


def test_mknod_through_the_public_api(public_dir: Path) -> None:
    """A FIFO needs no privilege; a device node needs CAP_MKNOD, which only the policy
    that grants it adds; either is the caller's."""
    def as_user() -> list[int]:
        become_user()
        results = []
        for name, kind, dev in (("fifo", stat.S_IFIFO, 0),
                                ("null", stat.S_IFCHR, os.makedev(1, 3))):
            try:
                os.mknod(public_dir / name, kind | 0o666, dev)
                results.append(0)
            except OSError as exc:
                results.append(exc.errno or -1)
        return results

    assert run("mknod", ["mknod", "mknodat"], as_user).value == \
        [0, errno.EPERM]
    assert stat.S_ISFIFO((public_dir / "fifo").lstat().st_mode)
    assert not (public_dir / "null").exists()
    (public_dir / "fifo").unlink()
    assert run("grants-mknod", ["mknod", "mknodat"], as_user).value == [0, 0]
    st = (public_dir / "null").lstat()
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (USER, 0o644)


def test_read_path_is_bytes_and_takes_any_name(public_dir: Path) -> None:
    """What the kernel has, byte for byte: a name that is not UTF-8 is read, compared
    and used as it is."""
    seen: list[object] = []
    policy = PolicySet("paths")

    @policy.on("mkdir")
    async def record(n: Notification) -> object:
        path = await n.read_path(0)
        seen.append(path)
        return await caller.mkdir(n, path, n.mode(1))

    name = os.fsencode(public_dir) + b"/" + NOT_UTF8
    trial = run_policy(policy, lambda: os.mkdir(name))
    assert trial.errno == 0 and seen == [name]
    assert os.path.isdir(name)


def test_a_sync_handler_that_forgets_await_is_named() -> None:
    async def coroutine() -> None:
        return None

    with pytest.raises(PolicyError, match=r"returned a coroutine.*async def"):
        check_result(coroutine(), "p", read_memory=False)


def test_id_maps_are_parsed_and_applied() -> None:
    ids = parse_id_map("         0     200000      65536\n 70000 1000 1\n")
    assert ids == ((0, 200000, 65536), (70000, 1000, 1))
    assert [map_id(ids, v) for v in (0, 65535, 65536, 70000, -1, 0xFFFFFFFF)] == \
        [200000, 265535, -2, 1000, 0xFFFFFFFF, 0xFFFFFFFF]
    assert map_id(IDENTITY_MAP, 1234) == 1234


def test_a_guarded_chown_follows_no_symlink(public_dir: Path) -> None:
    """With guarded directories, a chown whose last component is a symlink is refused
    (where it leads is not checked), and one under a guarded directory too."""
    guarded = public_dir / "guarded"
    guarded.mkdir()
    (guarded / "f").touch()
    (public_dir / "link").symlink_to(guarded / "f")
    results: list[bytes | None] = []
    policy = PolicySet("guarded-chown")

    @policy.on("chown")
    async def chown(n: Notification) -> object:
        op = caller.Chown(await n.read_path(0), n.int32(1), n.int32(2))
        result = await caller.run(n, op, guard=[os.fsencode(guarded)])
        results.append(result.guarded)
        return caller.decision(op, result)

    for path in (public_dir / "link", guarded / "f"):
        assert run_policy(policy, lambda p=path: os.chown(p, USER, USER)).errno == \
            errno.EACCES
    assert results == [os.fsencode(public_dir / "link") + b" (a symlink: not followed "
                                                         b"under a guard)",
                       os.fsencode(guarded / "f")]
    assert (guarded / "f").stat().st_uid == 0
