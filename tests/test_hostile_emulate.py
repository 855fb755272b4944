"""Attacks on emulated calls (security issue, items 7, 8, 9 and 14): each test is a probe
an attacker made, run for real (forked callers under NOTIFY filters, the daemon's session
code, the emulation helper), and what must hold.

Callers shape themselves with raw kernel calls before the notified call: they drop
capabilities (capset), take another fsuid, enter a user namespace mapped to an
unprivileged host uid, or chroot into a root with its own /proc.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import signal
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from supervisor import _emulate_helper as helper
from supervisor import emulate
from supervisor.emulate import signed_fd
from supervisor.policy import (
    Container,
    Decision,
    Notification,
    PolicySet,
    allow,
    deny,
    inject_fd,
)
from supervisor.testing import Trial, arun_policy, load, run_policy

ROOT = Path(__file__).resolve().parent.parent
DEVICES = ROOT / "policies" / "devices.py"
CHR = stat.S_IFCHR

CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER = 1, 2, 3
CAP_SYS_PTRACE = 19
ALL_CAPS = (1 << 41) - 1
CLONE_NEWNS, CLONE_NEWUSER = 0x00020000, 0x10000000
MS_REC, MS_PRIVATE = 0x4000, 1 << 18
PR_SET_DUMPABLE = 4

_libc = ctypes.CDLL(None, use_errno=True)


def _ok(rc: int, what: str) -> None:
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def keep_only(mask: int) -> None:
    """This thread's effective and permitted capabilities become ``mask``."""
    helper.set_capabilities(mask & helper.capabilities()[1])


def attempt(call: Callable[[], object]) -> int:
    """0 or the errno ``call`` failed with."""
    try:
        call()
    except OSError as exc:
        return exc.errno or -1
    return 0


