"""The command line's entry point: ``serve`` listens before the heavy imports.

Importing trio, prometheus_client, pyseccomp and the daemon takes a Python process
0.3-1 s; a runtime started right after the daemon (as runc's own test helpers start
their agent) would meet no socket in that time and fail with ENOENT. So :func:`main`
binds and listens on the notify socket first, with the standard library only, and hands
the listening socket to the daemon: a runtime that connects meanwhile waits in the
backlog (its message waits in the socket buffer) until the daemon accepts.

Only the socket path is taken early, from ``--socket``, the ``[listen]`` table of
``--config``, or the built-in default. Whatever is unclear here (an option spelled in a
way this scan does not know, a config it cannot read, ``--takeover``, socket activation
by systemd) skips the early bind, and the daemon binds as it always did; the daemon also
drops an early socket whose path is not the one its parsed config names.

This module imports nothing but the standard library modules it needs.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import sys
from collections.abc import Mapping, Sequence

DEFAULT_SOCKET = "/run/seccomp-supervisor/notify.sock"  # = config.DEFAULT_SOCKET
_BACKLOG = 128


class PreBound:
    """A notify socket bound and listening before the daemon was loaded. ``identity``
    is the (st_dev, st_ino) of the socket file we created: only that file is ever
    removed (:meth:`discard`). ``taken``: the daemon owns both now. (Not a dataclass:
    importing dataclasses costs more than the rest of this module.)"""

    __slots__ = ("identity", "path", "sock", "taken")

    def __init__(self, sock: socket.socket, path: str, identity: tuple[int, int]) -> None:
        self.sock = sock
        self.path = path
        self.identity = identity
        self.taken = False

    def discard(self) -> None:
        """Close the socket and remove its file, unless the daemon took them over."""
        if self.taken:
            return
        self.sock.close()
        unlink_if_same(self.path, self.identity)


def main(argv: Sequence[str] | None = None) -> int:
    """``seccomp-supervisor``: bind early for ``serve``, then run the command line."""
    args = list(sys.argv[1:] if argv is None else argv)
    if _command(args) == "keep":
        # The fd keeper must start fast and stay small: not even the CLI's imports.
        from .keeper import standalone_main

        return standalone_main(args)
    prebound = prebind(args, os.environ)
    from .cli import main as cli_main

    try:
        return cli_main(args, prebound=prebound)
    finally:
        if prebound is not None:
            prebound.discard()


def prebind(args: Sequence[str], environ: Mapping[str, str]) -> PreBound | None:
    """Bind the notify socket that ``serve`` with ``args`` would bind, or None when the
    command is not ``serve``, the path is not certain, or binding fails (the daemon
    then binds, and reports the error, as usual)."""
    path_mode = _serve_socket(args, environ)
    if path_mode is None:
        return None
    path, mode = path_mode
    try:
        sock = bind_unix_listener(path, mode)
    except OSError:
        return None
    try:
        st = os.lstat(path)
    except OSError:
        sock.close()
        return None
    return PreBound(sock, path, (st.st_dev, st.st_ino))


def bind_unix_listener(path: str, mode: int = 0o600, *,
                       backlog: int = _BACKLOG) -> socket.socket:
    """Create the listening unix socket at ``path`` with permissions ``mode``.

    A missing parent directory is created with mode 0700 plus search permission for the
    classes ``mode`` lets in (:func:`directory_mode`). A socket file left by a
    process that is gone is replaced. Peers are also checked by uid, so the moment
    between ``bind`` and ``chmod`` grants nothing.

    Raises FileExistsError if ``path`` exists and is not a socket, OSError(EADDRINUSE)
    if a live process listens on it, and OSError for any failure to create, bind or
    listen.
    """
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        os.makedirs(parent, mode=0o700, exist_ok=True)
        os.chmod(parent, directory_mode(mode))
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    bound = False
    try:
        sock.bind(path)
        bound = True
        os.chmod(path, mode)
        sock.listen(backlog)
        return sock
    except BaseException:
        sock.close()
        if bound:
            try:
                os.unlink(path)
            except OSError:
                pass
        raise


def directory_mode(socket_mode: int) -> int:
    """The mode of a socket directory the daemon creates: 0700, and search permission for
    the classes ``socket_mode`` lets in (a rootless runtime's user reaches the socket
    through its group or others bits). Pure."""
    mode = 0o700
    if socket_mode & 0o060:
        mode |= 0o010
    if socket_mode & 0o006:
        mode |= 0o001
    return mode


def unlink_if_same(path: str, identity: tuple[int, int]) -> None:
    """Remove ``path`` if it is still the file ``identity`` (st_dev, st_ino) names."""
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == identity:
            os.unlink(path)
    except OSError:
        pass


def in_use(path: str) -> bool:
    """True if a live process listens on the unix socket at ``path``."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return False
    except OSError:
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.setblocking(False)
        probe.connect(path)
    except BlockingIOError:
        return True  # a listener whose backlog is full: alive
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _remove_stale_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.setblocking(False)
        probe.connect(path)
    except ConnectionRefusedError:
        # Nobody listens: the file was left by a process that is gone.
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    except FileNotFoundError:
        return
    except BlockingIOError:
        pass  # a listener whose backlog is full: alive
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "another process is listening on this socket", path)


