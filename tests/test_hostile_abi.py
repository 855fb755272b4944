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
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from supervisor import abi
from supervisor.config import load_config
from supervisor.emulate import signed_fd
from supervisor.plugins import load_policies
from supervisor.policy import (
    Container,
    Decision,
    Notification,
    PolicySet,
    allow,
    deny,
)
from supervisor.router import route_for
from supervisor.syscalls import syscall_number
from supervisor.testing import load, run_policy

# Hostile register values for every ABI go through the compiled loop's fast path (its
# route lookup, Notification and answer) as well as the pure-Python one.
pytestmark = pytest.mark.usefixtures("hot_loop")

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


def test_x32_path_pointers_are_read_whole(dirs: tuple[Path, Path]) -> None:
    """x32 calls run the 64-bit entry points (``__x64_sys_mkdir``), which take the
    whole register as the pointer: reading it cut to 32 bits, as for i386, would read
    the wrong string. This kernel has no x32 (it fails the call with ENOSYS after the
    policy let it through), so the test checks what the policy read."""
    guarded, free = dirs

    def attack() -> int:
        low = decoy_pair(bytes(free / "low"), bytes(guarded / "high"))
        return raw_syscall(abi.X32_SYSCALL_BIT | x86_64("mkdir"), (1 << 32) | low, 0o755)

    trial = run_policy(load(PATH_GUARD, prefixes=[str(guarded)]), attack)
    assert trial.errno == errno.EACCES, trial
    [seen] = trial.decisions
    assert seen.syscall == "mkdir" and str(guarded / "high") in seen.decision.reason
    assert not (guarded / "high").exists() and not (free / "low").exists()


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
    # The accessors inline abi.arg_*, the decoders emulate's helpers use: the same bits.
    samples = (0, 1, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, GARBAGE | 0o104755,
               0xFFFF_FFFF_FFFF_FF9C, 0xFFFF_FFFF_FFFF_FFFF)
    for arch in ("x86_64", "x32", "x86"):
        n = notification(arch, *samples[:6])
        n2 = notification(arch, *samples[2:])
        for m in (n, n2):
            for i, raw in enumerate(m.args):
                assert m.int32(i) == m.fd(i) == abi.arg_s32(raw) == signed_fd(raw)
                assert m.uint32(i) == m.flags(i) == abi.arg_u32(raw)
                assert m.mode(i) == abi.arg_umode(raw)
                assert m.pointer(i) == abi.arg_pointer(raw, arch)
    n = notification("0x28", 1)
    with pytest.raises(ValueError):
        n.pointer(0)
    assert n.fd(0) == 1  # an int is 32 bits in every Linux ABI
    for bad in (-1, 6):
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


def test_x86_64_32_bit_arguments_with_garbage_upper_halves(tmp_path: Path) -> None:
    """int flags and umode_t mode with their upper halves set: decided on the bits the
    kernel uses, exactly (allow, not unchecked)."""
    setuid, plain, victim = tmp_path / "setuid", tmp_path / "plain", tmp_path / "victim"
    victim.write_text("")
    victim.chmod(0o644)
    creating = GARBAGE | os.O_CREAT | os.O_WRONLY

    def calls() -> list[int]:
        results = []
        for args in ((x86_64("open"), bytes(setuid), creating, GARBAGE | SETUID),
                     (x86_64("chmod"), bytes(victim), GARBAGE | SETUID),
                     (x86_64("open"), bytes(plain), creating, GARBAGE | 0o640)):
            try:
                fd = path_call(args[0], Path(args[1].decode()), *args[2:])
                if args[0] == x86_64("open"):
                    os.close(fd)
                results.append(0)
            except OSError as exc:
                results.append(exc.errno or -1)
        return results

    trial = run_policy(load(HARDENING), calls)
    assert trial.value == [errno.EPERM, errno.EPERM, 0], trial
    assert not setuid.exists()
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644
    assert plain.exists() and not plain.stat().st_mode & 0o6000
    assert [(s.kind, s.decision.unchecked) for s in trial.decisions] == [
        ("deny", False), ("deny", False), ("allow", False)]


def test_i386_set_id_modes_with_garbage_upper_halves_are_refused(
        tmp_path: Path, int80: Int80) -> None:
    victim = tmp_path / "victim"
    victim.write_text("")
    victim.chmod(0o644)
    made = tmp_path / "made"

    def calls() -> list[int]:
        results = []
        for nr, path, b, c in (
                (i386("chmod"), victim, GARBAGE | SETUID, 0),
                (i386("open"), made, GARBAGE | os.O_CREAT | os.O_WRONLY, GARBAGE | SETUID),
                (i386("creat"), made, GARBAGE | SETUID, 0)):
            low = decoy_pair(bytes(path), bytes(path))  # an i386 pointer: below 4 GiB
            rc = int80(nr, low, b, c)
            results.append(-rc if rc < 0 else 0)
        return results

    trial = run_policy(load(HARDENING), calls)
    assert trial.value == [errno.EPERM] * 3, trial
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644
    assert not made.exists()


