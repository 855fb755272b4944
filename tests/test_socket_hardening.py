"""The notify socket of the real daemon (configured from TOML) against hostile clients.

The daemon runs in this process (tests/daemon_harness.py), so "the daemon's fds" are this
process's fds: every count below is taken with all client sockets closed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import stat
import tempfile
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trio

from supervisor.handoff import build_state_message
from supervisor.spawn import FilteredChild

from .conftest import open_fds
from .daemon_harness import RunningDaemon, running_daemon
from .sockets import fd_count, rights, send, wait_closed

HANDOFFS = "seccomp_supervisor_handoffs_total"
RESULTS = ("accepted", "invalid", "forbidden", "too_large", "timeout", "bad_fd",
           "closed_empty")
NOBODY = 65534

POLICY = f"""
[defaults]
policies = ["containers"]

[[policy]]
name = "containers"
path = "{Path(__file__).resolve().parent / "policies" / "containers.py"}"
"""


def listen_table(socket_path: str = "{tmp}/sock/notify.sock", **keys: object) -> str:
    lines = ["[listen]", f'socket = "{socket_path}"']
    lines += [f"{key} = {value}" for key, value in keys.items()]
    return "\n".join(lines) + "\n" + POLICY


def counts(d: RunningDaemon) -> dict[str, float]:
    return {r: d.metric(HANDOFFS, result=r) for r in RESULTS}


async def wait_total(d: RunningDaemon, n: float, timeout: float = 20) -> None:
    with trio.fail_after(timeout):
        while sum(counts(d).values()) < n:
            await trio.sleep(0.005)


async def wait_sessions(d: RunningDaemon, n: int, timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while len(d.daemon.sessions) != n:
            await trio.sleep(0.005)


def message(pid: int, metadata: str = "") -> bytes:
    return build_state_message(pid=pid, container_id="hostile", bundle="/b",
                               metadata=metadata)


@contextlib.contextmanager
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    try:
        yield r, w
    finally:
        for fd in (r, w):
            with contextlib.suppress(OSError):
                os.close(fd)


def closed_elsewhere(r: int, w: int) -> bool:
    """True if, after closing our write end ``w``, no other copy of it is open (EOF)."""
    os.close(w)
    os.set_blocking(r, False)
    try:
        return os.read(r, 1) == b""
    except BlockingIOError:
        return False  # someone (the daemon) still holds a copy


# --------------------------------------------------------------------------- the file


async def test_socket_is_0600_in_a_0700_directory(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, POLICY) as d:
        st = os.stat(d.socket_path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(d.socket_path)).st_mode) == 0o700
        assert st.st_uid == 0
    assert not await trio.Path(d.socket_path).exists()  # removed on stop


async def test_socket_mode_from_config(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, listen_table(socket_mode='"0660"')) as d:
        assert stat.S_IMODE(os.stat(d.socket_path).st_mode) == 0o660


# --------------------------------------------------------------------------- peer uid


@contextlib.contextmanager
def public_dir() -> Iterator[Path]:
    """A 0755 directory under /tmp (pytest's tmp dirs are 0700: nobody cannot reach them)."""
    path = Path(tempfile.mkdtemp(prefix="sup-hard-", dir="/tmp"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _as_nobody(path: str, data: bytes, fd: int) -> int:
    """In a forked child: drop to uid/gid 65534, connect, send ``data`` with ``fd``, wait
    for the hang-up. Exit status: 0 sent, 2 connect refused by permissions, 3 other."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        pid = os.fork()
    if pid:
        return pid
    code = 3
    try:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(path)
            except PermissionError:
                code = 2
            else:
                code = 0
                try:  # the daemon may hang up before reading anything
                    s.sendmsg([data], rights([fd]))
                    s.shutdown(socket.SHUT_WR)
                    while s.recv(4096):
                        pass
                except (BrokenPipeError, ConnectionResetError):
                    pass
    finally:
        os._exit(code)


async def run_as_nobody(path: str, data: bytes, fd: int) -> int:
    pid = _as_nobody(path, data, fd)
    _, status = await trio.to_thread.run_sync(os.waitpid, pid, 0)
    return os.waitstatus_to_exitcode(status)


async def test_default_permissions_keep_other_users_out(tmp_path: Path,
                                                        sleeper: FilteredChild) -> None:
    with public_dir() as pub:
        async with running_daemon(tmp_path, listen_table(f"{pub}/sock/notify.sock")) as d:
            code = await run_as_nobody(d.socket_path, message(sleeper.pid),
                                       sleeper.listener_fd)
            assert code == 2  # EACCES at connect: 0700 directory, 0600 socket
            assert sum(counts(d).values()) == 0


async def test_uid_not_in_allowed_uids_is_rejected_logged_counted(
        tmp_path: Path, sleeper: FilteredChild, caplog: pytest.LogCaptureFixture) -> None:
    """With the file opened up (mode 0666), SO_PEERCRED is what keeps uid 65534 out."""
    with public_dir() as pub:
        sock_dir = pub / "sock"
        sock_dir.mkdir(mode=0o755)
        config = listen_table(f"{sock_dir}/notify.sock", socket_mode='"0666"',
                              allowed_uids="[0]")
        async with running_daemon(tmp_path, config) as d:
            with caplog.at_level(logging.WARNING, logger="supervisor.listener"):
                before = fd_count()
                code = await run_as_nobody(d.socket_path, message(sleeper.pid),
                                           sleeper.listener_fd)
                assert code == 0
                await wait_total(d, 1)
            assert counts(d) == {**dict.fromkeys(RESULTS, 0.0), "forbidden": 1.0}
            assert not d.daemon.sessions
            assert fd_count() == before
            assert any(f"uid {NOBODY} is not in allowed_uids" in r.getMessage()
                       and r.levelno == logging.WARNING for r in caplog.records)

        # the same client, once allowed, gets its session: the uid was the only reason
        config = config.replace("allowed_uids = [0]", f"allowed_uids = [0, {NOBODY}]")
        async with running_daemon(tmp_path, config) as d:
            assert await run_as_nobody(d.socket_path, message(sleeper.pid),
                                       sleeper.listener_fd) == 0
            await wait_total(d, 1)
            assert counts(d)["accepted"] == 1
            await wait_sessions(d, 1)


# --------------------------------------------------------------------------- limits


async def test_concurrent_handoffs_are_capped(tmp_path: Path) -> None:
    config = listen_table(max_handoffs=2, handoff_timeout=0.5)
    async with running_daemon(tmp_path, config) as d:
        start = trio.current_time()
        closed_at: list[float] = []

        async def idle() -> None:
            with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                await sock.connect(d.socket_path)
                await wait_closed(sock)
                closed_at.append(trio.current_time() - start)

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(idle)
        closed_at.sort()
        # two slots: 2 served at once, the others wait in the backlog for a free slot
        assert all(t < 0.9 for t in closed_at[:2]), closed_at
        assert all(0.9 < t < 1.4 for t in closed_at[2:4]), closed_at
        assert closed_at[4] > 1.4, closed_at
        assert counts(d)["timeout"] == 5


async def test_deadline_covers_the_whole_connection(tmp_path: Path,
                                                    sleeper: FilteredChild) -> None:
    """A client trickling a byte every 50 ms is cut off at the deadline, not kept alive
    by each byte; the fd it sent first is closed."""
    async with running_daemon(tmp_path, listen_table(handoff_timeout=0.5)) as d:
        with pipe() as (r, w):
            data = message(sleeper.pid)
            start = trio.current_time()
            with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                await sock.connect(d.socket_path)
                await sock.sendmsg([data[:1]], rights([w]))
                try:
                    for i in range(1, len(data) - 1):
                        await trio.sleep(0.05)
                        await sock.send(data[i:i + 1])
                except (BrokenPipeError, ConnectionResetError):
                    pass
                elapsed = trio.current_time() - start
            assert 0.45 < elapsed < 1.0
            await wait_total(d, 1)
            assert counts(d)["timeout"] == 1
            assert closed_elsewhere(r, w)


def padded(pid: int, size: int) -> bytes:
    """A valid message of exactly ``size`` bytes (padding in the metadata)."""
    base = len(message(pid, metadata="x"))
    data = message(pid, metadata="x" * (1 + size - base))
    assert len(data) == size
    return data


async def test_64k_message_limit(tmp_path: Path, sleeper: FilteredChild) -> None:
    async with running_daemon(tmp_path, POLICY) as d:
        await send(d.socket_path, (padded(sleeper.pid, 65536), [sleeper.listener_fd]))
        await wait_total(d, 1)
        assert counts(d)["accepted"] == 1
        with pipe() as (r, w):
            await send(d.socket_path, (padded(sleeper.pid, 65537), [w]))
            await wait_total(d, 2)
            assert counts(d)["too_large"] == 1
            assert closed_elsewhere(r, w)


async def test_several_sendmsg_with_fds_only_in_the_first(tmp_path: Path,
                                                          sleeper: FilteredChild) -> None:
    data = message(sleeper.pid)
    parts = (data[:7], data[7:100], data[100:])
    async with running_daemon(tmp_path, POLICY) as d:
        await send(d.socket_path, (parts[0], [sleeper.listener_fd]), (parts[1], []),
                   (parts[2], []), pause=0.05)
        await wait_total(d, 1)
        assert counts(d)["accepted"] == 1
        await wait_sessions(d, 1)

        # fds in a later part: refused, and both the early and the late fd closed
        with pipe() as (r, w):
            await send(d.socket_path, (parts[0], [w]), (parts[1], [sleeper.listener_fd]),
                       (parts[2], []), pause=0.05)
            await wait_total(d, 2)
            assert counts(d)["invalid"] == 1
            assert closed_elsewhere(r, w)
        assert len(d.daemon.sessions) == 1


async def test_extra_fds_of_an_accepted_handoff_are_closed(tmp_path: Path,
                                                           sleeper: FilteredChild) -> None:
    msg = message(sleeper.pid).replace(b'"fds":["seccompFd"]',
                                       b'"fds":["logFd","seccompFd","other"]')
    async with running_daemon(tmp_path, POLICY) as d:
        with pipe() as (r1, w1), pipe() as (r2, w2):
            before = open_fds()
            await send(d.socket_path, (msg, [w1, sleeper.listener_fd, w2]))
            await wait_total(d, 1)
            assert counts(d)["accepted"] == 1
            await wait_sessions(d, 1)
            new = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in open_fds() - before}
            # Only the session's listener fd stays (besides the epoll fd the first session
            # of a trio run creates for all notify fds: supervisor.notifyfd.Poller).
            kinds = sorted(new.values())
            assert kinds in (["anon_inode:seccomp notify"],
                             ["anon_inode:[eventpoll]", "anon_inode:seccomp notify"]), new
            assert closed_elsewhere(r1, w1) and closed_elsewhere(r2, w2)
            assert [fd for s in d.daemon.sessions if (fd := s.notify.fileno()) in new]


def _memfd() -> int:
    return os.memfd_create("not-seccomp")


def _socket() -> int:
    a, b = socket.socketpair()
    b.close()
    return a.detach()


def _eventfd() -> int:
    return os.eventfd(0)


@pytest.mark.parametrize("make", [_memfd, _socket, _eventfd, None],
                         ids=["memfd", "socket", "eventfd", "pipe"])
async def test_a_non_seccomp_fd_is_refused_and_closed(
        tmp_path: Path, make: Callable[[], int] | None,
        caplog: pytest.LogCaptureFixture) -> None:
    async with running_daemon(tmp_path, POLICY) as d:
        with pipe() as (r, w), caplog.at_level(logging.WARNING, "supervisor.listener"):
            fd = w if make is None else make()
            try:
                before = fd_count()
                await send(d.socket_path, (message(os.getpid()), [fd]))
                await wait_total(d, 1)
                assert fd_count() == before
                if make is None:
                    assert closed_elsewhere(r, w)
            finally:
                if make is not None:
                    os.close(fd)
        assert counts(d)["bad_fd"] == 1 and not d.daemon.sessions
        assert any("not a seccomp listener" in rec.getMessage() for rec in caplog.records)


# --------------------------------------------------------------------------- no leaks


@contextlib.asynccontextmanager
async def _hostile_fds(sleeper: FilteredChild) -> AsyncIterator[dict[str, int]]:
    r, w = os.pipe()
    fds = {"null": os.open("/dev/null", os.O_RDONLY), "r": r, "w": w,
           "memfd": os.memfd_create("x"), "listener": sleeper.listener_fd}
    try:
        yield fds
    finally:
        for name, fd in fds.items():
            if name != "listener":
                os.close(fd)


async def test_1000_hostile_connections_leave_the_fd_count_unchanged(
        tmp_path: Path, sleeper: FilteredChild) -> None:
    valid = message(sleeper.pid)
    config = listen_table(handoff_timeout=0.25, max_handoffs=32)
    async with running_daemon(tmp_path, config) as d, _hostile_fds(sleeper) as fd:
        lst = fd["listener"]
        attacks: list[Callable[[str], Awaitable[None]]] = [
            lambda p: send(p, (b"garbage", [])),
            lambda p: send(p, (b"\xff\xfe{", [fd["null"], fd["r"], fd["w"]])),
            lambda p: send(p, (valid, [fd["memfd"]])),
            lambda p: send(p, (valid, [lst, lst])),
            lambda p: send(p, (valid[:40], [lst]), shutdown=False),   # never completes
            lambda p: send(p, (b"{" * 70_000, [lst])),                 # too large
            lambda p: send(p, (valid, [fd["null"]] * 20)),             # too many fds
            lambda p: send(p, (valid[:5], [fd["w"]]), (valid[5:], [lst]), pause=0.01),
            lambda p: send(p),                                         # EOF, nothing
            lambda p: send(p, (b'{"fds":["seccompFd"],"pid":-1}', [lst])),
            lambda p: send(p, (valid.replace(b'"pid":', b'"pid":"'), [lst])),
            lambda p: send(p, (b"[]" * 10 + b"{}", [fd["w"], lst])),
        ]
        baseline = fd_count()
        limiter = trio.CapacityLimiter(48)

        async def attack(i: int) -> None:
            async with limiter:
                await attacks[i % len(attacks)](d.socket_path)

        async with trio.open_nursery() as nursery:
            for i in range(1000):
                nursery.start_soon(attack, i)
        await wait_total(d, 1000, timeout=60)
        result = counts(d)
        assert result["accepted"] == 0 and sum(result.values()) == 1000, result
        for kind in ("invalid", "too_large", "timeout", "bad_fd"):
            assert result[kind] > 0, result
        assert fd_count() == baseline
        assert not d.daemon.sessions

        # and it still serves a good client
        await send(d.socket_path, (valid, [lst]))
        await wait_total(d, 1001)
        assert counts(d)["accepted"] == 1
