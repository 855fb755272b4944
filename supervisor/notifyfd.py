"""The owner of one seccomp listener fd, the only caller of the notify ioctls, and the
poller that tells sessions when their fd has something to read.

Facts this relies on (verified on the target kernel, DESIGN.md §4):

* RECV ignores O_NONBLOCK: with nothing pending it blocks the calling thread, and so the
  whole event loop. It is only called once poll/epoll showed POLLIN, at most once per
  POLLIN seen, by the fd's only reader. That cannot block: POLLIN means a notification
  in state INIT exists, which means the kernel's count of receivable requests is >= 1;
  only RECV decrements that count, and a notification withdrawn meanwhile (the target
  got a signal or died) keeps its count, so RECV then returns ENOENT at once.
* RECV needs a zeroed ``struct seccomp_notif`` every time; otherwise EINVAL, forever.
* POLLHUP means no task uses the filter any more; it stays set (RECV then gives ENOENT at
  once), so the owner must close the fd and stop, or it spins.
* ENOENT from RECV, SEND, ADDFD or ID_VALID is routine: the call was withdrawn (target
  killed, signalled, stopped) or the id is stale.

That one-reader rule is ours to keep only inside this process. Whoever handed a listener
over may keep a copy and RECV on it too (verified: with a second process looping in
RECV on its copy, ~0.3% of this process's RECVs after POLLIN blocked, each until the
filter's next call). So a RECV that blocks is cut short: a watchdog thread
(:func:`watch_recv`) sends the RECV's thread ``SIGURG`` (a no-op handler without
``SA_RESTART``) when one RECV has lasted over :data:`RECV_WATCH_INTERVAL`; RECV waits in
``down_interruptible`` and returns EINTR, which :meth:`NotifyFd.recv` raises as
:class:`RecvBlocked`. The event loop is then stalled at most twice that interval, and
the session ends: a listener somebody else reads cannot be served.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import logging
import os
import select
import signal
import struct
import threading
import time
import types
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Final, NamedTuple, Protocol, TypeVar

import trio
from trio.lowlevel import RunVar

from . import abi, accel
from .errors import NotificationGone

log = logging.getLogger("supervisor.notifyfd")

POLLIN: Final = select.POLLIN
POLL_END: Final = select.POLLHUP | select.POLLERR | select.POLLNVAL
_ZERO_NOTIF: Final = bytes(abi.NOTIF_SIZE)
_unpack_head: Final = abi.NOTIF_HEAD.unpack_from
_unpack_args: Final = abi.NOTIF_ARGS.unpack_from
_ARGS_OFFSET: Final = abi.NOTIF_ARGS_OFFSET
_pack_resp_into: Final = abi.NOTIF_RESP.pack_into
_ioctl: Final = fcntl.ioctl
_RECV: Final = abi.IOCTL_NOTIF_RECV
_SEND: Final = abi.IOCTL_NOTIF_SEND
_ALL_SIGNALS: Final = signal.valid_signals()
T = TypeVar("T")

#: A RECV still running after between one and two of these seconds is interrupted.
RECV_WATCH_INTERVAL: Final = 0.1
_WATCH_SIGNAL: Final = signal.SIGURG  # ignored by default: a stray one does nothing


class RecvBlocked(Exception):
    """A RECV blocked although poll had shown POLLIN: another reader (a process that kept
    a copy of the listener) took the notification. The watchdog interrupted it."""


class _RecvWatch:
    """What the watchdog thread looks at: ``calls`` is incremented when a RECV begins
    and again when it ends, so it is odd while one runs (two attribute increments are
    all the hot path pays)."""

    __slots__ = ("calls", "interrupted", "thread", "warned")

    def __init__(self) -> None:
        self.calls = 0
        self.interrupted = 0
        self.thread = 0
        self.warned = False

    def run(self, interval: float, compiled: Callable[[], int]) -> None:
        """Watch the RECVs of this module, and those of the compiled loop counted by
        ``compiled`` (``int``, always 0, while the compiled watchdog watches them)."""
        seen = 0
        while True:
            time.sleep(interval)
            calls = self.calls + compiled()
            if calls & 1 and calls == seen:
                # The same RECV was running at the last look: over `interval` already.
                self.interrupted += 1
                signal.pthread_kill(self.thread, _WATCH_SIGNAL)
            seen = calls


_WATCH: Final = _RecvWatch()


def _forked() -> None:
    # In a forked child only the forking thread runs on: neither watchdog is there.
    _WATCH.thread = 0
    _WATCH.calls = 0


os.register_at_fork(after_in_child=_forked)


def _ignore_signal(signum: int, frame: object) -> None:
    pass


def watch_recv(interval: float = RECV_WATCH_INTERVAL) -> bool:
    """Start the watchdog that interrupts a blocked RECV (see the module docstring) for
    RECVs made in this thread, once per process. Only the main thread may install the
    signal handler: from another thread (or with SIGURG already handled by someone
    else) nothing is done and False is returned."""
    if _WATCH.thread:
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(_WATCH_SIGNAL) not in (signal.SIG_DFL, signal.SIG_IGN):
        log.warning("SIGURG has a handler already: a RECV that blocks is not interrupted")
        return False
    # signal.signal() installs the handler without SA_RESTART: RECV returns EINTR.
    signal.signal(_WATCH_SIGNAL, _ignore_signal)
    _WATCH.thread = threading.get_ident()
    # The compiled loop's RECVs (supervisor/_hotloop.c) are watched by a watchdog of its
    # own, which needs no GIL: they hold it from then on. If that one cannot start, this
    # one adds their count (at most one of the two counters is odd at a time: one
    # thread RECVs, so the sum is odd while a RECV runs) and they let the GIL go.
    hotloop = _hotloop_at_import
    compiled: Callable[[], int] = int
    if hotloop is not None and not hotloop.watch_recv(interval, _WATCH_SIGNAL):
        compiled = hotloop.recv_calls
    threading.Thread(target=_WATCH.run, args=(interval, compiled), daemon=True,
                     name="seccomp-supervisor RECV watchdog").start()
    return True


# Taken at import, whichever loop a poller then runs (tests switch it per test): RECVs
# made by the compiled module are watched as long as it is loaded.
_hotloop_at_import: Final = accel.HOTLOOP


# What NotifyFd.recv() returns: id, pid, nr, arch, args (a plain tuple: the hot loop
# unpacks it at once, and a NamedTuple costs a Python-level constructor call).
RecvResult = tuple[int, int, int, int, tuple[int, ...]]


class NotifyFd:
    """Owns one listener fd. Not safe to share between reader tasks: exactly one task
    waits on it and receives from it; any task may answer."""

    __slots__ = ("_buf", "_compiled_id_valid", "_fd", "_poll", "_resp", "_view")

    def __init__(self, fd: int) -> None:
        self._fd = fd
        # The compiled loop's ID_VALID (it keeps the GIL), or None: the Python one below.
        self._compiled_id_valid: Callable[[int, int], bool] | None = (
            None if accel.HOTLOOP is None else accel.HOTLOOP.id_valid)
        # fcntl.ioctl takes mutable buffers first: given bytes, it formats an error
        # message (snprintf) for the failed attempt before it tries again, which cost 5%
        # of the daemon's CPU. So RECV and SEND each get a preallocated bytearray.
        self._buf = bytearray(abi.NOTIF_SIZE)
        # Zeroing through a memoryview is a plain copy: 70 ns, where the bytearray's own
        # slice assignment (which may resize) takes 150.
        self._view = memoryview(self._buf)
        self._resp = bytearray(abi.NOTIF_RESP_SIZE)
        self._poll: select.poll | None = None  # made by poll_now(), which sessions don't use

    def __repr__(self) -> str:
        return f"<NotifyFd {self._fd}>"

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def fileno(self) -> int:
        return self._fd

    @property
    def recv_buffer(self) -> bytearray:
        """The ``struct seccomp_notif`` the last :meth:`recv` filled (the same buffer,
        overwritten by every RECV): the in-flight journal copies it as is."""
        return self._buf

    async def wait_readable(self) -> None:
        """Wait until a notification is pending or the filter lost its last task."""
        await trio.lowlevel.wait_readable(self._fd)

    def poll_now(self) -> int:
        """The fd's poll events right now (zero timeout): POLLIN, POLLHUP... or 0."""
        if self._poll is None:
            self._poll = select.poll()
            self._poll.register(self._fd, select.POLLIN)
        for _fd, events in self._poll.poll(0):
            return events
        return 0

    def recv(self) -> RecvResult | None:
        """Receive one notification; None when it was withdrawn meanwhile (ENOENT).

        Only call once per POLLIN seen (from :meth:`poll_now` or the :class:`Poller`),
        from the fd's one reader. Returns the ``seccomp_notif`` fields the supervisor
        uses: ``(id, pid, nr, arch, args)``, ``args`` the six call arguments.

        Raises RecvBlocked if the RECV blocked (another process took the notification)
        and was interrupted by a signal (the watchdog's, see :func:`watch_recv`).
        """
        buf = self._buf
        self._view[:] = _ZERO_NOTIF
        watch = _WATCH
        watch.calls += 1  # odd: a RECV runs (see _RecvWatch)
        try:
            _ioctl(self._fd, _RECV, buf, True)
        except OSError as exc:
            watch.calls += 1
            if exc.errno == errno.ENOENT:
                return None
            if exc.errno == errno.EINTR:
                # Only a RECV that waited can be interrupted: nothing was pending.
                raise RecvBlocked(f"RECV on fd {self._fd} blocked") from None
            raise
        watch.calls += 1
        notif_id, pid, nr, arch = _unpack_head(buf)
        return notif_id, pid, nr, arch, _unpack_args(buf, _ARGS_OFFSET)

    def send(self, notif_id: int, val: int, error: int, flags: int) -> None:
        """Answer a notification. Raises NotificationGone("send") on ENOENT."""
        resp = self._resp
        _pack_resp_into(resp, 0, notif_id, val, error, flags)
        while True:
            try:
                _ioctl(self._fd, _SEND, resp, True)
                return
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    raise NotificationGone("send") from None
                if exc.errno != errno.EINTR:
                    raise
                # A signal while the kernel waited for the listener's lock
                # (mutex_lock_interruptible, before anything else): nothing was answered,
                # so the same answer is sent again.

    def send_fd(self, notif_id: int, srcfd: int, *, cloexec: bool) -> int:
        """Install ``srcfd`` in the target and answer the call with its number there
        (ADDFD with ADDFD_FLAG_SEND: both happen atomically). Returns the target's fd.

        Raises NotificationGone("addfd") on ENOENT. The caller still owns ``srcfd``.
        """
        # The kernel returns the new fd number as the ioctl's result; a mutable buffer
        # makes fcntl.ioctl hand back that result instead of a copy of the argument.
        buf = bytearray(abi.pack_addfd(notif_id, srcfd, cloexec=cloexec, send=True))
        # With ADDFD_FLAG_SEND the kernel marks the call answered *before* it waits for
        # the target to install the fd. A signal to this thread during that wait makes
        # the kernel drop the fd, and the target's call then returns 0: its stdin
        # (tests/test_session.py shows it with a signal storm). Signals stay pending
        # for the few microseconds of the wait; a target that dies or is frozen
        # releases it with ESRCH.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _ALL_SIGNALS)
        try:
            return int(fcntl.ioctl(self._fd, abi.IOCTL_NOTIF_ADDFD, buf, True))
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise NotificationGone("addfd") from None
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    def id_valid(self, notif_id: int) -> bool:
        """True while the kernel still waits for an answer to ``notif_id``."""
        if self._compiled_id_valid is not None:  # the GIL held: see _hotloop.id_valid
            return self._compiled_id_valid(self._fd, notif_id)
        try:
            # A new bytearray: see __init__; and memory reads call this from threads.
            fcntl.ioctl(self._fd, abi.IOCTL_NOTIF_ID_VALID,
                        bytearray(struct.pack("<Q", notif_id)), True)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True

    def set_sync_wakeup(self, on: bool = True) -> bool:
        """Ask the kernel to wake the target on the answering CPU (Linux >= 6.6), or,
        with ``on=False``, not to. The flag belongs to the filter, so every fd of it
        sees it. The :class:`Poller` decides when it is worth it.

        Returns False when the kernel does not know the flag.
        """
        return set_sync_wakeup(self._fd, on)

    def close(self) -> None:
        """Close the fd (once). Every call the filter notifies from now on gets ENOSYS
        unless another process holds a copy of the listener."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            if self._poll is not None:
                self._poll.unregister(fd)
            trio.lowlevel.notify_closing(fd)
            os.close(fd)


def set_sync_wakeup(fd: int, on: bool) -> bool:
    """SECCOMP_IOCTL_NOTIF_SET_FLAGS on listener ``fd``: the target of an answer is woken
    on the answering CPU (``on``) or wherever the scheduler likes. It only changes speed,
    so any failure just returns False: a kernel < 6.6 (EINVAL), an fd that is no listener
    (ENOTTY), a signal while the kernel waited for the filter's lock (EINTR)."""
    try:
        # The argument is passed by value, not through a pointer; it replaces the flags.
        fcntl.ioctl(fd, abi.IOCTL_NOTIF_SET_FLAGS, abi.USER_NOTIF_FD_SYNC_WAKE_UP if on else 0)
    except OSError:
        return False
    return True