# Options of the top-level parser and of `serve` that take a value (argparse also accepts
# --opt=value). Anything else starting with '-' and not listed makes the scan give up.
_GLOBAL_VALUE = frozenset({"--log-level"})
_SERVE_VALUE = frozenset({"--config", "--socket", "--policy", "--control-socket",
                          "--metrics", "--pid-file", "--ready-fd"})
_SERVE_FLAG: frozenset[str] = frozenset()


def _command(args: Sequence[str]) -> str | None:
    """The subcommand of ``args`` (after the global options), or None if unsure."""
    rest = list(args)
    while rest and rest[0].startswith("-"):
        opt, eq, _ = rest[0].partition("=")
        if opt not in _GLOBAL_VALUE:
            return None
        del rest[:1 if eq else 2]
    return rest[0] if rest else None


def _serve_socket(args: Sequence[str], environ: Mapping[str, str]) -> tuple[str, int] | None:
    """(path, mode) of the notify socket ``serve`` would bind, or None if unsure."""
    if environ.get("LISTEN_FDS") and environ.get("LISTEN_PID") == str(os.getpid()):
        return None  # socket activation: systemd passes the socket
    rest = list(args)
    while rest and rest[0].startswith("-"):
        opt, eq, _ = rest[0].partition("=")
        if opt not in _GLOBAL_VALUE:
            return None  # --version, --help, or an abbreviation: not ours to guess
        del rest[:1 if eq else 2]
    if not rest or rest[0] != "serve":
        return None
    values: dict[str, str] = {}
    i = 1
    while i < len(rest):
        opt, eq, value = rest[i].partition("=")
        if opt in _SERVE_FLAG and not eq:
            i += 1
            continue
        if opt not in _SERVE_VALUE:
            return None  # --takeover, --help, an abbreviation, a stray argument
        if not eq:
            if i + 1 >= len(rest):
                return None
            value = rest[i + 1]
            i += 1
        values[opt] = value
        i += 1
    mode = 0o600
    path = values.get("--socket")
    config = values.get("--config")
    if config is not None:
        listen = _listen_table(config)
        if listen is None:
            return None
        raw_mode = listen.get("socket_mode", 0o600)
        if isinstance(raw_mode, str):
            try:
                raw_mode = int(raw_mode, 8)
            except ValueError:
                return None
        if not isinstance(raw_mode, int) or isinstance(raw_mode, bool) \
                or not 0 <= raw_mode <= 0o7777:
            return None
        mode = raw_mode
        if path is None:
            configured = listen.get("socket", DEFAULT_SOCKET)
            if not isinstance(configured, str):
                return None
            path = configured
    if path is None:
        path = DEFAULT_SOCKET
    if not path or "\0" in path or len(os.fsencode(path)) > 107:
        return None
    return path, mode


def _listen_table(config: str) -> dict[str, object] | None:
    import tomllib

    try:
        with open(config, "rb") as file:
            data = tomllib.load(file)
    except (OSError, ValueError):
        return None
    listen = data.get("listen", {})
    return listen if isinstance(listen, dict) else None
