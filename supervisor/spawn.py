"""Start a command under a seccomp filter and take its listener fd.

The parent never installs the filter itself: a helper interpreter does it, then the parent
duplicates the listener out of it with pidfd_getfd. Nothing here blocks on the child's
filtered system calls, so a supervisor (this process or another) can answer them.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import abi, bpf

_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)
_BOOTSTRAP = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "from supervisor._filtered_exec import main; main(sys.argv[1:])"
)


class SpawnError(OSError):
    """The command could not be started under its filter."""


@dataclass
class FilteredChild:
    """A running command under a filter. ``listener_fd`` is owned by the caller (-1 once
    handed over or closed)."""

    process: subprocess.Popen[bytes]
    listener_fd: int
    pid: int = field(init=False)

    def __post_init__(self) -> None:
        self.pid = self.process.pid

    def take_listener(self) -> int:
        """Transfer ownership of the listener fd to the caller."""
        fd, self.listener_fd = self.listener_fd, -1
        return fd

    def close(self) -> None:
        if self.listener_fd >= 0:
            os.close(self.listener_fd)
            self.listener_fd = -1


def spawn_filtered(
    argv: list[str],
    program: bytes,
    *,
    flags: int = abi.SECCOMP_FILTER_FLAG_NEW_LISTENER,
    timeout: float = 10.0,
    env: dict[str, str] | None = None,
    stdin: int | None = None,
    stdout: int | None = None,
    stderr: int | None = None,
) -> FilteredChild:
    """Run ``argv`` with ``program`` installed (with ``flags``) just before it is executed.

    The child's listener is returned only when ``flags`` holds NEW_LISTENER (else -1).

    Raises :class:`SpawnError` if the command is not found, ``flags`` holds a flag this
    kernel refuses (checked before anything starts; the message names the flag), the
    program is not 1..4096 whole instructions, or the kernel refuses the filter. The
    returned child is running; its filtered calls wait for a supervisor.
    """
    if not argv:
        raise SpawnError("no command given")
    try:
        bpf.check_filter_flags(flags)
    except bpf.FilterFlagError as exc:
        raise SpawnError(f"filter flags {bpf.describe_flags(flags)}: {exc}") from exc
    count, rest = divmod(len(program), bpf.BPF_INSTRUCTION_SIZE)
    if rest or not 0 < count <= bpf.BPF_MAXINSNS:
        raise SpawnError(f"the BPF program is {len(program)} bytes: the kernel takes 1 to "
                         f"{bpf.BPF_MAXINSNS} instructions of {bpf.BPF_INSTRUCTION_SIZE}")
    path = argv[0] if "/" in argv[0] else shutil.which(argv[0])
    if path is None:
        raise SpawnError(f"{argv[0]}: command not found")
    program_fd = os.memfd_create("seccomp-program", 0)
    report_r, report_w = os.pipe()
    ack_r, ack_w = os.pipe()
    ours = [report_r, ack_w]
    theirs = [program_fd, report_w, ack_r]
    try:
        os.write(program_fd, program)
        process = subprocess.Popen(
            [sys.executable, "-I", "-c", _BOOTSTRAP, _PACKAGE_PARENT,
             str(program_fd), str(flags), str(report_w), str(ack_r), "--", path, *argv],
            pass_fds=theirs, env=env, stdin=stdin, stdout=stdout, stderr=stderr,
        )
    except BaseException:
        for fd in ours + theirs:
            os.close(fd)
        raise
    for fd in theirs:
        os.close(fd)
    listener = -1
    try:
        report = _read_report(report_r, timeout)
        if not report.startswith("OK "):
            process.wait()
            raise SpawnError(report.removeprefix("ERR ") or "filter helper exited early")
        child_fd = int(report[3:])
        if child_fd >= 0:
            pidfd = os.pidfd_open(process.pid)
            try:
                listener = bpf.pidfd_getfd(pidfd, child_fd)
            finally:
                os.close(pidfd)
        os.write(ack_w, b"k")
        return FilteredChild(process, listener)
    except BaseException:
        if listener >= 0:
            os.close(listener)
        if process.poll() is None:
            process.kill()
            process.wait()
        raise
    finally:
        os.close(report_r)
        os.close(ack_w)


def _read_report(fd: int, timeout: float) -> str:
    data = b""
    while not data.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            raise SpawnError("timed out waiting for the filter helper")
        chunk = os.read(fd, 512)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()
