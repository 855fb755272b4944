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

**Rate limit.** A container cannot flood the journal, whatever it calls with whatever
arguments:

* at most ``rate_limit`` lines per second per container (its peer uid, id and pid: a
  user who sends another user's container id must not spend that container's lines),
  system call, decision kind (allow, deny, returns...), handler error and policy. The
  reason and the answer's errno or value are not part of the key: a reason may name a
  path or an argument the container chose, and would make every line unique. Calls
  libseccomp has no name for share one key. When such a second ends with lines held
  back, one summary line (with the fields of the first line of that second) reports them::

    {"time":...,"container":"web-1","runtime_pid":4242,"syscall":"chmod",
     "decision":"deny","errno":1,"policy":"hardening","reason":"setuid bit",
     "suppressed":4711,"window_seconds":1.0}

* at most ``container_bytes`` bytes of lines (summaries included) per container per
  second; the lines beyond are dropped and, when the second ends, one line reports
  them (it is the only line written past the budget)::

    {"time":...,"container":"web-1","runtime_pid":4242,"suppressed":120,
     "window_seconds":1.0,"byte_budget":65536}

* every line is at most ``max_line`` bytes: the longest strings (container id, reason,
  policy...) are cut and end with ``...[N more]`` (N characters cut).

``seccomp_supervisor_audit_lines_suppressed_total`` counts every line held back.

**One line of JSON, always.** Lines are written with ``json.dumps`` and its default
``ensure_ascii=True``: control characters, U+2028/U+2029 and every other non-ASCII
character are escaped, so no string a container's creator controls (its id, a reason
naming a path) can end a line or be read as a line break by a log reader.

**Off the hot path.** :meth:`Recorder.decided` runs after the answer went to the kernel,
before the session reads the next notification. It updates the metrics (cached label
children, plain numbers) and, for a line the audit level wants, asks the rate limit;
only a line it admits is queued (a tuple appended to a list): formatting and writing
happen in :meth:`Recorder.run_writer`, a task of the daemon. Without that task
(tests of single sessions) lines are written at once.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
import time
from bisect import bisect_left
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import IO, Any, Final, Literal, TypeVar

import trio

from . import accel
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

__all__ = ["CONTAINER_BYTES", "MAX_LINE", "AuditLevel", "RateLimiter", "Recorder",
           "audit_line", "audit_text", "budget_line", "summary_line"]

log = logging.getLogger("supervisor.audit")

AuditLevel = Literal["all", "deny", "none"]
_T = TypeVar("_T")

