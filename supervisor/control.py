"""The control socket: a small request/response protocol for operators and tools.

Transport: a unix ``SOCK_STREAM`` socket (``[listen] control_socket``, mode 0600, and the
peer's uid must be 0 or the daemon's own). Each request is one line of JSON, each reply
one line of JSON; a connection may carry several requests in turn and ends at EOF::

    → {"command": "status"}
    ← {"ok": true, "result": {...}}
    → {"command": "nope"}
    ← {"ok": false, "error": "unknown command 'nope' (known: status)"}

A reply may carry fds as ``SCM_RIGHTS`` in the same ``sendmsg`` as its line (for a
takeover by a new daemon); :func:`request` returns them to the caller, who owns them.

Adding a command (e.g. ``takeover`` for a restart)::

    async def takeover(req: ControlRequest) -> ControlReply:
        ...                                   # req.args: the request's other keys
        return ControlReply({"sessions": n}, fds=[...])   # fds stay owned by the handler

    server.register("takeover", takeover)     # before or while serve() runs

A handler returns a :class:`ControlReply` or a plain mapping (the ``result``), raises
:class:`ControlError` for an error reply the client should see, and anything else is
logged and answered ``{"ok": false, "error": "internal error"}``. The fds of a reply are
sent, not given away: the handler's owner still closes them (after the reply, if it
likes: :attr:`ControlReply.sent` is set once the line and fds are out).

Framing, parsing and the status table are pure functions; :class:`ControlServer` and
:func:`request` are the thin I/O around them.
"""

from __future__ import annotations

import array
import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import trio

from .handoff import PeerCredentials
from .listener import bind_socket

__all__ = [
    "MAX_LINE",
    "ControlError",
    "ControlReply",
    "ControlRequest",
    "ControlServer",
    "decode_reply",
    "encode_reply",
    "encode_request",
    "format_status",
    "parse_request",
    "printable",
    "request",
]

log = logging.getLogger("supervisor.control")

MAX_LINE: Final = 64 * 1024
MAX_REPLY_FDS: Final = 253  # SCM_MAX_FD
_IDLE_TIMEOUT: Final = 30.0
# Longest cell of the ``status`` table, in characters (after escaping).
_MAX_CELL: Final = 100
#: Control connections served at once (more wait in the listen backlog, holding no fd).
MAX_CONNECTIONS: Final = 16
_MAX_CONNECTIONS: Final = MAX_CONNECTIONS
_UCRED: Final = struct.Struct("iII")
_FD_SIZE: Final = array.array("i").itemsize


class ControlError(Exception):
    """A request the daemon refuses (the message goes to the client), or an error reply
    received by :func:`request`."""


@dataclass(frozen=True, slots=True)
class ControlRequest:
    """One parsed request: ``command``, the other keys of the object, and who asked."""

    command: str
    args: Mapping[str, Any]
    peer: PeerCredentials


@dataclass(slots=True)
class ControlReply:
    """A handler's answer: ``result`` (JSON-serialisable) and fds to send with it."""

    result: Mapping[str, Any]
    fds: Sequence[int] = ()
    sent: bool = field(default=False, compare=False)


Handler = Callable[[ControlRequest], Awaitable[ControlReply | Mapping[str, Any]]]


# --------------------------------------------------------------------------- pure parts


def encode_request(command: str, args: Mapping[str, Any] | None = None) -> bytes:
    """One request line. Raises ValueError if ``args`` has a ``command`` key."""
    body: dict[str, Any] = {"command": command}
    for key, value in (args or {}).items():
        if key == "command":
            raise ValueError("args must not contain 'command'")
        body[key] = value
    return json.dumps(body, separators=(",", ":")).encode() + b"\n"


def parse_request(line: bytes) -> tuple[str, dict[str, Any]]:
    """``(command, args)`` from one request line (without or with its newline).
    Raises ControlError with a message for the client."""
    try:
        body = json.loads(line)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ControlError(f"request is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ControlError("request must be a JSON object")
    command = body.pop("command", None)
    if not isinstance(command, str) or not command:
        raise ControlError("request needs a \"command\" string")
    return command, body


def encode_reply(result: Mapping[str, Any] | None = None, *, error: str | None = None) -> bytes:
    """One reply line: ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": ...}``."""
    body: dict[str, Any] = ({"ok": False, "error": error} if error is not None
                            else {"ok": True, "result": dict(result or {})})
    return json.dumps(body, separators=(",", ":"), default=str).encode() + b"\n"


def decode_reply(line: bytes) -> dict[str, Any]:
    """The ``result`` of a reply line. Raises ControlError for an error reply or a line
    that is not a reply."""
    try:
        body = json.loads(line)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ControlError(f"reply is not JSON: {exc}") from None
    if not isinstance(body, dict) or not isinstance(body.get("ok"), bool):
        raise ControlError("reply is not a control reply")
    if not body["ok"]:
        raise ControlError(str(body.get("error", "error")))
    result = body.get("result")
    if not isinstance(result, dict):
        raise ControlError("reply has no result object")
    return result


def printable(text: object) -> str:
    """``text`` as printable ASCII for a terminal: a backslash and every character that is
    not printable ASCII (control characters such as ESC and newline, bidi overrides, any
    non-ASCII) are written as Python escapes (``\\x1b``, ``\\x0a``, ``\\u202e``), so a
    string a container's creator chose (its id, its metadata) cannot move the cursor,
    clear the screen or otherwise act on the terminal it is shown on."""
    out = []
    for char in str(text):
        code = ord(char)
        if char == "\\":
            out.append("\\\\")
        elif 0x20 <= code < 0x7F:
            out.append(char)
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)