# --- item 12: every call that creates a file with a mode, or changes one -------------------

AT_FDCWD = -100 & 0xFFFF_FFFF_FFFF_FFFF


def path_call(nr: int, path: Path, *args: int, dirfd: int | None = None) -> int:
    """``syscall(nr, [dirfd,] path, args...)`` with the path in a buffer kept alive
    until the call returned."""
    name = ctypes.create_string_buffer(bytes(path))
    before = () if dirfd is None else (dirfd,)
    return raw_syscall(nr, *before, ctypes.addressof(name), *args)


def open_how(flags: int, mode: int, resolve: int = 0) -> ctypes.Array[ctypes.c_char]:
    """A struct open_how { u64 flags; u64 mode; u64 resolve; } in our memory."""
    return ctypes.create_string_buffer(struct.pack("<QQQ", flags, mode, resolve), 24)


def openat2(path: Path, flags: int, mode: int) -> int:
    how = open_how(flags, mode)
    return path_call(x86_64("openat2"), path, ctypes.addressof(how), 24, dirfd=AT_FDCWD)


def close_fd(fd: int) -> None:
    os.close(fd)


def fchmod_setuid(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fchmod(fd, SETUID)
    finally:
        os.close(fd)


# How each call makes `path` (or, for O_TMPFILE, an unnamed file in its parent) set-uid.
SETID_CALLS: dict[str, Callable[[Path], object]] = {
    "openat O_CREAT": lambda p: close_fd(os.open(p, os.O_CREAT | os.O_WRONLY, SETUID)),
    "openat O_CREAT setgid": lambda p: close_fd(os.open(p, os.O_CREAT | os.O_WRONLY,
                                                        0o2755)),
    "openat O_TMPFILE": lambda p: close_fd(os.open(p.parent, os.O_TMPFILE | os.O_WRONLY,
                                                   SETUID)),
    "open O_CREAT": lambda p: close_fd(path_call(x86_64("open"), p,
                                                 os.O_CREAT | os.O_WRONLY, SETUID)),
    "creat": lambda p: close_fd(path_call(x86_64("creat"), p, SETUID)),
    "mknod S_IFREG": lambda p: path_call(x86_64("mknod"), p, stat.S_IFREG | SETUID, 0),
    "mknodat type 0": lambda p: os.mknod(p, SETUID),
    "fchmod": fchmod_setuid,
    "fchmodat2": lambda p: path_call(x86_64("fchmodat2"), p, SETUID, 0, dirfd=AT_FDCWD),
    "openat2 O_CREAT": lambda p: close_fd(openat2(p, os.O_CREAT | os.O_WRONLY, SETUID)),
}


@pytest.mark.parametrize("call", sorted(SETID_CALLS))
def test_every_call_that_sets_a_mode_refuses_set_id_bits(tmp_path: Path, call: str) -> None:
    path = tmp_path / "f"
    if call.startswith("fchmod"):
        path.write_text("")
        path.chmod(0o644)
    trial = run_policy(load(HARDENING), lambda: SETID_CALLS[call](path))
    expected = errno.ENOSYS if call.startswith("openat2") else errno.EPERM
    assert trial.errno == expected, trial
    assert [s.kind for s in trial.decisions if s.policy == "hardening"][-1:] == ["deny"]
    if path.exists():
        assert not path.stat().st_mode & 0o6000


def test_modes_without_set_id_bits_are_allowed_on_registers_alone(tmp_path: Path) -> None:
    existing = tmp_path / "existing"
    existing.write_text("keep")

    def calls() -> int:
        os.close(os.open(tmp_path / "a", os.O_CREAT | os.O_WRONLY, 0o755))
        # The sticky bit is not a privilege.
        os.close(path_call(x86_64("creat"), tmp_path / "b", 0o1777))
        # Without O_CREAT or O_TMPFILE the kernel ignores the mode register entirely.
        os.close(path_call(x86_64("open"), existing, os.O_RDONLY, SETUID))
        try:
            os.mknod(tmp_path / "fifo", stat.S_IFIFO | 0o600)
        except OSError as exc:
            return exc.errno or -1
        return 0

    trial = run_policy(load(HARDENING), calls)
    assert trial.value == errno.ENOSYS, trial
    kinds = [(s.syscall, s.kind, s.decision.unchecked) for s in trial.decisions
             if s.syscall in ("open", "openat", "creat", "mknodat")]
    assert ("openat", "allow", False) in kinds
    assert ("creat", "allow", False) in kinds and ("open", "allow", False) in kinds
    # hardening alone passes a FIFO on (as before): unhandled answers it.
    assert ("mknodat", "deny", False) in kinds


def test_openat2_check_mode_reads_open_how(tmp_path: Path) -> None:
    """`openat2 = "check"`: set-id modes refused after reading struct open_how; the
    rest is an advisory allow (another thread can rewrite the struct after the read)."""
    policy = load(HARDENING, openat2="check")

    def calls() -> list[int]:
        results = []
        for name, flags, mode in (("setuid", os.O_CREAT | os.O_WRONLY, SETUID),
                                  ("plain", os.O_CREAT | os.O_WRONLY, 0o644),
                                  ("plain", os.O_RDONLY, 0)):
            try:
                os.close(openat2(tmp_path / name, flags, mode))
                results.append(0)
            except OSError as exc:
                results.append(exc.errno or -1)
        return results

    trial = run_policy(policy, calls)
    assert trial.value == [errno.EPERM, 0, 0], trial
    assert not (tmp_path / "setuid").exists()
    assert [(s.kind, s.decision.unchecked) for s in trial.decisions
            if s.syscall == "openat2"] == [("deny", False), ("allow", True), ("allow", True)]


def test_mkdir_cannot_set_set_id_bits_so_hardening_leaves_it_alone(tmp_path: Path) -> None:
    """The kernel fact behind not watching mkdir/mkdirat: vfs_mkdir keeps only the
    permission and sticky bits of the mode (a directory's setgid bit comes from its
    parent, which only a chmod -- refused -- or the image could have set)."""
    trial = run_policy(load(HARDENING), lambda: os.mkdir(tmp_path / "d", 0o6755))
    assert trial.errno == 0 and trial.decisions == []
    assert not (tmp_path / "d").stat().st_mode & 0o6000


def test_the_example_system_route_refuses_set_id_files_outside_guarded_paths(
        tmp_path: Path) -> None:
    """policies/all.toml's system route chains devices and path_guard, which allow what
    they do not refuse: hardening must be asked before them."""
    config = load_config(ROOT / "policies" / "all.toml")
    policies = load_policies(config)
    choice = route_for(Container(id="c", metadata="kind=system", labels={"kind": "system"},
                                 peer_uid=0), config)
    chain = [policies[name] for name in choice.policies]
    null = tmp_path / "null"
    victim = tmp_path / "victim"
    victim.write_text("")

    def calls() -> list[int]:
        results = []
        for call in (lambda: SETID_CALLS["openat O_CREAT"](tmp_path / "a"),
                     lambda: SETID_CALLS["mknod S_IFREG"](tmp_path / "b"),
                     lambda: os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3)),
                     lambda: os.chmod(victim, 0o600),
                     lambda: os.close(os.open(tmp_path / "c", os.O_CREAT, 0o644))):
            try:
                call()
                results.append(0)
            except OSError as exc:
                results.append(exc.errno or -1)
        return results

    trial = run_policy(chain, calls)
    assert trial.value == [errno.EPERM, errno.EPERM, 0, 0, 0], trial
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert null.lstat().st_rdev == os.makedev(1, 3)
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600


@pytest.mark.parametrize("outside", [1 << 64, -(1 << 64)], ids=["2^64 up", "negative"])
def test_an_address_outside_64_bits_is_unreadable_not_wrapped(
        tmp_path: Path, outside: int) -> None:
    """A policy's address arithmetic that leaves the 64-bit address space (a pointer
    from the target plus an offset it also controls) names no memory: EFAULT, as the
    kernel's own access would give. It was cut to 64 bits on the way to the read, which
    read the target's bytes at the wrapped address instead."""
    made = tmp_path / "made"
    wrapping = PolicySet("wrapping")

    @wrapping.on("mkdir")
    async def off_the_end(n: Notification) -> Decision:
        path = await n.read_cstring(n.pointer(0) + outside)
        return deny(errno.EACCES, reason=f"read {path!r} past the address space")

    trial = run_policy(wrapping, lambda: path_call(x86_64("mkdir"), made, 0o755))
    assert trial.errno == errno.EFAULT, trial
    assert trial.decisions[0].error == "memory"
    assert not made.exists()
