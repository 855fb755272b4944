"""Paths declared with ``PolicySet.on(..., paths=...)``: read race-checked before the
handler runs, without a task per call (issue 20, target 3).

Real kernel: forked targets under NOTIFY filters (tests/target.py), both hot loops. The
read pool's submit/cancel and the Deadlines heap are checked on their own too, with plain
functions as reads.
"""

from __future__ import annotations

import errno
import threading
from pathlib import Path
from typing import NamedTuple

import pytest
import trio

from supervisor import accel
from supervisor import memory as memory_module
from supervisor import session as session_module
from supervisor.deadlines import Deadlines
from supervisor.errors import PolicyError
from supervisor.memory import ReadPool, ReadSlot, TargetMemory, _Job
from supervisor.notifyfd import current_poller
from supervisor.policy import Notification, PolicySet, allow, deny, returns
from supervisor.session import Session, SessionSettings
from supervisor.testing import load

from .conftest import serve_target

REPO = Path(__file__).resolve().parent.parent
WAIT = 10.0  # a hang guard for what takes milliseconds


def counting_policy(asynchronous: bool = False, getppid: bool = False
                    ) -> tuple[PolicySet, list[bytes]]:
    """mkdir: returns the length of the path it passed, read before the handler;
    ``getppid``: returns 7 too (a call that reads nothing)."""
    policy = PolicySet("p")
    seen: list[bytes] = []

    if getppid:
        @policy.on("getppid")
        def quick(n: Notification) -> object:
            return returns(7)

    if asynchronous:
        @policy.on("mkdir", paths=(0,))
        async def length_async(n: Notification) -> object:
            path = n.path(0)
            again = await n.read_path(0)  # the same bytes, not read again
            assert again is path
            seen.append(path)
            return returns(len(path))
    else:
        @policy.on("mkdir", paths=(0,))
        def length(n: Notification) -> object:
            seen.append(n.path(0))
            return returns(len(n.path(0)))

    return policy, seen


async def waiting_for_paths(session: Session) -> None:
    """Until a decision of ``session`` waits for its declared paths."""
    with trio.fail_after(WAIT):
        while not session._prefetching:
            await trio.sleep(0.01)


@pytest.mark.usefixtures("hot_loop", "patient")
@pytest.mark.parametrize("asynchronous", [False, True], ids=["plain", "async"])
async def test_declared_paths_are_the_bytes_the_call_passed_read_once(
        asynchronous: bool) -> None:
    policy, seen = counting_policy(asynchronous)
    async with serve_target(policy, ["mkdir"], "mkdir-repeat", "/abc/de", "20") as served:
        out = await served.target.result()
    assert out == {"results": [{"rc": 7, "errno": 0}] * 20}
    assert seen == [b"/abc/de"] * 20
    assert served.session.memory.reads == 20  # one per call: read_path read nothing more


@pytest.mark.usefixtures("hot_loop")
@pytest.mark.parametrize(("command", "expected"), [
    ("mkdir-null", errno.EFAULT),
    ("mkdir-unmapped", errno.EFAULT),
    ("mkdir-long", errno.ENAMETOOLONG),
])
async def test_a_failed_read_is_the_handlers_error_as_with_read_path(
        command: str, expected: int) -> None:
    policy = PolicySet("p")

    @policy.on("mkdir", paths=(0,))
    def reads(n: Notification) -> object:
        n.path(0)
        return deny(errno.EACCES)

    async with serve_target(policy, ["mkdir"], command) as served:
        out = await served.target.result()
    assert out == {"rc": -1, "errno": expected}  # what the kernel would have answered
    assert served.metric("seccomp_supervisor_notifications_total", syscall="mkdir", policy="p",
                         decision="deny") == 1


@pytest.mark.usefixtures("hot_loop")
async def test_a_handler_may_catch_the_reads_error_and_an_unread_index_is_refused() -> None:
    from supervisor.policy import TargetMemoryError

    policy = PolicySet("p")
    refused: list[str] = []

    @policy.on("mkdir", paths=(0,))
    def reads(n: Notification) -> object:
        try:
            n.path(1)
        except ValueError as exc:
            refused.append(str(exc))
        try:
            n.path(0)
        except TargetMemoryError as exc:
            assert exc.errno == errno.EFAULT
            return deny(errno.EINVAL)
        return deny(errno.EACCES)

    async with serve_target(policy, ["mkdir"], "mkdir-null") as served:
        out = await served.target.result()
    assert out == {"rc": -1, "errno": errno.EINVAL}
    assert len(refused) == 1 and "was not read" in refused[0]


@pytest.mark.usefixtures("hot_loop")
@pytest.mark.parametrize("unchecked", [False, True])
async def test_allow_after_a_declared_path_must_be_unchecked(unchecked: bool) -> None:
    policy = PolicySet("p")

    @policy.on("mkdir", paths=(0,))
    def allows(n: Notification) -> object:
        n.path(0)
        return allow(unchecked=unchecked)

    async with serve_target(policy, ["mkdir"], "mkdir", "/nonexistent/dir") as served:
        out = await served.target.result()
    if unchecked:
        assert out == {"rc": -1, "errno": errno.ENOENT}  # the kernel ran it
    else:
        assert out == {"rc": -1, "errno": errno.EPERM}  # on_error
        assert served.metric("seccomp_supervisor_handler_errors_total",
                             policy="p", kind="refused") == 1


