"""Attacks on what listens: the notify socket (a listener handed over twice), the
/metrics endpoint (idle, slow and many connections) and routes that trust what the
container's creator wrote. Each test is an attack that worked before its fix; the
daemon runs as a real process, so an attack that freezes it fails the test by a
timeout instead of freezing the test run."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from supervisor.control import request
from supervisor.handoff import build_state_message
from supervisor.launcher import hand_over
from supervisor.profile import build_program, notify_profile
from supervisor.spawn import FilteredChild, spawn_filtered

from .soak import NR_GETPGID, DaemonProcess, config_text, daemon_process, start_filtered

REFUSED = "seccomp_supervisor_listeners_refused_total"


def call_on_signal_program(go: Path, out: Path, arg: int) -> list[str]:
    """argv of a program that waits for the file ``go``, makes ``getpgid(arg)`` once,
    writes the answer to ``out`` and then lives on (its filter stays alive)."""
    code = (
        "import ctypes, os, time\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "libc.syscall.restype = ctypes.c_long\n"
        "libc.syscall.argtypes = [ctypes.c_long, ctypes.c_long]\n"
        f"while not os.path.exists({str(go)!r}):\n"
        "    time.sleep(0.005)\n"
        f"rc = libc.syscall({NR_GETPGID}, {arg})\n"
        f"open({str(out)!r} + '.tmp', 'w').write(str(rc))\n"
        f"os.rename({str(out)!r} + '.tmp', {str(out)!r})\n"
        "time.sleep(120)\n"
    )
    return [sys.executable, "-c", code]


@contextmanager
def filtered(argv: list[str], notify: tuple[str, ...] = ("getpgid",)
             ) -> Iterator[FilteredChild]:
    child = spawn_filtered(argv, build_program(notify_profile(list(notify))))
    try:
        yield child
    finally:
        child.close()
        child.process.kill()
        child.process.wait()


def wait_for(path: Path, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.005)
    return path.read_text()


def status(d: DaemonProcess, timeout: float = 5) -> dict[str, object]:
    """The daemon's status; raises (socket timeout) when its event loop is frozen."""
    result, _ = request(d.control_path, "status", timeout=timeout)
    return result


def served_one_call(d: DaemonProcess, arg: int = 11) -> None:
    """A new container is still served: its call gets the echo policy's answer."""
    from .soak import one_call_program

    target = start_filtered(d.socket_path, one_call_program(NR_GETPGID, arg),
                            notify=("getpgid",), container_id="fresh")
    try:
        out, _ = target.process.communicate(timeout=10)
    finally:
        if target.process.poll() is None:
            target.process.kill()
            target.process.wait()
    assert json.loads(out)["rc"] == arg * 3 + 1


# --------------------------------------------------------------------------- item 5


def test_one_listener_handed_over_twice_is_refused_and_never_freezes(tmp_path: Path) -> None:
    """An allowed uid sends the same listener on two connections. Before: two sessions
    read one filter; the loser of the RECV race blocked the daemon's only thread for as
    long as the target lived. Now the second handoff is refused (kcmp) and counted."""
    go, out = tmp_path / "go", tmp_path / "out"
    with daemon_process(tmp_path, config_text(tmp_path)) as d:
        d.start()
        with filtered(call_on_signal_program(go, out, 7)) as child:
            for i in range(2):
                hand_over(d.socket_path, child.listener_fd, build_state_message(
                    pid=child.pid, container_id=f"dup-{i}", bundle="/"))
            d.wait_log("accepted the seccomp fd", count=2)
            d.wait_log("already served", count=1)
            go.touch()
            assert wait_for(out) == str(7 * 3 + 1)
            sessions = status(d)["sessions"]
            assert isinstance(sessions, list)
            assert [s["container"] for s in sessions] == ["dup-0"]
            served_one_call(d)
            assert d.metric(REFUSED, reason="already_served") == 1


def test_the_same_listener_twice_in_one_message_is_served_once(tmp_path: Path) -> None:
    """Two fds of one listener in one message: only the one named seccompFd is kept
    (the other is closed by accept_handoff), so one session serves it."""
    go, out = tmp_path / "go", tmp_path / "out"
    with daemon_process(tmp_path, config_text(tmp_path)) as d:
        d.start()
        with filtered(call_on_signal_program(go, out, 5)) as child:
            message = json.loads(build_state_message(pid=child.pid, container_id="twice",
                                                     bundle="/"))
            message["fds"] = ["seccompFd", "seccompFd2"]
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect(d.socket_path)
                sock.sendmsg([json.dumps(message).encode()],
                              [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                bytes(memoryview(
                                    __import__("array").array(
                                        "i", [child.listener_fd, child.listener_fd]))))])
                sock.shutdown(socket.SHUT_WR)
                assert sock.recv(1) == b""
            d.wait_log("accepted the seccomp fd", count=1)
            go.touch()
            assert wait_for(out) == str(5 * 3 + 1)
            sessions = status(d)["sessions"]
            assert isinstance(sessions, list) and len(sessions) == 1


