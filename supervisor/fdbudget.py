"""The daemon's file descriptors: how many it may open, and what is set aside for what.

Every served container costs one fd for as long as it runs; everything else the daemon
opens from outside input is bounded by a cap: handoffs being read (``max_handoffs``
connections, each with at most ``max_fds`` fds received), control connections and
``/metrics`` connections. So the fds left for sessions are the limit minus those caps
minus a margin for the daemon's own files (epoll, the audit stream, pidfds and target
memory opened during decisions, a state memfd for the fd store).

At start the soft ``RLIMIT_NOFILE`` is raised to the hard one (systemd's default soft
limit is 1024; the hard one is 524288, and the unit sets ``LimitNOFILE=``): nothing in
the daemon uses ``select()``, which is what the low soft limit protects.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from typing import Final

__all__ = ["DAEMON_MARGIN", "FdBudget", "fd_budget", "raise_nofile_limit"]

#: fds for the daemon's own use: stdio, epoll sets, the notify, control and metrics
#: sockets, the audit stream, pidfds and /proc/<tid>/mem opened during decisions.
DAEMON_MARGIN: Final = 64


@dataclass(frozen=True, slots=True)
class FdBudget:
    limit: int
    handoffs: int
    control: int
    metrics: int
    margin: int = DAEMON_MARGIN

    @property
    def reserved(self) -> int:
        return self.handoffs + self.control + self.metrics + self.margin

    @property
    def sessions(self) -> int:
        """fds left for sessions (may be <= 0: the limit is too low)."""
        return self.limit - self.reserved

    def describe(self) -> str:
        return (f"fd limit {self.limit}: {self.handoffs} for handoffs being read, "
                f"{self.control} for control connections, {self.metrics} for /metrics, "
                f"{self.margin} for the daemon; {max(self.sessions, 0)} left for "
                f"containers")


def fd_budget(limit: int, *, max_handoffs: int, max_fds: int, control_connections: int,
              metrics_connections: int) -> FdBudget:
    """The budget for a soft ``RLIMIT_NOFILE`` of ``limit``. A handoff being read holds
    its connection and up to ``max_fds`` fds received. Pure."""
    return FdBudget(limit=limit, handoffs=max_handoffs * (max_fds + 1),
                    control=control_connections, metrics=metrics_connections)


def raise_nofile_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; return the soft limit now in
    force (unchanged if raising failed)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError):
            pass
    return soft