@pytest.mark.usefixtures("hot_loop")
@pytest.mark.parametrize("paths", [
    lambda n: 1 // 0,       # raises
    lambda n: [0],          # not a tuple
    lambda n: (7,),         # not an argument
], ids=["raises", "list", "index"])
async def test_a_paths_function_that_fails_is_a_handler_error_before_any_read(
        paths: object) -> None:
    policy = PolicySet("p")
    called: list[int] = []

    @policy.on("mkdir", paths=paths)  # type: ignore[arg-type]
    def never(n: Notification) -> object:
        called.append(1)
        return deny(errno.EACCES)

    async with serve_target(policy, ["mkdir"], "mkdir", "/x/y") as served:
        out = await served.target.result()
    assert out == {"rc": -1, "errno": errno.EPERM}  # on_error
    assert not called
    assert served.session.memory.reads == 0


class PolicyOwnError(BaseException):
    """A library's own BaseException, not an Exception (as SystemExit is)."""


@pytest.mark.usefixtures("hot_loop")
@pytest.mark.parametrize("raised", [SystemExit(3), PolicyOwnError("no")],
                         ids=["SystemExit", "BaseException"])
async def test_a_paths_function_raising_a_base_exception_is_a_handler_error(
        raised: BaseException) -> None:
    """What a paths function raises that is not an Exception (a stray sys.exit()) is
    still that policy's error, as a handler's is: on_error, every call. The compiled
    poll round took it for an error of its own from the second call on (the first is
    routed in Python): out of the round, the poller task and the whole trio run
    (TrioInternalError), every container's calls left unanswered."""
    policy = PolicySet("p")
    called: list[int] = []

    def paths(n: Notification) -> tuple[int, ...]:
        raise raised

    @policy.on("mkdir", paths=paths)
    def never(n: Notification) -> object:
        called.append(1)
        return deny(errno.EACCES)

    async with serve_target(policy, ["mkdir"], "mkdir-repeat", "/x/y", "5") as served:
        with trio.fail_after(WAIT):
            out = await served.target.result()
    assert out == {"results": [{"rc": -1, "errno": errno.EPERM}] * 5}  # on_error
    assert not called
    assert served.session.memory.reads == 0


def test_declared_paths_are_checked_when_registered() -> None:
    policy = PolicySet("p")
    for bad in ((6,), [0], (0, 0), (True,), (-1,), ("0",)):
        with pytest.raises(PolicyError, match="paths"):
            policy.on("mkdir", paths=bad)  # type: ignore[arg-type]
    policy.on("mkdir", paths=(0,))(lambda n: None)
    policy.on("renameat", paths=lambda n: (1, 3))(lambda n: None)


class Shifty(tuple):  # type: ignore[type-arg]
    """A tuple that iterates to other indexes after its first look (a policy's odd
    type): what is read must be what was checked."""

    looks = 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        self.looks += 1
        return iter((0,) if self.looks == 1 else (4,))


class PathArgs(NamedTuple):
    path: int


class Lookalike:
    """Equal to any index and hashed as 0, but indexes as 4."""

    def __eq__(self, other: object) -> bool:
        return True

    def __hash__(self) -> int:
        return hash(0)

    def __index__(self) -> int:
        return 4


def first_plain_then_lookalike() -> object:
    calls = [0]

    def paths(n: Notification) -> tuple[object, ...]:
        calls[0] += 1
        return (0,) if calls[0] == 1 else (Lookalike(),)

    return paths


@pytest.mark.usefixtures("hot_loop", "patient")
@pytest.mark.parametrize("declared", ["namedtuple", "function-namedtuple", "function-shifty",
                                      "function-lookalike"])
async def test_paths_given_as_a_tuple_subclass_are_the_indexes_checked(
        declared: str) -> None:
    """A tuple subclass passes the check (isinstance): a NamedTuple given to on() was
    then taken for a paths function (every call on_error), and a subclass returned by a
    paths function was iterated again after its check (an index never checked read). A
    tuple equal to one checked before skips the check: the checked one is read, not an
    element that compares equal to an index and indexes another."""
    paths: object = {
        "namedtuple": PathArgs(0),
        "function-namedtuple": lambda n: PathArgs(0),
        "function-shifty": lambda n: Shifty((0,)),
        "function-lookalike": first_plain_then_lookalike(),
    }[declared]
    policy = PolicySet("p")

    @policy.on("mkdir", paths=paths)  # type: ignore[arg-type]
    def length(n: Notification) -> object:
        return returns(len(n.path(0)))

    async with serve_target(policy, ["mkdir"], "mkdir-repeat", "/abc", "3") as served:
        out = await served.target.result()
    assert out == {"results": [{"rc": 4, "errno": 0}] * 3}
    assert served.session.memory.reads == 3


@pytest.mark.usefixtures("hot_loop", "patient")
async def test_path_guard_reads_nothing_for_a_read_only_open(tmp_path: Path) -> None:
    guarded = tmp_path / "guarded"
    guarded.mkdir()
    readable = guarded / "file"
    readable.write_text("hello")
    policy = load(REPO / "policies/path_guard.py", prefixes=[str(guarded)])
    async with serve_target(policy, ["openat"], "open-read", str(readable)) as served:
        out = await served.target.result()
    assert out["data"] == "hello"
    assert served.metric("seccomp_supervisor_notifications_total", syscall="openat",
                         policy="path_guard",
                         decision="allow") >= 1
    assert served.session.memory.reads == 0
    async with serve_target(policy, ["mkdir"], "mkdir", str(guarded / "d")) as served:
        out = await served.target.result()
    assert out == {"rc": -1, "errno": errno.EACCES}
    assert served.session.memory.reads == 1