WINDOW: Final = 1.0
# How often the writer looks for ended windows and byte budgets (seconds).
EXPIRY_EVERY: Final = WINDOW / 8
#: The writer formats at most this many lines, or for about this long, before it lets the
#: sessions run again: with many containers a second's first lines come at once (10 each
#: at the default rate limit), and a line naming a long path is cut, which costs ~4 µs
#: compiled and ~50 µs in Python (the pure-Python loop, a summary line, a line with a
#: surrogate).
WRITE_LINES_PER_TURN: Final = 64
WRITE_SECONDS_PER_TURN: Final = 0.001
#: Defaults of ``[audit] container_bytes`` and ``[audit] max_line``.
CONTAINER_BYTES: Final = 65536
MAX_LINE: Final = 4096
# A cut string ends with "...[N more]": at most this many characters for N < 10**12.
_MARKER_ROOM: Final = 24
_MAX_ROUNDS: Final = 8
# A Python string holds a surrogate code point only when it came from invalid input (a
# "\ud800" escape in the runtime's JSON): json.dumps writes it as a lone surrogate
# escape, which strict JSON readers refuse. Written as U+FFFD instead.
_SURROGATE: Final = re.compile("[\ud800-\udfff]")
# Lines waiting for the writer task; beyond this they are dropped (and counted as
# suppressed) rather than growing without bound while a busy loop starves the writer. (The
# batch the writer is writing, in turns, is not counted: at most twice this in all.)
MAX_PENDING: Final = 65536
# The rate-limit key of every call libseccomp has no name for (2**32 numbers: nothing may
# be kept per number, see supervisor.syscalls.is_unnamed).
_UNNAMED_KEY: Final = "nr_*"


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

    # Slots: the compiled loop reads limit, window and epoch per notification, and a
    # slot is read at its address where an instance dict needs a lookup.
    __slots__ = ("_windows", "epoch", "limit", "window")

    def __init__(self, limit: int, window: float = WINDOW) -> None:
        self.limit = limit
        self.window = window
        self._windows: dict[Hashable, _Window] = {}
        # Changed whenever windows are dropped: a window remembered (see remember()) under
        # an older epoch is not used, so a remembered window is either the one its key
        # holds or one that has ended (which the caller's time test rejects).
        self.epoch = object()

    def __len__(self) -> int:
        return len(self._windows)

    def remember(self, key: Hashable, outcome: Outcome, container: Container, syscall: str,
                 shadow: bool) -> None:
        """Keep ``key``'s window on ``outcome`` (its ``audit_hot``), for
        :meth:`Recorder.decided` to find while ``container``, ``syscall`` and ``shadow``
        are the same objects: an Outcome is never changed, so the key is the same."""
        w = self._windows.get(key)
        if w is not None:
            outcome.audit_hot = (self.epoch, container, syscall, shadow, w)

    def admit(self, key: Hashable, now: float, sample: Any = None
              ) -> tuple[bool, tuple[Any, int] | None]:
        """``(write, report)``: whether this event may be written, and, if the key's
        previous window ended with suppressed events, ``(sample, count)`` of that window
        to report first (``sample`` is what was passed with its first event)."""
        if self.limit <= 0:
            return True, None
        w = self._windows.get(key)
        # A window that starts after `now` has ended too: the wall clock was stepped back
        # (the windows run on the lines' clock), and it must not hold lines back for as
        # long as the step.
        if w is None or not 0.0 <= now - w.start < self.window:
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
        ended = [key for key, w in self._windows.items()
                 if not 0.0 <= now - w.start < self.window]  # (see admit)
        if ended:
            self.epoch = object()
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
        self.epoch = object()
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


_json_str: Final = json.encoder.encode_basestring_ascii  # what json.dumps does per string
# What json.dumps(line, ensure_ascii=True, separators=(",", ":")) makes per call: one
# encoder for every line (a long line is encoded several times while it is cut).
_encode_line: Final = json.JSONEncoder(ensure_ascii=True, separators=(",", ":")).encode
_int_repr: Final = int.__repr__
_float_repr: Final = float.__repr__
_LINE: Final = ('{"time":%s,"container":%s,"runtime_pid":%d%s,"tid":%d,"id":"%#x",'
                '"syscall":%s,"args":[%s],"decision":%s%s,"policy":%s,"reason":%s,'
                '"latency_us":%s%s%s}\n')


