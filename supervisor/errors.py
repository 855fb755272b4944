"""Exception types, split by who is at fault."""

from __future__ import annotations

import sys

#: What policy code may raise that is not the policy's failure but the daemon's own,
#: passing through it: Ctrl-C (KeyboardInterrupt), a coroutine being closed
#: (GeneratorExit) and trio's Cancelled (a deadline's cancel scope, or the daemon
#: stopping; see :func:`is_daemon_own`). Everything else policy code raises -- any
#: exception, SystemExit from a stray sys.exit(), asyncio.CancelledError, a library's
#: own BaseException -- is that policy's bug, and must not stop the daemon, every
#: container's calls with it.
_BUILTIN_OWN = (KeyboardInterrupt, GeneratorExit)


def is_daemon_own(exc: BaseException) -> bool:
    """True if ``exc``, raised by policy code, is one of the daemon's own exceptions
    (KeyboardInterrupt, GeneratorExit, trio.Cancelled), alone or in an exception group
    (trio raises a nursery's Cancelled in one)."""
    # trio from sys.modules: the command line imports this module and must start
    # without trio (tests/test_top.py); without trio loaded, nothing raised Cancelled.
    trio = sys.modules.get("trio")
    own = _BUILTIN_OWN if trio is None else (*_BUILTIN_OWN, trio.Cancelled)
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(own) is not None
    return isinstance(exc, own)


class SupervisorError(Exception):
    """Base class of every error this package raises on purpose."""


class KernelMismatchError(SupervisorError):
    """The running kernel's seccomp ABI differs from the one this package was built for."""


class NotificationGone(SupervisorError):
    """The kernel no longer knows this notification (ENOENT): the target was killed, got a
    signal, or every task using the filter exited. Routine; logged at debug level."""

    def __init__(self, stage: str) -> None:
        super().__init__(f"notification gone at {stage}")
        self.stage = stage


class HandoffError(SupervisorError):
    """The peer that connected to our socket sent something we cannot accept."""


class ConfigError(SupervisorError):
    """The operator's configuration is invalid. Always names the file and the key."""

    def __init__(self, file: str, key: str, reason: str) -> None:
        super().__init__(f"{file}: {key}: {reason}")
        self.file = file
        self.key = key
        self.reason = reason


class PolicyError(SupervisorError):
    """A policy broke the API contract (bad decision, refused allow, failed to load)."""


class ProfileError(SupervisorError):
    """An OCI seccomp profile cannot be turned into a filter."""


class TargetMemoryError(SupervisorError):
    """Reading the target's memory failed. ``errno`` is what the target would have seen
    (EFAULT for a bad pointer, ENAMETOOLONG for an overlong path); a handler that lets it
    escape gets ``deny(errno)``."""

    def __init__(self, errno_value: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno_value
