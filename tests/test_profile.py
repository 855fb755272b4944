"""OCI seccomp profiles: parsing, validation, and the built filters on the real kernel."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyseccomp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor import abi, spawn
from supervisor.errors import ProfileError
from supervisor.profile import (
    Action,
    ArgRule,
    Operator,
    Profile,
    SyscallRule,
    build_filter,
    build_program,
    dump_profile,
    filter_flags,
    load_profile,
    notify_profile,
    parse_profile,
)

DATA = Path(__file__).resolve().parent / "data" / "profiles"
PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)
PRIO_PROCESS, PRIO_PGRP, PRIO_USER = 0, 1, 2

# Runs in a fresh interpreter: installs the program read from stdin with the flags in
# argv[2], then runs the test's code (argv[3]) under it. Everything the code needs is
# imported before the filter is in place.
_CHILD = """
import ctypes, json, mmap, os, resource, sys, threading
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a SIGSYS kill leaves no core file
sys.path.insert(0, sys.argv[1])
from supervisor import bpf

def call(fn, *args):
    try:
        fn(*args)
    except OSError as exc:
        return exc.errno
    return 0

program = sys.stdin.buffer.read()
bpf.set_no_new_privs()
bpf.install_filter(program, int(sys.argv[2]))
exec(sys.argv[3])
"""


def run_filtered(program: bytes, code: str, flags: int = 0) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a child under ``program``; the child is always waited for (and
    killed after 30 s). For filters without notify rules: spawn_filtered needs a listener."""
    proc = subprocess.run(
        [sys.executable, "-I", "-B", "-c", _CHILD, PACKAGE_PARENT, str(flags), code],
        input=program, capture_output=True, timeout=30, check=False, cwd="/",
    )
    return subprocess.CompletedProcess(proc.args, proc.returncode,
                                       proc.stdout.decode(), proc.stderr.decode())


def results(profile: Profile, code: str) -> Any:
    """Run ``code`` (which prints one JSON value) under ``profile``; return that value."""
    proc = run_filtered(build_program(profile), code, filter_flags(profile))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def native_syscalls() -> list[str]:
    """Every x86_64 system call name libseccomp knows."""
    names = []
    for nr in range(1024):
        try:
            names.append(pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, nr).decode())
        except ValueError:
            continue
    return names


def profile(*rules: dict[str, Any], **top: Any) -> Profile:
    return parse_profile({"defaultAction": "SCMP_ACT_ALLOW", **top, "syscalls": list(rules)},
                         "test.json")


