"""The fd keeper (`keep`, `serve --fd-keeper`): the attacks on it first, each against a
real keeper process over its real socket, then the daemon's crash and rolling update
with real processes, real filters and a real runc container."""

from __future__ import annotations

import array
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from supervisor.fdstore import write_state_memfd
from supervisor.keeper import Attached, KeeperError, attach, parse_message
from supervisor.profile import build_program, notify_profile
from supervisor.spawn import FilteredChild, spawn_filtered
from supervisor.systemd import Notifier

from .soak import (
    CLI,
    ROOT,
    daemon_process,
    hold_targets,
    release_targets,
    start_target,
    wait_file,
)

#: What the daemon stores per container: notify fd, state memfd, in-flight journal.
FDS_PER_SESSION = 3

# --------------------------------------------------------------------------- helpers


class KeeperProcess:
    """``seccomp-supervisor keep`` as a real process."""

    def __init__(self, path: Path, log: Path, *args: str) -> None:
        self.path = path
        self.log = log
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> KeeperProcess:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [*CLI, "--log-level", "debug", "keep", "--socket", str(self.path),
                 *self.args], cwd=ROOT, stdout=log, stderr=log)
        deadline = time.monotonic() + 20
        while not self.path.is_socket() or "fd keeper on" not in self.log_text():
            assert self.process.poll() is None, self.log_text()
            assert time.monotonic() < deadline, self.log_text()
            time.sleep(0.01)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, text: str, count: int = 1, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while self.log_text().count(text) < count:
            assert time.monotonic() < deadline, f"no {text!r}:\n{self.log_text()}"
            time.sleep(0.01)

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def stop(self, signum: int = signal.SIGTERM) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signum)
        return self.process.wait(20)


@contextlib.contextmanager
def keeper_process(tmp: Path, *args: str, name: str = "keeper") -> Iterator[KeeperProcess]:
    k = KeeperProcess(tmp / name / "keeper.sock", tmp / f"{name}.log", *args)
    try:
        yield k.start()
    finally:
        if k.process is not None and k.process.poll() is None:
            k.process.kill()
            k.process.wait()


def names(attached: Attached) -> list[str]:
    return [item.name for item in attached.fds]


def release(attached: Attached) -> None:
    for item in attached.fds:
        os.close(item.fd)
    attached.sock.close()


