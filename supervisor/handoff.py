"""The runtime protocol: what runc or crun send on the notify socket (DESIGN.md §5).

The runtime connects and sends a JSON ``ContainerProcessState`` with the seccomp listener
(and possibly other fds) in ``SCM_RIGHTS``; fds match the names in ``"fds"`` by index.

Everything here but :func:`accept_handoff` is pure: bytes, ints and dataclasses. The
listener (:mod:`supervisor.listener`) does the socket I/O, feeds the bytes it reads to a
:class:`MessageAssembler`, and passes the finished message with the fds it received to
:func:`accept_handoff`, which owns them from then on.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from .errors import HandoffError
from .jsontypes import DuplicateKeyError, json_type, unique_keys
from .notifyfd import is_seccomp_listener
from .policy import Container
from .router import container_name, parse_labels, pod_name, pod_namespace

__all__ = [
    "SECCOMP_FD_NAME",
    "BadFdError",
    "Handoff",
    "MessageAssembler",
    "PeerCredentials",
    "ProcessState",
    "accept_handoff",
    "build_state_message",
    "parse_state",
]

SECCOMP_FD_NAME: Final = "seccompFd"
# pid_t is a signed 32-bit int.
_MAX_PID: Final = 2**31 - 1


class BadFdError(HandoffError):
    """The fd the message names ``seccompFd`` is not a seccomp listener."""


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """The connecting process, from ``SO_PEERCRED`` (as it was at ``connect()``)."""

    pid: int
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class ProcessState:
    """A validated ``ContainerProcessState``.

    ``pid`` is the process the runtime names (top-level ``pid``), ``state_pid`` the
    container's ``state.pid`` (0 when omitted), ``oci_version`` the top-level
    ``ociVersion``. ``seccomp_index`` is the index of ``"seccompFd"`` in ``fds``, which is
    also the index of the listener among the received fds.
    """

    oci_version: str
    fds: tuple[str, ...]
    pid: int
    metadata: str
    container_id: str
    status: str
    state_pid: int
    bundle: str
    annotations: Mapping[str, str]
    seccomp_index: int

    def to_container(self, peer_uid: int | None = None) -> Container:
        """The :class:`~supervisor.policy.Container` policies see for this process,
        handed over by a process of uid ``peer_uid``."""
        return Container(
            id=self.container_id,
            pid=self.pid,
            metadata=self.metadata,
            labels=MappingProxyType(parse_labels(self.metadata)),
            annotations=self.annotations,
            bundle=self.bundle,
            status=self.status,
            runtime_version=self.oci_version,
            peer_uid=peer_uid,
            name=container_name(self.annotations),
            pod_namespace=pod_namespace(self.annotations),
            pod_name=pod_name(self.annotations),
        )


# --------------------------------------------------------------------------- parsing


def parse_state(data: bytes, fd_count: int) -> ProcessState:
    """Parse and validate the message of a runtime that sent ``fd_count`` fds with it.

    Types are checked strictly: strings are strings, pids are non-negative ints (not
    bools, not floats), annotations map strings to strings. Keys this module does not
    know are ignored. ``fds`` must have ``fd_count`` names with ``"seccompFd"`` exactly
    once.

    Raises :class:`~supervisor.errors.HandoffError`, with the reason, for anything else:
    the only exception this function raises for any ``data``.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HandoffError(f"message is not UTF-8 (bad byte at offset {exc.start})") from None
    try:
        top = json.loads(text, object_pairs_hook=unique_keys, parse_constant=_no_constant)
    except RecursionError:
        raise HandoffError("message is nested too deeply") from None
    except DuplicateKeyError as exc:
        raise HandoffError(str(exc)) from None
    except ValueError as exc:  # JSONDecodeError, and int() refusing a huge number
        raise HandoffError(f"message is not JSON: {_first_line(exc)}") from None
    if not isinstance(top, dict):
        raise HandoffError(f"message is {json_type(top)}, not a JSON object")

    oci_version = _string(top, "ociVersion", "ociVersion")
    fds = _fd_names(top)
    if len(fds) != fd_count:
        raise HandoffError(
            f"fds names {len(fds)} fd(s) but {fd_count} arrived with the message")
    pid = _pid(top, "pid", "pid", required=True)
    metadata = _string(top, "metadata", "metadata", required=False, allow_empty=True)

    state = top.get("state", _MISSING)
    if state is _MISSING:
        raise HandoffError("state: missing")
    if not isinstance(state, dict):
        raise HandoffError(f"state: expected an object, got {json_type(state)}")
    _string(state, "ociVersion", "state.ociVersion")
    container_id = _string(state, "id", "state.id")
    status = _string(state, "status", "state.status")
    state_pid = _pid(state, "pid", "state.pid", required=False)
    bundle = _string(state, "bundle", "state.bundle", allow_empty=True)
    annotations = _annotations(state)

    return ProcessState(
        oci_version=oci_version,
        fds=fds,
        pid=pid,
        metadata=metadata,
        container_id=container_id,
        status=status,
        state_pid=state_pid,
        bundle=bundle,
        annotations=annotations,
        seccomp_index=fds.index(SECCOMP_FD_NAME),
    )


