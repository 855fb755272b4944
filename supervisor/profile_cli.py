"""``seccomp-supervisor profile check`` and ``profile explain``.

``check`` lists every problem of an OCI seccomp profile (:func:`supervisor.profile.
check_profile`). ``explain`` shows what the filter built from it does: the flags it is
loaded with, the ``-ENOSYS`` stub, the effective action of each system call per
architecture (found by running the generated BPF program in
:func:`supervisor.bpfprog.run`, not by reading the profile), and the program itself as
pseudo-code. The text is made by pure functions; :func:`cmd_check` and
:func:`cmd_explain` only read the file and print.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Iterator, Mapping
from typing import Final

import pyseccomp

from . import abi, bpf, bpfprog
from .errors import ProfileError
from .profile import (
    Profile,
    SyscallRule,
    check_profile,
    compile_profile,
    describe_action,
    describe_conditions,
    filter_architectures,
    filter_flags,
    parse_profile,
)

__all__ = ["add_parser", "cmd_check", "cmd_explain", "explain_lines", "main"]

EXIT_OK: Final = 0
EXIT_PROBLEMS: Final = 1
EXIT_USAGE: Final = 2

_TOKENS: Final[Mapping[str, int]] = {
    "x86_64": pyseccomp.Arch.X86_64, "x86": pyseccomp.Arch.X86, "x32": pyseccomp.Arch.X32,
}
_AUDIT: Final[Mapping[str, int]] = {
    "x86_64": abi.AUDIT_ARCH_X86_64, "x86": abi.AUDIT_ARCH_I386, "x32": abi.AUDIT_ARCH_X86_64,
}


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``profile check|explain`` to the main command's subparsers."""
    profile = sub.add_parser("profile", help="check or explain an OCI seccomp profile")
    what = profile.add_subparsers(dest="profile_command", required=True)
    check = what.add_parser(
        "check", help="list every problem of a profile",
        description="List the errors (the runtime, libseccomp or the kernel would refuse "
                    "them), warnings (probably not what you meant) and, with --verbose, "
                    "notes of an OCI seccomp profile or config.json. Exit status 1 when "
                    "there are errors (or warnings, with --strict).")
    check.add_argument("profile", metavar="PROFILE.json")
    check.add_argument("--strict", action="store_true", help="fail on warnings too")
    check.add_argument("--verbose", "-v", action="store_true", help="show notes too")
    explain = what.add_parser(
        "explain", help="show the effective action per system call and the BPF program",
        description="Build the filter as `run` would and show its flags, the -ENOSYS "
                    "stub, the effective action of each system call the profile names "
                    "(or of every call, with --all) per architecture, and the program "
                    "as pseudo-code.")
    explain.add_argument("profile", metavar="PROFILE.json")
    explain.add_argument("--all", action="store_true",
                         help="list every system call, not only the named ones")
    explain.add_argument("--no-program", action="store_true",
                         help="leave out the pseudo-code")


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def cmd_check(args: argparse.Namespace) -> int:
    """Print the findings of ``args.profile``, one a line, and a summary."""
    try:
        text = _read(args.profile)
    except OSError as exc:
        print(f"{args.profile}: cannot read the profile: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    findings = check_profile(text, args.profile)
    counts = {s: sum(1 for f in findings if f.severity == s)
              for s in ("error", "warning", "note")}
    for finding in findings:
        if finding.severity != "note" or args.verbose:
            print(finding)
    summary = ", ".join(f"{n} {s}{'s' if n != 1 else ''}" for s, n in counts.items())
    failed = counts["error"] or (args.strict and counts["warning"])
    print(f"{args.profile}: {'FAILED' if failed else 'OK'} ({summary})")
    return EXIT_PROBLEMS if failed else EXIT_OK


def cmd_explain(args: argparse.Namespace) -> int:
    """Print :func:`explain_lines` for ``args.profile``."""
    try:
        profile = parse_profile(_read(args.profile), args.profile)
        lines = list(explain_lines(profile, all_calls=args.all, program=not args.no_program))
    except OSError as exc:
        print(f"{args.profile}: cannot read the profile: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    except ProfileError as exc:
        print(f"{exc}\n(run `seccomp-supervisor profile check {args.profile}` for every "
              "problem)", file=sys.stderr)
        return EXIT_PROBLEMS
    print("\n".join(lines))
    return EXIT_OK


@functools.cache
def _names(arch: str) -> Mapping[int, str]:
    """Number → name of every call libseccomp knows in ``arch`` (x32 numbers with the
    x32 bit)."""
    base = abi.X32_SYSCALL_BIT if arch == "x32" else 0
    out: dict[int, str] = {}
    for nr in range(base, base + 1024):
        try:
            name = pyseccomp.resolve_syscall(_TOKENS[arch], nr)
        except (OSError, ValueError):
            continue
        if name:
            out[nr] = name.decode() if isinstance(name, bytes) else str(name)
    return out


def _number(arch: str, name: str) -> int | None:
    try:
        nr = int(pyseccomp.resolve_syscall(_TOKENS[arch], name))
    except (OSError, ValueError):
        return None
    return nr if nr >= 0 else None


def _short(nr: int) -> str:
    return f"X32|{nr & ~abi.X32_SYSCALL_BIT}" if nr & abi.X32_SYSCALL_BIT else str(nr)


def explain_lines(profile: Profile, *, all_calls: bool = False, program: bool = True,
                  supported: int | None = None) -> Iterator[str]:
    """The text of ``profile explain``. ``supported`` is the kernel's filter flag bits
    (probed when None). Raises :class:`ProfileError` if the profile cannot be built."""
    built = compile_profile(profile, warn=lambda _message: None)
    insns = built.instructions
    arches = filter_architectures(profile.architectures)
    default = describe_action(profile.default_action, profile.default_errno_ret)
    if supported is None:
        supported = bpf.supported_filter_flags()
    flags = filter_flags(profile, supported=supported)

    yield f"{profile.source}"
    yield f"  default action: {default}"
    skipped = [a for a in profile.architectures if a not in (
        "SCMP_ARCH_NATIVE", "SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32")]
    yield ("  architectures:  " + ", ".join(arches) + " (x86_64 is native: always there)"
           + (f"; skipped here: {', '.join(skipped)}" if skipped else ""))
    asked = bpf.describe_flags(flags)
    extra = []
    if flags & abi.SECCOMP_FILTER_FLAG_NEW_LISTENER:
        extra.append("NEW_LISTENER for the notify rules")
    if (flags & abi.SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
            and "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV" not in profile.flags):
        extra.append("WAIT_KILLABLE_RECV by default (this kernel has it)")
    if flags & abi.SECCOMP_FILTER_FLAG_TSYNC_ESRCH:
        extra.append("TSYNC_ESRCH, which TSYNC with a listener needs")
    yield f"  filter flags:   {asked}" + (f" (added: {'; '.join(extra)})" if extra else "")
    limits = built.limits
    if limits is None:
        yield (f"  -ENOSYS stub:   none ({profile.default_action} is allow-like: unnamed "
               "calls already run)")
    else:
        parts = []
        for arch, limit in (("x86_64", limits.x86_64), ("x86", limits.x86),
                            ("x32", limits.x32)):
            if arch not in arches:
                continue
            if limit is None:
                parts.append(f"none on {arch} (it names no call there)")
            else:
                parts.append(f"above {_short(limit)} ({_names(arch).get(limit, '?')}) on "
                             f"{arch}")
        yield "  -ENOSYS stub:   ERRNO(ENOSYS) for calls numbered " + ", ".join(parts)

    rules_for: dict[str, list[SyscallRule]] = {}
    for rule in profile.syscalls:
        for name in rule.names:
            rules_for.setdefault(name, []).append(rule)
    for arch in arches:
        limit = None if limits is None else getattr(limits, arch)
        yield ""
        yield (f"effective actions on {arch} (from the program; calls whose answer "
               "depends on arguments show the entries and the answer with all arguments 0):")
        if all_calls:
            numbers = sorted(_names(arch))
        else:
            numbers = sorted({nr for name in rules_for
                              if (nr := _number(arch, name)) is not None})
        for nr in numbers:
            name = _names(arch).get(nr, f"nr_{nr}")
            result = bpfprog.run(insns, bpfprog.pack_data(nr, _AUDIT[arch]))
            action = bpfprog.action_name(result.value)
            line = f"  {_short(nr):>8} {name:<24} {action}"
            if limit is not None and nr > limit:
                line += "  (-ENOSYS stub)"
            if result.reads_args:
                entries = "; ".join(
                    f"{describe_action(r.action, r.errno_ret)} if {describe_conditions(r)}"
                    if r.args else describe_action(r.action, r.errno_ret)
                    for r in rules_for.get(name, []))
                line += f"  with all arguments 0; entries: {entries}"
            yield line
        unknown = [n for n in rules_for if _number(arch, n) is None]
        if unknown and not all_calls:
            yield f"  not on {arch} (no rule in this section): {', '.join(unknown)}"
        below = f" numbered up to {_short(limit)}" if limit is not None else ""
        yield f"  every other call{below}: {default} (default action)"
        if limit is not None:
            yield f"  every call numbered above {_short(limit)}: ERRNO(ENOSYS) (-ENOSYS stub)"

    if program:
        yield ""
        stub = (f"{built.stub_length} of the -ENOSYS stub, then " if built.stub_length
                else "")
        yield (f"program: {built.length} instructions ({stub}{built.filter_length} from "
               f"libseccomp); the kernel accepts at most {bpfprog.BPF_MAXINSNS}")
        names = {(_AUDIT[arch], nr): name for arch in ("x86_64", "x86", "x32")
                 for nr, name in _names(arch).items()}
        for line in bpfprog.disassemble(insns, names=names):
            yield "  " + line


def main(args: argparse.Namespace) -> int:
    """Dispatch ``profile check|explain``."""
    if args.profile_command == "check":
        return cmd_check(args)
    return cmd_explain(args)
