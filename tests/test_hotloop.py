"""What the compiled hot loop (supervisor/_hotloop.c) must get right where C differs from
Python: handlers that raise, return garbage or a Decision subclass, rebind the chain,
close the session's fd or re-enter the session, and reference counts. Every test runs
with both loops (the ``hot_loop`` fixture): the pure-Python loop is the reference."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import logging
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
from prometheus_client import CollectorRegistry

from supervisor import accel, spawn
from supervisor.audit import Recorder
from supervisor.decide import Chain
from supervisor.metrics import Metrics
from supervisor.notifyfd import NotifyFd, Poller, current_poller
from supervisor.policy import (
    Container,
    Decision,
    Notification,
    PolicySet,
    allow,
    deny,
    returns,
)
from supervisor.profile import build_program, notify_profile
from supervisor.session import Session, SessionSettings

from .conftest import serve_target, sleeping_target

pytestmark = pytest.mark.usefixtures("hot_loop")


class _MyDecision(Decision):
    """A Decision subclass: the compiled loop must not take it for a Decision."""


def _errnos(results: object) -> list[int]:
    assert isinstance(results, dict)
    return [r["errno"] if r["rc"] == -1 else -r["rc"] for r in results["results"]]


async def test_every_kind_of_handler_result_gets_the_python_loops_answer() -> None:
    """One result per call, in a chain of two policies; the second denies ENOSPC.
    ``returns(7)`` shows as -7 (the call's value)."""
    results: list[object] = [
        deny(errno.EACCES),         # the fast path
        42,                         # garbage: refused, on_error (EPERM)
        ValueError("boom"),         # raised: on_error
        None,                       # passes on: the second policy decides
        _MyDecision("deny", errno=errno.EINVAL),  # a subclass: checked, then answered
        allow(),                    # kept while the second policy is asked: it denies
        returns(7),                 # a value
        deny(errno.EACCES, reason="another object"),  # a new Outcome
    ]
    first, second = PolicySet("first"), PolicySet("second")
    calls = iter(results)

    @first.on("getppid")
    def pick(n: Notification) -> object:
        result = next(calls)
        if isinstance(result, Exception):
            raise result
        return result

    @second.on("getppid")
    def no(n: Notification) -> Decision:
        return deny(errno.ENOSPC)

    async with serve_target([first, second], ["getppid"], "getppid", str(len(results))) \
            as served:
        got = _errnos(await served.target.result())
        assert got == [errno.EACCES, errno.EPERM, errno.EPERM, errno.ENOSPC, errno.EINVAL,
                       errno.ENOSPC, -7, errno.EACCES]
        stats = served.session.stats
        assert stats.notifications == len(results) and stats.answered == len(results)
        assert stats.decisions == {"deny": 7, "returns": 1}
        assert sum(stats.latency) == len(results)
        m = served.metric
        assert m("seccomp_supervisor_notifications_total", syscall="getppid",
                 policy="first", decision="deny") == 5  # two on_error
        assert m("seccomp_supervisor_notifications_total", syscall="getppid",
                 policy="second", decision="deny") == 2
        assert m("seccomp_supervisor_notifications_total", syscall="getppid",
                 policy="first", decision="returns") == 1
        assert m("seccomp_supervisor_handler_errors_total", policy="first",
                 kind="refused") == 1
        assert m("seccomp_supervisor_handler_errors_total", policy="first",
                 kind="exception") == 1
        assert m("seccomp_supervisor_decision_seconds_count", syscall="getppid") == 8


async def test_a_handler_that_rebinds_its_session_answers_with_the_old_chain() -> None:
    """The chain in use is read per notification: a rebind from inside a handler takes
    effect from the next one, and the current one is answered as decided."""
    old, new = PolicySet("old"), PolicySet("new")
    session: list[Session] = []

    @old.on("getppid")
    def rebind(n: Notification) -> Decision:
        session[0].rebind(Chain([("new", new)]), SessionSettings())
        return deny(errno.EACCES)

    @new.on("getppid")
    def deny_new(n: Notification) -> Decision:
        return deny(errno.ENOSPC)

    async with serve_target(old, ["getppid"], "getppid", "3") as served:
        session.append(served.session)
        assert _errnos(await served.target.result()) == [errno.EACCES, errno.ENOSPC,
                                                         errno.ENOSPC]
        assert served.metric("seccomp_supervisor_notifications_total", syscall="getppid",
                             policy="new", decision="deny") == 2


async def test_a_handler_that_closes_the_sessions_fd_does_not_answer_through_its_number(
) -> None:
    """A handler closes the session's listener and the number is reused at once (here
    by another filter's listener). The answer must not go to whatever the number names
    now: it fails as NotifyFd.send fails on a closed NotifyFd (ValueError: fd -1), the
    session ends with that error, and the other listener gets nothing. (The second call:
    the first of a call number takes the Python path, which fills the route cache.)"""
    policy = PolicySet("closer")
    session: list[Session] = []
    reused: list[int] = []

    with sleeping_target() as other:
        other_fd = other.take_listener()
        try:
            @policy.on("getppid")
            def close(n: Notification) -> Decision:
                if session[0].stats.notifications == 2:
                    fd = session[0].notify.fileno()
                    session[0].notify.close()
                    reused.append(os.dup2(other_fd, fd))
                return deny(errno.EACCES)

            with pytest.raises(BaseExceptionGroup) as raised:
                async with serve_target(policy, ["getppid"], "getppid", "2") as served:
                    session.append(served.session)
                    # The listener is gone: the second call gets ENOSYS from the kernel.
                    assert _errnos(await served.target.result()) == [errno.EACCES,
                                                                     errno.ENOSYS]
                    with trio.fail_after(10):
                        await served.done.wait()
            failures = raised.value.subgroup(lambda e: isinstance(e, ValueError))
            assert failures is not None, raised.value
            assert served.session.stats.gone == 0
            assert served.session.stats.answered == 1
        finally:
            for fd in (*reused, other_fd):
                os.close(fd)


async def test_a_handler_that_reenters_its_session_answers_both_calls() -> None:
    """Two threads call at once; the handler of the first receives the second itself
    (Session.on_ready, nested), whose RECV overwrites the session's receive buffer:
    each call still gets its own answer."""
    policy = PolicySet("reenter")
    session: list[Session] = []
    depth = [0]

    @policy.on("getppid")
    def nested(n: Notification) -> Decision:
        if depth[0]:
            return deny(errno.ENOSPC)
        depth[0] += 1
        try:
            notify = session[0].notify
            waited = time.monotonic()
            while not notify.poll_now() & select.POLLIN:
                assert time.monotonic() - waited < 5, "the second thread never called"
                time.sleep(0.001)
            assert session[0].on_ready(select.POLLIN) is None
        finally:
            depth[0] -= 1
        return deny(errno.EACCES)

    async with serve_target(policy, ["getppid"], "threads", "2") as served:
        session.append(served.session)
        assert sorted(_errnos(await served.target.result())) == [errno.EACCES,
                                                                 errno.ENOSPC]
        assert served.session.stats.decisions == {"deny": 2}


async def test_many_notifications_leave_no_objects_behind(hot_loop: str) -> None:
    """Reference counts: 20,000 notifications through every path of the compiled loop
    (answered in C, passed on, handed to Python with a result, a subclass) must not
    leave objects behind: a leak of one object per call would be 20,000 blocks."""
    first, second = PolicySet("first"), PolicySet("second")
    cycle = [deny(errno.EACCES), None, allow(), _MyDecision("deny", errno=errno.EINVAL)]
    calls = [0]
    blocks: list[int] = []
    total = 20_000

    @first.on("getppid")
    def pick(n: Notification) -> Decision | None:
        calls[0] += 1
        if calls[0] in (2_000, total):
            blocks.append(sys.getallocatedblocks())
        return cycle[calls[0] % len(cycle)]

    @second.on("getppid")
    def no(n: Notification) -> Decision:
        return deny(errno.ENOSPC)

    async with serve_target([first, second], ["getppid"], "getppid", str(total)) \
            as served:
        with trio.fail_after(120):
            got = _errnos(await served.target.result())
        assert len(got) == total and set(got) == {errno.EACCES, errno.ENOSPC, errno.EINVAL}
    grown = blocks[1] - blocks[0]
    assert grown < 2_000, f"{grown} blocks more after {total - 2_000} notifications"


@contextmanager
def counting_thread() -> Iterator[tuple[list[int], float]]:
    """A thread that counts as fast as the GIL lets it while the block runs, and its
    counts per second with the GIL free (this thread asleep)."""
    counted = [0]
    stop = threading.Event()

    def count() -> None:
        while not stop.is_set():
            counted[0] += 1

    thread = threading.Thread(target=count)
    thread.start()
    try:
        before, free = counted[0], time.monotonic()
        time.sleep(0.05)
        rate = (counted[0] - before) / (time.monotonic() - free)
        assert rate > 0
        yield counted, rate
    finally:
        stop.set()
        thread.join()


async def test_a_recv_on_stale_readiness_is_cut_short_in_the_compiled_round(
        hot_loop: str) -> None:
    """The compiled twin of test_hostile_listen's stale-readiness test: the compiled
    round RECVs for a readiness the listener does not have (another reader took the
    call); the watchdog interrupts the RECV and the session ends."""
    policy = PolicySet("p")
    async with serve_target(policy, ["swapon"], "sleep", "30") as served:
        await trio.sleep(0.05)  # the poller (and its RECV watchdog) runs
        session = served.session
        poller: Poller = current_poller()
        r, w = os.pipe()
        epoll = select.epoll()
        try:
            os.write(w, b"x")
            epoll.register(r, select.EPOLLIN)  # readable, but it is not the listener
            started = time.monotonic()
            if hot_loop == "c":
                assert accel.HOTLOOP is not None
                interrupted = accel.HOTLOOP.recv_interrupted()
                with counting_thread() as (counted, rate):
                    before, started = counted[0], time.monotonic()
                    count, suspended = accel.HOTLOOP.poll_round(poller, epoll.fileno(),
                                                                {r: session}, 32)
                    during = counted[0] - before
                    stalled = time.monotonic() - started
                assert (count, suspended) == (1, None)
                # The RECV held the GIL, as SEND does: the thread did not count while it
                # blocked (it did while the session logged its end, after the RECV), and
                # its own watchdog, which needs no GIL, ended it: the Python one could
                # not have run. (Let go of, the thread counted nearly all along.)
                assert stalled >= 0.1, stalled  # one to two RECV_WATCH_INTERVALs
                assert during < rate * stalled / 4, (during, rate, stalled)
                assert accel.HOTLOOP.recv_interrupted() == interrupted + 1
            else:
                assert session.on_ready(select.POLLIN) is None
            assert time.monotonic() - started < 1.0
        finally:
            epoll.close()
            os.close(r)
            os.close(w)
        with trio.fail_after(5):
            await served.done.wait()
        assert session.read_elsewhere
        assert session.notify.closed


@pytest.mark.parametrize("hot_loop", ["c"], indirect=True)
def test_a_forked_child_has_no_recv_watchdog_and_can_start_its_own(hot_loop: str) -> None:
    """Only the forking thread runs on in a child: the watchdogs are not there, so the
    child's RECVs let the GIL go again until it starts its own."""
    from supervisor import notifyfd

    assert accel.HOTLOOP is not None
    assert notifyfd.watch_recv()  # (the main thread: the test runs in it)
    assert accel.HOTLOOP.watch_recv(0.1, signal.SIGURG) is False  # runs already
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        ok = (notifyfd._WATCH.thread == 0
              and accel.HOTLOOP.watch_recv(0.1, signal.SIGURG) is True
              and accel.HOTLOOP.watch_recv(0.1, signal.SIGURG) is False)
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert notifyfd._WATCH.thread == threading.get_ident()


@pytest.mark.parametrize("hot_loop", ["c", "python"], indirect=True)
async def test_id_valid_is_the_same_in_both_loops(hot_loop: str) -> None:
    """NotifyFd.id_valid (the memory reads' check after the read) with the compiled
    ioctl, which keeps the GIL, and with fcntl's: True while the call waits, False once
    answered; OSError for an fd that is no listener, ValueError once closed."""
    child = spawn.spawn_filtered([sys.executable, "-c", "import os; os.getppid()"],
                                 build_program(notify_profile(["getppid"])))
    notify = NotifyFd(child.take_listener())
    try:
        assert (notify._compiled_id_valid is None) == (hot_loop == "python")
        select.select([notify.fileno()], [], [], 10)
        raw = notify.recv()
        assert raw is not None
        assert notify.id_valid(raw[0]) is True
        assert notify.id_valid(raw[0] + 1) is False
        notify.send(raw[0], 0, 0, 0)
        assert notify.id_valid(raw[0]) is False
        assert child.process.wait(timeout=10) == 0
        r, w = os.pipe()
        try:
            not_a_listener = NotifyFd(r)
            not_a_listener._compiled_id_valid = notify._compiled_id_valid
            with pytest.raises(OSError) as raised:
                not_a_listener.id_valid(raw[0])
            assert raised.value.errno == errno.ENOTTY
        finally:
            os.close(r)
            os.close(w)
    finally:
        notify.close()
        child.close()
    with pytest.raises(ValueError, match="negative"):
        notify.id_valid(raw[0])  # closed


async def test_i386_and_x86_64_calls_of_one_name_are_answered_per_arch(int80_library: Path) -> None:
    """The route cache is per audit arch: the same call made as i386 (``int $0x80``,
    garbage in the registers' upper halves) and as x86_64, twice each (the second of
    each is served from the cache, in C with the compiled loop), gets its own arch and
    the argument the kernel decodes."""
    from supervisor.testing import ARCHITECTURES

    from .test_hostile_abi import i386

    library = int80_library
    program = [sys.executable, "-c", textwrap.dedent(f"""
        import ctypes, json
        f = ctypes.CDLL({str(library)!r}).int80
        f.restype = ctypes.c_long
        f.argtypes = [ctypes.c_long, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        libc = ctypes.CDLL(None)
        libc.syscall.restype = ctypes.c_long
        if f({i386("getpid")}, 0, 0, 0) <= 0:
            print(json.dumps({{"skip": True}}))
        else:
            x86 = [f({i386("getpgid")}, 0xdeadbeef0000000b + i, 0, 0) for i in range(2)]
            x86_64 = [libc.syscall(ctypes.c_long(121), ctypes.c_long(5 + i))
                      for i in range(2)]
            print(json.dumps({{"x86": x86, "x86_64": x86_64}}))
    """)]
    profile = dataclasses.replace(notify_profile(["getpgid"]), architectures=ARCHITECTURES)
    child = spawn.spawn_filtered(program, build_program(profile), stdout=subprocess.PIPE)
    policy = PolicySet("decoded")
    arches: list[str] = []

    @policy.on("getpgid")
    def decoded(n: Notification) -> Decision:
        arches.append(n.arch)
        return returns(n.int32(0) * 3 + (1 if n.arch == "x86" else 2))

    session = Session(NotifyFd(child.take_listener()), Container(id="t"),
                      Chain([("decoded", policy)]), SessionSettings(),
                      Recorder(Metrics(CollectorRegistry()), audit="none"))
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run)
            out = json.loads(await trio.to_thread.run_sync(
                lambda: child.process.communicate(timeout=20)[0]))
            nursery.cancel_scope.cancel()
    finally:
        if child.process.poll() is None:
            child.process.kill()
            child.process.wait()
        child.close()
    if out.get("skip"):
        pytest.skip("this kernel runs no i386 code (CONFIG_IA32_EMULATION off)")
    assert out == {"x86": [11 * 3 + 1, 12 * 3 + 1], "x86_64": [5 * 3 + 2, 6 * 3 + 2]}
    assert arches == ["x86", "x86", "x86_64", "x86_64"]
    assert session.stats.decisions == {"returns": 4}


