"""A handler that ignores cancellation still gets its call answered at the deadline.

The deadline (``[defaults] deadline``) is the most a handler can hold a target: at the
deadline the call gets ``on_error`` (``handler_errors{kind="deadline"}``). Cancelling
the handler is not enough to give that answer: a handler that does not let itself be
cancelled (blocking work in ``trio.to_thread.run_sync``, which trio does not abandon
on cancellation, or a shielded scope) would hold the target until it returned, and its
late decision would then be the answer. Here the deadline answers the call itself, in
every place a decision can wait: started inline and suspended (carried by a poller
task), parked (more calls than ``max_inflight``), waiting for its declared paths first,
and recovered from a crashed process's journal. The handler runs on until it returns;
its result is dropped (not answered, not counted, not audited); the session still ends.

Real kernel: targets under NOTIFY filters (tests/target.py), both hot loops.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Sequence

import pytest
import trio
from prometheus_client import CollectorRegistry

from supervisor import session as session_module
from supervisor.audit import Recorder
from supervisor.decide import Chain, Outcome
from supervisor.memory import TargetMemory
from supervisor.metrics import Metrics
from supervisor.policy import Container, Notification, PolicySet, allow, deny
from supervisor.session import SessionSettings

from .conftest import Served, serve_target

WAIT = 10.0  # a hang guard
BLOCK = 5.0  # the most a blocking handler blocks if the test never releases it
DEADLINE = 0.3
IN_TIME = 2.0  # a generous bound for an answer due at DEADLINE (the handler blocks on)
SETTINGS = SessionSettings(deadline=DEADLINE, on_error=deny(errno.EAGAIN))
HOW = ["thread", "shield"]


class Blocker:
    """What a handler waits for, ignoring cancellation: a thread trio does not abandon
    (``trio.to_thread.run_sync``'s default) or a shielded scope. :meth:`release` lets
    every waiter go on; ``running`` counts the handlers still blocked."""

    def __init__(self, how: str) -> None:
        self.how = how
        self.gate = threading.Event()
        self.released = trio.Event()
        self.running = 0
        self.returned = 0

    async def block(self) -> None:
        self.running += 1
        try:
            if self.how == "thread":
                await trio.to_thread.run_sync(self.gate.wait, BLOCK)
            else:
                with trio.CancelScope(shield=True), trio.move_on_after(BLOCK):
                    await self.released.wait()
        finally:
            self.running -= 1
        self.returned += 1

    def release(self) -> None:
        self.gate.set()
        self.released.set()

    async def wait_returned(self, count: int) -> None:
        with trio.fail_after(WAIT):
            while self.returned < count or self.running:
                await trio.sleep(0.01)


class Answers(Recorder):
    """Keeps every answer recorded (what goes to the audit trail and the counters)."""

    def __init__(self, metrics: Metrics) -> None:
        super().__init__(metrics, audit="none")
        self.answers: list[tuple[int, str, str | None]] = []

    def decided(self, container: Container, notif_id: int, tid: int, syscall: str,
                args: Sequence[int], outcome: Outcome, latency: float, *,
                shadow: bool = False) -> int:
        self.answers.append((notif_id, outcome.decision.kind, outcome.error))
        return super().decided(container, notif_id, tid, syscall, args, outcome, latency,
                               shadow=shadow)


def late_allow_policy(blocker: Blocker, syscall: str = "getppid", *,
                      obeys_first: bool = False, paths: tuple[int, ...] | None = None
                      ) -> PolicySet:
    """An async handler for ``syscall`` that blocks (ignoring cancellation), then
    allows: an allow after the deadline. ``obeys_first``: its first call waits in a
    plain (cancellable) sleep instead."""
    policy = PolicySet("p")
    calls = []

    async def slow(n: Notification) -> object:
        calls.append(n.id)
        if obeys_first and len(calls) == 1:
            await trio.sleep(WAIT)
        else:
            await blocker.block()
        return allow()

    policy.on(syscall, paths=paths)(slow)
    return policy


def recorder_of(served: Served) -> Answers:
    recorder = served.session.recorder
    assert isinstance(recorder, Answers)
    return recorder


async def check_answered_at_the_deadline(served: Served, blocker: Blocker, calls: int,
                                         results: list[dict[str, float]]) -> None:
    """Every call got on_error in time while handlers still block; once they return,
    nothing more is answered or counted, and the session's slots are back."""
    assert [(r["rc"], r["errno"]) for r in results] == [(-1, errno.EAGAIN)] * calls
    assert max(r["seconds"] for r in results) < IN_TIME, results
    assert blocker.running  # the answers were not the handlers'
    blocker.release()
    await blocker.wait_returned(blocker.returned + 1)
    with trio.fail_after(WAIT):
        while served.session.inflight:
            await trio.sleep(0.01)
    await trio.sleep(0.05)  # anything late would be recorded by now
    answers = recorder_of(served).answers
    assert [(kind, error) for _id, kind, error in answers] == [("deny", "deadline")] * calls
    assert len({notif_id for notif_id, _kind, _error in answers}) == calls
    assert served.session.stats.decisions == {"deny": calls}
    assert served.metric("seccomp_supervisor_handler_errors_total",
                         policy="p", kind="deadline") == calls
    assert served.metric("seccomp_supervisor_decisions_total", syscall="getppid",
                         policy="p", decision="allow") == 0
    assert not served.session._waiting


@pytest.fixture
def answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """serve_target's sessions record into an :class:`Answers`."""
    from . import conftest

    monkeypatch.setattr(conftest, "Recorder",
                        lambda metrics, audit: Answers(metrics))


@pytest.mark.usefixtures("hot_loop", "answers")
@pytest.mark.parametrize("how", HOW)
async def test_a_suspended_decision_is_answered_at_the_deadline(
        how: str, caplog: pytest.LogCaptureFixture) -> None:
    """Started inline, the handler suspends: the poller task carries it on."""
    caplog.set_level(logging.INFO, logger="supervisor.session")
    blocker = Blocker(how)
    async with serve_target(late_allow_policy(blocker), ["getppid"],
                            "in-flight", "0", "getppid", settings=SETTINGS) as served:
        with trio.fail_after(WAIT):
            out = await served.target.result()
        await check_answered_at_the_deadline(served, blocker, 1, out["results"])
    messages = [r.getMessage() for r in caplog.records]
    assert sum("missed its 0.3s deadline" in m for m in messages) == 1, messages
    assert sum("its result is dropped" in m for m in messages) == 1, messages


@pytest.mark.usefixtures("hot_loop", "answers")
@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("slot_frees", [True, False], ids=["slot-frees", "slot-held"])
async def test_a_parked_call_is_answered_at_its_deadline(how: str, slot_frees: bool) -> None:
    """One slot, so the second call is parked. slot-frees: the first call's handler
    obeys its cancellation at its deadline, the parked call starts and its own handler
    blocks. slot-held: the first handler blocks past its deadline, the parked call never
    gets a slot, and is answered at its own deadline all the same."""
    blocker = Blocker(how)
    settings = SessionSettings(deadline=DEADLINE, on_error=deny(errno.EAGAIN),
                               max_inflight=1)
    async with serve_target(late_allow_policy(blocker, obeys_first=slot_frees),
                            ["getppid"], "in-flight", "0.1", "getppid", "getppid",
                            settings=settings) as served:
        with trio.fail_after(WAIT):
            out = await served.target.result()
        await check_answered_at_the_deadline(served, blocker, 2, out["results"])


@pytest.mark.usefixtures("hot_loop", "answers")
@pytest.mark.parametrize("how", HOW)
async def test_a_decision_that_waited_for_its_paths_is_answered_at_the_deadline(
        how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The link declared its path: read by the pool's task (no inline wait), the
    decision resumes there and its handler blocks; that task carries it on."""
    monkeypatch.setattr(session_module, "TargetMemory",
                        lambda notify: TargetMemory(notify, inline_wait=0))
    blocker = Blocker(how)
    policy = late_allow_policy(blocker, "mkdir", paths=(0,))
    async with serve_target(policy, ["mkdir"], "mkdir", "/nonexistent/d",
                            settings=SETTINGS) as served:
        start = trio.current_time()
        with trio.fail_after(WAIT):
            out = await served.target.result()
        elapsed = trio.current_time() - start
        assert (out["rc"], out["errno"]) == (-1, errno.EAGAIN)
        assert elapsed < IN_TIME
        assert blocker.running
        blocker.release()
        await blocker.wait_returned(1)
        with trio.fail_after(WAIT):
            while served.session.inflight:
                await trio.sleep(0.01)
        await trio.sleep(0.05)
        answers = recorder_of(served).answers
        assert [(kind, error) for _id, kind, error in answers] == [("deny", "deadline")]
        assert served.metric("seccomp_supervisor_handler_errors_total",
                             policy="p", kind="deadline") == 1


@pytest.mark.usefixtures("hot_loop", "answers")
@pytest.mark.parametrize("where", ["suspended", "parked"])
async def test_stop_reading_ends_the_session_while_such_a_handler_runs(
        where: str) -> None:
    """The session's orderly end waits for the answers, not for handlers that ignore
    their cancellation: run() returns while the handler still blocks."""
    blocker = Blocker("thread")
    settings = SessionSettings(deadline=DEADLINE, on_error=deny(errno.EAGAIN),
                               max_inflight=1)
    what = ["getppid"] if where == "suspended" else ["getppid", "getppid"]
    async with serve_target(late_allow_policy(blocker, obeys_first=where == "parked"),
                            ["getppid"], "in-flight", "0.1", *what,
                            settings=settings) as served:
        with trio.fail_after(WAIT):
            out = await served.target.result()
        assert [(r["rc"], r["errno"]) for r in out["results"]] == \
            [(-1, errno.EAGAIN)] * len(what)
        assert blocker.running
        served.session.stop_reading()
        with trio.fail_after(IN_TIME):
            await served.done.wait()
        assert blocker.running  # it ended with the handler still blocked
        assert served.session.notify.closed
        blocker.release()
        await blocker.wait_returned(1)
        assert served.metric("seccomp_supervisor_handler_errors_total",
                             policy="p", kind="deadline") == len(what)
        assert len(recorder_of(served).answers) == len(what)


@pytest.mark.usefixtures("hot_loop")
@pytest.mark.parametrize("how", HOW)
async def test_a_recovered_call_is_answered_at_the_deadline(how: str) -> None:
    """A call a crashed process received (taken back from its in-flight journal) is
    decided again by the new session, in a task of its own; its handler blocks:
    on_error at the deadline, and stop_reading ends the session while it runs."""
    from .soak import NR_GETSID
    from .test_crash import crashed_daemon

    blocker = Blocker(how)
    policy = late_allow_policy(blocker, "getsid")
    async with crashed_daemon(NR_GETSID, 12) as crashed:
        registry = CollectorRegistry()
        recorder = Answers(Metrics(registry))
        session = crashed.serve_again(Chain([("p", policy)]), SETTINGS, recorder)
        notify = session.notify
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run)
            start = trio.current_time()
            result = await crashed.result()
            elapsed = trio.current_time() - start
            assert (result["rc"], result["errno"]) == (-1, errno.EAGAIN), result
            assert elapsed < IN_TIME
            assert blocker.running
            session.stop_reading()
            with trio.fail_after(IN_TIME):  # the session ends with the handler running
                while not notify.closed:
                    await trio.sleep(0.01)
            assert blocker.running
            blocker.release()
            await blocker.wait_returned(1)
        assert [(kind, error) for _id, kind, error in recorder.answers] == \
            [("deny", "deadline")]
        assert registry.get_sample_value("seccomp_supervisor_handler_errors_total",
                                         {"policy": "p", "kind": "deadline"}) == 1


@pytest.mark.usefixtures("hot_loop")
async def test_a_cancelled_session_ends_while_such_a_handler_runs() -> None:
    """Cancelled before the deadline while the decision of a recovered call (a task of
    its own, not carried by a poller) blocks in a thread: the session answers the call
    ``on_error`` (kind ``ended``) and ends at once; the thread runs on."""
    from .soak import NR_GETSID
    from .test_crash import crashed_daemon

    blocker = Blocker("thread")
    policy = late_allow_policy(blocker, "getsid")
    try:
        async with crashed_daemon(NR_GETSID, 12) as crashed:
            registry = CollectorRegistry()
            recorder = Answers(Metrics(registry))
            session = crashed.serve_again(
                Chain([("p", policy)]),
                SessionSettings(deadline=30, on_error=deny(errno.EAGAIN)), recorder)
            notify = session.notify
            with trio.fail_after(IN_TIME):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(session.run)
                    while not blocker.running:
                        await trio.sleep(0.01)
                    nursery.cancel_scope.cancel()
            assert notify.closed
            assert blocker.running  # the session ended without waiting for it
            result = await crashed.result()
            assert (result["rc"], result["errno"]) == (-1, errno.EAGAIN), result
            blocker.release()
            await blocker.wait_returned(1)
            assert [(kind, error) for _id, kind, error in recorder.answers] == \
                [("deny", "ended")]
            assert session.inflight == 0
    finally:
        blocker.release()
