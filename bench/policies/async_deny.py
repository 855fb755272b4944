"""Benchmark policy: getppid fails with EPERM, decided by a coroutine handler (a task
under the deadline, as a handler that reads target memory would run)."""

import errno

from supervisor.policy import Notification, PolicySet, deny

policy = PolicySet("bench-async")


@policy.on("getppid")
async def no_getppid(n: Notification) -> object:
    return deny(errno.EPERM, reason="benchmark")  # built per call, as policies do