async def test_a_property_added_to_the_session_class_at_run_time_is_honoured(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled loop caches how it finds each attribute per type; a class changed at
    run time (here ``Session.recorder`` made a property, as a plugin or a test might)
    must be seen as Python sees it, not through the cache of the first session. (A
    cache keyed on the type alone kept reading the instance dict: the new recorder got
    no decision.)"""
    policy = PolicySet("p")

    @policy.on("getppid")
    def refuse(n: Notification) -> Decision:
        return deny(errno.EACCES)

    async with serve_target(policy, ["getppid"], "getppid", "5") as warm:  # the caches
        with trio.fail_after(20):
            assert _errnos(await warm.target.result()) == [errno.EACCES] * 5

    seen = Recorder(Metrics(CollectorRegistry()), audit="none")
    # __init__ still stores its recorder in the slot (through the slot's descriptor, kept
    # here); the property wins over the descriptor the compiled loop cached.
    slot = vars(Session)["recorder"]
    monkeypatch.setattr(Session, "recorder", property(
        lambda self: seen, lambda self, given: slot.__set__(self, given)), raising=False)
    async with serve_target(policy, ["getppid"], "getppid", "5") as served:
        with trio.fail_after(20):
            assert _errnos(await served.target.result()) == [errno.EACCES] * 5
    assert seen.metrics is not None
    counted = seen.metrics.registry.get_sample_value(
        "seccomp_supervisor_notifications_total",
        {"syscall": "getppid", "policy": "p", "decision": "deny"})
    assert counted is not None and counted >= 5


class _LibraryStop(BaseException):
    """A library's own BaseException (as some use to unwind)."""


@pytest.mark.parametrize("raised", [
    lambda: sys.exit("policy gave up"),
    lambda: _raise(asyncio.CancelledError()),  # a BaseException since Python 3.8
    lambda: _raise(_LibraryStop()),
    lambda: _raise(BaseExceptionGroup("a policy's nursery", [_LibraryStop()])),
], ids=["sys.exit", "asyncio.CancelledError", "BaseException-subclass", "group"])
@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_handler_calling_sys_exit_gets_on_error_and_the_daemon_lives(
        kind: str, raised: Callable[[], None]) -> None:
    """sys.exit() in a policy is a policy bug like any exception: the call gets on_error
    (EPERM) and the session serves on; so is any other BaseException policy code raises
    but the daemon's own (KeyboardInterrupt, GeneratorExit, trio.Cancelled). (None is an
    Exception: each went through the loop and stopped the trio run, every container's
    calls with it.)"""
    policy = PolicySet("p")
    calls = [0]

    def verdict(n: Notification) -> Decision:
        calls[0] += 1
        if calls[0] == 2:
            raised()
        return deny(errno.EACCES)

    if kind == "sync":
        policy.on("getppid")(verdict)
    else:
        @policy.on("getppid")
        async def averdict(n: Notification) -> Decision:
            return verdict(n)

    async with serve_target(policy, ["getppid"], "getppid", "3") as served:
        with trio.fail_after(20):
            assert _errnos(await served.target.result()) == [
                errno.EACCES, errno.EPERM, errno.EACCES]
        assert served.session._failed is None


async def test_a_handler_whose_own_nursery_overruns_the_deadline_is_cut_off_as_any() -> None:
    """The deadline cancels a handler that waits in a nursery of its own: trio raises its
    Cancelled from the nursery in an exception group, which is the daemon's own (not
    the policy's failure): the deadline's scope takes it, the call gets its deadline
    answer (on_error) and the session serves on."""
    policy = PolicySet("p")
    calls = [0]

    @policy.on("getppid")
    async def verdict(n: Notification) -> Decision:
        calls[0] += 1
        if calls[0] == 2:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.sleep_forever)
        return deny(errno.EACCES)

    settings = SessionSettings(deadline=0.3)
    async with serve_target(policy, ["getppid"], "getppid", "3",
                            settings=settings) as served:
        with trio.fail_after(20):
            assert _errnos(await served.target.result()) == [
                errno.EACCES, errno.EPERM, errno.EACCES]
        assert served.session._failed is None
        assert served.session.inflight == 0
        errors = "seccomp_supervisor_handler_errors_total"
        assert served.metric(errors, policy="p", kind="deadline") == 1
        assert served.metric(errors, policy="p", kind="exception") == 0