def _cell(text: object) -> str:
    """A cell of the status table: :func:`printable`, cut at :data:`_MAX_CELL`."""
    out = printable(text)
    if len(out) > _MAX_CELL:
        out = f"{out[:_MAX_CELL]}...[{len(out) - _MAX_CELL} more]"
    return out


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h{minutes:02d}m"
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _keeper_line(keeper: object) -> list[str]:
    if not isinstance(keeper, Mapping):
        return []
    state = "attached" if keeper.get("attached") else \
        "GONE: the sessions would not survive a crash"
    return [f"fd keeper: {printable(keeper.get('path', '?'))} ({state})"]


def _hot_loop_line(hot_loop: object) -> list[str]:
    """Which hot loop the daemon runs (supervisor/accel.py); none for an older daemon."""
    if not isinstance(hot_loop, Mapping):
        return []
    return [f"hot loop: {printable(hot_loop.get('why', '?'))}"]


def _memory_reads_line(reads: object) -> list[str]:
    """A line only when a container's slow memory holds threads or cost refusals."""
    if not isinstance(reads, Mapping):
        return []
    stuck, refused = reads.get("threads_in_slow_reads", 0), reads.get("refused", 0)
    if not stuck and not refused:
        return []
    return [f"memory reads: {printable(stuck)} threads in slow reads, "
            f"{printable(refused)} reads refused (EAGAIN)"]


def format_status(status: Mapping[str, Any]) -> str:
    """The human view of a ``status`` result: a header and one row per session."""
    sessions = list(status.get("sessions", []))
    head = [
        f"seccomp-supervisor {printable(status.get('version', '?'))}, "
        f"pid {printable(status.get('pid', '?'))}, "
        f"up {_duration(float(status.get('uptime_seconds', 0)))}",
        f"notify socket: {printable(status.get('notify_socket', '?'))}"
        + (" (socket activation)" if status.get("socket_activated") else ""),
        f"metrics: {printable(status.get('metrics') or 'off')}",
        *_hot_loop_line(status.get("hot_loop")),
        *_keeper_line(status.get("fd_keeper")),
        *_memory_reads_line(status.get("memory_reads")),
        f"sessions: {len(sessions)}   in flight: {status.get('inflight', 0)}   "
        f"notifications: {status.get('notifications', 0)}",
    ]
    if not sessions:
        return "\n".join([*head, "", "no containers are being served"]) + "\n"
    # Ids, metadata and policy names come from containers' creators and plugins: escaped
    # and cut, so they can neither add lines nor reach the terminal as escape sequences.
    columns = ("CONTAINER", "PID", "PEER_UID", "POLICIES", "MODE", "NOTIF", "DECISIONS", "GONE",
               "INFLIGHT", "AGE", "METADATA")
    rows = []
    for s in sessions:
        decisions = s.get("decisions", {})
        # The container id and metadata come from whoever created the container.
        rows.append((
            _cell(s.get("container", "")),
            _cell(s.get("runtime_pid", "")),
            "-" if s.get("peer_uid") is None else _cell(s.get("peer_uid")),
            _cell(",".join(str(p) for p in s.get("policies", []))) or "-",
            _cell(s.get("mode", "")),
            str(s.get("notifications", 0)),
            " ".join(f"{k}={v}" for k, v in sorted(decisions.items())) or "-",
            str(s.get("gone", 0)),
            str(s.get("inflight", 0)),
            _duration(float(s.get("age_seconds", 0))),
            _cell(" ".join(str(s.get("metadata", "")).split())) or "-",
        ))
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    lines = [*head, ""]
    for row in (columns, *rows):
        lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- server


