"""The seccomp user-notification kernel ABI (x86_64, little-endian).

Constants, struct layouts and ioctl numbers only; pack and unpack are pure functions.
Every number here was checked on the target kernel (see DESIGN.md §4); the layout sizes
are checked again at start by :func:`supervisor.bpf.check_kernel_abi`.
"""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

# struct seccomp_notif { u64 id; u32 pid; u32 flags; struct seccomp_data data; }
# struct seccomp_data  { s32 nr; u32 arch; u64 instruction_pointer; u64 args[6]; }
NOTIF: Final = struct.Struct("<QIIiIQ6Q")
# The same bytes in the two parts the hot loop reads: id, pid, nr and arch (skipping flags,
# always 0 in the current kernel per seccomp_unotify(2), and the instruction pointer),
# then args.
# Unpacking only these makes four fewer integer objects per notification.
NOTIF_HEAD: Final = struct.Struct("<QI4xiI")
NOTIF_ARGS: Final = struct.Struct("<6Q")
NOTIF_ARGS_OFFSET: Final = 32
# struct seccomp_notif_resp { u64 id; s64 val; s32 error; u32 flags; }
NOTIF_RESP: Final = struct.Struct("<QqiI")
# struct seccomp_notif_addfd { u64 id; u32 flags; u32 srcfd; u32 newfd; u32 newfd_flags; }
NOTIF_ADDFD: Final = struct.Struct("<QIIII")
# struct seccomp_data, as the kernel reports its size in SECCOMP_GET_NOTIF_SIZES.
SECCOMP_DATA_SIZE: Final = 64

NOTIF_SIZE: Final = NOTIF.size  # 80
NOTIF_RESP_SIZE: Final = NOTIF_RESP.size  # 24
NOTIF_ADDFD_SIZE: Final = NOTIF_ADDFD.size  # 24

# seccomp(2) operations and filter flags.
SYS_SECCOMP: Final = 317
SYS_PIDFD_GETFD: Final = 438
SECCOMP_SET_MODE_FILTER: Final = 1
SECCOMP_GET_NOTIF_SIZES: Final = 3
SECCOMP_FILTER_FLAG_TSYNC: Final = 1
SECCOMP_FILTER_FLAG_LOG: Final = 2
SECCOMP_FILTER_FLAG_SPEC_ALLOW: Final = 4
SECCOMP_FILTER_FLAG_NEW_LISTENER: Final = 8
SECCOMP_FILTER_FLAG_TSYNC_ESRCH: Final = 16
SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV: Final = 32

# ioctls on the listener fd: _IOWR('!', 0, seccomp_notif) and friends.
IOCTL_NOTIF_RECV: Final = 0xC0502100
IOCTL_NOTIF_SEND: Final = 0xC0182101
IOCTL_NOTIF_ID_VALID: Final = 0x40082102
IOCTL_NOTIF_ADDFD: Final = 0x40182103
IOCTL_NOTIF_SET_FLAGS: Final = 0x40082104  # argument passed by value, Linux >= 6.6

USER_NOTIF_FLAG_CONTINUE: Final = 1
USER_NOTIF_FD_SYNC_WAKE_UP: Final = 1
ADDFD_FLAG_SETFD: Final = 1
ADDFD_FLAG_SEND: Final = 2

# AUDIT_ARCH_* values reported in seccomp_data.arch.
AUDIT_ARCH_X86_64: Final = 0xC000003E
AUDIT_ARCH_I386: Final = 0x40000003
# x32 system calls arrive with arch X86_64 and this bit set in nr.
X32_SYSCALL_BIT: Final = 0x40000000

