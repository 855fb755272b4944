"""Attacks on how policies decode arguments, and on what `hardening` watches.

Every test runs the attacker's calls for real, in a forked child under a notify filter
(:func:`supervisor.testing.run_policy`), and checks what the kernel did.

Kernel facts these tests rely on (checked on Linux 6.18 x86_64 with an experiment, and in
``arch/x86/include/asm/syscall_wrapper.h``):

* A 64-bit process can make an i386 call with ``int $0x80``. ``seccomp_data.arch`` is
  AUDIT_ARCH_I386 and ``seccomp_data.args`` holds the *full* 64-bit registers (rbx,
  rcx...), but the i386 entry points read ``(unsigned int)regs->bx``: the kernel uses the
  low 32 bits, whatever the upper half holds.
* In every ABI an ``int``/``unsigned int`` argument is the low 32 bits of its register
  and a ``umode_t`` the low 16; the rest is garbage the kernel ignores.
* x32 calls (``nr | 0x40000000`` with the 64-bit ``syscall`` instruction) are notified
  even on a kernel built without x32, which then fails them with ENOSYS.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from supervisor.policy import (
    Container,
    Decision,
    Notification,
    PolicySet,
    allow,
    deny,
)
from supervisor.syscalls import syscall_number
from supervisor.testing import load, run_policy

ROOT = Path(__file__).resolve().parent.parent
HARDENING = ROOT / "policies" / "hardening.py"
PATH_GUARD = ROOT / "policies" / "path_guard.py"
DEVICES = ROOT / "policies" / "devices.py"

GARBAGE = 0xDEAD_BEEF << 32  # an upper half the kernel ignores for a 32-bit argument
SETUID = 0o4755

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]

MAP_PRIVATE_ANONYMOUS = 0x22
MAP_32BIT = 0x40  # x86_64: below 2 GiB
MAP_FIXED_NOREPLACE = 0x100000
O_TMPFILE_BIT = 0o20000000  # __O_TMPFILE: with O_CREAT, the bits that make open use its mode

INT80_C = r"""
/* An i386 system call from a 64-bit process: int $0x80 takes the number in eax and
 * the arguments in ebx, ecx, edx, but we load the full 64-bit registers. */
