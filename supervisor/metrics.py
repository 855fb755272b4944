"""Prometheus metrics. Names and labels are part of the interface (DESIGN.md §7).

Everything lives on a registry passed in, so tests use a fresh one and read values with
``registry.get_sample_value``. Units are base units (seconds). Labels stay bounded:
syscall, policy, decision, stage, kind, result; never a pid or a container id.
"""

from __future__ import annotations

import platform
import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Final

import prometheus_client.metrics
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from . import __version__, accel

# The syscall label of every call libseccomp has no name for (``nr_<n>`` elsewhere):
# a filter may notify any of 2**32 numbers, and a label value per number would let one
# container grow every scrape without bound.
UNNAMED_SYSCALL_LABEL: Final = "unknown"

# 10 µs .. 10 s: the fastest answers are tens of microseconds, the deadline is seconds.
DECISION_BUCKETS = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)


# --------------------------------------------------------------------------- hot families
#
# The two families bumped for every notification are plain Python numbers: one attribute
# increment for the counter, one bisect and two increments for the histogram, instead of
# prometheus-client's lock per value and loop over the buckets (about 3 us a notification
# together). prometheus-client still exports them: a Collector turns the numbers into the
# same samples (``_total``/``_created``, ``_bucket``/``_count``/``_sum``/``_created``) when
# the registry is scraped. Only the trio thread writes them; the exporter's thread reads
# plain ints and floats (a scrape may see ``_sum`` one observation apart from ``_count``).


class CounterChild:
    """One labelled counter: ``value`` is what is exported."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value: float = 0
        self.created = time.time()

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("counters can only be incremented by non-negative amounts")
        self.value += amount


class HistogramChild:
    """One labelled histogram: ``counts[i]`` observations fell in bucket ``i`` (not
    cumulative; the last is +Inf), ``sum`` is their total."""

    __slots__ = ("bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        # bisect_left: the first bound >= amount, i.e. the bucket "le" that bound.
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.sum += amount


class _Family(Collector):
    def __init__(self, kind: str, name: str, documentation: str, labelnames: Sequence[str],
                 registry: CollectorRegistry) -> None:
        self.kind = kind
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        registry.register(self)

    def _check(self, values: tuple[str, ...]) -> tuple[str, ...]:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected {len(self.labelnames)} label values, "
                             f"got {len(values)}")
        return tuple(str(v) for v in values)

    def describe(self) -> Iterator[Metric]:
        yield Metric(self.name, self.documentation, self.kind)


class FastCounter(_Family):
    """A labelled counter family (what ``prometheus_client.Counter`` exports) kept in
    plain numbers. ``labels(...)`` returns a :class:`CounterChild`; cache it."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], *,
                 registry: CollectorRegistry) -> None:
        super().__init__("counter", name, documentation, labelnames, registry)
        self._children: dict[tuple[str, ...], CounterChild] = {}
        if not self.labelnames:
            self.labels()  # exported from the start, as prometheus-client does

    def inc(self, amount: float = 1) -> None:
        """Increment the family's only child (a family without labels)."""
        self.labels().inc(amount)

    def labels(self, *values: str) -> CounterChild:
        child = self._children.get(values)
        if child is None:
            child = self._children.setdefault(self._check(values), CounterChild())
        return child

    def collect(self) -> Iterator[Metric]:
        metric = Metric(self.name, self.documentation, "counter")
        created = getattr(prometheus_client.metrics, "_use_created", True)
        for values, child in list(self._children.items()):
            labels = dict(zip(self.labelnames, values, strict=True))
            metric.samples.append(Sample(self.name + "_total", labels, child.value))
            if created:
                metric.samples.append(Sample(self.name + "_created", labels, child.created))
        yield metric