def audit_text(entry: _Entry, max_line: int = 0) -> str:
    """``_dumps(audit_line(entry), max_line)``, the same text, built directly: the
    writer formats every admitted line (with K containers up to 10 K lines a second at
    the default rate limit), and the dict plus ``json.dumps`` cost three times as much.
    Anything out of the ordinary (a value that is not exactly an int, float or str, a
    surrogate, a line over ``max_line``) takes the general path.

    The compiled twin of the direct formatting (``format_audit_line`` in
    supervisor/_hotloop.c) makes the same checks and writes the same text, at a
    twentieth of the cost; it answers None where this code takes its general path, but
    for a line over ``max_line``, which it cuts as :func:`_dumps` does (~4 µs for a
    line naming a 4,000-byte path, against ~40 µs here)."""
    hotloop = accel.HOTLOOP
    if hotloop is not None:
        text: str | None = hotloop.format_audit_line(entry, max_line)
        if text is not None:
            return text
        # Declined where the direct formatting below would take the general path too (a
        # surrogate, a value not exactly of its type...): not built a second time.
        return _dumps(audit_line(entry), max_line)
    when, container, tid, notif_id, syscall, args, outcome, latency, shadow = entry
    decision = outcome.decision
    kind = decision.kind
    pid = container.pid
    peer_uid = container.peer_uid
    reason = outcome.detail or decision.reason
    error = outcome.error
    if type(when) is not float or type(latency) is not float:
        return _dumps(audit_line(entry), max_line)
    latency_us = latency * 1e6
    # repr(round(x, n)), as audit_line writes them, with one float-to-decimal conversion
    # instead of two: the same digits wherever the n-decimal grid is coarser than the
    # float's spacing (the ranges below), the shortest repr then being that one.
    if 1e9 <= when < 4e9:  # a wall clock time between 2001 and 2096
        when_text = f"{when:.6f}".rstrip("0")
        if when_text[-1] == ".":
            when_text += "0"
    else:
        when_text = _float_repr(round(when, 6))
    if 0.0 <= latency_us < 1e12:
        latency_text = f"{latency_us:.1f}"
    else:
        latency_text = _float_repr(round(latency_us, 1))
    if (type(pid) is not int or type(tid) is not int or type(notif_id) is not int
            or (peer_uid is not None and type(peer_uid) is not int)
            or type(reason) is not str or type(syscall) is not str
            or type(container.id) is not str or type(outcome.policy) is not str
            or type(kind) is not str or (error is not None and type(error) is not str)):
        return _dumps(audit_line(entry), max_line)
    if "n" in when_text or "n" in latency_text:  # NaN or inf: json.dumps has its own
        return _dumps(audit_line(entry), max_line)
    for a in args:
        if type(a) is not int:
            return _dumps(audit_line(entry), max_line)
    if kind == "deny":
        number = decision.errno
        answer = ',"errno":'
    elif kind == "returns":
        number = decision.value
        answer = ',"value":'
    else:
        number, answer = 0, ""
    if type(number) is not int:
        return _dumps(audit_line(entry), max_line)
    text = _LINE % (
        when_text, _json_str(container.id), pid,
        "" if peer_uid is None else f',"peer_uid":{peer_uid:d}',
        tid, notif_id, _json_str(syscall),
        '"' + '","'.join(map(hex, args)) + '"' if args else "", _json_str(kind),
        f"{answer}{number:d}" if answer else "", _json_str(outcome.policy),
        _json_str(reason), latency_text,
        "" if error is None else f',"error":{_json_str(error)}',
        ',"shadow":true' if shadow else "")
    if "\\ud" in text or (max_line > 0 and len(text) > max_line):
        return _dumps(audit_line(entry), max_line)  # a surrogate to replace, a line to cut
    return text


def summary_line(sample: _Entry, suppressed: int, now: float,
                 window: float = WINDOW) -> dict[str, Any]:
    """The line that reports ``suppressed`` lines like ``sample`` held back."""
    _when, container, _tid, _id, syscall, _args, outcome, _latency, shadow = sample
    line = {"time": round(now, 6), **_identity(container, syscall, outcome),
            "suppressed": suppressed, "window_seconds": window}
    if shadow:
        line["shadow"] = True
    return line


def budget_line(container: Container, suppressed: int, now: float, window: float,
                budget: int) -> dict[str, Any]:
    """The line that reports ``suppressed`` lines of ``container`` dropped because its
    byte budget for the window was spent."""
    return {"time": round(now, 6), "container": container.id,
            "runtime_pid": container.pid, "suppressed": suppressed,
            "window_seconds": window, "byte_budget": budget}


@dataclass(slots=True)
class _Budget:
    start: float
    used: int
    dropped: int
    container: Container


# --------------------------------------------------------------------------- recorder