_MISSING: Final[Any] = object()


def _no_constant(name: str) -> Any:
    raise HandoffError(f"{name} is not valid JSON")


def _string(obj: dict[str, Any], key: str, where: str, *, required: bool = True,
            allow_empty: bool = False) -> str:
    value = obj.get(key, _MISSING)
    if value is _MISSING:
        if required:
            raise HandoffError(f"{where}: missing")
        return ""
    if not isinstance(value, str):
        raise HandoffError(f"{where}: expected a string, got {json_type(value)}")
    if not value and not allow_empty:
        raise HandoffError(f"{where}: empty string")
    return value


def _pid(obj: dict[str, Any], key: str, where: str, *, required: bool) -> int:
    value = obj.get(key, _MISSING)
    if value is _MISSING:
        if required:
            raise HandoffError(f"{where}: missing")
        return 0
    if type(value) is not int:
        raise HandoffError(f"{where}: expected an integer, got {json_type(value)}")
    if not 0 <= value <= _MAX_PID:
        raise HandoffError(f"{where}: {value} is not a pid")
    return value


def _fd_names(top: dict[str, Any]) -> tuple[str, ...]:
    names = top.get("fds", _MISSING)
    if names is _MISSING:
        raise HandoffError("fds: missing")
    if not isinstance(names, list):
        raise HandoffError(f"fds: expected an array, got {json_type(names)}")
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise HandoffError(f"fds[{i}]: expected a string, got {json_type(name)}")
    count = names.count(SECCOMP_FD_NAME)
    if count != 1:
        raise HandoffError(f"fds: {SECCOMP_FD_NAME!r} must appear exactly once, not {count} "
                           "times")
    return tuple(names)


def _annotations(state: dict[str, Any]) -> Mapping[str, str]:
    value = state.get("annotations", _MISSING)
    if value is _MISSING:
        return MappingProxyType({})
    if not isinstance(value, dict):
        raise HandoffError(f"state.annotations: expected an object, got {json_type(value)}")
    for key, item in value.items():
        if not isinstance(item, str):
            raise HandoffError(
                f"state.annotations[{_short(key)}]: expected a string, got {json_type(item)}")
    return MappingProxyType(dict(value))


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _first_line(exc: BaseException) -> str:
    return str(exc).split("\n", 1)[0][:200]


# --------------------------------------------------------------------------- framing

_BLANK: Final = re.compile(rb"[^ \t\r\n]")
_OUTSIDE_STRING: Final = re.compile(rb'[{}"]')
_INSIDE_STRING: Final = re.compile(rb'["\\]')


class MessageAssembler:
    """Collects a message chunk by chunk and tells when it is complete.

    runc 1.1 sends its message in one sendmsg and then keeps the connection open for the
    container's lifetime (verified with runc 1.1.5: EOF comes when the container exits),
    so a listener cannot wait for EOF. A message is complete once a top-level JSON object
    is closed (its braces balance, braces inside strings not counted), or at once if it
    does not start with ``{`` (it can only be rejected). Scanning is incremental: every
    byte is looked at once. Whether the bytes really are valid JSON is for
    :func:`parse_state` to say.
    """

    __slots__ = ("_buf", "_complete", "_depth", "_escape", "_in_string", "_scanned",
                 "_started")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._scanned = 0
        self._started = False
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._complete = False

    def __len__(self) -> int:
        return len(self._buf)

    @property
    def complete(self) -> bool:
        return self._complete

    @property
    def data(self) -> bytes:
        return bytes(self._buf)

    def feed(self, chunk: bytes) -> bool:
        """Append ``chunk``; returns :attr:`complete`."""
        self._buf += chunk
        if not self._complete:
            self._scan()
        return self._complete

    def _scan(self) -> None:
        buf = self._buf
        end = len(buf)
        pos = self._scanned
        if not self._started:
            match = _BLANK.search(buf, pos)
            if match is None:
                self._scanned = end
                return
            pos = match.start()
            if buf[pos] != ord("{"):
                self._complete = True
                return
            self._started = True
        while pos < end:
            if self._escape:
                self._escape = False
                pos += 1
            elif self._in_string:
                match = _INSIDE_STRING.search(buf, pos)
                if match is None:
                    pos = end
                    break
                pos = match.end()
                if buf[match.start()] == ord("\\"):
                    self._escape = True
                else:
                    self._in_string = False
            else:
                match = _OUTSIDE_STRING.search(buf, pos)
                if match is None:
                    pos = end
                    break
                pos = match.end()
                char = buf[match.start()]
                if char == ord('"'):
                    self._in_string = True
                elif char == ord("{"):
                    self._depth += 1
                else:
                    self._depth -= 1
                    if self._depth == 0:
                        self._complete = True
                        break
        self._scanned = pos


