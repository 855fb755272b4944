"""One task for the deadlines of every decision that waits.

A decision whose paths are being read (``Session._prefetch``) has no task and no cancel
scope: a scope per call cost more than the rest of the decision (issue 20). Its deadline
goes into the daemon's one :class:`Deadlines` heap instead, served by one system task that
sleeps until the earliest one. A decision that waits in a task (``Session._wait``), and a
notification parked for a slot, have theirs here too: at the deadline the call is
answered from this task, whether or not the handler obeys the cancellation that
follows (a thread trio does not abandon, a shielded scope).

Entries answered before their deadline are cancelled in place (marked, not searched for)
and dropped when they reach the top, or all at once when they outnumber the live ones.

Times are ``time.perf_counter()`` readings, like ``received`` in the session.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections.abc import Callable
from time import perf_counter
from typing import Final

import trio
from trio.lowlevel import RunVar

log = logging.getLogger("supervisor.deadlines")

#: A deadline in the heap: [when (perf_counter), order, what to call (None: cancelled)].
Entry = list[object]

_ORDER: Final = itertools.count()


class Deadlines:
    """Pending deadlines, earliest first; ``expire()`` of each is called at its time
    (in the trio thread, from this object's task) unless :meth:`cancel` came first."""

    def __init__(self) -> None:
        self._heap: list[Entry] = []
        self._live = 0
        self._scope: trio.CancelScope | None = None  # the task's sleep, while it sleeps
        self._started = False

    def __len__(self) -> int:
        return self._live

    def add(self, when: float, expire: Callable[[], None]) -> Entry:
        """Call ``expire()`` at ``when`` (perf_counter); returns the entry to cancel."""
        entry: Entry = [when, next(_ORDER), expire]
        heap = self._heap
        heapq.heappush(heap, entry)
        self._live += 1
        if not self._started:
            self._started = True
            trio.lowlevel.spawn_system_task(self._run, name="seccomp-supervisor deadlines")
        elif heap[0] is entry and self._scope is not None:
            # Earlier than the sleep: a cancel scope's deadline can be moved from outside.
            self._scope.deadline = trio.current_time() + when - perf_counter()
        return entry

    def cancel(self, entry: Entry) -> None:
        if entry[2] is not None:
            entry[2] = None
            self._live -= 1
            heap = self._heap
            if len(heap) > 2 * self._live + 64:  # mostly cancelled: rebuild
                heap[:] = [e for e in heap if e[2] is not None]
                heapq.heapify(heap)

    async def _run(self) -> None:
        heap = self._heap
        while True:
            now = perf_counter()
            while heap and (heap[0][2] is None or heap[0][0] <= now):  # type: ignore[operator]
                entry = heapq.heappop(heap)
                expire = entry[2]
                if expire is None:
                    continue
                entry[2] = None
                self._live -= 1
                try:
                    expire()  # type: ignore[operator]
                except Exception:  # a bug: never the daemon's whole run
                    log.exception("a deadline's expiry failed")
            with trio.CancelScope() as scope:
                if heap:
                    scope.deadline = (trio.current_time() + heap[0][0]  # type: ignore[operator]
                                      - perf_counter())
                self._scope = scope
                try:
                    await trio.sleep_forever()
                finally:
                    self._scope = None


_DEADLINES: RunVar[Deadlines] = RunVar("seccomp_supervisor_deadlines")


def current_deadlines() -> Deadlines:
    """The :class:`Deadlines` of the running trio run (shared by every session)."""
    try:
        return _DEADLINES.get()
    except LookupError:
        deadlines = Deadlines()
        _DEADLINES.set(deadlines)
        return deadlines
