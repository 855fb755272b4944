"""A session that ends while its targets live answers every notification it received.

Every way a session can end but POLLHUP leaves the targets alive, and their listener may
be held by another process too (whoever handed it over and kept a copy, the fd store, the
fd keeper): closing our fd then answers nothing, the kernel only answers ENOSYS at the
last close. So a call whose decision was under way when the session ended must get an
answer from the session itself, never hang until the other holder exits:

* its own decision, within its deadline, when the session ends in good order:
  ``stop_reading`` (a stop, a takeover) and ``read_elsewhere`` (another process reads
  the listener: its calls are not all ours to answer, but the ones received are);
* ``on_error`` at once when it ends at once: a daemon bug (the session's state is
  unknown and the failure may repeat for every decision) or a cancellation from outside
  (whoever cancels wants the session gone now).

Real kernel: targets under NOTIFY filters (tests/target.py ``in-flight``), both hot
loops; the test keeps a copy of each listener, as a runtime that kept one would.
"""

from __future__ import annotations

import errno
import functools
import os
import select
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client import CollectorRegistry

from supervisor.audit import Recorder
from supervisor.decide import Chain, Outcome
from supervisor.metrics import Metrics
from supervisor.notifyfd import NotifyFd
from supervisor.policy import Container, Notification, PolicySet, returns
from supervisor.session import Session, SessionSettings
from supervisor.systemd import Notifier

from .conftest import Target, reap_target, start_target
from .daemon_harness import running_daemon

WAIT = 10.0  # a hang guard: what is checked takes well under a second
PAUSE = "0.2"  # between the target's calls: each is received before the next starts


class DaemonBug(Exception):
    """What the faulty recorder raises: a bug in the daemon, not in a policy."""


class FaultyRecorder(Recorder):
    """Raises after recording a decision for a call in ``fail_on``: the call has its
    answer, and the hot loop (or the task carrying the decision) raises."""

    fail_on: frozenset[str] = frozenset()

    def decided(self, container: Container, notif_id: int, tid: int, syscall: str,
                args: object, outcome: Outcome, latency: float, *,
                shadow: bool = False) -> int:
        bucket = super().decided(container, notif_id, tid, syscall, args,  # type: ignore[arg-type]
                                 outcome, latency, shadow=shadow)
        if syscall in self.fail_on:
            raise DaemonBug(f"recording {syscall} failed")
        return bucket


@dataclass
class Serving:
    target: Target
    session: Session
    registry: CollectorRegistry
    scope: trio.CancelScope
    done: trio.Event
    release: trio.Event  # lets the getppid handlers return
    failed: list[BaseException] = field(default_factory=list)

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    async def results(self) -> list[dict[str, float]]:
        """The target's answers, each with how long it waited (a hang fails here)."""
        out = await self.target.result()
        results = out["results"]
        assert isinstance(results, list)
        return results


def in_flight_policy(release: trio.Event) -> PolicySet:
    """getppid: an async handler that returns 7 once ``release`` is set; mkdir: reads
    its declared path first (never readable on an unserved userfaultfd page);
    sched_yield: returns 0 at once."""
    policy = PolicySet("p")

    @policy.on("getppid")
    async def waits(n: Notification) -> object:
        await release.wait()
        return returns(7)

    @policy.on("mkdir", paths=(0,))
    def length(n: Notification) -> object:
        return returns(len(n.path(0)))

    @policy.on("sched_yield")
    def at_once(n: Notification) -> object:
        return returns(0)

    return policy


