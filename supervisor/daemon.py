"""The daemon: the root nursery that ties listener, router, sessions, metrics and signals.

Everything that decides lives elsewhere; this module only wires it together:

* a handoff from the listener is routed (:func:`supervisor.router.route_for`), turned into
  a :class:`~supervisor.session.Session` and started in the daemon's nursery;
* SIGHUP reloads the config and the policies; a broken new config is refused, logged,
  counted and the old one stays. New sessions use the new chain; running sessions are
  routed again and use theirs from their next notification on;
* SIGTERM / SIGINT stop gracefully: stop accepting, stop receiving, let the decisions
  under way finish (bounded by the deadline), exit; a second signal stops at once;
* restarts (issue 7): every session goes into systemd's fd store when it starts
  (:mod:`supervisor.fdstore`) and comes back from ``LISTEN_FDS`` on the next start;
  without systemd, ``serve --takeover`` takes the sessions of the running daemon over
  its control socket (:mod:`supervisor.takeover`).

systemd (:mod:`supervisor.systemd`): the notify socket comes from socket activation when
systemd passes one (``LISTEN_FDS``, the fd named ``notify``), else it is bound here;
``READY=1`` is sent only once it listens (and the control socket and ``/metrics`` are up),
``STATUS=`` says how many containers are served, ``RELOADING=1`` / ``READY=1`` frame a
SIGHUP reload, ``STOPPING=1`` starts a stop, and ``WATCHDOG=1`` is sent from the event loop
at half the ``WatchdogSec=`` interval, so a stuck loop gets the service restarted.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import signal
import socket
import sys
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any, cast

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge

from . import __version__, accel, bpf, emulate, memory, systemd
from ._start import in_use
from .audit import Recorder
from .config import Config, ListenConfig
from .control import MAX_CONNECTIONS as CONTROL_MAX_CONNECTIONS
from .control import ControlError, ControlRequest, ControlServer
from .decide import Chain
from .errors import ConfigError, ProfileError
from .fdbudget import fd_budget, raise_nofile_limit
from .fdstore import (
    SESSION_PREFIX,
    FdStore,
    group_listen_fds,
    new_session_name,
    restore_group,
)
from .giveback import ADOPT_TIMEOUT, GiveError, give_path, give_sessions, valid_token
from .handoff import Handoff
from .httpmetrics import MetricsServer, bind_tcp
from .journal import Journal, JournalError, create_journal_fd, is_journal_fd, slots_for
from .keeper import Attached, KeeperError, KeeperUnavailable, attach
from .learn import learn_directories, owner_directory
from .listener import ListenerLimits, bind_socket, serve_handoffs
from .metrics import DECISION_BUCKETS, Metrics
from .notifyfd import NotifyFd, is_seccomp_listener
from .policy import Container, PolicySet
from .router import (
    TRACE_ANNOTATION,
    RouteChoice,
    TraceAnnotationError,
    TraceRequest,
    check_trace_permitted,
    route_for,
    trace_request,
)
from .safefile import FILE_TIMEOUT, FileRefused, drain
from .served import KcmpUnavailable, ServedListeners, kcmp_problem
from .session import Session, SessionSettings
from .takeover import AcceptGate, HandedSession, Handover, TakeoverError, take_over

log = logging.getLogger("supervisor.daemon")

#: Seconds ``serve --fd-keeper`` waits at start for a keeper to answer.
KEEPER_WAIT = 10.0
#: Fewer fds than this left for sessions after the caps gets a warning at start.
MIN_SESSION_FDS = 256

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
                 audit_stream: IO[str] | None = None,
                 notifier: systemd.Notifier | None = None,
                 fd_keeper: str | None = None) -> None:
        self.state = DaemonState(config, policies)
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = Metrics(self.registry, process=True)
        self.loader = loader
        self.recorder = Recorder(self.metrics, audit=config.audit.decisions,
                                 stream=audit_stream if audit_stream is not None else sys.stdout,
                                 rate_limit=config.audit.rate_limit,
                                 container_bytes=config.audit.container_bytes,
                                 max_line=config.audit.max_line)
        self.notifier = notifier if notifier is not None else systemd.Notifier.from_environ()
        self.control = ControlServer({"status": self._status_command})
        self.started_at = time.time()
        self.socket_activated = False
        self.notify_socket = ""
        # Fds systemd passed that are not the notify socket (e.g. notify fds from the fd
        # store after a restart): left open for whoever claims them.
        self.inherited_fds: list[systemd.ListenFd] = []
        self.ended_notifications = 0
        self.sessions: set[Session] = set()
        self.reloads_failed = 0
        self.metrics_address: tuple[Any, ...] | None = None
        self.metrics_server = MetricsServer(self.registry)
        self._nursery: trio.Nursery | None = None
        # Reliability (issue 7): reload, graceful stop, fd store, takeover.
        self.reloads = Counter(
            "reloads", "Config and policy reloads (SIGHUP), by result (ok, failed).",
            ["result"], namespace="seccomp_supervisor", registry=self.registry)
        self.restored = Counter(
            "sessions_restored", "Sessions taken over from a previous process, by source "
            "(fdstore, takeover).", ["source"], namespace="seccomp_supervisor",
            registry=self.registry)
        for label in ("ok", "failed"):
            self.reloads.labels(label)
        for label in ("fdstore", "takeover"):
            self.restored.labels(label)
        # Only with --fd-keeper (a sample labelled with its path): 1 while attached.
        self.keeper_attached = Gauge(
            "fd_keeper_attached", "1 while the fd keeper of serve --fd-keeper holds the "
            "sessions for a crash; 0 while it is gone (a crash now would end every "
            "container's session).", ["path"], namespace="seccomp_supervisor",
            registry=self.registry)
        # Threads a container's slow memory holds now (memory.ReadPool.stats), from
        # the pool of the run, known once run() starts. The registry is collected in a
        # worker thread: the figure is read there without a lock, as plain attributes
        # the trio thread keeps.
        self._read_pool: memory.ReadPool | None = None
        Gauge("memory_read_threads_slow", "Threads in a read of a container's memory "
              "that has lasted (a userfaultfd or FUSE page served late or never). At "
              "most 64 such threads: past that, reads behind a slow one fail with EAGAIN.",
              namespace="seccomp_supervisor",
              registry=self.registry).set_function(self._slow_read_threads)
        # A listener served twice freezes the loop (see served.py): every path that
        # starts a session (handoff, fd store, takeover, resume) claims it here first.
        self.served = ServedListeners()
        self.refused = Counter(
            "listeners_refused", "Listeners not served, by reason (already_served: the "
            "same listener is served by another session; read_elsewhere: another process "
            "reads it too, the session was ended; session_limit: [listen] max_sessions or "
            "max_sessions_per_uid was reached).", ["reason"],
            namespace="seccomp_supervisor", registry=self.registry)
        for label in ("already_served", "read_elsewhere", "session_limit"):
            self.refused.labels(label)
        self._kcmp_warned = False
        self.fdstore = FdStore(self.notifier)
        # The fd keeper (keeper.py) replaces systemd's fd store when given.
        self.fd_keeper = fd_keeper
        self._keeper: Attached | None = None
        self.stopping = False
        self._gate: AcceptGate | None = None
        self._ended: dict[Session, trio.Event] = {}
        self._stored_names: dict[Session, str] = {}
        # Sessions paused for a handover: notify fd, fd-store name, in-flight journal.
        self._handed: dict[int, tuple[NotifyFd, str | None, Journal | None]] = {}
        self._keep_socket_file = False
        self._adopting = trio.Lock()
        # Learn mode by annotation (io.containers.trace-syscall): those sessions keep
        # their chain across reloads; (container id, output) pairs written already.
        self._traced: weakref.WeakSet[Session] = weakref.WeakSet()
        self._traces_written: set[tuple[str, str, str]] = set()

    async def run(self, *, sock: trio.socket.SocketType | None = None,
                  sock_file: str | None = None, takeover: str | None = None,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until SIGTERM/SIGINT (or cancellation). ``sock`` is a listening socket to
        use instead of binding ``[listen] socket`` (socket activation, tests, the one
        ``serve`` binds before loading the daemon); ``sock_file``, its file, which is
        then removed at exit as if the daemon had bound it.

        ``takeover`` is the control socket of a running daemon to take the sessions and
        the notify socket of first (``serve --takeover``; nothing to take over if no
        daemon listens there). Raises TakeoverError if a takeover broke off (the old
        daemon then serves on)."""
        bpf.check_kernel_abi()
        self._read_pool = memory.current_read_pool()
        config = self.state.config
        report_fds = self._plan_fds(config)
        problem = kcmp_problem()
        if problem is not None:
            self._kcmp_warned = True
            log.error("cannot tell whether a listener is served twice (%s): one handed "
                      "over twice is served twice until a RECV blocks; the RECV watchdog "
                      "then interrupts it (the loop stalls up to 0.2 s) and ends that "
                      "session", problem)
        kept: list[systemd.ListenFd] = []
        if self.fd_keeper is not None:
            attached = self._attach_keeper()
            if attached.retired:
                await self._idle_retired(attached, task_status)
                return
            kept = attached.fds
            if kept and await self._give_kept_to_live_daemon(kept):
                await self._idle_retired(attached, task_status, gave=True)
                return
            if kept and takeover is not None:
                log.info("fd keeper: it holds %d fds: serving them again, not taking over",
                         len(kept))
                takeover = None
        taken = None
        if takeover is not None and sock is None:
            taken = await self._request_takeover(takeover)
            if taken is not None and taken.listen_fd >= 0:
                sock = trio.socket.from_stdlib_socket(socket.socket(fileno=taken.listen_fd))
                taken.listen_fd = -1
        bound_path = sock_file if sock is not None else None
        if sock is None:
            sock = self._activated_socket()
        if sock is None:
            sock = bind_socket(config.listen.socket, config.listen.socket_mode)
            # A socket we bound is ours to remove: a runtime that starts a container
            # after we stopped then gets "no such file" at once instead of a refusal.
            bound_path = config.listen.socket
        elif taken is not None and _sock_name(sock) == config.listen.socket:
            bound_path = config.listen.socket  # bound by the daemon we took over from
        self.notify_socket = _sock_name(sock)
        notifier = self.notifier
        with contextlib.ExitStack() as cleanup:
            # Last out: its socket to the manager (a later message connects anew).
            cleanup.callback(notifier.close)
            emulate.start_helper()  # `serve` started it already, before dropping capabilities
            cleanup.callback(emulate.stop_helper)
            if bound_path is not None:
                cleanup.callback(self._unlink_socket_file, bound_path)
            cleanup.enter_context(sock)
            cleanup.callback(self._close_handed)
            cleanup.callback(self._detach_keeper)
            metrics_sock = None
            if taken is None:
                metrics_sock = self._bind_metrics(config)
                if metrics_sock is not None:
                    cleanup.enter_context(metrics_sock)
            report_fds()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT,
                                               signal.SIGHUP) as signals:
                    await nursery.start(self.recorder.run_writer)
                    self.register_handover(nursery)
                    if taken is not None:
                        # Serve the containers first; /metrics and the control socket
                        # only once the old daemon let go of them.
                        self._adopt_taken(taken)
                        with trio.move_on_after(10):
                            await _wait_for_exit(taken.old_pid)
                        try:
                            metrics_sock = self._bind_metrics(config)
                            if metrics_sock is not None:
                                cleanup.enter_context(metrics_sock)
                        except OSError as exc:
                            log.error("metrics on %s: %s", config.metrics.listen, exc)
                    else:
                        self.inherited_fds.extend(kept)
                        self._restore_stored_sessions()
                    if self._keeper is not None:
                        nursery.start_soon(self._watch_keeper)
                    if metrics_sock is not None:
                        await nursery.start(self.metrics_server.serve, metrics_sock)
                    await nursery.start(self._serve, sock)
                    await nursery.start(self._serve_control, config.listen.control_socket)
                    if notifier.watchdog_interval is not None:
                        nursery.start_soon(self._watchdog, notifier.watchdog_interval)
                    log.info("serving on %s with policies %s; hot loop: %s; memory reads' "
                             "hand-over %s", self.notify_socket,
                             ", ".join(self.state.policies) or "(none)", accel.WHY,
                             memory.spinning())
                    # Only now: the notify socket listens, so runtimes may connect.
                    notifier.ready(self._status_text())
                    task_status.started()
                    async for signum in signals:
                        if signum == signal.SIGHUP:
                            notifier.reloading()
                            self.reload()
                            notifier.ready(self._status_text())
                        elif not self.stopping:
                            log.info("%s: stopping", signal.Signals(signum).name)
                            notifier.stopping(f"stopping: {len(self.sessions)} containers")
                            nursery.start_soon(self.stop_gracefully)
                        else:
                            log.warning("%s again: stopping at once",
                                        signal.Signals(signum).name)
                            nursery.cancel_scope.cancel()
                            break
            # Profiles still being written by session-end hooks (worker threads).
            with trio.CancelScope(shield=True), trio.move_on_after(FILE_TIMEOUT):
                await drain()
        self._nursery = None

    def _activated_socket(self) -> trio.socket.SocketType | None:
        """The notify socket systemd passed (socket activation), or None. The other fds
        passed are kept in :attr:`inherited_fds`."""
        try:
            fds = systemd.take_listen_fds()
        except ValueError as exc:
            log.error("ignoring the fds systemd passed: %s", exc)
            return None
        if not fds:
            return None
        chosen = systemd.pick_listen_fd(fds, "notify")
        self.inherited_fds = [item for item in fds if item is not chosen]
        if self.inherited_fds:
            log.info("systemd passed %d other fds: %s", len(self.inherited_fds),
                     ", ".join(sorted({item.name for item in self.inherited_fds})))
        if chosen is None:
            log.warning("systemd passed no fd named 'notify': binding the socket myself")
            return None
        if not systemd.is_listening_unix_stream(chosen.fd):
            log.error("fd %d (%s) from systemd is not a listening unix stream socket; "
                      "binding the socket myself", chosen.fd, chosen.name)
            self.inherited_fds.append(chosen)
            return None
        self.socket_activated = True
        log.info("using the notify socket passed by systemd (fd %d, %s)", chosen.fd,
                 chosen.name)
        return trio.socket.from_stdlib_socket(socket.socket(fileno=chosen.fd))

    async def _serve_control(self, path: str,
                             task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                             ) -> None:
        """The control socket; a failure to bind it is logged, not fatal: the containers
        matter more than ``status``."""
        try:
            await self.control.serve(path, task_status=task_status)
        except OSError as exc:
            log.error("control socket %s: %s; `status` will not work", path, exc)
            task_status.started()

    async def _watchdog(self, interval: float) -> None:
        """``WATCHDOG=1`` at half the interval, from the event loop: it stops when the
        loop is stuck, and systemd restarts the service."""
        while True:
            self.notifier.watchdog()
            await trio.sleep(interval / 2)

    def _slow_read_threads(self) -> float:
        pool = self._read_pool
        return 0.0 if pool is None else float(pool.stats()["threads_in_slow_reads"])

    def _status_text(self) -> str:
        n = len(self.sessions)
        return f"serving {n} container{'' if n == 1 else 's'} on {self.notify_socket}"

    def status(self) -> dict[str, Any]:
        """What ``seccomp-supervisor status`` shows (JSON-serialisable)."""
        now = trio.current_time()
        sessions = []
        for session in sorted(self.sessions, key=lambda s: s.started):
            c = session.container
            stats = session.stats
            sessions.append({
                "session": session.serial,
                "container": c.id, "name": c.name, "runtime_pid": c.pid,
                "pod_namespace": c.pod_namespace, "pod_name": c.pod_name,
                "peer_uid": c.peer_uid,
                "status": c.status,
                "bundle": c.bundle, "metadata": c.metadata, "labels": dict(c.labels),
                "annotations": dict(c.annotations),
                "policies": list(session.chain.names), "mode": session.settings.mode,
                "notifications": stats.notifications, "answered": stats.answered,
                "gone": stats.gone, "decisions": dict(stats.decisions),
                "inflight": session.inflight,
                "age_seconds": round(now - session.started, 3),
                "latency_counts": list(stats.latency),
            })
        return {
            "version": __version__,
            "pid": os.getpid(),
            # "c" or "python", and why (supervisor/accel.py).
            "hot_loop": {"kind": accel.KIND, "why": accel.WHY},
            # The cyclic garbage collector (supervisor/heap.py): its young threshold, and
            # its collections so far by generation.
            "garbage_collector": {
                "young_threshold": gc.get_threshold()[0],
                "collections": [generation["collections"] for generation in gc.get_stats()]},
            # Reads of containers' memory (supervisor/memory.py, ReadPool.stats): how
            # many threads a container's slow memory holds now, and since the start.
            "memory_reads": memory.current_read_pool().stats(),
            "uptime_seconds": round(time.time() - self.started_at, 3),
            "notify_socket": self.notify_socket,
            "socket_activated": self.socket_activated,
            # Where the sessions are kept for a crash (None: systemd's fd store, if any).
            "fd_keeper": None if self.fd_keeper is None else {
                "path": self.fd_keeper, "attached": self._keeper is not None},
            "control_socket": self.state.config.listen.control_socket,
            "metrics": (f"http://{self.metrics_address[0]}:{self.metrics_address[1]}/metrics"
                        if self.metrics_address else ""),
            "config": self.state.config.file,
            "policies": list(self.state.policies),
            "audit": self.recorder.audit,
            "inflight": sum(s.inflight for s in self.sessions),
            "notifications": self.ended_notifications
            + sum(s.stats.notifications for s in self.sessions),
            # The upper bounds of each session's latency_counts (seconds; one more count,
            # for +Inf).
            "latency_bounds": list(DECISION_BUCKETS),
            "sessions": sessions,
        }

    async def _status_command(self, request: ControlRequest) -> dict[str, Any]:
        return self.status()

    def _plan_fds(self, config: Config) -> Callable[[], None]:
        """Raise the soft fd limit to the hard one; return what logs what it is set aside
        for (see fdbudget.py), warning when too little is left for containers. Logged once
        the sockets are bound, so a daemon that cannot start says only why."""
        budget = fd_budget(raise_nofile_limit(), max_handoffs=config.listen.max_handoffs,
                           max_fds=ListenerLimits().max_fds,
                           control_connections=CONTROL_MAX_CONNECTIONS,
                           metrics_connections=(self.metrics_server.limits.max_connections
                                                if config.metrics.enabled else 0))

        def report() -> None:
            if budget.sessions < MIN_SESSION_FDS:
                log.warning("%s: too few; raise LimitNOFILE= (ulimit -n) or lower "
                            "[listen] max_handoffs", budget.describe())
            else:
                log.info("%s", budget.describe())

        return report

    def _bind_metrics(self, config: Config) -> trio.socket.SocketType | None:
        """The listening socket of ``[metrics] listen`` (None if disabled). Raises
        OSError."""
        if not config.metrics.enabled:
            return None
        try:
            sock = bind_tcp(config.metrics.host, config.metrics.port)
        except OSError as exc:  # name the address: "Address already in use" alone does not
            raise OSError(exc.errno, f"[metrics] listen {config.metrics.listen}: "
                                     f"{exc.strerror}") from None
        self.metrics_address = sock.getsockname()
        log.info("metrics on http://%s:%d/metrics", *self.metrics_address[:2])
        return sock

    async def _serve(self, sock: trio.socket.SocketType,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listen = self.state.config.listen
        limits = ListenerLimits(
            allowed_uids=frozenset(listen.allowed_uids), max_message=listen.max_message,
            timeout=listen.handoff_timeout, max_handoffs=listen.max_handoffs)
        # The gate lets a graceful stop or a handover stop accepting while the handoffs
        # being read are finished (serve_handoffs only ever calls accept() on it).
        self._gate = AcceptGate(sock)
        await serve_handoffs(cast(trio.socket.SocketType, self._gate), self.on_handoff,
                             limits=limits, metrics=self.metrics, task_status=task_status)

    async def on_handoff(self, handoff: Handoff) -> None:
        """Route a validated handoff and start its session, unless the session limits
        (``[listen] max_sessions``, ``max_sessions_per_uid``) are reached. Takes
        ownership of it."""
        try:
            notify = NotifyFd(handoff.take_fd())
        finally:
            handoff.close()
        container = handoff.container
        over = session_limit(self.sessions, container.peer_uid, self.state.config.listen)
        if over is not None:
            log.warning("container %r (pid %d) from uid %s: refused: %s", container.id,
                        container.pid, container.peer_uid, over)
            self.refused.labels("session_limit").inc()
            notify.close()
            return
        self.start_session(notify, container)

    def _settings(self, choice: RouteChoice, chain: Chain) -> SessionSettings:
        defaults = self.state.config.defaults
        return SessionSettings(
            unhandled=chain.session_unhandled(
                defaults.unhandled, configured_explicitly=defaults.unhandled_set),
            on_error=defaults.on_error,
            deadline=defaults.deadline, max_inflight=defaults.max_inflight,
            mode=choice.mode, rate=defaults.rate, rate_burst=defaults.burst,
            rate_exceeded=defaults.rate_exceeded)

    def start_session(self, notify: NotifyFd, container: Container, *,
                      stored_as: str | None = None,
                      source: str = "handoff", journal: Journal | None = None,
                      journal_fd: int = -1) -> Session | None:
        """Route ``container`` and serve ``notify`` (owned by the session from now on).
        ``stored_as``: the fd-store name it already has (restored after a restart);
        otherwise it is put into the fd store under a new name (under systemd), with a
        new in-flight journal. ``journal_fd``: the journal that came back from the fd
        store with it (closed here; the session answers what a crash left in it), or
        ``journal``: the one a session paused for a handover had.

        None (``notify`` closed, an fd-store entry removed, counted) when the same
        listener is served already: two readers of one filter would block the loop."""
        if journal_fd >= 0:
            try:
                journal = _map_journal(journal_fd, notify, container)
            finally:
                os.close(journal_fd)
        if self._already_served(notify, container, stored_as, source):
            if journal is not None:
                journal.close()
            return None
        state = self.state
        choice = route_for(container, state.config)
        chain = state.chain(choice.policies)
        traced = self._trace_route(container)
        if traced is not None:
            chain, choice = traced
        settings = self._settings(choice, chain)
        try:
            session = Session(notify, container, chain, settings, self.recorder)
        except BaseException:
            notify.close()
            if journal is not None:
                journal.close()
            raise
        if traced is not None:
            self._traced.add(session)
        if stored_as is None and self.fdstore.enabled:
            name = new_session_name()
            carried = False
            if journal is not None:
                # A journal that came with the listener (giveback.py: calls a crashed
                # daemon received): its entries are answered by this session, and from
                # a memfd of our own, stored with the listener.
                try:
                    new_fd = journal.move_to_new_memfd()
                    carried = True
                except (OSError, JournalError) as exc:
                    log.error("container %s: its in-flight journal cannot be stored "
                              "(%s)", container.id, exc)
                    new_fd = -1
            else:
                new_fd = _new_journal_fd(settings.max_inflight)
            try:
                if self.fdstore.store(name, notify.fileno(), container, chain.names,
                                      settings.mode, journal_fd=new_fd):
                    stored_as = name
                    if new_fd >= 0 and not carried:
                        journal = _map_journal(new_fd, notify, container)
            finally:
                if new_fd >= 0:
                    os.close(new_fd)
        elif stored_as is not None and journal is None and self.fdstore.enabled:
            # Stored by a version without journals: add one to its group.
            new_fd = _new_journal_fd(settings.max_inflight)
            if new_fd >= 0:
                try:
                    if self.notifier.store_fds(stored_as, [new_fd]):
                        journal = _map_journal(new_fd, notify, container)
                finally:
                    os.close(new_fd)
        if journal is not None:
            session.attach_journal(journal)
        if stored_as is not None:
            self._stored_names[session] = stored_as
        log.info("container %s (pid %d): session with policies [%s]%s%s",
                 container.id, container.pid, ", ".join(chain.names),
                 " in shadow mode" if settings.mode == "shadow" else "",
                 "" if source == "handoff" else f" ({source})")
        # Registered now, not when its task first runs: a stop or a handover that starts
        # before then must see it.
        self.sessions.add(session)
        self._ended[session] = trio.Event()
        assert self._nursery is not None
        self._nursery.start_soon(self._run_session, session)
        return session

    def _already_served(self, notify: NotifyFd, container: Container,
                        stored_as: str | None, source: str) -> bool:
        """Claim ``notify``'s listener; True (and ``notify`` closed) if another
        session serves it already."""
        try:
            other = self.served.claim(notify)
        except KcmpUnavailable as exc:
            if not self._kcmp_warned:
                self._kcmp_warned = True
                log.error("cannot tell whether a listener is served twice (%s); serving "
                          "without that check", exc)
            return False
        if other is None:
            return False
        owner = next((s.container.id for s in self.sessions if s.notify is other), None)
        if owner is None:
            owner = next((f"{name or 'a session'} (paused for a handover)"
                          for n, name, _j in self._handed.values() if n is other), "?")
        log.error("container %r (pid %d, %s): refused: its seccomp listener is already "
                  "served, by container %r; the same listener was handed over twice",
                  container.id, container.pid, source, owner)
        self.refused.labels("already_served").inc()
        notify.close()
        if stored_as is not None:
            self.fdstore.remove(stored_as)
        return True

    def _trace_route(self, container: Container) -> tuple[Chain, RouteChoice] | None:
        """Learn mode for a container annotated ``io.containers.trace-syscall`` (podman's
        OCI hook convention): its own recording policy writing to the annotation's output,
        merged into its base profile. None (normal routing, with an error logged) when it
        has no such annotation, the annotation is invalid, no policy named ``learn`` is
        configured (that is what enables the route), the output is not a plain file name
        directly in that policy's ``trace_directory``, or a base is named that is not one
        directly in its ``base_directory``. Pure checks: no file is touched here (the base
        is read when the profile is written, off the event loop)."""
        try:
            request = trace_request(container)
            if request is None:
                return None
            check_trace_permitted(container, self.state.config.trace_annotation)
            learn = self.state.policies.get("learn")
            if learn is None:
                raise TraceAnnotationError(
                    "no policy named 'learn' is configured: the route is off")
            _directory, trace_directory, base_directory = learn_directories(learn.options)
            # A user other than root traces into its own subdirectory (owner_directory):
            # it chooses its ids and annotations freely, and must not reach root's files
            # or another user's. Bases come only from the operator's base_directory.
            policy = _trace_policy(container.id, request,
                                   owner_directory(trace_directory, container.peer_uid),
                                   base_directory, self._traces_written)
        except (TraceAnnotationError, FileRefused) as exc:
            log.error("container %s: annotation %s ignored, routed as usual: %s",
                      container.id, TRACE_ANNOTATION, exc)
            return None
        log.info("container %s: learn mode by annotation: writing %s%s", container.id,
                 request.output, f" (base {request.base})" if request.base else "")
        return Chain([("trace-syscall", policy)]), RouteChoice(("trace-syscall",), "enforce",
                                                               None)

    async def _run_session(self, session: Session) -> None:
        self.sessions.add(session)
        self.metrics.sessions.inc()
        self.notifier.status(self._status_text())
        # Whether the fd store's copy of the listener goes: yes unless the session was
        # stopped to be served again (a stop that keeps the store, a handover).
        forget_stored = False
        try:
            await session.run()
            forget_stored = not session.reading_stopped
        except Exception:
            # A bug in a session must not take the other containers down with it. Nothing
            # serves its listener again: a copy left in the store would hold the
            # container's later calls unanswered until a restart; without it they get
            # ENOSYS from the kernel once the last copy closes (fail closed, at once).
            forget_stored = True
            log.exception("session of container %s failed: its listener is no longer "
                          "served (the kernel answers its calls ENOSYS once the last copy "
                          "closes)", session.container.id)
        finally:
            if session.read_elsewhere:
                self.refused.labels("read_elsewhere").inc()
            self.sessions.discard(session)
            self.metrics.sessions.dec()
            self.ended_notifications += session.stats.notifications
            self.notifier.status(self._status_text())
            name = self._stored_names.pop(session, None)
            if session.keep_fd:
                # Paused for a handover: the fd lives on in _handed until the commit.
                self._handed[session.notify.fileno()] = (session.notify, name,
                                                         session.journal)
            elif name is not None and forget_stored:
                self.fdstore.remove(name)
            ended = self._ended.pop(session, None)
            if ended is not None:
                ended.set()
            log.info("container %s: session %s (%d notifications)",
                     session.container.id,
                     "paused for a handover" if session.keep_fd else "ended",
                     session.stats.notifications)

    # -- graceful stop, restarts (issue 7) -----------------------------------------------

    async def _stop_intake(self) -> None:
        """Accept no more handoffs; wait until the ones being read have their session."""
        if self._gate is not None:
            self._gate.close()
            with trio.move_on_after(self.state.config.listen.handoff_timeout + 1):
                await self._gate.wait_idle()

    async def _stop_sessions(self, *, keep_fd: bool) -> list[Session]:
        """Stop reading on every session and wait until each has answered what it
        received (bounded by the deadline). Returns the sessions that ended."""
        sessions = list(self.sessions)
        for session in sessions:
            session.stop_reading(keep_fd=keep_fd)
        events = [self._ended[s] for s in sessions if s in self._ended]
        with trio.move_on_after(self.state.config.defaults.deadline + 2):
            for event in events:
                await event.wait()
        late = [s for s in sessions if s in self.sessions]
        if late:
            log.error("%d sessions did not finish their decisions in time",
                      len(late))
        return [s for s in sessions if s not in self.sessions]

    async def stop_gracefully(self) -> None:
        """SIGTERM: stop accepting, stop receiving, let every decision under way finish
        (bounded by the deadline), then end the daemon. Notify fds kept in systemd's fd
        store stay there for the next start; without it they are closed, and the
        containers' notified calls get ENOSYS from then on."""
        if self.stopping:
            return
        self.stopping = True
        await self._stop_intake()
        stopped = await self._stop_sessions(keep_fd=False)
        log.info("stopped: %d sessions finished their decisions%s", len(stopped),
                 "; their fds stay in systemd's fd store" if self.fdstore.enabled else "")
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def _restore_stored_sessions(self) -> None:
        """Serve again the sessions systemd kept in its fd store (see fdstore.py)."""
        groups, others = group_listen_fds(self.inherited_fds)
        self.inherited_fds = others
        for group in groups:
            restored = restore_group(group)
            if restored is None:
                self.fdstore.remove(group.name)
                continue
            if restored.error:
                log.error("fd store: session %s: %s; served as %s with its route",
                          group.name, restored.error, restored.container.id)
            if self.start_session(NotifyFd(restored.notify_fd), restored.container,
                                  stored_as=restored.name, source="from the fd store",
                                  journal_fd=restored.journal_fd):
                self.restored.labels("fdstore").inc()
        if groups:
            log.info("fd store: serving %d sessions again", len(groups))

    # -- the fd keeper (keeper.py) -------------------------------------------------------

    def _attach_keeper(self) -> Attached:
        """Attach to the keeper (waiting up to :data:`KEEPER_WAIT` s for one to answer:
        in a pod it starts, or restarts, beside us) and store every session there from
        now on. Raises KeeperError (a keeper that refuses, an unsafe path: at once)."""
        assert self.fd_keeper is not None
        deadline = time.monotonic() + KEEPER_WAIT
        while True:
            try:
                attached = attach(self.fd_keeper)
                break
            except KeeperUnavailable as exc:
                if time.monotonic() > deadline:
                    raise
                log.info("fd keeper: %s; waiting for it", exc)
                time.sleep(0.2)  # before serving anything: nothing else to run
        self._use_keeper(attached)
        log.info("fd keeper %s: attached (%d fds kept%s)", self.fd_keeper, len(attached.fds),
                 ", retired" if attached.retired else "")
        return attached

    def _use_keeper(self, attached: Attached) -> None:
        """Store sessions in ``attached`` from now on, at the path its attach checked."""
        assert self.fd_keeper is not None
        self._keeper = attached
        self.keeper_attached.labels(self.fd_keeper).set(1)
        self.fdstore = FdStore(systemd.Notifier(attached.path), env={},
                               holder="the fd keeper")

    def _detach_keeper(self) -> None:
        if self._keeper is not None:
            self._keeper.sock.close()
            self._keeper = None

    async def _idle_retired(self, attached: Attached,
                            task_status: trio.TaskStatus[None], *, gave: bool = False) -> None:
        """This keeper's daemon handed its sessions to a newer one (a rolling update):
        serve nothing, take nothing back; wait for SIGTERM (the pod is being deleted)."""
        _close_all_listen_fds(attached.fds)
        log.warning("fd keeper %s: the daemon of this pod handed its sessions over to a "
                    "%s one: not serving, not taking them back; waiting to be stopped",
                    self.fd_keeper, "live" if gave else "newer")
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for _signum in signals:
                break
        self._detach_keeper()

    async def _watch_keeper(self) -> None:
        """When the keeper dies, the sessions would not survive our crash: attach to the
        next keeper on the same path (a sidecar is restarted) and store them all again."""
        assert self.fd_keeper is not None
        while self._keeper is not None:
            try:
                await trio.lowlevel.wait_readable(self._keeper.sock)
                data = self._keeper.sock.recv(64)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if data:
                continue  # the keeper says nothing after END: ignore
            self._detach_keeper()
            self.keeper_attached.labels(self.fd_keeper).set(0)
            log.error("fd keeper %s is gone: the sessions would not survive a crash now; "
                      "attaching again when it is back", self.fd_keeper)
            delay = 0.2
            while self._keeper is None:
                await trio.sleep(delay)
                delay = min(delay * 2, 5.0)
                try:
                    # In a thread: a keeper that does not answer must not stall the loop.
                    attached = await trio.to_thread.run_sync(
                        functools.partial(attach, self.fd_keeper, timeout=2.0))
                except KeeperError as exc:
                    log.debug("fd keeper: %s", exc)
                    continue
                # A new keeper holds nothing of ours; anything it holds is not ours to
                # serve (this daemon serves its own sessions).
                _close_all_listen_fds(attached.fds)
                self._use_keeper(attached)
                stored = await self._store_all_sessions()
                log.info("fd keeper %s is back: %d of %d sessions stored again",
                         self.fd_keeper, stored, len(self.sessions))

    async def _store_all_sessions(self) -> int:
        stored = 0
        for i, session in enumerate(list(self.sessions)):
            if i % 16 == 15:
                # Each send may wait for room in the keeper's queue: let the sessions run.
                await trio.lowlevel.checkpoint()
            if session not in self.sessions:
                continue  # ended meanwhile
            name = self._stored_names.get(session) or new_session_name()
            # The journal's memfd went with the old store: the session writes to a copy
            # in a new one from now on, stored with its listener.
            journal_fd = -1
            if session.journal is not None:
                try:
                    journal_fd = session.journal.move_to_new_memfd()
                except (OSError, JournalError) as exc:
                    log.error("container %s: its in-flight journal cannot be stored "
                              "again (%s): calls a crash left unanswered would stay "
                              "blocked", session.container.id, exc)
            try:
                if self.fdstore.store(name, session.notify.fileno(), session.container,
                                      session.chain.names, session.settings.mode,
                                      journal_fd=journal_fd):
                    self._stored_names[session] = name
                    stored += 1
            finally:
                if journal_fd >= 0:
                    os.close(journal_fd)
        return stored

    async def _request_takeover(self, path: str) -> Any:
        """Take everything from the daemon at ``path`` (None if none listens there)."""
        try:
            taken = await take_over(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            log.info("takeover: no daemon on %s (%s): starting afresh", path, exc.strerror)
            return None
        except OSError as exc:
            raise TakeoverError(f"cannot reach {path}: {exc}") from None
        log.info("takeover: %d sessions%s from pid %d", len(taken.sessions),
                 " and the notify socket" if taken.listen_fd >= 0 else "", taken.old_pid)
        return taken

    def _adopt_taken(self, taken: Any) -> int:
        """Serve the sessions taken over; returns how many (a listener served already,
        or an fd that is none, is closed)."""
        adopted = 0
        for fd, container in taken.sessions:
            journal_fd = taken.journals.pop(fd, -1)
            if journal_fd >= 0 and not is_journal_fd(journal_fd):
                log.error("takeover: the journal sent for container %s is none: calls a "
                          "crash left unanswered stay blocked", container.id)
                os.close(journal_fd)
                journal_fd = -1
            if not is_seccomp_listener(fd):
                log.error("takeover: fd for container %s is not a seccomp listener",
                          container.id)
                os.close(fd)
                if journal_fd >= 0:
                    os.close(journal_fd)
                continue
            session = self.start_session(NotifyFd(fd), container, source="taken over",
                                         journal_fd=journal_fd)
            if session is not None:
                adopted += 1
                self.restored.labels("takeover").inc()
                old_name = taken.stored_names.get(fd)
                if (old_name is not None and old_name.startswith(SESSION_PREFIX)
                        and self._stored_names.get(session) not in (None, old_name)):
                    # Stored under our own name now: the old daemon's entry goes, so
                    # the listener is in the store once, with our journal.
                    try:
                        self.fdstore.remove(old_name)
                    except ValueError:  # not a valid FDNAME: nothing stored under it
                        pass
        for fd, reason in taken.invalid:
            log.error("takeover: bad state for fd %d (%s): served under a placeholder id",
                      fd, reason)
        taken.sessions = []
        return adopted

    async def _give_kept_to_live_daemon(self, kept: list[systemd.ListenFd]) -> bool:
        """Another daemon answers on the control socket (a rolling update whose takeover
        this daemon's last run did not finish telling its keeper, or a new pod that
        started afresh while this one crash-looped): give it the sessions the keeper
        holds (giveback.py) instead of serving them beside it. True once it adopted
        them and the keeper was told ``HANDEDOVER=1``; False if no daemon answers.
        Raises KeeperError while one answers but does not adopt: serving beside it
        would break containers, so this process exits 1 and is restarted (the keeper
        keeps every listener meanwhile; their calls wait in the kernel)."""
        path = self.state.config.listen.control_socket
        if not in_use(path):
            return False
        # Copies: the keeper's fds stay as they are if the live daemon does not adopt.
        groups, others = group_listen_fds(
            systemd.ListenFd(os.dup(item.fd), item.name) for item in kept)
        _close_all_listen_fds(others)
        handed: list[HandedSession] = []
        fds: list[int] = []
        try:
            for group in groups:
                restored = restore_group(group)
                if restored is None:
                    continue
                fds.append(restored.notify_fd)
                if restored.journal_fd >= 0:
                    fds.append(restored.journal_fd)
                handed.append(HandedSession(restored.notify_fd, restored.container, (),
                                            "enforce", stored_as=restored.name,
                                            journal_fd=restored.journal_fd))
            if not handed:
                return False
            log.warning("another daemon answers on %s: giving it the %d sessions the fd "
                        "keeper holds instead of serving them beside it", path, len(handed))
            try:
                reply = await give_sessions(path, handed)
            except GiveError as exc:
                raise KeeperError(f"the live daemon did not adopt the kept sessions: "
                                  f"{exc}") from None
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        log.warning("the live daemon adopted %s and served %s already of %d sessions",
                    reply.get("adopted"), reply.get("already_served"), len(handed))
        if not self.fdstore.notifier.send({"HANDEDOVER": 1}):
            raise KeeperError("could not tell the fd keeper HANDEDOVER=1 after the live "
                              "daemon adopted its sessions")
        return True

    async def _adopt_command(self, req: ControlRequest) -> dict[str, Any]:
        """``adopt``: take the sessions a restarted daemon offers on the temporary control
        socket its token names (giveback.py). Listeners served already are closed."""
        if req.peer.uid != 0:
            raise ControlError(f"uid {req.peer.uid} may not give sessions")
        token = req.args.get("token")
        if not valid_token(token):
            raise ControlError("adopt needs a token of 12 hex digits")
        assert isinstance(token, str)
        if self._adopting.locked():
            raise ControlError("another adopt is under way")
        async with self._adopting:
            if self.stopping or self._nursery is None or (
                    self._gate is not None and not self._gate.is_open):
                raise ControlError("stopping or handing over: not adopting")
            path = give_path(self.state.config.listen.control_socket, token)
            log.info("adopt: taking the sessions of pid %d from %s", req.peer.pid, path)
            try:
                taken = await take_over(path, limit=ADOPT_TIMEOUT, peer_uid=0)
            except (TakeoverError, OSError) as exc:
                raise ControlError(f"adopt: {exc}") from None
            if taken.listen_fd >= 0:
                os.close(taken.listen_fd)
                taken.listen_fd = -1
            offered = len(taken.sessions)
            adopted = self._adopt_taken(taken)
            log.info("adopt: %d of %d sessions adopted, the others served already", adopted,
                     offered)
            return {"adopted": adopted, "already_served": offered - adopted,
                    "offered": offered}

    def register_handover(self, nursery: trio.Nursery) -> Handover:
        """Offer the ``takeover*`` control commands (see takeover.py), and ``adopt``."""
        handover = Handover(self, nursery)
        handover.register(self.control.register)
        self.control.register("adopt", self._adopt_command)
        return handover

    async def pause_for_handover(self) -> tuple[int, list[HandedSession]]:
        # An adopt under way finishes first: its sessions are handed over too.
        async with self._adopting:
            await self._stop_intake()
        stopped = await self._stop_sessions(keep_fd=True)
        handed: list[HandedSession] = []
        for session in stopped:
            entry = self._handed.get(session.notify.fileno())
            if entry is None or entry[0].closed:
                continue
            notify, name, journal = entry
            if journal is not None and journal.pinned:
                # Cannot happen: run() returned, so every decision that waited was
                # answered (and inline ones always are). Said loudly, since the new
                # daemon starts a fresh journal.
                log.error("container %s: %d decisions still pinned in its in-flight "
                          "journal at the handover", session.container.id, journal.pinned)
            handed.append(HandedSession(notify.fileno(), session.container,
                                        session.chain.names, session.settings.mode,
                                        stored_as=name))
        listen_fd = self._gate.fileno() if self._gate is not None else -1
        return listen_fd, handed

    def resume_after_handover(self, sessions: list[HandedSession]) -> None:
        for item in sessions:
            entry = self._handed.pop(item.notify_fd, None)
            if entry is None:
                continue
            notify, name, journal = entry
            self.start_session(notify, item.container, stored_as=name, source="resumed",
                               journal=journal)
        if self._gate is not None and not self.stopping:
            self._gate.reopen()

    def finish_handover(self) -> None:
        self.stopping = True
        # The new daemon holds (and stores) every session now: this keeper must not
        # keep copies, nor give them to a daemon restarted beside it (keeper.py).
        if self.fd_keeper is not None and (
                self._keeper is None or not self.fdstore.notifier.send({"HANDEDOVER": 1})):
            log.error("fd keeper: could not tell it about the handover: a daemon "
                      "restarted in this pod would serve these sessions again")
        self._keep_socket_file = True  # the new daemon listens on it now
        self._close_handed()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def _close_handed(self) -> None:
        for notify, _name, journal in self._handed.values():
            if journal is not None:
                journal.close()
            notify.close()
        self._handed.clear()

    def _unlink_socket_file(self, path: str) -> None:
        if not self._keep_socket_file:
            _unlink_quietly(path)

    def reload(self) -> bool:
        """Re-read config and policies; keep the old ones if the new ones are broken.

        Atomic: the new config and every policy are loaded first; only then, in one step
        of the event loop, the new state replaces the old and every running session is
        routed again with it (new chain and settings from its next notification on;
        decisions under way finish with the chain they started with)."""
        if self.loader is None:
            log.warning("SIGHUP: no config file to reload")
            return False
        try:
            config, policies = self.loader()
            new_state = DaemonState(config, policies)
            routes = []
            for session in self.sessions:
                if session in self._traced:  # learn mode by annotation: keep recording
                    routes.append((session, session.chain,
                                   RouteChoice(session.chain.names, "enforce", None)))
                    continue
                choice = route_for(session.container, config)
                routes.append((session, new_state.chain(choice.policies), choice))
        except Exception as exc:
            self.reloads_failed += 1
            self.reloads.labels("failed").inc()
            log.error("reload refused, keeping the running config: %s", exc,
                      exc_info=not isinstance(exc, ConfigError))
            return False
        old = self.state.config
        if (config.listen != old.listen) or (config.metrics != old.metrics):
            log.warning("reload: [listen] and [metrics] changes take effect on restart")
        self.state = new_state
        self.recorder.audit = config.audit.decisions
        self.recorder.rate_limit = config.audit.rate_limit
        self.recorder.container_bytes = config.audit.container_bytes
        self.recorder.max_line = config.audit.max_line
        for session, chain, choice in routes:
            before = session.chain.names
            session.rebind(chain, self._settings(choice, chain))
            if chain.names != before:
                log.info("container %s: policies [%s] -> [%s]", session.container.id,
                         ", ".join(before), ", ".join(chain.names))
        self.reloads.labels("ok").inc()
        log.info("reloaded %s: policies %s; %d running sessions routed again", config.file,
                 ", ".join(policies) or "(none)", len(routes))
        return True


def _trace_policy(container_id: str, request: TraceRequest, trace_directory: str,
                  base_directory: str, written: set[tuple[str, str, str]]) -> PolicySet:
    """A recording policy for one traced container session: every notified call it can
    name is counted and answered CONTINUE; when the session ends the profile (the calls
    seen, the launcher's handoff calls and runc's Go runtime's: see
    :func:`~supervisor.learn.learned_names`; merged into ``request.base``) is written
    atomically to ``request.output``, in a worker thread (:mod:`supervisor.safefile`).

    The daemon runs as root and the annotation comes from whoever creates the container
    (a Kubernetes pod annotation reaches it through CRI-O), so:

    * the output must be a plain file name directly in ``trace_directory``, the base one
      directly in ``base_directory`` (no base may be named when that is ""); both are
      opened relative to their directory, never through a symlink; the base must be a
      regular file of at most 1 MiB;
    * the output is created exclusively (``link``, which fails if the name exists): a
      file this daemon did not write for ``container_id`` is never merged into or
      replaced. ``written`` remembers ``(trace_directory, name, container id)`` of the
      files it did write (in memory: after a restart an existing file is refused), so a
      later session of the same container (``runc exec``) merges into its own file.

    Raises TraceAnnotationError or FileRefused (pure checks, no I/O)."""
    from .learn import (
        HANDOFF_SYSCALLS,
        UNRECORDABLE,
        Recording,
        check_base,
        known_syscalls,
        learned_names,
        merge_profile,
        read_profile_in,
    )
    from .logfmt import escape
    from .policy import Decision, Notification, allow
    from .profile import dump_profile
    from .safefile import name_in, submit, write_file

    output_name = name_in(trace_directory, request.output, "output")
    base_name = None
    if request.base is not None:
        if not base_directory:
            raise TraceAnnotationError(
                "an input profile ('if:') is refused: the learn policy has no "
                "base_directory")
        base_name = name_in(base_directory, request.base, "input profile")
    output = os.path.join(trace_directory, output_name)
    recording = Recording()
    policy = PolicySet("trace-syscall", description=f"learn mode into {output}")
    answer = allow(reason="trace-syscall annotation")

    @policy.on(*sorted(known_syscalls() - set(UNRECORDABLE)))
    def observe(n: Notification) -> Decision:
        recording.add(n.arch, n.syscall)
        return answer

    @policy.on_session_end
    def write(container: Container) -> None:
        names = learned_names(recording.names(), HANDOFF_SYSCALLS)
        architectures = recording.architectures()
        total, seen = recording.total, len(recording.names())
        owner = (trace_directory, output_name, container_id)

        def job() -> None:  # in a worker thread, one at a time per output file
            try:
                base = None
                if base_name is not None:
                    base = read_profile_in(base_directory, base_name)
                    check_base(base)
                merged_into = base
                owned = owner in written
                if owned:
                    try:
                        merged_into = read_profile_in(trace_directory, output_name)
                    except FileNotFoundError:
                        owned = False  # removed since: create it again
                    except (FileRefused, ProfileError, OSError) as exc:
                        log.warning("container %s: %s is no longer a readable profile, "
                                    "replacing it: %s", container_id, output,
                                    escape(str(exc), 300))
                profile = merge_profile(merged_into, names, architectures)
                write_file(trace_directory, output_name, dump_profile(profile).encode(),
                           exclusive=not owned)
            except FileExistsError:
                log.error("container %s: %s not written: the file exists and this daemon "
                          "did not write it for this container (remove it to trace into "
                          "it again)", container_id, output)
                return
            except (FileRefused, ProfileError, OSError) as exc:
                log.error("container %s: traced profile %s not written: %s", container_id,
                          output, escape(str(exc), 300))
                return
            written.add(owner)
            log.info("container %s: %d notifications of %d system calls; wrote %s",
                     container_id, total, seen, output)

        submit(f"container {container_id}: traced profile {output}", job,
               key=("trace", trace_directory, output_name))

    return policy


def _new_journal_fd(max_inflight: int) -> int:
    """A new in-flight journal memfd for a session, or -1 (logged) if none can be made:
    the session is served anyway, without crash recovery."""
    try:
        return create_journal_fd(slots_for(max_inflight))
    except OSError as exc:
        log.warning("cannot create an in-flight journal (%s): a crash would leave the "
                    "calls this container's session received unanswered", exc)
        return -1


def _map_journal(fd: int, notify: NotifyFd, container: Container) -> Journal | None:
    """Map journal ``fd`` for ``notify``'s session (the caller still closes ``fd``: the
    mapping keeps the memfd, the fd store has its own copy). None (logged) if it is no
    journal."""
    try:
        return Journal(fd, notify.recv_buffer)
    except (OSError, ValueError) as exc:
        log.error("container %s: its in-flight journal cannot be used (%s): calls a "
                  "crash left unanswered stay blocked", container.id, exc)
        return None


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


async def _wait_for_exit(pid: int) -> None:
    """Wait until process ``pid`` has exited (bound it with a cancel scope)."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        await trio.lowlevel.wait_readable(pidfd)
    finally:
        trio.lowlevel.notify_closing(pidfd)
        os.close(pidfd)


def _close_all_listen_fds(fds: Iterable[systemd.ListenFd]) -> None:
    for item in fds:
        with contextlib.suppress(OSError):
            os.close(item.fd)


def _sock_name(sock: Any) -> str:
    try:
        return str(sock.getsockname())
    except OSError:
        return "?"


def session_limit(sessions: Iterable[Session], peer_uid: int | None,
                  listen: ListenConfig) -> str | None:
    """Why a new session for a listener handed over by ``peer_uid`` would exceed the
    limits of ``listen``, or None. Pure."""
    total = 0
    same_uid = 0
    for session in sessions:
        total += 1
        if session.container.peer_uid == peer_uid:
            same_uid += 1
    if total >= listen.max_sessions:
        return f"{total} containers are served ([listen] max_sessions = {listen.max_sessions})"
    if peer_uid not in (0, None) and same_uid >= listen.max_sessions_per_uid:
        return (f"uid {peer_uid} has {same_uid} containers served ([listen] "
                f"max_sessions_per_uid = {listen.max_sessions_per_uid})")
    return None
