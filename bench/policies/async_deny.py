"""Benchmark policy: getppid fails with EPERM, decided by a coroutine handler that never
waits (the daemon runs its first step inline; one that waited would be carried on under
the deadline)."""

import errno

from supervisor.policy import Decision, Notification, PolicySet, deny

policy = PolicySet("bench-async")


@policy.on("getppid")
async def no_getppid(n: Notification) -> Decision:
    return deny(errno.EPERM, reason="benchmark")  # built per call, as policies do