async def test_fd_store_and_takeover_paths_refuse_a_listener_served_already(
        tmp_path: Path) -> None:
    """The other ways a session starts go through the same check: a restore from the fd
    store with two groups holding one listener, and a takeover that hands one listener
    twice. Only the first copy is served; the store entry of the second is removed."""
    import trio

    from supervisor.fdstore import encode_state, session_state, write_state_memfd
    from supervisor.policy import Container
    from supervisor.systemd import ListenFd
    from supervisor.takeover import TakenOver

    from .daemon_harness import running_daemon

    with filtered(["sleep", "60"]) as child:
        async with running_daemon(tmp_path, config_text(tmp_path)) as d:
            daemon = d.daemon
            removed: list[str] = []
            daemon.fdstore.enabled = True
            daemon.fdstore.remove = removed.append  # type: ignore[method-assign]
            groups = []
            for name in ("session-aaaaaaaaaaaa", "session-bbbbbbbbbbbb"):
                state = write_state_memfd(encode_state(session_state(
                    Container(id=name[8:], pid=child.pid))))
                groups += [ListenFd(os.dup(child.listener_fd), name),
                           ListenFd(state, name)]
            daemon.inherited_fds = groups
            daemon._restore_stored_sessions()
            await trio.sleep(0.05)
            assert [s.container.id for s in daemon.sessions] == ["aaaaaaaaaaaa"]
            assert removed == ["session-bbbbbbbbbbbb"]
            taken = TakenOver(0, -1, [(os.dup(child.listener_fd), Container(id="t1")),
                                      (os.dup(child.listener_fd), Container(id="t2"))])
            daemon._adopt_taken(taken)
            await trio.sleep(0.05)
            assert [s.container.id for s in daemon.sessions] == ["aaaaaaaaaaaa"]
            assert d.metric(REFUSED, reason="already_served") == 3
            assert len(daemon.served) == 1


async def test_served_listeners_tell_files_apart_not_fd_numbers() -> None:
    """kcmp identifies the open file: a dup is the same listener, another filter's
    listener is not (though every listener has the same anonymous inode), and a closed
    NotifyFd's number reused by another listener is not mistaken for the old one."""
    from supervisor.notifyfd import NotifyFd
    from supervisor.served import ServedListeners

    with filtered(["sleep", "60"]) as a, filtered(["sleep", "60"]) as b, \
            filtered(["sleep", "60"]) as c:
        assert os.fstat(a.listener_fd).st_ino == os.fstat(b.listener_fd).st_ino
        served = ServedListeners()
        first = NotifyFd(os.dup(a.listener_fd))
        others = [NotifyFd(os.dup(x.listener_fd)) for x in (b, c)]
        assert served.claim(first) is None
        assert all(served.claim(n) is None for n in others)
        assert served.claim(first) is None  # the same object again: a resume
        dup = NotifyFd(os.dup(a.listener_fd))
        assert served.claim(dup) is first
        dup.close()
        number = first.fileno()
        first.close()
        os.dup2(b.listener_fd, number)  # the old number, now another filter's listener
        reused = NotifyFd(number)
        assert served.claim(reused) is others[0]
        assert len(served) == 2
        fresh = NotifyFd(os.dup(a.listener_fd))
        assert served.claim(fresh) is None
        for n in (fresh, *others):
            n.close()


# --------------------------------------------------------------------------- item 6


def threads_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads: line")


def scrape(url: str, timeout: float = 10) -> tuple[float, str]:
    import urllib.request

    started = time.monotonic()
    with urllib.request.urlopen(url, timeout=timeout) as response:
        assert response.status == 200
        text = response.read().decode()
    return time.monotonic() - started, text