def getpriority_rule(*args: dict[str, Any]) -> dict[str, Any]:
    return {"names": ["getpriority"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EXDEV,
            "args": list(args)}


def cond(index: int, op: str, value: int, value_two: int = 0) -> dict[str, Any]:
    return {"index": index, "value": value, "valueTwo": value_two, "op": f"SCMP_CMP_{op}"}


GETPRIORITY_CODE = (
    "print(json.dumps([call(os.getpriority, w, who) "
    "for w, who in [(0, 0), (1, 0), (2, 0), (0, os.getpid())]]))"
)


# --- parsing and validation ------------------------------------------------------------


def test_parse_spec_example_fields() -> None:
    p = parse_profile((DATA / "notify-mkdir.json").read_text(), "notify-mkdir.json")
    assert p.default_action is Action.ALLOW
    assert p.flags == ("SECCOMP_FILTER_FLAG_TSYNC", "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV")
    assert p.listener_path == "/run/seccomp-supervisor/notify.sock"
    assert p.listener_metadata == "team=build\nMKDIR=deny"
    assert p.syscalls == (SyscallRule(("mkdir", "mkdirat"), Action.NOTIFY),)
    assert p.has_notify
    assert p.source == "notify-mkdir.json"


def test_parse_args_and_defaults() -> None:
    p = load_profile(DATA / "portable.json")
    assert p.default_errno_ret == 1
    assert p.syscalls[1].args == (ArgRule(0, 0, Operator.EQ),)
    assert p.syscalls[2].args == (ArgRule(0, 2114060288, Operator.MASKED_EQ, 0),)
    assert p.syscalls[3].errno_ret == errno.ENOSYS
    assert p.syscalls[4].errno_ret is None
    assert not p.has_notify


def test_full_oci_config_reads_linux_seccomp() -> None:
    p = load_profile(DATA / "config.json")
    assert p.architectures == ("SCMP_ARCH_X86", "SCMP_ARCH_X32")
    assert p.syscalls[0].names == ("getcwd", "chmod")
    with pytest.raises(ProfileError, match=r"^c\.json: linux\.seccomp: missing"):
        parse_profile({"ociVersion": "1.0.2", "linux": {}}, "c.json")
    bad = {"ociVersion": "1.0.2", "linux": {"seccomp": {"defaultAction": "SCMP_ACT_NO"}}}
    with pytest.raises(ProfileError, match=r"^c\.json \(linux\.seccomp\): defaultAction: "):
        parse_profile(bad, "c.json")


def test_null_means_absent() -> None:
    p = parse_profile('{"defaultAction": "SCMP_ACT_ALLOW", "architectures": null, '
                      '"syscalls": [{"names": ["getcwd"], "action": "SCMP_ACT_ERRNO", '
                      '"errnoRet": null, "args": null}]}')
    assert p == Profile(Action.ALLOW, syscalls=(SyscallRule(("getcwd",), Action.ERRNO),))


@pytest.mark.parametrize("name", sorted(p.name for p in DATA.glob("*.json")
                                        if p.name != "bad-op.json"))
def test_dump_round_trips_and_is_stable(name: str) -> None:
    p = load_profile(DATA / name)
    text = dump_profile(p)
    assert parse_profile(text) == p
    assert dump_profile(parse_profile(text)) == text
    assert text.endswith("}\n")


def test_dump_key_order() -> None:
    p = load_profile(DATA / "portable.json")
    d = p.to_dict()
    assert list(d) == ["defaultAction", "defaultErrnoRet", "architectures", "syscalls"]
    assert list(d["syscalls"][1]) == ["names", "action", "args"]
    assert list(d["syscalls"][1]["args"][0]) == ["index", "value", "valueTwo", "op"]
    assert list(d["syscalls"][3]) == ["names", "action", "errnoRet"]
    assert json.loads(dump_profile(p)) == d


def test_load_profile_names_file_and_location() -> None:
    path = DATA / "bad-op.json"
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert str(info.value).startswith(
        f"{path}: syscalls[3].args[0].op: unknown operator 'SCMP_CMP_FOO'"
    )


def test_load_profile_missing_file() -> None:
    with pytest.raises(ProfileError, match=r"nope\.json: cannot read the profile"):
        load_profile(DATA / "nope.json")


BAD = [
    ({"defaultAction": "SCMP_ACT_NOPE"}, "defaultAction: unknown action 'SCMP_ACT_NOPE'"),
    ({}, "defaultAction: missing"),
    ({"defaultAction": 3}, "defaultAction: must be a string, not an integer"),
    ({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": "1"},
     "defaultErrnoRet: must be an integer, not a string"),
    ({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 512},
     "defaultErrnoRet: errno 512 is out of range"),
    ({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": -1},
     "defaultErrnoRet: must be a non-negative integer"),
    ({"defaultAction": "SCMP_ACT_KILL", "defaultErrnoRet": 1},
     "defaultErrnoRet: only SCMP_ACT_ERRNO and SCMP_ACT_TRACE take a return code"),
    ({"defaultAction": "SCMP_ACT_TRACE", "defaultErrnoRet": 65536},
     "defaultErrnoRet: the SCMP_ACT_TRACE message 65536 does not fit in 16 bits"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86", "SCMP_ARCH_Z80"]},
     "architectures[1]: unknown architecture 'SCMP_ARCH_Z80'"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "architectures": "SCMP_ARCH_X86"},
     "architectures: must be an array, not a string"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "flags": ["SECCOMP_FILTER_FLAG_BOGUS"]},
     "flags[0]: unknown filter flag 'SECCOMP_FILTER_FLAG_BOGUS'"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "listenerMetadata": "a=b"},
     "listenerMetadata: must not be set without listenerPath"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "archMap": []},
     "archMap: unknown key; expected one of defaultAction"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": {}},
     "syscalls: must be an array, not an object"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": [], "action": "SCMP_ACT_LOG"}]},
     "syscalls[0].names: must name at least one system call"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"action": "SCMP_ACT_LOG"}]},
     "syscalls[0].names: missing"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"name": "x", "action": "SCMP_ACT_LOG"}]},
     "syscalls[0].name: unknown key"),
    ({"defaultAction": "SCMP_ACT_ALLOW",
      "syscalls": [{"names": ["a"], "action": "SCMP_ACT_LOG", "includes": {}}]},
     "syscalls[0].includes: unknown key"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["get cwd"],
                                                       "action": "SCMP_ACT_LOG"}]},
     "syscalls[0].names[0]: 'get cwd' is not a system call name"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["a"], "action": "ALLOW"}]},
     "syscalls[0].action: unknown action 'ALLOW'"),
    ({"defaultAction": "SCMP_ACT_ALLOW",
      "syscalls": [{"names": ["a"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1.5}]},
     "syscalls[0].errnoRet: must be an integer, not a number"),
    ({"defaultAction": "SCMP_ACT_ALLOW",
      "syscalls": [{"names": ["a"], "action": "SCMP_ACT_ERRNO", "errnoRet": 4095}]},
     "syscalls[0].errnoRet: errno 4095 is out of range 0..511"),
    ({"defaultAction": "SCMP_ACT_ALLOW",
      "syscalls": [{"names": ["a"], "action": "SCMP_ACT_LOG", "errnoRet": 1}]},
     "syscalls[0].errnoRet: only SCMP_ACT_ERRNO and SCMP_ACT_TRACE"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["a"], "action": "SCMP_ACT_LOG"},
        {"names": ["b"], "action": "SCMP_ACT_LOG", "args": [cond(0, "EQ", 1) | {"op": "EQ"}]},
    ]}, "syscalls[1].args[0].op: unknown operator 'EQ'"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["b"], "action": "SCMP_ACT_LOG", "args": [cond(6, "EQ", 1)]}]},
     "syscalls[0].args[0].index: must be an argument index 0..5, not 6"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["b"], "action": "SCMP_ACT_LOG", "args": [cond(0, "EQ", 2**64)]}]},
     "syscalls[0].args[0].value: must be an unsigned 64-bit integer"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["b"], "action": "SCMP_ACT_LOG", "args": [cond(0, "MASKED_EQ", 1, -2)]}]},
     "syscalls[0].args[0].valueTwo: must be an unsigned 64-bit integer"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["b"], "action": "SCMP_ACT_LOG", "args": [{"index": 0, "op": "SCMP_CMP_EQ"}]}]},
     "syscalls[0].args[0].value: missing"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["b"], "action": "SCMP_ACT_LOG", "args": [cond(True, "EQ", 1)]}]},
     "syscalls[0].args[0].index: must be an integer, not a boolean"),
]