def held(k: KeeperProcess) -> list[str]:
    """The names the keeper holds now (attaching, then detaching at once)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            attached = attach(str(k.path))
            break
        except KeeperError as exc:
            # The previous attachment's close may not have been seen yet.
            assert "refused" in str(exc) and time.monotonic() < deadline, exc
            time.sleep(0.01)
    try:
        return names(attached)
    finally:
        release(attached)


def wait_detached(k: KeeperProcess, count: int = 1) -> None:
    k.wait_log("detached", count)


def listener_child() -> FilteredChild:
    """A process under a filter with a listener (notifies getppid, which it never
    calls): the listener is live while the process runs."""
    return spawn_filtered(["sleep", "60"], build_program(notify_profile(["getppid"])))


def test_a_pipe_whose_writer_is_gone_is_dropped(tmp_path: Path) -> None:
    """POLLHUP on any kept fd drops it, as systemd does."""
    with keeper_process(tmp_path) as k:
        attached = attach(str(k.path))
        r, w = os.pipe()
        assert store_fds(k, "pipe", [r])
        os.close(r)
        os.close(w)
        release(attached)
        wait_detached(k)
        assert held(k) == []


def end(child: FilteredChild) -> None:
    child.close()
    if child.process.poll() is None:
        child.process.kill()
    child.process.wait()


def store_fds(k: KeeperProcess, name: str, fds: Sequence[int]) -> bool:
    """FDSTORE=1, sent as FdStore sends it."""
    notifier = Notifier(str(k.path))
    try:
        return notifier.store_fds(name, fds)
    finally:
        notifier.close()


def send(path: Path, text: bytes, fds: Sequence[int] = ()) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(str(path))
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                      array.array("i", fds).tobytes())] if fds else []
        sock.sendmsg([text], ancillary)


SESSION = "session-0123456789ab"


# --------------------------------------------------------------------------- protocol


def test_parse_message() -> None:
    assert parse_message(b"FDSTORE=1\nFDNAME=a b") == {"FDSTORE": "1", "FDNAME": "a b"}
    for bad in (b"FDSTORE", b"=1", b"A=1\nA=2", b"\xff=1"):
        with pytest.raises(ValueError):
            parse_message(bad)


def test_stored_fds_come_back_with_their_names_to_the_next_daemon(tmp_path: Path) -> None:
    child = listener_child()
    with keeper_process(tmp_path) as k:
        first = attach(str(k.path))
        assert (names(first), first.retired, first.attaches) == ([], False, 0)
        state = write_state_memfd(b'{"x": 1}')
        assert store_fds(k, SESSION, [child.listener_fd, state])
        other = os.eventfd(0)  # a pipe's read end would report POLLHUP once we close w
        assert store_fds(k, "other", [other])
        os.close(state)
        os.close(other)
        first.sock.close()  # the daemon dies: the keeper keeps everything
        wait_detached(k)
        second = attach(str(k.path))
        try:
            assert names(second) == [SESSION, SESSION, "other"]
            assert second.attaches == 1
            fd0 = second.fds[0].fd
            assert os.readlink(f"/proc/self/fd/{fd0}") == "anon_inode:seccomp notify"
            assert os.pread(second.fds[1].fd, 100, 0) == b'{"x": 1}'
            # FDSTOREREMOVE drops a name.
            notifier = Notifier(str(k.path))
            notifier.remove_fds("other")
            notifier.close()
        finally:
            release(second)
        assert held(k) == [SESSION, SESSION]
        end(child)


# --------------------------------------------------------------------------- attacks


SENDER = r'''
import array, json, os, socket, sys
path, how = sys.argv[1], sys.argv[2]
r, w = os.pipe()
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.connect(path)
if how == "uid":
    # Attached as root, then the real uid (what SCM_CREDENTIALS carries) is nobody's.
    from supervisor.keeper import attach
    attached = attach(path)
    os.setresuid(65534, 65534, 0)
def store(name):
    sock.sendmsg([b"FDSTORE=1\nFDNAME=" + name.encode()],
                 [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]).tobytes())])
store("from-" + how)
sock.sendmsg([b"FDSTOREREMOVE=1\nFDNAME=keep-me"])
sock.sendmsg([b"HANDEDOVER=1"])
if how == "uid":
    os.setresuid(0, 0, 0)
print("sent", flush=True)
sys.stdin.read()  # stay alive (attached) until the test has looked
'''


@pytest.mark.parametrize("how", ["uid", "pid"])
def test_only_the_attached_daemon_s_uid_and_pid_may_store_remove_or_retire(
        tmp_path: Path, how: str) -> None:
    """`uid`: a process attached as root that sends as uid 65534 (SCM_CREDENTIALS, which
    the kernel fills in); `pid`: another root process while the test is attached. Both
    try FDSTORE, FDSTOREREMOVE of a stored name and HANDEDOVER: all refused."""
    with keeper_process(tmp_path) as k:
        attached = None
        if how == "pid":
            attached = attach(str(k.path))
            event = os.eventfd(0)
            assert store_fds(k, "keep-me", [event])
            os.close(event)
            k.wait_log("stored 1 fds under keep-me")
        before = k.fd_count()
        sender = subprocess.Popen([sys.executable, "-c", SENDER, str(k.path), how], cwd=ROOT,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            assert sender.stdout is not None
            assert sender.stdout.readline() == b"sent\n"
            k.wait_log("refused a message", 3)
            # The refused fd was closed (the uid sender's attachment is one more fd).
            assert k.fd_count() == before + (how == "uid")
            if attached is not None:
                release(attached)
                wait_detached(k)
        finally:
            sender.communicate(b"")
        log = k.log_text()
        if how == "uid":
            assert "sender is uid 65534, only uid 0 may use the keeper" in log
            assert held(k) == []
        else:
            assert "only the attached daemon may store" in log
            assert held(k) == ["keep-me"]
        assert "retired" not in log.split("refused a message", 1)[1]
        assert not os.path.lexists(f"{k.path}.retired")


def test_one_daemon_per_keeper(tmp_path: Path) -> None:
    with keeper_process(tmp_path) as k:
        first = attach(str(k.path))
        with pytest.raises(KeeperError, match=f"refused: the keeper serves pid {os.getpid()}"):
            attach(str(k.path))
        release(first)
        wait_detached(k)
        release(attach(str(k.path)))  # free again once the first one is gone


def test_a_seccomp_listener_is_kept_only_as_the_first_fd_of_a_new_session(
        tmp_path: Path) -> None:
    """Anything else would hand a daemon a listener it does not serve as a session (its
    container's calls would then wait forever) or two readers for one session."""
    a, b = listener_child(), listener_child()
    memfd = write_state_memfd(b"{}")
    try:
        with keeper_process(tmp_path) as k:
            attached = attach(str(k.path))
            before = k.fd_count()
            store_fds(k, "not-a-session", [a.listener_fd])
            store_fds(k, "session-aaaaaaaaaaaa", [memfd, a.listener_fd])
            store_fds(k, "session-bbbbbbbbbbbb", [a.listener_fd, b.listener_fd])
            store_fds(k, "session-cccccccccccc", [memfd])
            k.wait_log("refused a message", 4)
            assert k.fd_count() == before
            # Accepted: a listener and its state; more state later (the crash journal);
            # a second listener under the same name is not.
            assert store_fds(k, SESSION, [a.listener_fd, memfd])
            assert store_fds(k, SESSION, [memfd])
            store_fds(k, SESSION, [b.listener_fd])
            k.wait_log("refused a message", 5)
            log = k.log_text()
            assert "a seccomp listener is kept only under a session-* name" in log
            assert "a new session must start with exactly one seccomp listener" in log
            assert "has its seccomp listener already" in log
            release(attached)
            wait_detached(k)
            assert held(k) == [SESSION] * 3
    finally:
        os.close(memfd)
        end(a)
        end(b)


def test_names_sizes_and_the_count_are_bounded(tmp_path: Path) -> None:
    with keeper_process(tmp_path, "--max-fds", "3") as k:
        attached = attach(str(k.path))
        r, w = os.pipe()
        before = k.fd_count()
        refused = 0
        for bad in ("a:b", "x" * 256, "tab\there", "", "é"):
            send(k.path, b"FDSTORE=1\nFDNAME=" + bad.encode(), [r])
            refused += 1
        # A datagram longer than the keeper reads: truncated, refused, its fd closed.
        send(k.path, b"FDSTORE=1\nFDNAME=long\nX=" + b"y" * 5000, [r])
        refused += 1
        send(k.path, b"FDSTORE=1\nFDNAME=four", [r, r, r, r])  # over --max-fds 3
        refused += 1
        send(k.path, b"STATUS=fds without FDSTORE", [r])
        refused += 1
        k.wait_log("refused a message", refused)
        assert k.fd_count() == before
        send(k.path, b"FDSTORE=1\nFDNAME=three", [r, r, w])
        send(k.path, b"FDSTORE=1\nFDNAME=one-more", [r])
        k.wait_log("the store is full (3 of 3 fds)")
        log = k.log_text()
        assert "too long (message or fds truncated)" in log
        assert "fds without FDSTORE=1" in log
        assert log.count("invalid fd name") == 5
        release(attached)
        wait_detached(k)
        assert held(k) == ["three"] * 3
        os.close(r)
        os.close(w)


def test_a_listener_whose_filter_has_no_task_left_is_dropped_with_its_session(
        tmp_path: Path) -> None:
    """POLLHUP, as systemd does; the state memfd goes with it. Polled, never read: a
    pending notification of a live filter must not make the keeper read it."""
    child = listener_child()
    memfd = write_state_memfd(b"{}")
    other = listener_child()
    with keeper_process(tmp_path) as k:
        attached = attach(str(k.path))
        assert store_fds(k, SESSION, [child.listener_fd, memfd])
        assert store_fds(k, "session-ffffffffffff", [other.listener_fd])
        end(child)
        k.wait_log(f"{SESSION}: its filter has no task left: dropped")
        release(attached)
        wait_detached(k)
        assert held(k) == ["session-ffffffffffff"]
    os.close(memfd)
    end(other)


def test_the_keeper_never_waits_for_an_attach_that_does_not_read(tmp_path: Path) -> None:
    """More replies than the attach socket takes: the keeper sends what fits, serves
    its socket meanwhile, and drops the attach after --reply-timeout."""
    with keeper_process(tmp_path, "--reply-timeout", "1") as k:
        first = attach(str(k.path))
        for i in range(40):
            event = os.eventfd(0)
            assert store_fds(k, f"event-{i}", [event])
            os.close(event)
        release(first)
        wait_detached(k)
        stuck, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # The attacher chooses the keeper's end: the smallest send buffer the kernel
        # allows holds a few of the 41 replies, then the keeper's sends would block.
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
        send(k.path, b"ATTACH=1", [theirs.fileno()])
        theirs.close()
        k.wait_log("attached: giving it 40 fds", 1)
        # Still answering (a refusal) while the stuck attach holds the keeper's reply.
        with pytest.raises(KeeperError, match="refused"):
            attach(str(k.path), timeout=0.5)
        k.wait_log("did not take its fds within 1 s: detached")
        stuck.close()
        assert len(held(k)) == 40


def test_an_attach_must_carry_one_seqpacket_socket(tmp_path: Path) -> None:
    with keeper_process(tmp_path) as k:
        before = k.fd_count()
        r, w = os.pipe()
        send(k.path, b"ATTACH=1", [r])
        send(k.path, b"ATTACH=1", [r, w])
        dgram, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        send(k.path, b"ATTACH=1", [dgram.fileno()])
        k.wait_log("refused a message", 3)
        assert k.fd_count() == before
        assert "ATTACH fd is not a unix SOCK_SEQPACKET socket" in k.log_text()
        for fd in (r, w):
            os.close(fd)
        dgram.close()
        other.close()


def test_the_socket_must_be_in_a_directory_only_its_uid_may_write(tmp_path: Path) -> None:
    """The keeper refuses a directory of another uid; the daemon refuses to send notify
    fds to a socket in a directory others may write to, or a socket of another uid."""
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)
    os.chown(shared, 65534, 65534)
    k = KeeperProcess(shared / "keeper.sock", tmp_path / "k.log")
    with open(k.log, "ab") as log:
        proc = subprocess.run([*CLI, "keep", "--socket", str(k.path)], cwd=ROOT,
                              stdout=log, stderr=log, timeout=30)
    assert proc.returncode == 1
    assert "belongs to uid 65534, not 0" in k.log_text()
    # Ours but world-writable (an emptyDir): the keeper tightens it.
    ours = tmp_path / "ours"
    ours.mkdir()
    os.chmod(ours, 0o777)
    with keeper_process(tmp_path, name="ours") as k2:
        assert os.stat(k2.path.parent).st_mode & 0o777 == 0o755
        release(attach(str(k2.path)))
        # A world-writable directory, or a socket of another uid: not used.
        os.chmod(k2.path.parent, 0o777)
        with pytest.raises(KeeperError, match="is writable by others"):
            attach(str(k2.path))
        os.chmod(k2.path.parent, 0o755)
        os.chown(k2.path, 65534, 65534)
        with pytest.raises(KeeperError, match="is not a socket of uid 0"):
            attach(str(k2.path))


