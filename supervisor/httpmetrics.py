"""``/metrics`` over HTTP, bounded: a slow, idle or numerous client costs a fixed number
of fds and no thread, and a scrape still gets through.

prometheus-client's own ``start_http_server`` is a thread per connection with no time
limit: 249 idle TCP connections from any local user took 244 threads and as many fds,
and new containers were not served. Here the connections are trio tasks in the daemon's
loop, bounded by :class:`HttpLimits`:

* at most ``max_connections`` at once (each is one fd). When they are all taken, the
  oldest connection that has not sent its whole request yet is closed to make room (a
  scraper sends its request at once; an idle or dripping client is the oldest); if every
  connection is being answered, new ones wait in the kernel's listen backlog, which
  costs the daemon no fd;
* the request line and headers must arrive within ``header_timeout`` and be at most
  ``max_header_bytes``; the whole exchange, answer included, within ``request_deadline``
  (a client that drips one byte a second, or does not read the answer, is cut off);
* one request per connection (``Connection: close``).

The answer itself is prometheus-client's: its WSGI app (``make_wsgi_app``: content
negotiation between the text and OpenMetrics formats, gzip, ``name[]`` filters), called
with the request's method, path, query and ``Accept`` headers, in a worker thread (the
registry is collected there, not on the event loop); one at a time, so metrics never
hold more than one thread.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

import trio
from prometheus_client import CollectorRegistry, make_wsgi_app

__all__ = ["HttpLimits", "HttpRequest", "MetricsServer", "bind_tcp", "parse_request_head"]

log = logging.getLogger("supervisor.metrics")

_BACKOFF_FIRST: Final = 0.05
_BACKOFF_MAX: Final = 2.0
_REASONS: Final = {400: "Bad Request", 408: "Request Timeout",
                   431: "Request Header Fields Too Large", 500: "Internal Server Error"}


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Bounds of the ``/metrics`` server (see the module docstring). Seconds, bytes."""

    max_connections: int = 16
    header_timeout: float = 5.0
    request_deadline: float = 10.0
    max_header_bytes: int = 8192

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.max_header_bytes < 64:
            raise ValueError("HttpLimits: max_connections >= 1, max_header_bytes >= 64")
        if not (0 < self.header_timeout <= self.request_deadline):
            raise ValueError("HttpLimits: 0 < header_timeout <= request_deadline")


# --------------------------------------------------------------------------- pure parts


class BadRequest(Exception):
    """The client sent something that is not an HTTP/1.x request head."""


@dataclass(frozen=True, slots=True)
class HttpRequest:
    method: str
    path: str
    query: str
    headers: dict[str, str]  # lower-case names; a repeated header keeps the last value


def parse_request_head(head: bytes) -> HttpRequest:
    """Parse the request line and headers (everything before the blank line). Raises
    BadRequest. Pure."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        raise BadRequest("undecodable") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[0].isalpha():
        raise BadRequest("not an HTTP/1.x request line")
    method, target, _version = parts
    if not target.startswith("/"):
        raise BadRequest("the request target must be a path")
    path, _, query = target.partition("?")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise BadRequest("malformed header line")
        headers[name.lower()] = value.strip()
    return HttpRequest(method.upper(), path, query, headers)


def wsgi_environ(request: HttpRequest) -> dict[str, Any]:
    """The WSGI environ prometheus-client's app reads."""
    environ: dict[str, Any] = {
        "REQUEST_METHOD": request.method,
        "PATH_INFO": request.path,
        "QUERY_STRING": request.query,
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.url_scheme": "http",
    }
    for name in ("accept", "accept-encoding"):
        if name in request.headers:
            environ["HTTP_" + name.upper().replace("-", "_")] = request.headers[name]
    return environ


def response_bytes(status: str, headers: Iterable[tuple[str, str]], body: bytes, *,
                   head_only: bool = False) -> bytes:
    """A complete HTTP/1.1 response that closes the connection."""
    lines = [f"HTTP/1.1 {status}"]
    for name, value in headers:
        if name.lower() not in ("content-length", "connection"):
            lines.append(f"{name}: {value}")
    lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + (b"" if head_only else body)


def error_response(code: int) -> bytes:
    reason = _REASONS.get(code, "Error")
    return response_bytes(f"{code} {reason}", [("Content-Type", "text/plain")],
                          f"{code} {reason}\n".encode())


# --------------------------------------------------------------------------- I/O


