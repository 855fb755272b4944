"""Turn a pyseccomp filter into a BPF program and install it with seccomp(2).

Loading the program ourselves (instead of ``SyscallFilter.load``) lets us choose the filter
flags, above all ``NEW_LISTENER``, and get the listener fd back from the kernel.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

from . import abi
from .errors import KernelMismatchError

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.restype = ctypes.c_int

PR_SET_NO_NEW_PRIVS = 38
BPF_INSTRUCTION_SIZE = 8
# The kernel refuses programs longer than BPF_MAXINSNS.
BPF_MAXINSNS = 4096


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]


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
    """Install ``program`` on the calling thread; returns the listener fd when ``flags``
    holds ``NEW_LISTENER`` (O_CLOEXEC is set by the kernel), else 0."""
    if len(program) % BPF_INSTRUCTION_SIZE:
        raise ValueError("BPF program length is not a multiple of 8")
    count = len(program) // BPF_INSTRUCTION_SIZE
    if not 0 < count <= BPF_MAXINSNS:
        raise ValueError(f"BPF program has {count} instructions (kernel limit {BPF_MAXINSNS})")
    prog = _SockFprog(count, program)
    rc = _libc.syscall(
        abi.SYS_SECCOMP, abi.SECCOMP_SET_MODE_FILTER, flags, ctypes.byref(prog)
    )
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp(SET_MODE_FILTER, flags={flags:#x}): {os.strerror(err)}")
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