class FastHistogram(_Family):
    """A labelled histogram family (what ``prometheus_client.Histogram`` exports) kept in
    plain numbers. ``labels(...)`` returns a :class:`HistogramChild`; cache it."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], *,
                 buckets: Sequence[float], registry: CollectorRegistry) -> None:
        super().__init__("histogram", name, documentation, labelnames, registry)
        self.bounds = tuple(float(b) for b in buckets if b != float("inf"))
        if list(self.bounds) != sorted(set(self.bounds)):
            raise ValueError("histogram buckets must be sorted and distinct")
        self._le = [*(floatToGoString(b) for b in self.bounds),  # type: ignore[no-untyped-call]
                    "+Inf"]
        self._children: dict[tuple[str, ...], HistogramChild] = {}

    def labels(self, *values: str) -> HistogramChild:
        child = self._children.get(values)
        if child is None:
            child = self._children.setdefault(self._check(values), HistogramChild(self.bounds))
        return child

    def collect(self) -> Iterator[Metric]:
        metric = Metric(self.name, self.documentation, "histogram")
        created = getattr(prometheus_client.metrics, "_use_created", True)
        name = self.name
        for values, child in list(self._children.items()):
            counts, total = list(child.counts), child.sum
            labels = dict(zip(self.labelnames, values, strict=True))
            acc = 0
            for le, count in zip(self._le, counts, strict=True):
                acc += count
                metric.samples.append(Sample(name + "_bucket", {**labels, "le": le}, acc))
            metric.samples.append(Sample(name + "_count", labels, acc))
            metric.samples.append(Sample(name + "_sum", labels, total))
            if created:
                metric.samples.append(Sample(name + "_created", labels, child.created))
        yield metric


class Metrics:
    """The supervisor's metric families, registered on ``registry``.

    With ``process=True`` the registry also gets prometheus-client's ``process_*``
    (CPU, memory, open fds, start time), ``python_gc_*`` (the garbage collector's runs
    by generation, see supervisor/heap.py) and ``python_info`` collectors, as the
    default registry has them; the daemon asks for them, tests of single sessions do
    not.
    """

    def __init__(self, registry: CollectorRegistry, *, process: bool = False) -> None:
        self.registry = registry
        ns = "seccomp_supervisor"
        if process:
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
        self.build_info = Info(
            "build", "The running seccomp-supervisor: version and Python.", namespace=ns,
            registry=registry)
        self.build_info.info({"version": __version__,
                              "python": platform.python_version(),
                              "hot_loop": accel.KIND})
        # The two families bumped per notification: plain numbers (see FastCounter).
        self.notifications = FastCounter(
            f"{ns}_notifications", "Notifications answered, by system call, deciding policy "
            "and decision kind.", ["syscall", "policy", "decision"], registry=registry)
        self.decision_seconds = FastHistogram(
            f"{ns}_decision_seconds", "Time from receiving a notification to answering it.",
            ["syscall"], buckets=DECISION_BUCKETS, registry=registry)
        self.gone = Counter(
            "notifications_gone", "Notifications the kernel withdrew (ENOENT), by stage.",
            ["stage"], namespace=ns, registry=registry)
        self.handler_errors = Counter(
            "handler_errors", "Handlers that raised, overran the deadline, returned a "
            "refused decision or were under way when their session ended (kind).",
            ["policy", "kind"], namespace=ns, registry=registry)
        self.recovered = Counter(
            "notifications_recovered", "Notifications a crashed process had received and "
            "not answered, answered after the restart from the in-flight journal, by entry "
            "(complete: decided by the chain; torn: the crash cut its slot short, answered "
            "on_error).", ["entry"], namespace=ns, registry=registry)
        self.sessions = Gauge(
            "sessions", "Notify fds being served.", namespace=ns, registry=registry)
        self.handoffs = Counter(
            "handoffs", "Connections on the notify socket, by result.", ["result"],
            namespace=ns, registry=registry)
        self.inflight = Gauge(
            "inflight", "Asynchronous decisions under way.", namespace=ns, registry=registry)
        self.audit_suppressed = FastCounter(
            f"{ns}_audit_lines_suppressed", "Audit lines not written: over [audit] rate_limit "
            "(per container, system call, decision and policy) or over [audit] "
            "container_bytes in a second.",
            [], registry=registry)
        for stage in ("recv", "send", "id_valid", "addfd"):
            self.gone.labels(stage)
        for entry in ("complete", "torn"):
            self.recovered.labels(entry)
