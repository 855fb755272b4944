"""Filter flags on the real kernel: each OCI flag accepted (with its effect where this
machine can show it) or refused with a message naming the flag, the probe, and
WAIT_KILLABLE_RECV on by default for notify profiles."""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from supervisor import abi, bpf, spawn
from supervisor.errors import ProfileError
from supervisor.notifyfd import NotifyFd, RecvResult
from supervisor.profile import build_program, filter_flags, notify_profile, parse_profile

from .conftest import TARGET
from .daemon_harness import running_daemon

PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)
ROOT = Path(PACKAGE_PARENT)
TSYNC = abi.SECCOMP_FILTER_FLAG_TSYNC
LOG = abi.SECCOMP_FILTER_FLAG_LOG
SPEC_ALLOW = abi.SECCOMP_FILTER_FLAG_SPEC_ALLOW
LISTENER = abi.SECCOMP_FILTER_FLAG_NEW_LISTENER
ESRCH = abi.SECCOMP_FILTER_FLAG_TSYNC_ESRCH
KILLABLE = abi.SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
ALL = TSYNC | LOG | SPEC_ALLOW | LISTENER | ESRCH | KILLABLE

# Installs the program from stdin with the flags in argv[2] while a second thread runs,
# then reports what the kernel says about both threads and what getpriority returned.
_CHILD = """
import json, os, sys, threading
sys.path.insert(0, sys.argv[1])
from supervisor import bpf

def status(path):
    keep = ("Seccomp", "Seccomp_filters", "Speculation_Store_Bypass")
    fields = (line.partition(":") for line in open(path).read().splitlines())
    return {k: v.strip() for k, _, v in fields if k in keep}

flags = int(sys.argv[2])
program = sys.stdin.buffer.read()
ready, stop, tids = threading.Event(), threading.Event(), []
def worker():
    tids.append(threading.get_native_id())
    ready.set()
    stop.wait()
thread = threading.Thread(target=worker)
thread.start()
ready.wait()
out = {"pid": os.getpid()}
bpf.set_no_new_privs()
try:
    out["fd"] = bpf.install_filter(program, flags)
except (OSError, ValueError) as exc:
    out["error"], out["errno"] = str(exc), getattr(exc, "errno", None)
out["main"] = status("/proc/thread-self/status")
out["other"] = status(f"/proc/self/task/{tids[0]}/status")
try:
    os.getpriority(0, 0)
    out["getpriority"] = 0
except OSError as exc:
    out["getpriority"] = exc.errno
stop.set()
thread.join()
print(json.dumps(out))
"""

EXDEV_PROFILE = parse_profile({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
    {"names": ["getpriority"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EXDEV}]})


def install(flags: int) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-I", "-c", _CHILD, PACKAGE_PARENT, str(flags)],
        input=build_program(EXDEV_PROFILE), capture_output=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def test_probe_finds_every_flag_on_this_kernel() -> None:
    """Linux 6.18 has all of them (WAIT_KILLABLE_RECV since 5.19)."""
    assert bpf.supported_filter_flags() == ALL
    assert bpf.describe_flags(ALL) == (
        "TSYNC|LOG|SPEC_ALLOW|NEW_LISTENER|TSYNC_ESRCH|WAIT_KILLABLE_RECV")
    # The probe itself: EFAULT for a flag the kernel knows, EINVAL for one it does not.
    assert bpf._probe(LOG) == errno.EFAULT
    assert bpf._probe(0x40) == errno.EINVAL
    assert bpf._probe(KILLABLE) == errno.EINVAL  # needs NEW_LISTENER
    # ...and installs nothing.
    with open("/proc/thread-self/status") as f:
        assert "Seccomp:\t0" in f.read()


@pytest.mark.parametrize("flags", [0, LOG, SPEC_ALLOW, TSYNC, LISTENER, LISTENER | KILLABLE,
                                   TSYNC | LISTENER | ESRCH, ALL])
def test_accepted_flags(flags: int) -> None:
    out = install(flags)
    assert "error" not in out, out
    assert out["getpriority"] == errno.EXDEV
    assert out["main"]["Seccomp"] == "2"
    if flags & LISTENER:
        assert out["fd"] > 2
    else:
        assert out["fd"] == 0
    # TSYNC puts the filter on every thread of the process; without it only on the
    # caller.
    assert out["other"]["Seccomp"] == ("2" if flags & TSYNC else "0")


