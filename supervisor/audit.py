"""Where decisions go after the kernel has its answer: metrics and the JSON audit trail.

The audit trail is one JSON object per line on a text stream (stdout under systemd, so the
journal keeps it). Which decisions are written is configured: ``all``, ``deny`` (denies
and handler errors) or ``none``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import IO, Literal

from prometheus_client import Counter, Histogram

from .decide import Outcome
from .metrics import Metrics
from .policy import Container

AuditLevel = Literal["all", "deny", "none"]


class Recorder:
    """Counts and logs decisions. Label children are cached: ``labels()`` is too slow to
    call per notification."""

    def __init__(self, metrics: Metrics | None, *, audit: AuditLevel = "deny",
                 stream: IO[str] | None = None) -> None:
        self.metrics = metrics
        self.audit = audit
        self.stream = stream if stream is not None else sys.stdout
        self._counters: dict[tuple[str, str, str], Counter] = {}
        self._histograms: dict[str, Histogram] = {}

    def gone(self, stage: str) -> None:
        if self.metrics is not None:
            self.metrics.gone.labels(stage).inc()

    def decided(self, container: Container, notif_id: int, tid: int, syscall: str,
                args: Sequence[int], outcome: Outcome, latency: float, *,
                shadow: bool = False) -> None:
        """Record one answered notification (``latency`` in seconds)."""
        decision = outcome.decision
        if self.metrics is not None:
            key = (syscall, outcome.policy, decision.kind)
            counter = self._counters.get(key)
            if counter is None:
                counter = self._counters[key] = self.metrics.notifications.labels(*key)
            counter.inc()
            histogram = self._histograms.get(syscall)
            if histogram is None:
                histogram = self._histograms[syscall] = (
                    self.metrics.decision_seconds.labels(syscall))
            histogram.observe(latency)
            if outcome.error is not None and outcome.error != "memory":
                self.metrics.handler_errors.labels(outcome.policy, outcome.error).inc()
        if self.audit == "none" or (
                self.audit == "deny" and decision.kind != "deny" and outcome.error is None):
            return
        line = {
            "time": round(time.time(), 6),
            "container": container.id,
            "runtime_pid": container.pid,
            "tid": tid,
            "id": f"{notif_id:#x}",
            "syscall": syscall,
            "args": [f"{a:#x}" for a in args],
            "decision": decision.kind,
            "policy": outcome.policy,
            "reason": outcome.detail or decision.reason,
            "latency_us": round(latency * 1e6, 1),
        }
        if decision.kind == "deny":
            line["errno"] = decision.errno
        elif decision.kind == "returns":
            line["value"] = decision.value
        if outcome.error is not None:
            line["error"] = outcome.error
        if shadow:
            line["shadow"] = True
        self.stream.write(json.dumps(line, separators=(",", ":")) + "\n")
        self.stream.flush()
