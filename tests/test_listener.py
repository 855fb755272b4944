"""The notify socket over real unix sockets, with real fds and real seccomp listeners."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import resource
import shutil
import socket
import stat
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from supervisor.handoff import Handoff, build_state_message
from supervisor.listener import RESULTS, ListenerLimits, bind_socket, serve_handoffs
from supervisor.metrics import Metrics
from supervisor.spawn import FilteredChild

from .sockets import fd_count, rights, send, wait_closed

HANDOFFS = "seccomp_supervisor_handoffs_total"


def state_message(pid: int = 4242, container_id: str = "ctr-1", **kw: Any) -> bytes:
    return build_state_message(pid=pid, container_id=container_id, bundle="/b", **kw)


@dataclass
class Server:
    path: str
    registry: CollectorRegistry
    handoffs: list[Handoff]

    def count(self, result: str) -> float:
        return self.registry.get_sample_value(HANDOFFS, {"result": result}) or 0.0

    def total(self) -> float:
        return sum(self.count(result) for result in RESULTS)

    async def wait_total(self, n: float, timeout: float = 10.0) -> None:
        with trio.fail_after(timeout):
            while self.total() < n:
                await trio.sleep(0.005)


@asynccontextmanager
async def serving(tmp_path: Path, on_handoff: Callable[[Handoff], Awaitable[object]] | None
                  = None, **limits: Any) -> AsyncIterator[Server]:
    registry = CollectorRegistry()
    path = str(tmp_path / "run" / "notify.sock")
    sock = bind_socket(path)
    server = Server(path, registry, [])

    async def keep(handoff: Handoff) -> None:
        server.handoffs.append(handoff)

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve_handoffs, sock, on_handoff or keep,
                                        limits=ListenerLimits(**limits),
                                        metrics=Metrics(registry)))
            try:
                yield server
            finally:
                nursery.cancel_scope.cancel()
    finally:
        sock.close()
        for handoff in server.handoffs:
            handoff.close()


# --------------------------------------------------------------------------- accepted


async def test_runc_style_handoff_without_eof(tmp_path: Path, sleeper: FilteredChild) -> None:
    """runc sends once and keeps the connection open while the container runs."""
    async with serving(tmp_path) as server:
        message = state_message(pid=sleeper.pid, metadata="team=ci\nx=y",
                                annotations={"io.example/a": "b"})
        with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            await sock.connect(server.path)
            await sock.sendmsg([message], rights([sleeper.listener_fd]))
            await server.wait_total(1)
            await wait_closed(sock)
        assert server.count("accepted") == 1
        [handoff] = server.handoffs
        assert handoff.notify_fd >= 0 and handoff.notify_fd != sleeper.listener_fd
        assert os.readlink(f"/proc/self/fd/{handoff.notify_fd}") == "anon_inode:seccomp notify"
        assert fcntl.fcntl(handoff.notify_fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert handoff.state.pid == sleeper.pid
        assert handoff.container.id == "ctr-1"
        assert dict(handoff.container.labels) == {"team": "ci", "x": "y"}
        assert dict(handoff.container.annotations) == {"io.example/a": "b"}
        assert (handoff.peer.pid, handoff.peer.uid) == (os.getpid(), os.getuid())


async def test_several_sendmsg_with_fds_in_the_first(tmp_path: Path,
                                                     sleeper: FilteredChild) -> None:
    message = state_message(pid=sleeper.pid)
    async with serving(tmp_path) as server:
        await send(server.path, (message[:7], [sleeper.listener_fd]), (message[7:60], []),
                   (message[60:], []), drain=True)
        assert server.count("accepted") == 1
        assert server.handoffs[0].state.pid == sleeper.pid


async def test_pretty_printed_message_with_other_fds(tmp_path: Path,
                                                     sleeper: FilteredChild) -> None:
    top = json.loads(state_message(pid=sleeper.pid))
    top["fds"] = ["pidFd", "seccompFd"]
    message = json.dumps(top, indent=2).encode()
    pidfd = os.pidfd_open(sleeper.pid)
    try:
        baseline = fd_count()
        async with serving(tmp_path) as server:
            await send(server.path, (message, [pidfd, sleeper.listener_fd]))
            assert server.count("accepted") == 1
            assert server.handoffs[0].state.seccomp_index == 1
            # the received pidfd was closed, the listener kept (+1)
            assert fd_count() == baseline + 1 + 1  # + the bound socket
    finally:
        os.close(pidfd)


# --------------------------------------------------------------------------- rejected


async def test_fds_in_a_later_message_are_rejected_and_closed(
        tmp_path: Path, sleeper: FilteredChild) -> None:
    message = state_message(pid=sleeper.pid)
    r, w = os.pipe()
    async with serving(tmp_path) as server:
        baseline = fd_count()
        await send(server.path, (message[:10], []), (message[10:], [sleeper.listener_fd, r]),
                   drain=True)
        assert server.count("invalid") == 1
        assert not server.handoffs
        assert fd_count() == baseline
    os.close(r)
    os.close(w)


async def test_too_large(tmp_path: Path) -> None:
    async with serving(tmp_path) as server:
        await send(server.path, (b'{"a": "' + b"x" * 70 * 1024, []))
        assert server.count("too_large") == 1


async def test_exactly_max_message_is_read(tmp_path: Path) -> None:
    async with serving(tmp_path) as server:
        await send(server.path, (b"{" + b" " * (64 * 1024 - 2) + b"}", []))
        assert server.count("invalid") == 1


async def test_silent_client_times_out(tmp_path: Path) -> None:
    async with serving(tmp_path, timeout=0.3) as server:
        start = trio.current_time()
        with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            await sock.connect(server.path)
            await wait_closed(sock)
        assert 0.25 < trio.current_time() - start < 3
        assert server.count("timeout") == 1


async def test_partial_message_times_out_and_its_fds_are_closed(
        tmp_path: Path, sleeper: FilteredChild) -> None:
    async with serving(tmp_path, timeout=0.3) as server:
        baseline = fd_count()
        await send(server.path, (state_message()[:20], [sleeper.listener_fd]), shutdown=False)
        assert server.count("timeout") == 1
        assert fd_count() == baseline


async def test_empty_connection_is_closed_empty(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    # What crun does when the container fails before the handoff: connect, then close.
    async with serving(tmp_path) as server:
        with caplog.at_level(logging.WARNING, logger="supervisor.listener"):
            await send(server.path)
            await server.wait_total(1)
        assert server.count("closed_empty") == 1
        assert server.count("invalid") == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any("the runtime closed the connection before sending anything; the container "
               "probably failed to start" in m for m in messages), messages
    assert not any("not JSON" in m for m in messages), messages


async def test_blanks_then_close_is_invalid(tmp_path: Path) -> None:
    async with serving(tmp_path) as server:
        await send(server.path, (b" \n", []))
        await server.wait_total(1)
        assert server.count("invalid") == 1
        assert server.count("closed_empty") == 0


async def test_forbidden_uid(tmp_path: Path, sleeper: FilteredChild,
                             caplog: pytest.LogCaptureFixture) -> None:
    async with serving(tmp_path, allowed_uids=[12345]) as server:
        baseline = fd_count()
        with caplog.at_level(logging.WARNING, logger="supervisor.listener"):
            await send(server.path, (state_message(pid=sleeper.pid), [sleeper.listener_fd]))
        assert server.count("forbidden") == 1
        assert not server.handoffs
        assert fd_count() == baseline
        assert any("uid 0 is not in allowed_uids" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("kind", ["pipe", "memfd", "socket", "devnull"])
async def test_non_seccomp_fd_is_bad_fd(tmp_path: Path, kind: str) -> None:
    if kind == "pipe":
        fd, other = os.pipe()
        os.close(other)
    elif kind == "memfd":
        fd = os.memfd_create("x")
    elif kind == "socket":
        a, b = socket.socketpair()
        b.close()
        fd = a.detach()
    else:
        fd = os.open("/dev/null", os.O_RDONLY)
    async with serving(tmp_path) as server:
        baseline = fd_count()
        await send(server.path, (state_message(), [fd]))
        assert server.count("bad_fd") == 1
        assert fd_count() == baseline
    os.close(fd)


async def test_twenty_fds_are_refused_and_all_closed(tmp_path: Path,
                                                     sleeper: FilteredChild) -> None:
    null = os.open("/dev/null", os.O_RDONLY)
    try:
        async with serving(tmp_path) as server:
            baseline = fd_count()
            fds = [sleeper.listener_fd] + [null] * 19
            message = json.dumps({"fds": ["seccompFd"] + ["x"] * 19}).encode()
            await send(server.path, (message, fds))
            assert server.count("too_large") == 1
            assert fd_count() == baseline
    finally:
        os.close(null)


async def test_sixteen_fds_fit(tmp_path: Path, sleeper: FilteredChild) -> None:
    null = os.open("/dev/null", os.O_RDONLY)
    try:
        async with serving(tmp_path) as server:
            top = json.loads(state_message(pid=sleeper.pid))
            top["fds"] = ["seccompFd"] + [f"extra{i}" for i in range(15)]
            await send(server.path, (json.dumps(top).encode(),
                                     [sleeper.listener_fd] + [null] * 15))
            assert server.count("accepted") == 1
    finally:
        os.close(null)


async def test_metrics_start_at_zero(tmp_path: Path) -> None:
    async with serving(tmp_path) as server:
        assert {r: server.count(r) for r in RESULTS} == dict.fromkeys(RESULTS, 0.0)
        assert server.registry.get_sample_value(HANDOFFS, {"result": "timeout"}) == 0.0


async def test_200_hostile_connections_leak_nothing(tmp_path: Path,
                                                    sleeper: FilteredChild) -> None:
    null = os.open("/dev/null", os.O_RDONLY)
    r, w = os.pipe()
    valid = state_message(pid=sleeper.pid)
    listener = sleeper.listener_fd
    attacks: list[Callable[[str], Awaitable[None]]] = [
        lambda p: send(p, (b"garbage", [])),
        lambda p: send(p, (b"\xff\xfe\x00{", [null, r, w])),
        lambda p: send(p, (valid, [r])),
        lambda p: send(p, (valid, [listener, listener])),
        lambda p: send(p, (valid[:30], [listener]), shutdown=False),
        lambda p: send(p, (b"[" * 60_000, [listener])),
        lambda p: send(p, (b"x" * 70_000, [null])),
        lambda p: send(p, (valid, [null] * 30)),
        lambda p: send(p, (valid[:5], []), (valid[5:], [listener]), drain=True),
        lambda p: send(p),
        lambda p: send(p, (json.dumps({"fds": ["seccompFd"] * 3}).encode(), [listener] * 3)),
    ]
    try:
        async with serving(tmp_path, timeout=0.3, max_handoffs=32) as server:
            baseline = fd_count()
            limiter = trio.CapacityLimiter(40)

            async def attack(i: int) -> None:
                async with limiter:
                    await attacks[i % len(attacks)](server.path)

            async with trio.open_nursery() as nursery:
                for i in range(200):
                    nursery.start_soon(attack, i)
            await server.wait_total(200)
            assert server.count("accepted") == 0
            assert server.total() == 200
            assert server.count("timeout") >= 200 // len(attacks)
            assert fd_count() == baseline

            # and it still serves a good client
            await send(server.path, (valid, [listener]))
            assert server.count("accepted") == 1
    finally:
        for fd in (null, r, w):
            os.close(fd)


async def test_handler_error_is_contained(tmp_path: Path, sleeper: FilteredChild,
                                          caplog: pytest.LogCaptureFixture) -> None:
    taken: list[Handoff] = []

    async def broken(handoff: Handoff) -> None:
        taken.append(handoff)
        raise RuntimeError("boom")

    async with serving(tmp_path, on_handoff=broken) as server:
        with caplog.at_level(logging.ERROR, logger="supervisor.listener"):
            for _ in range(2):
                await send(server.path, (state_message(pid=sleeper.pid),
                                         [sleeper.listener_fd]))
        assert server.count("accepted") == 2
        assert [h.notify_fd for h in taken] == [-1, -1]  # closed by the listener
        assert any(r.exc_info and "boom" in str(r.exc_info[1]) for r in caplog.records)


async def test_connections_beyond_max_handoffs_wait(tmp_path: Path) -> None:
    async with serving(tmp_path, timeout=0.5, max_handoffs=2) as server:
        closed_at: list[float] = []
        start = trio.current_time()

        async def idle() -> None:
            with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                await sock.connect(server.path)
                await wait_closed(sock)
                closed_at.append(trio.current_time() - start)

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(idle)
        closed_at.sort()
        assert closed_at[1] < 0.9
        assert closed_at[2] > 0.9  # served only once a slot was free
        assert server.count("timeout") == 3


async def test_accept_survives_emfile(tmp_path: Path, sleeper: FilteredChild,
                                      caplog: pytest.LogCaptureFixture) -> None:
    async with serving(tmp_path) as server:
        with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            lowest_free = os.open("/dev/null", os.O_RDONLY)
            os.close(lowest_free)
            with caplog.at_level(logging.WARNING, logger="supervisor.listener"):
                resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
                try:
                    await sock.connect(server.path)
                    with trio.fail_after(5):
                        while not any("cannot accept" in r.getMessage()
                                      for r in caplog.records):
                            await trio.sleep(0.01)
                finally:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            await sock.sendmsg([state_message(pid=sleeper.pid)], rights([sleeper.listener_fd]))
            sock.shutdown(socket.SHUT_WR)
            await server.wait_total(1)
        assert server.count("accepted") == 1


# --------------------------------------------------------------------------- hostile input


async def _one_hostile_connection(path: str, data: bytes, nfds: int, split: int,
                                  shutdown: bool) -> dict[str, float]:
    async with serving(Path(path), timeout=0.2) as server:
        fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(nfds)]
        try:
            first, rest = data[:split], data[split:]
            parts = [(first, fds)] if first else []
            if rest:
                parts.append((rest, [] if first else fds))
            await send(server.path, *parts, shutdown=shutdown)
        finally:
            for fd in fds:
                os.close(fd)
        await server.wait_total(1)
        return {r: server.count(r) for r in RESULTS}


_hostile_data = st.binary(max_size=3000) | st.builds(
    lambda pid, cut: state_message(pid=pid)[:cut],
    st.integers(0, 2**31 - 1), st.integers(0, 400))


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=_hostile_data, nfds=st.integers(0, 20), split=st.integers(0, 3000),
       shutdown=st.booleans())
def test_hostile_input_over_a_real_socket(tmp_path: Path, data: bytes, nfds: int,
                                          split: int, shutdown: bool) -> None:
    before = fd_count()
    results = trio.run(_one_hostile_connection, str(tmp_path), data, nfds, split, shutdown)
    assert sum(results.values()) == 1
    assert results["accepted"] == 0
    assert fd_count() == before


# --------------------------------------------------------------------------- bind_socket


@pytest.mark.parametrize(("socket_mode", "dir_mode"), [
    (0o600, 0o700), (0o660, 0o710), (0o620, 0o710), (0o666, 0o711), (0o606, 0o701)])
async def test_a_created_directory_lets_in_whom_the_socket_mode_does(
        tmp_path: Path, socket_mode: int, dir_mode: int) -> None:
    path = tmp_path / "made" / "notify.sock"
    sock = bind_socket(path, socket_mode)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == socket_mode
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == dir_mode
    finally:
        sock.close()


async def test_bind_creates_private_dir_and_socket(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "notify.sock"
    sock = bind_socket(path)
    try:
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        st_ = os.stat(path)
        assert stat.S_ISSOCK(st_.st_mode) and stat.S_IMODE(st_.st_mode) == 0o600
    finally:
        sock.close()


async def test_bind_mode(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    sock = bind_socket(path, mode=0o660)
    sock.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660


async def test_bind_replaces_stale_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    sock = bind_socket(path)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(path)
    finally:
        sock.close()


async def test_bind_refuses_live_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    first = bind_socket(path)
    try:
        with pytest.raises(OSError) as info:
            bind_socket(path)
        assert info.value.errno == errno.EADDRINUSE
    finally:
        first.close()


async def test_bind_refuses_other_files(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    path.write_text("not a socket")
    with pytest.raises(FileExistsError):
        bind_socket(path)
    assert path.read_text() == "not a socket"


def test_limits_validated() -> None:
    assert ListenerLimits(allowed_uids=[1, 2]).allowed_uids == frozenset({1, 2})
    for bad in ({"max_message": 0}, {"max_fds": -1}, {"timeout": 0}, {"max_handoffs": True}):
        with pytest.raises(ValueError, match="must be"):
            ListenerLimits(**bad)


# --------------------------------------------------------------------------- real runc


def _runc_bundle(bundle: Path, socket_path: str) -> None:
    rootfs = bundle / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    busybox = shutil.which("busybox")
    assert busybox
    shutil.copy(busybox, rootfs / "bin" / "busybox")
    for name in ("sh", "sleep"):
        (rootfs / "bin" / name).symlink_to("busybox")
    subprocess.run(["runc", "spec"], cwd=bundle, check=True)
    config = json.loads((bundle / "config.json").read_text())
    config["process"]["terminal"] = False
    config["process"]["args"] = ["/bin/sh", "-c", "sleep 2"]
    config["annotations"] = {"io.example/team": "build"}
    config["linux"]["seccomp"] = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "listenerPath": socket_path,
        "listenerMetadata": "team=build\nenv=ci",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["swapon"], "action": "SCMP_ACT_NOTIFY"}],
    }
    (bundle / "config.json").write_text(json.dumps(config))


@pytest.mark.runtime
async def test_real_runc_handoff(tmp_path: Path) -> None:
    async with serving(tmp_path) as server:
        bundle = tmp_path / "bundle"
        _runc_bundle(bundle, server.path)
        container_id = f"supervisor-test-{os.getpid()}"
        runc = ["runc", "--root", str(tmp_path / "runc-state")]
        done = trio.Event()
        outcome: list[subprocess.CompletedProcess[bytes]] = []

        async def run_container() -> None:
            try:
                outcome.append(await trio.run_process(
                    [*runc, "run", "--bundle", str(bundle), container_id],
                    stdin=subprocess.DEVNULL, capture_stdout=True, capture_stderr=True,
                    check=False))
            finally:
                done.set()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_container)
                await server.wait_total(1, timeout=20)
                # runc keeps its end open while the container runs: no EOF needed
                assert not done.is_set()
                await done.wait()
        finally:
            await trio.run_process([*runc, "delete", "--force", container_id], check=False,
                                   capture_stdout=True, capture_stderr=True)
        assert outcome[0].returncode == 0, outcome[0].stderr
        assert server.count("accepted") == 1
        [handoff] = server.handoffs
        assert handoff.container.id == container_id
        assert handoff.state.status == "creating"
        assert handoff.state.bundle == str(bundle)
        assert handoff.state.pid > 0 and handoff.state.pid == handoff.state.state_pid
        assert dict(handoff.container.labels) == {"team": "build", "env": "ci"}
        assert dict(handoff.container.annotations) == {"io.example/team": "build"}
        assert os.readlink(f"/proc/self/fd/{handoff.notify_fd}") == "anon_inode:seccomp notify"