@asynccontextmanager
async def serving(*what: str, settings: SessionSettings,
                  fail_on: frozenset[str] = frozenset()) -> AsyncIterator[Serving]:
    """Run ``target.py in-flight PAUSE WHAT...`` served by a session of
    :func:`in_flight_policy`, with a copy of its listener kept open here until the end:
    the session's close answers nothing. What run() raises is kept in ``failed`` (the
    daemon logs it and serves on)."""
    release = trio.Event()
    registry = CollectorRegistry()
    target = await trio.to_thread.run_sync(
        lambda: start_target(["getppid", "mkdir", "sched_yield"], "in-flight", PAUSE, *what))
    listener = target.child.take_listener()
    copy = os.dup(listener)  # shared: the kernel answers nothing at the session's close
    recorder = FaultyRecorder(Metrics(registry), audit="none")
    recorder.fail_on = fail_on
    session = Session(NotifyFd(listener), Container(id="test", pid=target.pid),
                      Chain([("p", in_flight_policy(release))]), settings, recorder)
    done = trio.Event()
    scope = trio.CancelScope()
    serving = Serving(target, session, registry, scope, done, release)

    async def run() -> None:
        try:
            with scope:
                await session.run()
        except Exception as exc:
            serving.failed.append(exc)
        done.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            try:
                yield serving
            finally:
                scope.cancel()
    finally:
        await reap_target(target)
        os.close(copy)


async def all_in_flight(session: Session, *, parked: bool) -> None:
    """Until the target's calls all wait for their decisions: the mkdir for its path, a
    getppid in its handler and, with ``parked``, one more getppid for a slot."""
    with trio.fail_after(WAIT):
        while not (session._prefetching and session._carried >= 2
                   and (session._parked is not None) == parked):
            await trio.sleep(0.01)


@contextmanager
def alarm_after(seconds: float) -> Iterator[None]:
    """A safety net around a RECV that blocks: SIGALRM interrupts it (EINTR)."""
    old = signal.signal(signal.SIGALRM, lambda *_: None)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def read_elsewhere(session: Session) -> None:
    """What the session sees when another process took the notification its POLLIN
    announced: a RECV that blocks (cut short by the RECV watchdog)."""
    with alarm_after(3):
        assert session.on_ready(select.POLLIN) is None
    assert session.read_elsewhere


@pytest.mark.usefixtures("hot_loop")
@pytest.mark.parametrize("reason", ["read_elsewhere", "stop_reading", "takeover"])
async def test_an_orderly_end_lets_every_received_call_have_its_decision(reason: str
                                                                          ) -> None:
    """The session stops receiving; the calls it received get their own decisions, each
    within its deadline: the two getppid (one parked for a slot) their handler's 7, the
    mkdir whose path is never readable ``on_error`` at its deadline. Before, after
    read_elsewhere the three hung until the other holder of the listener closed it
    (stop_reading, with or without keep_fd for a takeover, already waited)."""
    deadline = 1.5
    settings = SessionSettings(deadline=deadline, max_inflight=2)
    async with serving("uffd", "getppid", "getppid", settings=settings) as served:
        session = served.session
        await all_in_flight(session, parked=True)
        if reason == "read_elsewhere":
            read_elsewhere(session)
        else:
            session.stop_reading(keep_fd=reason == "takeover")
        await trio.sleep(0.1)
        assert not served.done.is_set()  # the received calls wait for their answers
        served.release.set()
        with trio.fail_after(WAIT):
            results = await served.results()
            await served.done.wait()
        assert not served.failed
    mkdir, first, parked = results
    assert (first["rc"], parked["rc"]) == (7, 7), results
    assert mkdir["errno"] == errno.EPERM, results  # on_error, at its deadline
    assert deadline - 0.3 < mkdir["seconds"] < deadline + 2, results
    assert session.notify.closed != (reason == "takeover")  # kept for the new daemon
    session.notify.close()
    assert session.stats.answered == session.stats.notifications == 3
    assert session.inflight == 0 and session._carried == 0