class Recorder:
    """Counts and logs decisions. Metric children are cached per label set: ``labels()``
    is too slow to call per notification."""

    # Slots: the compiled loop reads audit, limiter, metrics, _last and _suppressed per
    # notification (see RateLimiter). Subclasses (tests, supervisor.testing) may add
    # attributes of their own: they get an instance dict.
    __slots__ = ("_budgets", "_counters", "_histograms", "_last", "_pending",
                 "_suppressed", "_wakeup", "_write_failed", "audit", "container_bytes",
                 "limiter", "max_line", "metrics", "stream")

    def __init__(self, metrics: Metrics | None, *, audit: AuditLevel = "deny",
                 stream: IO[str] | None = None, rate_limit: int = 0,
                 container_bytes: int = CONTAINER_BYTES, max_line: int = MAX_LINE) -> None:
        self.metrics = metrics
        self.audit = audit
        self.stream = stream if stream is not None else sys.stdout
        self.limiter = RateLimiter(rate_limit)
        # Bytes per container per window (0: no budget) and per line (0: no cap); the
        # writer applies both, off the hot path.
        self.container_bytes = container_bytes
        self.max_line = max_line
        self._budgets: dict[tuple[int | None, str, int], _Budget] = {}
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

    def recovered(self, entry: str) -> None:
        """Count a notification taken from the in-flight journal after a crash."""
        if self.metrics is not None:
            self.metrics.recovered.labels(entry).inc()

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
        limiter = self.limiter
        limit = limiter.limit
        if limit > 0:
            # A line over the limit is rejected before anything is built: while a session
            # repeats its Outcome for the same call, the outcome's identity finds the full
            # window (an Outcome is never changed, so the key would be the same).
            hot = outcome.audit_hot
            if hot is not None and hot[0] is limiter.epoch and hot[1] is container and (
                    hot[2] is syscall and hot[3] is shadow):
                w = hot[4]
                if w.written >= limit and 0.0 <= now - w.start < limiter.window:
                    w.suppressed += 1
                    if self._suppressed is not None:
                        self._suppressed.value += 1
                    return bucket
        return self._audit(container, notif_id, tid, syscall, args, outcome, latency,
                           shadow, now, bucket)

    def _audit(self, container: Container, notif_id: int, tid: int, syscall: str,
               args: Sequence[int], outcome: Outcome, latency: float, shadow: bool,
               now: float, bucket: int) -> int:
        """The audit line of :meth:`decided` past its common case (a line held back by
        the window its Outcome found): the rate limit by key, then the queue. Returns
        ``bucket``. (The compiled loop, supervisor/_hotloop.c, calls it at that point.)"""
        decision = outcome.decision
        report = None
        limiter = self.limiter
        if limiter.limit > 0:
            # Not the reason, errno or value: those may carry what the container chose.
            key = (container.peer_uid, container.id, container.pid,
                   _UNNAMED_KEY if syscall.startswith("nr_") else syscall,
                   decision.kind, outcome.error, outcome.policy, shadow)
            # One lookup: admit() holds the line back (and counts it) exactly as
            # held_back() would; the entry tuple it may keep as a sample is cheap.
            entry = (now, container, tid, notif_id, syscall, args, outcome, latency, shadow)
            admitted, report = limiter.admit(key, now, entry)
            if not admitted:
                limiter.remember(key, outcome, container, syscall, shadow)
                if self._suppressed is not None:
                    self._suppressed.value += 1
                return bucket
        else:
            entry = (now, container, tid, notif_id, syscall, args, outcome, latency, shadow)
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
        next_expiry = 0.0
        try:
            while True:
                # Wake for new lines, or when a window may have ended with lines held back.
                pending_windows = len(self.limiter) or self._budgets
                with trio.move_on_after(WINDOW if pending_windows else float("inf")):
                    await self._wakeup.wait()
                self._wakeup = trio.Event()
                await self._write_pending()
                # Looking for ended windows scans every window and budget, one per
                # container and more: with many containers writing, doing that at every
                # wake-up cost more than the lines (K=1000: a scan of ~2,000 entries
                # per batch). Summaries come at most EXPIRY_EVERY late.
                now = time.time()
                if now >= next_expiry or now < next_expiry - EXPIRY_EVERY:
                    next_expiry = now + EXPIRY_EVERY
                    # One summary per container whose window held lines back, all of
                    # them at once when their seconds started together: in turns too.
                    await self._in_turns(self.limiter.expire(now),
                                         functools.partial(self._put_summaries, now))
                    await self._in_turns(self._ended_budgets(now),
                                         functools.partial(self._put_budgets, now))
        finally:
            self._wakeup = None
            self.flush()
            self._report(self.limiter.flush())
            self.flush_budgets()

    async def _write_pending(self) -> None:
        """Write the pending lines in order, a turn of the event loop at a time (see
        :data:`WRITE_LINES_PER_TURN`); lines queued meanwhile come after them."""
        while self._pending:
            batch, self._pending = self._pending, []
            await self._in_turns(batch, self._format)

    async def _in_turns(self, items: list[_T],
                        put: Callable[[list[str], Sequence[_T]], None]) -> None:
        """``put(out, some)`` for ``items`` in order, a few at a time, writing what they
        add a turn of the event loop at a time (see :data:`WRITE_LINES_PER_TURN`); if
        cancelled, the rest at once (nothing is lost, as at the writer's end)."""
        done = 0
        try:
            while done < len(items):
                out: list[str] = []
                started = time.perf_counter()
                last = min(len(items), done + WRITE_LINES_PER_TURN)
                while done < last and time.perf_counter() - started < WRITE_SECONDS_PER_TURN:
                    some = items[done:min(last, done + 8)]
                    done += len(some)
                    put(out, some)
                if out:
                    self._emit("".join(out))
                # After the last turn too: the writer's next batch (summaries after the
                # pending lines, budgets after the summaries) starts a turn of its own.
                await trio.lowlevel.checkpoint()
        finally:
            if done < len(items):
                out = []
                put(out, items[done:])
                if out:
                    self._emit("".join(out))

    def _write(self, batch: Sequence[tuple[_Entry, tuple[_Entry, int] | None]]) -> None:
        out: list[str] = []
        self._format(out, batch)
        if out:
            self._emit("".join(out))

    def _format(self, out: list[str],
                batch: Sequence[tuple[_Entry, tuple[_Entry, int] | None]]) -> None:
        """Append the text of ``batch``'s lines (and the summaries they carry) to ``out``,
        as each container's byte budget allows."""
        window = self.limiter.window
        max_line = self.max_line
        now = time.time()
        # audit_text's compiled twin called directly (None: audit_text's general path,
        # which it would not find again).
        hotloop = accel.HOTLOOP
        compiled = hotloop.format_audit_line if hotloop is not None else None
        for entry, report in batch:
            if report is not None:
                sample, count = report
                self._add(out, summary_line(sample, count, entry[0], window), sample[1],
                          now, count, counted=True)
            text = compiled(entry, max_line) if compiled is not None else None
            if text is None:
                text = (audit_text(entry, max_line) if compiled is None
                        else _dumps(audit_line(entry), max_line))
            self._add_text(out, text, entry[1], now, 1, counted=False)

    def _report(self, reports: list[tuple[Any, int]]) -> None:
        out: list[str] = []
        self._put_summaries(time.time(), out, reports)
        if out:
            self._emit("".join(out))

    def _put_summaries(self, now: float, out: list[str],
                       reports: Sequence[tuple[Any, int]]) -> None:
        """The summaries of windows that held ``reports``' counts of lines back."""
        window = self.limiter.window
        for sample, count in reports:
            self._add(out, summary_line(sample, count, now, window), sample[1], now, count,
                      counted=True)

    def _put_budgets(self, now: float, out: list[str], budgets: Sequence[_Budget]) -> None:
        """The lines that report what ended byte budgets dropped."""
        out.extend(self._budget_text(b, now) for b in budgets)

    def _add(self, out: list[str], line: dict[str, Any], container: Container,
             now: float, lines: int, *, counted: bool) -> None:
        """Append ``line`` (standing for ``lines`` lines: 1, or a summary's count) to
        ``out`` if ``container``'s byte budget allows; else count it as dropped (in the
        metric too unless ``counted`` already)."""
        self._add_text(out, _dumps(line, self.max_line), container, now, lines,
                       counted=counted)

    def _add_text(self, out: list[str], text: str, container: Container, now: float,
                  lines: int, *, counted: bool) -> None:
        """:meth:`_add` for a line already formatted."""
        budget = self.container_bytes
        if budget > 0:
            key = (container.peer_uid, container.id, container.pid)
            b = self._budgets.get(key)
            if b is None or not 0.0 <= now - b.start < WINDOW:  # (see RateLimiter.admit)
                if b is not None and b.dropped:
                    out.append(self._budget_text(b, now))
                b = self._budgets[key] = _Budget(now, 0, 0, container)
            if b.used + len(text) > budget:
                b.dropped += lines
                if not counted and self._suppressed is not None:
                    self._suppressed.value += lines
                return
            b.used += len(text)
        out.append(text)

    def _budget_text(self, b: _Budget, now: float) -> str:
        return _dumps(budget_line(b.container, b.dropped, now, WINDOW,
                                  self.container_bytes), self.max_line)

    def _ended_budgets(self, now: float) -> list[_Budget]:
        """Forget the byte budgets whose window ended by ``now``; those that dropped
        lines, to be reported."""
        ended = [key for key, b in self._budgets.items()
                 if not 0.0 <= now - b.start < WINDOW]
        dropped = []
        for key in ended:
            b = self._budgets.pop(key)
            if b.dropped:
                dropped.append(b)
        return dropped

    def flush_budgets(self) -> None:
        """Forget every byte budget, writing the lines that report what they dropped."""
        now = time.time()
        out = [self._budget_text(b, now) for b in self._budgets.values() if b.dropped]
        self._budgets.clear()
        if out:
            self._emit("".join(out))

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


