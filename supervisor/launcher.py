"""``seccomp-supervisor run``: start a command under a filter and hand its listener fd to
the supervisor daemon, as a container runtime would.

The hand-over is what runc 1.1 does: connect to the daemon's socket, send the
``ContainerProcessState`` with the listener in ``SCM_RIGHTS`` in one ``sendmsg``. The
launcher then closes its own copy of the listener, so the daemon holds the only one, and
waits for the command like a shell would.
"""

from __future__ import annotations

import array
import contextlib
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Sequence
from typing import Final

from . import abi
from .errors import SupervisorError
from .handoff import build_state_message
from .spawn import spawn_filtered

__all__ = ["LaunchError", "hand_over", "run"]

# The signals a user sends to "the command". The launcher passes them on to the child.
FORWARDED_SIGNALS: Final = frozenset({signal.SIGINT, signal.SIGTERM})
# si_code of a signal the kernel generated itself, e.g. the terminal's Ctrl-C, which goes
# to the whole foreground process group (the child included) rather than to one process.
_SI_KERNEL: Final = 0x80
# Upper bound on one wait for a signal; SIGCHLD normally ends the wait at once.
_WAIT_SLICE: Final = 1.0


class LaunchError(SupervisorError):
    """The command's listener could not be handed to the supervisor daemon."""


def hand_over(socket_path: str | os.PathLike[str], listener_fd: int, message: bytes,
              timeout: float = 5.0) -> None:
    """Send ``message`` with ``listener_fd`` to the daemon at ``socket_path``, in one
    ``sendmsg`` like runc, then shut down and close the connection.

    ``listener_fd`` stays open: the caller owns it. Each socket operation is limited to
    ``timeout`` seconds.

    Raises :class:`LaunchError` if the daemon cannot be reached (no socket, nobody
    listening, no permission, timeout) or the send fails.
    """
    path = os.fspath(socket_path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as exc:
            raise LaunchError(
                f"the supervisor at {path} is not reachable: {_reason(exc)}") from exc
        try:
            fds = array.array("i", [listener_fd])
            sent = sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            if sent < len(message):
                sock.sendall(message[sent:])
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise LaunchError(
                f"cannot hand the listener to the supervisor at {path}: {_reason(exc)}"
            ) from exc
    finally:
        sock.close()


def run(
    argv: Sequence[str],
    program: bytes,
    *,
    socket_path: str | os.PathLike[str] | None,
    metadata: str = "",
    container_id: str | None = None,
    flags: int = abi.SECCOMP_FILTER_FLAG_NEW_LISTENER,
    timeout: float = 5.0,
) -> int:
    """Run ``argv`` under the BPF ``program`` (installed with ``flags``), with the
    supervisor at ``socket_path`` answering its notified calls. Returns its exit status,
    or 128 + the signal number if a signal killed it, as a shell does.

    Without ``NEW_LISTENER`` in ``flags`` there is no listener: the kernel alone enforces
    the program, nothing is handed over and ``socket_path`` is not used (it may be None).

    The state message names the command ``container_id`` (default ``run-PID``), with
    ``metadata`` as its ``listenerMetadata``, status ``creating`` and the current
    directory as the bundle. While it waits, the launcher passes SIGINT and SIGTERM sent
    to it on to the command (when called from the main thread).

    Raises :class:`LaunchError` if the hand-over fails; the command has then been
    killed and reaped, since its notified calls could never be answered. Raises
    :class:`~supervisor.spawn.SpawnError` if the command cannot be started under its
    filter.
    """
    child = spawn_filtered(list(argv), program, flags=flags)
    if child.listener_fd < 0:
        return _wait_forwarding_signals(child.process)
    try:
        if socket_path is None:
            raise LaunchError("the filter notifies: a supervisor socket is needed")
        message = build_state_message(
            pid=child.pid,
            container_id=container_id or f"run-{child.pid}",
            metadata=metadata,
            bundle=os.getcwd(),
            status="creating",
        )
        hand_over(socket_path, child.listener_fd, message, timeout)
    except BaseException:
        child.process.kill()
        child.process.wait()
        raise
    finally:
        child.close()
    return _wait_forwarding_signals(child.process)


def _wait_forwarding_signals(process: subprocess.Popen[bytes]) -> int:
    if threading.current_thread() is not threading.main_thread():
        return _exit_status(process.wait())
    waited = {signal.SIGCHLD, *FORWARDED_SIGNALS}
    # Blocked signals stay pending until sigtimedwait takes them, so none is lost
    # between poll() and the wait, and Python's own handlers (KeyboardInterrupt) do not
    # run for them.
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, waited)
    try:
        while (code := process.poll()) is None:
            info = signal.sigtimedwait(waited, _WAIT_SLICE)
            if info is None or info.si_signo == signal.SIGCHLD:
                continue
            if info.si_code == _SI_KERNEL:
                continue  # the terminal sent it to the child's process group as well
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, info.si_signo)
        # A signal that came after the command ended was meant for it: drop it rather
        # than let it hit the caller once unblocked.
        while signal.sigpending() & waited:
            signal.sigtimedwait(waited, 0)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    return _exit_status(code)


def _exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _reason(exc: OSError) -> str:
    if isinstance(exc, TimeoutError) and exc.errno is None:
        return "timed out"
    return exc.strerror or str(exc)
