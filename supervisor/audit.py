"""Where decisions go after the kernel has its answer: metrics and the JSON audit trail.

The audit trail is one JSON object per line on a text stream (stdout under systemd, so the
journal keeps it)::

    {"time":1717000000.123456,"container":"web-1","runtime_pid":4242,"tid":4250,
     "id":"0x6c1d0f4e2a9b0001","syscall":"chmod","args":["0x7ffd...","0x9ed",...],
     "decision":"deny","errno":1,"policy":"hardening","reason":"setuid bit",
     "latency_us":41.3}

``errno`` (deny) or ``value`` (returns) says the answer; ``error`` is set when the answer
is the configured ``on_error`` (``exception``, ``deadline``, ``refused``, ``memory``);
``shadow`` when the route is in shadow mode; ``peer_uid`` (after ``runtime_pid``, when
known) is the uid that handed the listener over, from the kernel: the container id is
whatever that user's runtime sent. Which decisions are written is configured
(``[audit] decisions``): ``all``, ``deny`` (denies and handler errors) or ``none``.

**Rate limit.** A container repeating the same event cannot flood the journal: at most
``rate_limit`` identical lines per container per second are written. Lines are identical
when peer uid, container, system call, decision, answer, policy, reason and error are (time, thread,
notification id, arguments and latency vary between repeats of one event). When such a
second ends with lines held back, one summary line reports them::

    {"time":...,"container":"web-1","runtime_pid":4242,"syscall":"chmod",
     "decision":"deny","errno":1,"policy":"hardening","reason":"setuid bit",
     "suppressed":4711,"window_seconds":1.0}

and ``seccomp_supervisor_audit_lines_suppressed_total`` counts them.

**Off the hot path.** :meth:`Recorder.decided` runs after the answer went to the kernel,
before the session reads the next notification. It updates the metrics (cached label
children, plain numbers) and, for a line the audit level wants, asks the rate limit;
only a line it admits is queued (a tuple appended to a list): formatting and writing
happen in :meth:`Recorder.run_writer`, a task of the daemon. Without that task
(tests of single sessions) lines are written at once.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from bisect import bisect_left
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import IO, Any, Final, Literal

import trio

from .decide import Outcome
from .metrics import (
    DECISION_BUCKETS,
    UNNAMED_SYSCALL_LABEL,
    CounterChild,
    HistogramChild,
    Metrics,
)
from .policy import Container
from .syscalls import is_unnamed

__all__ = ["AuditLevel", "RateLimiter", "Recorder", "audit_line", "summary_line"]

log = logging.getLogger("supervisor.audit")

AuditLevel = Literal["all", "deny", "none"]

WINDOW: Final = 1.0
# Lines waiting for the writer task; beyond this they are dropped (and counted as
# suppressed) rather than growing without bound while a busy loop starves the writer.
MAX_PENDING: Final = 65536


# --------------------------------------------------------------------------- pure parts


@dataclass(slots=True)
class _Window:
    start: float
    written: int
    suppressed: int
    sample: Any


class RateLimiter:
    """At most ``limit`` events per key per ``window`` seconds (0 = no limit). Pure: the
    caller passes the time. Fixed windows per key, starting at the key's first event."""

    def __init__(self, limit: int, window: float = WINDOW) -> None:
        self.limit = limit
        self.window = window
        self._windows: dict[Hashable, _Window] = {}

    def __len__(self) -> int:
        return len(self._windows)

    def admit(self, key: Hashable, now: float, sample: Any = None
              ) -> tuple[bool, tuple[Any, int] | None]:
        """``(write, report)``: whether this event may be written, and, if the key's
        previous window ended with suppressed events, ``(sample, count)`` of that window
        to report first (``sample`` is what was passed with its first event)."""
        if self.limit <= 0:
            return True, None
        w = self._windows.get(key)
        if w is None or now - w.start >= self.window:
            report = (w.sample, w.suppressed) if w is not None and w.suppressed else None
            self._windows[key] = _Window(now, 1, 0, sample)
            return True, report
        if w.written < self.limit:
            w.written += 1
            return True, None
        w.suppressed += 1
        return False, None

    def expire(self, now: float) -> list[tuple[Any, int]]:
        """Forget every window that ended by ``now``; ``(sample, count)`` of those that
        held events back."""
        ended = [key for key, w in self._windows.items() if now - w.start >= self.window]
        reports = []
        for key in ended:
            w = self._windows.pop(key)
            if w.suppressed:
                reports.append((w.sample, w.suppressed))
        return reports

    def flush(self) -> list[tuple[Any, int]]:
        """Forget every window; ``(sample, count)`` of those that held events back."""
        reports = [(w.sample, w.suppressed) for w in self._windows.values() if w.suppressed]
        self._windows.clear()
        return reports


# (time, container, tid, notification id, syscall, args, outcome, latency, shadow)
_Entry = tuple[float, Container, int, int, str, Sequence[int], Outcome, float, bool]


