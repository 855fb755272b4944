"""Benchmark policy: getppid fails with EPERM, decided inline (a plain function)."""

import errno

from supervisor.policy import Decision, Notification, PolicySet, deny

policy = PolicySet("bench-sync")


@policy.on("getppid")
def no_getppid(n: Notification) -> Decision:
    return deny(errno.EPERM, reason="benchmark")  # built per call, as policies do
