"""The -ENOSYS stub and the program size limit, on the real kernel and as pure logic.

A tiny C program installs the filter itself and makes raw system calls in the three ABIs a
64-bit process can reach: x86_64 (``syscall``), x86 (``int $0x80``) and x32 (``syscall``
with bit 30 set: the filter sees it even where the kernel has no x32 support).
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyseccomp
import pytest

from supervisor import abi, bpf, bpfprog
from supervisor.cli import main
from supervisor.errors import ProfileError
from supervisor.profile import (
    ALLOW_LIKE_ACTIONS,
    Action,
    Profile,
    build_filter,
    build_program,
    compile_profile,
    parse_profile,
    stub_limits,
)

PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)

CALLER_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <linux/filter.h>
#include <linux/seccomp.h>

/* An x86 (i386) system call from a 64-bit process. */
static long call32(long nr, long a, long b, long c) {
    long ret;
    __asm__ volatile ("int $0x80" : "=a"(ret) : "a"(nr), "b"(a), "c"(b), "d"(c) : "memory");
    return ret;
}

/* stdin: the BPF program. argv: ABI:NR with ABI n (x86_64), i (x86) or x (x32).
   stdout: one result per call, 0 or -errno. Only write and exit_group after the filter. */
int main(int argc, char **argv) {
    static struct sock_filter insns[8192];
    size_t got = fread(insns, 1, sizeof insns, stdin);
    struct sock_fprog prog = { .len = got / 8, .filter = insns };
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) return 90;
    if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog)) return 91;
    static char out[8192];
    size_t n = 0;
    for (int i = 1; i < argc; i++) {
        char abi = argv[i][0];
        long nr = strtol(argv[i] + 2, NULL, 0), r;
        if (abi == 'i') {
            r = call32(nr, 0, 0, 0);
        } else {
            r = syscall(abi == 'x' ? (nr | 0x40000000L) : nr, 0L, 0L, 0L);
            if (r < 0) r = -errno;
        }
        if (r > 0) r = 0;
        n += snprintf(out + n, sizeof out - n, "%s%ld", i > 1 ? " " : "", r);
    }
    out[n++] = '\n';
    syscall(SYS_write, 1, out, n);
    syscall(SYS_exit_group, 0);
    return 0;
}
"""


@pytest.fixture(scope="module")
def caller(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("stub")
    source = directory / "caller.c"
    source.write_text(CALLER_C)
    binary = directory / "caller"
    subprocess.run(["gcc", "-O1", "-o", str(binary), str(source)], check=True,
                   capture_output=True, timeout=60)
    return binary


def run_calls(caller: Path, program: bytes, calls: list[str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(caller), *calls], input=program, capture_output=True,
                          timeout=20, check=False)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(),
                                       proc.stderr.decode())


def results(caller: Path, program: bytes, calls: list[str]) -> list[int]:
    proc = run_calls(caller, program, calls)
    assert proc.returncode == 0, proc
    return [int(x) for x in proc.stdout.split()]


def nr(name: str, arch: int = pyseccomp.Arch.X86_64) -> int:
    number = int(pyseccomp.resolve_syscall(arch, name))
    assert number >= 0
    return number & ~abi.X32_SYSCALL_BIT


ALL_ARCHES = ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]


def eperm_profile(*rules: dict[str, Any], arches: list[str] | None = None,
                  default: str = "SCMP_ACT_ERRNO") -> Profile:
    """Default EPERM; write and exit_group allowed (the caller needs them); ``rules``."""
    return parse_profile({
        "defaultAction": default,
        "architectures": ALL_ARCHES if arches is None else arches,
        "syscalls": [{"names": ["write", "exit_group"], "action": "SCMP_ACT_ALLOW"},
                     *rules],
    }, "eperm.json")


GETPRIORITY_EXDEV = {"names": ["getpriority"], "action": "SCMP_ACT_ERRNO",
                     "errnoRet": errno.EXDEV}


# --- the three cases on the kernel ------------------------------------------------------


@pytest.mark.parametrize(("abi_code", "arch"), [
    ("n", pyseccomp.Arch.X86_64), ("i", pyseccomp.Arch.X86), ("x", pyseccomp.Arch.X32)])
