"""Files whose name or content a container or its creator influences: read and written
only directly inside a directory the operator chose, never through a symlink, never
unbounded, never on the event loop.

Who is at fault: the trace annotation (``io.containers.trace-syscall``) comes from whoever
creates the container (a Kubernetes pod annotation reaches it through CRI-O), and the
learn policy's file names come from container ids. The daemon runs as root. So:

* a name must be a plain file name (:func:`check_name`: letters, digits, ``_ . + - ~``,
  not starting with a dot or ``~``, at most 255 bytes) directly in its directory (:func:`name_in`):
  no subdirectory, no ``..``;
* :func:`read_file` opens it ``O_NOFOLLOW|O_NONBLOCK|O_CLOEXEC|O_NOCTTY`` relative to the
  directory's fd, requires a regular file (``fstat``: not a FIFO, device, socket or
  directory; a symlink fails with ELOOP) and reads at most ``max_bytes`` (refusing a
  larger file);
* :func:`write_file` writes a new temporary file (``O_CREAT|O_EXCL|O_NOFOLLOW``) in the
  directory and renames it over the name (``rename`` replaces a symlink, it never
  follows it) or, with ``exclusive``, links it to the name (``link`` fails with EEXIST if
  anything, even a dangling symlink, has the name): the file appears whole or not at all;
* the blocking calls of both (an open or a read can block for good on FUSE or NFS, and
  on a FIFO or a tty without O_NONBLOCK) run in worker threads: :func:`submit` runs a job
  in one, bounded by :data:`FILE_TIMEOUT` and at most :data:`MAX_THREADS` at a time
  (a thread stuck in the kernel keeps its slot until the kernel lets go);
* messages name the file and the reason, never its content.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import stat
from collections.abc import Callable, Hashable
from typing import Final

import trio

from .errors import SupervisorError

__all__ = ["FILE_TIMEOUT", "MAX_PROFILE_BYTES", "MAX_THREADS", "FileRefused", "check_name",
           "drain", "name_in", "read_file", "submit", "write_file"]

log = logging.getLogger("supervisor.safefile")

#: Largest profile read, in bytes (runc's default profile is about 25 KB).
MAX_PROFILE_BYTES: Final = 1 << 20
#: Seconds a file job may take before the daemon stops waiting for it.
FILE_TIMEOUT: Final = 10.0
#: File jobs running at once (threads); a stuck one keeps its slot.
MAX_THREADS: Final = 4

# "~" for the names supervisor.learn.profile_file_name gives mangled container ids.
_NAME: Final = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9_.+~-]*")
_MAX_NAME: Final = 255
_READ_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
_CREATE_FLAGS: Final = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                        | os.O_NOCTTY)


class FileRefused(SupervisorError):
    """A file was refused: bad name, outside its directory, not a regular file, too
    large. The message names it and says why (never what it contains)."""


def check_name(name: str) -> str:
    """``name`` if it is a plain file name (see the module docstring); else raise
    :class:`FileRefused`."""
    if (not _NAME.fullmatch(name) or len(name.encode()) > _MAX_NAME):
        raise FileRefused(f"{name!r} is not a plain file name (letters, digits, '_.+-~', "
                          f"not starting with '.', at most {_MAX_NAME} bytes)")
    return name


def name_in(directory: str, path: str, what: str = "file") -> str:
    """The file name of ``path`` if ``path`` names a plain file name directly in
    ``directory`` (lexically: both are normalised, nothing is resolved); else raise
    :class:`FileRefused`. Pure."""
    parent, name = os.path.split(os.path.normpath(path))
    if not os.path.isabs(path) or parent != os.path.normpath(directory):
        raise FileRefused(f"the {what} {path!r} is not directly in {directory}")
    return check_name(name)


def _open_directory(directory: str) -> int:
    return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def read_file(directory: str, name: str, max_bytes: int = MAX_PROFILE_BYTES) -> bytes:
    """The content of the regular file ``name`` directly in ``directory``, at most
    ``max_bytes``. Blocking: call it from a worker thread (:func:`submit`).

    Raises FileNotFoundError if there is no such file, :class:`FileRefused` if it is not
    a regular file (a symlink included) or larger than ``max_bytes``, OSError otherwise.
    """
    check_name(name)
    where = os.path.join(directory, name)
    dirfd = _open_directory(directory)
    try:
        try:
            fd = os.open(name, _READ_FLAGS, dir_fd=dirfd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise FileRefused(f"{where} is a symlink: not followed") from None
            raise
    finally:
        os.close(dirfd)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FileRefused(f"{where} is not a regular file")
        if info.st_size > max_bytes:
            raise FileRefused(f"{where} is larger than {max_bytes} bytes")
        chunks: list[bytes] = []
        size = 0
        while size <= max_bytes:
            chunk = os.read(fd, max_bytes + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > max_bytes:  # it grew after the fstat
            raise FileRefused(f"{where} is larger than {max_bytes} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def write_file(directory: str, name: str, data: bytes, *, exclusive: bool = False) -> None:
    """Write ``data`` to ``name`` directly in ``directory`` (created, mode 0755, if
    missing), atomically: a temporary file, fsync, then ``rename`` over ``name``, or with
    ``exclusive`` a ``link`` to it, which fails if ``name`` exists. Mode 0644. Blocking:
    call it from a worker thread (:func:`submit`).

    Raises FileExistsError (``exclusive`` and ``name`` exists), :class:`FileRefused` (bad
    name), OSError otherwise. No temporary file is left behind.
    """
    check_name(name)
    os.makedirs(directory, 0o755, exist_ok=True)
    dirfd = _open_directory(directory)
    try:
        tmp = f".{name}.{secrets.token_hex(8)}.tmp"
        fd = os.open(tmp, _CREATE_FLAGS, 0o644, dir_fd=dirfd)
        try:
            try:
                os.fchmod(fd, 0o644)  # whatever the umask
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            if exclusive:
                os.link(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd,
                        follow_symlinks=False)
            else:
                os.rename(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dirfd)
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


# --------------------------------------------------------------------------- jobs


class _Jobs:
    """The file jobs of one trio run."""

    def __init__(self) -> None:
        self.limiter = trio.CapacityLimiter(MAX_THREADS)
        self.running = 0
        self.idle = trio.Event()
        self.idle.set()
        self.locks: dict[Hashable, trio.Lock] = {}


_JOBS: Final[trio.lowlevel.RunVar[_Jobs]] = trio.lowlevel.RunVar("safefile_jobs")


def _jobs() -> _Jobs:
    try:
        return _JOBS.get()
    except LookupError:
        jobs = _Jobs()
        _JOBS.set(jobs)
        return jobs


def submit(what: str, job: Callable[[], None], *, key: Hashable = None,
           timeout: float = FILE_TIMEOUT) -> None:
    """Run ``job`` (blocking file work) in a worker thread, never on the event loop; jobs
    with the same ``key`` (not None) run one after the other. ``what`` names the job in
    log messages. An exception of ``job`` is logged (one line, no traceback for OSError
    and :class:`FileRefused`); a job still running after ``timeout`` seconds is logged
    and abandoned (its thread ends when the kernel lets it).

    Called from the trio thread (a session-end hook). Without a trio run (the ``record``
    command, scripts), the job runs at once in the caller's thread."""
    try:
        trio.lowlevel.current_trio_token()
    except RuntimeError:
        _run_logged(what, job)
        return
    jobs = _jobs()
    jobs.running += 1
    if jobs.running == 1:
        jobs.idle = trio.Event()
    trio.lowlevel.spawn_system_task(_run_job, jobs, what, job, key, timeout,
                                    name=f"file job: {what}")


