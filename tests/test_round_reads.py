"""A compiled poll round reads the declared paths of its decisions all at once, in one
wait at its end (supervisor/_hotloop.c, round_collect and round_finish), and each
decision goes on in C; what is not the common case reads through the pool
(Session._read_later) and is decided when delivered, never in the round.

Real kernel: forked targets under NOTIFY filters (tests/target.py), the compiled loop
(the pure-Python loop has no rounds: its decisions take Session._prefetch, the twin,
which tests/test_declared_paths.py compares answer for answer). The reader's
``read_many`` is checked on its own against the reading thread's batch.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import gc
import os
import select
import signal
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import trio

from supervisor import abi, accel, bpf
from supervisor.errors import NotificationGone
from supervisor.memory import ReadPool, current_read_pool
from supervisor.policy import Notification, PolicySet, TargetMemoryError, deny, returns
from supervisor.session import Session, SessionSettings
from supervisor.testing import load, run_policy

from .conftest import Served, serve_target
from .test_hostile_abi import (
    GARBAGE,
    PATH_GUARD,
    Int80,
    checked,
    decoy_pair,
    dirs,  # noqa: F401 - a fixture
    i386,
    int80,  # noqa: F401 - a fixture
    raw_syscall,
    x86_64,
)
from .test_inline_reader import SPIN, batch_result, reader  # noqa: F401 - a fixture
from .test_read_batch import (
    NR_USERFAULTFD,
    PAGE,
    UFFDIO_COPY,
    WAIT,
    Pages,
    Userfault,
    layouts,
    libc,
    wait_until,
)


def test_read_many_reads_what_a_batch_reads_request_by_request(
        reader: Any, pages: Pages, edge: Pages) -> None:  # noqa: F811
    tid = os.getpid()
    child = os.fork()
    if child == 0:
        os._exit(0)
    os.waitpid(child, 0)
    address = pages.put(0, b"/guarded/x\0")
    requests = [(tid, (a,), limit) for _name, a, limit in layouts(pages, edge)][:20]
    requests.insert(3, (child, (address,), 64))  # a thread that is gone: ESRCH, alone
    requests.append((tid, (address, 0, pages.end + 10, address), 4096))
    got = reader.read_many(requests, WAIT, SPIN)
    assert got == [batch_result(*request) for request in requests]
    assert got[3] == -errno.ESRCH
    assert reader.reads == len(requests) and reader.abandoned == 0 and not reader.busy


def test_read_many_refuses_what_it_does_not_take(reader: Any, pages: Pages) -> None:  # noqa: F811
    address = pages.put(0, b"/x\0")
    tid = os.getpid()
    one = (tid, (address,), 64)
    assert reader.read_many([one] * 32, WAIT, SPIN) == [[b"/x"]] * 32
    assert reader.read_many([one] * 33, WAIT, SPIN) is False  # more than a round has
    assert reader.read_many([(tid, (address,) * 8, 64)] * 9, WAIT, SPIN) is False  # strings
    assert reader.read_many([(tid, (address,) * 9, 64)], WAIT, SPIN) is False
    assert reader.read_many([], WAIT, SPIN) is False
    for bad in ([(0, (address,), 64)], [(tid, (address,), 0)]):
        with pytest.raises(ValueError):
            reader.read_many(bad, WAIT, SPIN)
    with pytest.raises(TypeError):
        reader.read_many([(tid, [address], 64)], WAIT, SPIN)
    with pytest.raises(ValueError):
        reader.read_many([one], float("nan"), SPIN)
    assert not reader.busy
    reader.close()
    assert reader.read_many([one], WAIT, SPIN) is False


@pytest.mark.parametrize("spin", [SPIN, 0.0], ids=["spinning", "sleeping"])
def test_a_stuck_request_gives_the_ones_before_it_and_none_after(
        reader: Any, pages: Pages, userfault: Userfault, spin: float) -> None:  # noqa: F811
    """The loop waits no longer than its timeout; the requests read before the stuck one
    are the loop's, the thread reads none after it, and the reader stays busy until
    the page is served."""
    tid = os.getpid()
    address = pages.put(0, b"/x\0")
    requests = [(tid, (address,), 64), (tid, (address,), 64), (tid, (userfault.page,), 64),
                (tid, (address,), 64)]
    start = time.monotonic()
    got = reader.read_many(requests, 0.02, spin)
    assert 0.02 <= time.monotonic() - start < 1.0
    assert got == [[b"/x"], [b"/x"], None, None]
    assert reader.busy and reader.abandoned == 1
    assert reader.read_many(requests[:1], WAIT, SPIN) is False
    userfault.serve(b"/late")
    wait_until(lambda: not reader.busy)
    assert reader.read_many(requests[:2], WAIT, SPIN) == [[b"/x"], [b"/x"]]


def length_policy(asynchronous: bool = False) -> PolicySet:
    """mkdir: returns the length of the path it passed, read before the handler; the
    coroutine handler waits (a scheduler pass) before it answers."""
    policy = PolicySet("p")
    if asynchronous:
        @policy.on("mkdir", paths=(0,))
        async def length_async(n: Notification) -> object:
            await trio.lowlevel.checkpoint()
            return returns(len(n.path(0)))
    else:
        @policy.on("mkdir", paths=(0,))
        def length(n: Notification) -> object:
            return returns(len(n.path(0)))
    return policy


def spy_paths(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the Python paths a decision's declared reads take."""
    calls = {"_prefetch": 0, "_read_later": 0}
    for name in calls:
        original = getattr(Session, name)

        def counted(self: Session, *args: Any, _name: str = name, _original: Any = original,
                    **kwargs: Any) -> Any:
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(Session, name, counted)
    return calls