# --------------------------------------------------------------------------- building


def build_state_message(
    *,
    pid: int,
    container_id: str,
    metadata: str = "",
    bundle: str,
    status: str = "creating",
    oci_version: str = "1.0.2",
    annotations: Mapping[str, str] | None = None,
) -> bytes:
    """The message runc 1.1 sends for one seccomp listener, byte for byte as Go's
    ``json.Marshal`` writes it: fields in struct order, ``metadata``, ``state.pid`` and
    ``state.annotations`` left out when empty, annotation keys sorted, ``<``, ``>``,
    ``&``, U+2028 and U+2029 escaped, invalid UTF-8 (lone surrogates, as
    ``surrogateescape`` makes them from ``argv``) replaced by U+FFFD.

    (runc 1.1.5 sends ``"1.0.2-dev"`` as its ``ociVersion``; pass ``oci_version`` to
    match it.)
    """
    state: dict[str, Any] = {
        "ociVersion": _go_string(oci_version),
        "id": _go_string(container_id),
        "status": _go_string(status),
    }
    if pid:
        state["pid"] = pid
    state["bundle"] = _go_string(bundle)
    if annotations:
        state["annotations"] = {_go_string(k): _go_string(v)
                                for k, v in sorted(annotations.items())}
    message: dict[str, Any] = {
        "ociVersion": _go_string(oci_version),
        "fds": [SECCOMP_FD_NAME],
        "pid": pid,
    }
    if metadata:
        message["metadata"] = _go_string(metadata)
    message["state"] = state
    text = json.dumps(message, ensure_ascii=False, separators=(",", ":"))
    # These characters only occur inside strings, where Go writes them escaped.
    for char, escaped in _GO_ESCAPES:
        text = text.replace(char, escaped)
    return text.encode("utf-8")


_GO_ESCAPES: Final = (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                      ("\u2028", "\\u2028"), ("\u2029", "\\u2029"))
_SURROGATE: Final = re.compile("[\ud800-\udfff]")


def _go_string(text: str) -> str:
    return _SURROGATE.sub("\ufffd", text)


# --------------------------------------------------------------------------- taking fds


class Handoff:
    """An accepted handoff: the parsed state, the container built from it, who sent it,
    and the seccomp listener fd, which this object owns until :meth:`take_fd`."""

    __slots__ = ("container", "notify_fd", "peer", "state")

    def __init__(self, state: ProcessState, container: Container, peer: PeerCredentials,
                 notify_fd: int) -> None:
        self.state = state
        self.container = container
        self.peer = peer
        self.notify_fd = notify_fd

    def __repr__(self) -> str:
        return (f"<Handoff container={self.container.id!r} pid={self.state.pid} "
                f"fd={self.notify_fd}>")

    def __enter__(self) -> Handoff:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def take_fd(self) -> int:
        """Transfer the listener fd to the caller, who closes it from now on.

        Raises ValueError if it was already taken or closed.
        """
        if self.notify_fd < 0:
            raise ValueError("the listener fd of this handoff was already taken or closed")
        fd, self.notify_fd = self.notify_fd, -1
        return fd

    def close(self) -> None:
        """Close the listener fd if this object still owns it. Idempotent."""
        if self.notify_fd >= 0:
            fd, self.notify_fd = self.notify_fd, -1
            os.close(fd)


def accept_handoff(data: bytes, fds: Sequence[int], peer: PeerCredentials) -> Handoff:
    """Validate a runtime's message and the fds that came with it (in order).

    Takes ownership of every fd in ``fds``: whatever happens (success, rejection, any
    exception) each fd is closed except the seccomp listener of a returned
    :class:`Handoff`, which then owns it.

    Raises :class:`~supervisor.errors.HandoffError` if the message is invalid, and its
    subclass :class:`BadFdError` if the fd named ``seccompFd`` is not a seccomp listener.
    """
    keep = -1
    try:
        state = parse_state(data, len(fds))
        candidate = fds[state.seccomp_index]
        if not is_seccomp_listener(candidate):
            raise BadFdError(f"fd {SECCOMP_FD_NAME!r} is {_fd_kind(candidate)}, not a seccomp "
                             "listener")
        handoff = Handoff(state, state.to_container(peer.uid), peer, candidate)
        keep = candidate
        return handoff
    finally:
        for fd in set(fds):
            if fd != keep:
                with contextlib.suppress(OSError):
                    os.close(fd)


def _fd_kind(fd: int) -> str:
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "not an open fd"
    # "pipe:[123]", "socket:[456]", "/memfd:x (deleted)", "anon_inode:[eventfd]": the
    # inode number says nothing useful, the kind does.
    return repr(target.split(":[", 1)[0][:80])