@pytest.mark.usefixtures("hot_loop")
@pytest.mark.parametrize("where", ["hot_loop", "carried"])
async def test_a_daemon_bug_answers_every_received_call_on_error_at_once(where: str
                                                                         ) -> None:
    """A daemon bug ends the session (run() raises): its state is unknown, so each call
    it received and has not answered gets ``on_error`` at once, long before its
    30 s deadline. The bug is raised by the hot loop itself (recording sched_yield's
    answer, after sending it), or by the task carrying a getppid's decision (after its
    answer too), with the other getppid parked. Before, they hung."""
    settings = SessionSettings(deadline=30, max_inflight=2 if where == "carried" else 3)
    if where == "hot_loop":
        what, fail_on = ("uffd", "getppid", "yield"), frozenset({"sched_yield"})
    else:
        what, fail_on = ("uffd", "getppid", "getppid"), frozenset({"getppid"})
    async with serving(*what, settings=settings, fail_on=fail_on) as served:
        session = served.session
        if where == "carried":
            await all_in_flight(session, parked=True)
            served.release.set()  # the first getppid is answered, then its task raises
        with trio.fail_after(WAIT):
            results = await served.results()
            await served.done.wait()
    assert len(served.failed) == 1 and "DaemonBug" in repr(served.failed[0])
    mkdir, first, last = results
    assert mkdir["errno"] == errno.EPERM, results
    if where == "hot_loop":
        assert first["errno"] == errno.EPERM and last["rc"] == 0, results
    else:
        assert first["rc"] == 7 and last["errno"] == errno.EPERM, results
    assert max(r["seconds"] for r in results) < WAIT, results
    assert served.metric("seccomp_supervisor_handler_errors_total", policy="p",
                         kind="ended") == 2
    assert session.notify.closed


@pytest.mark.usefixtures("hot_loop")
async def test_a_session_cancelled_from_outside_answers_on_error_at_once() -> None:
    """Cancelled from outside (the daemon stopping at once): each call the session
    received gets ``on_error`` before run() returns, whatever its decision was waiting
    for (its path, its handler, a slot). Before, the three hung."""
    settings = SessionSettings(deadline=30, max_inflight=2)
    async with serving("uffd", "getppid", "getppid", settings=settings) as served:
        session = served.session
        await all_in_flight(session, parked=True)
        started = time.monotonic()
        served.scope.cancel()
        with trio.fail_after(WAIT):
            await served.done.wait()
            results = await served.results()
        assert time.monotonic() - started < WAIT
        assert not served.failed
    assert [r["errno"] for r in results] == [errno.EPERM] * 3, results
    assert served.metric("seccomp_supervisor_handler_errors_total", policy="p",
                         kind="ended") == 3
    assert session.notify.closed


@pytest.mark.usefixtures("hot_loop")
async def test_a_recovered_call_under_way_is_answered_when_the_session_is_cancelled(
        ) -> None:
    """A call a crashed process received (taken back from its in-flight journal) is
    decided again by a task of the new session; cancelled meanwhile, the session answers
    it ``on_error`` before it closes its copy of the listener (the test holds another).
    Before, the task was cancelled with no answer and the call hung."""
    from .soak import NR_GETSID
    from .test_crash import crashed_daemon

    policy = PolicySet("p")
    release = trio.Event()

    @policy.on("getsid")
    async def waits(n: Notification) -> object:
        await release.wait()  # never set
        return returns(1)

    async with crashed_daemon(NR_GETSID, 12) as crashed:
        registry = CollectorRegistry()
        session = crashed.serve_again(Chain([("p", policy)]), SessionSettings(deadline=30),
                                      Recorder(Metrics(registry), audit="none"))
        notify = session.notify
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run)
            with trio.fail_after(WAIT):
                while session.stats.recovered != 1 or session.inflight != 1:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert notify.closed
        result = await crashed.result()
        assert (result["rc"], result["errno"]) == (-1, errno.EPERM), result
        assert registry.get_sample_value("seccomp_supervisor_handler_errors_total",
                                         {"policy": "p", "kind": "ended"}) == 1