@pytest.fixture
def compiled() -> None:
    assert accel.HOTLOOP is not None, f"the compiled hot loop is not built: {accel.WHY}"


@pytest.mark.usefixtures("compiled", "patient")
async def test_declared_paths_are_read_in_the_round_and_decided_in_c(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy_paths(monkeypatch)
    async with serve_target(length_policy(), ["mkdir"], "mkdir-repeat", "/abc/de",
                            "50") as served:
        out = await served.target.result()
    assert out == {"results": [{"rc": 7, "errno": 0}] * 50}
    assert served.session.memory.reads == 50
    # The first call of a route is routed (and its paths read) in Python.
    assert current_read_pool().round_reads == 49
    assert calls == {"_prefetch": 1, "_read_later": 0}


@pytest.mark.usefixtures("compiled", "patient")
@pytest.mark.parametrize(("command", "expected"), [
    ("mkdir-null", errno.EFAULT),
    ("mkdir-long", errno.ENAMETOOLONG),
])
async def test_a_failed_read_in_the_round_is_read_by_the_pool_and_decided_there(
        monkeypatch: pytest.MonkeyPatch, command: str, expected: int) -> None:
    """The round decides only on paths it read whole: the rest the pool reads again,
    and the handler sees its error as it would without rounds."""
    calls = spy_paths(monkeypatch)
    policy = PolicySet("p")

    @policy.on("mkdir", paths=(0,))
    def reads(n: Notification) -> object:
        n.path(0)
        return deny(errno.EACCES)

    async with serve_target(policy, ["mkdir"], "mkdir-ok-then", command) as served:
        out = await served.target.result()
    assert out == {"rc": -1, "errno": expected}
    # The first call routed in Python, the second read in the round, then by the pool.
    assert calls == {"_prefetch": 2, "_read_later": 1}
    assert current_read_pool().round_reads == 1


@pytest.mark.usefixtures("compiled")
async def test_a_session_whose_read_was_slow_reads_through_the_pool_for_a_while(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy_paths(monkeypatch)
    async with serve_target(length_policy(), ["mkdir"], "mkdir-repeat", "/abc/de",
                            "5") as served:
        # (set before its first call: the target waits for the session to start)
        served.session.memory._round_slow_until = time.monotonic() + 60
        out = await served.target.result()
    assert out == {"results": [{"rc": 7, "errno": 0}] * 5}
    assert current_read_pool().round_reads == 0
    assert calls == {"_prefetch": 5, "_read_later": 0}


@pytest.mark.usefixtures("compiled")
async def test_a_round_carries_one_suspended_decision_the_others_read_through_the_pool(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Four busy targets whose handlers wait, and a fifth whose getppid handler blocks
    the loop for 2 ms, so that their calls come in one round: its first decision that
    suspends is the round's (a round returns one Suspended), the others are delivered
    by the pool and decided there; every answer is right, none at its deadline (a
    decision the round dropped would be answered there)."""
    calls = spy_paths(monkeypatch)
    blocker = PolicySet("b")

    @blocker.on("getppid")
    def block(n: Notification) -> object:
        time.sleep(0.002)
        return returns(7)

    settings = SessionSettings(deadline=5.0)
    async with AsyncExitStack() as stack:
        blocking = await stack.enter_async_context(
            serve_target(blocker, ["getppid"], "getppid", "100000", settings=settings))
        served = [await stack.enter_async_context(
            serve_target(length_policy(asynchronous=True), ["mkdir"], "mkdir-ok-then",
                         "mkdir-repeat", "/abc/" + "d" * i, "100", settings=settings))
            for i in range(4)]
        outs = [await s.target.result() for s in served]
        blocking.cancel_scope.cancel()
    for i, out in enumerate(outs):
        assert out == {"results": [{"rc": 5 + i, "errno": 0}] * 100}
        assert served[i].metric("seccomp_supervisor_handler_errors_total", policy="p",
                                kind="deadline") == 0
    assert current_read_pool().round_reads > 0
    assert calls["_read_later"] > 0  # (rounds of two or more came)


@pytest.mark.usefixtures("compiled")
async def test_a_stuck_read_in_a_round_is_given_up_and_its_neighbours_are_served(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A path on an unserved userfaultfd page: the round waits no longer than its wait,
    the reader is given up (the next rounds take another), the pool reads it and the
    call is answered on_error at its deadline; meanwhile the same container's other
    calls and another container's reads, in rounds, are served."""
    calls = spy_paths(monkeypatch)
    policy = length_policy()

    @policy.on("getppid")
    def quick(n: Notification) -> object:
        return returns(7)

    settings = SessionSettings(deadline=1.0)
    async with serve_target(policy, ["mkdir", "getppid"], "mkdir-ok-then", "mkdir-uffd",
                            "40", "0.01", settings=settings) as stuck:
        async with serve_target(policy, ["mkdir"], "mkdir-repeat", "/abc", "50",
                                settings=settings) as other:
            other_out = await other.target.result()
        out = await stuck.target.result()
    assert other_out == {"results": [{"rc": 4, "errno": 0}] * 50}
    assert out["mkdir"]["errno"] == errno.EPERM  # on_error: the deadline
    assert 0.7 < out["mkdir"]["seconds"] < 5, out["mkdir"]
    assert max(out["latencies"]) < 0.5, max(out["latencies"])
    pool = current_read_pool()
    # (More than one only if the reader was also late for another round: a busy machine.)
    assert pool.inline_given_up >= 1 and calls["_read_later"] >= 1
    assert pool.round_reads >= 40  # the other container's


@pytest.mark.usefixtures("compiled", "patient")
async def test_a_container_whose_reads_are_slow_in_rounds_reads_through_the_pool(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every read of its path takes 2 ms (a userfaultfd page it serves late): after two
    such reads in rounds in a row it stays out of them for a second, so its memory does
    not make every round wait; its answers are the same. (``patient``: with the rounds'
    own few ms, a busy machine, the target's thread serving the page late, made a read
    stuck, which is another rule.)"""
    calls = spy_paths(monkeypatch)
    async with serve_target(length_policy(), ["mkdir"], "mkdir-ok-then", "mkdir-slow",
                            "0.002", "6") as served:
        out = await served.target.result()
    assert out == {"results": [{"rc": 5, "errno": 0}] * 6}
    memory = served.session.memory
    assert memory._round_slow_until > time.monotonic()
    # The first (routed in Python), two in rounds, the other four through the pool.
    assert current_read_pool().round_reads == 2
    assert calls == {"_prefetch": 5, "_read_later": 0}


# Rounds made to order: the targets wait (tests/target.py ``masked ... go``) until the
# test lets them make their call, one after another, while it holds the event loop; the
# poller's next round then takes them all, in that order.

# supervisor/_hotloop.c: the strings a round's reads may have in all (INLINE_MAX_ALL_STRINGS),
# and the room it keeps for one more request's (INLINE_MAX_STRINGS).
ROUND_STRINGS = 64
REQUEST_STRINGS = 8


def needs_userfaultfd() -> None:
    fd = libc.syscall(NR_USERFAULTFD, os.O_CLOEXEC)
    if fd < 0 and ctypes.get_errno() == errno.ENOSYS:
        pytest.skip("the kernel has no userfaultfd (CONFIG_USERFAULTFD)")
    assert fd >= 0, os.strerror(ctypes.get_errno())
    os.close(fd)


async def until(check: Callable[[], bool]) -> None:
    """Wait (letting the daemon run) until ``check()``."""
    with trio.fail_after(WAIT):
        while not check():
            await trio.sleep(0.001)


def ready_to_go(pid: int) -> bool:
    """Whether process ``pid`` catches SIGUSR1 (target.py ``masked``, which blocks it
    first): it may be sent the one ``go`` waits for. (Not told by its blocked signals:
    sigtimedwait unblocks those it waits for while it waits.)"""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & (1 << (signal.SIGUSR1 - 1)))
    raise AssertionError(f"no SigCgt in /proc/{pid}/status")


def pile_up(*calls: tuple[int, Session]) -> None:
    """Let each process (by pid, waiting in target.py ``go``) make its call, in this
    order, the next once the one before is pending on its session's listener fd; all
    the while in the trio thread without a checkpoint, so the event loop is held and the
    poller's next round takes them all, in this order: the order of the kernel's ready
    list, where a notification puts its listener (by a wake-up made under the listener's
    lock) before a poll() of that fd, which takes the lock, can see it."""
    for pid, session in calls:
        assert ready_to_go(pid), f"process {pid} would die of SIGUSR1"
        os.kill(pid, signal.SIGUSR1)
        poll = select.poll()
        poll.register(session.notify.fileno(), select.POLLIN)
        assert poll.poll(WAIT * 1000), f"process {pid} made no call"


def patient_rounds(monkeypatch: pytest.MonkeyPatch, wait: float,
                   *served: Served) -> ReadPool:
    """The pool, whose rounds now wait up to ``wait`` seconds for their reads
    (ReadPool.round_wait, and the sessions' own inline wait, which bounds it) instead of
    a fraction of a millisecond: what a test forces after the reads then happens after
    them however busy the machine is. A round's wait ends when its reads are done: only
    a stuck read makes it last."""
    pool = current_read_pool()
    monkeypatch.setattr(pool, "round_wait", lambda reads, fds: wait)
    for s in served:
        monkeypatch.setattr(s.session.memory, "_inline_wait", wait)
    return pool


class TargetPage:
    """A target's page registered with a userfaultfd nobody in it serves (target.py
    ``uffd-mkdir``), seen through a copy of that userfaultfd taken with pidfd_getfd:
    :meth:`faulted` tells when a read of the page waits, :meth:`serve` ends the wait.
    (The copy keeps the userfaultfd open after the target died: a read that waits then
    still waits for this process, and holds the target's memory meanwhile.)"""

    def __init__(self, info: Path) -> None:
        pid, fd, page = (int(x) for x in info.read_text().split())
        pidfd = os.pidfd_open(pid)
        try:
            self.fd = bpf.pidfd_getfd(pidfd, fd)
        finally:
            os.close(pidfd)
        # (Without O_NONBLOCK a userfaultfd polls POLLERR, always. Its file's flag: the
        # target's fd has it too, which nobody reads.)
        os.set_blocking(self.fd, False)
        self.pid, self.page = pid, page
        self.source = ctypes.create_string_buffer(PAGE)

    def faulted(self) -> bool:
        """Whether a read of the page waits for it now (or comes within WAIT)."""
        poll = select.poll()
        poll.register(self.fd, select.POLLIN)
        return any(events & select.POLLIN for _fd, events in poll.poll(WAIT * 1000))

    def serve(self, text: bytes) -> None:
        ctypes.memmove(self.source, text + b"\0", len(text) + 1)
        fcntl.ioctl(self.fd, UFFDIO_COPY, bytearray(struct.pack(
            "QQQQq", self.page, ctypes.addressof(self.source), PAGE, 0, 0)))

    def close(self) -> None:
        os.close(self.fd)


def spy_sessions(monkeypatch: pytest.MonkeyPatch, name: str) -> list[Session]:
    """The sessions whose ``Session.<name>`` was called, a call each, in order."""
    called: list[Session] = []
    original = getattr(Session, name)

    def spied(self: Session, *args: Any, **kwargs: Any) -> Any:
        called.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Session, name, spied)
    return called


@pytest.mark.usefixtures("compiled")
async def test_a_round_takes_the_strings_it_has_room_for_and_the_pool_reads_the_rest(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Seventeen containers' mount calls in one round, four declared paths each (68
    strings): the round takes a decision while room for a request's strings
    (INLINE_MAX_STRINGS) is left of its INLINE_MAX_ALL_STRINGS, so the first fifteen
    (60 strings); the two after them, in the round's order, are read through the pool as
    without rounds (Session._prefetch) and decided when delivered. Every call gets the
    answer of its own four paths, none at its deadline. (A round never has more requests
    than INLINE_MAX_REQUESTS: one per event, and Poller.MAX_EVENTS is as many.)"""
    per_call = 4
    fit = (ROUND_STRINGS - REQUEST_STRINGS) // per_call + 1
    count = fit + 2
    policy = PolicySet("p")

    @policy.on("mount", paths=(0, 1, 2, 4))
    def mount(n: Notification) -> object:
        if n.path(0) == b"/ok":
            return returns(0)
        i = int(n.path(0).removeprefix(b"/src"))
        if (n.path(1), n.path(2), n.path(4)) != (b"/mnt%d" % i, b"fs%d" % i, b"opt%d" % i):
            return deny(errno.EINVAL)
        return returns(1000 + i)

    prefetched = spy_sessions(monkeypatch, "_prefetch")
    read_later = spy_sessions(monkeypatch, "_read_later")
    settings = SessionSettings(deadline=10.0)
    async with AsyncExitStack() as stack:
        served = [await stack.enter_async_context(
            serve_target(policy, ["mount"], "masked", "mount-ok-then", "go", "mount",
                         f"/src{i}", f"/mnt{i}", f"fs{i}", f"opt{i}", settings=settings))
            for i in range(count)]
        await until(lambda: all(s.session.stats.answered == 1 for s in served))
        pool = patient_rounds(monkeypatch, WAIT, *served)
        assert pool.stats()["read_in_rounds"] == 0  # (a route's first call: in Python)
        prefetched.clear()
        pile_up(*((s.target.pid, s.session) for s in served))
        outs = [await s.target.result() for s in served]
    assert outs == [{"rc": 1000 + i, "errno": 0} for i in range(count)]
    assert pool.stats()["read_in_rounds"] == fit
    assert prefetched == [s.session for s in served[fit:]]
    assert read_later == []
    for s in served:
        assert s.session.memory.reads == 2 * per_call
        assert s.metric("seccomp_supervisor_handler_errors_total", policy="p",
                        kind="deadline") == 0


@pytest.mark.usefixtures("compiled")
async def test_a_call_withdrawn_after_its_read_in_the_round_is_not_answered(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A round of three: a container's child process's mkdir, another container's, then
    a getppid whose handler kills that child while the round's thread is in its read
    (on a page of the child's that this test serves only once the child is gone: the
    read holds the child's memory and succeeds). round_finish then finds the read whole
    and its call no longer valid (ID_VALID): the decision is not made in the round
    (Session._read_later; the pool finds the caller gone) and nothing is answered to
    the dead call; the other decision of the round is made there, and the child's
    container goes on being served, its counters adding up."""
    needs_userfaultfd()
    calls = spy_paths(monkeypatch)
    seen: list[tuple[int, bytes | str]] = []
    sessions: list[Session] = []
    in_round: list[tuple[int, int]] = []
    policy = PolicySet("p")

    @policy.on("mkdir", paths=(0,))
    def length(n: Notification) -> object:
        try:
            path = n.path(0)
        except NotificationGone:
            seen.append((n.pid, "gone"))
            raise
        seen.append((n.pid, path))
        if path == b"/abcde":  # decided in the round, after its reads
            in_round.append((current_read_pool().round_reads,
                             sessions[0].memory._round_strikes))
        return returns(len(path))

    pages: list[TargetPage] = []
    problems: list[str] = []
    killer = PolicySet("k")

    @killer.on("getppid")
    def kill(n: Notification) -> object:
        (page,) = pages
        if not page.faulted():
            problems.append("the round's thread did not read the child's page")
            return deny(errno.EIO)
        pidfd = os.pidfd_open(page.pid)
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            poll = select.poll()
            poll.register(pidfd, select.POLLIN)
            if not poll.poll(WAIT * 1000):
                problems.append("the child did not die")
        finally:
            os.close(pidfd)
        page.serve(b"/from-the-dead")
        return returns(7)

    info = tmp_path / "child"
    async with AsyncExitStack() as stack:
        parent = await stack.enter_async_context(serve_target(
            policy, ["mkdir"], "masked", "mkdir-ok-then", "child-uffd-mkdir", str(info),
            "3"))
        sessions.append(parent.session)
        other = await stack.enter_async_context(serve_target(
            policy, ["mkdir"], "masked", "mkdir-ok-then", "go", "mkdir", "/abcde"))
        killing = await stack.enter_async_context(serve_target(
            killer, ["getppid"], "masked", "go", "getppid"))
        await until(lambda: info.exists() and parent.session.stats.answered == 1
                    and other.session.stats.answered == 1
                    and ready_to_go(killing.target.pid))
        pages.append(TargetPage(info))
        stack.callback(pages[0].close)
        child = pages[0].pid
        pool = patient_rounds(monkeypatch, WAIT, parent, other, killing)
        given_up = pool.inline_given_up  # (the first calls', routed in Python, may have)
        pile_up((child, parent.session), (other.target.pid, other.session),
                (killing.target.pid, killing.session))
        outs = [await s.target.result() for s in (parent, other, killing)]
        await until(lambda: parent.session.stats.gone == 1)  # (the pool's delivery)
        session = parent.session
        assert not session._prefetching and session.inflight == 0
        assert not pool.pending and not pool.done
    assert problems == []
    assert outs == [
        {"child": signal.SIGKILL, "results": [{"rc": 4, "errno": 0}] * 3},
        {"rc": 6, "errno": 0},
        {"results": [{"rc": 7, "errno": 0}]},
    ]
    # The child's call: its handler saw it gone (read again by the pool), never its path.
    assert [what for pid, what in seen if pid == child] == ["gone"]
    assert calls["_read_later"] == 1
    # Both read in the round, in time (none given up); the child's read took long: it
    # waited for the page, so it was under way when the child died, and read it whole.
    assert in_round == [(2, 1)]
    assert pool.inline_given_up == given_up
    stats = session.stats
    assert (stats.notifications, stats.answered, stats.gone) == (5, 4, 1)
    assert parent.metric("seccomp_supervisor_notifications_gone_total",
                         stage="id_valid") == 1
    assert parent.metric("seccomp_supervisor_notifications_gone_total", stage="send") == 0
    for s in (parent, other, killing):
        assert s.metric("seccomp_supervisor_handler_errors_total", policy="p",
                        kind="deadline") == 0


@pytest.mark.usefixtures("compiled")
async def test_the_reads_after_a_stuck_one_in_a_round_are_read_again_elsewhere_in_time(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A round of three containers' mkdir calls, the first one's path on a page nobody
    serves yet: the round's thread stays in that read, so the other two, posted to it
    behind the stuck one, are posted again to the pool's next inline reader with a wait
    of their own, read there and decided in the round, answered long before the stuck
    call's deadline. The stuck call reads through the pool and is answered, with its
    path, once the page is served. (The rounds wait longer than they do in the daemon,
    so that the new reader's thread, started for the retry, reads in time however busy
    the machine is: the wait given up on the stuck read is that long too.)"""
    needs_userfaultfd()
    calls = spy_paths(monkeypatch)
    policy = length_policy()
    settings = SessionSettings(deadline=10.0)
    wait = 0.25
    info = tmp_path / "stuck"
    async with AsyncExitStack() as stack:
        stuck = await stack.enter_async_context(serve_target(
            policy, ["mkdir"], "masked", "mkdir-ok-then", "uffd-mkdir", str(info),
            settings=settings))
        others = [await stack.enter_async_context(serve_target(
            policy, ["mkdir"], "masked", "mkdir-ok-then", "go", "mkdir-timed", path,
            settings=settings)) for path in ("/abc", "/abcd")]
        await until(lambda: info.exists()
                    and all(s.session.stats.answered == 1 for s in (stuck, *others)))
        page = TargetPage(info)
        stack.callback(page.close)
        pool = patient_rounds(monkeypatch, wait, stuck, *others)
        first = pool.inline
        # (The first calls, routed in Python, may have been read by the pool's inline
        # readers, and given up there: each counts from here.)
        before = {inline: (inline.reads, inline.abandoned)
                  for inline in (first, *pool.inline_left)}
        given_up = pool.inline_given_up
        pile_up((stuck.target.pid, stuck.session),
                *((s.target.pid, s.session) for s in others))
        outs = [await s.target.result() for s in others]
        assert stuck.target.child.process.poll() is None  # still in its call
        second = pool.inline
        page.serve(b"/served-late")
        stuck_out = await stuck.target.result()
    for out, length in zip(outs, (4, 5), strict=True):
        assert (out["rc"], out["errno"]) == (length, 0)
        assert out["seconds"] < 2 * wait + 1.0, out  # (its deadline: 10 s)
    assert (stuck_out["rc"], stuck_out["errno"]) == (len("/served-late"), 0)
    # The first reader was posted all three and gave up in the first; the next one
    # read the two after it.
    def since(inline: Any) -> tuple[int, int]:
        reads, abandoned = before.get(inline, (0, 0))
        return inline.reads - reads, inline.abandoned - abandoned

    assert second is not first
    assert since(first) == (3, 1)
    assert since(second) == (2, 0)
    assert pool.inline_given_up - given_up == 1 and pool.round_reads == 2
    assert calls["_read_later"] == 1  # the stuck one
    for s in (stuck, *others):
        assert s.metric("seccomp_supervisor_handler_errors_total", policy="p",
                        kind="deadline") == 0


@pytest.mark.usefixtures("compiled")
async def test_busy_guarded_targets_leave_no_reader_counted_as_stuck(tmp_path: Path) -> None:
    """Three busy targets, 10,000 guarded mkdir calls each under path_guard, started
    together, nothing slow (each path on the caller's own heap; every answer EACCES):
    once the calls are over, no inline reader is counted as in a stuck read
    (``threads_in_slow_reads``, status --json's ``memory_reads``). With three listener
    fds the loop waits for a read INLINE_WAIT_SHARED (100 us), a round its round_wait,
    and the reader's thread (nice 10, two busy CPUs) is at times not even running yet
    when the wait ends (7-16 waits given up per run here). Such a thread found the batch
    ABANDONED, not POSTED, and slept on: its reader stayed busy for good, counted
    against MAX_STUCK_READS like a thread in a read of slow memory, and a new one was
    started, which the next short wait could lose too (3 to 40 left here, in each of 15
    runs; 3,000 calls each left none in 2 runs of 18). At 64 the daemon stops replacing
    its inline reader and denies EAGAIN the reads behind a slow one. The pure-Python
    loop has no inline reader."""
    targets, calls = 3, 10_000
    guarded = tmp_path / "guarded"
    policy = load(PATH_GUARD, prefixes=[str(guarded)])
    async with AsyncExitStack() as stack:
        served = [await stack.enter_async_context(serve_target(
            policy, ["mkdir"], "masked", "go", "mkdir-repeat", str(guarded / f"d{i}"),
            str(calls))) for i in range(targets)]
        await until(lambda: all(ready_to_go(s.target.pid) for s in served))
        for s in served:
            os.kill(s.target.pid, signal.SIGUSR1)
        outs = [await s.target.result() for s in served]
    assert [Counter((r["rc"], r["errno"]) for r in out["results"]) for out in outs] == [
        {(-1, errno.EACCES): calls}] * targets
    pool = current_read_pool()
    # A wait given up at the very end leaves its reader busy a little longer, rightly:
    # in its read, or (its thread not run yet) about to find the batch given up and go
    # idle. Either is over within milliseconds of the calls: 2 s is for a busy machine.
    with trio.move_on_after(2.0):
        while pool.stats()["threads_in_slow_reads"]:
            await trio.sleep(0.01)
    stats = pool.stats()
    assert stats["threads_in_slow_reads"] == 0, stats
    assert stats["refused"] == 0, stats


# The attacks of tests/test_hostile_abi.py on the round's path: there each is the first
# call of its route, which Python routes (and reads); a call of the same ABI first makes
# the attack the round's.

@pytest.mark.usefixtures("compiled", "patient")
def test_the_round_reads_an_i386_path_where_the_kernel_reads(
        monkeypatch: pytest.MonkeyPatch, dirs: tuple[Path, Path], int80: Int80) -> None:  # noqa: F811
    """Bit 32 of an i386 call's pointer register: the round reads the real path below
    4 GiB (cut to 32 bits, as the kernel does), not the decoy above."""
    calls = spy_paths(monkeypatch)
    guarded, free = dirs
    real, decoy = guarded / "sub", free / "sub"
    warm = bytes(free / "warm")

    def attack() -> int:
        low = decoy_pair(bytes(real), bytes(decoy))
        checked(int80(i386("mkdir"), decoy_pair(warm, warm), 0o755, 0), "mkdir")
        return checked(int80(i386("mkdir"), (1 << 32) | low, GARBAGE | 0o755, 0), "mkdir")

    trial = run_policy(load(PATH_GUARD, prefixes=[str(guarded)]), attack)
    assert trial.errno == errno.EACCES, trial
    assert trial.decided("mkdir") == ["allow", "deny"]
    assert str(real) in trial.decisions[-1].decision.reason
    assert not real.exists() and not decoy.exists() and (free / "warm").exists()
    assert calls == {"_prefetch": 1, "_read_later": 0}  # the attack: the round's


@pytest.mark.usefixtures("compiled", "patient")
def test_the_round_reads_x32_path_pointers_whole(
        monkeypatch: pytest.MonkeyPatch, dirs: tuple[Path, Path]) -> None:  # noqa: F811
    calls = spy_paths(monkeypatch)
    guarded, free = dirs

    def attack() -> int:
        with contextlib.suppress(OSError):  # (no x32 here: ENOSYS once allowed)
            raw_syscall(abi.X32_SYSCALL_BIT | x86_64("mkdir"),
                        decoy_pair(bytes(free / "warm"), bytes(free / "warm")), 0o755)
        low = decoy_pair(bytes(free / "low"), bytes(guarded / "high"))
        return raw_syscall(abi.X32_SYSCALL_BIT | x86_64("mkdir"), (1 << 32) | low, 0o755)

    trial = run_policy(load(PATH_GUARD, prefixes=[str(guarded)]), attack)
    assert trial.errno == errno.EACCES, trial
    assert [d.syscall for d in trial.decisions] == ["mkdir", "mkdir"]
    assert str(guarded / "high") in trial.decisions[-1].decision.reason
    assert not (guarded / "high").exists() and not (free / "low").exists()
    assert calls == {"_prefetch": 1, "_read_later": 0}


@pytest.mark.usefixtures("compiled")
async def test_reads_a_round_hands_to_the_pool_leave_no_objects_behind(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Reference counts of the round's way to the pool (Session._read_later): 2,000
    reads that fail in the round (a NULL path) and again in the pool. A leak of one
    object per call would be 1,600 blocks or more over the calls measured. (Measured
    after a collection: without one, the cycles the pool's path leaves for the
    collector looked like growth, ~0.4 blocks per call, depending on when it ran.)"""
    calls = spy_paths(monkeypatch)
    policy = PolicySet("p")
    seen = [0]
    blocks: list[int] = []
    total = 2_000

    @policy.on("mkdir", paths=(0,))
    def reads(n: Notification) -> object:
        seen[0] += 1
        if seen[0] in (400, total):
            gc.collect()  # (cycles wait for a collection; a leak does not go)
            blocks.append(sys.getallocatedblocks())
        with contextlib.suppress(TargetMemoryError):
            n.path(0)
        return deny(errno.EACCES)

    async with serve_target(policy, ["mkdir"], "mkdir-ok-then", "mkdir-null-repeat",
                            str(total - 1)) as served:
        with trio.fail_after(120):
            out = await served.target.result()
    assert out == {"results": [{"rc": -1, "errno": errno.EACCES}] * (total - 1)}
    assert calls["_read_later"] == total - 1
    grown = blocks[1] - blocks[0]
    assert grown < 1_000, f"{grown} blocks more after {total - 400} notifications"
