"""Prometheus metrics. Names and labels are part of the interface (DESIGN.md §7).

Everything lives on a registry passed in, so tests use a fresh one and read values with
``registry.get_sample_value``. Units are base units (seconds). Labels stay bounded:
syscall, policy, decision, stage, kind, result; never a pid or a container id.
"""

from __future__ import annotations

import platform

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)

from . import __version__

# 10 µs .. 10 s: the fastest answers are tens of microseconds, the deadline is seconds.
DECISION_BUCKETS = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)


class Metrics:
    """The supervisor's metric families, registered on ``registry``.

    With ``process=True`` the registry also gets prometheus-client's ``process_*``
    (CPU, memory, open fds, start time) and ``python_info`` collectors, as the default
    registry has them; the daemon asks for them, tests of single sessions do not.
    """

    def __init__(self, registry: CollectorRegistry, *, process: bool = False) -> None:
        self.registry = registry
        ns = "seccomp_supervisor"
        if process:
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
        self.build_info = Info(
            "build", "The running seccomp-supervisor: version and Python.", namespace=ns,
            registry=registry)
        self.build_info.info({"version": __version__,
                              "python": platform.python_version()})
        self.notifications = Counter(
            "notifications", "Notifications answered, by system call, deciding policy and "
            "decision kind.", ["syscall", "policy", "decision"], namespace=ns,
            registry=registry)
        self.decision_seconds = Histogram(
            "decision_seconds", "Time from receiving a notification to answering it.",
            ["syscall"], namespace=ns, buckets=DECISION_BUCKETS, registry=registry)
        self.gone = Counter(
            "notifications_gone", "Notifications the kernel withdrew (ENOENT), by stage.",
            ["stage"], namespace=ns, registry=registry)
        self.handler_errors = Counter(
            "handler_errors", "Handlers that raised, overran the deadline or returned a "
            "refused decision.", ["policy", "kind"], namespace=ns, registry=registry)
        self.sessions = Gauge(
            "sessions", "Notify fds being served.", namespace=ns, registry=registry)
        self.handoffs = Counter(
            "handoffs", "Connections on the notify socket, by result.", ["result"],
            namespace=ns, registry=registry)
        self.inflight = Gauge(
            "inflight", "Asynchronous decisions under way.", namespace=ns, registry=registry)
        self.audit_suppressed = Counter(
            "audit_lines_suppressed", "Audit lines not written because a container "
            "repeated the same line more than [audit] rate_limit times in a second.",
            namespace=ns, registry=registry)
        for stage in ("recv", "send", "id_valid", "addfd"):
            self.gone.labels(stage)