@pytest.mark.usefixtures("hot_loop")
async def test_an_orderly_end_waits_no_longer_than_the_deadline() -> None:
    """A handler that shields itself from its deadline does not hold the session's end
    (nor a daemon's stop) past the deadline: its call gets ``on_error`` then. Before,
    run() after stop_reading waited for it for as long as it ran."""
    policy = PolicySet("p")
    release = trio.Event()

    @policy.on("getppid")
    async def ignores_its_deadline(n: Notification) -> object:
        with trio.CancelScope(shield=True):
            await release.wait()
        return returns(7)

    registry = CollectorRegistry()
    target = await trio.to_thread.run_sync(
        lambda: start_target(["getppid"], "in-flight", "0", "getppid"))
    listener = target.child.take_listener()
    copy = os.dup(listener)
    session = Session(NotifyFd(listener), Container(id="t", pid=target.pid),
                      Chain([("p", policy)]), SessionSettings(deadline=0.5),
                      Recorder(Metrics(registry), audit="none"))
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run)
            with trio.fail_after(WAIT):
                while session.inflight != 1:
                    await trio.sleep(0.01)
            session.stop_reading()
            started = time.monotonic()
            results: object = None
            with trio.move_on_after(WAIT):
                results = (await target.result())["results"]
            release.set()  # (the handler's task ends only then)
        assert time.monotonic() - started < WAIT
        assert isinstance(results, list) and results[0]["errno"] == errno.EPERM, results
        # Answered by its deadline, which does not wait for the handler to obey its
        # cancellation (tests/test_deadline.py); nothing was left for the end to answer.
        assert registry.get_sample_value("seccomp_supervisor_handler_errors_total",
                                         {"policy": "p", "kind": "deadline"}) == 1
        assert registry.get_sample_value("seccomp_supervisor_handler_errors_total",
                                         {"policy": "p", "kind": "ended"}) is None
    finally:
        release.set()
        await reap_target(target)
        os.close(copy)


HARDENING = f"""
[defaults]
policies = ["hardening"]

[[policy]]
name = "hardening"
path = "{Path(__file__).resolve().parent.parent}/policies/hardening.py"
"""


async def test_a_listener_whose_session_failed_leaves_the_fd_store(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hot_loop: str) -> None:
    """A daemon bug ends a session while its container lives, and the daemon will not
    serve that listener again. Kept in the fd store (systemd's, or the fd keeper), its
    copy there would hold every later notified call of the container unanswered until
    the daemon restarts; removed, the kernel answers them ENOSYS once the last copy
    closes: the container fails closed, at once."""
    path = tmp_path / "notify.sock"
    messages: list[dict[str, str]] = []
    original = Recorder.decided

    def faulty(self: Recorder, container: Container, notif_id: int, tid: int, syscall: str,
               *args: Any, **kwargs: Any) -> int:
        bucket = original(self, container, notif_id, tid, syscall, *args, **kwargs)
        if "chmod" in syscall:
            raise DaemonBug(f"recording {syscall} failed")
        return bucket

    monkeypatch.setattr(Recorder, "decided", faulty)
    victim = tmp_path / "file"
    victim.write_text("")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.setblocking(False)

        async def wait_for(what: str, check: Any) -> None:
            with trio.fail_after(WAIT):
                while not check():
                    await trio.lowlevel.wait_readable(sock)
                    # recv(), not recvmsg(): the fds sent along are closed at once.
                    raw = sock.recv(65536).decode()
                    messages.append(dict(line.split("=", 1) for line in raw.splitlines()
                                         if "=" in line))
            assert check(), (what, messages)

        async with running_daemon(tmp_path, HARDENING, notifier=Notifier(str(path))) as d, \
                trio.open_nursery() as nursery:
            notify = ["--notify", "chmod", "--notify", "fchmodat", "--notify", "fchmodat2"]
            nursery.start_soon(functools.partial(
                d.run, [*notify, "--", "sh", "-c", 'chmod u+s "$0"; sleep 30', str(victim)],
                timeout=WAIT * 2))
            await wait_for("stored", lambda: any(m.get("FDSTORE") == "1" for m in messages))
            [name] = [m["FDNAME"] for m in messages if m.get("FDSTORE") == "1"]
            await wait_for("removed", lambda: {"FDSTOREREMOVE": "1", "FDNAME": name}
                           in messages)
            assert d.daemon.sessions == set()
            nursery.cancel_scope.cancel()  # the target: still in its sleep
    assert victim.stat().st_mode & 0o7777 == 0o644 & ~os.umask(os.umask(0))
