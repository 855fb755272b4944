"""One session per listener fd: receive notifications, ask the chain, answer the kernel.

The hot loop (:meth:`Session.run`) is the only reader of its fd. It waits until the fd is
readable, then drains every pending notification:

* a call no policy handles gets the ``unhandled`` answer at once;
* plain-function handlers are run inline: the answer goes out before the next RECV;
* the first coroutine handler moves the rest of the chain into its own task, bounded by
  ``max_inflight`` and by the deadline, so a slow handler for one thread never delays the
  answer to another.

Every notification gets exactly one answer unless the kernel withdrew it (ENOENT), which
is routine and only counted. Whatever goes wrong in a handler becomes ``on_error``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio

from . import abi
from .audit import Recorder
from .decide import UNHANDLED_POLICY, Chain, Link, Mode, Outcome, check_result
from .errors import NotificationGone, PolicyError, TargetMemoryError
from .memory import TargetMemory
from .notifyfd import POLL_END, POLLIN, NotifyFd
from .policy import Container, Decision, Notification, deny, response_fields
from .syscalls import arch_name, syscall_name

log = logging.getLogger("supervisor.session")


@dataclass(frozen=True, slots=True)
class SessionSettings:
    unhandled: Decision = field(default_factory=lambda: deny(38, reason="unhandled"))
    on_error: Decision = field(default_factory=lambda: deny(1, reason="handler error"))
    deadline: float = 2.0
    max_inflight: int = 64
    mode: Mode = "enforce"


@dataclass(slots=True)
class SessionStats:
    notifications: int = 0
    answered: int = 0
    gone: int = 0
    decisions: dict[str, int] = field(default_factory=dict)


# What the hot loop caches per (arch, nr): the call's name, arch name and handlers.
_Route = tuple[str, str, tuple[Link, ...]]


class Session:
    """Serves one listener fd until the filter has no task left (POLLHUP) or it is
    cancelled. Owns ``notify`` and closes it when it ends."""

    def __init__(self, notify: NotifyFd, container: Container, chain: Chain,
                 settings: SessionSettings, recorder: Recorder) -> None:
        self.notify = notify
        self.container = container
        self.chain = chain
        self.settings = settings
        self.recorder = recorder
        self.memory = TargetMemory(notify)
        self.stats = SessionStats()
        self.inflight = 0
        self.started = trio.current_time()
        self._slots = trio.Semaphore(settings.max_inflight)
        self._routes: dict[tuple[int, int], _Route] = {}
        self._nursery: trio.Nursery | None = None

    def __repr__(self) -> str:
        return f"<Session {self.container.id!r} fd={self.notify.fileno()}>"

    async def run(self) -> None:
        """Serve until POLLHUP; then cancel what is in flight and close the fd."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self._read_loop()
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            self.notify.close()
            for _name, policy_set in self.chain.policies:
                try:
                    policy_set.session_ended(self.container)
                except Exception:
                    log.exception("session-end hook of policy %s failed", _name)

    async def _read_loop(self) -> None:
        notify = self.notify
        while True:
            await notify.wait_readable()
            while True:
                events = notify.poll_now()
                if events & POLLIN:
                    raw = notify.recv()
                    if raw is None:
                        self.stats.gone += 1
                        self.recorder.gone("recv")
                        continue
                    await self._dispatch(raw)
                elif events & POLL_END:
                    log.debug("session %s: filter has no task left", self.container.id)
                    return
                else:
                    break

    def _route(self, arch: int, nr: int) -> _Route:
        route = self._routes.get((arch, nr))
        if route is None:
            name = syscall_name(arch, nr)
            route = self._routes[(arch, nr)] = (
                name, arch_name(arch, nr), self.chain.links(name))
        return route

    async def _dispatch(self, raw: tuple[int, ...]) -> None:
        received = trio.current_time()
        notif_id, tid, arch, nr = raw[0], raw[1], raw[4], raw[3]
        args = raw[6:12]
        self.stats.notifications += 1
        syscall, arch_label, links = self._route(arch, nr)
        if not links:
            self._answer(notif_id, tid, syscall, args, received,
                         Outcome(self.settings.unhandled, UNHANDLED_POLICY))
            return
        n = Notification(id=notif_id, pid=tid, nr=nr, arch=arch_label, syscall=syscall,
                         args=args, container=self.container, memory=self.memory)
        for index, link in enumerate(links):
            if link.is_async:
                try:
                    self._slots.acquire_nowait()
                except trio.WouldBlock:
                    await self._slots.acquire()
                self.inflight += 1
                assert self._nursery is not None
                self._nursery.start_soon(self._decide_async, n, links, index, received)
                return
            try:
                outcome = self._run_sync(n, link)
            except NotificationGone as gone:
                self.stats.gone += 1
                self.recorder.gone(gone.stage)
                return
            if outcome is not None:
                self._answer(notif_id, tid, syscall, args, received, outcome)
                return
        self._answer(notif_id, tid, syscall, args, received,
                     Outcome(self.settings.unhandled, UNHANDLED_POLICY))

    def _run_sync(self, n: Notification, link: Link) -> Outcome | None:
        try:
            result = link.func(n)
            decision = check_result(result, link.policy, read_memory=n.read_memory)
        except NotificationGone:
            raise
        except Exception as exc:
            return self._failure(link.policy, n, exc)
        return None if decision is None else Outcome(decision, link.policy)

    async def _decide_async(self, n: Notification, links: Sequence[Link], start: int,
                            received: float) -> None:
        try:
            outcome: Outcome | None = None
            current = [UNHANDLED_POLICY]
            with trio.move_on_at(received + self.settings.deadline) as scope:
                outcome = await self._run_chain(n, links, start, current)
            if scope.cancelled_caught:
                policy = current[0]
                log.warning("container %s: %s handler of policy %s missed its %.3gs deadline",
                            self.container.id, n.syscall, policy, self.settings.deadline)
                outcome = Outcome(self.settings.on_error, policy, "deadline",
                                  f"deadline {self.settings.deadline}s")
            if outcome is None:
                outcome = Outcome(self.settings.unhandled, UNHANDLED_POLICY)
            self._answer(n.id, n.pid, n.syscall, n.args, received, outcome)
        except NotificationGone as gone:
            self.stats.gone += 1
            self.recorder.gone(gone.stage)
        finally:
            self.inflight -= 1
            self._slots.release()

    async def _run_chain(self, n: Notification, links: Sequence[Link], start: int,
                         current: list[str]) -> Outcome | None:
        for link in links[start:]:
            current[0] = link.policy  # names the policy that overran, on a deadline
            if not link.is_async:
                outcome = self._run_sync(n, link)
            else:
                try:
                    result = await link.func(n)  # type: ignore[misc]
                    decision = check_result(result, link.policy, read_memory=n.read_memory)
                except NotificationGone:
                    raise
                except Exception as exc:
                    return self._failure(link.policy, n, exc)
                outcome = None if decision is None else Outcome(decision, link.policy)
            if outcome is not None:
                return outcome
        return None

    def _failure(self, policy: str, n: Notification, exc: Exception) -> Outcome:
        if isinstance(exc, TargetMemoryError):
            # The target passed a bad pointer: answer what the kernel would have.
            return Outcome(deny(exc.errno, reason=str(exc)), policy, "memory", str(exc))
        kind: str = "refused" if isinstance(exc, PolicyError) else "exception"
        log.warning("container %s: policy %s failed on %s: %s: %s", self.container.id,
                    policy, n.syscall, type(exc).__name__, exc,
                    exc_info=kind == "exception")
        return Outcome(self.settings.on_error, policy, kind,  # type: ignore[arg-type]
                       f"{type(exc).__name__}: {exc}")

    def _answer(self, notif_id: int, tid: int, syscall: str, args: Sequence[int],
                received: float, outcome: Outcome) -> None:
        """Give the kernel its one answer to ``notif_id`` and record it."""
        decision = outcome.decision
        shadow = self.settings.mode == "shadow"
        owned_fd = decision.fd if decision.kind == "inject_fd" else -1
        try:
            if shadow or decision.kind != "inject_fd":
                val, error, flags = ((0, 0, abi.USER_NOTIF_FLAG_CONTINUE) if shadow
                                     else response_fields(decision))
                self.notify.send(notif_id, val, error, flags)
            else:
                try:
                    self.notify.send_fd(notif_id, decision.fd, cloexec=decision.cloexec)
                except OSError as exc:
                    # ADDFD failed before answering (bad fd, target out of fds): the call
                    # still waits, so it gets the on_error answer instead.
                    outcome = Outcome(self.settings.on_error, outcome.policy, "exception",
                                      f"inject_fd failed: {exc.strerror}")
                    decision = outcome.decision
                    val, error, flags = response_fields(decision)
                    self.notify.send(notif_id, val, error, flags)
        except NotificationGone as gone:
            self.stats.gone += 1
            self.recorder.gone(gone.stage)
            return
        finally:
            if owned_fd >= 0:
                _close_quietly(owned_fd)
        self.stats.answered += 1
        label = decision.kind
        self.stats.decisions[label] = self.stats.decisions.get(label, 0) + 1
        self.recorder.decided(self.container, notif_id, tid, syscall, args, outcome,
                              trio.current_time() - received, shadow=shadow)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