def test_enosys_above_every_named_call_rule_for_named_default_below(
        caller: Path, abi_code: str, arch: int) -> None:
    """Default EPERM, rules for write, exit_group (the largest named: 231 on x86_64 and
    x32, 252 on x86) and getpriority. getcpu is numbered above all of them in each ABI,
    getppid below."""
    p = eperm_profile(GETPRIORITY_EXDEV)
    above, named, below = nr("getcpu", arch), nr("getpriority", arch), nr("getppid", arch)
    assert above > nr("exit_group", arch) > below
    calls = [f"{abi_code}:{above}", f"{abi_code}:{named}", f"{abi_code}:{below}"]
    assert results(caller, build_program(p), calls) == [
        -errno.ENOSYS, -errno.EXDEV, -errno.EPERM]
    # Control: libseccomp's program alone gives the default errno above the limit too.
    plain = bpf.export_program(build_filter(p))
    assert results(caller, plain, calls) == [-errno.EPERM, -errno.EXDEV, -errno.EPERM]


def test_limit_is_per_architecture(caller: Path) -> None:
    """Naming a call that is high on x86 only (x86's direct ``socket``, 359) raises the
    x86 limit and leaves x86_64 and x32 alone."""
    p = eperm_profile({"names": ["getpriority"], "action": "SCMP_ACT_ERRNO",
                       "errnoRet": errno.EXDEV},
                      {"names": ["sendfile64"], "action": "SCMP_ACT_ERRNO",
                       "errnoRet": errno.EXDEV})
    sendfile64_x86 = nr("sendfile64", pyseccomp.Arch.X86)  # 239, x86 only
    assert pyseccomp.resolve_syscall(pyseccomp.Arch.X86_64, "sendfile64") < 0
    limits = compile_profile(p).limits
    assert limits is not None
    assert limits.x86 == 252 and limits.x86_64 == 231 and limits.x32 == 231 | (1 << 30)
    got = results(caller, build_program(p), [
        "i:240", f"i:{sendfile64_x86}", "n:240", "x:240", "i:253"])
    # i386 240 is futex: below exit_group (252), so EPERM; 253 lookup_dcookie: ENOSYS.
    assert got == [-errno.EPERM, -errno.EXDEV, -errno.ENOSYS, -errno.ENOSYS, -errno.ENOSYS]


def test_numbers_libseccomp_rewrites_count(caller: Path) -> None:
    """libseccomp turns ``socket`` on x86 into socketcall(SYS_SOCKET) and the direct call
    359. Counting names only (as runc does) would put 359 above the x86 limit and answer
    the allowed call with ENOSYS; the stub reads the program's own numbers."""
    p = eperm_profile({"names": ["socket"], "action": "SCMP_ACT_ALLOW"})
    limits = stub_limits(p, bpf.export_program(build_filter(p)))
    assert limits.x86 == 359
    # socket(0, 0, 0) runs and fails in the kernel with EAFNOSUPPORT, not ENOSYS/EPERM.
    assert results(caller, build_program(p), ["i:359", "i:360", "n:41"]) == [
        -errno.EAFNOSUPPORT, -errno.ENOSYS, -errno.EAFNOSUPPORT]


def test_x32_outside_the_profile_still_gets_the_bad_arch_action(caller: Path) -> None:
    """Without SCMP_ARCH_X32 in the profile the stub sends x32 calls to the filter, whose
    bad-architecture action (KILL_PROCESS) ends the process."""
    p = eperm_profile(GETPRIORITY_EXDEV, arches=["SCMP_ARCH_X86_64"])
    assert results(caller, build_program(p), ["n:400"]) == [-errno.ENOSYS]
    proc = run_calls(caller, build_program(p), ["x:400"])
    assert proc.returncode == -signal.SIGSYS


@pytest.mark.parametrize("default", ["SCMP_ACT_KILL_PROCESS", "SCMP_ACT_TRAP"])
def test_stub_for_kill_and_trap_defaults(caller: Path, default: str) -> None:
    p = eperm_profile(GETPRIORITY_EXDEV, default=default)
    assert results(caller, build_program(p), ["n:400", "n:140"]) == [
        -errno.ENOSYS, -errno.EXDEV]
    # Below the limit the default action still applies: the process dies of SIGSYS.
    assert run_calls(caller, build_program(p), ["n:110"]).returncode == -signal.SIGSYS


@pytest.mark.parametrize("default", sorted(ALLOW_LIKE_ACTIONS))
def test_no_stub_after_allow_like_defaults(caller: Path, default: Action) -> None:
    p = eperm_profile(GETPRIORITY_EXDEV, default=str(default))
    built = compile_profile(p)
    assert built.stub_length == 0 and built.limits is None
    if default != Action.TRACE:  # TRACE without a tracer is ENOSYS anyway
        assert results(caller, built.program, ["n:309", "n:140"]) == [0, -errno.EXDEV]