def is_seccomp_listener(fd: int) -> bool:
    """True if ``fd`` is a seccomp user-notification listener."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:seccomp notify"
    except OSError:
        return False


class Reader(Protocol):
    """What the :class:`Poller` calls. ``on_ready`` gets the fd's epoll events and does at
    most one RECV per call; it should not raise: if it does, the fd is unregistered and
    ``on_failure`` gets the exception. It returns a :class:`Suspended` coroutine when work
    it started in this task has to wait for something."""

    def on_ready(self, events: int) -> Suspended | None: ...

    def on_failure(self, exc: Exception) -> None: ...


class Suspended(NamedTuple):
    """A coroutine that suspended (yielded ``trap`` to trio) in the poller task, which must
    now carry it on: nothing else may run in that task before ``trap`` reaches trio.

    ``deadline`` (trio time) cancels it; then ``on_deadline()`` is called. ``done(exc)``
    is called at the end in any case, with the exception it raised, if any.
    ``carried_under(scope)``, if given, is called when the carrying starts with the
    cancel scope it runs under: cancelling that scope ends it as its deadline would
    (a session that ends answers its decisions itself, see Session._end_decisions).
    """

    coro: Coroutine[Any, Any, None]
    trap: Any
    deadline: float
    on_deadline: Callable[[], None]
    done: Callable[[Exception | None], None]
    carried_under: Callable[[trio.CancelScope], None] | None = None


async def carry_suspended(suspended: Suspended, scope: trio.CancelScope
                          ) -> Exception | None:
    """Carry ``suspended`` on to its end in the task it suspended in, under its deadline,
    which ``scope`` gets now: the task entered ``scope`` before the decision's first step
    ran, so any cancel scope the handler entered nests inside it. Returns what the
    decision raised. After ``scope`` exited, :func:`suspended_ended`."""
    scope.deadline = suspended.deadline
    if suspended.carried_under is not None:
        suspended.carried_under(scope)
    try:
        await carry_on(suspended.coro, suspended.trap)
    except Exception as exc:
        return exc
    return None


def suspended_ended(suspended: Suspended, scope: trio.CancelScope,
                    failure: Exception | None) -> None:
    """``suspended``'s end, after :func:`carry_suspended` in ``scope`` (exited):
    ``on_deadline()`` if the deadline cut it off, then ``done()`` in any case."""
    try:
        if scope.cancelled_caught:
            suspended.on_deadline()
    except Exception as exc:
        failure = failure or exc
    suspended.done(failure)


def first_step(coro: Coroutine[Any, Any, T]) -> tuple[bool, Any]:
    """Run ``coro`` up to where it first waits: ``(True, its return value)`` if it
    finished without waiting, else ``(False, the trap it yielded to trio)``, to be passed
    to :func:`carry_on` in this same task.

    A function of its own for speed: the return value comes with a StopIteration, and on
    CPython 3.11 before 3.11.7 an exception costs time in proportion to how far into the
    catching function it was raised (gh-109181; Debian 12 ships 3.11.2). Caught here, that
    is a few bytecodes; caught in the hot loop, it was 10,000 instructions.
    """
    try:
        return False, coro.send(None)
    except StopIteration as finished:
        return True, finished.value


@types.coroutine
def carry_on(coro: Coroutine[Any, Any, T], trap: Any) -> Generator[Any, Any, T]:
    """What ``await coro`` would do from the point where ``coro`` yielded ``trap``: pass
    trap and reply between trio and the coroutine until it returns, and return its
    value. (The trap belongs to this task: the coroutine ran in it; trap values cannot
    move to another task.)"""
    while True:
        try:
            reply = yield trap
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:
            try:
                trap = coro.throw(exc)
            except StopIteration as finished:
                return finished.value  # type: ignore[no-any-return]
        else:
            try:
                trap = coro.send(reply)
            except StopIteration as finished:
                return finished.value  # type: ignore[no-any-return]


# Poller._generation values, process-wide: no two states of any two pollers share one.
_GENERATIONS: Final = itertools.count()


class Poller:
    """One epoll set for the notify fds of a trio run, and the one task that waits on it.

    trio's ``wait_readable`` costs a one-shot epoll_ctl re-arm and a pass of the scheduler
    for every wake-up of every fd. Here one wake-up serves every fd that is ready, and an
    fd that is busy again by the time its answer went out is served again without
    sleeping. The set is level-triggered, so each round (``epoll.poll(0)``) reports every
    fd with a notification pending, once: each gets one RECV per round, and a busy
    container cannot starve the others. After about :data:`EVENTS_PER_YIELD` events
    served without sleeping, the task lets the rest of the daemon run (a trio
    checkpoint).

    When a callback returns a :class:`Suspended` decision (an async handler waits for
    something), this task carries that decision on to its end and a new task, started at
    once, takes over the set: events of the round not handled yet are reported again to
    the new task (level-triggered), so none is lost and none is read twice.

    Sessions register their fd with :meth:`register` and unregister it before closing it.
    Everything runs in the trio thread; the callbacks run synchronously in this task.

    **Sync wake-up.** While exactly one fd is registered, it gets
    ``SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP``: the kernel then wakes the target on this CPU
    and, as this task goes back to sleep right after the answer, switches to it at once;
    measured, that makes one busy container's calls about twice as fast (bench/run.py,
    K=1). With more fds it is switched off on all of them: targets woken on this CPU
    wait there while the loop serves the other fds, and calls/s at K=100 dropped by a
    third with it.
    """

    # Events per epoll round. select.epoll.poll() allocates the kernel's event array per
    # call: up to 42 (12 bytes each, 512 bytes) come from Python's small-object allocator,
    # more from malloc, which cost ~600 instructions per round (callgrind), more than the
    # extra rounds save: a round of 32 events takes about 0.3 ms to serve anyway. The set
    # is level-triggered and the kernel moves reported fds to the end of its ready list,
    # so fds past the first 32 are served in the next rounds, in turn.
    MAX_EVENTS: Final = 32
    # A trio checkpoint costs as much as half a notification (a scheduler pass, ~5 us),
    # and the rest of the daemon (accept, control socket) only has to run every few ms:
    # 256 events take 2-4 ms to serve. Counted in events, not rounds, so the pause does
    # not grow with the number of busy fds (a round of 100 fds takes ~1 ms).
    EVENTS_PER_YIELD: Final = 256

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._readers: dict[int, Reader] = {}
        # A new value whenever _readers changes: the compiled round caches fd -> reader
        # while it stands (supervisor/_hotloop.c, find_reader).
        self._generation = next(_GENERATIONS)
        self._current: trio.lowlevel.Task | None = None  # the task polling the set
        # Times the polling task let the rest of the daemon run (slept or checkpointed):
        # see poller_turn().
        self.turns = 0

    def __len__(self) -> int:
        return len(self._readers)

    def register(self, fd: int, reader: Reader) -> None:
        if fd in self._readers:
            raise ValueError(f"fd {fd} is already registered")
        self._epoll.register(fd, select.EPOLLIN)
        self._readers[fd] = reader
        self._generation = next(_GENERATIONS)
        alone = len(self._readers) == 1
        set_sync_wakeup(fd, alone)  # also clears a flag set by a previous owner
        if len(self._readers) == 2:
            for other in self._readers:
                if other != fd:
                    set_sync_wakeup(other, False)

    def unregister(self, fd: int) -> None:
        """Stop watching ``fd`` (no-op if it is not registered). Call before closing it."""
        if self._readers.pop(fd, None) is not None:
            self._generation = next(_GENERATIONS)
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass  # already closed: the kernel dropped it from the set
            if len(self._readers) == 1:
                set_sync_wakeup(next(iter(self._readers)), True)

    async def run(self) -> None:
        """Serve the registered fds until cancelled (then close the epoll fd), or until a
        callback's decision suspended: then carry that on and leave the set to a
        successor task."""
        task = self._current = trio.lowlevel.current_task()
        epoll = self._epoll
        readers = self._readers
        wait_readable = trio.lowlevel.wait_readable
        checkpoint = trio.lowlevel.checkpoint
        max_events = self.MAX_EVENTS
        events_per_yield = self.EVENTS_PER_YIELD
        # The compiled round (supervisor/_hotloop.c), chosen when the task starts: the
        # same loop as below, a Session's on_ready included, in C. None: pure Python.
        compiled_round = accel.HOTLOOP.poll_round if accel.HOTLOOP is not None else None
        # The read pool whose inline reader reads the declared paths of a compiled
        # round's decisions while the round goes on (_hotloop.c, round_collect).
        read_pool = None
        if compiled_round is not None:
            from .memory import current_read_pool  # (memory imports this module)
            read_pool = current_read_pool()
        epoll_fd = epoll.fileno()
        suspended: Suspended | None = None
        # Entered once per task; it gets a deadline only when this task ends up carrying
        # a suspended decision (see the end), so the fast path never touches it.
        with trio.CancelScope() as scope:
            try:
                while suspended is None:
                    await wait_readable(epoll.fileno())
                    self.turns += 1
                    served = 0
                    while suspended is None and compiled_round is not None:
                        # Rounds until an empty one, a Suspended or events_per_yield
                        # events: the loop below, in C (one call, not one per round).
                        served, suspended = compiled_round(self, epoll_fd, readers,
                                                           max_events, events_per_yield,
                                                           read_pool)
                        if served < events_per_yield:
                            break  # the last round was empty, or one suspended
                        if suspended is None:
                            await checkpoint()
                            self.turns += 1
                    while suspended is None and compiled_round is None:
                        events = epoll.poll(0, max_events)
                        if not events:
                            break
                        # No await in here: an fd unregistered (and maybe closed and its
                        # number reused) by a callback of this round is skipped, not read.
                        for fd, mask in events:
                            reader = readers.get(fd)
                            if reader is None:
                                continue
                            try:
                                suspended = reader.on_ready(mask)
                            except Exception as exc:
                                self.unregister(fd)
                                reader.on_failure(exc)
                            if suspended is not None:
                                break
                        served += len(events)
                        if served >= events_per_yield and suspended is None:
                            served = 0
                            await checkpoint()
                            self.turns += 1
            finally:
                if self._current is task and suspended is None:
                    trio.lowlevel.notify_closing(epoll.fileno())
                    epoll.close()
            # A decision's coroutine is suspended in this task: hand the set over first,
            # then carry the decision on under its deadline.
            trio.lowlevel.spawn_system_task(self.run, name="seccomp-supervisor notify poller")
            failure: Exception | None = None  # (a deadline cancels the await below)
            failure = await carry_suspended(suspended, scope)
        assert suspended is not None  # the loop above only ends (not raising) with one
        suspended_ended(suspended, scope, failure)


_POLLER: RunVar[Poller] = RunVar("seccomp_supervisor_poller")


def poller_turn() -> tuple[int, int]:
    """How many times the running trio run's poller let the rest of the daemon run so far
    (:attr:`Poller.turns`), and how many listener fds it serves; (-1, 0) without a
    poller. (What a caller may block the event loop for depends on both, see
    memory.INLINE_BUDGET and memory.INLINE_WAIT_SHARED.)"""
    try:
        poller = _POLLER.get()
    except LookupError:
        return -1, 0
    return poller.turns, len(poller._readers)


def current_poller() -> Poller:
    """The :class:`Poller` of the running trio run, started on first use as a system task
    (it lives as long as the run, so every session of a daemon shares it)."""
    try:
        return _POLLER.get()
    except LookupError:
        pass
    poller = Poller()
    trio.lowlevel.spawn_system_task(poller.run, name="seccomp-supervisor notify poller")
    _POLLER.set(poller)
    if not watch_recv() and not _WATCH.warned:
        _WATCH.warned = True
        log.warning("the notify poller does not run in the main thread: a RECV that "
                    "blocks (a listener read by another process) is not interrupted")
    return poller