@pytest.mark.parametrize(("data", "message"), BAD)
def test_invalid_profiles_name_the_location(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ProfileError) as info:
        parse_profile(data, "p.json")
    assert str(info.value).startswith(f"p.json: {message}")
    # The same text as JSON gives the same message.
    with pytest.raises(ProfileError) as again:
        parse_profile(json.dumps(data), "p.json")
    assert str(again.value) == str(info.value)


@pytest.mark.parametrize(("text", "message"), [
    ('{"defaultAction": "SCMP_ACT_ALLOW",', "invalid JSON: Expecting property name"),
    ('{"defaultAction": "SCMP_ACT_ALLOW", "defaultAction": "SCMP_ACT_LOG"}',
     "invalid JSON: duplicate key 'defaultAction'"),
    (b"\xff\xfe\x00", "invalid JSON"),
    ("[" * 100_000, "invalid JSON"),
    ("[]", "(top level): must be an object, not an array"),
])
def test_invalid_json(text: str | bytes, message: str) -> None:
    with pytest.raises(ProfileError) as info:
        parse_profile(text, "p.json")
    assert str(info.value).startswith(f"p.json: {message}")


def test_notify_refused_as_default_action() -> None:
    with pytest.raises(ProfileError, match=r"^p\.json: defaultAction: SCMP_ACT_NOTIFY cannot "
                                           r"be the default action: .*write"):
        parse_profile({"defaultAction": "SCMP_ACT_NOTIFY"}, "p.json")
    with pytest.raises(ProfileError, match="cannot be the default action"):
        notify_profile(["mkdir"], default_action="SCMP_ACT_NOTIFY")