def bind_tcp(host: str, port: int, backlog: int = 128) -> trio.socket.SocketType:
    """A listening TCP socket on ``host`` (IPv4 or IPv6 literal) and ``port``. Raises
    OSError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return trio.socket.from_stdlib_socket(sock)


class _Connection:
    __slots__ = ("done", "reading", "scope")

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.reading = True  # still waiting for the request head: may be evicted
        self.done = trio.Event()


class MetricsServer:
    """Serves ``registry`` on a listening socket (see the module docstring)."""

    def __init__(self, registry: CollectorRegistry, limits: HttpLimits = HttpLimits()) -> None:
        self.limits = limits
        self.app: Callable[..., Iterable[bytes]] = make_wsgi_app(registry)
        self._limiter = trio.CapacityLimiter(1)
        self._open: list[_Connection] = []  # oldest first
        self._slot_freed = trio.Event()
        self.served = 0
        self.evicted = 0
        self.timed_out = 0

    @property
    def connections(self) -> int:
        return len(self._open)

    async def serve(self, sock: trio.socket.SocketType,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept and answer until cancelled. The caller owns ``sock``."""
        delay = _BACKOFF_FIRST
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                await trio.lowlevel.wait_readable(sock)
                await self._make_room()
                try:
                    conn, _ = await sock.accept()
                except OSError as exc:
                    # EMFILE and the like: the connection waits in the backlog.
                    log.warning("metrics: accept failed (%s); retrying in %.2f s",
                                exc.strerror, delay)
                    await trio.sleep(delay)
                    delay = min(delay * 2, _BACKOFF_MAX)
                    continue
                delay = _BACKOFF_FIRST
                entry = _Connection()
                self._open.append(entry)
                nursery.start_soon(self._connection, conn, entry)

    async def _make_room(self) -> None:
        """Wait until fewer than max_connections are open, closing the oldest one that
        is still sending its request when all are taken."""
        while len(self._open) >= self.limits.max_connections:
            idle = next((c for c in self._open if c.reading and not c.scope.cancel_called),
                        None)
            if idle is not None:
                self.evicted += 1
                idle.scope.cancel()
                await idle.done.wait()
            else:
                self._slot_freed = trio.Event()
                await self._slot_freed.wait()

    async def _connection(self, conn: trio.socket.SocketType, entry: _Connection) -> None:
        try:
            with conn, entry.scope:
                entry.scope.deadline = trio.current_time() + self.limits.request_deadline
                answer = await self._answer(conn, entry)
                entry.reading = False
                view = memoryview(answer)
                while view:
                    view = view[await conn.send(view):]
            if entry.scope.cancelled_caught and not entry.reading:
                self.timed_out += 1
        except OSError as exc:
            log.debug("metrics connection: %s", exc)
        finally:
            self._open.remove(entry)
            entry.done.set()
            self._slot_freed.set()

    async def _answer(self, conn: trio.socket.SocketType, entry: _Connection) -> bytes:
        try:
            with trio.fail_after(self.limits.header_timeout):
                head = await self._read_head(conn)
        except trio.TooSlowError:
            self.timed_out += 1
            return error_response(408)
        except BadRequest as exc:
            return error_response(431 if "large" in str(exc) else 400)
        try:
            request = parse_request_head(head)
        except BadRequest:
            return error_response(400)
        entry.reading = False
        status, headers, body = await trio.to_thread.run_sync(
            self._call_app, wsgi_environ(request), limiter=self._limiter)
        self.served += 1
        return response_bytes(status, headers, body, head_only=request.method == "HEAD")

    async def _read_head(self, conn: trio.socket.SocketType) -> bytes:
        buffer = bytearray()
        limit = self.limits.max_header_bytes
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end > limit or (end < 0 and len(buffer) > limit):
                raise BadRequest("request head too large")
            if end >= 0:
                return bytes(buffer[:end])
            chunk = await conn.recv(4096)
            if not chunk:
                raise BadRequest("connection closed before the end of the request head")
            buffer += chunk

    def _call_app(self, environ: dict[str, Any]) -> tuple[str, list[tuple[str, str]], bytes]:
        """Run prometheus-client's WSGI app (in a worker thread)."""
        if environ["REQUEST_METHOD"] == "HEAD":
            environ = {**environ, "REQUEST_METHOD": "GET"}
        started: list[Any] = []

        def start_response(status: str, headers: list[tuple[str, str]],
                           exc_info: object = None) -> None:
            started[:] = [status, headers]

        try:
            body = b"".join(self.app(environ, start_response))
        except Exception:
            log.exception("metrics: exposition failed")
            return "500 Internal Server Error", [("Content-Type", "text/plain")], b"500\n"
        return started[0], list(started[1]), body
