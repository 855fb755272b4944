"""Sessions that outlive the process: the state that rebuilds one, and systemd's fd store.

A notify fd alone is not enough to serve a container again: the policies also see the
container's id, metadata, labels and annotations, and the route depends on them. So each
session that leaves the process carries a small JSON **session state** (see
:func:`session_state`), which both restart paths use:

* **systemd fd store.** ``FDNAME=`` is at most 255 characters of a restricted set, too
  small for annotations. So every session is stored as *three* fds under one name
  ``session-<12 hex>``: the notify fd, a sealed ``memfd`` holding its state and the
  session's in-flight journal (:mod:`supervisor.journal`, also a ``memfd``, written
  through a shared mapping; it tells the next process which calls a crash left
  unanswered). They are stored when the session **starts** (one ``FDSTORE=1`` datagram,
  so all or none),
  which also keeps containers alive across a crash, not only a clean restart, and
  removed (``FDSTOREREMOVE=1``) when the session ends because its container is gone.
  systemd itself drops a stored fd that reports ``POLLHUP`` (a filter without tasks).
  On start the daemon groups ``$LISTEN_FDNAMES`` by name (:func:`group_listen_fds`),
  reads each state and routes the container again with the current config.
* **takeover** (:mod:`supervisor.takeover`): the same state goes in the control reply
  that carries the notify fd.

Everything but :func:`write_state_memfd`, :func:`read_state_fd` and :class:`FdStore` is
pure.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from .journal import is_journal_fd
from .notifyfd import is_seccomp_listener
from .policy import Container
from .router import container_name, pod_name, pod_namespace
from .systemd import ListenFd, Notifier

__all__ = [
    "MAX_STATE",
    "SESSION_PREFIX",
    "FdStore",
    "RestoredSession",
    "container_from_state",
    "group_listen_fds",
    "new_session_name",
    "read_state_fd",
    "session_state",
    "write_state_memfd",
]

log = logging.getLogger("supervisor.fdstore")

STATE_VERSION: Final = 1
SESSION_PREFIX: Final = "session-"
#: A state larger than this is refused when read (a handoff message is at most 64 MiB;
#: the state is smaller than the message it came from).
MAX_STATE: Final = 64 * 1024 * 1024
_STR_FIELDS: Final = ("id", "metadata", "bundle", "status", "runtime_version")
_MAP_FIELDS: Final = ("labels", "annotations")


# --------------------------------------------------------------------------- pure parts


def session_state(container: Container, policies: Sequence[str] = (),
                  mode: str = "enforce") -> dict[str, Any]:
    """The JSON-ready state of a session: the container as policies see it, and the route
    it had (for the log: the receiver routes the container again with its own config)."""
    return {
        "version": STATE_VERSION,
        "container": {
            "id": container.id,
            "pid": container.pid,
            "metadata": container.metadata,
            "labels": dict(container.labels),
            "annotations": dict(container.annotations),
            "bundle": container.bundle,
            "status": container.status,
            "runtime_version": container.runtime_version,
            "peer_uid": container.peer_uid,
        },
        "route": {"policies": list(policies), "mode": mode},
    }


def encode_state(state: Mapping[str, Any]) -> bytes:
    return json.dumps(state, separators=(",", ":"), ensure_ascii=False).encode()


def container_from_state(state: object) -> Container:
    """The :class:`Container` of a :func:`session_state` dict. Raises ValueError for
    anything that is not one (wrong version, missing or mistyped field)."""
    if not isinstance(state, Mapping):
        raise ValueError("session state is not a JSON object")
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"session state version {state.get('version')!r} is not "
                         f"{STATE_VERSION}")
    raw = state.get("container")
    if not isinstance(raw, Mapping):
        raise ValueError("session state has no container object")
    values: dict[str, Any] = {}
    for name in _STR_FIELDS:
        value = raw.get(name, "")
        if not isinstance(value, str):
            raise ValueError(f"container.{name} is not a string")
        values[name] = value
    pid = raw.get("pid", 0)
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 <= pid < 2**31:
        raise ValueError("container.pid is not a pid")
    for name in _MAP_FIELDS:
        table = raw.get(name, {})
        if not isinstance(table, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in table.items()):
            raise ValueError(f"container.{name} is not an object of strings")
        values[name] = MappingProxyType(dict(table))
    if not values["id"]:
        raise ValueError("container.id is empty")
    # Absent in states written before peer_uid existed: unknown, matches no peer_uid route.
    peer_uid = raw.get("peer_uid")
    if peer_uid is not None and (isinstance(peer_uid, bool) or not isinstance(peer_uid, int)
                                 or not 0 <= peer_uid < 2**32 - 1):
        raise ValueError("container.peer_uid is not a uid")
    # Name, pod namespace and pod name are not stored: they are functions of the
    # annotations, recomputed by this version's rules.
    annotations = values["annotations"]
    return Container(pid=pid, peer_uid=peer_uid, name=container_name(annotations),
                     pod_namespace=pod_namespace(annotations), pod_name=pod_name(annotations),
                     **values)


def decode_state(data: bytes) -> Container:
    """:func:`container_from_state` of JSON bytes. Raises ValueError."""
    try:
        state = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"session state is not JSON: {exc}") from None
    return container_from_state(state)


def new_session_name() -> str:
    """A fresh ``FDNAME`` for one session: ``session-`` and 12 random hex digits."""
    return SESSION_PREFIX + secrets.token_hex(6)


@dataclass
class StoredGroup:
    """The fds systemd passed back under one session name (before they are checked)."""

    name: str
    fds: list[int] = field(default_factory=list)


def group_listen_fds(fds: Iterable[ListenFd]) -> tuple[list[StoredGroup], list[ListenFd]]:
    """Split the fds systemd passed into session groups (names ``session-...``, in first
    appearance order) and the rest (sockets of a socket unit, other stored fds)."""
    groups: dict[str, StoredGroup] = {}
    others: list[ListenFd] = []
    for item in fds:
        if item.name.startswith(SESSION_PREFIX):
            groups.setdefault(item.name, StoredGroup(item.name)).fds.append(item.fd)
        else:
            others.append(item)
    return list(groups.values()), others


# --------------------------------------------------------------------------- I/O


@dataclass
class RestoredSession:
    """A session to serve again: its name, notify fd (owned by whoever holds this) and
    container. ``error`` says why the state could not be read (the container then gets a
    placeholder id and the default route: a live filter is never dropped).
    ``journal_fd``: its in-flight journal (owned like ``notify_fd``), -1 if none was
    stored with it."""

    name: str
    notify_fd: int
    container: Container
    error: str = ""
    journal_fd: int = -1


def write_state_memfd(data: bytes) -> int:
    """A sealed, read-only memfd holding ``data``. The caller owns the fd."""
    fd = os.memfd_create("seccomp-supervisor-session", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                    | fcntl.F_SEAL_WRITE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_state_fd(fd: int) -> bytes:
    """The whole content of a state memfd (read from offset 0). Raises OSError, and
    ValueError if it is larger than :data:`MAX_STATE`."""
    size = os.fstat(fd).st_size
    if size > MAX_STATE:
        raise ValueError(f"session state of {size} bytes is too large")
    chunks = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def restore_group(group: StoredGroup) -> RestoredSession | None:
    """Check one group's fds: keep the seccomp listener, read the state from the other
    fd, close everything else. None (and every fd closed) if the group holds no
    listener. Never raises."""
    notify_fd = -1
    journal_fd = -1
    state_fds: list[int] = []
    for fd in group.fds:
        if notify_fd < 0 and is_seccomp_listener(fd):
            notify_fd = fd
        elif journal_fd < 0 and is_journal_fd(fd):
            journal_fd = fd
        else:
            state_fds.append(fd)
    if notify_fd < 0 and journal_fd >= 0:
        state_fds.append(journal_fd)  # closed below with the rest
        journal_fd = -1
    try:
        if notify_fd < 0:
            log.warning("fd store: %s holds no seccomp listener (%d fds); dropped",
                        group.name, len(group.fds))
            return None
        error = ""
        container: Container | None = None
        for fd in state_fds:
            try:
                container = decode_state(read_state_fd(fd))
                break
            except (OSError, ValueError) as exc:
                error = str(exc)
        if container is None:
            error = error or "no session state was stored with it"
            container = Container(id=f"unknown-{group.name}")
        return RestoredSession(group.name, notify_fd, container, error, journal_fd)
    finally:
        for fd in state_fds:
            with contextlib.suppress(OSError):
                os.close(fd)


class FdStore:
    """Keeps sessions in systemd's fd store (``FileDescriptorStoreMax=`` must leave room
    for three fds per container). Does nothing when ``notifier`` is disabled (not under
    systemd) or ``$FDSTORE`` (set by systemd >= 254) says the store is 0."""

    def __init__(self, notifier: Notifier, env: Mapping[str, str] | None = None,
                 holder: str = "systemd") -> None:
        environ = os.environ if env is None else env
        self.notifier = notifier
        self.holder = holder  # who keeps the fds, for the log: systemd or the fd keeper
        self.enabled = notifier.enabled and environ.get("FDSTORE", "").strip() != "0"
        self.stored = 0
        self.failed = 0

    def store(self, name: str, notify_fd: int, container: Container,
              policies: Sequence[str], mode: str, journal_fd: int = -1) -> bool:
        """Store ``notify_fd`` with its state (and ``journal_fd``, its in-flight journal,
        if >= 0) under ``name``. The caller keeps its fds.
        False (logged) when it could not be sent: the session is served anyway, but
        would not survive a restart."""
        if not self.enabled:
            return False
        try:
            state_fd = write_state_memfd(encode_state(session_state(container, policies,
                                                                    mode)))
        except OSError as exc:
            self.failed += 1
            log.warning("fd store: cannot write the state of container %s: %s",
                        container.id, exc)
            return False
        try:
            ok = self.notifier.store_fds(
                name, [notify_fd, state_fd] + ([journal_fd] if journal_fd >= 0 else []))
        finally:
            os.close(state_fd)
        if ok:
            self.stored += 1
        else:
            self.failed += 1
            err = self.notifier.last_error
            log.warning("fd store: %s did not take the fds of container %s (%s): it "
                        "will not survive a restart", self.holder, container.id,
                        os.strerror(err.errno) if err is not None and err.errno
                        else "send failed")
        return ok

    def remove(self, name: str) -> None:
        """Forget a session whose container is gone."""
        if self.enabled:
            self.notifier.remove_fds(name)
