"""Child side of :func:`supervisor.spawn.spawn_filtered` (runs in its own interpreter).

Installs the seccomp program it is given, reports the listener fd number to the parent,
waits until the parent holds its own copy, closes ours and execs the command.

Once the filter is in place, every later system call here may be notified. That is safe
as long as ``write`` is not: the parent takes the listener with pidfd_getfd without our
help and hands it to a supervisor, which then answers the rest (``read``, ``close``,
``execve`` ...). This is why a notify profile must never notify ``write`` (runc has the
same rule for the same reason).
"""

from __future__ import annotations

import contextlib
import os
import sys

from supervisor import abi, bpf


def main(argv: list[str]) -> None:
    program_fd, flags, report_fd, ack_fd = (int(x) for x in argv[:4])
    path, cmd = argv[5], argv[6:]
    try:
        program = os.pread(program_fd, os.fstat(program_fd).st_size, 0)
        os.close(program_fd)
        bpf.set_no_new_privs()
        listener = bpf.install_filter(program, flags)
        if not flags & abi.SECCOMP_FILTER_FLAG_NEW_LISTENER:
            listener = -1  # the kernel returned 0, which is not a listener fd
    except Exception as exc:  # reported to the parent, which raises it
        os.write(report_fd, f"ERR {exc}\n".encode())
        os._exit(126)
    os.write(report_fd, f"OK {listener}\n".encode())
    # Any outcome of this read means the parent holds the listener: even a notified read
    # can only have been answered by a supervisor that got it from the parent.
    with contextlib.suppress(OSError):
        os.read(ack_fd, 1)
    for fd in (listener, report_fd, ack_fd):
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
    try:
        os.execv(path, [path, *cmd[1:]] if cmd else [path])
    except OSError as exc:
        sys.stderr.write(f"seccomp-supervisor: cannot execute {path}: {exc.strerror}\n")
        os._exit(127)


if __name__ == "__main__":
    main(sys.argv[1:])
