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
  the fd leaves the poller until the session's own task got a slot for it (or its
  deadline passed).
* a link with declared paths (``PolicySet.on(..., paths=...)``) has them read first,
  without a task (:meth:`Session._prefetch`): read within the read pool's inline wait,
  its handler runs right there; otherwise the decision waits, holding a slot, with its
  deadline in the daemon's one heap (``supervisor/deadlines.py``), and the read pool's
  delivery resumes it at that link when the reads are done.

:meth:`Session.run` itself only waits: for POLLHUP (the filter has no task left), a
failure, a parked notification, cancellation, :meth:`Session.stop_reading` or a RECV that
blocked (another process reads the listener).

Every notification gets exactly one answer unless the kernel withdrew it (ENOENT), which
is routine and only counted. Whatever goes wrong in a handler becomes ``on_error``. A
decision that waits has its deadline in the daemon's heap (``supervisor/deadlines.py``):
at the deadline the call gets ``on_error`` and then its handler is cancelled, so one
that ignores the cancellation cannot hold the call (what it returns later is dropped).
That holds when the session ends too, for any reason (see :meth:`Session.run`): closing our fd
answers nothing while another process holds a copy of the listener.
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
from .deadlines import Deadlines, Entry, current_deadlines
from .decide import UNHANDLED_POLICY, Chain, Link, Mode, Outcome, check_result
from .errors import NotificationGone, PolicyError, TargetMemoryError, is_daemon_own
from .journal import Journal
from .memory import PendingReads, TargetMemory
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
    PATH_MAX,
    Container,
    Decision,
    Notification,
    deny,
    make_notification,
    path_indexes,
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
# (n, links, index, received, allowed, the paths of links[index] asked for already: None
# if its paths function has not run)
_Parked = tuple[Notification, tuple[Link, ...], int, float, "Outcome | None",
                "tuple[int, ...] | None"]


class _Prefetch:
    """A decision waiting, without a task, for the paths ``links[index]`` declared (see
    :meth:`Session._prefetch`): ``wanted`` are the argument indexes being read. Called
    with their results (the read pool's delivery), it resumes the decision; its
    :meth:`expired` is its deadline's."""

    __slots__ = ("allowed", "entry", "index", "links", "n", "reads", "received", "session",
                 "wanted")

    def __init__(self, session: Session, n: Notification, links: tuple[Link, ...],
                 index: int, received: float, allowed: Outcome | None, wanted: list[int]
                 ) -> None:
        self.session = session
        self.n = n
        self.links = links
        self.index = index
        self.received = received
        self.allowed = allowed
        self.wanted = wanted
        self.reads: PendingReads | None = None
        self.entry: Entry | None = None  # its deadline (supervisor/deadlines.py)

    def __call__(self, values: list[bytes | Exception]) -> Suspended | None:
        return self.session._prefetched(self, values)

    def expired(self) -> None:
        self.session._prefetch_expired(self)


class _Waiting:
    """A received notification whose decision waits in a task (carried by a poller or the
    read pool's delivery task, or a system task of its own: see
    :meth:`Session._start_decision`): what the session needs to answer it itself, at its
    deadline (:meth:`expired`) or if the session ends first
    (:meth:`Session._end_decisions`). ``current[0]`` names the policy being asked;
    ``entry`` is its deadline in the daemon's heap; ``scope`` is the carrying task's
    cancel scope, once it started carrying. Called with that scope (see
    :class:`~supervisor.notifyfd.Suspended`): cancelled at once if the call was answered
    before the carrying started."""

    __slots__ = ("answered", "current", "entry", "n", "received", "scope", "session")

    def __init__(self, session: Session, n: Notification, received: float,
                 current: list[str]) -> None:
        self.session = session
        self.n = n
        self.received = received
        self.current = current
        self.scope: trio.CancelScope | None = None
        self.entry: Entry | None = None
        self.answered = False  # by its deadline or the session's end, not its decision

    def __call__(self, scope: trio.CancelScope) -> None:
        self.scope = scope
        if self.answered:
            scope.cancel()

    def expired(self) -> None:
        """Its deadline passed (the heap's, or the carrying scope's if that came first)."""
        self.session._waiting_expired(self)


#: How long after the deadline an orderly end (stop_reading, read_elsewhere) still waits
#: for the calls received to be answered before answering them on_error itself: a safety
#: bound (the deadlines task answers each at its deadline, which needs a scheduler pass).
END_GRACE: Final = 0.25


