"""``seccomp-supervisor run``: real children under real filters, handed to a real socket."""

from __future__ import annotations

import array
import errno
import fcntl
import glob
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import pyseccomp
import pytest

from supervisor import abi, bpf
from supervisor.handoff import build_state_message
from supervisor.launcher import LaunchError, hand_over, run

ROOT = str(Path(__file__).resolve().parent.parent)
# syscall(SYS_getppid) rather than getppid(): glibc's getppid() never sets errno (the call
# cannot fail), so -EPERM would come back as a plain -1 with errno untouched.
GETPPID_IS_EPERM = ("import ctypes,sys; r=ctypes.CDLL(None,use_errno=True).syscall(110); "
                    "sys.exit(0 if r==-1 and ctypes.get_errno()==1 else 3)")


def notify_program(*names: str) -> bytes:
    flt = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    for name in names:
        flt.add_rule(pyseccomp.NOTIFY, name)
    return bpf.export_program(flt)


def children() -> set[int]:
    found: set[int] = set()
    for path in glob.glob(f"/proc/{os.getpid()}/task/*/children"):
        try:
            with open(path) as f:
                found.update(int(pid) for pid in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            pass  # a thread (an earlier test's reading or timer thread) ended meanwhile
    return found


class NotifyServer:
    """A tiny supervisor in a thread: takes one handoff, then answers every notified call
    with -EPERM until no task uses the filter any more."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(1)
        self.sock.settimeout(20)
        self.message = b""
        self.fd_kinds: list[str] = []
        self.answered: list[str] = []
        self.error: BaseException | None = None
        self.handed = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> NotifyServer:
        self.thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.thread.join(30)
        self.sock.close()
        assert not self.thread.is_alive()
        if self.error is not None and exc is None:
            raise self.error

    def _run(self) -> None:
        fds: list[int] = []
        try:
            conn, _ = self.sock.accept()
            with conn:
                conn.settimeout(10)
                while True:
                    data, anc, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(16 * 4))
                    for level, kind, payload in anc:
                        if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                            fds.extend(array.array("i", payload))
                    if not data:
                        break
                    self.message += data
            self.fd_kinds = [os.readlink(f"/proc/self/fd/{fd}") for fd in fds]
            self.handed.set()
            if self.fd_kinds == ["anon_inode:seccomp notify"]:
                self._answer(fds[0])
        except BaseException as exc:
            self.error = exc
        finally:
            self.handed.set()
            for fd in fds:
                os.close(fd)

    def _answer(self, fd: int) -> None:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            events = poller.poll(100)
            if not events:
                continue
            if events[0][1] & select.POLLIN:
                buf = bytearray(abi.NOTIF_SIZE)
                try:
                    fcntl.ioctl(fd, abi.IOCTL_NOTIF_RECV, buf, True)
                    notif = abi.unpack_notification(buf)
                    fcntl.ioctl(fd, abi.IOCTL_NOTIF_SEND,
                                abi.pack_response(notif.id, 0, -errno.EPERM, 0))
                except OSError as exc:
                    if exc.errno != errno.ENOENT:
                        raise
                    continue
                self.answered.append(str(notif.nr))
            elif events[0][1] & (select.POLLHUP | select.POLLERR):
                return
        raise TimeoutError("the target never went away")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NotifyServer]:
    with NotifyServer(str(tmp_path / "notify.sock")) as srv:
        yield srv


def test_run_hands_over_and_the_supervisor_answers(server: NotifyServer) -> None:
    status = run(["python3", "-c", GETPPID_IS_EPERM], notify_program("getppid"),
                 socket_path=server.path, metadata="team=test\nkind=unit")
    assert status == 0
    server.thread.join(10)
    assert server.fd_kinds == ["anon_inode:seccomp notify"]
    assert server.answered and set(server.answered) == {"110"}  # python3 itself calls it too
    pid = json.loads(server.message)["pid"]
    assert server.message == build_state_message(
        pid=pid, container_id=f"run-{pid}", metadata="team=test\nkind=unit",
        bundle=os.getcwd(), status="creating")


def test_container_id(server: NotifyServer) -> None:
    assert run(["true"], notify_program("swapon"), socket_path=server.path,
               container_id="job-17") == 0
    server.thread.join(10)
    assert json.loads(server.message)["state"]["id"] == "job-17"


def test_exit_status_passes_through(server: NotifyServer) -> None:
    assert run(["sh", "-c", "exit 7"], notify_program("swapon"), socket_path=server.path) == 7


def test_killed_by_a_signal_is_128_plus_signal(server: NotifyServer) -> None:
    status = run(["sh", "-c", "kill -9 $$"], notify_program("swapon"), socket_path=server.path)
    assert status == 128 + 9


def test_daemon_down_kills_the_child(tmp_path: Path) -> None:
    before = children()
    fds_before = len(os.listdir("/proc/self/fd"))
    path = str(tmp_path / "nobody.sock")
    with pytest.raises(LaunchError, match=f"supervisor at {path} is not reachable"):
        run(["sleep", "30"], notify_program("getppid"), socket_path=path)
    assert children() == before
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_stale_socket_is_not_reachable(tmp_path: Path) -> None:
    path = str(tmp_path / "stale.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    before = children()
    with pytest.raises(LaunchError, match="not reachable: Connection refused"):
        run(["sleep", "30"], notify_program("getppid"), socket_path=path)
    assert children() == before


def test_hand_over_sends_one_message_and_keeps_the_fd(tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    r, w = os.pipe()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listening:
        listening.bind(path)
        listening.listen(1)
        hand_over(path, r, b'{"hello": 1}')  # completes while queued in the backlog
        assert os.fstat(r)  # still ours
        conn, _ = listening.accept()
        with conn:
            data, anc, _, _ = conn.recvmsg(4096, socket.CMSG_SPACE(16 * 4))
            assert data == b'{"hello": 1}'
            [(_, _, payload)] = anc
            [received] = array.array("i", payload)
            try:
                assert os.fstat(received).st_ino == os.fstat(r).st_ino
            finally:
                os.close(received)
            assert conn.recv(10) == b""  # write side shut down and closed
    os.close(r)
    os.close(w)


# --------------------------------------------------------------------------- signals

LAUNCHER = """
import os, sys
sys.path.insert(0, sys.argv[1])
import pyseccomp
from supervisor import bpf
from supervisor.launcher import run
tty, socket_path, argv = sys.argv[2], sys.argv[3], sys.argv[4:]
if tty != "-":
    os.setsid()
    terminal = os.open(tty, os.O_RDWR)  # becomes our controlling terminal
flt = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
flt.add_rule(pyseccomp.NOTIFY, "swapon")
sys.exit(run(argv, bpf.export_program(flt), socket_path=socket_path))
"""
# Counts the SIGINTs it gets; exits with 10 + that count.
COUNT_SIGINT = """
import signal, sys, time
hits = []
signal.signal(signal.SIGINT, lambda *_: hits.append(1))
open(sys.argv[1], "w").close()
deadline = time.monotonic() + 20
while not hits and time.monotonic() < deadline:
    time.sleep(0.01)
time.sleep(0.5)
sys.exit(10 + len(hits))
"""


def start_launcher(tty: str, socket_path: str, *argv: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", LAUNCHER, ROOT, tty, socket_path, *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_until_forwarding(proc: subprocess.Popen[bytes]) -> None:
    """Wait until the launcher sleeps in sigtimedwait: it is in its wait loop.

    The signal mask is no sign of it: CPython blocks every signal around each fork (the
    imports run ldconfig), and during sigtimedwait the kernel shows the waited signals
    as unblocked."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with open(f"/proc/{proc.pid}/wchan") as f:
            if "sigtimedwait" in f.read():
                return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    raise TimeoutError("the launcher never reached its wait loop")


def finish(proc: subprocess.Popen[bytes]) -> int:
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not err or proc.returncode in (11, 128 + 15), err.decode()
    return proc.returncode


def wait_for_file(path: Path) -> None:
    deadline = time.monotonic() + 20
    while not path.exists():
        assert time.monotonic() < deadline, "the child never started"
        time.sleep(0.01)


def test_sigterm_is_forwarded(server: NotifyServer) -> None:
    proc = start_launcher("-", server.path, "sleep", "30")
    wait_until_forwarding(proc)
    proc.terminate()
    assert finish(proc) == 128 + 15


def test_sigint_from_kill_is_forwarded_once(server: NotifyServer, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    proc = start_launcher("-", server.path, "python3", "-c", COUNT_SIGINT, str(ready))
    wait_for_file(ready)
    wait_until_forwarding(proc)
    proc.send_signal(2)
    assert finish(proc) == 11


def test_ctrl_c_in_a_terminal_reaches_the_child_once(server: NotifyServer,
                                                     tmp_path: Path) -> None:
    """The terminal signals the whole foreground process group; the launcher must not
    send a second copy."""
    ready = tmp_path / "ready"
    master, slave = os.openpty()
    try:
        proc = start_launcher(os.ttyname(slave), server.path,
                              "python3", "-c", COUNT_SIGINT, str(ready))
        wait_for_file(ready)
        wait_until_forwarding(proc)
        os.write(master, b"\x03")
        assert finish(proc) == 11
    finally:
        os.close(master)
        os.close(slave)