def test_no_directory_above_the_socket_may_be_writable_by_others(tmp_path: Path) -> None:
    """A private directory is not enough if a directory above it is writable by others:
    they could rename it away and put theirs, with a socket of theirs, in its place
    between the daemon's checks and its connect (and be sent every notify fd). Both
    sides refuse that; a sticky directory (``/tmp``) is fine, and a symlink on the way
    is resolved once, so retargeting it later changes nothing."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # not sticky: anyone may rename what is in it
    k = KeeperProcess(shared / "keeper" / "keeper.sock", tmp_path / "k.log")
    (shared / "keeper").mkdir(mode=0o700)
    with open(k.log, "ab") as log:
        proc = subprocess.run([*CLI, "keep", "--socket", str(k.path)], cwd=ROOT,
                              stdout=log, stderr=log, timeout=30)
    assert proc.returncode == 1, k.log_text()
    assert f"{shared} is writable by others" in k.log_text()
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    with keeper_process(sticky, name="ok") as k2:
        release(attach(str(k2.path)))
        # The keeper's directory (served) moved under a non-sticky shared one, reached
        # through a symlink: the daemon refuses it.
        os.chmod(sticky, 0o777)
        link = tmp_path / "link"
        link.symlink_to(sticky)
        with pytest.raises(KeeperError, match=f"{sticky} is writable by others"):
            attach(str(link / "ok" / "keeper.sock"))
        with pytest.raises(KeeperError, match=f"{sticky} is writable by others"):
            attach(str(k2.path))
        os.chmod(sticky, 0o1777)
        release(attach(str(link / "ok" / "keeper.sock")))


def test_the_daemon_side_refuses_a_keeper_that_lies(tmp_path: Path) -> None:
    """An answer whose FDS count is not what came: refused, every fd received closed."""
    directory = tmp_path / "fake"
    directory.mkdir(mode=0o700)
    path = directory / "keeper.sock"
    before = len(os.listdir("/proc/self/fd"))
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    r, w = os.pipe()

    def fake() -> None:
        _data, anc, _f, _a = server.recvmsg(100, socket.CMSG_SPACE(4))
        [(_l, _k, payload)] = anc
        [fd] = array.array("i", payload)
        with socket.socket(fileno=fd) as sock:
            sock.sendmsg([b"FDNAME=x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                          array.array("i", [r, w]).tobytes())])
            sock.send(b"END=1\nFDS=1")

    import threading

    t = threading.Thread(target=fake)
    t.start()
    with pytest.raises(KeeperError, match="2 fds for FDS=1"):
        attach(str(path))
    t.join()
    os.close(r)
    os.close(w)
    server.close()
    assert len(os.listdir("/proc/self/fd")) == before


# --------------------------------------------------------------------------- the daemon


def test_the_daemon_stores_where_it_checked_not_where_a_symlink_points_now(
        tmp_path: Path) -> None:
    """``--fd-keeper`` through a symlink that another uid owns (in a sticky directory,
    which lets it replace its own link): the daemon checks and attaches to where the
    link pointed then; retargeted afterwards to a socket of the link's owner, it must
    not send that socket a single notify fd when it stores a new container."""
    from .soak import config_text

    sticky = tmp_path / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    link = sticky / "link"
    evil_dir = tmp_path / "evil"
    evil_dir.mkdir(mode=0o700)
    evil = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    evil.bind(str(evil_dir / "keeper.sock"))
    stop = tmp_path / "stop"
    with evil, keeper_process(tmp_path) as k, \
            daemon_process(tmp_path, config_text(tmp_path)) as d:
        link.symlink_to(k.path.parent)
        os.lchown(link, 65534, 65534)
        d.start("--fd-keeper", str(link / "keeper.sock"))
        link.unlink()  # the link's owner retargets it
        link.symlink_to(evil_dir)
        os.lchown(link, 65534, 65534)
        target = start_target(d.socket_path, 0, 0, "--until", str(stop), "--ready",
                              str(tmp_path / "ready-0"), container_id="ctr-0")
        try:
            wait_file(tmp_path / "ready-0")
            k.wait_log(f"stored {FDS_PER_SESSION} fds under session-")
            evil.setblocking(False)
            with pytest.raises(BlockingIOError):
                evil.recvmsg(4096, socket.CMSG_SPACE(16 * 4))
        finally:
            stop.touch()
            target.result(30)


def test_a_sigkilled_daemon_serves_the_same_containers_again_from_the_keeper(
        tmp_path: Path) -> None:
    """keeper + `serve --fd-keeper`; targets calling in a loop; the daemon SIGKILLed
    (between calls: calls in flight at a crash are tests/test_crash.py's) and started
    again with the pod's arguments: it serves them again and does not take over from
    anyone. Then the keeper dies and comes back: the daemon stores every session again
    (journals included), and a second crash still loses nothing."""
    from .soak import config_text

    stop, hold = tmp_path / "stop", tmp_path / "hold"
    n = 4
    with keeper_process(tmp_path) as k, daemon_process(tmp_path, config_text(tmp_path)) as d:
        args = ("--takeover", "--fd-keeper", str(k.path))
        d.start(*args)
        targets = [start_target(d.socket_path, i, 0, "--until", str(stop), "--hold",
                                str(hold), "--ready", str(tmp_path / f"ready-{i}"),
                                container_id=f"ctr-{i}") for i in range(n)]
        try:
            for i in range(n):
                wait_file(tmp_path / f"ready-{i}")
            for crash in (1, 2):
                hold_targets(hold, n)
                d.process.kill()
                d.process.wait()
                d.start(*args)
                d.wait_log(f"fd store: serving {n} sessions again", count=crash)
                release_targets(hold, n)
                time.sleep(0.2)
                assert {s["container"] for s in d.status()["sessions"]} == \
                    {f"ctr-{i}" for i in range(n)}
                if crash == 1:
                    # The keeper dies (a sidecar restarted): the daemon serves on and
                    # stores every session in the next keeper.
                    assert k.stop(signal.SIGKILL) == -signal.SIGKILL
                    d.wait_log("fd keeper .* is gone")
                    assert d.status()["fd_keeper"] == {"path": str(k.path),
                                                       "attached": False}
                    gauge = ("seccomp_supervisor_fd_keeper_attached",
                             (("path", str(k.path)),))
                    assert d.metrics()[gauge] == 0
                    k.start()
                    d.wait_log(f"is back: {n} of {n} sessions stored again")
                    assert d.status()["fd_keeper"]["attached"] is True
                    assert d.metrics()[gauge] == 1
                    text = subprocess.run(
                        [*CLI, "status", "--control", d.control_path], cwd=ROOT,
                        capture_output=True, text=True, check=True).stdout
                    assert f"fd keeper: {k.path} (attached)" in text
            stop.touch()
            results = [t.result(60) for t in targets]
        finally:
            for t in targets:
                t.kill()
        assert all(r["ok"] == r["calls"] and r["wrong"] == 0 for r in results), results
        log = d.log_text()
        assert log.count(f"fd keeper: it holds {FDS_PER_SESSION * n} fds: serving them again, not "
                         "taking over") == 2
        d.process.send_signal(signal.SIGTERM)
        assert d.process.wait(20) == 0
        print(f"\nkeeper crash restarts: {sum(r['calls'] for r in results)} calls, "
              f"2 SIGKILLs, 1 keeper restart; lost 0, wrong 0")


@pytest.mark.runtime
def test_a_rolling_update_breaks_no_call_and_the_old_pod_takes_nothing_back(
        tmp_path: Path) -> None:
    """Two "pods" on one node: each a keeper and `serve --takeover --fd-keeper` (the
    DaemonSet's arguments) sharing the socket directory, as maxSurge: 1 runs them. A runc
    container calls `kill -0` in a loop (the policy's answer for each pid is known: any
    ENOSYS or default shows up as a wrong line). The new pod takes over, the old daemon
    exits 0 and the kubelet starts it again (restartPolicy: Always): it must serve
    nothing and take nothing back. Then the old pod goes (its daemon and keeper)."""
    from .test_restart import (
        answered_before_and_after,
        loop_container,
        loop_output,
        loop_verdict,
        probe_config,
    )

    n = 2000  # still calling after both keepers' restarts
    with keeper_process(tmp_path, name="old-pod") as old_keeper, \
            keeper_process(tmp_path, name="new-pod") as new_keeper, \
            daemon_process(tmp_path, probe_config(tmp_path)) as d:
        old_args = ("--takeover", "--fd-keeper", str(old_keeper.path))
        old = d.start(*old_args)
        with loop_container(tmp_path, d.socket_path, n, "keeper-roll") as c:
            old_keeper.wait_log(f"stored {FDS_PER_SESSION} fds under session-")
            before = c.output().count("\n")
            begin = time.monotonic()
            new = d.start("--takeover", "--fd-keeper", str(new_keeper.path))
            assert old.wait(20) == 0, d.log_text()[-3000:]
            took = time.monotonic() - begin
            # The old pod's keeper dropped its copies: the new pod's holds them now.
            old_keeper.wait_log("handed its sessions over to a newer daemon: 1 names "
                                "dropped; retired")
            new_keeper.wait_log(f"stored {FDS_PER_SESSION} fds under session-")
            # Even the old pod's keeper restarted still knows (from its emptyDir).
            assert old_keeper.stop(signal.SIGKILL) == -signal.SIGKILL
            old_keeper.start()
            old_keeper.wait_log("keeper.sock.retired exists: retired")
            # The kubelet restarts the old pod's daemon: it idles, takes nothing back.
            restarted = d.start(*old_args, wait=False)
            d.wait_log("the daemon of this pod handed its sessions over to a newer one")
            assert restarted.poll() is None
            status = d.status()
            after = c.output().count("\n")
            assert after < n, "the loop ended before the checks: make n larger"
            assert status["pid"] == new.pid and len(status["sessions"]) == 1
            # The old pod is deleted: its daemon (SIGTERM) and then its keeper.
            restarted.send_signal(signal.SIGTERM)
            assert restarted.wait(20) == 0
            assert old_keeper.stop() == 0
            lines = loop_output(c)
        lost, wrong = loop_verdict(lines, n)
        assert lost == 0 and not wrong, (lost, wrong[:5])
        assert before < n and after > before  # the loop ran across the update
        log = d.log_text()
        assert log.count("takeover requested") == 1  # no ping-pong
        paused, new_count = answered_before_and_after(d, log)
        assert paused + new_count == n, (paused, new_count)
        print(f"\nrolling update with keepers: {n} notified calls, {after - before} while "
              f"both pods ran (the takeover: {took:.2f} s), old daemon answered {paused}, new "
              f"{new_count:g}; lost {lost}, wrong {len(wrong)}; the restarted old daemon "
              f"served 0")
        new.send_signal(signal.SIGTERM)
        assert new.wait(20) == 0


def test_a_second_daemon_on_one_keeper_exits_1_and_the_first_serves_on(
        tmp_path: Path) -> None:
    from .soak import config_text

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with keeper_process(tmp_path) as k, \
            daemon_process(tmp_path / "a", config_text(tmp_path / "a")) as first, \
            daemon_process(tmp_path / "b", config_text(tmp_path / "b")) as second:
        first.start("--fd-keeper", str(k.path))
        proc = second.start("--fd-keeper", str(k.path), wait=False)
        assert proc.wait(30) == 1
        assert f"fd keeper: {k.path}: refused: the keeper serves pid {first.pid}" in \
            second.log_text()
        assert start_target(first.socket_path, 1, 20).result(30)["ok"] == 20
        first.process.send_signal(signal.SIGTERM)
        assert first.process.wait(20) == 0


def test_the_daemon_waits_for_its_keeper_to_start(tmp_path: Path) -> None:
    """In a pod the two start together (the keeper's startup probe orders them, and a
    keeper restarting at the same time as the daemon does not)."""
    from .soak import config_text

    k = KeeperProcess(tmp_path / "keeper" / "keeper.sock", tmp_path / "keeper.log")
    with daemon_process(tmp_path, config_text(tmp_path)) as d:
        d.start("--fd-keeper", str(k.path), wait=False)
        d.wait_log("no such directory; waiting for it")
        try:
            k.start()
            d.wait_log("serving on")
            assert start_target(d.socket_path, 1, 20).result(30)["ok"] == 20
            k.wait_log(f"stored {FDS_PER_SESSION} fds under session-")
            d.process.send_signal(signal.SIGTERM)
            assert d.process.wait(20) == 0
        finally:
            k.stop()


def test_a_daemon_whose_pid_the_keeper_cannot_see_is_refused(tmp_path: Path) -> None:
    """A keeper in a child pid namespace gets pid 0 in SCM_CREDENTIALS for us: it could
    not tell our stores from another process's, so it refuses the attach."""
    path = tmp_path / "k" / "keeper.sock"
    log = tmp_path / "keeper.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(["unshare", "--pid", "--fork", *CLI, "keep", "--socket",
                                 str(path)], cwd=ROOT, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 20
        while not path.is_socket():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.01)
        with pytest.raises(KeeperError, match="cannot see your pid"):
            attach(str(path))
    finally:
        # The keeper is the init of its namespace, unshare's child: stop it directly.
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        for child in children:
            os.kill(int(child), signal.SIGTERM)
        proc.wait(20)
    assert "refused a message from pid 0" in log.read_text()



