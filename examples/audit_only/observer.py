"""Audit only: let every notified call run, and record what each container did.

A first step before enforcing anything: put a policy in front of a workload that only
watches. Every notified call continues (CONTINUE: the kernel runs it as if nothing had
looked), and when a container's session ends one log line sums up its calls, e.g.::

    container 'web-1': 1423 notified calls: openat=1201 connect=210 mkdir=12

The fallback is the whole policy: it gets every notified call, whatever its name, so
what is observed is decided by the container's profile alone (which calls it marks
``SCMP_ACT_NOTIFY``), not by a list kept here. Nothing is read from the caller's
memory, so the observer costs one Python call per notification and cannot be shown one
thing while the kernel runs another.

For one audit line per call as well, run it with a config that says
``[audit] decisions = "all"`` (the line escapes every string). Run it::

    seccomp-supervisor serve --socket /run/seccomp-observer.sock --policy observer.py

Counts are kept per running container (a few hundred names at most per container:
numbers without a name are counted together as ``nr_*``) and dropped when its session
ends.
"""

import logging
from collections import Counter

from supervisor.policy import Container, Notification, PolicySet, allow

policy = PolicySet("audit-only", description="every notified call continues; counted")
log = logging.getLogger("supervisor.policy.audit_only")

# Container id -> calls by name. Sessions of the same container id share one entry.
calls: dict[str, Counter[str]] = {}
ANSWER = allow(reason="audit only")


@policy.fallback
def observe(n: Notification):
    counter = calls.get(n.container.id)
    if counter is None:
        counter = calls[n.container.id] = Counter()
    # Numbers without a name are counted as one: there are 2**32 of them, and a
    # container must not make this table grow without bound.
    counter["nr_*" if n.syscall.startswith("nr_") else n.syscall] += 1
    return ANSWER


@policy.on_session_end
def summarise(container: Container) -> None:
    counter = calls.pop(container.id, None)
    if not counter:
        return
    by_name = " ".join(f"{name}={count}" for name, count in counter.most_common())
    # %r: the container id comes from whoever created the container.
    log.info("container %r: %d notified calls: %s", container.id, counter.total(), by_name)
