"""Policy chains and the rules that turn handler results into decisions. No I/O.

A chain is the ordered list of policies a route picked. For one system call, its handlers
are asked in order: the first refusal or answer of its own (``deny``, ``returns``,
``inject_fd``) decides; ``None`` passes on; an ``allow()`` is kept while the rest of the
chain is asked, and is the answer if none of them decides otherwise (so a permissive
policy placed first cannot switch off the checks of the policies after it).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import PolicyError
from .policy import Decision, Handler, HandlerEntry, PathArgs, PolicySet
from .syscalls import arch_name, is_unnamed, syscall_name

ErrorKind = Literal["exception", "deadline", "refused", "memory", "recovery", "ended"]
Mode = Literal["enforce", "shadow"]

UNHANDLED_POLICY = "-"  # policy label of answers no policy gave


@dataclass(frozen=True, slots=True)
class Link:
    """One handler of a chain, for one system call.

    ``is_async``: the link is decided by the session's Python code, not called inline by
    the compiled loop (``supervisor/_hotloop.c`` hands over every link whose
    ``is_async`` is not False): its handler is a coroutine function, or it declares
    ``paths`` (read before the handler, without a task: see ``Session._prefetch``).
    ``coroutine``: the handler is a coroutine function (without ``paths``, the same as
    ``is_async``).
    """

    policy: str
    func: Handler
    is_async: bool
    paths: PathArgs | None = None
    coroutine: bool = False

    def __post_init__(self) -> None:
        if self.paths is None and self.coroutine != self.is_async:
            object.__setattr__(self, "coroutine", self.is_async)

    @classmethod
    def of(cls, policy: str, entry: HandlerEntry) -> Link:
        """The link of a registered handler."""
        return cls(policy, entry.func, entry.is_async or entry.paths is not None,
                   entry.paths, entry.is_async)


@dataclass(slots=True)
class Outcome:
    """What a chain decided, and who decided it. Treat it as immutable.

    ``error`` is set when the decision is the configured ``on_error`` answer (or, for
    ``memory``, the errno of a failed target memory read); ``detail`` says why.

    Not ``frozen``: one is made per notification, and a frozen dataclass's ``__init__``
    (``object.__setattr__`` per field) costs four times as much.
    """

    decision: Decision
    policy: str
    error: ErrorKind | None = None
    detail: str = ""
    # Not part of its value: where the audit rate limit finds this outcome's full window
    # without building its key (supervisor.audit.RateLimiter.remember).
    audit_hot: Any = field(default=None, compare=False, repr=False)


# What a notified (audit arch, number) pair resolves to in a chain: the call's name, the
# arch's name and the handlers to ask.
Route = tuple[str, str, tuple[Link, ...]]


class Chain:
    """The handlers of an ordered list of policies, looked up by system call name.

    ``routes`` caches :meth:`route` for every session that uses this chain (sessions of
    containers with the same policies share one chain): the hot loop reads it directly.
    """

    def __init__(self, policies: Iterable[tuple[str, PolicySet]]) -> None:
        self.policies: tuple[tuple[str, PolicySet], ...] = tuple(policies)
        self.names = tuple(name for name, _ in self.policies)
        table: dict[str, list[Link]] = {}
        for name, policy_set in self.policies:
            for syscall in sorted(policy_set.syscalls):
                entry = policy_set.handler_for(syscall)
                assert entry is not None
                table.setdefault(syscall, []).append(Link.of(name, entry))
        self._table = {syscall: tuple(links) for syscall, links in table.items()}
        # Fallbacks come after every handler named for the call, in chain order; they
        # are part of each cached route, so they cost nothing per notification.
        self._fallbacks = tuple(
            Link.of(name, entry) for name, policy_set in self.policies
            if (entry := policy_set.fallback_handler) is not None)
        #: ``unhandled`` of the first policy of the chain that declares one, with the
        #: policy's name as its reason if it gave none; None if no policy does.
        self.unhandled: Decision | None = None
        for name, policy_set in self.policies:
            if policy_set.unhandled is not None:
                self.unhandled = _with_reason(policy_set.unhandled,
                                              f"unhandled: policy {name}'s default")
                break
        # audit arch -> call number -> route; two plain int lookups cost less than
        # building and hashing an (arch, nr) key per notification.
        self.routes: dict[int, dict[int, Route]] = {}

    @property
    def syscalls(self) -> frozenset[str]:
        return frozenset(self._table)

    def links(self, syscall: str) -> tuple[Link, ...]:
        """The handlers asked for ``syscall``: those named for it, then the fallbacks."""
        named = self._table.get(syscall, ())
        return named + self._fallbacks if self._fallbacks else named

    def session_unhandled(self, configured: Decision, *, configured_explicitly: bool
                          ) -> Decision:
        """The ``unhandled`` answer of a session on this chain: ``[defaults] unhandled``
        when the config file sets it (``configured_explicitly``) or no policy of the
        chain declares one, else the policy's (see :attr:`unhandled`)."""
        if configured_explicitly or self.unhandled is None:
            return configured
        return self.unhandled

    def route(self, arch: int, nr: int) -> Route:
        """Name, arch name and handlers of call ``nr`` made in audit arch ``arch``."""
        by_nr = self.routes.get(arch)
        route = by_nr.get(nr) if by_nr is not None else None
        if route is None:
            name = syscall_name(arch, nr)
            route = (name, arch_name(arch, nr), self.links(name))
            # Numbers without a name are not cached: a filter may notify all 2**32 of
            # them, named ones are a few hundred per arch.
            if not is_unnamed(name):
                self.routes.setdefault(arch, {})[nr] = route
        return route


def _with_reason(decision: Decision, reason: str) -> Decision:
    if decision.reason:
        return decision
    return Decision(decision.kind, errno=decision.errno, value=decision.value,
                    unchecked=decision.unchecked, reason=reason)


def check_result(result: object, policy: str, *, read_memory: bool) -> Decision | None:
    """Validate what a handler returned.

    Raises PolicyError for anything but a Decision or None, and for an ``allow()`` after
    the handler read target memory without ``unchecked=True``.
    """
    if result is None:
        return None
    if not isinstance(result, Decision):
        if inspect.iscoroutine(result):
            result.close()
            raise PolicyError(f"policy {policy!r} returned a coroutine: a handler that "
                              "awaits (read_path, supervisor.caller...) must be an "
                              "`async def` handler, and await it")
        raise PolicyError(f"policy {policy!r} returned {type(result).__name__}, "
                          "not a Decision or None")
    if result.kind == "allow" and read_memory and not result.unchecked:
        raise PolicyError(
            f"policy {policy!r} returned allow() after reading target memory: the kernel "
            "re-reads the arguments after CONTINUE, so the check does not hold; return "
            "allow(unchecked=True) to accept that, or emulate the call")
    return result
