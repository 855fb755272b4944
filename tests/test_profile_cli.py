"""``seccomp-supervisor profile check`` and ``profile explain``."""

from __future__ import annotations

import errno
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from supervisor.cli import main
from supervisor.profile import check_profile, parse_profile
from supervisor.profile_cli import explain_lines

from .test_stub import caller, results  # noqa: F401  (caller is a fixture)

DATA = Path(__file__).resolve().parent / "data" / "profiles"
ALL_FLAGS = 0x3F


def base(*rules: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"defaultAction": "SCMP_ACT_ERRNO", **top,
            "syscalls": [{"names": ["read", "write", "exit_group"],
                          "action": "SCMP_ACT_ALLOW"}, *rules]}


def findings(data: Any, supported: int = ALL_FLAGS) -> list[str]:
    return [str(f) for f in check_profile(data, "p.json", supported=supported)]


def one(data: Any, severity: str, supported: int = ALL_FLAGS) -> str:
    """The only finding of ``severity``; its text after ``p.json: ``."""
    got = [f for f in findings(data, supported) if f": {severity}: " in f]
    assert len(got) == 1, got
    return got[0].removeprefix("p.json: ")


# --- each class of mistake ---------------------------------------------------------------

ERRORS = [
    # bad actions
    (base({"names": ["getpid"], "action": "SCMP_ACT_DENY"}),
     "syscalls[1].action: error: unknown action 'SCMP_ACT_DENY'"),
    ({"defaultAction": "ALLOW"}, "defaultAction: error: unknown action 'ALLOW'"),
    # errno values
    (base({"names": ["getpid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 512}),
     "syscalls[1].errnoRet: error: errno 512 is out of range 0..511"),
    (base({"names": ["getpid"], "action": "SCMP_ACT_ERRNO", "errnoRet": -1}),
     "syscalls[1].errnoRet: error: must be a non-negative integer"),
    (base({"names": ["getpid"], "action": "SCMP_ACT_KILL", "errnoRet": 1}),
     "syscalls[1].errnoRet: error: only SCMP_ACT_ERRNO and SCMP_ACT_TRACE take a return code"),
    (base(defaultErrnoRet="EPERM"), "defaultErrnoRet: error: must be an integer, not a string"),
    # NOTIFY on write or as the default
    (base({"names": ["mkdir", "write"], "action": "SCMP_ACT_NOTIFY"}),
     "syscalls[1].names[1]: error: SCMP_ACT_NOTIFY cannot be used for 'write'"),
    ({"defaultAction": "SCMP_ACT_NOTIFY"},
     "defaultAction: error: SCMP_ACT_NOTIFY cannot be the default action"),
    # shape, architectures, flags, operators
    (base(archMap=[]), "archMap: error: unknown key"),
    (base(architectures=["SCMP_ARCH_PDP11"]),
     "architectures[0]: error: unknown architecture 'SCMP_ARCH_PDP11'"),
    (base(flags=["SECCOMP_FILTER_FLAG_FAST"]),
     "flags[0]: error: unknown filter flag 'SECCOMP_FILTER_FLAG_FAST'"),
    (base({"names": ["getpid"], "action": "SCMP_ACT_LOG",
           "args": [{"index": 7, "value": 0, "op": "SCMP_CMP_EQ"}]}),
     "syscalls[1].args[0].index: error: must be an argument index 0..5, not 7"),
    (base({"names": ["getpid"], "action": "SCMP_ACT_LOG",
           "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_IN"}]}),
     "syscalls[1].args[0].op: error: unknown operator 'SCMP_CMP_IN'"),
    ('{"defaultAction": "SCMP_ACT_ALLOW",', "error: invalid JSON: Expecting property name"),
]


@pytest.mark.parametrize(("data", "message"), ERRORS)
def test_check_finds_errors(data: Any, message: str) -> None:
    assert one(data, "error").startswith(message)


def test_check_reports_every_error_not_only_the_first() -> None:
    data = base({"names": ["mkdir", "write"], "action": "SCMP_ACT_NOTIFY"},
                {"names": ["getpid"], "action": "SCMP_ACT_DENY"},
                {"names": ["getppid"], "action": "SCMP_ACT_LOG", "errnoRet": 3},
                defaultErrnoRet=600, flags=["SECCOMP_FILTER_FLAG_LOG", "NOPE"])
    got = [f.split(": error: ")[0] for f in findings(data)]
    assert got == ["p.json: defaultErrnoRet", "p.json: flags[1]", "p.json: syscalls[1].names[1]",
                   "p.json: syscalls[2].action", "p.json: syscalls[3].errnoRet"]


def test_unknown_names_per_architecture() -> None:
    typo = one(base({"names": ["mkdri"], "action": "SCMP_ACT_ALLOW"}), "warning")
    assert typo == ("syscalls[1].names[0]: warning: unknown system call 'mkdri': libseccomp "
                    "knows it on no architecture, so the filter skips it (as runc does); "
                    "did you mean 'mkdir'?")
    arm = one(base({"names": ["arm_fadvise64_64"], "action": "SCMP_ACT_ALLOW"},
                   architectures=["SCMP_ARCH_X86_64", "SCMP_ARCH_X32"]), "warning")
    assert arm.startswith("syscalls[1].names[0]: warning: 'arm_fadvise64_64' exists on none "
                          "of this profile's architectures (x86_64, x32)")
    # Only on some of them: a note, shown with --verbose.
    data = base({"names": ["socketcall", "newfstatat"], "action": "SCMP_ACT_ALLOW"},
                architectures=["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"])
    notes = [f for f in findings(data) if ": note: " in f]
    assert notes == [
        "p.json: syscalls[1].names[0]: note: 'socketcall' exists on x86 but not on x86_64",
        "p.json: syscalls[1].names[1]: note: 'newfstatat' exists on x86_64 but not on x86"]
    # x86_64 alone: socketcall is no call there at all.
    lone = one(base({"names": ["socketcall"], "action": "SCMP_ACT_ALLOW"}), "warning")
    assert "'socketcall' exists on none of this profile's architectures (x86_64)" in lone


def test_duplicate_argument_indexes_explained() -> None:
    same = one(base({"names": ["personality"], "action": "SCMP_ACT_ALLOW", "args": [
        {"index": 0, "value": 0, "op": "SCMP_CMP_EQ"},
        {"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}]}), "warning")
    assert same == (
        "syscalls[1].args: warning: argument 0 is compared more than once; libseccomp "
        "compares an argument at most once per rule, so each condition becomes a rule of "
        "its own (as runc does) and SCMP_ACT_ALLOW applies when ANY holds: "
        "args[0] == 0 OR args[0] == 8")
    mixed = one(base({"names": ["getppid"], "action": "SCMP_ACT_ALLOW", "args": [
        {"index": 0, "value": 5, "op": "SCMP_CMP_GE"},
        {"index": 0, "value": 9, "op": "SCMP_CMP_LE"},
        {"index": 1, "value": 1, "op": "SCMP_CMP_EQ"}]}), "warning")
    assert "args[0] >= 5 OR args[0] <= 9 OR args[1] == 1" in mixed
    assert "the conditions on argument 1 are no longer required together with them" in mixed
    assert "ORed bounds match almost every value" in mixed
    # Distinct indexes are an AND: nothing to say.
    assert findings(base({"names": ["getppid"], "action": "SCMP_ACT_ALLOW", "args": [
        {"index": 0, "value": 5, "op": "SCMP_CMP_GE"},
        {"index": 1, "value": 1, "op": "SCMP_CMP_EQ"}]})) == []


def test_conflicting_actions_name_the_one_that_wins() -> None:
    got = one(base({"names": ["getpid"], "action": "SCMP_ACT_LOG"},
                   {"names": ["getppid", "getpid"], "action": "SCMP_ACT_ERRNO",
                    "errnoRet": errno.EXDEV}), "warning")
    assert got == (
        "syscalls[2].names: warning: 'getpid' has different actions in syscalls[1] "
        "(SCMP_ACT_LOG), syscalls[2] (SCMP_ACT_ERRNO(EXDEV)): the filter applies one of "
        "them (libseccomp keeps the first unconditional rule of a call and drops later "
        "ones); on x86_64 the filter gives LOG")


def test_other_warnings_and_notes() -> None:
    zero = one(base({"names": ["getuid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 0}),
               "warning")
    assert zero.startswith("syscalls[1].errnoRet: warning: SCMP_ACT_ERRNO with errnoRet 0 "
                           "makes the call return 0 without running")
    same = one(base({"names": ["getuid"], "action": "SCMP_ACT_ERRNO"}), "note")
    assert same == ("syscalls[1].action: note: SCMP_ACT_ERRNO(EPERM) is the default action: "
                    "this entry changes nothing and is skipped")


def test_size_limit_and_kernel_flags() -> None:
    from .test_stub import _big_profile

    big = one(_big_profile(170), "error")
    assert re.match(r"error: the filter is \d{4} BPF instructions long \(\d+ from "
                    r"libseccomp and \d+ of the -ENOSYS stub\); the kernel accepts at most "
                    r"4096", big)
    # A kernel without LOG (Linux 4.13), described by its probe result.
    old = one(base(flags=["SECCOMP_FILTER_FLAG_LOG"]), "error", supported=0x1)
    assert old == ("error: flags: SECCOMP_FILTER_FLAG_LOG is not supported by this kernel "
                   "(it needs Linux 4.14 or later)")


def test_clean_profiles_have_no_findings() -> None:
    assert findings(base()) == []
    assert findings((DATA / "notify-mkdir.json").read_text()) == []


# --- the command ----------------------------------------------------------------------------


def write(tmp_path: Path, data: Any) -> str:
    path = tmp_path / "p.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_check_exit_status_and_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clean = write(tmp_path, base())
    assert main(["profile", "check", clean]) == 0
    assert capsys.readouterr().out == f"{clean}: OK (0 errors, 0 warnings, 0 notes)\n"

    warned = write(tmp_path, base({"names": ["mkdri"], "action": "SCMP_ACT_ALLOW"},
                                  {"names": ["getuid"], "action": "SCMP_ACT_ERRNO"}))
    assert main(["profile", "check", warned]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{warned}: syscalls[1].names[0]: warning: unknown system call")
    assert out[1] == f"{warned}: OK (0 errors, 1 warning, 1 note)"
    assert main(["profile", "check", "--strict", "--verbose", warned]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and ": note: " in out[1]
    assert out[2] == f"{warned}: FAILED (0 errors, 1 warning, 1 note)"

    broken = write(tmp_path, {"defaultAction": "SCMP_ACT_NOTIFY"})
    assert main(["profile", "check", broken]) == 1
    assert "FAILED (1 error, 0 warnings, 0 notes)" in capsys.readouterr().out
    assert main(["profile", "check", str(tmp_path / "missing.json")]) == 2
    assert "cannot read the profile" in capsys.readouterr().err


def test_check_as_a_real_command(tmp_path: Path) -> None:
    path = write(tmp_path, base({"names": ["write"], "action": "SCMP_ACT_NOTIFY"}))
    proc = subprocess.run([sys.executable, "-m", "supervisor", "profile", "check", path],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1
    assert "syscalls[1].names[0]: error: SCMP_ACT_NOTIFY cannot be used for 'write'" in proc.stdout


# --- explain ---------------------------------------------------------------------------------


def explain(data: dict[str, Any], **kw: Any) -> list[str]:
    return list(explain_lines(parse_profile(data, "p.json"), supported=ALL_FLAGS, **kw))


def test_explain_shows_flags_stub_actions_and_program() -> None:
    data = base({"names": ["mkdir"], "action": "SCMP_ACT_NOTIFY"},
                {"names": ["getpriority"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EXDEV,
                 "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_EQ"}]},
                architectures=["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"],
                flags=["SECCOMP_FILTER_FLAG_LOG"])
    lines = explain(data)
    text = "\n".join(lines)
    assert lines[:5] == [
        "p.json",
        "  default action: SCMP_ACT_ERRNO(EPERM)",
        "  architectures:  x86_64, x86 (x86_64 is native: always there)",
        "  filter flags:   LOG|NEW_LISTENER|WAIT_KILLABLE_RECV (added: NEW_LISTENER for the "
        "notify rules; WAIT_KILLABLE_RECV by default (this kernel has it))",
        "  -ENOSYS stub:   ERRNO(ENOSYS) for calls numbered above 231 (exit_group) on "
        "x86_64, above 252 (exit_group) on x86",
    ]
    assert "        83 mkdir                    NOTIFY" in lines
    assert ("       140 getpriority              ERRNO(EPERM)  with all arguments 0; entries: "
            "SCMP_ACT_ERRNO(EXDEV) if args[0] == 1") in lines
    assert "  every other call numbered up to 231: SCMP_ACT_ERRNO(EPERM) (default action)" in lines
    assert "  every call numbered above 252: ERRNO(ENOSYS) (-ENOSYS stub)" in lines
    header = next(i for i, line in enumerate(lines) if line.startswith("program: "))
    m = re.match(r"program: (\d+) instructions \((\d+) of the -ENOSYS stub", lines[header])
    assert m is not None
    program = lines[header + 1:]
    assert len(program) == int(m.group(1))
    assert program[int(m.group(2)) - 1].endswith("  return ERRNO(ENOSYS)")
    assert "return NOTIFY" in text
    assert program[0] == "  0000  A = arch"
    assert any(line.endswith("# mkdir") for line in program)


def test_explain_allow_default_has_no_stub_and_all_lists_every_call() -> None:
    lines = explain({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["getpriority"], "action": "SCMP_ACT_ERRNO"}]}, all_calls=True,
        program=False)
    assert ("  -ENOSYS stub:   none (SCMP_ACT_ALLOW is allow-like: unnamed calls already "
            "run)") in lines
    rows = [line for line in lines if re.match(r"\s+\d+ \w", line)]
    assert len(rows) > 300
    assert "         0 read                     ALLOW" in rows
    assert "       140 getpriority              ERRNO(EPERM)" in rows
    assert not any(line.startswith("program: ") for line in lines)


def test_explain_matches_the_kernel(caller: Path) -> None:  # noqa: F811
    """What explain says each x86_64 call gets is what the kernel gives."""
    from supervisor.profile import build_program

    data = base({"names": ["getpriority"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EXDEV},
                {"names": ["getppid"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.ENOENT},
                {"names": ["getcpu"], "action": "SCMP_ACT_ALLOW"})
    profile = parse_profile(data, "p.json")
    lines = explain_lines(profile, supported=ALL_FLAGS, all_calls=True, program=False)
    claims: dict[int, str] = {}
    for line in lines:
        if line.startswith("effective actions on x86") and "x86_64" not in line:
            break
        m = re.match(r"\s+(\d+) (\w+)\s+(\S+)", line)
        if m:
            claims[int(m.group(1))] = m.group(3)
    probe = {110: "ERRNO(ENOENT)", 140: "ERRNO(EXDEV)", 309: "ALLOW", 39: "ERRNO(EPERM)",
             310: "ERRNO(ENOSYS)", 424: "ERRNO(ENOSYS)"}
    for number, action in probe.items():
        assert claims[number] == action
    got = results(caller, build_program(profile), [f"n:{n}" for n in probe])
    want = [0 if a == "ALLOW" else -getattr(errno, a.removeprefix("ERRNO(")[:-1])
            for a in probe.values()]
    assert got == want


def test_explain_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(tmp_path, base())
    assert main(["profile", "explain", "--no-program", good]) == 0
    assert capsys.readouterr().out.startswith(f"{good}\n  default action: ")
    bad = write(tmp_path, {"defaultAction": "SCMP_ACT_NOTIFY"})
    assert main(["profile", "explain", bad]) == 1
    err = capsys.readouterr().err
    assert "defaultAction: SCMP_ACT_NOTIFY cannot be the default action" in err
    assert f"seccomp-supervisor profile check {bad}" in err