def test_a_stale_pollhup_does_not_drop_the_fd_that_took_its_number(tmp_path: Path) -> None:
    """One epoll batch holding the socket (FDSTOREREMOVE of A, then FDSTORE of B) and
    then A's listener's POLLHUP: removing A frees its fd number, B's listener gets it,
    and the POLLHUP that was A's must not drop B. The keeper runs in this process, one
    step at a time, so that batch is certain."""
    from supervisor.keeper import Keeper

    path = tmp_path / "k" / "keeper.sock"
    keeper = Keeper(str(path))
    keeper.bind()
    a, b = listener_child(), listener_child()
    fillers: list[int] = []
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        send(path, b"ATTACH=1", [theirs.fileno()])
        theirs.close()
        keeper.step(5)
        assert ours.recv(100).startswith(b"END=1")
        notifier = Notifier(str(path))
        assert notifier.store_fds("session-aaaaaaaaaaaa", [a.listener_fd])
        keeper.step(5)
        [kept] = keeper.groups["session-aaaaaaaaaaaa"]
        a.close()  # our copy (the keeper's stays), and before the fillers
        # No free fd number below A's: B's listener will get exactly A's.
        while (fd := os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)) < kept:
            fillers.append(fd)
        os.close(fd)
        assert notifier.remove_fds("session-aaaaaaaaaaaa")
        assert notifier.store_fds("session-bbbbbbbbbbbb", [b.listener_fd])
        end(a)  # POLLHUP on A's listener, after the socket became readable
        time.sleep(0.1)
        keeper.step(0)
        notifier.close()
        assert keeper.groups.get("session-bbbbbbbbbbbb") == [kept]  # the same number
        keeper.step(0)
        assert list(keeper.groups) == ["session-bbbbbbbbbbbb"]
    finally:
        ours.close()
        keeper.close()
        for fd in fillers:
            os.close(fd)
        end(a)
        end(b)


def test_the_last_words_of_a_dead_daemon_count_and_its_successor_is_not_refused(
        tmp_path: Path) -> None:
    """One batch: the attached daemon's HANDEDOVER=1, its death (POLLHUP on its attach
    socket) and the next daemon's ATTACH. The handover counts (it was sent while
    attached), and the next daemon is attached, not refused as if the dead one were
    still there. In-process, one step, so that batch is certain."""
    from supervisor.keeper import Keeper

    path = tmp_path / "k" / "keeper.sock"
    keeper = Keeper(str(path))
    keeper.bind()
    first, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    send(path, b"ATTACH=1", [theirs.fileno()])
    theirs.close()
    keeper.step(5)
    assert first.recv(100).startswith(b"END=1")
    second, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        send(path, b"HANDEDOVER=1")
        first.close()
        send(path, b"ATTACH=1", [theirs.fileno()])
        theirs.close()
        keeper.step(0)
        keeper.step(0)
        assert parse_message(second.recv(100)) == {
            "END": "1", "FDS": "0", "RETIRED": "1", "ATTACHES": "1"}
        assert keeper.retired and keeper.owner is not None and keeper.refused == 0
    finally:
        second.close()
        keeper.close()