def make_chr(path: str | bytes | Path, major: int = 1, minor: int = 3) -> Callable[[], None]:
    return lambda: os.mknod(path, CHR | 0o666, os.makedev(major, minor))


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory any uid can reach (pytest's tmp_path is under a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="hostile-emulate-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


# --------------------------------------------------------------------------- item 7


def test_root_without_dac_override_gets_no_node_where_its_own_mkfifo_is_refused(
        public_dir: Path) -> None:
    """Container root (fsuid 0) without CAP_DAC_OVERRIDE cannot create in a 0555
    directory; the helper used to keep every capability for fsuid 0 and made the node."""
    closed = public_dir / "closed"
    closed.mkdir()
    closed.chmod(0o555)

    def as_weak_root() -> tuple[int, int]:
        keep_only(ALL_CAPS & ~(1 << CAP_DAC_OVERRIDE | 1 << CAP_DAC_READ_SEARCH
                               | 1 << CAP_FOWNER))
        own = attempt(lambda: os.mkfifo(closed / "fifo"))
        return own, attempt(make_chr(closed / "null"))

    trial = run_policy(load(DEVICES), as_weak_root)
    assert trial.exception == "", trial
    assert trial.value == (errno.EACCES, errno.EACCES)
    assert list(closed.iterdir()) == []


def test_the_callers_own_dac_override_counts_whatever_its_fsuid(public_dir: Path) -> None:
    """The other direction of "as the caller": fsuid 1000 with CAP_DAC_OVERRIDE in its
    effective set may create in root's 0755 directory (its own mkfifo does), so the
    emulated mknod works too, and the node belongs to 1000."""
    closed = public_dir / "roots"
    closed.mkdir(mode=0o755)

    def as_privileged_user() -> tuple[int, int]:
        _libc.setfsuid(1000)  # drops the fs capabilities from the effective set...
        keep_only(1 << CAP_DAC_OVERRIDE)  # ...and the caller takes this one back
        own = attempt(lambda: os.mkfifo(closed / "fifo"))
        return own, attempt(make_chr(closed / "null"))

    trial = run_policy(load(DEVICES), as_privileged_user)
    assert trial.value == (0, 0), trial
    assert (closed / "null").lstat().st_uid == 1000
    assert (closed / "null").lstat().st_rdev == os.makedev(1, 3)


def _enter_user_namespace(host_uid: int) -> None:
    """Become ``host_uid`` on the host and root of a new user namespace mapped to it:
    all capabilities, valid only for objects its namespace maps."""
    os.setgroups([])
    os.setresgid(host_uid, host_uid, host_uid)
    os.setresuid(host_uid, host_uid, host_uid)
    _ok(_libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "prctl")  # /proc/self/* is ours again
    _ok(_libc.unshare(CLONE_NEWUSER), "unshare")
    Path("/proc/self/setgroups").write_text("deny")
    Path("/proc/self/uid_map").write_text(f"0 {host_uid} 1")
    Path("/proc/self/gid_map").write_text(f"0 {host_uid} 1")


def test_user_namespaced_root_acts_as_its_host_uid_without_its_namespace_capabilities(
        public_dir: Path) -> None:
    """Root of a user namespace mapped to host uid 100000 has every capability, but only
    in its namespace: root's directories stay closed to it, its own work as 100000."""
    host_uid = 100000
    roots = public_dir / "roots"
    roots.mkdir(mode=0o755)
    mine = public_dir / "mine"
    mine.mkdir(mode=0o755)
    os.chown(mine, host_uid, host_uid)

    def in_user_namespace() -> tuple[int, int, int, int]:
        _enter_user_namespace(host_uid)
        caps = int(Path("/proc/self/status").read_text().split("CapEff:")[1].split()[0], 16)
        assert caps & 1 << CAP_DAC_OVERRIDE  # full capabilities, in its namespace
        return (attempt(lambda: os.mkfifo(roots / "fifo")), attempt(make_chr(roots / "null")),
                attempt(lambda: os.mkfifo(mine / "fifo")), attempt(make_chr(mine / "null")))

    trial = run_policy(load(DEVICES), in_user_namespace)
    assert trial.value == (errno.EACCES, errno.EACCES, 0, 0), trial
    assert list(roots.iterdir()) == []
    st = (mine / "null").lstat()
    assert (st.st_uid, st.st_gid, st.st_rdev) == (host_uid, host_uid, os.makedev(1, 3))


def test_paths_are_bytes_end_to_end(public_dir: Path) -> None:
    """A name that is not UTF-8 is made byte for byte, relative to a dirfd."""
    name = b"null-\xff\xfe-caf\xe9"

    def odd() -> None:
        fd = os.open(public_dir, os.O_RDONLY | os.O_DIRECTORY)
        os.mknod(name, CHR | 0o600, os.makedev(1, 3), dir_fd=fd)

    trial = run_policy(load(DEVICES), odd)
    assert trial.errno == 0 and trial.decided() == ["returns"], trial
    assert os.listdir(os.fsencode(public_dir)) == [name]


# --------------------------------------------------------------------------- item 8


def _chroot_with_proc(root: Path) -> None:
    """Enter a new mount namespace, mount a procfs (of the host pid namespace) at
    ``root``/proc, chroot into ``root`` and lose CAP_SYS_PTRACE: like a container in the
    host pid namespace, which sees /proc/<hostpid> but may not follow its links."""
    _ok(_libc.unshare(CLONE_NEWNS), "unshare")
    _ok(_libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount private")
    _ok(_libc.mount(b"proc", str(root / "proc").encode(), b"proc", 0, None), "mount proc")
    os.chroot(root)
    os.chdir("/")
    keep_only(ALL_CAPS & ~(1 << CAP_SYS_PTRACE))


def test_no_host_path_oracle_through_proc_root_and_dotdot(tmp_path: Path) -> None:
    """``mknod /proc/<hostpid>/root/PATH/..`` answered EEXIST, ENOENT or ENOTDIR for host
    paths the container cannot see: the ``..`` tail was made by the helper on the full
    path, through the magic link. Now every answer is the same."""
    root = tmp_path / "root"
    (root / "proc").mkdir(parents=True)
    (tmp_path / "secret-dir").mkdir()
    (tmp_path / "secret-file").write_text("")
    host = f"/proc/{os.getpid()}/root{tmp_path}"
    probes = [f"{host}/secret-dir/..", f"{host}/no-such-dir/..", f"{host}/secret-file/..",
              f"{host}/secret-dir/.", f"{host}/secret-dir/", f"{host}/no-such-dir/",
              f"{host}/secret-dir/x"]

    def probe() -> tuple[list[int], list[int]]:
        _chroot_with_proc(root)
        own = [attempt(lambda p=p: os.mkfifo(p)) for p in probes]
        return own, [attempt(make_chr(p)) for p in probes]

    trial = run_policy(load(DEVICES), probe)
    assert trial.exception == "", trial
    own, emulated = trial.value
    assert set(own) == {errno.EACCES}  # the caller itself cannot follow the link
    assert len(set(emulated)) == 1 and emulated[0] not in (0, errno.EEXIST), emulated
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root", "secret-dir",
                                                          "secret-file"]
    assert list((tmp_path / "secret-dir").iterdir()) == []


# --------------------------------------------------------------------------- item 9


def _cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and of its children it has reaped."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _our_cpu_seconds() -> float:
    """This process, the children it reaped, and the emulation helper (with its reaped
    children) if there is one."""
    total = _cpu_seconds(os.getpid())
    running = getattr(emulate, "_helper", None)  # None before the helper existed
    if running is not None and running.pid:
        total += _cpu_seconds(running.pid)
    return total


def test_an_emulated_mknod_costs_no_interpreter_start(public_dir: Path) -> None:
    """Each emulated mknod started a root Python interpreter (~30 ms of CPU here, on a
    busy machine), so 47 mknod/s from one container saturated two CPUs. Now a call
    costs a fork of a small pre-started helper (~5 ms with the session and the caller):
    a generous bound that the old design cannot meet."""
    calls = 40
    policy = load(DEVICES)
    run_policy(policy, make_chr(public_dir / "warm"))  # the helper is up
    before = _our_cpu_seconds()
    trial = run_policy(policy, lambda: [make_chr(public_dir / f"n{i}")()
                                        for i in range(calls)])
    spent = _our_cpu_seconds() - before
    assert trial.exception == "" and trial.decided() == ["returns"] * calls, trial
    assert spent / calls < 0.015, f"{spent / calls * 1000:.1f} ms of CPU per call"
    helper_pid = emulate.start_helper().pid
    assert run_policy(policy, make_chr(public_dir / "again")).errno == 0
    assert emulate.start_helper().pid == helper_pid  # one helper serves them all


def test_the_emulation_rate_limits_one_container(public_dir: Path) -> None:
    """Over its emulation rate a container is slowed down to it; a call that could not
    get its turn before its deadline gets EAGAIN without the helper being asked. The
    policy has a rate by default."""
    assert load(DEVICES).options["emulation_rate"] > 0

    def flood(prefix: str) -> Callable[[], tuple[list[int], float]]:
        def run() -> tuple[list[int], float]:
            start = time.monotonic()
            errors = [attempt(make_chr(public_dir / f"{prefix}{i}")) for i in range(30)]
            return errors, time.monotonic() - start
        return run

    slowed = run_policy(load(DEVICES, emulation_rate=20.0, emulation_burst=5), flood("s"))
    errors, took = slowed.value
    assert errors == [0] * 30, slowed
    assert took >= 25 / 20 * 0.9  # 25 calls past the burst, at 20 per second
    refused = run_policy(load(DEVICES, emulation_rate=2.0, emulation_burst=5), flood("r"),
                         deadline=0.3)
    errors, _ = refused.value
    assert errors[:5] == [0] * 5 and errors.count(errno.EAGAIN) >= 20, errors
    assert len(list(public_dir.iterdir())) == 30 + errors.count(0)


def _helper_children() -> int:
    running = emulate.start_helper()
    path = Path(f"/proc/{running.pid}/task/{running.pid}/children")
    return len(path.read_text().split())


def _open_as_caller_policy(limits: emulate.Limits = emulate.DEFAULT_LIMITS) -> PolicySet:
    """Writing opens emulated with as_caller(Open) and answered with the fd."""
    policy = PolicySet("open-as-caller")

    @policy.on("openat")
    async def open_(n: Notification) -> Decision:
        if n.args[2] & os.O_ACCMODE == os.O_RDONLY:
            return allow(reason="read-only")
        path = await n.read_cstring(n.args[1])
        result = await emulate.as_caller(n, emulate.Open(path, n.args[2], n.args[3],
                                                         signed_fd(n.args[0])),
                                         limits=limits)
        if result.errno:
            return deny(result.errno)
        return inject_fd(result.take_fd())

    return policy


def test_one_container_cannot_take_the_helper_from_another(public_dir: Path) -> None:
    """Container A opens a FIFO for writing from 8 threads: each emulated open blocks in
    the helper until a reader comes (none does). It gets at most its per-container share
    of the helper's children; container B's mknod is served meanwhile. When A's calls
    overrun their deadline, their children are killed."""
    fifo = public_dir / "fifo"
    os.mkfifo(fifo)
    fifo.chmod(0o666)
    emulate.start_helper()
    results: dict[str, object] = {}

    def flood() -> list[int]:
        out: list[int] = []
        threads = [threading.Thread(target=lambda: out.append(
            attempt(lambda: os.open(fifo, os.O_WRONLY))), daemon=True) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return out

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            async def a() -> None:
                results["a"] = await arun_policy(_open_as_caller_policy(), flood,
                                                 container=Container(id="A"), deadline=3.0)
            nursery.start_soon(a)
            with trio.fail_after(10):
                while _helper_children() < 1 + emulate.DEFAULT_LIMITS.per_container:
                    await trio.sleep(0.02)
            await trio.sleep(0.2)
            results["busy"] = _helper_children() - 1  # less the spare
            results["b"] = await arun_policy(load(DEVICES), make_chr(public_dir / "null"),
                                             container=Container(id="B"), deadline=3.0)
            results["a_done"] = "a" in results

    trio.run(main)
    b = results["b"]
    assert isinstance(b, Trial) and b.errno == 0 and b.decided() == ["returns"], b
    assert results["a_done"] is False  # B was served while A's calls still waited
    assert results["busy"] == emulate.DEFAULT_LIMITS.per_container
    a = results["a"]
    assert isinstance(a, Trial) and a.value == [errno.EPERM] * 8, a  # on_error, deadline
    deadline = time.monotonic() + 10
    while _helper_children() > 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _helper_children() == 1  # A's blocked children were killed; the spare is left


def test_the_helper_runs_at_most_max_children(public_dir: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the per-container limits, the helper never has more than its
    ``max_children`` calls in progress: the others wait (here: until their deadline)."""
    fifo = public_dir / "fifo"
    os.mkfifo(fifo)
    emulate.stop_helper()
    small = emulate.EmulationHelper(max_children=3)
    small.start()
    monkeypatch.setattr(emulate, "_helper", small)
    seen: list[int] = []

    def flood() -> list[int]:
        out: list[int] = []
        threads = [threading.Thread(target=lambda: out.append(
            attempt(lambda: os.open(fifo, os.O_WRONLY))), daemon=True) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return out

    async def main() -> Trial:
        async with trio.open_nursery() as nursery:
            async def watch() -> None:
                while True:
                    seen.append(_helper_children())
                    await trio.sleep(0.02)
            nursery.start_soon(watch)
            trial = await arun_policy(_open_as_caller_policy(emulate.Limits(per_container=8)),
                                      flood, deadline=1.5)
            nursery.cancel_scope.cancel()
        return trial

    try:
        trial = trio.run(main)
    finally:
        emulate.stop_helper()
    assert trial.value == [errno.EPERM] * 8, trial
    assert max(seen) == 3, seen  # three busy children (no spare while all are taken)


def test_a_dead_helper_is_started_again(public_dir: Path) -> None:
    policy = load(DEVICES)
    assert run_policy(policy, make_chr(public_dir / "a")).errno == 0
    running = emulate.start_helper()
    old, restarts = running.pid, running.restarts
    os.kill(old, signal.SIGKILL)
    trial = run_policy(policy, make_chr(public_dir / "b"))
    assert trial.errno == 0 and trial.decided() == ["returns"], trial
    assert running.pid != old and running.restarts == restarts + 1
    assert (public_dir / "b").lstat().st_rdev == os.makedev(1, 3)


def test_a_stuck_helper_costs_the_deadline_not_the_daemon(public_dir: Path) -> None:
    """With the helper stopped, an emulated call gets on_error at its deadline; the
    session answers other calls meanwhile; and the call abandoned is not done later."""
    policy = load(DEVICES)
    assert run_policy(policy, make_chr(public_dir / "warm")).errno == 0
    running = emulate.start_helper()

    def both() -> tuple[int, int, float]:
        stuck: list[int] = []
        thread = threading.Thread(target=lambda: stuck.append(
            attempt(make_chr(public_dir / "late"))))
        thread.start()
        time.sleep(0.2)
        start = time.monotonic()
        other = attempt(lambda: os.mknod(public_dir / "fifo", stat.S_IFIFO | 0o600))
        took = time.monotonic() - start
        thread.join()
        return stuck[0], other, took

    os.kill(running.pid, signal.SIGSTOP)
    try:
        trial = run_policy(policy, both, deadline=1.0)
    finally:
        os.kill(running.pid, signal.SIGCONT)
    stuck, other, took = trial.value
    assert (stuck, other) == (errno.EPERM, 0), trial
    assert took < 0.9  # answered before the stuck call's deadline
    assert run_policy(policy, make_chr(public_dir / "after")).errno == 0
    assert not (public_dir / "late").exists()


# --------------------------------------------------------------------------- item 14

PATH_GUARD = ROOT / "policies" / "path_guard.py"


@pytest.fixture
def guarded_tree(public_dir: Path) -> tuple[Path, Path]:
    """(guarded, free): ``guarded/passwd`` holds "keep"; both reachable by any uid."""
    guarded = public_dir / "g"
    free = public_dir / "f"
    guarded.mkdir(mode=0o755)
    free.mkdir(mode=0o777)
    free.chmod(0o777)
    (guarded / "passwd").write_text("keep")
    return guarded, free


def enforcing(guarded: Path | str) -> PolicySet:
    return load(PATH_GUARD, prefixes=[str(guarded)], mode="enforce")


def write_open(path: str | Path, flags: int = os.O_WRONLY | os.O_CREAT) -> Callable[[], None]:
    def run() -> None:
        fd = os.open(path, flags, 0o644)
        try:
            os.write(fd, b"pwned")
        finally:
            os.close(fd)
    return run


def untouched(guarded: Path) -> None:
    assert sorted(p.name for p in guarded.iterdir()) == ["passwd"]
    assert (guarded / "passwd").read_text() == "keep"


def symlink_attacks(guarded: Path, free: Path) -> Callable[[], list[int]]:
    def attack() -> list[int]:
        os.symlink(guarded, free / "dir-link")
        os.symlink(guarded / "passwd", free / "file-link")
        os.symlink(guarded / "new", free / "dangling")
        (free / "mine").write_text("")
        return [
            attempt(write_open(free / "dir-link" / "new")),
            attempt(write_open(free / "file-link", os.O_WRONLY | os.O_TRUNC)),
            attempt(write_open(free / "dangling")),
            attempt(lambda: os.mkdir(free / "dir-link" / "sub")),
            attempt(lambda: os.rename(free / "mine", free / "dir-link" / "mine")),
            attempt(lambda: os.unlink(free / "dir-link" / "passwd")),
            attempt(lambda: os.rename(free / "dir-link" / "passwd", free / "stolen")),
        ]
    return attack


def test_advisory_mode_is_fooled_by_a_symlink(guarded_tree: tuple[Path, Path]) -> None:
    """What the advisory mode guarantees (nothing against an adversary): one symlink
    and the check, made on the path string, is passed."""
    guarded, free = guarded_tree
    trial = run_policy(load(PATH_GUARD, prefixes=[str(guarded)]),
                       symlink_attacks(guarded, free))
    assert trial.value[:6] == [0] * 6, trial  # the 7th: passwd was unlinked by the 6th
    assert (guarded / "new").read_text() == "pwned"


def test_enforce_symlink_attacks_do_not_write_under_the_prefix(
        guarded_tree: tuple[Path, Path]) -> None:
    guarded, free = guarded_tree
    trial = run_policy(enforcing(guarded), symlink_attacks(guarded, free))
    assert trial.value == [errno.EACCES] * 7, trial
    untouched(guarded)
    assert (free / "mine").exists()
    reasons = [s.decision.reason for s in trial.decisions if s.kind == "deny"]
    assert reasons[0] == f"openat resolves to {guarded}/new, under a guarded prefix " \
                         "(enforced)"


def test_enforce_proc_self_root_and_cwd_do_not_lead_under_the_prefix(
        guarded_tree: tuple[Path, Path]) -> None:
    guarded, _free = guarded_tree

    def attack() -> list[int]:
        results = [attempt(write_open(f"/proc/self/root{guarded}/new")),
                   attempt(lambda: os.mkdir(f"/proc/self/root{guarded}/sub")),
                   attempt(write_open(f"/proc/{os.getpid()}/root{guarded}/passwd",
                                      os.O_WRONLY | os.O_TRUNC))]
        os.chdir(guarded)
        results += [attempt(lambda: os.mkdir("/proc/self/cwd/sub")),
                    attempt(write_open("/proc/thread-self/cwd/new"))]
        return results

    trial = run_policy(enforcing(guarded), attack)
    assert trial.exception == "", trial
    assert all(e in (errno.ELOOP, errno.EACCES) for e in trial.value), trial.value
    untouched(guarded)


def test_enforce_dotdot_chroot_hardlink_and_bind_mount_tricks(
        guarded_tree: tuple[Path, Path], tmp_path: Path) -> None:
    guarded, free = guarded_tree

    def attack() -> list[int]:
        os.chdir(free)
        dirfd = os.open(free, os.O_RDONLY | os.O_DIRECTORY)
        results = [attempt(lambda: os.mkdir("../g/x")),
                   attempt(write_open("../f/../g/./new")),
                   attempt(lambda: os.mkdir("../g/x/..//y")),
                   attempt(lambda: os.mkdir("../g", dir_fd=dirfd)),
                   attempt(lambda: os.rmdir(f"{guarded}/.")),
                   ]
        os.link(guarded / "passwd", free / "hard")  # link is not a guarded call
        results.append(attempt(write_open(free / "hard", os.O_WRONLY | os.O_TRUNC)))
        # Another name of the guarded directory: a bind mount in our mount namespace.
        _ok(_libc.unshare(CLONE_NEWNS), "unshare")
        _ok(_libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "private")
        (free / "mnt").mkdir()
        _ok(_libc.mount(str(guarded).encode(), str(free / "mnt").encode(), None,
                        0x1000, None), "bind")  # MS_BIND
        results += [attempt(write_open(free / "mnt" / "new")),
                    attempt(lambda: os.unlink(free / "mnt" / "passwd"))]
        return results

    trial = run_policy(enforcing(guarded), attack)
    assert trial.exception == "", trial
    # x does not exist: "../g/x/.." fails to resolve, as it does for the kernel.
    assert trial.value == [errno.EACCES] * 2 + [errno.ENOENT] + [errno.EACCES] * 5, trial
    untouched(guarded)

    # In a chroot, the prefix and the symlinks are the caller's: /etc is root/etc.
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "tmp").mkdir()
    (root / "tmp" / "e").symlink_to("/etc")
    (root / "tmp" / "up").symlink_to("../../../../../etc")

    def in_chroot() -> list[int]:
        os.chroot(root)
        os.chdir("/tmp")
        return [attempt(lambda: os.mkdir("/etc/a")), attempt(lambda: os.mkdir("../../etc/b")),
                attempt(lambda: os.mkdir("e/c")), attempt(write_open("up/d")),
                attempt(lambda: os.mkdir("/tmp/fine"))]

    trial = run_policy(enforcing("/etc"), in_chroot)
    assert trial.value == [errno.EACCES] * 4 + [0], trial
    assert list((root / "etc").iterdir()) == [] and (root / "tmp" / "fine").is_dir()


def test_enforce_holds_while_a_thread_flips_the_path(guarded_tree: tuple[Path, Path]) -> None:
    """The race of the advisory mode: another thread rewrites the path between the check
    and the kernel's own read. Enforced, the call is done from the copy that was checked:
    whatever the timing, nothing lands under the prefix."""
    guarded, free = guarded_tree
    assert len(guarded.name) == len(free.name)
    template = f"{free}/n0000".encode()
    flip_at = len(str(free)) - 1

    def race() -> int:
        buf = ctypes.create_string_buffer(template)
        stop = threading.Event()

        def flipper() -> None:
            while not stop.is_set():
                buf[flip_at] = guarded.name.encode()
                buf[flip_at] = free.name.encode()

        thread = threading.Thread(target=flipper)
        thread.start()
        made = 0
        try:
            for i in range(150):
                buf[len(template) - 4:len(template)] = f"{i:04}".encode()
                if i % 2:
                    made += _libc.mkdir(buf, 0o755) == 0
                else:
                    fd = _libc.open(buf, os.O_WRONLY | os.O_CREAT, 0o644)
                    if fd >= 0:
                        made += 1
                        os.close(fd)
        finally:
            stop.set()
            thread.join()
        return made

    trial = run_policy(enforcing(guarded), race, timeout=120)
    assert trial.exception == "", trial
    untouched(guarded)
    assert trial.value == len(list(free.iterdir())) > 0


def test_enforce_honest_calls_work_as_the_caller(guarded_tree: tuple[Path, Path]) -> None:
    """Elsewhere the calls work, done as the caller: the data written through the
    injected fd lands in the file, O_CREAT and mkdir modes get its umask, the files
    belong to its fsuid/fsgid, non-UTF-8 names are kept byte for byte, O_CLOEXEC is
    the caller's."""
    guarded, free = guarded_tree
    own = free / "own"
    own.mkdir()
    os.chown(own, 1000, 1000)
    odd = os.fsencode(own) + b"/caf\xe9-\xff"

    def honest() -> dict[str, object]:
        os.setgroups([])
        os.setresgid(1000, 1000, 1000)
        os.setresuid(1000, 1000, 1000)
        os.umask(0o027)
        fd = os.open(own / "new", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
        os.write(fd, b"hello")
        cloexec = bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
        os.close(fd)
        fd = _libc.open(os.fsencode(own / "new"), os.O_WRONLY | os.O_APPEND)  # no O_CLOEXEC
        os.write(fd, b" world")
        inherit = not fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        os.close(fd)
        os.mkdir(own / "dir", 0o777)
        os.close(os.open(odd, os.O_WRONLY | os.O_CREAT, 0o600))
        os.rename(own / "dir", own / "dir2")
        (own / "trunc").write_text("long content")
        fd = os.open(own / "trunc", os.O_WRONLY | os.O_TRUNC)
        os.close(fd)
        os.unlink(odd)
        refused = attempt(lambda: os.mkdir(guarded / "x"))
        no_write = attempt(lambda: os.mkdir(free.parent / "x"))  # 0755 root's: DAC
        return {"cloexec": cloexec, "inherit": inherit, "refused": refused,
                "no_write": no_write}

    trial = run_policy(enforcing(guarded), honest)
    assert trial.exception == "", trial
    assert trial.value == {"cloexec": True, "inherit": True, "refused": errno.EACCES,
                           "no_write": errno.EACCES}
    st = (own / "new").stat()
    assert (own / "new").read_bytes() == b"hello world"
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1000, 0o640)
    st = (own / "dir2").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1000, 0o750)
    assert (own / "trunc").read_text() == ""
    assert not os.path.lexists(odd)
    kinds = {s.kind for s in trial.decisions if s.syscall != "openat" or s.kind != "allow"}
    assert kinds == {"inject_fd", "returns", "deny"}, trial.decisions


def test_enforce_refuses_what_it_cannot_emulate(guarded_tree: tuple[Path, Path]) -> None:
    guarded, free = guarded_tree
    (free / "file").write_text("keep")

    def calls() -> tuple[int, int]:
        how = struct.pack("<QQQ", os.O_WRONLY | os.O_CREAT, 0o644, 0)
        rc = _libc.syscall(437, -100, str(guarded / "new").encode(), how, len(how))
        openat2 = ctypes.get_errno() if rc < 0 else 0
        return openat2, attempt(lambda: os.open(free / "file", os.O_RDONLY | os.O_TRUNC))

    trial = run_policy(enforcing(guarded), calls)
    assert trial.value == (errno.ENOSYS, errno.EACCES), trial
    assert (free / "file").read_text() == "keep"
    untouched(guarded)


def test_enforce_an_ancestor_of_the_prefix_cannot_be_moved_away(public_dir: Path) -> None:
    """Renaming a parent of the guarded directory (or swapping it), or the symlink the
    configured prefix goes through, would take the guarded directory out of the guarded
    path, and the next call would find nothing to guard there."""
    parent = public_dir / "srv"
    guarded = parent / "data"
    guarded.mkdir(parents=True)
    (public_dir / "other").mkdir()
    os.symlink(parent, public_dir / "link")

    def attack() -> list[int]:
        results = [attempt(lambda: os.rename(parent, public_dir / "moved")),
                   attempt(lambda: os.rename(public_dir / "link", public_dir / "l2"))]
        renameat2 = _libc.renameat2 if hasattr(_libc, "renameat2") else None
        if renameat2 is not None:  # RENAME_EXCHANGE with another directory
            rc = renameat2(-100, os.fsencode(public_dir / "other"), -100,
                           os.fsencode(parent), 2)
            results.append(ctypes.get_errno() if rc < 0 else 0)
        for where in (public_dir / "moved" / "data", public_dir / "other" / "data"):
            results.append(attempt(write_open(where / "new")))
        return results

    prefix = public_dir / "link" / "data"  # through the symlink: resolves to `guarded`
    trial = run_policy(load(PATH_GUARD, prefixes=[str(prefix)], mode="enforce",
                            errno="EROFS"), attack)
    assert trial.exception == "", trial
    assert trial.value[:3] == [errno.EROFS] * 3, trial.value
    assert list(guarded.iterdir()) == [] and parent.is_dir()


def test_enforce_proc_files_are_the_callers_or_refused(
        guarded_tree: tuple[Path, Path]) -> None:
    """The helper is in the supervisor's pid and network namespaces: a /proc file it
    opened would be its own (/proc/self/...) or the host's (/proc/sys/net/...), not the
    caller's. So opens in a procfs are refused, except the caller's own fds named
    through /proc/self/fd/N or a symlink to it (/dev/stdout): those are opened again
    from /proc/<tid>/fd/N, as the caller, if they are pipes, sockets or character
    devices (a regular file's directory cannot be checked)."""
    guarded, free = guarded_tree

    def calls() -> dict[str, object]:
        read_end, write_end = os.pipe()
        os.dup2(write_end, 7)
        os.symlink("/proc/self/fd/7", free / "stdout-like")
        results: dict[str, object] = {}
        results["comm"] = attempt(write_open("/proc/self/comm", os.O_WRONLY))
        for name in ("/proc/self/fd/7", free / "stdout-like"):
            fd = os.open(name, os.O_WRONLY | os.O_APPEND)
            os.write(fd, b"through %s;" % os.fsencode(name))
            os.close(fd)
        os.close(7)
        os.close(write_end)
        results["pipe"] = os.read(read_end, 1000)
        kept = os.open(guarded / "passwd", os.O_RDONLY)
        results["reopen"] = attempt(write_open(f"/proc/self/fd/{kept}",
                                               os.O_WRONLY | os.O_TRUNC))
        return results

    trial = run_policy(enforcing(guarded), calls)
    assert trial.exception == "", trial
    assert trial.value == {
        "comm": errno.EACCES,
        "pipe": f"through /proc/self/fd/7;through {free}/stdout-like;".encode(),
        "reopen": errno.EACCES}, trial.value
    untouched(guarded)