def no_inline_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sessions read without waiting inline: every read is delivered by the pool's task
    (as with more than one container)."""
    monkeypatch.setattr(session_module, "TargetMemory",
                        lambda notify: TargetMemory(notify, inline_wait=0))


@pytest.mark.usefixtures("hot_loop")
@pytest.mark.parametrize("asynchronous", [False, True], ids=["plain", "async"])
async def test_reads_delivered_later_resume_the_decision_without_a_task(
        asynchronous: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    no_inline_wait(monkeypatch)
    tasks = []  # what gives a decision a task: parking (_decide_async), suspending
    for name in ("_decide_async", "_suspend"):
        original = getattr(session_module.Session, name)

        def counted(*args: object, original: object = original, name: str = name) -> object:
            tasks.append(name)
            return original(*args)  # type: ignore[operator]

        monkeypatch.setattr(session_module.Session, name, counted)
    policy, seen = counting_policy(asynchronous)
    async with serve_target(policy, ["mkdir"], "mkdir-threads", "8", "/nonexistent/d",
                            settings=SessionSettings(max_inflight=64)) as served:
        out = await served.target.result()
        session = served.session
        assert session.inflight == 0 and not session._prefetching
        assert not tasks
    assert [r["rc"] for r in out["results"]] == [len(f"/nonexistent/d{i}") for i in range(8)]
    assert sorted(seen) == sorted(f"/nonexistent/d{i}".encode() for i in range(8))
    assert session.memory._slot.borrowed_tokens == 0


@pytest.mark.usefixtures("hot_loop")
async def test_a_stuck_read_gets_on_error_at_the_deadline_and_others_are_served(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The read of a path on an unserved userfaultfd page blocks its thread until the
    target exits. Its call is answered on_error at the deadline; meanwhile the same
    container's other calls and another container's reads are served."""
    policy, _seen = counting_policy(getppid=True)

    settings = SessionSettings(deadline=1.0)
    async with serve_target(policy, ["mkdir", "getppid"], "mkdir-uffd", "40", "0.01",
                            settings=settings) as stuck:
        async with serve_target(policy, ["mkdir"], "mkdir-repeat", "/abc", "50",
                                settings=settings) as other:
            other_out = await other.target.result()
        out = await stuck.target.result()
    assert other_out == {"results": [{"rc": 4, "errno": 0}] * 50}
    assert out["mkdir"]["errno"] == errno.EPERM  # on_error: the deadline
    assert 0.7 < out["mkdir"]["seconds"] < 5, out["mkdir"]
    assert max(out["latencies"]) < 0.5, max(out["latencies"])
    assert stuck.metric("seccomp_supervisor_handler_errors_total",
                        policy="p", kind="deadline") == 1


@pytest.mark.usefixtures("hot_loop")
async def test_a_decision_waiting_for_its_paths_holds_an_async_slot() -> None:
    """max_inflight=1: while the stuck read's decision waits, the next async decision
    is parked (the fd is not read) until the deadline frees the slot."""
    policy, _seen = counting_policy()

    @policy.on("getppid")
    async def slot_taker(n: Notification) -> object:
        return returns(7)

    peak = [0]
    settings = SessionSettings(deadline=0.6, max_inflight=1)
    async with serve_target(policy, ["mkdir", "getppid"], "mkdir-uffd", "3", "0",
                            settings=settings) as served:
        async def watch() -> None:
            while True:
                peak[0] = max(peak[0], served.session.inflight)
                await trio.sleep(0.005)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            out = await served.target.result()
            nursery.cancel_scope.cancel()
    assert out["mkdir"]["errno"] == errno.EPERM
    assert out["latencies"][0] > 0.2, out  # parked until the deadline (0.6s after it came)
    assert max(out["latencies"][1:]) < 0.2, out
    assert peak[0] == 1


@pytest.mark.usefixtures("hot_loop")
async def test_stop_reading_waits_for_a_decision_waiting_for_its_paths() -> None:
    policy, _seen = counting_policy(getppid=True)

    settings = SessionSettings(deadline=0.8)
    async with serve_target(policy, ["mkdir", "getppid"], "mkdir-uffd", "0", "0",
                            settings=settings) as served:
        session = served.session
        await waiting_for_paths(session)
        session.stop_reading()
        await trio.sleep(0.2)
        assert not served.done.is_set()  # a received call waits for its answer
        with trio.fail_after(WAIT):
            await served.done.wait()
        assert not session._prefetching and session.inflight == 0
        out = await served.target.result()
    assert out["mkdir"]["errno"] == errno.EPERM
    assert session.stats.answered == session.stats.notifications == 2


@pytest.mark.usefixtures("hot_loop")
async def test_a_session_that_ends_mid_read_drops_its_waiting_decision() -> None:
    policy, _seen = counting_policy(getppid=True)

    settings = SessionSettings(deadline=30)
    async with serve_target(policy, ["mkdir", "getppid"], "mkdir-uffd", "0", "0",
                            settings=settings) as served:
        session = served.session
        await waiting_for_paths(session)
        served.target.child.process.kill()  # POLLHUP: the session ends
        with trio.fail_after(WAIT):
            await served.done.wait()
        assert not session._prefetching and session.inflight == 0
        with trio.fail_after(WAIT):  # the read's thread returns once the target is gone
            while session.memory._slot.borrowed_tokens:
                await trio.sleep(0.01)
    assert session.stats.answered == 1  # getppid; the mkdir died with its target