def test_notify_refused_for_write() -> None:
    data = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["read"], "action": "SCMP_ACT_NOTIFY"},
        {"names": ["mkdir", "write"], "action": "SCMP_ACT_NOTIFY"}]}
    with pytest.raises(ProfileError, match=r"^p\.json: syscalls\[1\]\.names\[1\]: "
                                           r"SCMP_ACT_NOTIFY cannot be used for 'write'"):
        parse_profile(data, "p.json")
    with pytest.raises(ProfileError, match="cannot be used for 'write'"):
        notify_profile(["mkdir", "write"])
    # write may have any other action.
    parse_profile({"defaultAction": "SCMP_ACT_ALLOW",
                   "syscalls": [{"names": ["write"], "action": "SCMP_ACT_LOG"}]})


def test_direct_construction_is_validated() -> None:
    with pytest.raises(ProfileError, match=r"^<profile>: syscalls\[0\]\.args\[0\]\.index"):
        Profile(Action.ALLOW, syscalls=(
            SyscallRule(("getcwd",), Action.ERRNO, args=(ArgRule(9, 0, Operator.EQ),)),))
    with pytest.raises(ProfileError, match=r"^learned: defaultErrnoRet"):
        Profile(Action.ALLOW, default_errno_ret=1, source="learned")


def test_notify_profile() -> None:
    p = notify_profile(["mkdir", "getppid", "mkdir"])
    assert p == Profile(Action.ALLOW,
                        syscalls=(SyscallRule(("mkdir", "getppid"), Action.NOTIFY),))
    assert p.has_notify
    assert notify_profile("mkdir").syscalls[0].names == ("mkdir",)
    assert notify_profile(["mkdir"], "SCMP_ACT_LOG").default_action is Action.LOG
    with pytest.raises(ProfileError, match="no system call to notify"):
        notify_profile([])
    with pytest.raises(ProfileError, match="unknown system call 'mkdri'"):
        notify_profile(["mkdri"])
    with pytest.raises(ProfileError, match="unknown default action 'SCMP_ACT_YES'"):
        notify_profile(["mkdir"], "SCMP_ACT_YES")


ALL_FLAGS = (abi.SECCOMP_FILTER_FLAG_TSYNC | abi.SECCOMP_FILTER_FLAG_LOG
             | abi.SECCOMP_FILTER_FLAG_SPEC_ALLOW | abi.SECCOMP_FILTER_FLAG_NEW_LISTENER
             | abi.SECCOMP_FILTER_FLAG_TSYNC_ESRCH | abi.SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV)


def test_filter_flags() -> None:
    """Pure: the bits for a kernel that has every flag (tests/test_filter_flags.py loads
    them on the real one)."""
    base = {"defaultAction": "SCMP_ACT_ALLOW"}
    notify = {"syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_NOTIFY"}]}
    listener = abi.SECCOMP_FILTER_FLAG_NEW_LISTENER
    killable = abi.SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV

    def flags(data: dict[str, Any], **kw: Any) -> int:
        return filter_flags(parse_profile(data), supported=ALL_FLAGS, **kw)

    assert flags(base) == 0
    # WAIT_KILLABLE_RECV is on by default for notify profiles, and can be left out.
    assert flags(base | notify) == listener | killable
    assert flags(base | notify, wait_killable=False) == listener
    both = {"flags": ["SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_SPEC_ALLOW"]}
    assert flags(base | both) == (
        abi.SECCOMP_FILTER_FLAG_LOG | abi.SECCOMP_FILTER_FLAG_SPEC_ALLOW
    )
    asked = {"flags": ["SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV"]}
    assert flags(base | asked) == 0  # the kernel refuses it without a listener
    assert flags(base | asked | notify) == killable | listener
    assert flags(base | asked | notify, wait_killable=False) == killable | listener
    tsync = {"flags": ["SECCOMP_FILTER_FLAG_TSYNC"]}
    assert flags(base | tsync) == abi.SECCOMP_FILTER_FLAG_TSYNC
    assert flags(base | tsync | notify) == (
        abi.SECCOMP_FILTER_FLAG_TSYNC | abi.SECCOMP_FILTER_FLAG_TSYNC_ESRCH | listener | killable
    )