long int80(long nr, unsigned long b, unsigned long c, unsigned long d)
{
    long ret;
    __asm__ volatile ("int $0x80"
                      : "=a"(ret)
                      : "a"(nr), "b"(b), "c"(c), "d"(d)
                      : "memory", "r8", "r9", "r10", "r11");
    return ret;
}
"""

Int80 = Callable[[int, int, int, int], int]


@pytest.fixture(scope="module")
def int80(tmp_path_factory: pytest.TempPathFactory) -> Int80:
    """``int80(nr, ebx, ecx, edx)``: the i386 call ``nr`` with 64-bit register values;
    returns the raw result (-errno on failure)."""
    directory = tmp_path_factory.mktemp("int80")
    (directory / "int80.c").write_text(INT80_C)
    library = directory / "int80.so"
    subprocess.run(["gcc", "-O1", "-shared", "-fPIC", "-o", str(library),
                    str(directory / "int80.c")], check=True, capture_output=True, timeout=60)
    func = ctypes.CDLL(str(library)).int80
    func.restype = ctypes.c_long
    func.argtypes = [ctypes.c_long, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    if func(i386("getpid"), 0, 0, 0) != os.getpid():
        pytest.skip("this kernel runs no i386 code (CONFIG_IA32_EMULATION off or "
                    "ia32_emulation=0)")

    def call(nr: int, b: int, c: int, d: int) -> int:
        return int(func(nr, b, c, d))

    return call


def i386(name: str) -> int:
    nr = syscall_number(name, "x86")
    assert nr is not None
    return nr


def x86_64(name: str) -> int:
    nr = syscall_number(name, "x86_64")
    assert nr is not None
    return nr


def checked(rc: int, what: str) -> int:
    """A raw -errno result as Python would report it."""
    if rc < 0:
        raise OSError(-rc, f"{what}: {os.strerror(-rc)}")
    return rc


def raw_syscall(nr: int, *args: int) -> int:
    """``syscall(nr, args...)`` with every argument a full 64-bit register value."""
    rc = libc.syscall(ctypes.c_long(nr), *(ctypes.c_ulong(a) for a in args))
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(rc)


def decoy_pair(real: bytes, decoy: bytes) -> int:
    """Map a page below 4 GiB holding ``real`` and the page 4 GiB above it holding
    ``decoy`` (both NUL-terminated); return the low address. ``(1 << 32) | low`` names
    the decoy for a reader of 64-bit addresses, the real one for an i386 call."""
    for _ in range(32):
        low = libc.mmap(None, mmap.PAGESIZE, 3, MAP_PRIVATE_ANONYMOUS | MAP_32BIT, -1, 0)
        assert low not in (None, ctypes.c_void_p(-1).value)
        high = libc.mmap(low + (1 << 32), mmap.PAGESIZE, 3,
                         MAP_PRIVATE_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)
        if high == low + (1 << 32):
            ctypes.memmove(low, real + b"\0", len(real) + 1)
            ctypes.memmove(high, decoy + b"\0", len(decoy) + 1)
            return int(low)
    raise AssertionError("no free page 4 GiB above a MAP_32BIT page")


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    guarded = tmp_path / "guarded"
    free = tmp_path / "free"
    guarded.mkdir()
    free.mkdir()
    return guarded, free


# --- item 4: arguments decoded per ABI ---------------------------------------------------

def test_i386_path_pointer_with_bit_32_set_is_read_where_the_kernel_reads(
        dirs: tuple[Path, Path], int80: Int80) -> None:
    """The daemon read the decoy at the 64-bit value, the kernel made the guarded one."""
    guarded, free = dirs
    real, decoy = guarded / "sub", free / "sub"

    def attack() -> int:
        low = decoy_pair(bytes(real), bytes(decoy))
        return checked(int80(i386("mkdir"), (1 << 32) | low, GARBAGE | 0o755, 0), "mkdir")

    trial = run_policy(load(PATH_GUARD, prefixes=[str(guarded)]), attack)
    assert trial.errno == errno.EACCES, trial
    assert trial.decided("mkdir") == ["deny"]
    assert str(real) in trial.decisions[-1].decision.reason
    assert not real.exists() and not decoy.exists()


def test_i386_memory_reads_at_an_undecoded_register_are_refused(
        dirs: tuple[Path, Path], int80: Int80) -> None:
    """A policy that reads at the raw register (``n.args[0]``) gets EFAULT, not the
    decoy: no memory read of an i386 call starts at 4 GiB or above."""
    guarded, free = dirs
    real, decoy = guarded / "sub", free / "sub"
    naive = PolicySet("naive")

    @naive.on("mkdir")
    async def by_raw_register(n: Notification) -> Decision:
        path = await n.read_cstring(n.args[0])
        if path.startswith(bytes(guarded)):
            return deny(errno.EACCES, reason="guarded")
        return allow(unchecked=True, reason=path.decode())

    def attack() -> int:
        low = decoy_pair(bytes(real), bytes(decoy))
        return checked(int80(i386("mkdir"), (1 << 32) | low, 0o755, 0), "mkdir")

    trial = run_policy(naive, attack)
    assert trial.errno == errno.EFAULT, trial
    assert trial.decisions[0].error == "memory"
    assert not real.exists() and not decoy.exists()


def test_accessors_decode_each_abi_as_the_kernel_does() -> None:
    def notification(arch: str, *args: int) -> Notification:
        return Notification(id=1, pid=0, nr=0, arch=arch, syscall="openat",
                            args=(*args, *[0] * (6 - len(args))),
                            container=Container(id="c"))

    high = (1 << 32) | 0x1000
    fd_cwd = GARBAGE | (-100 & 0xFFFF_FFFF)
    for arch in ("x86_64", "x32", "x86"):
        n = notification(arch, fd_cwd, high, GARBAGE | os.O_CREAT, GARBAGE | 0x1_0000 | SETUID)
        assert n.fd(0) == n.int32(0) == -100
        assert n.uint32(0) == 0xFFFF_FF9C
        assert n.flags(2) == os.O_CREAT
        assert n.mode(3) == SETUID  # umode_t: 16 bits
        assert n.pointer(1) == n.ulong(1) == (0x1000 if arch == "x86" else high)
    n = notification("0x28", 1)
    with pytest.raises(ValueError):
        n.pointer(0)
    assert n.fd(0) == 1  # an int is 32 bits in every Linux ABI
    for bad in (-1, 6, True):
        with pytest.raises(ValueError):
            n.mode(bad)


def test_i386_emulated_mknod_uses_the_path_the_kernel_would(
        tmp_path: Path, int80: Int80) -> None:
    """devices creates the node itself: at the address the kernel would read, not at
    the decoy 4 GiB above it."""
    real, decoy = tmp_path / "null", tmp_path / "decoy"

    def attack() -> int:
        low = decoy_pair(bytes(real), bytes(decoy))
        return checked(int80(i386("mknod"), (1 << 32) | low,
                             GARBAGE | stat.S_IFCHR | 0o666,
                             GARBAGE | os.makedev(1, 3)), "mknod")

    trial = run_policy(load(DEVICES), attack)
    assert trial.errno == 0, trial
    assert trial.decided("mknod") == ["returns"]
    assert not decoy.exists()
    assert stat.S_ISCHR(real.lstat().st_mode) and real.lstat().st_rdev == os.makedev(1, 3)