@pytest.mark.usefixtures("hot_loop")
async def test_shadow_mode_sees_prefetching_decisions(monkeypatch: pytest.MonkeyPatch
                                                      ) -> None:
    no_inline_wait(monkeypatch)
    policy = PolicySet("p")

    @policy.on("mkdir", paths=(0,))
    def refuse(n: Notification) -> object:
        return deny(errno.EACCES, reason=n.path(0).decode())

    settings = SessionSettings(mode="shadow")
    async with serve_target(policy, ["mkdir"], "mkdir", "/nonexistent/x",
                            settings=settings) as served:
        out = await served.target.result()
    assert out == {"rc": -1, "errno": errno.ENOENT}  # it went on
    assert served.metric("seccomp_supervisor_notifications_total", syscall="mkdir", policy="p",
                         decision="deny") == 1


# --------------------------------------------------------------- the pool, the heap

def jobs_of(pool: ReadPool, slot: object, names: list[str], log: list[str],
            hold: threading.Event, delivered: list[str]) -> list[_Job]:
    def work(name: str) -> bytes:
        log.append(name)
        if name.endswith("stuck"):
            assert hold.wait(WAIT)
        return name.encode()

    jobs = []
    for name in names:
        def deliver(result: object, name: str = name) -> None:
            delivered.append(name)

        jobs.append(_Job(lambda name=name: work(name), slot,  # type: ignore[misc]
                         lambda name=name: delivered.append(f"{name} discarded"),
                         deliver))
    return jobs


def test_submitted_reads_wait_in_their_sessions_fifo_and_take_turns() -> None:
    ran: list[str] = []
    delivered: list[str] = []
    hold = threading.Event()

    async def scenario() -> None:
        pool = ReadPool(slow_after=WAIT)
        a, b = ReadSlot(1), ReadSlot(1)
        a1, a2, a3 = jobs_of(pool, a, ["a1 stuck", "a2", "a3"], ran, hold, delivered)
        (b1,) = jobs_of(pool, b, ["b1"], ran, hold, delivered)
        assert not pool.submit(a1)
        while not ran:
            await trio.sleep(0.001)
        assert not pool.submit(a2) and not pool.submit(a3)
        assert list(a.deferred) == [a2, a3] and not pool.pending  # no task, no queue place
        assert not pool.submit(b1)
        assert list(pool.pending) == [b1]
        hold.set()
        with trio.fail_after(WAIT):
            while len(delivered) < 4:
                await trio.sleep(0.001)
        assert a.borrowed_tokens == b.borrowed_tokens == 0 and not a.deferred

    trio.run(scenario)
    assert ran == ["a1 stuck", "b1", "a2", "a3"]
    assert sorted(delivered) == ["a1 stuck", "a2", "a3", "b1"]


def test_a_sessions_reads_take_its_place_in_the_order_they_asked_for_it() -> None:
    """One FIFO per session for both kinds of reads: a submitted read (a decision waiting
    for its paths, no task) and a task's (a parked or recovered decision reading its
    paths in its task, a handler's ``await n.read_path()``). The task's used to wait in
    the limiter's own queue, served first whenever a place came back: under a flood with
    parked decisions (bench/neighbour.py, parked, on a loaded machine) a task was always
    waiting, and the submitted reads, the oldest decisions, waited until their deadline
    (on_error: 35-52 EPERM answers per round)."""
    ran: list[str] = []
    delivered: list[str] = []
    hold = threading.Event()

    async def scenario() -> None:
        pool = ReadPool(slow_after=WAIT)
        a = ReadSlot(1)
        a0, a1, a3 = jobs_of(pool, a, ["a0 stuck", "a1", "a3"], ran, hold, delivered)

        def task_read(name: str) -> bytes:
            ran.append(name)
            return name.encode()

        async def read_in_a_task(name: str) -> None:
            assert await pool.run(lambda: task_read(name), a) == name.encode()
            delivered.append(name)

        assert not pool.submit(a0)
        while not ran:
            await trio.sleep(0.001)
        async with trio.open_nursery() as nursery:
            assert not pool.submit(a1)  # waits for a0's place
            nursery.start_soon(read_in_a_task, "a2 (task)")
            await trio.sleep(0.01)
            assert not pool.submit(a3)
            nursery.start_soon(read_in_a_task, "a4 (task)")
            await trio.sleep(0.01)
            hold.set()
            with trio.fail_after(WAIT):
                while len(delivered) < 5:
                    await trio.sleep(0.001)
        assert a.borrowed_tokens == 0 and not a.deferred

    trio.run(scenario)
    assert ran == ["a0 stuck", "a1", "a2 (task)", "a3", "a4 (task)"]


def test_a_task_given_up_while_it_waits_for_its_sessions_place_leaves_the_queue() -> None:
    ran: list[str] = []
    delivered: list[str] = []
    hold = threading.Event()

    async def scenario() -> None:
        pool = ReadPool(slow_after=WAIT)
        a = ReadSlot(1)
        a0, a2 = jobs_of(pool, a, ["a0 stuck", "a2"], ran, hold, delivered)
        assert not pool.submit(a0)
        while not ran:
            await trio.sleep(0.001)
        with trio.move_on_after(0.02):
            await pool.run(lambda: b"a1", a)  # waits behind a0, then gives up
            raise AssertionError("read without the place")
        assert not a.deferred
        assert not pool.submit(a2)
        hold.set()
        with trio.fail_after(WAIT):
            while len(delivered) < 2:
                await trio.sleep(0.001)
        assert await pool.run(lambda: b"a3", a) == b"a3"
        assert a.borrowed_tokens == 0 and not a.deferred

    trio.run(scenario)
    assert ran == ["a0 stuck", "a2"]