# --- the stub as pure logic ---------------------------------------------------------------

DATA = Path(__file__).resolve().parent / "data" / "profiles"


def _known(arch: int) -> list[int]:
    out = []
    for number in range(600):
        full = number | (abi.X32_SYSCALL_BIT if arch == pyseccomp.Arch.X32 else 0)
        try:
            pyseccomp.resolve_syscall(arch, full)
        except ValueError:
            continue
        out.append(full)
    return out


@pytest.mark.parametrize("name", ["portable.json", "config.json"])
def test_stub_only_changes_calls_that_got_the_default_action(name: str) -> None:
    """Run libseccomp's program and the patched one on every (arch, nr) with the BPF
    interpreter: they differ only where the plain one gave the default action and the
    number is above the limit, and there the answer is ENOSYS."""
    p = Profile(**{**_fields(parse_profile((DATA / name).read_text(), name)),
                   "default_action": Action.ERRNO, "default_errno_ret": errno.EACCES})
    plain = bpfprog.decode(bpf.export_program(build_filter(p, warn=lambda _: None)))
    built = compile_profile(p, warn=lambda _: None)
    limits = built.limits
    assert limits is not None and built.stub_length > 0
    default = bpfprog.RET_ERRNO | errno.EACCES
    cases = [(abi.AUDIT_ARCH_X86_64, n, limits.x86_64) for n in _known(pyseccomp.Arch.X86_64)]
    if limits.has_x86:
        cases += [(abi.AUDIT_ARCH_I386, n, limits.x86) for n in _known(pyseccomp.Arch.X86)]
    if limits.has_x32:
        cases += [(abi.AUDIT_ARCH_X86_64, n, limits.x32) for n in _known(pyseccomp.Arch.X32)]
    changed = 0
    for arch, number, limit in cases:
        for args in ([0] * 6, [1, 2, 3, 4, 5, 6]):
            data = bpfprog.pack_data(number, arch, args)
            before = bpfprog.run(plain, data).value
            after = bpfprog.run(built.instructions, data).value
            if before != after:
                changed += 1
                assert before == default and limit is not None and number > limit
                assert after == bpfprog.ENOSYS_RET
            elif limit is not None and number > limit:
                pytest.fail(f"{arch:#x}/{number} above {limit} kept {before:#x}")
    assert changed > 0


def _fields(p: Profile) -> dict[str, Any]:
    return {"default_action": p.default_action, "default_errno_ret": p.default_errno_ret,
            "architectures": p.architectures, "flags": p.flags,
            "listener_path": p.listener_path, "listener_metadata": p.listener_metadata,
            "syscalls": p.syscalls, "source": p.source}


@pytest.mark.parametrize(("x86_64", "x86", "x32", "has_x86", "has_x32"), [
    (x86_64, x86, x32, has_x86, has_x32)
    for x86_64, x86, x32, has_x86, has_x32 in itertools.product(
        [None, 100], [None, 200], [None, 300 | abi.X32_SYSCALL_BIT], [False, True],
        [False, True])
])
def test_stub_shapes(x86_64: int | None, x86: int | None, x32: int | None, has_x86: bool,
                     has_x32: bool) -> None:
    """Every combination: ENOSYS exactly above each present limit, else fall through to
    the instruction after the stub (here a marker return)."""
    limits = bpfprog.StubLimits(x86_64, x86, x32, has_x86, has_x32)
    stub = bpfprog.enosys_stub(limits)
    if limits.empty:
        assert stub == []
        return
    marker = bpfprog.Insn(bpfprog.RET | bpfprog.K, 0, 0, bpfprog.RET_ALLOW)
    program = [*stub, marker]
    x32_limit = x32 if has_x32 else None
    x86_limit = x86 if has_x86 else None
    for arch, base, limit in [(abi.AUDIT_ARCH_X86_64, 0, x86_64),
                              (abi.AUDIT_ARCH_X86_64, abi.X32_SYSCALL_BIT, x32_limit),
                              (abi.AUDIT_ARCH_I386, 0, x86_limit), (0xC00000B7, 0, None)]:
        for number in (base, base + 99, base + 100, base + 101, base + 299, base + 301,
                       base + 5000):
            want = (bpfprog.ENOSYS_RET if limit is not None and number > limit
                    else bpfprog.RET_ALLOW)
            got = bpfprog.run(program, bpfprog.pack_data(number, arch)).value
            assert got == want, (arch, number, limit)