class Session:
    """Serves one listener fd until the filter has no task left (POLLHUP) or it is
    cancelled. Owns ``notify`` and closes it when it ends."""

    # Slots, not an instance dict: the hot loop reads about ten of these per
    # notification, and with 1,000 busy sessions each session's state is cold by the time
    # its next call comes (bench/README.md, "Session 8: K=1000"). In the object they are
    # one block; in a dict they were the dict, its values array and a lookup each.
    __slots__ = ("__weakref__", "_carried", "_deadlines", "_ended",
                 "_failed", "_last_outcome", "_max_inflight", "_parked", "_parked_entry",
                 "_polled_fd", "_poller", "_prefetching", "_reading", "_resume", "_routes",
                 "_shadow", "_slot_freed", "_waiting", "_wake",
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
        # Reliability hooks (issue 7; see stop_reading / rebind): kept out of the per-call
        # path except for one None check of the bucket.
        self.bucket: TokenBucket | None = _bucket(settings, None)
        self._shadow = settings.mode == "shadow"
        # The compiled loop's resume() (None in pure Python, chosen as the poller chooses
        # its loop): a decision whose declared paths were read goes on there, from the
        # link that declared them, as _decide_received(..., resumed=True) does.
        self._resume = None if accel.HOTLOOP is None else accel.HOTLOOP.resume
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
        self._parked_entry: Entry | None = None  # its deadline (see _park)
        # Async decisions that suspended and are carried on by a retired poller task, or
        # run in a system task of their own, or wait for their paths: counted.
        self._carried = 0
        # Decisions waiting in a task, by notification id, until answered (see _Waiting):
        # by their decision, or at their deadline whether or not the handler obeys its
        # cancellation, or by run() if the session ends first.
        self._waiting: dict[int, _Waiting] = {}
        # Decisions waiting, without a task, for the paths their link declared (counted
        # in inflight and _carried too), by notification id; see _prefetch.
        self._prefetching: dict[int, _Prefetch] = {}
        self._deadlines: Deadlines | None = None
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
        """Serve until POLLHUP, :meth:`stop_reading`, a RECV that blocked (another
        process reads the listener: ``read_elsewhere``), a failure (raised) or
        cancellation; then close the fd.

        Whatever ends it, every notification received and not answered yet gets its one
        answer before the fd closes: while another process holds a copy of the listener
        (whoever handed it over, the fd store, the fd keeper) the kernel answers nothing
        at our close, and the call would hang until that copy closed. After
        :meth:`stop_reading` or ``read_elsewhere`` the targets live on and nothing is
        wrong with the session: their decisions finish, each within its deadline. After a
        failure (the session's state is unknown) or a cancellation (whoever cancels wants
        it gone now) each gets ``on_error`` at once. At POLLHUP the targets are gone: the
        same answers only meet ENOENT. See :meth:`_end_decisions`.

        With ``keep_fd`` (:meth:`stop_reading`) the fd stays open, and the caller owns
        ``self.notify`` from then on.
        """
        try:
            ended_by: BaseException | None = None
            try:
                if self.journal is not None:
                    self._recover()
                with self._reading:
                    await self._serve()
                if self._reading.cancel_called or self.read_elsewhere:
                    # Each is answered by its deadline at the latest (a safety bound):
                    # a handler still running then is not waited for.
                    with trio.move_on_after(self.settings.deadline + END_GRACE):
                        await self._let_decisions_finish()
            except BaseException as exc:
                ended_by = exc
                raise
            finally:
                self._unpoll()
                self._end_decisions(self._why_ended(ended_by))
        finally:
            self._unpoll()
            # keep_fd: handed over, the container lives on: no close, no session-end hooks.
            if self.journal is not None and not self.keep_fd:
                self.journal.close()
                self.journal = None
            if not self.keep_fd:
                self.notify.close()
                for _name, policy_set in self.chain.policies:
                    try:
                        policy_set.session_ended(self.container)
                    except BaseException as exc:
                        if _daemon_own(exc):
                            raise
                        log.exception("session-end hook of policy %s failed", _name)

    async def _serve(self) -> None:
        """Wait while the poller serves the fd, and start the parked notification once a
        slot is free; return at POLLHUP or read_elsewhere, raise what failed."""
        self._poller = current_poller()
        try:
            self._repoll()
            while True:
                if self._failed is not None:
                    raise self._failed
                if self._ended:
                    log.debug("session %s: %s", self.container.id,
                              "read elsewhere" if self.read_elsewhere
                              else "filter has no task left")
                    return
                if self._parked is not None:
                    if self.inflight < self._max_inflight:
                        self._start_parked()
                        self._repoll()
                        continue
                    # A freed slot wakes us, as anything else does.
                    self._wake = self._slot_freed = trio.Event()
                else:
                    self._repoll()  # (a no-op, unless the parked one met its deadline)
                    self._wake = trio.Event()
                await self._wake.wait()
        finally:
            # Before the nursery closes: nothing may start an async decision after that.
            self._unpoll()

    async def _let_decisions_finish(self) -> None:
        """The session stops in good order (stop_reading, read_elsewhere): wait until
        every notification received has its answer, from its own decision or at its
        deadline, the parked one too (started once a slot is free for it). A handler
        that ignored its cancellation and still runs is not waited for: its call is
        answered, and what it returns is dropped."""
        while True:
            if self._failed is not None:  # (a decision's task failed: a daemon error)
                raise self._failed
            if self._parked is not None and self.inflight < self._max_inflight:
                self._start_parked()
            if not self._waiting and not self._prefetching and self._parked is None:
                return
            self._slot_freed = trio.Event()
            await self._slot_freed.wait()

    def _why_ended(self, exc: BaseException | None) -> str:
        """Why the session ends, for the log and the answers of :meth:`_end_decisions`:
        ``exc`` is what run() raises, if anything."""
        if exc is not None:
            if _daemon_own(exc):
                return "cancelled"
            return f"a daemon error ({type(exc).__name__})"
        if self.read_elsewhere:
            return "another process reads its listener"
        if self._ended:
            return "its filter has no task left"
        return "stopped"  # (what is still waiting overran its deadline)

    def _end_decisions(self, why: str) -> None:
        """The session ends: every notification it received and has not answered yet
        gets ``on_error`` now, whatever its decision waits for (a parked one, one waiting
        for its paths, one in a task), and what still runs for it is cancelled: an
        answer given later would be refused (the decision is no longer in ``_waiting``)
        and could not go through a closed fd anyway. Synchronous: every answer is out
        before run() closes the fd. Nothing to do after an orderly end, unless a decision
        overran its deadline."""
        ended: list[tuple[Notification, float, str]] = []
        if self._parked is not None:
            n, links, index, received, _allowed, _wanted = self._parked
            self._parked = None
            self._cancel_parked_deadline()
            ended.append((n, received, links[index].policy))
        while self._prefetching:
            _id, record = self._prefetching.popitem()
            self._finish_waiting(record)
            self._carried -= 1
            ended.append((record.n, record.received, record.links[record.index].policy))
        waiting, self._waiting = self._waiting, {}
        for entry in waiting.values():
            self._stop_waiting(entry)
            ended.append((entry.n, entry.received, entry.current[0]))
        if not ended:
            return
        # At POLLHUP the targets are gone: these answers only meet ENOENT (counted).
        log.log(logging.DEBUG if self._ended and not self.read_elsewhere else logging.WARNING,
                "container %s: session ended (%s) with %d calls still being decided: "
                "answered on_error: ids %s", self.container.id, why, len(ended),
                " ".join(f"{n.id:#x}" for n, _received, _policy in ended))
        for n, received, policy in ended:
            try:
                self._answer(n.id, n.pid, n.syscall, n.args, received,
                             Outcome(self.settings.on_error, policy, "ended",
                                     f"session ended: {why}"))
                self._unpin(n.id)
            except Exception:  # (a daemon error again, maybe): the others still go out
                log.exception("container %s: answering %s (id %#x) at the session's end "
                              "failed", self.container.id, n.syscall, n.id)

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
                         handed: object = None, raised: bool = False, *,
                         resumed: bool = False) -> Suspended | None:
        """Decide a notification :meth:`on_ready` received (and journaled): route it, ask
        its links, answer. The compiled loop (``supervisor/_hotloop.c``) hands over here
        whatever is not its common case, at the point it reached: before the route
        (``n`` None), or at ``links[index]`` with the Notification and the allow of an
        earlier link; if ``handed`` is not None (or ``raised``), ``links[index]``'s
        handler was called already and returned (raised) it. ``resumed``: the paths
        ``links[index]`` declared were read (:meth:`_prefetch`), its paths function is not
        called again (the compiled ``resume`` hands over such a decision too). Returns
        what :meth:`on_ready` returns."""
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
        # An allow() does not end the chain: every later handler for the call is asked
        # too, and the first refusal or answer of its own wins (a permissive policy first
        # in a chain must not switch off the checks of the ones after it). The allow is
        # the answer when none of them decides otherwise.
        resume_at = -1
        for link in pending:
            index += 1
            try:
                if raised:  # links[index] raised in the compiled loop: handle it here
                    raised = False
                    failure, handed = handed, None
                    assert isinstance(failure, BaseException)
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
                    if resumed:  # links[index]'s paths were just read: no second call
                        resumed = False  # of its paths function
                    elif link.paths is not None:
                        wanted = _unread_paths(n, link)  # (policy code: may raise)
                        if wanted and not self._prefetch(n, links, index, received,
                                                         allowed, wanted):
                            return None  # parked, or resumed when the paths are read
                        if self._resume is not None:
                            resume_at = index  # read (within the inline wait), or none
                            break
                    if not link.coroutine:
                        result = link.func(n)
                    elif self.inflight >= self._max_inflight:
                        # Every slot is taken: park it and stop reading until run() got
                        # one. (Its paths, if it declared some, were read above.)
                        self._park(n, links, index, received, allowed,
                                   None if link.paths is None else ())
                        return None
                    else:
                        # Its first step, inline: most coroutine handlers finish without
                        # waiting for anything, and then cost no task and no deadline
                        # scope.
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
                if self._still_waits(notif_id):  # policy code said so, not the kernel
                    self._answer(notif_id, tid, syscall, args, received,
                                 self._failure(link.policy, n, gone))
                    return None
                self.stats.gone += 1
                self.recorder.gone(gone.stage)
                return None
            except BaseException as exc:
                if _daemon_own(exc):
                    raise
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
        if resume_at >= 0:  # the rest in the compiled loop, as a delivered read's
            assert self._resume is not None
            return self._resume(  # type: ignore[no-any-return]
                self, n, links, resume_at, received, allowed)
        self._answer(notif_id, tid, syscall, args, received,
                     allowed if allowed is not None
                     else Outcome(self.settings.unhandled, UNHANDLED_POLICY))
        return None

    def _park(self, n: Notification, links: tuple[Link, ...], index: int, received: float,
              allowed: Outcome | None, wanted: tuple[int, ...] | None = None) -> None:
        """Every async slot is taken: keep ``n`` (to be decided from ``links[index]``) and
        stop reading until run() got a slot for it."""
        parked = self._parked = (n, links, index, received, allowed, wanted)
        if self.journal is not None:
            self.journal.pin(n.id)  # it waits: keep its journal entry
        # Its deadline runs while it waits for a slot: the slots may all be held by
        # handlers that ignore their cancellation (answered at their deadline, they run
        # on until they return, each in its slot).
        deadlines = self._deadlines
        if deadlines is None:
            deadlines = self._deadlines = current_deadlines()
        self._parked_entry = deadlines.add(received + self.settings.deadline,
                                           partial(self._parked_expired, parked))
        self._unpoll()
        self._wake_up()

    def _parked_expired(self, parked: _Parked) -> None:
        """The parked notification's deadline passed before a slot was free for it
        (called by the Deadlines task): answer it ``on_error`` and read again."""
        if self._parked is not parked:
            return
        self._parked = None
        self._parked_entry = None  # (the heap popped it)
        n, links, index, received, _allowed, _wanted = parked
        try:
            self._missed(n, received, links[index].policy)
        except Exception as exc:
            self.on_failure(exc)
        self._wake_up()  # run() reads again (or, ending, stops waiting for it)
        self._progress()

    def _cancel_parked_deadline(self) -> None:
        if self._parked_entry is not None:
            assert self._deadlines is not None
            self._deadlines.cancel(self._parked_entry)
            self._parked_entry = None

    def _progress(self) -> None:
        """A call was answered or a slot freed: wake what waits for that (run()'s
        parked notification, an orderly end)."""
        if self._slot_freed is not None:
            self._slot_freed.set()
            self._slot_freed = None

    def _prefetch(self, n: Notification, links: tuple[Link, ...], index: int,
                  received: float, allowed: Outcome | None, wanted: tuple[int, ...],
                  inline: bool = True, values: list[bytes] | None = None) -> bool:
        """Read the paths ``wanted`` that ``links[index]`` declared, before its handler
        runs, without a task: True if they are read already (within the read pool's
        inline wait, or failed at once), and the caller goes on with the handler; False
        if the decision waits, parked (no slot) or for :meth:`_prefetched`, which the
        read pool's delivery calls with the results.

        A waiting decision holds an async slot (``inflight``) and its journal entry,
        counts in ``_carried`` (stop_reading() waits for it), and has its deadline in the
        daemon's one :class:`~supervisor.deadlines.Deadlines` heap instead of a cancel
        scope of its own: at the deadline it is answered ``on_error`` and its reads are
        dropped (:meth:`_prefetch_expired`). With ``inline`` False it is never True: the
        results are delivered, even an error found before any read; ``values`` (with
        ``inline`` False): the paths ``wanted`` read already, delivered as they are."""
        if self.inflight >= self._max_inflight:
            self._park(n, links, index, received, allowed, wanted)  # (not asked again)
            return False
        paths = n._read_paths()
        indexes: list[int] = []
        addresses: list[int] = []
        for i in wanted:
            try:
                addresses.append(n._address(n.pointer(i)))
            except TargetMemoryError as exc:  # refused without reading, as read_path does
                paths[i] = exc
            else:
                indexes.append(i)
        if not indexes and inline:
            return True
        record = _Prefetch(self, n, links, index, received, allowed, indexes)
        got = self.memory.read_cstrings_soon(n.id, n.pid, addresses, PATH_MAX, record,
                                             inline=inline, values=values)
        if isinstance(got, list):
            for i, value in zip(indexes, got, strict=True):
                paths[i] = value
            return True
        record.reads = got
        self.inflight += 1
        self._carried += 1
        if self.journal is not None:
            self.journal.pin(n.id)
        self._prefetching[n.id] = record
        deadlines = self._deadlines
        if deadlines is None:
            deadlines = self._deadlines = current_deadlines()
        record.entry = deadlines.add(received + self.settings.deadline, record.expired)
        return False

    def _read_later(self, n: Notification, links: tuple[Link, ...], index: int,
                    received: float, allowed: Outcome | None, wanted: tuple[int, ...],
                    values: list[bytes] | None = None) -> None:
        """Called by the compiled poll round (supervisor/_hotloop.c, round_finish) for a
        decision whose declared paths ``wanted`` (of ``links[index]``) it did not read in
        their common case: not read within the round's wait, a read that failed or was
        refused, a call no longer valid. They are read as :meth:`_prefetch` reads them,
        through the pool, and the decision goes on when they are delivered: never here,
        as a round carries one suspended decision at most. ``values``: the paths, read
        and race-checked by the round already, for a decision that only an earlier
        one of the round that suspended keeps from going on there: delivered as read."""
        n._read_memory = False  # (as _decide_received sets it for this handler)
        self._prefetch(n, links, index, received, allowed, wanted, inline=False,
                       values=values)

    def _prefetched(self, record: _Prefetch, values: list[bytes | Exception]
                    ) -> Suspended | None:
        """The paths of a waiting decision were read (called by the read pool's delivery
        task): go on with its link's handler, synchronously, and answer; returns the
        decision if a coroutine handler suspends after all, for that task to carry on."""
        n = record.n
        if self._prefetching.get(n.id) is not record:
            return None  # answered at its deadline, or the session ended: dropped
        del self._prefetching[n.id]
        self._finish_waiting(record)
        paths = n._read_paths()
        for i, value in zip(record.wanted, values, strict=True):
            paths[i] = value
        suspended: Suspended | None = None
        try:
            # Its slot is given back first: the decision goes on as if inline (a handler
            # that suspends takes one again in _suspend; one is free).
            if self._resume is not None:
                suspended = self._resume(self, n, record.links, record.index,
                                         record.received, record.allowed)
            else:
                suspended = self._decide_received(n.id, n.pid, n.nr, 0, n.args,
                                                  record.received, n, record.links,
                                                  record.index, record.allowed,
                                                  resumed=True)
        except Exception as exc:  # what on_ready raising is
            self.on_failure(exc)
        if (suspended is None and n.id not in self._prefetching
                and (self._parked is None or self._parked[0] is not n)):
            self._unpin(n.id)  # answered (or gone): no other waiter holds its entry
        self.carried(None)
        return suspended

    def _prefetch_expired(self, record: _Prefetch) -> None:
        """A waiting decision's deadline passed (called by the Deadlines task): answer it
        ``on_error``, drop its reads (not started yet: their place goes back)."""
        n = record.n
        if self._prefetching.get(n.id) is not record:
            return
        del self._prefetching[n.id]
        record.entry = None  # (the heap popped it)
        self._finish_waiting(record)
        try:
            self._missed(n, record.received, record.links[record.index].policy)
        except Exception as exc:
            self.on_failure(exc)
        self.carried(None)

    def _finish_waiting(self, record: _Prefetch) -> None:
        """``record`` no longer waits: its reads, deadline and slot go."""
        if record.reads is not None:
            record.reads.cancel()
            record.reads = None
        if record.entry is not None:
            assert self._deadlines is not None
            self._deadlines.cancel(record.entry)
            record.entry = None
        self.inflight -= 1
        self._progress()

    async def _read_declared(self, n: Notification, wanted: tuple[int, ...]) -> None:
        """:meth:`_prefetch` for a decision that has a task (parked, recovered): read
        the paths ``wanted`` one after another, each result or error kept for
        ``n.path()``."""
        paths = n._read_paths()
        for i in wanted:
            try:
                paths[i] = await self.memory.read_cstring(n.id, n.pid,
                                                          n._address(n.pointer(i)), PATH_MAX)
            except Exception as exc:
                paths[i] = exc

    def _read_elsewhere(self) -> None:
        """A RECV blocked after POLLIN: another process reads this listener too (it
        kept a copy after the handoff). Its notifications cannot all be ours to answer
        and each such RECV stalls the loop: end the session, in good order (the ones
        received get their decisions, see :meth:`run`; then the fd is closed and the
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
            self._start_decision(n, links, 0, received)

    def _start_parked(self) -> None:
        """Start the async decision of the parked notification: a slot is free. (Until
        then it stays parked, and the session's end answers it if it comes first.)"""
        assert self._parked is not None
        n, links, index, received, allowed, wanted = self._parked
        self._parked = None
        self._cancel_parked_deadline()  # (the decision's own takes over)
        self._start_decision(n, links, index, received, allowed, wanted)

    def _start_decision(self, n: Notification, links: tuple[Link, ...], index: int,
                        received: float, allowed: Outcome | None = None,
                        asked: tuple[int, ...] | None = None) -> None:
        """Decide ``n`` from ``links[index]`` in a task of its own, under the deadline (a
        parked or recovered notification): it takes a slot and waits in ``_waiting``
        until answered. A system task, as a suspended decision's poller task is: the
        session's end does not wait for a handler that ignores its cancellation (its
        call is answered, see _Waiting)."""
        self.inflight += 1
        self._carried += 1
        current = [links[index].policy if index < len(links) else UNHANDLED_POLICY]
        waiting = self._wait(n, received, current)
        trio.lowlevel.spawn_system_task(
            partial(self._decide_async, waiting, links, index, allowed, asked),
            name=f"seccomp-supervisor decision {n.id:#x}")

    def stop_reading(self, *, keep_fd: bool = False) -> None:
        """Receive no more notifications: the ones still pending wait in the kernel for
        whoever reads this filter next. :meth:`run` returns once the ones already received
        are answered (each by its deadline). With ``keep_fd`` the fd is left open for the
        caller (a takeover)."""
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
                except BaseException as exc:
                    if _daemon_own(exc):
                        raise
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
        waiting = self._wait(n, received, current)
        rest = self._decide(n, links, index, received, current, (coro, trap), allowed)
        rest.send(None)  # runs up to the handler's trap, and yields it again
        return Suspended(rest, trap, self._deadline(received), waiting.expired,
                         self.carried, waiting)

    def _wait(self, n: Notification, received: float, current: list[str]) -> _Waiting:
        """``n``'s decision waits in a task from now on: in ``_waiting`` until answered,
        its deadline in the daemon's heap. At that deadline the call is answered
        ``on_error`` and the carrying task cancelled (:meth:`_waiting_expired`): the
        answer does not depend on the handler obeying its cancellation."""
        waiting = self._waiting[n.id] = _Waiting(self, n, received, current)
        deadlines = self._deadlines
        if deadlines is None:
            deadlines = self._deadlines = current_deadlines()
        waiting.entry = deadlines.add(received + self.settings.deadline, waiting.expired)
        return waiting

    def _stop_waiting(self, waiting: _Waiting) -> None:
        """``waiting`` (out of ``_waiting`` now) was answered by someone other than its
        decision: drop its deadline and cancel what carries it. What the decision
        returns later is not sent, counted or recorded."""
        waiting.answered = True
        if waiting.entry is not None:
            assert self._deadlines is not None
            self._deadlines.cancel(waiting.entry)
            waiting.entry = None
        if waiting.scope is not None:
            waiting.scope.cancel()

    def _waiting_expired(self, waiting: _Waiting) -> None:
        """The deadline of a decision in ``_waiting`` passed (the heap's, or its cancel
        scope's if trio saw that first): answer ``on_error`` now, whether or not its
        handler obeys the cancellation, then cancel it."""
        n = waiting.n
        if self._waiting.get(n.id) is not waiting:
            return  # answered already
        del self._waiting[n.id]
        try:
            self._missed(n, waiting.received, waiting.current[0])
        except Exception as exc:  # (a daemon error)
            self.on_failure(exc)
        finally:
            self._stop_waiting(waiting)  # then the handler is cancelled
        self._progress()

    def _run_sync(self, n: Notification, link: Link) -> Outcome | None:
        try:
            result = link.func(n)
            decision = check_result(result, link.policy, read_memory=n.read_memory)
        except NotificationGone:
            raise
        except BaseException as exc:
            if _daemon_own(exc):
                raise
            return self._failure(link.policy, n, exc)
        return None if decision is None else Outcome(decision, link.policy)

    async def _decide(self, n: Notification, links: Sequence[Link], start: int,
                      received: float, current: list[str],
                      started: tuple[Coroutine[Any, Any, object], Any] | None = None,
                      allowed: Outcome | None = None,
                      asked: tuple[int, ...] | None = None) -> None:
        """Ask the chain from ``links[start]`` on and answer; free the slot. The deadline
        is the caller's: its cancellation goes through (``current[0]`` names the policy
        being asked). ``started``: the coroutine of ``links[start]``'s handler, already
        suspended at the trap given with it (see :meth:`_suspend`). ``allowed``: the
        allow of an earlier link, the answer unless a later one decides otherwise (see
        :meth:`on_ready`). ``asked``: the paths of ``links[start]`` still to read, its
        paths function already asked (a decision parked after it ran: see :meth:`_park`)."""
        try:
            outcome = None
            for link in links[start:]:
                if n.id not in self._waiting:
                    # Answered at its deadline (or the session's end) while a handler
                    # ignored its cancellation: no later link is asked.
                    self._dropped(n, received, current[0])
                    return
                current[0] = link.policy  # names the policy that overran, on a deadline
                if started is None:
                    n._read_memory = False  # per handler (the started one was reset)
                    wanted: tuple[int, ...] = ()
                    if asked is not None:  # (links[start]'s: policy code runs once)
                        wanted, asked = asked, None
                    elif link.paths is not None:
                        try:
                            wanted = _unread_paths(n, link)
                        except NotificationGone:
                            raise
                        except BaseException as exc:
                            if _daemon_own(exc):
                                raise
                            outcome = self._failure(link.policy, n, exc)
                            break
                    if wanted:
                        await self._read_declared(n, wanted)
                if not link.coroutine:
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
                    except BaseException as exc:
                        if _daemon_own(exc):
                            raise
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
            if n.id in self._waiting:  # (else its deadline or the session's end answered it)
                self._answer(n.id, n.pid, n.syscall, n.args, received, outcome)
                # Only now: had answering raised (a daemon error), the end answers it.
                self._answered_waiting(n.id)
            else:
                self._dropped(n, received, current[0])
            self._unpin(n.id)
        except NotificationGone as gone:
            if n.id not in self._waiting:
                pass  # answered at its deadline or by the session's end
            elif self._still_waits(n.id):  # policy code said so, not the kernel
                self._answer(n.id, n.pid, n.syscall, n.args, received,
                             self._failure(current[0], n, gone))
            else:
                self.stats.gone += 1
                self.recorder.gone(gone.stage)
            self._answered_waiting(n.id)
            self._unpin(n.id)
        finally:
            self.inflight -= 1
            self._progress()

    def _dropped(self, n: Notification, received: float, policy: str) -> None:
        """A handler that ignored its cancellation returned after ``n`` was answered
        (at its deadline, or by the session's end): what it decided is dropped."""
        log.info("container %s: %s handler of policy %s returned %.3gs after the call "
                 "was received, answered on_error already: its result is dropped",
                 self.container.id, n.syscall, policy, perf_counter() - received)

    def _answered_waiting(self, notif_id: int) -> None:
        """The decision of ``notif_id`` answered it itself (or met its withdrawal): it
        waits no more, and its deadline goes."""
        waiting = self._waiting.pop(notif_id, None)
        if waiting is not None and waiting.entry is not None:
            assert self._deadlines is not None
            self._deadlines.cancel(waiting.entry)
            waiting.entry = None

    async def _decide_async(self, waiting: _Waiting, links: Sequence[Link], start: int,
                            allowed: Outcome | None = None,
                            asked: tuple[int, ...] | None = None) -> None:
        """:meth:`_decide` as a system task of its own, under the deadline (see
        :meth:`_start_decision`). What it raises (a daemon error) is the session's
        failure, as for a decision a poller task carries."""
        n, received, current = waiting.n, waiting.received, waiting.current
        failure: Exception | None = None
        with trio.CancelScope(deadline=self._deadline(received)) as scope:
            waiting(scope)
            try:
                await self._decide(n, links, start, received, current, None, allowed,
                                   asked)
            except Exception as exc:
                failure = exc
        if scope.cancelled_caught:
            waiting.expired()
        self.carried(failure)

    def _deadline(self, received: float) -> float:
        """The trio time by which a notification received at ``received`` (perf_counter)
        must be answered."""
        return trio.current_time() + self.settings.deadline - (perf_counter() - received)

    def _missed(self, n: Notification, received: float, policy: str) -> None:
        """``n``'s decision overran the deadline, asking ``policy``: answer ``on_error``."""
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

    def _still_waits(self, notif_id: int) -> bool:
        """After a NotificationGone from a decision: True if the kernel still waits for
        an answer to ``notif_id`` after all. Policy code raises it too (path_guard after
        its own ID_VALID check), and a buggy policy for a call that still waits: taken
        for the kernel's word, the call got no answer and its caller hung, past any
        deadline, until it was killed. (Only on this path: one ioctl.)"""
        try:
            return self.notify.id_valid(notif_id)
        except OSError:  # (the fd was closed: the session ended)
            return False

    def _unpin(self, notif_id: int) -> None:
        """A decision that waited was answered: its journal entry may go (see
        supervisor/journal.py: an inline decision's needs no such step)."""
        if self.journal is not None:
            self.journal.unpin(notif_id)

    def _failure(self, policy: str, n: Notification, exc: BaseException) -> Outcome:
        """The Outcome of a call whose policy code raised ``exc``, whatever ``exc`` is
        (policy code made it, and its __str__ may raise). Raising here would end the
        session (on_failure) with the call unanswered."""
        text = _exception_text(exc)
        if isinstance(exc, TargetMemoryError):
            # The target passed a bad pointer: answer what the kernel would have. (A
            # policy may raise one itself, with any errno: not one to answer, then.)
            try:
                return Outcome(deny(exc.errno, reason=text), policy, "memory", text)
            except ValueError:
                pass
        kind: str = "refused" if isinstance(exc, PolicyError) else "exception"
        log.warning("container %s: policy %s failed on %s: %s: %s", self.container.id,
                    policy, n.syscall, type(exc).__name__, text,
                    exc_info=kind == "exception")
        return Outcome(self.settings.on_error, policy, kind,  # type: ignore[arg-type]
                       f"{type(exc).__name__}: {text}")

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


def _exception_text(exc: BaseException) -> str:
    """str(exc), or a placeholder if its __str__ (policy code) fails."""
    try:
        text = str(exc)
    except Exception:
        return "<str() failed>"
    return text if text.__class__ is str else str.__str__(text)  # (a str subclass's copy)


# What a handler raises is the call's on_error answer, but for the daemon's own
# exceptions (errors.is_daemon_own).
_daemon_own: Final = is_daemon_own


# ADDFD|SEND errors after which the kernel already counts the call as answered: EINTR
# (a signal during its wait; send_fd blocks signals, so only as a safety net) and
# EINPROGRESS (the same ioctl restarted after the interruption).
_ADDFD_ALREADY_ANSWERED: Final = frozenset({errno.EINTR, errno.EINPROGRESS})


# Tuples a paths function returned that path_indexes() accepted (a handful in practice),
# each its own value: a tuple found equal to one of them is replaced by it (an element
# can compare equal to an index and be another one: it is the checked one that is read).
_VALID_PATHS: Final[dict[tuple[int, ...], tuple[int, ...]]] = {}


def _unread_paths(n: Notification, link: Link) -> tuple[int, ...]:
    """The paths ``link`` declared for ``n`` that were not read yet. Runs the link's
    ``paths`` function if it has one: what that raises is the handler's error."""
    spec = link.paths
    if spec.__class__ is not tuple:
        assert callable(spec)
        spec = spec(n)
        checked = _VALID_PATHS.get(spec) if spec.__class__ is tuple else None
        if checked is None:
            checked = path_indexes(spec, f"policy {link.policy!r}: the paths of {n.syscall}")
            if len(_VALID_PATHS) < 4096:
                _VALID_PATHS[checked] = checked
        spec = checked
    assert isinstance(spec, tuple)
    paths = n._read_paths()
    if not paths:
        return spec
    return tuple(i for i in spec if i not in paths)


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


if accel.HOTLOOP is not None:  # what its fast path recognises (exact types)
    accel.HOTLOOP.setup(Session, Notification, Link, Decision, Outcome, Recorder,
                        _unread_paths)