def _identity(container: Container, syscall: str, outcome: Outcome) -> dict[str, Any]:
    decision = outcome.decision
    fields: dict[str, Any] = {"container": container.id, "runtime_pid": container.pid}
    if container.peer_uid is not None:
        fields["peer_uid"] = container.peer_uid
    fields.update(syscall=syscall, decision=decision.kind)
    if decision.kind == "deny":
        fields["errno"] = decision.errno
    elif decision.kind == "returns":
        fields["value"] = decision.value
    fields["policy"] = outcome.policy
    fields["reason"] = outcome.detail or decision.reason
    if outcome.error is not None:
        fields["error"] = outcome.error
    return fields


def audit_line(entry: _Entry) -> dict[str, Any]:
    """The JSON object of one decision."""
    when, container, tid, notif_id, syscall, args, outcome, latency, shadow = entry
    decision = outcome.decision
    line: dict[str, Any] = {
        "time": round(when, 6),
        "container": container.id,
        "runtime_pid": container.pid,
    }
    # Who handed the listener over (SO_PEERCRED): the one field of the line no container
    # creator chooses; the container id is whatever the runtime's user sent.
    if container.peer_uid is not None:
        line["peer_uid"] = container.peer_uid
    line |= {
        "tid": tid,
        "id": f"{notif_id:#x}",
        "syscall": syscall,
        "args": [f"{a:#x}" for a in args],
        "decision": decision.kind,
    }
    if decision.kind == "deny":
        line["errno"] = decision.errno
    elif decision.kind == "returns":
        line["value"] = decision.value
    line["policy"] = outcome.policy
    line["reason"] = outcome.detail or decision.reason
    line["latency_us"] = round(latency * 1e6, 1)
    if outcome.error is not None:
        line["error"] = outcome.error
    if shadow:
        line["shadow"] = True
    return line


def summary_line(sample: _Entry, suppressed: int, now: float,
                 window: float = WINDOW) -> dict[str, Any]:
    """The line that reports ``suppressed`` lines like ``sample`` held back."""
    _when, container, _tid, _id, syscall, _args, outcome, _latency, shadow = sample
    line = {"time": round(now, 6), **_identity(container, syscall, outcome),
            "suppressed": suppressed, "window_seconds": window}
    if shadow:
        line["shadow"] = True
    return line


def _key(entry: _Entry) -> Hashable:
    _when, container, _tid, _id, syscall, _args, outcome, _latency, shadow = entry
    decision = outcome.decision
    # peer_uid: a user who sends another user's container id (and pid) must not use up
    # that container's budget of lines.
    return (container.peer_uid, container.id, container.pid, syscall, decision.kind,
            decision.errno,
            decision.value, outcome.policy, outcome.detail or decision.reason,
            outcome.error, shadow)


# --------------------------------------------------------------------------- recorder