# Argument decoding. seccomp_data.args holds whole 64-bit registers, but the kernel's
# entry points (arch/x86/include/asm/syscall_wrapper.h) use only part of them, and a
# decision must be made on the bits the kernel uses (checked on this kernel):
# * i386 calls (int $0x80, also from a 64-bit process) take (unsigned int)regs->bx...:
#   every argument, pointers included, is the low 32 bits; seccomp_data.args still holds
#   the full 64-bit register, upper half and all.
# * x86_64 and x32 calls take the full registers, and the syscall wrappers cast each one
#   to its C type: an int / unsigned int is the low 32 bits, a umode_t the low 16, a
#   pointer or long all 64 (x32 calls run the 64-bit entry points, or compat ones that
#   keep `__user *` arguments 64 bits wide).
U32_MASK: Final = 0xFFFF_FFFF
U64_MASK: Final = 0xFFFF_FFFF_FFFF_FFFF
UMODE_MASK: Final = 0xFFFF
# Pointer (and unsigned long) width per arch name (supervisor.syscalls.arch_name).
POINTER_MASKS: Final = {"x86_64": U64_MASK, "x32": U64_MASK, "x86": U32_MASK}


def arg_u32(raw: int) -> int:
    """An ``unsigned int`` argument as the kernel reads it: the low 32 bits."""
    return raw & U32_MASK


def arg_s32(raw: int) -> int:
    """An ``int`` argument (an fd, AT_FDCWD = -100) as the kernel reads it."""
    value = raw & U32_MASK
    return value - (1 << 32) if value & 0x8000_0000 else value


def arg_umode(raw: int) -> int:
    """A ``umode_t`` argument (mode of open, chmod, mknod...): the low 16 bits."""
    return raw & UMODE_MASK


def arg_pointer(raw: int, arch: str) -> int:
    """The address a pointer (or ``unsigned long``) argument of a call made in ``arch``
    holds for the kernel. Raises ValueError for an arch whose width is not known."""
    mask = POINTER_MASKS.get(arch)
    if mask is None:
        raise ValueError(f"cannot decode the arguments of a call in arch {arch}")
    return raw & mask


# Errno values from 512 up are kernel-internal (ERESTARTSYS...) and must never reach a task.
MAX_ERRNO_EXCLUSIVE: Final = 512
# Return values in -4095..-1 are read by libc as errors; a "value" there is really a deny.
MAX_ERRNO_RANGE: Final = 4095


class RawNotification(NamedTuple):
    """One struct seccomp_notif, unpacked."""

    id: int
    pid: int
    flags: int
    nr: int
    arch: int
    ip: int
    args: tuple[int, int, int, int, int, int]


def unpack_notification(buf: bytes | bytearray | memoryview) -> RawNotification:
    """Unpack an 80-byte struct seccomp_notif."""
    fields = NOTIF.unpack(buf)
    args = fields[6:12]
    return RawNotification(fields[0], fields[1], fields[2], fields[3], fields[4], fields[5], args)


def pack_notification(raw: RawNotification) -> bytes:
    """Pack a struct seccomp_notif (used by tests and fakes of pure logic)."""
    return NOTIF.pack(raw.id, raw.pid, raw.flags, raw.nr, raw.arch, raw.ip, *raw.args)


def pack_response(notif_id: int, val: int, error: int, flags: int) -> bytes:
    """Pack a struct seccomp_notif_resp.

    ``error`` is a *negative* errno or 0; when non-zero the kernel returns it and ignores
    ``val``. CONTINUE needs ``val == error == 0``.
    """
    return NOTIF_RESP.pack(notif_id, val, error, flags)


def pack_addfd(notif_id: int, srcfd: int, *, cloexec: bool, send: bool) -> bytes:
    """Pack a struct seccomp_notif_addfd that installs ``srcfd`` at any free number.

    With ``send`` the kernel also answers the notification with the new fd number as the
    system call's return value, atomically.
    """
    flags = ADDFD_FLAG_SEND if send else 0
    newfd_flags = 0o2000000 if cloexec else 0  # O_CLOEXEC, the only flag the kernel takes
    return NOTIF_ADDFD.pack(notif_id, flags, srcfd, 0, newfd_flags)


def pack_id(notif_id: int) -> bytes:
    """The u64 argument of SECCOMP_IOCTL_NOTIF_ID_VALID."""
    return struct.pack("<Q", notif_id)
