"""One session per listener fd: receive notifications, ask the chain, answer the kernel.

The hot loop is :meth:`supervisor.notifyfd.Poller.run`: one task and one epoll set for
every session of the daemon. Each round it calls :meth:`Session.on_ready` once for every
fd with a notification pending, which receives exactly one notification and, synchronously
and without allocating anything the chain does not use:

* a call no policy handles gets the ``unhandled`` answer at once;
* plain-function handlers are run inline: the answer goes out before the next RECV;
* from the first coroutine handler on, the rest of the chain runs under the deadline,
  bounded by ``max_inflight``. It starts inline: a coroutine that finishes without
  suspending (no real I/O) costs no task and no scheduler pass. One that does suspend is
  carried on by the poller task it started in, and a new poller task takes over reading
  (see :meth:`supervisor.notifyfd.Poller.run`), so a slow handler for one thread never
  delays the answer to another. When every slot is taken, the notification is parked and
  the fd leaves the poller until the session's own task got a slot for it.

:meth:`Session.run` itself only waits: for POLLHUP (the filter has no task left), a
failure, a parked notification, cancellation or :meth:`Session.stop_reading`.

Every notification gets exactly one answer unless the kernel withdrew it (ENOENT), which
is routine and only counted. Whatever goes wrong in a handler becomes ``on_error``.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from functools import partial
from time import perf_counter
from typing import Any, Final

import trio

from . import abi, accel
from .audit import Recorder
from .decide import UNHANDLED_POLICY, Chain, Link, Mode, Outcome, check_result
from .errors import NotificationGone, PolicyError, TargetMemoryError
from .journal import Journal
from .memory import TargetMemory
from .metrics import DECISION_BUCKETS
from .notifyfd import (
    POLL_END,
    POLLIN,
    NotifyFd,
    Poller,
    RecvBlocked,
    Suspended,
    carry_on,
    current_poller,
    first_step,
)
from .policy import (
    Container,
    Decision,
    Notification,
    deny,
    make_notification,
    response_fields,
)
from .ratelimit import RATE_POLICY, TokenBucket

log = logging.getLogger("supervisor.session")

#: The policy and call names of answers given to journal entries that could not be
#: decided after a crash (see Session._recover).
RECOVERY_POLICY: Final = "(recovery)"
RECOVERED_TORN: Final = "(unknown)"


@dataclass(frozen=True, slots=True)
class SessionSettings:
    unhandled: Decision = field(default_factory=lambda: deny(38, reason="unhandled"))
    on_error: Decision = field(default_factory=lambda: deny(1, reason="handler error"))
    deadline: float = 2.0
    max_inflight: int = 64
    mode: Mode = "enforce"
    # Back-pressure (supervisor/ratelimit.py): calls per second, 0 = no limit.
    rate: float = 0.0
    rate_burst: int = 1
    rate_exceeded: Decision = field(default_factory=lambda: deny(11, reason="rate limit"))


@dataclass(slots=True)
class SessionStats:
    notifications: int = 0  # received
    gone: int = 0  # withdrawn by the kernel before their answer
    recovered: int = 0  # taken from the in-flight journal a crashed process left
    decisions: dict[str, int] = field(default_factory=dict)  # answers given, by kind
    # Answers by latency: latency[i] fell in DECISION_BUCKETS bucket i (the last is +Inf;
    # not cumulative). Fixed size, bumped with the index the recorder already computed;
    # ``top`` takes a p99 per container from the difference of two snapshots.
    latency: list[int] = field(default_factory=lambda: [0] * (len(DECISION_BUCKETS) + 1))

    @property
    def answered(self) -> int:
        return sum(self.decisions.values())


_SERIALS: Final = itertools.count(1)

# A received notification waiting for an async slot: (notification, links, index, received,
# the allow of an earlier link, if any). ``received`` is always a perf_counter() reading
# (see _deadline): reading trio's clock costs four times as much, and the hot loop reads
# the time twice per notification.
_Parked = tuple[Notification, tuple[Link, ...], int, float, "Outcome | None"]


class Session:
    """Serves one listener fd until the filter has no task left (POLLHUP) or it is
    cancelled. Owns ``notify`` and closes it when it ends."""

    # Slots, not an instance dict: the hot loop reads about ten of these per
    # notification, and with 1,000 busy sessions each session's state is cold by the time
    # its next call comes (bench/README.md, "Session 8: K=1000"). In the object they are
    # one block; in a dict they were the dict, its values array and a lookup each.
    __slots__ = ("__weakref__", "_carried", "_carried_done", "_ended", "_failed",
                 "_last_outcome", "_max_inflight", "_nursery", "_parked", "_polled_fd",
                 "_poller", "_reading", "_routes", "_shadow", "_slot_freed", "_wake",
                 "bucket", "chain", "container", "inflight", "journal", "keep_fd",
                 "memory", "notify", "read_elsewhere", "recorder", "serial", "settings",
                 "started", "stats")

    def __init__(self, notify: NotifyFd, container: Container, chain: Chain,
                 settings: SessionSettings, recorder: Recorder) -> None:
        self.notify = notify
        self.container = container
        self.chain = chain
        self.settings = settings
        self.recorder = recorder
        self.memory = TargetMemory(notify)
        self.stats = SessionStats()
        self.serial = next(_SERIALS)  # names this session in `status` for as long as it runs
        self.inflight = 0
        self.started = trio.current_time()
        # Async decisions under way are bounded by max_inflight: ``inflight`` counts them
        # (a plain int: a trio.Semaphore costs more than the rest of an inline decision);
        # a parked notification waits for _slot_freed.
        self._max_inflight = settings.max_inflight
        self._slot_freed: trio.Event | None = None
        self._routes = chain.routes  # shared with the other sessions of the chain
        # The Outcome of the last inline decision, reused while handlers return the same
        # Decision object (deny() and returns() hand out cached ones): one allocation
        # less per notification. Outcomes are never changed once made.
        self._last_outcome = Outcome(settings.unhandled, UNHANDLED_POLICY)
        self._nursery: trio.Nursery | None = None
        # Reliability hooks (issue 7; see stop_reading / rebind): kept out of the per-call
        # path except for one None check of the bucket.
        self.bucket: TokenBucket | None = _bucket(settings, None)
        self._shadow = settings.mode == "shadow"
        self._reading = trio.CancelScope()
        self.keep_fd = False
        self.read_elsewhere = False  # see _read_elsewhere
        # The poller side (see _serve): where the fd is registered, and what wakes run().
        self._poller: Poller | None = None
        self._polled_fd = -1
        self._wake: trio.Event | None = None
        self._ended = False
        self._failed: Exception | None = None
        self._parked: _Parked | None = None
        # Async decisions that suspended and are carried on by a retired poller task (not
        # in our nursery): stop_reading() waits for them too.
        self._carried = 0
        self._carried_done: trio.Event | None = None
        # The in-flight journal (supervisor/journal.py): None when nothing would read it
        # back after a crash (no fd store). See attach_journal().
        self.journal: Journal | None = None

    def attach_journal(self, journal: Journal) -> None:
        """Journal every notification received from now on; :meth:`run` first answers
        the ones a crashed process left in it."""
        self.journal = journal

    def __repr__(self) -> str:
        return f"<Session {self.container.id!r} fd={self.notify.fileno()}>"

    async def run(self) -> None:
        """Serve until POLLHUP; then cancel what is in flight and close the fd.

        After :meth:`stop_reading`, it returns once every notification already received
        has its answer (each is bounded by the deadline); the fd stays open if
        ``keep_fd`` was asked for, and the caller owns ``self.notify`` from then on.
        """
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.journal is not None:
                    self._recover()
                with self._reading:
                    await self._serve()
                if self._parked is not None:
                    await self._start_parked()  # received: it must be answered
                if not self._reading.cancel_called:
                    nursery.cancel_scope.cancel()
                else:
                    while self._carried:  # every received notification gets its answer
                        self._carried_done = trio.Event()
                        await self._carried_done.wait()
        finally:
            self._unpoll()
            self._nursery = None
            # keep_fd: handed over, the container lives on: no close, no session-end hooks.
            if self.journal is not None and not self.keep_fd:
                self.journal.close()
                self.journal = None
            if not self.keep_fd:
                self.notify.close()
                for _name, policy_set in self.chain.policies:
                    try:
                        policy_set.session_ended(self.container)
                    except Exception:
                        log.exception("session-end hook of policy %s failed", _name)

    async def _serve(self) -> None:
        """Wait while the poller serves the fd; return at POLLHUP, raise what failed."""
        self._poller = current_poller()
        try:
            self._repoll()
            while True:
                if self._failed is not None:
                    raise self._failed
                if self._parked is not None:
                    await self._start_parked()
                    self._repoll()
                    continue
                if self._ended:
                    log.debug("session %s: filter has no task left", self.container.id)
                    return
                self._wake = trio.Event()
                await self._wake.wait()
        finally:
            # Before the nursery closes: nothing may start an async decision after that.
            self._unpoll()

    def _repoll(self) -> None:
        fd = self.notify.fileno()
        if self._poller is not None and self._polled_fd < 0 and fd >= 0:
            self._poller.register(fd, self)
            self._polled_fd = fd

    def _unpoll(self) -> None:
        if self._polled_fd >= 0:
            assert self._poller is not None
            self._poller.unregister(self._polled_fd)
            self._polled_fd = -1

    def _wake_up(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def on_ready(self, events: int) -> Suspended | None:
        """Called by the poller: the fd is readable. Receives one notification (RECV
        cannot block here, see :mod:`supervisor.notifyfd`) and decides it, or starts its
        async decision (returned if it suspended); or, at POLLHUP, ends the session.

        This is the hot loop's body, run once per notification: everything a sync
        decision needs is inline here and in :meth:`_answer` (no task, no trio call, no
        object the handler does not see but the Notification and the Outcome).
        """
        if not events & POLLIN:
            if events & POLL_END:
                self._unpoll()
                self._ended = True
                self._wake_up()
            return None
        try:
            raw = self.notify.recv()
        except RecvBlocked:
            self._read_elsewhere()
            return None
        if raw is None:
            self.stats.gone += 1
            self.recorder.gone("recv")
            return None
        received = perf_counter()
        self.stats.notifications += 1
        notif_id, tid, nr, arch, args = raw
        journal = self.journal
        if journal is not None:
            journal.record(notif_id)  # memory writes only: see supervisor/journal.py
        return self._decide_received(notif_id, tid, nr, arch, args, received)

    def _decide_received(self, notif_id: int, tid: int, nr: int, arch: int,
                         args: tuple[int, ...], received: float,
                         n: Notification | None = None, links: tuple[Link, ...] = (),
                         index: int = 0, allowed: Outcome | None = None,
                         handed: object = None, raised: bool = False) -> Suspended | None:
        """Decide a notification :meth:`on_ready` received (and journaled): route it, ask
        its links, answer. The compiled loop (``supervisor/_hotloop.c``) hands over here
        whatever is not its common case, at the point it reached: before the route
        (``n`` None), or at ``links[index]`` with the Notification it made and the allow
        of an earlier link; ``links[index]`` is a sync handler it already called, which
        returned ``handed`` (or raised it, ``raised``). Returns what :meth:`on_ready`
        returns."""
        if n is None:
            try:
                syscall, arch_label, links = self._routes[arch][nr]
            except KeyError:  # the chain's first call of this number (or one with no name)
                syscall, arch_label, links = self.chain.route(arch, nr)
            if self.bucket is not None and not self.bucket.take(received):
                self._answer(notif_id, tid, syscall, args, received,
                             Outcome(self.settings.rate_exceeded, RATE_POLICY))
                return None
            if not links:
                self._answer(notif_id, tid, syscall, args, received,
                             Outcome(self.settings.unhandled, UNHANDLED_POLICY))
                return None
            n = make_notification(notif_id, tid, nr, arch_label, syscall, args,
                                  self.container, self.memory)
            index = -1  # not enumerate(): that is an object per notification
            pending = links
        else:
            syscall = n.syscall
            index -= 1
            pending = links[index + 1:]
        journal = self.journal
        # An allow() does not end the chain: every later handler for the call is asked
        # too, and the first refusal or answer of its own wins (a permissive policy first
        # in a chain must not switch off the checks of the ones after it). The allow is
        # the answer when none of them decides otherwise.
        for link in pending:
            index += 1
            try:
                if raised:  # links[index] raised in the compiled loop: handle it here
                    raised = False
                    failure, handed = handed, None
                    assert isinstance(failure, _HANDLER_FAILURES)
                    try:
                        raise failure
                    finally:
                        # Not kept in this frame: the traceback refers to the frame, a
                        # cycle per handler error until the garbage collector runs.
                        del failure
                if handed is not None:  # what links[index] returned in the compiled loop
                    result, handed = handed, None
                elif link.is_async:
                    n._read_memory = False  # the memory-read rule is per handler
                    if self.inflight >= self._max_inflight:
                        # Every slot is taken: park it and stop reading until run() got
                        # one.
                        self._parked = (n, links, index, received, allowed)
                        if journal is not None:
                            journal.pin(notif_id)  # it waits: keep its journal entry
                        self._unpoll()
                        self._wake_up()
                        return None
                    # Its first step, inline: most coroutine handlers finish without
                    # waiting for anything, and then cost no task and no deadline scope.
                    # (is_async: func is a coroutine function)
                    coro: Coroutine[Any, Any, object] = link.func(n)  # type: ignore[assignment]
                    finished, result = first_step(coro)
                    if not finished:  # result is the trap it waits at
                        return self._suspend(n, links, index, received, coro, result,
                                             allowed)
                else:
                    n._read_memory = False
                    result = link.func(n)
                # Only an allow() needs check_result's memory-read rule; anything but a
                # Decision gets its refusal there too.
                if result is not None and (result.__class__ is not Decision
                                           or result.kind == "allow"):
                    result = check_result(result, link.policy, read_memory=n.read_memory)
            except NotificationGone as gone:
                self.stats.gone += 1
                self.recorder.gone(gone.stage)
                return None
            except _HANDLER_FAILURES as exc:
                self._answer(notif_id, tid, syscall, args, received,
                             self._failure(link.policy, n, exc))
                return None
            if result is not None:
                outcome = self._last_outcome
                if outcome.decision is not result or outcome.policy is not link.policy:
                    outcome = self._last_outcome = Outcome(result, link.policy)
                if result.kind == "allow":
                    allowed = outcome
                    continue
                self._answer(notif_id, tid, syscall, args, received, outcome)
                return None
        self._answer(notif_id, tid, syscall, args, received,
                     allowed if allowed is not None
                     else Outcome(self.settings.unhandled, UNHANDLED_POLICY))
        return None

    def _read_elsewhere(self) -> None:
        """A RECV blocked after POLLIN: another process reads this listener too (it
        kept a copy after the handoff). Its notifications cannot all be ours to answer
        and each such RECV stalls the loop: end the session (the fd is closed; the
        other reader keeps serving its filter)."""
        log.error("container %r (pid %d): a RECV on its listener blocked: another "
                  "process reads the same listener (a copy kept after the handoff); not "
                  "serving it any more", self.container.id, self.container.pid)
        self.read_elsewhere = True
        self._unpoll()
        self._ended = True
        self._wake_up()

    def carried(self, exc: Exception | None) -> None:
        """Called by the poller task that carried a suspended decision to its end."""
        self._carried -= 1
        if self._carried == 0 and self._carried_done is not None:
            self._carried_done.set()
        if exc is not None:
            self.on_failure(exc)

    def on_failure(self, exc: Exception) -> None:
        """Called by the poller when :meth:`on_ready` raised: :meth:`run` raises it."""
        self._unpoll()
        self._failed = exc
        self._wake_up()

    def _recover(self) -> None:
        """Answer what a crashed process received and never answered (its journal came
        back with this listener from the fd store). Only ids the kernel still holds on
        *this* fd (ID_VALID) are touched, each once: a complete entry is decided again
        by the chain (the target is still blocked in the call, so its memory can be
        read), as an async decision under the deadline; a torn one gets ``on_error``."""
        journal = self.journal
        assert journal is not None
        try:
            complete, torn = journal.take_entries(self.notify.id_valid)
        except OSError as exc:
            log.error("container %s: cannot read its in-flight journal back: %s",
                      self.container.id, exc)
            return
        if not complete and not torn:
            return
        log.warning("container %s: answering %d notifications a crashed process had "
                    "received (%d torn: on_error): ids %s", self.container.id,
                    len(complete) + len(torn), len(torn),
                    " ".join(f"{e.id:#x}" for e in (*complete, *torn)))
        received = perf_counter()
        self.stats.recovered += len(complete) + len(torn)
        for entry in torn:
            self.recorder.recovered("torn")
            self._answer(entry.id, entry.pid, RECOVERED_TORN, entry.args, received,
                         Outcome(self.settings.on_error, RECOVERY_POLICY, "recovery",
                                 "journal slot cut short by the crash"))
        assert self._nursery is not None
        for entry in complete:
            self.recorder.recovered("complete")
            try:
                syscall, arch_label, links = self.chain.route(entry.arch, entry.nr)
            except Exception as exc:  # an arch/nr this version cannot name
                self._answer(entry.id, entry.pid, RECOVERED_TORN, entry.args, received,
                             Outcome(self.settings.on_error, RECOVERY_POLICY, "recovery",
                                     f"cannot route it: {exc}"))
                continue
            n = make_notification(entry.id, entry.pid, entry.nr, arch_label, syscall,
                                  entry.args, self.container, self.memory)
            # Over max_inflight for a moment at most by the journal's size.
            self.inflight += 1
            self._nursery.start_soon(self._decide_async, n, links, 0, received)

    async def _start_parked(self) -> None:
        """Start the async decision of the parked notification once a slot is free."""
        assert self._parked is not None
        n, links, index, received, allowed = self._parked
        # Shielded: this notification was received, so it must be answered even if
        # stop_reading() or a cancellation comes meanwhile. A slot is freed within the
        # deadline.
        with trio.CancelScope(shield=True):
            while self.inflight >= self._max_inflight:
                self._slot_freed = trio.Event()
                await self._slot_freed.wait()
        self._parked = None
        self.inflight += 1
        assert self._nursery is not None
        self._nursery.start_soon(self._decide_async, n, links, index, received, allowed)

    def stop_reading(self, *, keep_fd: bool = False) -> None:
        """Receive no more notifications: the ones still pending wait in the kernel for
        whoever reads this filter next. :meth:`run` returns once the ones already received
        are answered. With ``keep_fd`` the fd is left open for the caller (a takeover)."""
        self.keep_fd = keep_fd
        self._unpoll()
        self._reading.cancel()

    @property
    def reading_stopped(self) -> bool:
        """True once :meth:`stop_reading` was called."""
        return self._reading.cancel_called

    def rebind(self, chain: Chain, settings: SessionSettings) -> None:
        """Use ``chain`` and ``settings`` from the next notification on (a reload routed
        this container again). Decisions under way finish with the chain they started
        with. ``max_inflight`` keeps the value the session started with. Policies that
        leave the chain get their session-end hook."""
        old = self.chain
        self.chain = chain
        self.bucket = _bucket(settings, self.bucket)
        self.settings = settings
        self._shadow = settings.mode == "shadow"
        self._routes = chain.routes
        kept = {id(policy_set) for _name, policy_set in chain.policies}
        for name, policy_set in old.policies:
            if id(policy_set) not in kept:
                try:
                    policy_set.session_ended(self.container)
                except Exception:
                    log.exception("session-end hook of policy %s failed", name)

    def _suspend(self, n: Notification, links: tuple[Link, ...], index: int,
                 received: float, coro: Coroutine[Any, Any, object], trap: Any,
                 allowed: Outcome | None) -> Suspended:
        """The coroutine handler of ``links[index]`` suspended (yielded ``trap`` to trio)
        in its inline first step: take a slot for it (the caller checked there is one)
        and return the rest of the decision, suspended at that same trap, for the poller
        task to carry on under the deadline.

        A trio task per notification would cost more than the rest of the decision, and
        the deadline's cancel scope is only set up now: entering one costs more than a
        whole inline decision.
        """
        self.inflight += 1
        self._carried += 1
        if self.journal is not None:
            self.journal.pin(n.id)  # the decision waits: keep its journal entry
        current = [links[index].policy]
        rest = self._decide(n, links, index, received, current, (coro, trap), allowed)
        rest.send(None)  # runs up to the handler's trap, and yields it again
        return Suspended(rest, trap, self._deadline(received),
                         partial(self._deadline_missed, n, received, current), self.carried)

    def _run_sync(self, n: Notification, link: Link) -> Outcome | None:
        try:
            result = link.func(n)
            decision = check_result(result, link.policy, read_memory=n.read_memory)
        except NotificationGone:
            raise
        except _HANDLER_FAILURES as exc:
            return self._failure(link.policy, n, exc)
        return None if decision is None else Outcome(decision, link.policy)

    async def _decide(self, n: Notification, links: Sequence[Link], start: int,
                      received: float, current: list[str],
                      started: tuple[Coroutine[Any, Any, object], Any] | None = None,
                      allowed: Outcome | None = None) -> None:
        """Ask the chain from ``links[start]`` on and answer; free the slot. The deadline
        is the caller's: its cancellation goes through (``current[0]`` names the policy
        being asked). ``started``: the coroutine of ``links[start]``'s handler, already
        suspended at the trap given with it (see :meth:`_suspend`). ``allowed``: the
        allow of an earlier link, the answer unless a later one decides otherwise (see
        :meth:`on_ready`)."""
        try:
            outcome = None
            for link in links[start:]:
                current[0] = link.policy  # names the policy that overran, on a deadline
                if started is None:
                    n._read_memory = False  # per handler (the started one was reset)
                if not link.is_async:
                    outcome = self._run_sync(n, link)
                else:
                    try:
                        if started is not None:
                            result = await carry_on(*started)
                            started = None
                        else:
                            result = await link.func(n)  # type: ignore[misc]
                        decision = check_result(result, link.policy,
                                                read_memory=n.read_memory)
                    except NotificationGone:
                        raise
                    except _HANDLER_FAILURES as exc:
                        outcome = self._failure(link.policy, n, exc)
                    else:
                        outcome = None if decision is None else Outcome(decision, link.policy)
                if outcome is not None:
                    if outcome.decision.kind == "allow" and outcome.error is None:
                        allowed, outcome = outcome, None
                        continue
                    break
            if outcome is None:
                outcome = (allowed if allowed is not None
                           else Outcome(self.settings.unhandled, UNHANDLED_POLICY))
            self._answer(n.id, n.pid, n.syscall, n.args, received, outcome)
            self._unpin(n.id)
        except NotificationGone as gone:
            self.stats.gone += 1
            self.recorder.gone(gone.stage)
            self._unpin(n.id)
        finally:
            self.inflight -= 1
            if self._slot_freed is not None:
                self._slot_freed.set()
                self._slot_freed = None

    async def _decide_async(self, n: Notification, links: Sequence[Link], start: int,
                            received: float, allowed: Outcome | None = None) -> None:
        """:meth:`_decide` as a task of its own, under the deadline."""
        current = [UNHANDLED_POLICY]
        with trio.move_on_at(self._deadline(received)) as scope:
            await self._decide(n, links, start, received, current, None, allowed)
        if scope.cancelled_caught:
            self._deadline_missed(n, received, current)

    def _deadline(self, received: float) -> float:
        """The trio time by which a notification received at ``received`` (perf_counter)
        must be answered."""
        return trio.current_time() + self.settings.deadline - (perf_counter() - received)

    def _deadline_missed(self, n: Notification, received: float, current: list[str]) -> None:
        """The chain overran the deadline: answer ``on_error``."""
        policy = current[0]
        log.warning("container %s: %s handler of policy %s missed its %.3gs deadline",
                    self.container.id, n.syscall, policy, self.settings.deadline)
        try:
            self._answer(n.id, n.pid, n.syscall, n.args, received,
                         Outcome(self.settings.on_error, policy, "deadline",
                                 f"deadline {self.settings.deadline}s"))
        except NotificationGone as gone:
            self.stats.gone += 1
            self.recorder.gone(gone.stage)
        self._unpin(n.id)

    def _unpin(self, notif_id: int) -> None:
        """A decision that waited was answered: its journal entry may go (see
        supervisor/journal.py: an inline decision's needs no such step)."""
        if self.journal is not None:
            self.journal.unpin(notif_id)

    def _failure(self, policy: str, n: Notification, exc: BaseException) -> Outcome:
        if isinstance(exc, TargetMemoryError):
            # The target passed a bad pointer: answer what the kernel would have.
            return Outcome(deny(exc.errno, reason=str(exc)), policy, "memory", str(exc))
        kind: str = "refused" if isinstance(exc, PolicyError) else "exception"
        log.warning("container %s: policy %s failed on %s: %s: %s", self.container.id,
                    policy, n.syscall, type(exc).__name__, exc,
                    exc_info=kind == "exception")
        return Outcome(self.settings.on_error, policy, kind,  # type: ignore[arg-type]
                       f"{type(exc).__name__}: {exc}")

    def _answer(self, notif_id: int, tid: int, syscall: str, args: Sequence[int],
                received: float, outcome: Outcome) -> None:
        """Give the kernel its one answer to ``notif_id`` and record it."""
        decision = outcome.decision
        response = decision._response  # (val, error, flags); None for inject_fd
        if response is None or self._shadow:
            self._answer_special(notif_id, tid, syscall, args, received, outcome)
            return
        stats = self.stats
        try:
            self.notify.send(notif_id, response[0], response[1], response[2])
        except NotificationGone as gone:
            stats.gone += 1
            self.recorder.gone(gone.stage)
            return
        # What _answered() does, inline: this is the common case.
        kind = decision.kind
        stats.decisions[kind] = stats.decisions.get(kind, 0) + 1
        stats.latency[self.recorder.decided(self.container, notif_id, tid, syscall, args,
                                            outcome, perf_counter() - received)] += 1

    def _answered(self, notif_id: int, tid: int, syscall: str, args: Sequence[int],
                  received: float, outcome: Outcome, shadow: bool) -> None:
        stats = self.stats
        kind = outcome.decision.kind
        stats.decisions[kind] = stats.decisions.get(kind, 0) + 1
        stats.latency[self.recorder.decided(self.container, notif_id, tid, syscall, args,
                                            outcome, perf_counter() - received,
                                            shadow=shadow)] += 1

    def _answer_special(self, notif_id: int, tid: int, syscall: str, args: Sequence[int],
                        received: float, outcome: Outcome) -> None:
        """:meth:`_answer` in shadow mode (every call goes on: CONTINUE) or for an
        inject_fd (ADDFD, and the fd is ours to close)."""
        decision = outcome.decision
        shadow = self._shadow
        owned_fd = decision.fd if decision.kind == "inject_fd" else -1
        try:
            if shadow:
                self.notify.send(notif_id, 0, 0, abi.USER_NOTIF_FLAG_CONTINUE)
            else:
                try:
                    self.notify.send_fd(notif_id, decision.fd, cloexec=decision.cloexec)
                except OSError as exc:
                    if exc.errno in _ADDFD_ALREADY_ANSWERED:
                        # The kernel took ADDFD|SEND as the answer and then lost the
                        # fd: the call is answered (it returned 0), a second answer is
                        # impossible. Count it; never end the session over it.
                        log.error("container %s: inject_fd for %s (tid %d) was "
                                  "interrupted after the kernel took it as the answer: %s",
                                  self.container.id, syscall, tid, exc.strerror)
                        self.recorder.handler_error(outcome.policy, "inject_lost")
                        return
                    # ADDFD failed before answering (bad fd, target out of fds): the call
                    # still waits, so it gets the on_error answer instead.
                    outcome = Outcome(self.settings.on_error, outcome.policy, "exception",
                                      f"inject_fd failed: {exc.strerror}")
                    val, error, flags = response_fields(outcome.decision)
                    self.notify.send(notif_id, val, error, flags)
        except NotificationGone as gone:
            self.stats.gone += 1
            self.recorder.gone(gone.stage)
            return
        finally:
            if owned_fd >= 0:
                _close_quietly(owned_fd)
        self._answered(notif_id, tid, syscall, args, received, outcome, shadow)


if accel.HOTLOOP is not None:  # what its fast path recognises (exact types)
    accel.HOTLOOP.setup(Session, Notification, Link, Decision, Outcome, Recorder)


# What a handler may raise and the session turns into its on_error answer: any Exception,
# and SystemExit (a policy calling sys.exit() or exit() would otherwise stop the whole
# daemon, every container's calls with it). Not KeyboardInterrupt or trio's Cancelled:
# those are the daemon's own.
_HANDLER_FAILURES: Final = (Exception, SystemExit)


# ADDFD|SEND errors after which the kernel already counts the call as answered: EINTR
# (a signal during its wait; send_fd blocks signals, so only as a safety net) and
# EINPROGRESS (the same ioctl restarted after the interruption).
_ADDFD_ALREADY_ANSWERED: Final = frozenset({errno.EINTR, errno.EINPROGRESS})


def _bucket(settings: SessionSettings, old: TokenBucket | None) -> TokenBucket | None:
    """The token bucket for ``settings`` (None without a rate); ``old`` if its limits are
    the same, so a reload does not refill it."""
    if settings.rate <= 0:
        return None
    if old is not None and old.same_limits(settings.rate, settings.rate_burst):
        return old
    return TokenBucket(settings.rate, max(1, settings.rate_burst), perf_counter())


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