def test_decode_encode_disassemble() -> None:
    p = eperm_profile(GETPRIORITY_EXDEV)
    program = build_program(p)
    insns = bpfprog.decode(program)
    assert bpfprog.encode(insns) == program
    lines = list(bpfprog.disassemble(insns, names={(abi.AUDIT_ARCH_X86_64, 140): "getpriority"}))
    assert len(lines) == len(insns)
    assert lines[0] == "0000  A = arch"
    assert any("return ERRNO(ENOSYS)" in line for line in lines)
    assert any(line.endswith("if (A == 140) goto " + line.split("goto ")[-1].split()[0]
                             + "  # getpriority") for line in lines)
    with pytest.raises(bpfprog.ProgramError, match="multiple of 8"):
        bpfprog.decode(b"1234567")


# --- the size limit ---------------------------------------------------------------------


def _big_profile(count: int) -> dict[str, Any]:
    """ERRNO for ``count`` calls when their six arguments have values of their own
    (distinct values, so libseccomp cannot share comparison blocks): about 25
    instructions a call."""
    names = [pyseccomp.resolve_syscall(pyseccomp.Arch.X86_64, n).decode()
             for n in range(0, 300) if n not in (1, 60, 231)][:count]
    return {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
        {"names": ["write", "exit", "exit_group"], "action": "SCMP_ACT_ALLOW"},
        *({"names": [name], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EXDEV,
           "args": [{"index": j, "value": 1000 * i + j, "op": "SCMP_CMP_EQ"}
                    for j in range(6)]}
          for i, name in enumerate(names))]}


def test_program_over_the_kernel_limit_is_refused_before_loading() -> None:
    p = parse_profile(_big_profile(170), "big.json")
    with pytest.raises(ProfileError) as info:
        build_program(p)
    message = str(info.value)
    assert message.startswith("big.json: the filter is ")
    count = int(message.split("the filter is ")[1].split()[0])
    assert count > bpfprog.BPF_MAXINSNS
    assert f"the kernel accepts at most {bpfprog.BPF_MAXINSNS}" in message
    assert " of the -ENOSYS stub)" in message
    # One condition fewer fits.
    small = compile_profile(parse_profile(_big_profile(150), "small.json"))
    assert 3000 < small.length <= bpfprog.BPF_MAXINSNS


_RAW_LOAD = """
import ctypes, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
count = int(sys.argv[1])
insns = struct.pack("<HBBI", 0x06, 0, 0, 0x7fff0000) * count   # ret ALLOW
class Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]
assert libc.prctl(38, 1, 0, 0, 0) == 0
rc = libc.syscall(317, 1, 0, ctypes.byref(Fprog(count, insns)))
print(0 if rc == 0 else ctypes.get_errno())
"""


@pytest.mark.parametrize(("count", "want"), [(4096, 0), (4097, errno.EINVAL)])
def test_the_limit_is_the_kernels(count: int, want: int) -> None:
    """What the check guards against: this kernel refuses 4097 instructions with EINVAL."""
    proc = subprocess.run([sys.executable, "-I", "-c", _RAW_LOAD, str(count)],
                          capture_output=True, text=True, timeout=30, check=True)
    assert int(proc.stdout) == want


def test_run_refuses_an_oversized_profile(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "big.json"
    big = _big_profile(170)
    big["syscalls"].append({"names": ["mkdir"], "action": "SCMP_ACT_NOTIFY"})
    path.write_text(json.dumps(big))
    marker = tmp_path / "ran"
    code = main(["run", "--socket", str(tmp_path / "none.sock"), "--profile", str(path),
                 "--", "touch", str(marker)])
    assert code == 2
    assert not marker.exists()
    err = capsys.readouterr().err
    assert f"{path}: the filter is " in err and "at most 4096" in err


def test_install_filter_refuses_oversized_program() -> None:
    with pytest.raises(ValueError, match="4097 instructions"):
        bpf.install_filter(bytes(8 * 4097), 0)
    assert ctypes.sizeof(ctypes.c_ushort) == 2  # sock_fprog.len could not say more anyway


def test_run_without_notify_rules_needs_no_daemon(tmp_path: Path) -> None:
    """Nothing would reach the daemon: the kernel enforces the profile alone and the
    command runs, even when the socket names no daemon (tests/test_learn.py runs the
    record -> run --profile workflow)."""
    path = tmp_path / "plain.json"
    path.write_text(json.dumps({"defaultAction": "SCMP_ACT_ALLOW"}))
    marker = tmp_path / "ran"
    assert main(["run", "--socket", str(tmp_path / "none.sock"), "--profile", str(path),
                 "--", "touch", str(marker)]) == 0
    assert marker.exists()