# --- building: what libseccomp gets ---------------------------------------------------


def test_unknown_syscall_and_foreign_arches_skipped_with_warnings() -> None:
    warnings: list[str] = []
    p = load_profile(DATA / "portable.json")
    flt = build_filter(p, warn=warnings.append)
    src = str(DATA / "portable.json")
    assert warnings == [
        f"{src}: architectures[3]: SCMP_ARCH_AARCH64 skipped: this machine runs x86_64, x86 "
        "and x32 code only",
        f"{src}: architectures[4]: SCMP_ARCH_ARM skipped: this machine runs x86_64, x86 "
        "and x32 code only",
        f"{src}: syscalls[0].names[4]: unknown system call 'no_such_call_for_the_tests' "
        "skipped (this libseccomp does not know it)",
    ]
    assert flt.exist_arch(pyseccomp.Arch.X86)
    assert flt.exist_arch(pyseccomp.Arch.X32)
    assert not flt.exist_arch(pyseccomp.Arch.AARCH64)
    assert flt.get_attr(pyseccomp.Attr.ACT_BADARCH) == pyseccomp.KILL_PROCESS


def test_default_warn_logs(caplog: pytest.LogCaptureFixture) -> None:
    p = profile({"names": ["getcwd", "no_such_call_for_the_tests"], "action": "SCMP_ACT_LOG"})
    with caplog.at_level(logging.WARNING, logger="supervisor.profile"):
        build_program(p)
    assert [r.getMessage() for r in caplog.records] == [
        "test.json: syscalls[0].names[1]: unknown system call 'no_such_call_for_the_tests' "
        "skipped (this libseccomp does not know it)"
    ]
    assert caplog.records[0].levelno == logging.WARNING


def test_rule_equal_to_default_is_skipped() -> None:
    # libseccomp alone refuses it (EACCES).
    with pytest.raises(PermissionError):
        pyseccomp.SyscallFilter(pyseccomp.ERRNO(errno.EPERM)).add_rule(
            pyseccomp.ERRNO(errno.EPERM), "getcwd")
    p = parse_profile({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
        {"names": ["getcwd"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EPERM},
        {"names": ["getcwd"], "action": "SCMP_ACT_ERRNO"}]})
    assert build_program(p)


def test_split_warns_when_other_indices_are_mixed_in() -> None:
    warnings: list[str] = []
    build_program(profile(getpriority_rule(cond(0, "EQ", 0), cond(0, "EQ", 1),
                                           cond(1, "EQ", 0))), warn=warnings.append)
    assert len(warnings) == 1
    assert warnings[0].startswith("test.json: syscalls[0].args: an argument index appears")
    warnings.clear()
    build_program(profile(getpriority_rule(cond(0, "EQ", 0), cond(0, "EQ", 1))),
                  warn=warnings.append)
    assert warnings == []


# --- the built filters on the real kernel ---------------------------------------------


def test_default_errno_with_errno_ret_and_allowed_calls() -> None:
    allowed = [n for n in native_syscalls() if n not in ("getcwd", "getpriority", "getsid")]
    p = parse_profile({
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": errno.EXDEV,
        "syscalls": [
            {"names": allowed, "action": "SCMP_ACT_ALLOW"},
            {"names": ["getpriority"], "action": "SCMP_ACT_ERRNO"},  # errnoRet: EPERM
        ],
    })
    out = results(p, "print(json.dumps([call(os.getcwd), call(os.getppid), "
                     "call(os.getpriority, 0, 0), call(os.getsid, 0)]))")
    assert out == [errno.EXDEV, 0, errno.EPERM, errno.EXDEV]