@pytest.mark.parametrize(("flags", "message"), [
    (KILLABLE, "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV needs SECCOMP_FILTER_FLAG_NEW_LISTENER"),
    (TSYNC | LISTENER, "SECCOMP_FILTER_FLAG_TSYNC with SECCOMP_FILTER_FLAG_NEW_LISTENER needs "
                       "SECCOMP_FILTER_FLAG_TSYNC_ESRCH"),
    (LOG | 0x40, "filter flag bit 0x40 is unknown to this kernel"),
    (1 << 20, "filter flag bit 0x100000 is unknown to this kernel"),
])
def test_refused_flags_are_named(flags: int, message: str) -> None:
    out = install(flags)
    assert out["errno"] == errno.EINVAL
    assert out["error"].startswith(f"[Errno 22] seccomp(SET_MODE_FILTER, "
                                   f"{bpf.describe_flags(flags)}): Invalid argument: ")
    assert message in out["error"]
    assert out["main"]["Seccomp"] == "0"  # nothing was installed
    assert out["getpriority"] == 0
    # Checked before anything starts, too.
    with pytest.raises(bpf.FilterFlagError, match=message):
        bpf.check_filter_flags(flags)
    with pytest.raises(spawn.SpawnError, match=message):
        spawn.spawn_filtered(["true"], build_program(EXDEV_PROFILE), flags=flags)


def test_spec_allow_keeps_speculative_store_bypass_as_it_was() -> None:
    """Without SPEC_ALLOW, seccomp turns on the SSB mitigation for the task when the
    kernel runs in ``spec_store_bypass_disable=seccomp`` mode; in ``prctl`` mode (the
    default since 5.16) nothing changes either way."""
    mode = Path("/sys/devices/system/cpu/vulnerabilities/spec_store_bypass").read_text()
    before = install(0)["main"]["Speculation_Store_Bypass"]
    allowed = install(SPEC_ALLOW)["main"]["Speculation_Store_Bypass"]
    if "seccomp" in mode:
        assert before == "thread force mitigated"
        assert allowed != before
    else:
        assert allowed == before


class KernelLog:
    """Records of /dev/kmsg written after this object was made: an earlier test run
    may have logged for a pid the kernel has since reused."""

    def __init__(self) -> None:
        self.fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
        os.lseek(self.fd, 0, os.SEEK_END)  # kmsg: skip every record logged so far
        self.records: list[str] = []

    def audit_lines(self, pid: int) -> list[str]:
        while True:
            try:
                self.records.append(os.read(self.fd, 8192).decode(errors="replace"))
            except BlockingIOError:
                break
            except BrokenPipeError:  # a record was overwritten while we read: go on
                continue
        return [r for r in self.records if f" pid={pid} " in r and "type=1326" in r]

    def close(self) -> None:
        os.close(self.fd)


def test_log_flag_logs_the_errno_action() -> None:
    """SECCOMP_FILTER_FLAG_LOG: the ERRNO answer to getpriority (syscall 140) shows up as
    an audit record (type 1326, code 0x50000) in the kernel log; without it, not."""
    kmsg = KernelLog()
    try:
        quiet = install(0)
        logged = install(LOG)
        deadline = time.monotonic() + 3
        while not kmsg.audit_lines(logged["pid"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        [record] = kmsg.audit_lines(logged["pid"])
        assert " syscall=140 " in record and "code=0x50000" in record
        assert kmsg.audit_lines(quiet["pid"]) == []
    finally:
        kmsg.close()


def test_profile_flags_the_kernel_lacks_are_named() -> None:
    """Pure (an older kernel, described by its probe result): each flag it lacks is named
    with the release that added it; the default WAIT_KILLABLE_RECV is just left out."""
    data = {"defaultAction": "SCMP_ACT_ALLOW",
            "flags": ["SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_SPEC_ALLOW"],
            "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_NOTIFY"}]}
    old_kernel = TSYNC | LISTENER  # Linux 5.0
    with pytest.raises(ProfileError) as info:
        filter_flags(parse_profile(data, "p.json"), supported=old_kernel | LOG)
    assert str(info.value) == (
        "p.json: flags: SECCOMP_FILTER_FLAG_SPEC_ALLOW is not supported by this kernel "
        "(it needs Linux 4.17 or later)")
    del data["flags"]
    assert filter_flags(parse_profile(data), supported=old_kernel) == LISTENER
    assert filter_flags(parse_profile(data)) == LISTENER | KILLABLE
    tsync = data | {"flags": ["SECCOMP_FILTER_FLAG_TSYNC"]}
    with pytest.raises(ProfileError, match=r"SECCOMP_FILTER_FLAG_TSYNC_ESRCH is not "
                                           r"supported by this kernel \(it needs Linux 5\.7"):
        filter_flags(parse_profile(tsync), supported=old_kernel)


