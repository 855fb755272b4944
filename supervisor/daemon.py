"""The daemon: the root nursery that ties listener, router, sessions, metrics and signals.

Everything that decides lives elsewhere; this module only wires it together:

* a handoff from the listener is routed (:func:`supervisor.router.route_for`), turned into
  a :class:`~supervisor.session.Session` and started in the daemon's nursery;
* SIGHUP reloads the config and the policies; a broken new config is refused, logged and
  the old one stays. New sessions use the new chain; running sessions keep theirs;
* SIGTERM / SIGINT stop accepting and end the sessions.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

import prometheus_client
import trio
from prometheus_client import CollectorRegistry

from . import bpf
from .audit import Recorder
from .config import Config
from .decide import Chain
from .errors import ConfigError
from .handoff import Handoff
from .listener import ListenerLimits, bind_socket, serve_handoffs
from .metrics import Metrics
from .notifyfd import NotifyFd
from .policy import PolicySet
from .router import route_for
from .session import Session, SessionSettings

log = logging.getLogger("supervisor.daemon")

Loader = Callable[[], tuple[Config, Mapping[str, PolicySet]]]


@dataclass
class DaemonState:
    """What a reload replaces as a whole."""

    config: Config
    policies: Mapping[str, PolicySet]
    chains: dict[tuple[str, ...], Chain] = field(default_factory=dict)

    def chain(self, names: tuple[str, ...]) -> Chain:
        chain = self.chains.get(names)
        if chain is None:
            chain = self.chains[names] = Chain((name, self.policies[name]) for name in names)
        return chain


class Daemon:
    """Serves handoffs on one socket until cancelled or signalled.

    ``loader`` (re)reads the config and policies; it is called on SIGHUP and must raise
    ConfigError on a bad config.
    """

    def __init__(self, config: Config, policies: Mapping[str, PolicySet], *,
                 registry: CollectorRegistry | None = None, loader: Loader | None = None,
                 audit_stream: IO[str] | None = None) -> None:
        self.state = DaemonState(config, policies)
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.loader = loader
        self.recorder = Recorder(self.metrics, audit=config.audit.decisions,
                                 stream=audit_stream if audit_stream is not None else sys.stdout)
        self.sessions: set[Session] = set()
        self.reloads_failed = 0
        self.metrics_address: tuple[Any, ...] | None = None
        self._nursery: trio.Nursery | None = None

    async def run(self, *, sock: trio.socket.SocketType | None = None,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until SIGTERM/SIGINT (or cancellation). ``sock`` is a listening socket to
        use instead of binding ``[listen] socket`` (socket activation, tests)."""
        bpf.check_kernel_abi()
        config = self.state.config
        if sock is None:
            sock = bind_socket(config.listen.socket, config.listen.socket_mode)
            # A socket we bound is ours to remove: a runtime that starts a container
            # after we stopped then gets "no such file" at once instead of a refusal.
            bound_path: str | None = config.listen.socket
        else:
            bound_path = None
        with contextlib.ExitStack() as cleanup:
            if bound_path is not None:
                cleanup.callback(_unlink_quietly, bound_path)
            cleanup.enter_context(sock)
            cleanup.enter_context(self._metrics_server(config))
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT,
                                               signal.SIGHUP) as signals:
                    await nursery.start(self._serve, sock)
                    log.info("serving on %s with policies %s", _sock_name(sock),
                             ", ".join(self.state.policies) or "(none)")
                    task_status.started()
                    async for signum in signals:
                        if signum == signal.SIGHUP:
                            self.reload()
                        else:
                            log.info("%s: stopping", signal.Signals(signum).name)
                            nursery.cancel_scope.cancel()
                            break
        self._nursery = None

    @contextlib.contextmanager
    def _metrics_server(self, config: Config) -> Iterator[None]:
        """prometheus-client's own exporter, in its own thread, on ``[metrics] listen``."""
        if not config.metrics.enabled:
            yield
            return
        server, thread = prometheus_client.start_http_server(
            config.metrics.port, config.metrics.host, registry=self.registry)
        self.metrics_address = server.server_address
        log.info("metrics on http://%s:%d/metrics", *server.server_address[:2])
        try:
            yield
        finally:
            server.shutdown()
            server.server_close()
            thread.join()

    async def _serve(self, sock: trio.socket.SocketType,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listen = self.state.config.listen
        limits = ListenerLimits(
            allowed_uids=frozenset(listen.allowed_uids), max_message=listen.max_message,
            timeout=listen.handoff_timeout, max_handoffs=listen.max_handoffs)
        await serve_handoffs(sock, self.on_handoff, limits=limits, metrics=self.metrics,
                             task_status=task_status)

    async def on_handoff(self, handoff: Handoff) -> None:
        """Route a validated handoff and start its session. Takes ownership of it."""
        try:
            state = self.state
            choice = route_for(handoff.container, state.config)
            defaults = state.config.defaults
            settings = SessionSettings(
                unhandled=defaults.unhandled, on_error=defaults.on_error,
                deadline=defaults.deadline, max_inflight=defaults.max_inflight,
                mode=choice.mode)
            chain = state.chain(choice.policies)
            assert self._nursery is not None
            session = Session(NotifyFd(handoff.take_fd()), handoff.container, chain,
                              settings, self.recorder)
        finally:
            handoff.close()
        log.info("container %s (pid %d): session with policies [%s]%s",
                 session.container.id, session.container.pid, ", ".join(chain.names),
                 " in shadow mode" if settings.mode == "shadow" else "")
        self._nursery.start_soon(self._run_session, session)

    async def _run_session(self, session: Session) -> None:
        self.sessions.add(session)
        self.metrics.sessions.inc()
        try:
            await session.run()
        except Exception:
            # A bug in a session must not take the other containers down with it.
            log.exception("session of container %s failed", session.container.id)
        finally:
            self.sessions.discard(session)
            self.metrics.sessions.dec()
            log.info("container %s: session ended (%d notifications)",
                     session.container.id, session.stats.notifications)

    def reload(self) -> bool:
        """Re-read config and policies; keep the old ones if the new ones are broken."""
        if self.loader is None:
            log.warning("SIGHUP: no config file to reload")
            return False
        try:
            config, policies = self.loader()
        except ConfigError as exc:
            self.reloads_failed += 1
            log.error("reload refused, keeping the running config: %s", exc)
            return False
        old = self.state.config
        if (config.listen != old.listen) or (config.metrics != old.metrics):
            log.warning("reload: [listen] and [metrics] changes take effect on restart")
        self.state = DaemonState(config, policies)
        self.recorder.audit = config.audit.decisions
        log.info("reloaded %s: policies %s", config.file, ", ".join(policies) or "(none)")
        return True


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _sock_name(sock: Any) -> str:
    try:
        return str(sock.getsockname())
    except OSError:
        return "?"