def test_a_read_slot_counts_its_places_and_refuses_misuse() -> None:
    """ReadSlot counts its own places (no trio.CapacityLimiter): at most ``places`` at
    once, each borrower one, and only a borrower gives one back."""
    slot = ReadSlot(2)
    slot.acquire_on_behalf_of_nowait("a")
    with pytest.raises(RuntimeError):
        slot.acquire_on_behalf_of_nowait("a")  # one place per borrower
    slot.acquire_on_behalf_of_nowait("b")
    assert slot.borrowed_tokens == 2
    with pytest.raises(trio.WouldBlock):
        slot.acquire_on_behalf_of_nowait("c")  # full
    with pytest.raises(RuntimeError):
        slot.release_on_behalf_of("c")  # holds none
    slot.release_on_behalf_of("a")
    slot.acquire_on_behalf_of_nowait("c")
    assert slot.borrowed_tokens == 2
    with pytest.raises(ValueError):
        ReadSlot(0)


def test_a_cancelled_submitted_read_gives_its_place_back() -> None:
    ran: list[str] = []
    delivered: list[str] = []
    hold = threading.Event()

    async def scenario() -> None:
        pool = ReadPool(slow_after=WAIT)
        a, b = ReadSlot(1), ReadSlot(1)
        a1, a2 = jobs_of(pool, a, ["a1 stuck", "a2"], ran, hold, delivered)
        (b1,) = jobs_of(pool, b, ["b1"], ran, hold, delivered)
        pool.submit(a1)
        while not ran:
            await trio.sleep(0.001)
        pool.submit(a2)
        pool.submit(b1)
        pool.cancel(a2)  # waiting in its session's FIFO
        pool.cancel(b1)  # queued
        assert not a.deferred and not pool.pending and b.borrowed_tokens == 0
        assert delivered == ["a2 discarded", "b1 discarded"]
        pool.cancel(a1)  # running: its place comes back when its thread returns
        assert a.borrowed_tokens == 1
        hold.set()
        with trio.fail_after(WAIT):
            while a.borrowed_tokens:
                await trio.sleep(0.001)
        await trio.sleep(0.01)

    trio.run(scenario)
    assert ran == ["a1 stuck"]
    assert delivered == ["a2 discarded", "b1 discarded"]  # a1's result was dropped


def test_a_submitted_read_done_within_the_inline_wait_is_not_delivered() -> None:
    delivered: list[str] = []

    async def scenario() -> None:
        pool = ReadPool(slow_after=WAIT)
        slot = ReadSlot(1)
        (job,) = jobs_of(pool, slot, ["quick"], [], threading.Event(), delivered)
        assert pool.submit(job, wait=WAIT)
        assert job.outcome is not None and job.outcome.unwrap() == b"quick"
        assert slot.borrowed_tokens == 0
        await trio.sleep(0.05)

    trio.run(scenario)
    assert delivered == []


def test_deadlines_expire_in_order_and_cancelled_ones_never() -> None:
    from time import perf_counter

    fired: list[str] = []

    async def scenario() -> None:
        deadlines = Deadlines()
        now = perf_counter()
        deadlines.add(now + 0.3, lambda: fired.append("late"))
        dropped = deadlines.add(now + 0.1, lambda: fired.append("cancelled"))
        deadlines.add(now + 0.05, lambda: fired.append("early"))  # sooner than the sleep
        deadlines.cancel(dropped)
        assert len(deadlines) == 2
        await trio.sleep(0.15)
        assert fired == ["early"]
        await trio.sleep(0.3)
        assert fired == ["early", "late"] and len(deadlines) == 0

    trio.run(scenario)