class Recorder:
    """Counts and logs decisions. Metric children are cached per label set: ``labels()``
    is too slow to call per notification."""

    def __init__(self, metrics: Metrics | None, *, audit: AuditLevel = "deny",
                 stream: IO[str] | None = None, rate_limit: int = 0) -> None:
        self.metrics = metrics
        self.audit = audit
        self.stream = stream if stream is not None else sys.stdout
        self.limiter = RateLimiter(rate_limit)
        self._counters: dict[tuple[str, str, str], CounterChild] = {}
        self._histograms: dict[str, HistogramChild] = {}
        # The children of the last (syscall, policy, kind) recorded, and the Outcome that
        # had them: while decisions repeat, this skips both lookups.
        self._last: tuple[str, Outcome, str, str, CounterChild, HistogramChild] | None = None
        self._suppressed = metrics.audit_suppressed.labels() if metrics is not None else None
        # Lines admitted by the rate limit, each with the summary of the window that
        # ended before it (if that window held lines back), for the writer to format.
        self._pending: list[tuple[_Entry, tuple[_Entry, int] | None]] = []
        self._wakeup: trio.Event | None = None  # set while run_writer runs
        self._write_failed = False

    @property
    def rate_limit(self) -> int:
        return self.limiter.limit

    @rate_limit.setter
    def rate_limit(self, value: int) -> None:
        self.limiter.limit = value

    def gone(self, stage: str) -> None:
        if self.metrics is not None:
            self.metrics.gone.labels(stage).inc()

    def handler_error(self, policy: str, kind: str) -> None:
        """Count an error that has no decision of its own to record."""
        if self.metrics is not None:
            self.metrics.handler_errors.labels(policy, kind).inc()

    def decided(self, container: Container, notif_id: int, tid: int, syscall: str,
                args: Sequence[int], outcome: Outcome, latency: float, *,
                shadow: bool = False) -> int:
        """Record one answered notification (``latency`` in seconds). Returns the index
        of the :data:`~supervisor.metrics.DECISION_BUCKETS` bucket ``latency`` fell in
        (the last is +Inf), which the session counts too (for ``top``) without a second
        search.

        Per notification: a counter and a histogram bump (plain numbers, see
        :mod:`supervisor.metrics`); for a line the audit level wants, the rate-limit
        check; only a line it lets through is queued, and formatted by the writer.
        """
        decision = outcome.decision
        if self.metrics is None:
            bucket = bisect_left(DECISION_BUCKETS, latency)
        else:
            # Compared by identity: a session reuses its Outcome while its handler repeats
            # a decision; across sessions, call names come from the chains' route
            # caches, policy names from the chains, and kinds are literals.
            last = self._last
            if last is not None and last[0] is syscall and (
                    last[1] is outcome
                    or (last[2] is outcome.policy and last[3] is decision.kind)):
                counter, histogram = last[4], last[5]
            else:
                counter, histogram = self._children(syscall, outcome)
            counter.value += 1
            bucket = bisect_left(histogram.bounds, latency)
            histogram.counts[bucket] += 1
            histogram.sum += latency
            if outcome.error is not None and outcome.error != "memory":
                self.metrics.handler_errors.labels(outcome.policy, outcome.error).inc()
        audit = self.audit
        if audit == "none" or (
                audit == "deny" and decision.kind != "deny" and outcome.error is None):
            return bucket
        now = time.time()
        entry = (now, container, tid, notif_id, syscall, args, outcome, latency, shadow)
        report = None
        limiter = self.limiter
        if limiter.limit > 0:
            admitted, report = limiter.admit(_key(entry), now, entry)
            if not admitted:
                if self._suppressed is not None:
                    self._suppressed.value += 1
                return bucket
        wakeup = self._wakeup
        if wakeup is None:
            self._write([(entry, report)])
            return bucket
        pending = self._pending
        if len(pending) >= MAX_PENDING:
            if self._suppressed is not None:
                self._suppressed.value += 1
            return bucket
        pending.append((entry, report))
        if len(pending) == 1:
            wakeup.set()
        return bucket

    def _children(self, syscall: str, outcome: Outcome
                  ) -> tuple[CounterChild, HistogramChild]:
        """The counter and histogram children :meth:`decided` bumps for this pair."""
        policy, kind = outcome.policy, outcome.decision.kind
        counter = self._counters.get((syscall, policy, kind))
        histogram = self._histograms.get(syscall)
        if counter is None or histogram is None:
            counter, histogram = self._new_children(syscall, policy, kind)
        self._last = (syscall, outcome, policy, kind, counter, histogram)
        return counter, histogram

    def _new_children(self, syscall: str, policy: str, kind: str
                      ) -> tuple[CounterChild, HistogramChild]:
        assert self.metrics is not None
        # The syscall label stays bounded: calls without a name share one, and are not
        # cached by name (prometheus-client hands out the same children again).
        label = UNNAMED_SYSCALL_LABEL if is_unnamed(syscall) else syscall
        counter = self.metrics.notifications.labels(label, policy, kind)
        histogram = self.metrics.decision_seconds.labels(label)
        if label is syscall:
            self._counters[(syscall, policy, kind)] = counter
            self._histograms[syscall] = histogram
        return counter, histogram

    def flush(self) -> None:
        """Write every pending line now."""
        batch, self._pending = self._pending, []
        if batch:
            self._write(batch)

    async def run_writer(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                         ) -> None:
        """Write pending lines as the loop has time, and the summaries of rate-limit
        windows as they end; until cancelled, then write what is left."""
        self._wakeup = trio.Event()
        task_status.started()
        try:
            while True:
                # Wake for new lines, or when a window may have ended with lines held back.
                with trio.move_on_after(WINDOW if len(self.limiter) else float("inf")):
                    await self._wakeup.wait()
                self._wakeup = trio.Event()
                self.flush()
                self._report(self.limiter.expire(time.time()))
        finally:
            self._wakeup = None
            self.flush()
            self._report(self.limiter.flush())

    def _write(self, batch: Sequence[tuple[_Entry, tuple[_Entry, int] | None]]) -> None:
        out: list[str] = []
        window = self.limiter.window
        for entry, report in batch:
            if report is not None:
                out.append(_dumps(summary_line(report[0], report[1], entry[0], window)))
            out.append(_dumps(audit_line(entry)))
        if out:
            self._emit("".join(out))

    def _report(self, reports: list[tuple[Any, int]]) -> None:
        if reports:
            now = time.time()
            self._emit("".join(_dumps(summary_line(sample, count, now, self.limiter.window))
                               for sample, count in reports))

    def _emit(self, text: str) -> None:
        # A closed or broken stdout must not take the daemon down with it.
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError) as exc:
            if not self._write_failed:
                log.error("cannot write the audit trail: %s", exc)
            self._write_failed = True
        else:
            self._write_failed = False


def _dumps(line: dict[str, Any]) -> str:
    return json.dumps(line, separators=(",", ":")) + "\n"
