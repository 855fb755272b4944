"""Classic BPF seccomp programs as data: decode, encode, run, analyse, patch, print.

Pure functions over bytes and :class:`Insn` tuples, no system calls. They are what
:func:`supervisor.profile.build_program` uses to put the ``-ENOSYS`` stub in front of
libseccomp's program and to check the size, and what ``profile explain`` prints.

Facts about seccomp programs this module relies on:

* the program sees ``struct seccomp_data { s32 nr; u32 arch; u64 ip; u64 args[6]; }`` in
  host byte order (little-endian here); loads are 32-bit and 4-aligned, so an argument is
  read as two words, low word at ``16 + 8 * i``, high word 4 bytes later;
* every jump goes forward: a conditional jump skips 0..255 instructions (``jt``/``jf`` are
  8 bits), ``ja`` skips up to 2**32 - 1; so instructions can be prepended to a program
  without touching it;
* the kernel refuses a program longer than :data:`BPF_MAXINSNS` (4096) instructions with
  EINVAL, and one that can fall off its end;
* x32 calls arrive with ``AUDIT_ARCH_X86_64`` and bit 30 (:data:`X32_SYSCALL_BIT`) set in
  ``nr``; libseccomp compares x32 numbers with that bit included.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple

from . import abi

__all__ = [
    "BPF_MAXINSNS",
    "Insn",
    "ProgramError",
    "StubLimits",
    "action_name",
    "decode",
    "disassemble",
    "encode",
    "enosys_stub",
    "nr_comparisons",
    "pack_data",
    "run",
]

# The kernel refuses longer programs (include/uapi/linux/filter.h BPF_MAXINSNS).
BPF_MAXINSNS: Final = 4096
INSN: Final = struct.Struct("<HBBI")  # struct sock_filter { u16 code; u8 jt; u8 jf; u32 k; }
SECCOMP_DATA: Final = struct.Struct("<iIQ6Q")
X32_SYSCALL_BIT: Final = abi.X32_SYSCALL_BIT

# Offsets in struct seccomp_data.
OFF_NR: Final = 0
OFF_ARCH: Final = 4
OFF_IP: Final = 8
OFF_ARGS: Final = 16

# Instruction classes and fields (include/uapi/linux/bpf_common.h).
LD, LDX, ST, STX, ALU, JMP, RET, MISC = range(8)
W, H, B = 0x00, 0x08, 0x10
IMM, ABS, IND, MEM, LEN, MSH = 0x00, 0x20, 0x40, 0x60, 0x80, 0xA0
ADD, SUB, MUL, DIV, OR, AND, LSH, RSH, NEG, MOD, XOR = (
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xA0)
JA, JEQ, JGT, JGE, JSET = 0x00, 0x10, 0x20, 0x30, 0x40
K, X = 0x00, 0x08
RET_A = 0x10
TAX, TXA = 0x00, 0x80
BPF_MEMWORDS: Final = 16

# Seccomp return values (include/uapi/linux/seccomp.h).
RET_KILL_PROCESS: Final = 0x80000000
RET_KILL_THREAD: Final = 0x00000000
RET_TRAP: Final = 0x00030000
RET_ERRNO: Final = 0x00050000
RET_USER_NOTIF: Final = 0x7FC00000
RET_TRACE: Final = 0x7FF00000
RET_LOG: Final = 0x7FFC0000
RET_ALLOW: Final = 0x7FFF0000
RET_ACTION_FULL: Final = 0xFFFF0000
RET_DATA: Final = 0x0000FFFF

_RET_NAMES: Final[Mapping[int, str]] = {
    RET_KILL_PROCESS: "KILL_PROCESS",
    RET_KILL_THREAD: "KILL_THREAD",
    RET_TRAP: "TRAP",
    RET_ERRNO: "ERRNO",
    RET_USER_NOTIF: "NOTIFY",
    RET_TRACE: "TRACE",
    RET_LOG: "LOG",
    RET_ALLOW: "ALLOW",
}
ARCH_NAMES: Final[Mapping[int, str]] = {
    abi.AUDIT_ARCH_X86_64: "AUDIT_ARCH_X86_64",
    abi.AUDIT_ARCH_I386: "AUDIT_ARCH_I386",
}
ENOSYS_RET: Final = RET_ERRNO | errno.ENOSYS

_ALU_SYMBOLS: Final[Mapping[int, str]] = {
    ADD: "+", SUB: "-", MUL: "*", DIV: "/", OR: "|", AND: "&", LSH: "<<", RSH: ">>",
    MOD: "%", XOR: "^",
}
_JMP_SYMBOLS: Final[Mapping[int, str]] = {JEQ: "==", JGT: ">", JGE: ">=", JSET: "&"}
_U32: Final = 0xFFFFFFFF


class ProgramError(ValueError):
    """A byte string that is not a well-formed seccomp BPF program (bad length, unknown
    instruction, jump out of the program, load outside ``seccomp_data``)."""


class Insn(NamedTuple):
    """One ``struct sock_filter``."""

    code: int
    jt: int
    jf: int
    k: int


def decode(program: bytes) -> list[Insn]:
    """The instructions of a raw program (host byte order, as libseccomp exports it).

    Raises :class:`ProgramError` if the length is not a multiple of 8.
    """
    if len(program) % INSN.size:
        raise ProgramError(f"a BPF program is a multiple of 8 bytes, not {len(program)}")
    return [Insn(*fields) for fields in INSN.iter_unpack(program)]


def encode(insns: Iterable[Insn]) -> bytes:
    """The raw program of ``insns`` (inverse of :func:`decode`)."""
    return b"".join(INSN.pack(*insn) for insn in insns)


def pack_data(nr: int, arch: int, args: Sequence[int] = (), ip: int = 0) -> bytes:
    """A ``struct seccomp_data`` (``nr`` is taken modulo 2**32, as a register is)."""
    full = [*args, *([0] * (6 - len(args)))]
    nr32 = nr & _U32
    return SECCOMP_DATA.pack(nr32 - (1 << 32) if nr32 & 0x80000000 else nr32, arch, ip,
                             *full)


# ---------------------------------------------------------------------------------------
# Running


@dataclass(frozen=True)
class RunResult:
    """What :func:`run` found: the return value and the ``seccomp_data`` offsets read."""

    value: int
    loads: frozenset[int]

    @property
    def reads_args(self) -> bool:
        """True if the result may depend on the arguments (or the instruction pointer)."""
        return any(off >= OFF_IP for off in self.loads)


def run(insns: Sequence[Insn], data: bytes) -> RunResult:
    """Run the program on one ``seccomp_data`` as the kernel would; pure.

    Raises :class:`ProgramError` on an instruction seccomp does not allow, a load outside
    the data, a jump out of the program, or falling off its end.
    """
    a = x = 0
    mem = [0] * BPF_MEMWORDS
    loads: set[int] = set()
    pc = 0
    while True:
        if not 0 <= pc < len(insns):
            raise ProgramError(f"execution left the program at {pc}")
        code, jt, jf, k = insns[pc]
        cls = code & 0x07
        pc += 1
        if cls == LD:
            mode = code & 0xE0
            if mode == ABS and code & 0x18 == W:
                if k % 4 or k + 4 > len(data):
                    raise ProgramError(f"load of seccomp_data offset {k} at {pc - 1}")
                a = int.from_bytes(data[k:k + 4], "little")
                loads.add(k)
            elif mode == IMM:
                a = k
            elif mode == MEM and k < BPF_MEMWORDS:
                a = mem[k]
            elif mode == LEN:
                a = len(data)
            else:
                raise ProgramError(f"instruction {code:#06x} at {pc - 1} is not allowed")
        elif cls == LDX:
            mode = code & 0xE0
            if mode == IMM:
                x = k
            elif mode == MEM and k < BPF_MEMWORDS:
                x = mem[k]
            elif mode == LEN:
                x = len(data)
            else:
                raise ProgramError(f"instruction {code:#06x} at {pc - 1} is not allowed")
        elif cls in (ST, STX):
            if k >= BPF_MEMWORDS:
                raise ProgramError(f"scratch slot {k} at {pc - 1}")
            mem[k] = a if cls == ST else x
        elif cls == ALU:
            a = _alu(code, a, x if code & X else k, pc - 1)
        elif cls == JMP:
            op = code & 0xF0
            if op == JA:
                pc += k
                continue
            operand = x if code & X else k
            if op == JEQ:
                taken = a == operand
            elif op == JGT:
                taken = a > operand
            elif op == JGE:
                taken = a >= operand
            elif op == JSET:
                taken = bool(a & operand)
            else:
                raise ProgramError(f"instruction {code:#06x} at {pc - 1} is not allowed")
            pc += jt if taken else jf
        elif cls == RET:
            rval = code & 0x18
            if rval == K:
                return RunResult(k, frozenset(loads))
            if rval == RET_A:
                return RunResult(a, frozenset(loads))
            raise ProgramError(f"instruction {code:#06x} at {pc - 1} is not allowed")
        elif code & 0xF8 == MISC | TXA:
            a = x
        elif code & 0xF8 == MISC | TAX:
            x = a
        else:
            raise ProgramError(f"instruction {code:#06x} at {pc - 1} is not allowed")


def _alu(code: int, a: int, operand: int, where: int) -> int:
    op = code & 0xF0
    if op == NEG:
        return -a & _U32
    if op in (DIV, MOD) and operand == 0:
        raise ProgramError(f"division by zero at {where}")
    results = {
        ADD: a + operand, SUB: a - operand, MUL: a * operand,
        DIV: a // operand if operand else 0, MOD: a % operand if operand else 0,
        OR: a | operand, AND: a & operand, XOR: a ^ operand,
        LSH: a << (operand & 31), RSH: a >> (operand & 31),
    }
    if op not in results:
        raise ProgramError(f"instruction {code:#06x} at {where} is not allowed")
    return results[op] & _U32


# ---------------------------------------------------------------------------------------
# Analysis


_State = tuple[int | None, int]  # (arch known on this path or None, A's source offset or -1)


def _flow(insns: Sequence[Insn]) -> list[set[_State]]:
    """The abstract states reaching each instruction (empty: unreachable).

    A forward data-flow pass (every jump goes forward, so program order is a topological
    order) tracks which word of ``seccomp_data`` the accumulator holds (-1: something
    else) and which architecture an earlier ``jeq`` on ``arch`` established on the path.
    """
    states: list[set[_State]] = [set() for _ in range(len(insns) + 1)]
    if insns:
        states[0].add((None, -1))
    for pc, (code, jt, jf, k) in enumerate(insns):
        here = states[pc]
        if not here:
            continue
        cls = code & 0x07
        nexts: list[tuple[int, set[_State]]] = []
        if cls == LD:
            src = k if code == LD | W | ABS else -1
            nexts.append((pc + 1, {(arch, src) for arch, _ in here}))
        elif cls == ALU or code & 0xF8 == MISC | TXA:
            nexts.append((pc + 1, {(arch, -1) for arch, _ in here}))
        elif cls == JMP:
            op = code & 0xF0
            if op == JA:
                nexts.append((pc + 1 + k, set(here)))
            else:
                true_states: set[_State] = set()
                false_states: set[_State] = set()
                for arch, src in here:
                    if op == JEQ and not code & X and src == OFF_ARCH:
                        true_states.add((k, src))
                    else:
                        true_states.add((arch, src))
                    false_states.add((arch, src))
                nexts.append((pc + 1 + jt, true_states))
                nexts.append((pc + 1 + jf, false_states))
        elif cls != RET:  # LDX, ST, STX, TAX leave A alone
            nexts.append((pc + 1, set(here)))
        for target, state in nexts:
            if target < len(states):
                states[target] |= state
    return states


def nr_comparisons(insns: Sequence[Insn]) -> dict[int, set[int]]:
    """For each audit arch, the system call numbers the program tests with ``jeq``.

    libseccomp matches each system call it has a rule for with ``jeq nr``, including the
    numbers it rewrites a name to (``socket`` on x86 is both ``socketcall`` and the direct
    call 359), so these are all the calls the program may treat otherwise than with its
    default action, per architecture. x32 numbers come under ``AUDIT_ARCH_X86_64`` with
    :data:`X32_SYSCALL_BIT` set. Never raises: an instruction it does not model makes the
    accumulator unknown.
    """
    found: dict[int, set[int]] = {}
    for (code, _jt, _jf, k), here in zip(insns, _flow(insns), strict=False):
        if code != JMP | JEQ | K:
            continue
        for arch, src in here:
            if src == OFF_NR and arch is not None:
                found.setdefault(arch, set()).add(k)
    return found


# ---------------------------------------------------------------------------------------
# The -ENOSYS stub


@dataclass(frozen=True)
class StubLimits:
    """The largest system call number each architecture of a filter knows about.

    ``None`` for an architecture in the filter means "no number known, send every call to
    the filter"; an architecture missing from the filter is ``absent``: x32 then goes to
    the filter too, where libseccomp's bad-architecture action awaits it. ``x86_64`` is
    the native architecture and always in the filter.
    """

    x86_64: int | None
    x86: int | None = None
    x32: int | None = None
    has_x86: bool = False
    has_x32: bool = False

    @property
    def empty(self) -> bool:
        """True if no architecture has a limit: the stub would do nothing."""
        return (self.x86_64 is None and not (self.has_x86 and self.x86 is not None)
                and not (self.has_x32 and self.x32 is not None))


class _Asm:
    """A tiny forward-only assembler with labels."""

    def __init__(self) -> None:
        self.items: list[tuple[int, str | None, str | None, int | str]] = []
        self.labels: dict[str, int] = {}

    def op(self, code: int, k: int = 0) -> None:
        self.items.append((code, None, None, k))

    def jump(self, code: int, k: int, jt: str, jf: str) -> None:
        self.items.append((code, jt, jf, k))

    def goto(self, label: str) -> None:
        self.items.append((JMP | JA, None, None, label))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.items)

    def assemble(self) -> list[Insn]:
        out = []
        for pc, (code, jt, jf, k) in enumerate(self.items):
            if isinstance(k, str):  # ja label
                out.append(Insn(code, 0, 0, self.labels[k] - pc - 1))
                continue
            t = 0 if jt is None else self.labels[jt] - pc - 1
            f = 0 if jf is None else self.labels[jf] - pc - 1
            if not (0 <= t <= 255 and 0 <= f <= 255):
                raise ProgramError(f"stub jump out of range at {pc}")  # cannot happen
            out.append(Insn(code, t, f, k))
        return out


def enosys_stub(limits: StubLimits) -> list[Insn]:
    """Instructions to put in front of a filter so that, per architecture, a call numbered
    above ``limits`` returns ENOSYS and every other call runs the filter unchanged.

    The stub ends with ``ret ERRNO(ENOSYS)``; the filter follows it directly. The
    accumulator is clobbered, which is fine: a libseccomp program loads what it needs.
    Empty when ``limits.empty``.
    """
    if limits.empty:
        return []
    asm = _Asm()
    asm.op(LD | W | ABS, OFF_ARCH)
    has_x86 = limits.has_x86 and limits.x86 is not None
    x32 = limits.x32 if limits.has_x32 else None
    has_64 = limits.x86_64 is not None or x32 is not None
    asm.jump(JMP | JEQ | K, abi.AUDIT_ARCH_X86_64, "x86_64" if has_64 else "filter",
             "not_x86_64")
    asm.label("not_x86_64")
    if has_x86:
        asm.jump(JMP | JEQ | K, abi.AUDIT_ARCH_I386, "x86", "filter")
    else:
        asm.goto("filter")

    if has_64:
        asm.label("x86_64")
        asm.op(LD | W | ABS, OFF_NR)
    # x32 calls come with AUDIT_ARCH_X86_64 and bit 30 set in nr.
    if limits.x86_64 is not None:
        asm.jump(JMP | JSET | K, X32_SYSCALL_BIT, "x32" if x32 is not None else "filter",
                 "native")
        asm.label("native")
        asm.jump(JMP | JGT | K, limits.x86_64, "enosys", "filter")
    elif x32 is not None:
        asm.jump(JMP | JSET | K, X32_SYSCALL_BIT, "x32", "filter")
    if x32 is not None:
        asm.label("x32")
        asm.jump(JMP | JGT | K, x32, "enosys", "filter")
    if has_x86:
        asm.label("x86")
        asm.op(LD | W | ABS, OFF_NR)
        assert limits.x86 is not None
        asm.jump(JMP | JGT | K, limits.x86, "enosys", "filter")

    asm.label("enosys")
    asm.op(RET | K, ENOSYS_RET)
    asm.label("filter")
    return asm.assemble()


# ---------------------------------------------------------------------------------------
# Printing


def action_name(value: int, errno_names: Mapping[int, str] | None = None) -> str:
    """``ALLOW``, ``ERRNO(EPERM)``, ``TRACE(3)``, ``KILL_PROCESS``... for a return value."""
    action = value & RET_ACTION_FULL
    data = value & RET_DATA
    name = _RET_NAMES.get(action)
    if name is None:
        return f"{value:#010x}"
    if action == RET_ERRNO:
        names = errno_names if errno_names is not None else errno.errorcode
        return f"ERRNO({names.get(data, str(data))})"
    if action == RET_TRACE:
        return f"TRACE({data})"
    return name


def _operand_name(off: int) -> str:
    if off == OFF_NR:
        return "nr"
    if off == OFF_ARCH:
        return "arch"
    if off in (OFF_IP, OFF_IP + 4):
        return "ip" + (".hi32" if off % 8 else ".lo32")
    if OFF_ARGS <= off < SECCOMP_DATA.size:
        index, part = divmod(off - OFF_ARGS, 8)
        return f"args[{index}]" + (".hi32" if part else ".lo32")
    return f"data[{off}]"


def disassemble(insns: Sequence[Insn], *, names: Mapping[tuple[int, int], str] | None = None
                ) -> Iterator[str]:
    """Pseudo-code lines, one per instruction: ``0004  if (A == 83) goto 0024  # mkdir``.

    Constants compared with ``arch`` print as ``AUDIT_ARCH_*`` names; x32 numbers as
    ``X32|n``. ``names`` maps ``(audit arch, nr)`` to a system call name, printed as a
    comment where the architecture on every path to the comparison is known.
    """
    width = max(4, len(str(len(insns))))
    flow = _flow(insns)
    for pc, (code, jt, jf, k) in enumerate(insns):
        srcs = {src for _, src in flow[pc]}
        archs = {arch for arch, _ in flow[pc]}
        src = srcs.pop() if len(srcs) == 1 else -1
        arch = archs.pop() if len(archs) == 1 else None
        text = _insn_text(pc, Insn(code, jt, jf, k), src, width)
        comment = ""
        if code == JMP | JEQ | K and src == OFF_NR and names is not None and arch is not None:
            name = names.get((arch, k))
            comment = f"  # {name}" if name else ""
        elif not flow[pc]:
            comment = "  # unreachable"
        yield f"{pc:0{width}d}  {text}{comment}"


def _insn_text(pc: int, insn: Insn, src: int, width: int) -> str:
    code, jt, jf, k = insn
    cls = code & 0x07
    mode = code & 0xE0
    if cls == LD:
        if mode == ABS:
            return f"A = {_operand_name(k)}"
        other = {IMM: f"A = {k:#x}", MEM: f"A = M[{k}]", LEN: "A = sizeof(seccomp_data)"}
        if mode in other:
            return other[mode]
    elif cls == LDX:
        other = {IMM: f"X = {k:#x}", MEM: f"X = M[{k}]", LEN: "X = sizeof(seccomp_data)"}
        if mode in other:
            return other[mode]
    elif cls == ST:
        return f"M[{k}] = A"
    elif cls == STX:
        return f"M[{k}] = X"
    elif cls == ALU:
        op = code & 0xF0
        if op == NEG:
            return "A = -A"
        if op in _ALU_SYMBOLS:
            return f"A {_ALU_SYMBOLS[op]}= {'X' if code & X else f'{k:#x}'}"
    elif cls == JMP:
        op = code & 0xF0
        if op == JA:
            return f"goto {pc + 1 + k:0{width}d}"
        if op in _JMP_SYMBOLS:
            operand = "X" if code & X else _constant(k, src, op)
            cond = f"A & {operand}" if op == JSET else f"A {_JMP_SYMBOLS[op]} {operand}"
            t, f = pc + 1 + jt, pc + 1 + jf
            if jf == 0:
                return f"if ({cond}) goto {t:0{width}d}"
            if jt == 0:
                return f"if !({cond}) goto {f:0{width}d}"
            return f"if ({cond}) goto {t:0{width}d} else goto {f:0{width}d}"
    elif cls == RET:
        return "return A" if code & 0x18 == RET_A else f"return {action_name(k)}"
    elif code & 0xF8 == MISC | TAX:
        return "X = A"
    elif code & 0xF8 == MISC | TXA:
        return "A = X"
    return f"<invalid {code:#06x} {jt} {jf} {k:#x}>"


def _constant(k: int, src: int, op: int) -> str:
    if src == OFF_ARCH and k in ARCH_NAMES:
        return ARCH_NAMES[k]
    if src == OFF_NR and k & 0x80000000:
        return str(k - (1 << 32))  # nr is an int: -1 is the "skipped by a tracer" call
    if src == OFF_NR and k & X32_SYSCALL_BIT and (op == JEQ or k != X32_SYSCALL_BIT):
        return f"X32|{k & ~X32_SYSCALL_BIT}"
    if src == OFF_NR:
        return str(k) if k < X32_SYSCALL_BIT else f"{k:#x}"
    return f"{k:#x}"