def _dumps(line: dict[str, Any], max_line: int = 0) -> str:
    """``line`` as one line of ASCII JSON (``ensure_ascii``: see the module docstring),
    at most ``max_line`` bytes with its newline (0: no cap): the longest strings are cut
    to a common length and marked ``...[N more]`` until it fits."""
    text = _encode_line(line) + "\n"
    if "\\ud" in text:  # a surrogate code point, maybe a lone one (see _SURROGATE)
        line = {key: _SURROGATE.sub("\ufffd", value) if isinstance(value, str) else value
                for key, value in line.items()}
        text = _encode_line(line) + "\n"
    if max_line <= 0 or len(text) <= max_line:
        return text
    cut = dict(line)
    for _ in range(_MAX_ROUNDS):
        if len(text) <= max_line:
            return text
        sizes = {key: _json_size(value) for key, value in cut.items()
                 if isinstance(value, str) and value}
        if not sizes:
            break  # only numbers and arrays left: fixed size, far below any max_line
        # Water-filling: the largest cap C with sum(min(size, C)) <= what strings may take.
        room = sum(sizes.values()) - (len(text) - max_line) - _MARKER_ROOM * len(sizes)
        cap = _water_level(sorted(sizes.values()), max(0, room))
        for key, size in sizes.items():
            if size > cap:
                value = cut[key]
                original = line[key]
                keep = _prefix_within(value, max(0, cap - _MARKER_ROOM))
                if keep >= len(value):
                    keep = len(value) - 1  # always progress
                lost = len(original) - keep
                cut[key] = f"{original[:keep]}...[{lost} more]"
        text = _encode_line(cut) + "\n"
    if len(text) > max_line:  # not reached in practice: every string gives way
        cut = {key: f"...[{len(value)} more]" if isinstance(value, str) else value
               for key, value in line.items()}
        text = _encode_line(cut) + "\n"
    return text


def _json_size(value: str) -> int:
    """Bytes of ``value`` as a JSON string, without its quotes."""
    return len(_json_str(value)) - 2


def _water_level(sizes: list[int], room: int) -> int:
    """The largest C with ``sum(min(s, C) for s in sizes) <= room`` (``sizes`` sorted)."""
    left = len(sizes)
    for size in sizes:
        if size * left > room:
            return room // left
        room -= size
        left -= 1
    return sizes[-1] if sizes else 0


def _prefix_within(value: str, limit: int) -> int:
    """Length of the longest prefix of ``value`` whose JSON form (no quotes) takes at
    most ``limit`` bytes (about: a shorter one is fine)."""
    n = min(len(value), limit)  # every character takes at least one byte
    while n > 0:
        size = _json_size(value[:n])
        if size <= limit:
            break
        n = n * limit // size  # < n, since size > limit
    return n