async def _run_job(jobs: _Jobs, what: str, job: Callable[[], None], key: Hashable,
                   seconds: float) -> None:
    lock = None
    if key is not None:
        lock = jobs.locks.get(key)
        if lock is None:
            lock = jobs.locks[key] = trio.Lock()
    try:
        with trio.move_on_after(seconds) as scope:
            if lock is not None:
                await lock.acquire()
            try:
                await trio.to_thread.run_sync(_run_logged, what, job,
                                              abandon_on_cancel=True, limiter=jobs.limiter)
            finally:
                if lock is not None:
                    lock.release()
        if scope.cancelled_caught:
            log.error("%s: gave up after %g s: the file system does not answer (its "
                      "thread is left to finish)", what, seconds)
    finally:
        if (lock is not None and not lock.locked()
                and not lock.statistics().tasks_waiting):
            jobs.locks.pop(key, None)
        jobs.running -= 1
        if jobs.running == 0:
            jobs.idle.set()


def _run_logged(what: str, job: Callable[[], None]) -> None:
    try:
        job()
    except (OSError, FileRefused) as exc:
        log.error("%s: %s", what, exc)
    except Exception:
        log.exception("%s failed", what)


async def drain() -> None:
    """Wait until every file job of this trio run has ended (or was abandoned)."""
    await _jobs().idle.wait()