def test_errno_rule_without_errno_ret_is_eperm() -> None:
    p = profile({"names": ["getcwd"], "action": "SCMP_ACT_ERRNO"})
    assert results(p, "print(json.dumps([call(os.getcwd), call(os.getppid)]))") == [
        errno.EPERM, 0]


def test_argument_rule_matches_or_not() -> None:
    p = profile(getpriority_rule(cond(0, "EQ", PRIO_PGRP)))
    assert results(p, GETPRIORITY_CODE) == [0, errno.EXDEV, 0, 0]


def test_conditions_on_distinct_indices_are_and() -> None:
    p = profile(getpriority_rule(cond(0, "EQ", PRIO_PROCESS), cond(1, "EQ", 0)))
    assert results(p, GETPRIORITY_CODE) == [errno.EXDEV, 0, 0, 0]


def test_conditions_on_the_same_index_are_split_into_or() -> None:
    # libseccomp refuses both in one rule.
    with pytest.raises(OSError, match="Invalid argument"):
        pyseccomp.SyscallFilter(pyseccomp.ALLOW).add_rule(
            pyseccomp.ERRNO(1), "getpriority",
            pyseccomp.Arg(0, pyseccomp.EQ, 0), pyseccomp.Arg(0, pyseccomp.EQ, 1))
    p = profile(getpriority_rule(cond(0, "EQ", PRIO_PROCESS), cond(0, "EQ", PRIO_PGRP)))
    assert results(p, GETPRIORITY_CODE) == [errno.EXDEV, errno.EXDEV, 0, errno.EXDEV]


def test_masked_eq_value_is_the_mask() -> None:
    # (which & 3) == 2: only PRIO_USER. The other order would never match.
    p = profile(getpriority_rule(cond(0, "MASKED_EQ", 3, PRIO_USER)))
    assert results(p, GETPRIORITY_CODE) == [0, 0, errno.EXDEV, 0]


def test_unknown_syscall_skipped_filter_still_works() -> None:
    warnings: list[str] = []
    p = profile({"names": ["no_such_call_for_the_tests", "getcwd"], "action": "SCMP_ACT_ERRNO",
                 "errnoRet": errno.EXDEV})
    program = build_program(p, warn=warnings.append)
    assert len(warnings) == 1 and "no_such_call_for_the_tests" in warnings[0]
    proc = run_filtered(program, "print(json.dumps([call(os.getcwd)]))")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [errno.EXDEV]


# mov eax, 20 (getpid in the i386 table); int 0x80; ret -- an x86 call from an x86_64 process.
_INT80 = """
page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
page.write(b"\\xb8\\x14\\x00\\x00\\x00\\xcd\\x80\\xc3")
getpid32 = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(page)))
"""


@pytest.mark.parametrize("arches", [[], ["SCMP_ARCH_X86"]])
def test_bad_arch_kills_the_whole_process(arches: list[str]) -> None:
    """A call from an unlisted architecture kills the process, not just the thread
    (libseccomp's default, KILL_THREAD, leaves the rest running: here it would print)."""
    p = profile({"names": ["getcwd"], "action": "SCMP_ACT_ERRNO"}, architectures=arches)
    code = _INT80 + (
        "out = []\n"
        "t = threading.Thread(target=lambda: out.append(getpid32()), daemon=True)\n"
        "t.start(); t.join(5)\n"
        "print(json.dumps([out == [os.getpid()], call(os.getcwd)]))\n"
    )
    proc = run_filtered(build_program(p), code)
    if arches:
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == [True, errno.EPERM]
    else:
        assert proc.returncode == -signal.SIGSYS
        assert proc.stdout == ""