def test_unknown_flag_name_in_a_profile() -> None:
    with pytest.raises(ProfileError, match=r"^p\.json: flags\[1\]: unknown filter flag "
                                           r"'SECCOMP_FILTER_FLAG_FAST'"):
        parse_profile({"defaultAction": "SCMP_ACT_ALLOW", "flags": [
            "SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_FAST"]}, "p.json")


# --- WAIT_KILLABLE_RECV: what it changes ------------------------------------------------


def _next_notification(notify: NotifyFd, timeout: float = 10) -> RecvResult:
    deadline = time.monotonic() + timeout
    while True:
        ready, _, _ = select.select([notify.fileno()], [], [], max(0, deadline - time.monotonic()))
        assert ready, "no notification"
        if notify.poll_now() & select.POLLIN:
            got = notify.recv()
            if got is not None:
                return got


@pytest.mark.parametrize("killable", [True, False])
def test_wait_killable_recv_keeps_a_received_call_across_a_signal(
        tmp_path: Path, killable: bool) -> None:
    """The target's mkdir is received; then it gets SIGUSR1 (SA_RESTART handler).
    With WAIT_KILLABLE_RECV (our default) the call keeps its id and our answer reaches it;
    without, the kernel withdraws it and the call comes back under a new id."""
    profile = notify_profile(["mkdir"])
    flags = filter_flags(profile, wait_killable=killable)
    assert bool(flags & KILLABLE) == killable
    child = spawn.spawn_filtered([sys.executable, TARGET, "restart", str(tmp_path / "d")],
                                 build_program(profile), flags=flags, stdout=subprocess.PIPE)
    try:
        notify = NotifyFd(child.listener_fd)
        first = _next_notification(notify)
        os.kill(child.pid, signal.SIGUSR1)
        time.sleep(0.3)
        if killable:
            assert notify.id_valid(first[0])
            answered = first[0]
        else:
            assert not notify.id_valid(first[0])
            again = _next_notification(notify)
            notif_id, _pid, nr, _arch, _args = again
            assert notif_id != first[0] and nr == first[2]  # same call, new id
            answered = again[0]
        notify.send(answered, 0, -errno.EXDEV, 0)
        out, _ = child.process.communicate(timeout=20)
        assert json.loads(out) == {"rc": -1, "errno": errno.EXDEV, "signals": 1}
    finally:
        if child.process.poll() is None:
            child.process.kill()
            child.process.wait()
        child.close()


# --- through the real CLI -----------------------------------------------------------------

HARDENING = f"""
[defaults]
policies = ["hardening"]

[[policy]]
name = "hardening"
path = "{ROOT}/policies/hardening.py"
"""


async def test_run_installs_the_profile_flags(tmp_path: Path) -> None:
    """``seccomp-supervisor run --profile`` with TSYNC, LOG and SPEC_ALLOW plus notify
    rules: loaded with TSYNC_ESRCH, NEW_LISTENER and WAIT_KILLABLE_RECV added (the kernel
    refuses TSYNC with a listener otherwise), and the daemon answers the notified call."""
    victim = tmp_path / "file"
    victim.write_text("")
    victim.chmod(0o600)
    profile = tmp_path / "p.json"
    profile.write_text(json.dumps({
        "defaultAction": "SCMP_ACT_ALLOW",
        "flags": ["SECCOMP_FILTER_FLAG_TSYNC", "SECCOMP_FILTER_FLAG_LOG",
                  "SECCOMP_FILTER_FLAG_SPEC_ALLOW"],
        "syscalls": [{"names": ["chmod", "fchmodat", "fchmodat2"],
                      "action": "SCMP_ACT_NOTIFY"}]}))
    async with running_daemon(tmp_path, HARDENING) as d:
        result = await d.run(["--profile", str(profile), "--", "sh", "-c",
                              f"grep ^Seccomp: /proc/self/status; chmod u+s {victim}"])
    assert result.returncode == 1, result.stderr
    assert result.stdout == b"Seccomp:\t2\n"
    assert b"Operation not permitted" in result.stderr
    assert victim.stat().st_mode & 0o7777 == 0o600