@pytest.mark.parametrize("raised", [
    lambda: sys.exit("hook gave up"), lambda: _raise(_LibraryStop())],
    ids=["sys.exit", "BaseException-subclass"])
async def test_a_session_end_hook_raising_a_base_exception_ends_only_its_session(
        raised: Callable[[], None]) -> None:
    """A policy's session-end hook is policy code too: what it raises is logged, and the
    session ends as it would have (it stopped the trio run, the daemon with it)."""
    policy = PolicySet("p")
    ended: list[str] = []

    @policy.on("getppid")
    def verdict(n: Notification) -> Decision:
        return deny(errno.EACCES)

    @policy.on_session_end
    def bye(container: Container) -> None:
        ended.append(container.id)
        raised()

    async with serve_target(policy, ["getppid"], "getppid", "2") as served:
        with trio.fail_after(20):
            assert _errnos(await served.target.result()) == [errno.EACCES, errno.EACCES]
            await served.done.wait()
        assert served.session._failed is None
    assert ended == ["test"]


def _raise(exc: BaseException) -> None:
    raise exc


@pytest.mark.parametrize("made", [
    lambda: Decision("deny", errno=512),  # ERESTARTSYS, kernel-internal
    lambda: Decision("deny", errno=0),
    lambda: Decision("deny", errno=2**40),  # does not fit the response
    lambda: Decision("returns", value=-4),  # an error return: deny(4) says so
    lambda: Decision("returns", value=2**64),
    lambda: Decision("inject_fd", fd=-1),
    lambda: Decision("maybe"),  # type: ignore[arg-type]
], ids=["errno512", "errno0", "errno2^40", "returns-4", "returns2^64", "fd-1", "kind"])
async def test_a_decision_made_directly_follows_the_builders_rules(made: object) -> None:
    """deny(), returns() and inject_fd() refuse kernel-internal errnos, error returns and
    values that do not fit; a Decision made directly had no such check: errno 512
    (ERESTARTSYS, kernel-internal) reached the task, 2**40 ended the session. Now making
    it raises in the handler: that call gets on_error."""
    policy = PolicySet("p")
    calls = [0]

    @policy.on("getppid")
    def decide(n: Notification) -> Decision:
        calls[0] += 1
        return made() if calls[0] == 2 else deny(errno.EACCES)  # type: ignore[operator]

    async with serve_target(policy, ["getppid"], "getppid", "3") as served:
        with trio.fail_after(20):
            assert _errnos(await served.target.result()) == [
                errno.EACCES, errno.EPERM, errno.EACCES]
        assert served.session._failed is None