def test_idle_and_slow_metrics_connections_take_no_threads_and_few_fds(
        tmp_path: Path) -> None:
    """249 idle connections and a few that drip their request a byte at a time. Before:
    a thread and an fd each (prometheus-client's exporter). Now: at most
    max_connections fds, no thread; a scrape still answers and a container is still
    served."""
    import resource
    import threading
    from urllib.parse import urlsplit

    with daemon_process(tmp_path, config_text(tmp_path)) as d:
        d.start()
        url = d.metrics_url()
        parts = urlsplit(url)
        address = (parts.hostname, parts.port)
        scrape(url)
        base_threads, base_fds = threads_of(d.pid), d.fd_count()
        # A tight fd limit, as a daemon under a low LimitNOFILE= would have.
        resource.prlimit(d.pid, resource.RLIMIT_NOFILE, (base_fds + 150, base_fds + 150))
        idle = []
        stop = threading.Event()
        dripping = [socket.create_connection(address) for _ in range(5)]

        def drip() -> None:
            while not stop.wait(0.2):
                for sock in dripping:
                    try:
                        sock.send(b"X")
                    except OSError:
                        pass

        dripper = threading.Thread(target=drip)
        try:
            for sock in dripping:
                sock.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            dripper.start()
            for _ in range(249):
                idle.append(socket.create_connection(address, timeout=5))
            time.sleep(0.5)
            seconds, text = scrape(url)
            assert "seccomp_supervisor_handoffs_total" in text
            assert seconds < 5, seconds
            assert threads_of(d.pid) <= base_threads + 2
            assert d.fd_count() <= base_fds + 16 + 4
            served_one_call(d)
            # The slow ones are cut off by the request deadline (10 s) at the latest.
            deadline = time.monotonic() + 20
            for sock in dripping:
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                try:
                    while sock.recv(4096):
                        pass
                except ConnectionResetError:
                    pass
        finally:
            stop.set()
            if dripper.is_alive():
                dripper.join()
            for sock in idle + dripping:
                sock.close()


async def test_metrics_server_speaks_prometheus_and_refuses_garbage() -> None:
    """prometheus-client answers (text or OpenMetrics by Accept, gzip by
    Accept-Encoding); a bad request line, an oversized head and a silent client get an
    error and a closed connection; when every slot is taken by clients that have not
    sent their request, the oldest is closed for a new one."""
    import gzip

    import trio
    from prometheus_client import CollectorRegistry, Counter

    from supervisor.httpmetrics import HttpLimits, MetricsServer, bind_tcp

    registry = CollectorRegistry()
    Counter("probe", "A probe.", registry=registry).inc(3)
    server = MetricsServer(registry, HttpLimits(max_connections=3, header_timeout=0.5,
                                                request_deadline=1.0))
    sock = bind_tcp("127.0.0.1", 0)
    port = sock.getsockname()[1]

    async def exchange(data: bytes, *, hold: float = 0.0) -> bytes:
        conn = trio.socket.socket()
        with conn:
            await conn.connect(("127.0.0.1", port))
            await conn.send(data)
            if hold:
                await trio.sleep(hold)
            out = b""
            with trio.fail_after(5):
                while chunk := await conn.recv(65536):
                    out += chunk
            return out

    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, sock)
        text = await exchange(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert text.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"Content-Type: text/plain; version=0.0.4" in text
        assert b"probe_total 3.0" in text
        om = await exchange(b"GET /metrics HTTP/1.1\r\n"
                            b"Accept: application/openmetrics-text; version=1.0.0\r\n\r\n")
        assert b"application/openmetrics-text" in om and om.rstrip().endswith(b"# EOF")
        zipped = await exchange(b"GET /metrics HTTP/1.1\r\nAccept-Encoding: gzip\r\n\r\n")
        head, _, body = zipped.partition(b"\r\n\r\n")
        assert b"Content-Encoding: gzip" in head and b"probe_total" in gzip.decompress(body)
        head_only = await exchange(b"HEAD /metrics HTTP/1.1\r\n\r\n")
        assert head_only.startswith(b"HTTP/1.1 200") and head_only.endswith(b"\r\n\r\n")
        assert (await exchange(b"\x16\x03\x01garbage\r\n\r\n")).startswith(b"HTTP/1.1 400")
        big = b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * 10000 + b"\r\n\r\n"
        assert (await exchange(big)).startswith(b"HTTP/1.1 431")
        assert (await exchange(b"GET /metrics HTTP/1.1\r\n")).startswith(b"HTTP/1.1 408")
        # Three silent clients take every slot; a scraper still gets its answer.
        silent = []
        for _ in range(3):
            conn = trio.socket.socket()
            await conn.connect(("127.0.0.1", port))
            silent.append(conn)
        await trio.sleep(0.05)
        assert server.connections == 3
        answer = await exchange(b"GET /metrics HTTP/1.1\r\n\r\n")
        assert b"probe_total 3.0" in answer
        assert server.evicted >= 1 and server.connections <= 3
        for conn in silent:
            conn.close()
        nursery.cancel_scope.cancel()
    sock.close()


def test_fd_budget_sets_aside_the_caps_and_warns_when_little_is_left() -> None:
    from supervisor.fdbudget import DAEMON_MARGIN, fd_budget

    budget = fd_budget(1024, max_handoffs=64, max_fds=16, control_connections=16,
                       metrics_connections=16)
    assert budget.handoffs == 64 * 17
    assert budget.sessions == 1024 - 64 * 17 - 32 - DAEMON_MARGIN < 0
    assert "0 left for containers" in budget.describe()
    assert fd_budget(65536, max_handoffs=64, max_fds=16, control_connections=16,
                     metrics_connections=16).sessions == 65536 - 1088 - 32 - DAEMON_MARGIN