def _answer_one(listener: int, child: spawn.FilteredChild, expect_nr: int) -> None:
    """Wait for one notification, check the caller is blocked in it, deny it EPERM."""
    poller = select.poll()
    poller.register(listener, select.POLLIN)
    events = poller.poll(15_000)
    assert events and events[0][1] & select.POLLIN, "no notification within 15 s"
    buf = bytearray(abi.NOTIF_SIZE)  # zeroed, passed mutable: RECV fills it
    fcntl.ioctl(listener, abi.IOCTL_NOTIF_RECV, buf, True)
    notif = abi.unpack_notification(buf)
    assert notif.nr == expect_nr
    assert notif.pid == child.pid
    assert notif.arch == abi.AUDIT_ARCH_X86_64
    time.sleep(0.2)
    assert child.process.poll() is None, "the notified call did not wait for an answer"
    fcntl.ioctl(listener, abi.IOCTL_NOTIF_SEND, abi.pack_response(notif.id, 0, -errno.EPERM, 0))


@pytest.mark.parametrize("source", ["notify_profile", "notify-mkdir.json"])
def test_notified_mkdir_blocks_until_answered(source: str, tmp_path: Path) -> None:
    p = notify_profile(["mkdir"]) if source == "notify_profile" else load_profile(
        DATA / source)
    flags = filter_flags(p)
    assert flags & abi.SECCOMP_FILTER_FLAG_NEW_LISTENER
    target = tmp_path / "made"
    code = ("import os, sys\ntry:\n    os.mkdir(sys.argv[1])\nexcept OSError as e:\n"
            "    print(e.errno)\nelse:\n    print(0)\n")
    child = spawn.spawn_filtered([sys.executable, "-I", "-B", "-c", code, str(target)],
                                 build_program(p), flags=flags, stdout=subprocess.PIPE)
    try:
        _answer_one(child.listener_fd, child, pyseccomp.resolve_syscall(0, "mkdir"))
        assert not target.exists()
        out, _ = child.process.communicate(timeout=15)
        assert child.process.returncode == 0
        assert out.decode().strip() == str(errno.EPERM)
        assert not target.exists()
    finally:
        if child.process.poll() is None:
            child.process.kill()
        child.process.communicate()
        child.close()


# --- hostile input ---------------------------------------------------------------------

_KEYS = ["defaultAction", "defaultErrnoRet", "architectures", "flags", "listenerPath",
         "listenerMetadata", "syscalls", "names", "action", "errnoRet", "args", "index",
         "value", "valueTwo", "op", "linux", "seccomp", "ociVersion"]
_WORDS = [*_KEYS, *(a.value for a in Action), *(o.value for o in Operator), "getcwd", "write",
          "mkdir", "no_such_call", "SCMP_ARCH_X86", "SCMP_ARCH_ARM", "SCMP_ARCH_Z80",
          "SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_TSYNC"]
_scalars = (st.none() | st.booleans() | st.integers(-2, 2**64 + 1)
            | st.integers(0, 6) | st.floats() | st.sampled_from(_WORDS) | st.text(max_size=8))
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=4), inner, max_size=5),
    max_leaves=25,
)
_arg = st.fixed_dictionaries(
    {"index": _scalars, "value": _scalars, "op": st.sampled_from(list(Operator)) | _scalars},
    optional={"valueTwo": _scalars},
)
_rule = st.fixed_dictionaries(
    {"names": st.lists(st.sampled_from(_WORDS), max_size=3) | _json,
     "action": st.sampled_from(list(Action)) | _scalars},
    optional={"errnoRet": _scalars, "args": st.lists(_arg, max_size=3) | _json},
)
_profile = st.fixed_dictionaries(
    {"defaultAction": st.sampled_from(list(Action)) | _scalars},
    optional={"defaultErrnoRet": _scalars, "architectures": st.lists(_scalars) | _json,
              "flags": st.lists(_scalars) | _json, "listenerPath": _scalars,
              "listenerMetadata": _scalars, "syscalls": st.lists(_rule, max_size=4) | _json},
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=_profile | _json)
def test_hostile_input_only_raises_profile_error(data: Any) -> None:
    try:
        text = json.dumps(data)
    except ValueError:
        text = None
    for given_data in (data, text) if text is not None else (data,):
        try:
            p = parse_profile(given_data, "h.json")
        except ProfileError:
            continue
        assert parse_profile(dump_profile(p)) == p
        try:
            build_program(p, warn=lambda message: None)
        except ProfileError:
            pass