@pytest.mark.parametrize("read", ["inline", "delivered"])
async def test_guarded_notifications_leave_no_objects_behind(
        read: str, hot_loop: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Reference counts of the decisions that go on once their declared paths are read
    (the compiled loop's resume): answered there, passed on to the next link, handed to
    Python with an allow, a subclass or an exception, suspended in the handler. 3,000
    calls: a leak of one object per call would be thousands of blocks."""
    from . import test_declared_paths

    if read == "delivered":
        test_declared_paths.no_inline_wait(monkeypatch)
    # The handler errors' warnings are not kept: a log record kept with its traceback
    # would be the growth this test looks for.
    caplog.set_level(logging.ERROR, logger="supervisor.session")
    first, second = PolicySet("first"), PolicySet("second")
    cycle: list[object] = [deny(errno.EACCES), None, allow(unchecked=True),
                           _MyDecision("deny", errno=errno.EINVAL), "raises", "waits"]
    calls = [0]
    blocks: list[int] = []
    total = 3_000

    @first.on("mkdir", paths=(0,))
    async def pick(n: Notification) -> object:
        calls[0] += 1
        if calls[0] in (600, total):
            blocks.append(sys.getallocatedblocks())
        result = cycle[calls[0] % len(cycle)]
        n.path(0)
        if result == "waits":
            await trio.lowlevel.checkpoint()
            return deny(errno.EACCES)
        if result == "raises":
            raise ValueError("boom")  # a new one each time: a raise extends a traceback
        return result

    @second.on("mkdir")
    def no(n: Notification) -> Decision:
        return deny(errno.ENOSPC)

    async with serve_target([first, second], ["mkdir"], "mkdir-repeat", "/abc/de",
                            str(total)) as served:
        with trio.fail_after(120):
            got = _errnos(await served.target.result())
        assert len(got) == total
        assert set(got) == {errno.EACCES, errno.ENOSPC, errno.EINVAL, errno.EPERM}
    grown = blocks[1] - blocks[0]
    assert grown < 600, f"{grown} blocks more after {total - 600} notifications"