class ControlServer:
    """Serves the control socket. Commands are added with :meth:`register`."""

    def __init__(self, handlers: Mapping[str, Handler] | None = None, *,
                 allowed_uids: frozenset[int] | None = None) -> None:
        self.handlers: dict[str, Handler] = dict(handlers or {})
        self.allowed_uids = (allowed_uids if allowed_uids is not None
                             else frozenset({0, os.geteuid()}))

    def register(self, command: str, handler: Handler) -> None:
        """Add (or replace) ``command``."""
        self.handlers[command] = handler

    async def serve(self, path: str,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind ``path`` (mode 0600) and serve until cancelled; removes the socket file
        at the end. Raises OSError if it cannot bind."""
        sock = bind_socket(path, 0o600)
        try:
            with sock:
                await self.serve_socket(sock, task_status=task_status)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)

    async def serve_socket(self, sock: trio.socket.SocketType,
                           task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                           ) -> None:
        """Serve on a listening socket the caller owns, until cancelled."""
        slots = trio.Semaphore(_MAX_CONNECTIONS)
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                await slots.acquire()
                try:
                    conn, _ = await sock.accept()
                except OSError as exc:
                    slots.release()
                    log.warning("control socket: accept failed: %s", exc.strerror)
                    await trio.sleep(0.1)
                    continue
                except BaseException:
                    slots.release()
                    raise
                nursery.start_soon(self._connection, conn, slots)

    async def _connection(self, conn: trio.socket.SocketType, slots: trio.Semaphore) -> None:
        try:
            with conn:
                pid, uid, gid = _UCRED.unpack(
                    conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
                peer = PeerCredentials(pid, uid, gid)
                if uid not in self.allowed_uids:
                    log.warning("control socket: refused pid %d uid %d", pid, uid)
                    await conn.send(encode_reply(error=f"uid {uid} may not use this socket"))
                    return
                buffer = bytearray()
                while True:
                    line = await _read_line(conn, buffer)
                    if line is None:
                        return
                    if not await self._answer(conn, line, peer):
                        return
        except (OSError, trio.TooSlowError) as exc:
            log.debug("control connection ended: %s", exc)
        finally:
            slots.release()

    async def _answer(self, conn: trio.socket.SocketType, line: bytes,
                      peer: PeerCredentials) -> bool:
        """Answer one request line; False ends the connection."""
        reply: ControlReply | None = None
        try:
            command, args = parse_request(line)
            handler = self.handlers.get(command)
            if handler is None:
                known = ", ".join(sorted(self.handlers)) or "none"
                raise ControlError(f"unknown command {command!r} (known: {known})")
            result = await handler(ControlRequest(command, args, peer))
            reply = result if isinstance(result, ControlReply) else ControlReply(result)
            if len(reply.fds) > MAX_REPLY_FDS:
                raise ControlError(f"reply has more than {MAX_REPLY_FDS} fds")
            data = encode_reply(reply.result)
        except ControlError as exc:
            data = encode_reply(error=str(exc))
            reply = None
        except Exception:
            log.exception("control command failed")
            data = encode_reply(error="internal error")
            reply = None
        if reply is not None and reply.fds:
            await conn.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                         array.array("i", reply.fds).tobytes())])
            reply.sent = True
            return True
        await _send_all(conn, data)
        if reply is not None:
            reply.sent = True
        return True


async def _send_all(conn: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        sent = await conn.send(view)
        view = view[sent:]


async def _read_line(conn: trio.socket.SocketType, buffer: bytearray) -> bytes | None:
    """The next line (without newline), None at EOF. A line over MAX_LINE (OSError) or a
    line not complete within _IDLE_TIMEOUT (TooSlowError: a silent peer, or one that
    drips a byte at a time) ends the connection."""
    with trio.fail_after(_IDLE_TIMEOUT):
        while True:
            end = buffer.find(b"\n")
            if end >= 0:
                line = bytes(buffer[:end])
                del buffer[:end + 1]
                return line
            if len(buffer) > MAX_LINE:
                raise OSError("request line too long")
            chunk = await conn.recv(65536)
            if not chunk:
                return None
            buffer.extend(chunk)


# --------------------------------------------------------------------------- client


def request(path: str, command: str, args: Mapping[str, Any] | None = None, *,
            timeout: float = 10.0, max_fds: int = 0) -> tuple[dict[str, Any], list[int]]:
    """Send one request to the control socket at ``path`` and return ``(result, fds)``.
    The caller owns the fds (only received if ``max_fds`` > 0; any beyond are closed).

    Raises OSError if the socket cannot be reached, ControlError for an error reply.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(encode_request(command, args))
        data = bytearray()
        fds: list[int] = []
        try:
            while b"\n" not in data:
                chunk, ancdata, _flags, _addr = sock.recvmsg(
                    65536, socket.CMSG_SPACE(max(max_fds, 1) * _FD_SIZE),
                    socket.MSG_CMSG_CLOEXEC)
                for level, kind, payload in ancdata:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        whole = len(payload) - len(payload) % _FD_SIZE
                        fds.extend(array.array("i", payload[:whole]))
                if not chunk:
                    raise ControlError("the daemon closed the connection without a reply")
                data.extend(chunk)
                if len(data) > 64 * MAX_LINE:
                    raise ControlError("reply too long")
            result = decode_reply(bytes(data[:data.index(b"\n")]))
        except BaseException:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise
        if len(fds) > max_fds:
            for fd in fds[max_fds:]:
                with contextlib.suppress(OSError):
                    os.close(fd)
            fds = fds[:max_fds]
        return result, fds
