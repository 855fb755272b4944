"""Turn a pyseccomp filter into a BPF program and install it with seccomp(2).

Loading the program ourselves (instead of ``SyscallFilter.load``) lets us choose the filter
flags, above all ``NEW_LISTENER`` and ``WAIT_KILLABLE_RECV`` that libseccomp 2.5 cannot
set, and get the listener fd back from the kernel.

Kernel rules for the flags (``kernel/seccomp.c`` ``seccomp_set_mode_filter``, checked on
this kernel): an unknown bit is EINVAL; ``TSYNC`` with ``NEW_LISTENER`` needs
``TSYNC_ESRCH`` (else a positive return could be a listener or a thread that failed to
sync), EINVAL; ``WAIT_KILLABLE_RECV`` without ``NEW_LISTENER`` is EINVAL. All three checks
come before the program is copied from user memory, so ``seccomp(SET_MODE_FILTER, bits,
NULL)`` answers EFAULT for flags the kernel accepts and EINVAL for the others without
installing anything: that is how :func:`supported_filter_flags` probes.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
from collections.abc import Mapping
from typing import Any, Final

from . import abi
from .errors import KernelMismatchError, SupervisorError

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.restype = ctypes.c_int

PR_SET_NO_NEW_PRIVS = 38
BPF_INSTRUCTION_SIZE = 8
# The kernel refuses programs longer than BPF_MAXINSNS.
BPF_MAXINSNS: Final = 4096


# seccomp(2) filter flag bits -> the names the runtime-spec and the kernel use.
FILTER_FLAG_NAMES: Final[Mapping[int, str]] = {
    abi.SECCOMP_FILTER_FLAG_TSYNC: "SECCOMP_FILTER_FLAG_TSYNC",
    abi.SECCOMP_FILTER_FLAG_LOG: "SECCOMP_FILTER_FLAG_LOG",
    abi.SECCOMP_FILTER_FLAG_SPEC_ALLOW: "SECCOMP_FILTER_FLAG_SPEC_ALLOW",
    abi.SECCOMP_FILTER_FLAG_NEW_LISTENER: "SECCOMP_FILTER_FLAG_NEW_LISTENER",
    abi.SECCOMP_FILTER_FLAG_TSYNC_ESRCH: "SECCOMP_FILTER_FLAG_TSYNC_ESRCH",
    abi.SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV: "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV",
}
# The Linux release that added each flag, for messages.
FILTER_FLAG_SINCE: Final[Mapping[int, str]] = {
    abi.SECCOMP_FILTER_FLAG_TSYNC: "3.17",
    abi.SECCOMP_FILTER_FLAG_LOG: "4.14",
    abi.SECCOMP_FILTER_FLAG_SPEC_ALLOW: "4.17",
    abi.SECCOMP_FILTER_FLAG_NEW_LISTENER: "5.0",
    abi.SECCOMP_FILTER_FLAG_TSYNC_ESRCH: "5.7",
    abi.SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV: "5.19",
}


class FilterFlagError(SupervisorError):
    """A set of filter flags this kernel refuses; the message names the flag(s) and why."""


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]


def flag_names(bits: int) -> list[str]:
    """The names of the flag bits in ``bits``; an unknown bit is named ``bit 0x…``."""
    names = []
    for bit in range(64):
        if bits & (1 << bit):
            names.append(FILTER_FLAG_NAMES.get(1 << bit, f"bit {1 << bit:#x}"))
    return names


def describe_flags(bits: int) -> str:
    """``NEW_LISTENER|WAIT_KILLABLE_RECV`` (short names), or ``0``."""
    return "|".join(n.removeprefix("SECCOMP_FILTER_FLAG_") for n in flag_names(bits)) or "0"


def flag_problems(bits: int, supported: int) -> list[str]:
    """Why the kernel would refuse the filter flags ``bits``, given the flag bits it
    ``supported`` (see :func:`supported_filter_flags`); empty if it accepts them. Pure."""
    problems = []
    for bit in range(64):
        flag = 1 << bit
        if bits & flag and not supported & flag:
            if flag in FILTER_FLAG_NAMES:
                problems.append(
                    f"{FILTER_FLAG_NAMES[flag]} is not supported by this kernel (it needs "
                    f"Linux {FILTER_FLAG_SINCE[flag]} or later)")
            else:
                problems.append(f"filter flag bit {flag:#x} is unknown to this kernel")
    tsync_listener = abi.SECCOMP_FILTER_FLAG_TSYNC | abi.SECCOMP_FILTER_FLAG_NEW_LISTENER
    if bits & tsync_listener == tsync_listener and not bits & abi.SECCOMP_FILTER_FLAG_TSYNC_ESRCH:
        problems.append(
            "SECCOMP_FILTER_FLAG_TSYNC with SECCOMP_FILTER_FLAG_NEW_LISTENER needs "
            "SECCOMP_FILTER_FLAG_TSYNC_ESRCH (the kernel could not tell a listener fd from "
            "the id of a thread that failed to synchronise)")
    if (bits & abi.SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
            and not bits & abi.SECCOMP_FILTER_FLAG_NEW_LISTENER):
        problems.append(
            "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV needs SECCOMP_FILTER_FLAG_NEW_LISTENER "
            "(it only changes how a notified call waits)")
    return problems


def _probe(bits: int) -> int:
    """The errno of seccomp(SET_MODE_FILTER, bits, NULL): EFAULT = flags accepted."""
    rc = _libc.syscall(abi.SYS_SECCOMP, abi.SECCOMP_SET_MODE_FILTER, bits, None)
    if rc >= 0:  # cannot happen: NULL is never a readable program
        raise KernelMismatchError("seccomp(SET_MODE_FILTER, NULL) succeeded")
    return ctypes.get_errno()


@functools.cache
def supported_filter_flags() -> int:
    """The filter flag bits this kernel accepts, probed once (nothing is installed).

    Each known flag is probed alone (``WAIT_KILLABLE_RECV`` with ``NEW_LISTENER``, which
    it needs). Raises :class:`KernelMismatchError` if the kernel has no seccomp filters.
    """
    if _probe(0) != errno.EFAULT:
        raise KernelMismatchError(
            "seccomp(SECCOMP_SET_MODE_FILTER) is not available: this kernel has no seccomp "
            "filters (CONFIG_SECCOMP_FILTER)")
    supported = 0
    for flag in FILTER_FLAG_NAMES:
        probe = flag
        if flag == abi.SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV:
            probe |= abi.SECCOMP_FILTER_FLAG_NEW_LISTENER
        if _probe(probe) == errno.EFAULT:
            supported |= flag
    return supported


def check_filter_flags(bits: int) -> None:
    """Raise :class:`FilterFlagError` naming each flag of ``bits`` this kernel would refuse,
    and why (see :func:`flag_problems`)."""
    problems = flag_problems(bits, supported_filter_flags())
    if problems:
        raise FilterFlagError("; ".join(problems))


def export_program(flt: Any) -> bytes:
    """The raw BPF program (struct sock_filter[]) of a ``pyseccomp.SyscallFilter``."""
    fd = os.memfd_create("seccomp-bpf", os.MFD_CLOEXEC)
    try:
        with open(fd, "wb", closefd=False) as f:
            flt.export_bpf(f)
        size = os.fstat(fd).st_size
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)


def set_no_new_privs() -> None:
    """prctl(PR_SET_NO_NEW_PRIVS): required to install a filter without CAP_SYS_ADMIN."""
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(err)}")


def install_filter(program: bytes, flags: int) -> int:
    """Install ``program`` on the calling thread (all threads with ``TSYNC``); returns the
    listener fd when ``flags`` holds ``NEW_LISTENER`` (O_CLOEXEC is set by the kernel),
    else 0.

    Raises ValueError for a program that is empty, longer than :data:`BPF_MAXINSNS` or
    not whole instructions, and OSError if the kernel refuses: the message names the
    flags, and for EINVAL the flag problems :func:`flag_problems` finds. With ``TSYNC``
    and no ``TSYNC_ESRCH`` a thread that cannot be synchronised is reported as OSError
    ESRCH naming its id (the kernel returns the id and installs nothing).
    """
    if len(program) % BPF_INSTRUCTION_SIZE:
        raise ValueError("BPF program length is not a multiple of 8")
    count = len(program) // BPF_INSTRUCTION_SIZE
    if not 0 < count <= BPF_MAXINSNS:
        raise ValueError(f"BPF program has {count} instructions (kernel limit {BPF_MAXINSNS})")
    prog = _SockFprog(count, program)
    rc = _libc.syscall(
        abi.SYS_SECCOMP, abi.SECCOMP_SET_MODE_FILTER, flags, ctypes.byref(prog)
    )
    call = f"seccomp(SET_MODE_FILTER, {describe_flags(flags)})"
    if rc < 0:
        err = ctypes.get_errno()
        why = ""
        if err == errno.EINVAL:
            problems = flag_problems(flags, supported_filter_flags())
            why = f": {'; '.join(problems)}" if problems else ": the kernel refused the program"
        raise OSError(err, f"{call}: {os.strerror(err)}{why}")
    if rc > 0 and flags & abi.SECCOMP_FILTER_FLAG_TSYNC and not (
            flags & abi.SECCOMP_FILTER_FLAG_NEW_LISTENER):
        raise OSError(errno.ESRCH, f"{call}: thread {rc} could not be synchronised; "
                                   "no filter was installed")
    return int(rc)


def notif_sizes() -> tuple[int, int, int]:
    """seccomp(SECCOMP_GET_NOTIF_SIZES): (seccomp_notif, seccomp_notif_resp, seccomp_data)."""
    sizes = (ctypes.c_uint16 * 3)()
    if _libc.syscall(abi.SYS_SECCOMP, abi.SECCOMP_GET_NOTIF_SIZES, 0, sizes) != 0:
        err = ctypes.get_errno()
        raise KernelMismatchError(
            f"seccomp(SECCOMP_GET_NOTIF_SIZES) failed: {os.strerror(err)}; this kernel has no "
            "seccomp user notification (Linux >= 5.0 with CONFIG_SECCOMP_FILTER is needed)"
        )
    return sizes[0], sizes[1], sizes[2]


def check_kernel_abi() -> None:
    """Refuse to run on a kernel whose notification structs differ from ours."""
    ours = (abi.NOTIF_SIZE, abi.NOTIF_RESP_SIZE, abi.SECCOMP_DATA_SIZE)
    theirs = notif_sizes()
    if theirs != ours:
        raise KernelMismatchError(
            f"kernel seccomp notification sizes {theirs} differ from the ones this supervisor "
            f"packs {ours} (seccomp_notif, seccomp_notif_resp, seccomp_data)"
        )


def pidfd_getfd(pidfd: int, target_fd: int) -> int:
    """Duplicate fd ``target_fd`` of the process behind ``pidfd`` into ours (O_CLOEXEC)."""
    rc = _libc.syscall(abi.SYS_PIDFD_GETFD, pidfd, target_fd, 0)
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pidfd_getfd({target_fd}): {os.strerror(err)}")
    return int(rc)
