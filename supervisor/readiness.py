"""Readiness for supervisors other than systemd: a pid file and a notification fd.

The daemon is *ready* when it serves: the config and every policy are loaded, the notify
socket is accepted on (connections made earlier waited in its backlog), and the control
socket and ``/metrics`` are up. That is the moment systemd gets ``READY=1``; at the same
moment, once per process:

* ``--pid-file PATH``: the pid is written to a new temporary file (random name) in
  PATH's directory and renamed over PATH, so a reader never sees a partial file. At
  exit PATH is removed if it still holds our pid (a daemon that took over since then
  wrote its own). At start a file naming a process that no longer exists (a daemon
  SIGKILLed in a restarted container) is removed, so it cannot claim readiness early.
* ``--ready-fd N`` (s6's ``notification-fd``, runit/daemontools style): a newline is
  written to fd N, which is then closed. The fd is made close-on-exec at start, so no
  child of the daemon inherits it and holds the reader's pipe open.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile
from collections.abc import Mapping

from . import systemd

__all__ = ["ReadinessError", "ReadinessNotifier"]

log = logging.getLogger("supervisor.readiness")


class ReadinessError(Exception):
    """A ``--pid-file`` or ``--ready-fd`` that cannot work (checked at start)."""


class ReadinessNotifier(systemd.Notifier):
    """A :class:`~supervisor.systemd.Notifier` that also writes the pid file and the
    ready fd at the first :meth:`ready`."""

    def __init__(self, address: str | bytes | None, *, watchdog: float | None = None,
                 pid_file: str | None = None, ready_fd: int | None = None) -> None:
        super().__init__(address, watchdog=watchdog)
        self.pid_file = os.path.abspath(pid_file) if pid_file else None
        self.ready_fd = -1 if ready_fd is None else ready_fd
        self._signalled = False
        self._pid = os.getpid()

    @classmethod
    def from_environ(cls, env: Mapping[str, str] | None = None, *,
                     pid_file: str | None = None,
                     ready_fd: int | None = None) -> ReadinessNotifier:
        """From ``$NOTIFY_SOCKET`` and the watchdog variables, as the base class.

        Raises ReadinessError for a ready fd that is not open (or is 0, 1 or 2) or a
        pid file whose directory does not exist."""
        base = systemd.Notifier.from_environ(env)
        if ready_fd is not None:
            if ready_fd < 3:
                raise ReadinessError(f"--ready-fd {ready_fd}: stdin, stdout and stderr "
                                     f"are not notification fds")
            try:
                os.fstat(ready_fd)
                os.set_inheritable(ready_fd, False)
            except OSError as exc:
                raise ReadinessError(f"--ready-fd {ready_fd}: {exc.strerror}") from None
        if pid_file:
            parent = os.path.dirname(os.path.abspath(pid_file))
            if not os.path.isdir(parent):
                raise ReadinessError(f"--pid-file {pid_file}: directory {parent} does not "
                                     f"exist")
            _remove_if_stale(os.path.abspath(pid_file))
        return cls(base.address, watchdog=base.watchdog_interval, pid_file=pid_file,
                   ready_fd=ready_fd)

    def ready(self, status: str | None = None) -> bool:
        sent = super().ready(status)
        if not self._signalled:
            self._signalled = True
            self._write_pid_file()
            self._signal_fd()
        return sent

    def cleanup(self) -> None:
        """At exit: close an unused ready fd (the reader sees EOF without a newline:
        not ready) and remove our pid file."""
        if self.ready_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.ready_fd)
            self.ready_fd = -1
        if self.pid_file and self._signalled and _read_pid_file(self.pid_file) == str(
                self._pid):
            with contextlib.suppress(OSError):
                os.unlink(self.pid_file)

    def _write_pid_file(self) -> None:
        if not self.pid_file:
            return
        directory, name = os.path.split(self.pid_file)
        temporary = ""
        try:
            # A new file with a random name (O_EXCL): in a directory others can write
            # to, a name we could predict could be theirs, and so would the pid file.
            fd, temporary = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
            try:
                os.fchmod(fd, 0o644)
                os.write(fd, f"{self._pid}\n".encode())
            finally:
                os.close(fd)
            os.rename(temporary, self.pid_file)
        except OSError as exc:
            log.error("cannot write the pid file %s: %s", self.pid_file, exc)
            if temporary:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)

    def _signal_fd(self) -> None:
        if self.ready_fd < 0:
            return
        fd, self.ready_fd = self.ready_fd, -1
        try:
            os.write(fd, b"\n")
        except OSError as exc:
            log.warning("--ready-fd %d: %s", fd, exc.strerror)
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)


def _remove_if_stale(pid_file: str) -> None:
    """Remove a pid file left by a daemon that died without cleaning up (SIGKILL, OOM):
    in a restarted container the file would say "ready" before this process serves.
    A file naming a live process is left to it (our own file replaces it when ready)."""
    text = _read_pid_file(pid_file)
    if text is None or not text.isdigit():
        return  # none, or not a plain file: ready() replaces it anyway
    try:
        os.kill(int(text), 0)
        return  # alive (or reused by another process: our own file replaces it)
    except ProcessLookupError:
        pass
    except (PermissionError, OverflowError, ValueError):
        return
    with contextlib.suppress(OSError):
        os.unlink(pid_file)
        log.info("removed the stale pid file %s (pid %s is gone)", pid_file, text)


def _read_pid_file(pid_file: str) -> str | None:
    """The first bytes of ``pid_file``, stripped; None unless it is a plain file (not
    followed if a symlink). Its directory may be writable by others, who could put a
    FIFO there (an open to read would block for ever) or a link to ``/dev/zero`` (a read
    that never ends): opened without following, without blocking, read once, bounded."""
    try:
        fd = os.open(pid_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, 32).decode("ascii", "replace").strip()
    except OSError:
        return None
    finally:
        os.close(fd)