@pytest.mark.usefixtures("hot_loop")
@pytest.mark.parametrize("how", ["inline", "delivered", "parked", "parked-nothing-to-read"])
async def test_a_paths_function_runs_once_per_decision(
        how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Policy code, run once per decision: also for one parked (max_inflight) after its
    paths function ran (paths to read, or none: an async handler waiting for a slot),
    which its task used to run again."""
    if how != "inline":
        no_inline_wait(monkeypatch)
    policy = PolicySet("p")
    asked: list[int] = []

    def paths(n: Notification) -> tuple[int, ...]:
        asked.append(n.id)
        return () if how == "parked-nothing-to-read" else (0,)

    if how == "parked-nothing-to-read":
        @policy.on("mkdir", paths=paths)
        async def length_later(n: Notification) -> object:
            await trio.sleep(0.002)  # holds the slot: the next calls are parked
            return returns(len(await n.read_path(0)))
    else:
        @policy.on("mkdir", paths=paths)
        def length(n: Notification) -> object:
            return returns(len(n.path(0)))

    if how.startswith("parked"):
        calls = ("mkdir-threads", "12", "/nonexistent/d")
        settings = SessionSettings(max_inflight=1)
    else:
        calls = ("mkdir-repeat", "/abc", "10")
        settings = SessionSettings()
    async with serve_target(policy, ["mkdir"], *calls, settings=settings) as served:
        out = await served.target.result()
    if how.startswith("parked"):
        assert [r["rc"] for r in out["results"]] == [len(f"/nonexistent/d{i}")
                                                     for i in range(12)]
        assert served.session.stats.notifications == 12
    else:
        assert out == {"results": [{"rc": 4, "errno": 0}] * 10}
    assert len(asked) == len(set(asked)) == served.session.stats.notifications, asked


@pytest.mark.usefixtures("hot_loop")
async def test_parked_decisions_read_their_declared_paths_in_their_task(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """max_inflight=1 and reads delivered later: while one decision waits for its path,
    the next calls are parked, then decided in a task of their own, which reads their
    paths (Session._read_declared) before the handler: the same answers."""
    no_inline_wait(monkeypatch)
    read_in_task: list[int] = []
    original = session_module.Session._read_declared

    async def counted(self: session_module.Session, n: Notification,
                      wanted: tuple[int, ...]) -> None:
        read_in_task.append(n.id)
        await original(self, n, wanted)

    monkeypatch.setattr(session_module.Session, "_read_declared", counted)
    policy, seen = counting_policy()
    async with serve_target(policy, ["mkdir"], "mkdir-threads", "12", "/nonexistent/d",
                            settings=SessionSettings(max_inflight=1)) as served:
        out = await served.target.result()
    assert [r["rc"] for r in out["results"]] == [len(f"/nonexistent/d{i}")
                                                 for i in range(12)]
    assert sorted(seen) == sorted(f"/nonexistent/d{i}".encode() for i in range(12))
    assert read_in_task  # some were parked (12 threads at once, one slot)
    assert served.session.inflight == 0


@pytest.mark.usefixtures("hot_loop")
@pytest.mark.parametrize("overrun", [False, True], ids=["waits", "overruns"])
async def test_a_handler_that_waits_after_its_paths_is_carried_under_its_deadline(
        overrun: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Resumed by the read pool's delivery, a coroutine handler that then waits for
    something is carried on by the delivery task (a new one takes the deliveries over):
    every call answered, the overrunning ones on_error at the deadline."""
    no_inline_wait(monkeypatch)
    spawned: list[str] = []
    spawn = trio.lowlevel.spawn_system_task

    def counted(*args: object, name: object = None, **kwargs: object) -> object:
        spawned.append(str(name))
        return spawn(*args, name=name, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(trio.lowlevel, "spawn_system_task", counted)
    policy = PolicySet("p")

    @policy.on("mkdir", paths=(0,))
    async def waits(n: Notification) -> object:
        path = n.path(0)
        await trio.sleep(5 if overrun else 0.01)
        return returns(len(path))

    settings = SessionSettings(deadline=0.5)
    async with serve_target(policy, ["mkdir"], "mkdir-threads", "8", "/nonexistent/d",
                            settings=settings) as served:
        out = await served.target.result()
        assert served.session.inflight == 0
    # The first delivery task, and one more per handler it carried on.
    assert spawned.count("seccomp-supervisor reads") >= 2, spawned
    if overrun:
        assert [r["errno"] for r in out["results"]] == [errno.EPERM] * 8
        assert served.metric("seccomp_supervisor_handler_errors_total",
                             policy="p", kind="deadline") == 8
    else:
        assert [r["rc"] for r in out["results"]] == [len(f"/nonexistent/d{i}")
                                                     for i in range(8)]


@pytest.mark.usefixtures("hot_loop")
@pytest.mark.parametrize("where", ["handler", "paths-function", "after-paths-delivered",
                                   "async-after-a-wait", "parked"])
async def test_policy_code_raising_notification_gone_for_a_waiting_call_gets_on_error(
        where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """NotificationGone from policy code (path_guard raises it after its own ID_VALID
    check; a buggy policy can raise it for a call that still waits) was taken for the
    kernel's word: no answer, and nothing left to give one, so the caller hung (in a
    task, past its deadline) until it was killed. It gets on_error if the call waits."""
    from supervisor.errors import NotificationGone

    if where == "after-paths-delivered":
        no_inline_wait(monkeypatch)
    policy = PolicySet("p")

    def gone(n: Notification) -> tuple[int, ...]:
        raise NotificationGone("policy")

    if where == "paths-function":
        @policy.on("mkdir", paths=gone)
        def never(n: Notification) -> object:
            return deny(errno.EACCES)
    elif where in ("handler", "after-paths-delivered"):
        @policy.on("mkdir", paths=(0,) if where == "after-paths-delivered" else None)
        def raises(n: Notification) -> object:
            gone(n)
            return deny(errno.EACCES)
    else:
        @policy.on("mkdir")
        async def raises_later(n: Notification) -> object:
            await trio.sleep(0.01)
            gone(n)
            return deny(errno.EACCES)

    calls = ("mkdir-threads", "4", "/x/d") if where == "parked" else ("mkdir", "/x/y")
    settings = SessionSettings(deadline=30, max_inflight=1)
    async with serve_target(policy, ["mkdir"], *calls, settings=settings) as served:
        with trio.fail_after(5):  # (the deadline is 30 s: a hang is not its answer)
            out = await served.target.result()
    if where == "parked":
        assert [r["errno"] for r in out["results"]] == [errno.EPERM] * 4
    else:
        assert out == {"rc": -1, "errno": errno.EPERM}  # on_error
    assert served.session.stats.gone == 0


@pytest.mark.usefixtures("hot_loop")
async def test_stop_reading_waits_for_a_handler_the_delivery_task_carries(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A takeover's stop_reading(keep_fd=True) while a handler resumed by the read pool's
    delivery waits after its paths (carried by that task, outside the session's nursery):
    run() returns only once that call has its own answer, and the fd stays open."""
    no_inline_wait(monkeypatch)
    policy = PolicySet("p")
    resumed = trio.Event()

    @policy.on("mkdir", paths=(0,))
    async def waits(n: Notification) -> object:
        path = n.path(0)
        resumed.set()
        await trio.sleep(0.3)
        return returns(len(path))

    async with serve_target(policy, ["mkdir"], "mkdir", "/x/abc") as served:
        session = served.session
        with trio.fail_after(WAIT):
            await resumed.wait()
        assert not session._prefetching and session.inflight == 1
        session.stop_reading(keep_fd=True)
        await trio.sleep(0.1)
        assert not served.done.is_set()  # its answer is still to come
        with trio.fail_after(WAIT):
            await served.done.wait()
        assert session.inflight == 0 and session._carried == 0
        assert not session.notify.closed
        out = await served.target.result()
        session.notify.close()
    assert out == {"rc": 6, "errno": 0}


def test_the_deadline_heap_does_not_keep_what_was_answered() -> None:
    """Every prefetching decision puts its deadline in the daemon's one heap; most are
    answered (cancelled) long before it. Cancelled entries are left in place, so a flood
    must not grow the heap with them: it stays within twice the live ones (plus a few)."""
    from time import perf_counter

    async def scenario() -> None:
        deadlines = Deadlines()
        far = perf_counter() + 3600
        kept = [deadlines.add(far, lambda: None) for _ in range(10)]
        for _ in range(100):
            for entry in [deadlines.add(far + 1, lambda: None) for _ in range(1000)]:
                deadlines.cancel(entry)
            assert len(deadlines._heap) <= 2 * len(deadlines) + 64
        assert len(deadlines) == len(kept)
        for entry in kept:
            deadlines.cancel(entry)
        assert len(deadlines) == 0 and len(deadlines._heap) <= 64

    trio.run(scenario)


def python_resumes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that gets an entry for every decision Python goes on with after its paths
    were read (``_decide_received(..., resumed=True)``)."""
    resumed: list[int] = []
    original = session_module.Session._decide_received

    def counted(self: Session, *args: object, **kwargs: object) -> object:
        if kwargs.get("resumed"):
            resumed.append(1)
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(session_module.Session, "_decide_received", counted)
    return resumed


@pytest.mark.usefixtures("patient")  # (it counts the reads)
@pytest.mark.parametrize("read", ["inline", "delivered"])
@pytest.mark.parametrize("first", ["none", "allow", "deny", "waits-deny", "raises"])
@pytest.mark.parametrize("second", ["sync", "paths"])
async def test_the_chain_goes_on_after_the_link_whose_paths_were_read(
        read: str, first: str, second: str, hot_loop: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the paths a link declared are read (within the inline wait, or delivered
    later), its handler and the later links of the chain run as at any other point: an
    allow does not end the chain, the first refusal wins, a handler that waits is carried
    on, an error is the call's on_error, and a later link that declared the same path
    gets the bytes read once. The compiled loop runs it (``resume``) without going back
    to Python for its common case: a refusal, or None and then a later link's answer."""
    if read == "delivered":
        no_inline_wait(monkeypatch)
    resumed_in_python = python_resumes(monkeypatch)
    head, tail = PolicySet("head"), PolicySet("tail")

    @head.on("mkdir", paths=(0,))
    async def first_handler(n: Notification) -> object:
        assert n.path(0) == b"/abc/de"
        if first == "waits-deny":
            await trio.lowlevel.checkpoint()
        if first == "raises":
            raise RuntimeError("a bug in the policy")
        return {"none": None, "allow": allow(unchecked=True)}.get(first, deny(errno.EPERM))

    if second == "sync":
        @tail.on("mkdir")
        def second_handler(n: Notification) -> object:
            return deny(errno.EACCES)
    else:
        @tail.on("mkdir", paths=(0,))
        def second_handler(n: Notification) -> object:
            return returns(len(n.path(0)))

    settings = SessionSettings(on_error=deny(errno.EIO))
    async with serve_target([head, tail], ["mkdir"], "mkdir-repeat", "/abc/de", "5",
                            settings=settings) as served:
        out = await served.target.result()
        session = served.session
        assert session.inflight == 0 and not session._prefetching and not session._waiting
    if first in ("deny", "waits-deny"):
        expected, policy = {"rc": -1, "errno": errno.EPERM}, "head"
    elif first == "raises":
        expected, policy = {"rc": -1, "errno": errno.EIO}, "head"
    elif second == "sync":
        expected, policy = {"rc": -1, "errno": errno.EACCES}, "tail"
    else:
        expected, policy = {"rc": 7, "errno": 0}, "tail"
    assert out == {"results": [expected] * 5}
    decision = "deny" if expected["rc"] == -1 else "returns"
    assert served.metric("seccomp_supervisor_notifications_total", syscall="mkdir",
                         policy=policy, decision=decision) == 5
    assert session.memory.reads == 5  # the later link's path was not read again
    if hot_loop == "c" and first in ("none", "deny"):
        assert not resumed_in_python
    elif hot_loop == "python" and read == "delivered":
        assert len(resumed_in_python) >= 5


def test_the_compiled_resume_refuses_what_is_not_a_decision_it_can_go_on_with() -> None:
    """``_hotloop.resume`` takes only the session's own Notification and a link index in
    its chain: anything else is a bug of the caller, refused before anything runs."""
    from supervisor import accel
    from supervisor.policy import Container, make_notification

    assert accel.HOTLOOP is not None, accel.WHY
    resume = accel.HOTLOOP.resume
    n = make_notification(1, 1, 83, "x86_64", "mkdir", (0,) * 6, Container("c"), None)
    with pytest.raises(TypeError):
        resume(object(), object(), (), 0, 0.0, None)
    with pytest.raises(TypeError):
        resume(object(), n, [], 0, 0.0, None)
    with pytest.raises(IndexError):
        resume(object(), n, (), 0, 0.0, None)
    with pytest.raises(TypeError):
        resume(object(), n, (), 0, 0.0)  # type: ignore[call-arg]


@pytest.mark.usefixtures("patient")
@pytest.mark.parametrize("read", ["inline", "delivered"])
@pytest.mark.parametrize("then", ["none", "deny"])
async def test_an_allow_before_the_link_whose_paths_were_read_goes_on_with_it(
        read: str, then: str, hot_loop: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An earlier link's allow stays the answer when the links after it pass, and a
    later refusal still wins over it, whether the decision went on after its read in
    Python or in the compiled loop (which takes the allow along: no hand-over back to
    Python for it)."""
    if read == "delivered":
        no_inline_wait(monkeypatch)
    resumed_in_python = python_resumes(monkeypatch)
    head, tail = PolicySet("head"), PolicySet("tail")

    @head.on("mkdir")
    def lets_it(n: Notification) -> object:
        return allow(reason="head has nothing against it")

    @tail.on("mkdir", paths=(0,))
    def reads(n: Notification) -> object:
        assert n.path(0) == b"/nonexistent/d"
        return deny(errno.EPERM) if then == "deny" else None

    async with serve_target([head, tail], ["mkdir"], "mkdir-repeat", "/nonexistent/d",
                            "5") as served:
        out = await served.target.result()
        session = served.session
        assert session.inflight == 0 and not session._prefetching
    if then == "deny":
        assert out == {"results": [{"rc": -1, "errno": errno.EPERM}] * 5}
        policy, decision = "tail", "deny"
    else:  # allowed: the kernel made the call (its parent does not exist)
        assert out == {"results": [{"rc": -1, "errno": errno.ENOENT}] * 5}
        policy, decision = "head", "allow"
    assert served.metric("seccomp_supervisor_notifications_total", syscall="mkdir",
                         policy=policy, decision=decision) == 5
    assert session.memory.reads == 5
    if hot_loop == "c":
        assert not resumed_in_python


@pytest.mark.parametrize(("fds", "expected"), [
    (0, 0.0),
    (1, memory_module.INLINE_WAIT),
    (2, memory_module.INLINE_WAIT_SHARED),
    (memory_module.INLINE_SHARED_FDS, memory_module.INLINE_WAIT_SHARED),
    (memory_module.INLINE_SHARED_FDS + 1, 0.0),
])
def test_how_long_the_loop_may_wait_for_a_read_depends_on_the_fds_it_serves(
        fds: int, expected: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """One fd: nothing else waits for the loop (INLINE_WAIT). A few: the others'
    notifications wait meanwhile, so only briefly (INLINE_WAIT_SHARED), and only if the
    hand-over spins. More: never (reads go in batches). INLINE_BUDGET per turn in all
    cases (ReadPool.submit)."""
    monkeypatch.setattr(memory_module, "poller_turn", lambda: (7, fds))
    memory = TargetMemory.__new__(TargetMemory)
    memory._inline_wait = memory_module.INLINE_WAIT
    pool = ReadPool()
    assert accel.HOTLOOP is not None and pool.spins  # (the compiled module spins)
    assert memory._inline(pool) == (7, expected)
    pool.spins = False  # it sleeps: with 2 fds or more, reads are handed over
    assert memory._inline(pool) == (7, expected if fds < 2 else 0.0)
    monkeypatch.setenv(memory_module.NO_SPIN_ENV, "1")
    assert not ReadPool().spins
    pool.spins = True
    memory._inline_wait = memory_module.INLINE_WAIT_SHARED / 2  # a session's own is shorter
    _turn, wait = memory._inline(pool)
    assert wait == (0.0 if expected == 0.0 else memory_module.INLINE_WAIT_SHARED / 2)


async def test_with_a_neighbour_a_read_is_waited_for_inline_only_briefly(
        hot_loop: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two containers served: the loop may still wait for one's read inline (no hand-over
    through the pool's task: 2x the guarded calls/s at 2 busy targets), but only
    INLINE_WAIT_SHARED at a time, since the other's notifications wait meanwhile; and
    only when the hand-over spins (not in the pure-Python loop)."""
    asked: list[float] = []
    submit = ReadPool.submit

    def spied(pool: ReadPool, job: _Job, wait: float = 0.0, turn: int = -1) -> bool:
        asked.append(wait)
        return submit(pool, job, wait, turn)

    monkeypatch.setattr(ReadPool, "submit", spied)
    policy = PolicySet("p")

    @policy.on("mkdir", paths=(0,))
    def guard(n: Notification) -> object:
        return deny(errno.EACCES) if n.path(0).startswith(b"/guarded/") else None

    async with serve_target(policy, ["mkdir"], "sleep", "30"):
        with trio.fail_after(10):
            while len(current_poller()) < 1:  # the idle one is served
                await trio.sleep(0.01)
        async with serve_target(policy, ["mkdir"], "mkdir", "/guarded/d") as busy:
            with trio.fail_after(10):
                out = await busy.target.result()
    assert out == {"rc": -1, "errno": errno.EACCES}
    assert asked == [memory_module.INLINE_WAIT_SHARED if hot_loop == "c" else 0.0]
