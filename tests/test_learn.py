"""Learn mode: `seccomp-supervisor record`, the `learn` policy in the daemon, and the pure
profile merging behind both. Profiles are enforced by the real kernel afterwards."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import assume, given
from hypothesis import strategies as st

from supervisor import spawn
from supervisor.errors import ProfileError
from supervisor.learn import (
    GO_RUNTIME_SYSCALLS,
    HANDOFF_SYSCALLS,
    Recording,
    known_syscalls,
    learned_names,
    learning_profile,
    merge_profile,
    profile_file_name,
)
from supervisor.profile import (
    Action,
    ArgRule,
    Operator,
    Profile,
    SyscallRule,
    build_program,
    filter_flags,
    load_profile,
    parse_profile,
)

from .daemon_harness import CLI, running_daemon

ROOT = Path(__file__).resolve().parent.parent


def allowed_names(profile: Profile) -> set[str]:
    return {name for rule in profile.syscalls if rule.action == Action.ALLOW and not rule.args
            for name in rule.names}


ROOT_ENTRIES = {name for name in os.listdir("/") if not name.startswith(".")}


def listed(ls_output: bytes) -> set[str]:
    """Names in ``ls -l`` output (the last field; ``-> target`` dropped)."""
    lines = ls_output.decode().splitlines()[1:]
    return {line.split(" -> ")[0].split()[-1] for line in lines}


def enforce(profile: Profile, argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` with ``profile`` enforced by the kernel (no supervisor involved)."""
    child = spawn.spawn_filtered(argv, build_program(profile), flags=filter_flags(profile),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = child.process.communicate(timeout=30)
    child.close()
    return subprocess.CompletedProcess(argv, child.process.returncode, out, err)


# --------------------------------------------------------------------------- record


def test_record_ls_then_the_kernel_enforces_the_profile(tmp_path: Path) -> None:
    out = tmp_path / "ls.json"
    recorded = subprocess.run([*CLI, "record", "--out", str(out), "--", "ls", "-l", "/"],
                              capture_output=True, timeout=60, cwd=tmp_path)
    assert recorded.returncode == 0, recorded.stderr
    assert listed(recorded.stdout) == ROOT_ENTRIES  # the command ran normally meanwhile
    profile = load_profile(out)
    assert profile.default_action == Action.ERRNO
    assert profile.architectures == ("SCMP_ARCH_X86_64",)
    names = allowed_names(profile)
    assert {"getdents64", "openat", "execve", "write", "exit_group"} <= names
    assert set(HANDOFF_SYSCALLS) <= names
    assert not {"mkdir", "mkdirat"} & names

    ls = enforce(profile, ["ls", "-l", "/"])
    assert ls.returncode == 0, ls.stderr
    assert listed(ls.stdout) == ROOT_ENTRIES

    target = tmp_path / "never-made"
    mkdir = enforce(profile, ["mkdir", str(target)])
    assert mkdir.returncode == 1
    assert b"Operation not permitted" in mkdir.stderr
    assert not target.exists()


def test_record_then_run_profile_enforces_it_without_a_daemon(tmp_path: Path) -> None:
    # The documented workflow: record, then `run --profile` the recorded profile. It has
    # no NOTIFY rule, so the kernel alone enforces it; --socket names no daemon here and
    # nothing is handed over.
    out = tmp_path / "ls.json"
    recorded = subprocess.run([*CLI, "record", "--out", str(out), "--", "ls", "-l", "/"],
                              capture_output=True, timeout=60, cwd=tmp_path)
    assert recorded.returncode == 0, recorded.stderr
    nowhere = str(tmp_path / "no-daemon.sock")
    ls = subprocess.run([*CLI, "run", "--socket", nowhere, "--profile", str(out), "--",
                         "ls", "-l", "/"], capture_output=True, timeout=60)
    assert ls.returncode == 0, ls.stderr
    assert listed(ls.stdout) == ROOT_ENTRIES
    target = tmp_path / "never-made"
    mkdir = subprocess.run([*CLI, "run", "--profile", str(out), "--", "mkdir", str(target)],
                           capture_output=True, timeout=60)
    assert mkdir.returncode == 1
    assert b"Operation not permitted" in mkdir.stderr
    assert not target.exists()


def test_run_profile_with_notify_rules_still_needs_the_daemon(tmp_path: Path) -> None:
    profile = tmp_path / "notify.json"
    profile.write_text(json.dumps({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_NOTIFY"}]}))
    target = tmp_path / "never-made"
    no_socket = subprocess.run([*CLI, "run", "--profile", str(profile), "--", "mkdir",
                                str(target)], capture_output=True, timeout=60)
    assert no_socket.returncode == 2
    assert b"--socket must name the supervisor" in no_socket.stderr
    nowhere = str(tmp_path / "no-daemon.sock")
    down = subprocess.run([*CLI, "run", "--socket", nowhere, "--profile", str(profile),
                           "--", "mkdir", str(target)], capture_output=True, timeout=60)
    assert down.returncode == 126
    assert b"is not reachable" in down.stderr
    assert not target.exists()


def test_record_merges_the_base_and_its_rules_win(tmp_path: Path) -> None:
    base = {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": 38,
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_AARCH64"],
        "syscalls": [
            {"names": ["getpid", "openat"], "action": "SCMP_ACT_ALLOW"},
            # ls makes ioctl(TCGETS...) on stdout: the base only allows request 0x5401.
            {"names": ["ioctl"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 1, "value": 21505, "op": "SCMP_CMP_EQ"}]},
        ],
    }
    base_path = tmp_path / "base.json"
    base_path.write_text(json.dumps(base))
    out = tmp_path / "merged.json"
    done = subprocess.run([*CLI, "record", "--out", str(out), "--base", str(base_path), "--",
                           "ls", "/"], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    profile = load_profile(out)
    assert profile.default_errno_ret == 38
    assert profile.architectures == ("SCMP_ARCH_X86_64", "SCMP_ARCH_AARCH64")
    names = allowed_names(profile)
    assert "getpid" in names  # from the base, although ls never called it
    assert "ioctl" not in names  # the base's conditional rule governs it
    assert profile.syscalls[1].names == ("ioctl",) and profile.syscalls[1].args


def test_record_refuses_a_base_that_allows_by_default(tmp_path: Path) -> None:
    base = tmp_path / "allow.json"
    base.write_text('{"defaultAction": "SCMP_ACT_ALLOW"}')
    done = subprocess.run([*CLI, "record", "--out", str(tmp_path / "x.json"), "--base",
                           str(base), "--", "true"], capture_output=True, timeout=60)
    assert done.returncode == 2
    assert b"must deny by default" in done.stderr
    assert not (tmp_path / "x.json").exists()


def test_record_follows_children_and_passes_the_exit_status_through(tmp_path: Path) -> None:
    done = subprocess.run([*CLI, "record", "--out", str(tmp_path / "p.json"), "--", "sh",
                           "-c", "/bin/true; exit 7"], capture_output=True, timeout=60)
    assert done.returncode == 7
    names = allowed_names(load_profile(tmp_path / "p.json"))
    assert "wait4" in names and {"clone", "clone3", "vfork", "fork"} & names


def test_handoff_syscalls_are_exactly_what_the_launcher_makes_after_the_filter(
        tmp_path: Path) -> None:
    """The calls the spawn helper makes between seccomp() and execve() are what a learned
    profile must always allow: pin them, so a change to the helper cannot silently make
    learned profiles unusable."""
    script = tmp_path / "spawn.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from supervisor import spawn\n"
        "from supervisor.profile import build_program, notify_profile\n"
        "c = spawn.spawn_filtered(['/bin/true'], build_program(notify_profile(['getppid'])))\n"
        "c.close()\n"
        "sys.exit(c.process.wait())\n")
    trace = tmp_path / "trace.txt"
    subprocess.run(["strace", "-f", "-qq", "-o", str(trace), sys.executable, str(script)],
                   check=True, timeout=60)
    lines = trace.read_text().splitlines()
    start = next(i for i, line in enumerate(lines)
                 if "SECCOMP_FILTER_FLAG_NEW_LISTENER, {len=" in line)
    helper = lines[start].split()[0]
    calls = []
    for line in lines[start + 1:]:
        pid, _, rest = line.partition(" ")
        m = re.match(r"(?:<\.\.\. )?([a-z0-9_]+)", rest.strip())
        if pid != helper or m is None:
            continue
        calls.append(m.group(1))
        if m.group(1) == "execve":
            break
    assert calls[-1] == "execve"
    assert set(calls) <= set(HANDOFF_SYSCALLS)
    assert {"write", "read", "close"} <= set(calls)


# --------------------------------------------------------------------------- pure logic


def test_learning_profile_notifies_everything_but_write() -> None:
    profile = learning_profile()
    [rule] = profile.syscalls
    assert rule.action == Action.NOTIFY
    assert "write" not in rule.names
    assert {"mkdir", "openat", "execve", "read", "socketcall"} <= set(rule.names)
    assert set(rule.names) == known_syscalls() - {"write"}
    assert profile.default_action == Action.ALLOW
    assert len(build_program(profile)) // 8 <= 4096


def test_merge_without_base_allows_observed_and_is_idempotent() -> None:
    rec = Recording()
    rec.add("x86_64", "read")
    rec.add("x86_64", "read")
    rec.add("x86", "socketcall")
    assert rec.total == 3 and rec.counts[("x86_64", "read")] == 2
    once = merge_profile(None, rec.names() | {"write"}, rec.architectures())
    assert once.to_dict() == {
        "defaultAction": "SCMP_ACT_ERRNO",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"],
        "syscalls": [{"names": ["read", "socketcall", "write"], "action": "SCMP_ACT_ALLOW"}],
    }
    assert merge_profile(once, rec.names(), rec.architectures()) == once
    assert parse_profile(once.to_dict()) == once


def test_learned_names_always_allow_runcs_go_runtime_calls() -> None:
    # Even when an operator's always_allow leaves them out: runc would die without them.
    assert learned_names({"getdents64"}, ["close"]) == {"getdents64", "close", "futex",
                                                        "rt_sigreturn"}
    assert set(HANDOFF_SYSCALLS) | set(GO_RUNTIME_SYSCALLS) <= learned_names((),
                                                                             HANDOFF_SYSCALLS)


def test_merge_keeps_base_rules_and_they_win() -> None:
    base = Profile(
        default_action=Action.ERRNO, default_errno_ret=1,
        syscalls=(
            SyscallRule(("mkdir",), Action.ERRNO, errno_ret=13),
            SyscallRule(("close", "dup"), Action.ALLOW),
            SyscallRule(("clone",), Action.ALLOW,
                        args=(ArgRule(0, 0x10000000, Operator.MASKED_EQ, 0),)),
        ))
    merged = merge_profile(base, {"mkdir", "clone", "read"})
    assert [r.to_dict() for r in merged.syscalls] == [
        {"names": ["close", "dup", "read"], "action": "SCMP_ACT_ALLOW"},
        {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
        {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
         "args": [{"index": 0, "value": 0x10000000, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]},
    ]
    assert merged.default_errno_ret == 1


def test_merge_refuses_a_base_that_does_not_deny_by_default() -> None:
    with pytest.raises(ProfileError, match="must deny by default"):
        merge_profile(Profile(default_action=Action.LOG), {"read"})


@pytest.mark.parametrize("cid, expected", [
    ("web-1", "web-1.json"),
    ("a_b.c+d", "a_b.c+d.json"),
])
def test_profile_file_name_keeps_safe_ids(cid: str, expected: str) -> None:
    assert profile_file_name(cid) == expected


@given(st.text())
def test_profile_file_name_never_leaves_the_directory(cid: str) -> None:
    name = profile_file_name(cid)
    assert re.fullmatch(r"(?!\.)[A-Za-z0-9_.+-]*(~[0-9a-f]{16})?\.json", name)
    assert name != ".json"
    assert len(name) < 255


@given(st.text(), st.text())
def test_distinct_ids_get_distinct_files(a: str, b: str) -> None:
    assume(a != b)
    assert profile_file_name(a) != profile_file_name(b)


def test_a_crafted_id_cannot_take_a_mangled_ids_file() -> None:
    mangled = profile_file_name("a/b")
    assert mangled.startswith("a_b~")
    assert profile_file_name(mangled.removesuffix(".json")) != mangled


# --------------------------------------------------------------------------- the daemon


LEARN = f"""
[defaults]
policies = ["learn"]

[[policy]]
name = "learn"
path = "{ROOT}/policies/learn.py"
options = {{ directory = "{{tmp}}/learned" }}
"""


async def wait_for(path: Path) -> None:
    with trio.fail_after(10):
        while not await trio.Path(path).exists():
            await trio.sleep(0.02)


async def test_learn_policy_writes_a_profile_per_container_on_session_end(
        tmp_path: Path) -> None:
    learning = tmp_path / "learning.json"
    learning.write_text(json.dumps(learning_profile().to_dict()))
    cid = "web/1"
    written = tmp_path / "learned" / profile_file_name(cid)
    async with running_daemon(tmp_path, LEARN) as d:
        done = await d.run(["--profile", str(learning), "--id", cid, "--", "ls", "-l", "/"])
        assert done.returncode == 0, done.stderr
        await wait_for(written)
        first = parse_profile(await trio.Path(written).read_text(), str(written))
        assert d.metric("seccomp_supervisor_notifications_total", syscall="getdents64",
                        policy="learn", decision="allow") >= 1
        # A second session of the same container adds what it made (accumulate = true).
        target = tmp_path / "made-by-the-second-session"
        mtime = (await trio.Path(written).stat()).st_mtime_ns
        done = await d.run(["--profile", str(learning), "--id", cid, "--",
                            "mkdir", str(target)])
        assert done.returncode == 0, done.stderr
        with trio.fail_after(10):
            while (await trio.Path(written).stat()).st_mtime_ns == mtime:
                await trio.sleep(0.02)
    assert written.parent == tmp_path / "learned"
    assert first.default_action == Action.ERRNO
    assert "getdents64" in allowed_names(first)
    assert not {"mkdir", "mkdirat"} & allowed_names(first)
    second = load_profile(written)
    assert allowed_names(first) <= allowed_names(second)
    assert {"mkdir", "mkdirat"} & allowed_names(second)

    ls = enforce(first, ["ls", "-l", "/"])
    assert ls.returncode == 0, ls.stderr
    refused = enforce(first, ["mkdir", str(tmp_path / "nope")])
    assert b"Operation not permitted" in refused.stderr
    assert not (tmp_path / "nope").exists()


# --------------------------------------------------------------------------- runc


async def test_learned_under_runc_then_enforced_by_runc(tmp_path: Path) -> None:
    from .runtime import container, oci_config, unique_id

    names = sorted(known_syscalls() - {"write"})
    script = "ls -l / >/dev/null && echo listed"
    cid = unique_id("h5-learn")
    async with running_daemon(tmp_path, LEARN) as d:
        config = oci_config(["sh", "-c", script], notify=names, listener_path=d.socket_path)
        bundle = tmp_path / "learning"
        bundle.mkdir()
        (bundle / "config.json").write_text(json.dumps(config))
        async with container("runc", bundle, cid) as c:
            done = await c.run()
        assert done.returncode == 0, done.stderr
        assert done.stdout == b"listed\n"
        written = tmp_path / "learned" / profile_file_name(cid)
        await wait_for(written)
    learned = load_profile(written)
    # runc's init (Go) made calls between installing the filter and exec, which busybox
    # never makes: they were recorded, so runc can start under the profile below.
    assert "epoll_ctl" in allowed_names(learned)
    # Its Go runtime's futex and rt_sigreturn come and go with timing (this learning run
    # may not have seen them, the enforced starts below may make them): always allowed.
    assert set(GO_RUNTIME_SYSCALLS) <= allowed_names(learned)
    for args, expect_ok in ((["sh", "-c", script], True),
                            (["sh", "-c", f"{script}; mkdir /tmp/x"], False)):
        config = oci_config(args)
        config["linux"]["seccomp"] = learned.to_dict()
        bundle = tmp_path / f"enforced-{expect_ok}"
        bundle.mkdir()
        (bundle / "config.json").write_text(json.dumps(config))
        async with container("runc", bundle, unique_id("h5-learn")) as c:
            done = await c.run()
        assert done.stdout == b"listed\n", done.stderr
        if expect_ok:
            assert done.returncode == 0, done.stderr
        else:
            assert done.returncode != 0
            assert b"Operation not permitted" in done.stderr


LEARN_OR_TRACE = LEARN + """
[trace_annotation]
enabled = true
"""


async def start_with_a_signal_before_exec(c: Any) -> tuple[int, str]:
    """``runc create``, SIGURG to the container's init, ``runc start``; wait until the
    container stopped. Returns ``start``'s exit status and what the container (and its
    init) printed: a created container's stdio are ``create``'s, here a file.

    Between the two commands runc's init (Go, ``GOMAXPROCS=1``) sits with its filter
    installed in ``open`` of the exec fifo, so two things its runtime does only now and
    then under ``runc run`` become certain: sysmon retakes the idle P and parks, and the
    init wakes it (``futex(FUTEX_WAKE)`` on ``sched.sysmonnote``) when ``start`` opens
    the fifo; and the signal, sent while it waits, runs a Go signal handler, which
    returns with ``rt_sigreturn``. A process-directed signal goes to the thread group
    leader unless it blocks it, and that is the init's thread (the one under the filter).
    """
    with open(c.log_path, "ab") as log:  # noqa: ASYNC230 - a local file, once
        with trio.fail_after(30):
            created = await trio.run_process(
                [*c.argv0, "create", "--bundle", str(c.bundle), c.id], check=False,
                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    c.started = True
    assert created.returncode == 0, c.output()
    state = await c.state()
    assert state["status"] == "created", state
    os.kill(state["pid"], signal.SIGURG)
    with trio.fail_after(30):
        started = await trio.run_process([*c.argv0, "start", c.id], check=False,
                                         capture_stdout=True, capture_stderr=True)
    await c.wait_stopped(timeout=30)
    return started.returncode, c.output() + started.stderr.decode(errors="replace")


@pytest.mark.parametrize("route", ["learn policy", "trace annotation"])
async def test_a_profile_learned_under_runc_starts_runc_whatever_its_go_runtime_did(
        tmp_path: Path, route: str) -> None:
    """runc's init is a Go program: after installing the container's filter and before
    its execve, its runtime may call ``futex`` and ``rt_sigreturn`` -- or not, depending
    on timing -- and dies when either fails (``futexwakeup addr=... returned -1``). A
    learning run that did not see them must still give a profile runc starts under.

    Deterministic both ways: the learning filter never notifies the two calls (the
    unlucky learning run, made certain), and the enforced start makes the init make both
    (:func:`start_with_a_signal_before_exec`)."""
    from .runtime import container, oci_config, unique_id

    unseen = {"futex", "rt_sigreturn"}  # what the start below forces, not the constant
    names = sorted(known_syscalls() - {"write"} - unseen)
    script = "ls -l / >/dev/null && echo listed"
    cid = unique_id("h5-learn")
    annotations = None
    written = tmp_path / "learned" / profile_file_name(cid)
    if route == "trace annotation":
        written = tmp_path / "learned" / "traced" / "go.json"
        annotations = {"io.containers.trace-syscall": f"of:{written}"}
    async with running_daemon(tmp_path, LEARN_OR_TRACE) as d:
        config = oci_config(["sh", "-c", script], notify=names, listener_path=d.socket_path,
                            annotations=annotations)
        bundle = tmp_path / "learning"
        bundle.mkdir()
        (bundle / "config.json").write_text(json.dumps(config))
        async with container("runc", bundle, cid) as c:
            done = await c.run()
        assert done.returncode == 0, done.stderr
        await wait_for(written)
    learned = load_profile(written)

    config = oci_config(["sh", "-c", script])
    config["linux"]["seccomp"] = learned.to_dict()
    bundle = tmp_path / "enforced"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps(config))
    async with container("runc", bundle, unique_id("h5-learn")) as c:
        status, output = await start_with_a_signal_before_exec(c)
    assert output == "listed\n" and status == 0, output
    assert unseen <= allowed_names(learned)
