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
import os
import shutil
import signal
import stat
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
    running = emulate._helper
    if running is not None and running.pid:
        total += _cpu_seconds(running.pid)
    return total


def test_an_emulated_mknod_costs_no_interpreter_start(public_dir: Path) -> None:
    """Each emulated mknod started a root Python interpreter (~90 ms of CPU here), so 47
    mknod/s from one container saturated two CPUs. Now a call costs a fork of a small
    pre-started helper: a generous bound (a third of one interpreter start per call)
    that the old design cannot meet."""
    calls = 40
    policy = load(DEVICES, emulation_rate=0.0)
    run_policy(policy, make_chr(public_dir / "warm"))  # the helper is up
    helper_pid = emulate.start_helper().pid
    before = _our_cpu_seconds()
    trial = run_policy(policy, lambda: [make_chr(public_dir / f"n{i}")()
                                        for i in range(calls)])
    spent = _our_cpu_seconds() - before
    assert trial.exception == "" and trial.decided() == ["returns"] * calls, trial
    assert emulate.start_helper().pid == helper_pid  # the same helper served them all
    assert spent / calls < 0.030, f"{spent / calls * 1000:.1f} ms of CPU per call"


def test_the_emulation_rate_limits_one_container(public_dir: Path) -> None:
    """Over its emulation rate a container gets EAGAIN without the helper being asked;
    the policy has a rate by default."""
    assert load(DEVICES).options["emulation_rate"] > 0

    def flood() -> list[int]:
        return [attempt(make_chr(public_dir / f"n{i}")) for i in range(30)]

    trial = run_policy(load(DEVICES, emulation_rate=2.0, emulation_burst=5), flood)
    assert trial.value[:5] == [0] * 5, trial
    assert trial.value.count(errno.EAGAIN) >= 20, trial.value
    assert len(list(public_dir.iterdir())) == trial.value.count(0)


def _helper_children() -> int:
    running = emulate.start_helper()
    path = Path(f"/proc/{running.pid}/task/{running.pid}/children")
    return len(path.read_text().split())


def _open_as_caller_policy() -> PolicySet:
    """Writing opens emulated with as_caller(Open) and answered with the fd."""
    policy = PolicySet("open-as-caller")

    @policy.on("openat")
    async def open_(n: Notification) -> Decision:
        if n.args[2] & os.O_ACCMODE == os.O_RDONLY:
            return allow(reason="read-only")
        path = await n.read_cstring(n.args[1])
        result = await emulate.as_caller(n, emulate.Open(path, n.args[2], n.args[3],
                                                         signed_fd(n.args[0])))
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
