"""The shipped unit's sandbox, for real: systemd/seccomp-supervisor.service and .socket
run under a real ``systemd --user`` (tests/systemd_user.py; as root, so
CapabilityBoundingSet, ProtectSystem, SystemCallFilter... all apply) with every hardening
line as shipped. Only ExecStart (this checkout's ``python -m supervisor serve --config``),
StandardOutput/StandardError (files: there is no journald here) and the socket unit's
ListenStream are rewritten; the config is systemd/seccomp-supervisor.toml with the paths
moved and path_guard and devices added.

The daemon's config and $XDG_RUNTIME_DIR (so its RuntimeDirectory) live in a directory
under /run, not in pytest's tmp_path: the unit has PrivateTmp=yes, so the daemon cannot
see /tmp -- as in production, where the config is in /etc and the sockets in
/run/seccomp-supervisor. The callers (``seccomp-supervisor run`` processes), the files
they touch and the logs are in tmp_path.

A probe unit with the shipped [Service] section (tests/unit_probe.py) shows that each
sandboxing setting is in effect, and the same probe without them that the checks can
fail. The last tests revert, one at a time, the unit changes this test led to (and drop
CAP_SYS_PTRACE), and tighten what cannot be tighter, and show what each breaks.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from .systemd_user import UserManager, run_user_manager

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
SERVICE = "seccomp-supervisor.service"
SOCKET = "seccomp-supervisor.socket"
CLI = [sys.executable, "-m", "supervisor"]
# linux/capability.h
CAPS = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_FOWNER": 3,
        "CAP_FSETID": 4, "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_SETPCAP": 8,
        "CAP_NET_BIND_SERVICE": 10, "CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13,
        "CAP_IPC_LOCK": 14, "CAP_SYS_MODULE": 16, "CAP_SYS_RAWIO": 17,
        "CAP_SYS_CHROOT": 18, "CAP_SYS_PTRACE": 19, "CAP_SYS_ADMIN": 21,
        "CAP_SYS_RESOURCE": 24, "CAP_MKNOD": 27, "CAP_AUDIT_WRITE": 29}
NOBODY = 65534


def unit_settings(text: str) -> list[tuple[str, str]]:
    """(key, value) of every setting line, in order (comments and sections left out)."""
    return [(k.strip(), v.strip()) for k, _, v in
            (line.partition("=") for line in text.splitlines()
             if "=" in line and not line.lstrip().startswith(("#", ";", "[")))]


def rewrite(text: str, replacements: dict[str, str]) -> str:
    """``text`` with the value of each setting in ``replacements`` replaced; each must
    occur exactly once."""
    lines = text.splitlines(keepends=True)
    for key, value in replacements.items():
        hits = [i for i, line in enumerate(lines) if line.startswith(f"{key}=")]
        assert len(hits) == 1, f"{key}= occurs {len(hits)} times in the shipped unit"
        lines[hits[0]] = f"{key}={value}\n"
    return "".join(lines)


def shipped_config(state: Path, guarded: Path) -> str:
    """systemd/seccomp-supervisor.toml, with the sockets in ``state``, /metrics on a free
    port, every decision audited, and path_guard and devices after hardening."""
    text = (UNITS / "seccomp-supervisor.toml").read_text()
    edits = {
        'socket = "/run/seccomp-supervisor/notify.sock"':
            f'socket = "{state}/notify.sock"\ncontrol_socket = "{state}/control.sock"',
        'listen = "127.0.0.1:9469"': 'listen = "127.0.0.1:0"',
        'policies = ["hardening"]': 'policies = ["hardening", "path_guard", "devices"]',
        'path = "../policies/hardening.py"': f'path = "{ROOT}/policies/hardening.py"',
        'decisions = "deny"': 'decisions = "all"',
    }
    for old, new in edits.items():
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text + f"""
[[policy]]
name = "path_guard"
path = "{ROOT}/policies/path_guard.py"
options = {{ prefixes = ["{guarded}"] }}

[[policy]]
name = "devices"
path = "{ROOT}/policies/devices.py"

[[policy]]
name = "guard_enforced"
path = "{ROOT}/policies/path_guard.py"
options = {{ prefixes = ["{guarded}"], mode = "enforce" }}

[[route]]
match = {{ container = "enforce-*" }}
policies = ["hardening", "guard_enforced", "devices"]
"""


@dataclass
class Service:
    m: UserManager
    runtime: Path        # RuntimeDirectory= ($XDG_RUNTIME_DIR/seccomp-supervisor)
    files: Path          # pytest's tmp_path: logs, and where the callers work
    shipped: str
    installed: str

    @property
    def socket(self) -> str:
        return str(self.runtime / "notify.sock")

    @property
    def pid(self) -> int:
        return int(self.m.show("MainPID")["MainPID"])

    def log(self) -> str:
        try:
            return (self.files / "daemon.log").read_text(errors="replace")
        except FileNotFoundError:
            return "(no daemon.log)"

    def audit(self, container: str, count: int = 1) -> list[dict[str, object]]:
        """The audit lines (all decisions) of ``container``, once there are ``count``:
        the daemon writes them from a task of their own, after answering."""
        deadline = time.monotonic() + 10
        while True:
            lines = (self.files / "audit.log").read_text().split("\n")[:-1]  # complete
            found = [a for a in (json.loads(x) for x in lines if x.startswith("{"))
                     if a["container"] == container]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.02)

    def run(self, container: str, notify: list[str],
            cmd: list[str]) -> subprocess.CompletedProcess[str]:
        """``seccomp-supervisor run`` (the real CLI) against the unit's socket."""
        args = [*CLI, "run", "--socket", self.socket, "--id", container]
        for name in notify:
            args += ["--notify", name]
        return subprocess.run([*args, "--", *cmd], capture_output=True, text=True,
                              timeout=30, cwd=self.files)

    def status(self) -> str:
        return (f"{self.m.ctl('status', SERVICE, check=False).stdout}\n--- daemon log\n"
                f"{self.log()[-3000:]}")


def checkout_paths_under_private_tmp() -> list[str]:
    """This checkout and this interpreter's environment, where PrivateTmp= hides them."""
    paths = {str(ROOT), sys.prefix, os.path.realpath(sys.executable)}
    return sorted(p for p in paths if Path(p).is_relative_to("/tmp")
                  or Path(p).is_relative_to("/var/tmp"))


def bind_checkout(m: UserManager, unit: str) -> None:
    """A checkout in /tmp (CI clones there) is hidden by PrivateTmp=yes like any file
    there; an installed daemon lives in /usr or /opt instead: bind it into ``unit``."""
    hidden = checkout_paths_under_private_tmp()
    if hidden:
        (m.unit_dir / f"{unit}.d").mkdir(exist_ok=True)
        (m.unit_dir / f"{unit}.d" / "checkout.conf").write_text(
            "[Service]\n" + "".join(f"BindReadOnlyPaths={p}\n" for p in hidden))


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    files = tmp_path_factory.mktemp("unit-hardening")
    # Not under /tmp: PrivateTmp=yes hides it from the daemon (see the module docstring).
    base = Path(tempfile.mkdtemp(prefix="seccomp-supervisor-test-", dir="/run"))
    try:
        xdg = base / "xdg"
        xdg.mkdir(mode=0o700)
        runtime = xdg / "seccomp-supervisor"   # RuntimeDirectory= of a user manager
        config = base / "config.toml"
        config.write_text(shipped_config(runtime, files / "guarded"))
        shipped = (UNITS / SERVICE).read_text()
        installed = rewrite(shipped, {
            "ExecStart": f"{sys.executable} -m supervisor serve --config {config}",
            # Opened by the manager before the sandbox is set up: may be in /tmp.
            "StandardOutput": f"append:{files}/audit.log",
            "StandardError": f"append:{files}/daemon.log",
        })
        sock = rewrite((UNITS / SOCKET).read_text(),
                       {"ListenStream": f"{runtime}/notify.sock"})
        with run_user_manager(xdg, files / "manager.log", SERVICE, (SOCKET,)) as m:
            m.unit_dir.mkdir(parents=True)
            (m.unit_dir / SERVICE).write_text(installed)
            (m.unit_dir / SOCKET).write_text(sock)
            bind_checkout(m, SERVICE)
            m.ctl("daemon-reload")
            s = Service(m, runtime, files, shipped, installed)
            # Type=notify: `start` returns once the daemon sent READY=1 (or failed).
            started = m.ctl("start", SERVICE, check=False)
            assert started.returncode == 0, f"{started.stderr}\n{s.status()}"
            yield s
            m.ctl("stop", SERVICE, SOCKET)
            result = m.show("Result", "ExecMainStatus", "ActiveState")
            assert result == {"Result": "success", "ExecMainStatus": "0",
                              "ActiveState": "inactive"}, (result, s.log()[-3000:])
    finally:
        shutil.rmtree(base)


def test_only_exec_and_output_paths_differ_from_the_shipped_unit(service: Service) -> None:
    shipped = unit_settings(service.shipped)
    installed = unit_settings(service.installed)
    assert [k for k, _ in shipped] == [k for k, _ in installed]
    changed = {k for (k, a), (_, b) in zip(shipped, installed, strict=True) if a != b}
    assert changed == {"ExecStart", "StandardOutput", "StandardError"}
    # The manager loaded it as written: the hardening shows in its own view of the unit.
    props = service.m.show("ProtectSystem", "PrivateTmp", "NoNewPrivileges",
                           "CapabilityBoundingSet", "RestrictAddressFamilies")
    assert props["ProtectSystem"] == "strict" and props["PrivateTmp"] == "yes"
    assert props["NoNewPrivileges"] == "yes"
    assert set(props["CapabilityBoundingSet"].lower().split()) == set(
        dict(shipped)["CapabilityBoundingSet"].lower().split())


def test_ready_and_a_call_denied_by_the_hardening_policy(service: Service) -> None:
    m = service.m
    props = m.show("ActiveState", "SubState", "StatusText", "Type")
    assert props["ActiveState"] == "active" and props["SubState"] == "running", props
    assert props["StatusText"].startswith("serving 0 containers on"), props
    assert "using the notify socket passed by systemd (fd 3, notify)" in service.log()
    target = service.files / "setuid-me"
    target.write_text("")
    target.chmod(0o755)
    done = service.run("setuid", ["chmod", "fchmodat", "fchmodat2"],
                       ["chmod", "u+s", str(target)])
    assert done.returncode == 1, done
    assert "Operation not permitted" in done.stderr
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    [line] = service.audit("setuid")
    assert line["policy"] == "hardening" and line["decision"] == "deny", line
    assert line["errno"] == errno.EPERM, line
    # /metrics (AF_INET under RestrictAddressFamilies) counts it.
    url = re.findall(r"metrics on (http://\S+/metrics)", service.log())[-1]
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    assert re.search(r'seccomp_supervisor_notifications_total\{[^}]*decision="deny"'
                     r'[^}]*policy="hardening"[^}]*\} 1\.0', text), text
    # The process collector reads /proc/stat (why ProcSubset=pid is not set).
    assert re.search(r"^process_start_time_seconds \d", text, re.MULTILINE), text


def test_path_guard_reads_target_memory(service: Service) -> None:
    """path_guard reads the path from the caller's memory (process_vm_readv, or
    /proc/<tid>/mem): both need ptrace access to a root caller, i.e. CAP_SYS_PTRACE."""
    guarded = service.files / "guarded"
    guarded.mkdir()
    denied = service.run("guard-1", ["mkdir", "mkdirat"], ["mkdir", str(guarded / "sub")])
    assert denied.returncode == 1 and "Permission denied" in denied.stderr, denied
    assert not (guarded / "sub").exists()
    [line] = service.audit("guard-1")
    assert line["policy"] == "path_guard" and line["errno"] == errno.EACCES, line
    assert line["reason"] == f"{line['syscall']} {guarded}/sub is under a guarded prefix"
    allowed = service.run("guard-2", ["mkdir", "mkdirat"],
                          ["mkdir", str(service.files / "free")])
    assert allowed.returncode == 0, (allowed, service.log()[-2000:])
    assert (service.files / "free").is_dir()
    [line] = service.audit("guard-2")
    assert line["reason"] == "path not guarded (advisory check)", line


GUARDED_CALLS = ["open", "openat", "creat", "mkdir", "mkdirat", "rmdir", "unlink", "unlinkat",
                 "rename", "renameat", "renameat2"]


def test_path_guard_enforce_runs_in_the_helper(service: Service) -> None:
    """Enforced, path_guard's calls are made by the emulation helper (setns, chroot,
    openat2, renameat2, fstatfs, capset... under the unit's SystemCallFilter and with the
    capabilities the daemon left it); honest calls work, a symlink into the guarded
    directory does not lead there."""
    guarded = service.files / "guarded"
    guarded.mkdir(exist_ok=True)
    free = service.files / "enforced"
    free.mkdir()
    script = (f"mkdir {free}/d && echo data > {free}/d/f && mv {free}/d/f {free}/d/g && "
              f"cat {free}/d/g && rm {free}/d/g && rmdir {free}/d && "
              f"ln -s {guarded} {free}/link && "
              f"(echo x > {free}/link/pwn; mkdir {free}/link/sub; echo refused=$?)")
    done = service.run("enforce-1", GUARDED_CALLS, ["sh", "-c", script])
    assert done.returncode == 0, (done, service.log()[-2000:])
    assert done.stdout.split() == ["data", "refused=1"], done
    assert "Permission denied" in done.stderr
    assert not (guarded / "pwn").exists() and not (guarded / "sub").exists()
    assert sorted(p.name for p in free.iterdir()) == ["link"]
    lines = service.audit("enforce-1", 8)
    decided = {(str(a["policy"]), str(a["decision"])) for a in lines}
    assert {("guard_enforced", "inject_fd"), ("guard_enforced", "returns"),
            ("guard_enforced", "deny")} <= decided, decided


def _mknod_as(uid: int, directory: Path, name: str) -> list[str]:
    """A command that enters ``directory`` (its parents may be closed to ``uid``),
    becomes ``uid`` and makes the character device 1:3 ``name`` there (a relative path:
    the daemon resolves it against the caller's working directory)."""
    return [sys.executable, "-c",
            "import os, sys; os.chdir(sys.argv[1]); "
            f"os.setgroups([]); os.setgid({uid}); os.setuid({uid}); "
            "os.mknod(sys.argv[2], 0o20666, os.makedev(1, 3))", str(directory), name]


def test_devices_emulates_mknod(service: Service) -> None:
    """The daemon creates the node in the caller's mount namespace, as the caller: a
    helper that setns()es (CAP_SYS_ADMIN, CAP_SYS_CHROOT), chroot()s to the caller's root,
    takes its groups and fsuid/fsgid and keeps CAP_MKNOD."""
    x = service.files / "x"
    x.mkdir()
    done = service.run("mknod-root", ["mknod", "mknodat"],
                       ["mknod", str(x / "null"), "c", "1", "3"])
    assert done.returncode == 0, (done, service.log()[-2000:])
    st = (x / "null").lstat()
    assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 3)
    [line] = service.audit("mknod-root")
    assert line["policy"] == "devices" and line["decision"] == "returns", line
    assert line["reason"] == f"created {x}/null (char 1:3) for the caller", line
    # A caller that may not mknod itself (nobody, no CAP_MKNOD): the node exists only if
    # the daemon made it, and it belongs to the caller only if the fsuid/fsgid switch
    # worked under the bounding set.
    mine = service.files / "nobody"
    mine.mkdir()
    os.chown(mine, NOBODY, NOBODY)
    done = service.run("mknod-nobody", ["mknod", "mknodat"], _mknod_as(NOBODY, mine, "null"))
    assert done.returncode == 0, (done, service.log()[-2000:])
    st = (mine / "null").lstat()
    assert stat.S_ISCHR(st.st_mode) and os.minor(st.st_rdev) == 3
    assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)
    # Control: without the daemon, the kernel refuses nobody.
    refused = subprocess.run(_mknod_as(NOBODY, mine, "null2"), capture_output=True,
                             text=True)
    assert refused.returncode != 0 and "Operation not permitted" in refused.stderr


def _status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def test_the_sandbox_applies_to_the_main_process(service: Service) -> None:
    pid = service.pid
    status = _status(pid)
    wanted = dict(unit_settings(service.shipped))["CapabilityBoundingSet"].split()
    assert int(status["CapBnd"], 16) == sum(1 << CAPS[c] for c in wanted), status["CapBnd"]
    # `serve` started the emulation helper, then kept only CAP_SYS_PTRACE; the helper
    # holds the rest (and drops CAP_SYS_PTRACE, which it does not use).
    assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == 1 << CAPS["CAP_SYS_PTRACE"]
    [helper] = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    helper_status = _status(int(helper))
    assert int(helper_status["CapEff"], 16) == int(status["CapBnd"], 16) & ~(
        1 << CAPS["CAP_SYS_PTRACE"])
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"                # SystemCallFilter: a filter is installed
    assert int(status["Seccomp_filters"]) >= 1
    # ProtectSystem=strict: /usr read-only in the daemon's mount namespace (reached
    # through /proc/PID/root); PrivateTmp=yes: its /tmp is not ours.
    assert os.statvfs(f"/proc/{pid}/root/usr").f_flag & os.ST_RDONLY
    assert os.statvfs(f"/proc/{pid}/root/etc").f_flag & os.ST_RDONLY
    assert not os.statvfs(f"/proc/{pid}/root{service.runtime}").f_flag & os.ST_RDONLY
    ours, theirs = os.stat("/tmp"), os.stat(f"/proc/{pid}/root/tmp")
    assert (ours.st_dev, ours.st_ino) != (theirs.st_dev, theirs.st_ino)
    # ProtectProc=invisible: the daemon's /proc is mounted with hidepid=invisible.
    proc = [line.split() for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
            if line.split()[4] == "/proc"]
    assert proc and "hidepid=invisible" in proc[-1][-1].split(","), proc


@contextmanager
def drop_in(service: Service, setting: str) -> Iterator[None]:
    """The unit restarted with one more ``[Service]`` line (a drop-in); restored (and
    restarted) on exit."""
    m = service.m
    directory = m.unit_dir / f"{SERVICE}.d"
    directory.mkdir(exist_ok=True)
    conf = directory / "test.conf"
    conf.write_text(f"[Service]\n{setting}\n")
    try:
        m.ctl("daemon-reload")
        m.ctl("restart", SERVICE)
        yield
    finally:
        conf.unlink()
        m.ctl("daemon-reload")
        m.ctl("restart", SERVICE)


def _mknod_root(service: Service, name: str) -> subprocess.CompletedProcess[str]:
    where = service.files / name
    where.mkdir()
    return service.run(name, ["mknod", "mknodat"],
                       ["mknod", str(where / "null"), "c", "1", "3"])


def _mknod_nobody(service: Service, name: str) -> subprocess.CompletedProcess[str]:
    where = service.files / name
    where.mkdir()
    os.chown(where, NOBODY, NOBODY)
    return service.run(name, ["mknod", "mknodat"], _mknod_as(NOBODY, where, "null"))


def _guarded_mkdir(service: Service, name: str) -> subprocess.CompletedProcess[str]:
    (service.files / "guarded").mkdir(exist_ok=True)
    return service.run(name, ["mkdir", "mkdirat"],
                       ["mkdir", str(service.files / "guarded" / name)])


# The unit as it was before this test ran the daemon under it, one setting at a time, and
# without CAP_SYS_PTRACE: what breaks, and the errno the caller sees.
REVERTED = {
    "RestrictSUIDSGID=yes": (_mknod_root, errno.ENOSYS),        # openat2 in the helper
    "SystemCallFilter=~chroot": (_mknod_root, errno.EPERM),      # chroot in the helper
    "CapabilityBoundingSet=~CAP_SETGID": (_mknod_root, errno.EPERM),   # setgroups
    # setfsuid fails silently; the helper checks the fsuid it got and refuses.
    "CapabilityBoundingSet=~CAP_SETUID": (_mknod_nobody, errno.EPERM),
    "CapabilityBoundingSet=~CAP_SYS_PTRACE": (_guarded_mkdir, errno.EPERM),  # on_error
}


@pytest.mark.parametrize("setting", list(REVERTED))
def test_each_setting_the_daemon_needs(service: Service, setting: str) -> None:
    """The checks above can fail: with one of the settings reverted, the call they make
    fails for the caller (the daemon's answer, in the audit log)."""
    check, err = REVERTED[setting]
    name = "revert-" + re.sub(r"[^a-z]+", "-", setting.lower()).strip("-")
    with drop_in(service, setting):
        done = check(service, name)
        assert done.returncode != 0, done
        assert os.strerror(err) in done.stderr, done.stderr
        [line] = service.audit(name)
        assert line["decision"] == "deny" and line["errno"] == err, line
        if "PTRACE" in setting:  # neither way of reading the path was allowed
            assert "Permission denied: '/proc/" in str(line["reason"]), line
    # And back as shipped, the same call works (or is denied by the policy itself).
    done = check(service, name + "-again")
    assert done.returncode == (1 if check is _guarded_mkdir else 0), done
    if check is _guarded_mkdir:
        assert "Permission denied" in done.stderr


# --------------------------------------------------------------------------- the sandbox

PROBE = "seccomp-supervisor-probe.service"
EPERM, EACCES = os.strerror(errno.EPERM), os.strerror(errno.EACCES)


def non_loopback_address() -> str:
    """An IPv4 address of this host outside 127.0.0.0/8 (IPAddressAllow=localhost)."""
    out = subprocess.run(["ip", "-j", "-4", "addr", "show", "scope", "global"],
                         capture_output=True, text=True, check=True).stdout
    found = [a["local"] for link in json.loads(out) for a in link.get("addr_info", [])]
    assert found, "this host has no non-loopback IPv4 address to test IPAddressDeny= with"
    return str(found[0])


def run_probe(service: Service, unit_text: str, name: str) -> dict[str, str]:
    """tests/unit_probe.py as the ExecStart of ``unit_text`` (Type=oneshot): its
    results."""
    m = service.m
    out = service.files / f"{name}.json"
    probe = (f"{sys.executable} {ROOT}/tests/unit_probe.py {service.runtime} "
             f"{non_loopback_address()}")
    (m.unit_dir / name).write_text(rewrite(unit_text, {
        "ExecStart": probe, "Type": "oneshot", "StandardOutput": f"truncate:{out}",
        "StandardError": f"append:{service.files}/{name}.log"}))
    bind_checkout(m, name)
    m.ctl("daemon-reload")
    started = m.ctl("start", name, check=False)
    assert started.returncode == 0, (started.stderr, (service.files / f"{name}.log")
                                     .read_text(errors="replace")[-3000:])
    result: dict[str, str] = json.loads(out.read_text())
    return result


def test_each_sandbox_setting_is_in_effect(service: Service) -> None:
    """A probe with the shipped [Service] section (only ExecStart, Type and the output
    paths changed) tries what each setting forbids, and what the daemon needs."""
    other = non_loopback_address()
    got = run_probe(service, service.shipped, PROBE)
    expected = {
        # RestrictNamespaces=mnt: the mknod helper's setns(fd, CLONE_NEWNS) passes; a
        # setns() that does not name the type, other types and new namespaces do not.
        "setns mnt CLONE_NEWNS": "ok", "setns mnt 0": EPERM,
        "setns net CLONE_NEWNET": EPERM, "unshare user": EPERM, "unshare net": EPERM,
        # IPAddressDeny=any, IPAddressAllow=localhost: /metrics on 127.0.0.1 works; the
        # packets to another address of this very host are dropped.
        "connect 127.0.0.1": "ok", f"connect {other}": "timeout",
        # DevicePolicy=closed: the devices policy's defaults pass, other devices do not.
        "mknod 1:3": "ok", "mknod 0:0": "ok", "mknod 10:229": EPERM,
        "open /dev/null": "ok",
        # ProtectHome=yes
        "list /root": EACCES,
        # MemoryDenyWriteExecute=yes
        "mmap W+X": EPERM,
        # SystemCallFilter=~@resources process_vm_writev, then =setpriority (the reading
        # threads' nice level, supervisor/memory.py) back in
        "sched_setaffinity": EPERM, "setpriority": "ok", "process_vm_writev": EPERM,
        # ProcSubset= not set: the process_* metrics read /proc/stat.
        "read /proc/stat": "ok",
    }
    if Path("/home").is_dir():
        expected["list /home"] = EACCES
    assert {k: got[k] for k in expected} == expected


def test_the_probe_can_fail(service: Service) -> None:
    """Control: the same probe without the sandbox gets all of it (so the refusals above
    come from the unit's settings, not from this host)."""
    bare = ("[Service]\nType=oneshot\nExecStart=x\nStandardOutput=x\nStandardError=x\n"
            "RuntimeDirectory=seccomp-supervisor\nRuntimeDirectoryPreserve=yes\n")
    got = run_probe(service, bare, "seccomp-supervisor-probe-bare.service")
    other = non_loopback_address()
    allowed = ("setns mnt 0", "setns net CLONE_NEWNET", "unshare user", "unshare net",
               f"connect {other}", "mknod 10:229", "list /root", "mmap W+X",
               "sched_setaffinity", "setpriority", "process_vm_writev")
    assert {k: got[k] for k in allowed} == dict.fromkeys(allowed, "ok")


def test_devices_default_allowlist_under_device_policy(service: Service) -> None:
    """DevicePolicy=closed lets the daemon's helper create every device the devices
    policy allows by default (null, zero, full, random, urandom, tty, and the overlayfs
    whiteout 0:0): the device cgroup checks mknod too."""
    where = service.files / "defaults"
    where.mkdir()
    for spec in ["1:3", "1:5", "1:7", "1:8", "1:9", "5:0", "0:0"]:
        major, minor = map(int, spec.split(":"))
        node = where / f"{major}-{minor}"
        script = f"import os; os.mknod({str(node)!r}, 0o20666, os.makedev({major}, {minor}))"
        for attempt in range(3):
            # The helper is a new interpreter per call: on a loaded host it can miss the
            # 2 s deadline (answered EPERM, reason "deadline"). That is not what this
            # checks, so such a call is repeated.
            name = f"default-{major}-{minor}-{attempt}"
            done = service.run(name, ["mknod", "mknodat"], [sys.executable, "-c", script])
            [line] = service.audit(name)
            if line.get("error") != "deadline":
                break
        assert done.returncode == 0, (done, line)
        assert line["decision"] == "returns", line
        st = node.lstat()
        assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (
            major, minor)


# Tighter than shipped, one setting at a time (the "Deliberately NOT set" list of the unit,
# and RestrictNamespaces= with no namespace at all): what breaks, and the errno the
# caller sees.
TOO_TIGHT = {
    # The mknod helper's setns(fd, CLONE_NEWNS) is refused: mnt is the one type needed.
    "RestrictNamespaces=yes": (_mknod_root, errno.EPERM),
    # Drops CAP_MKNOD (and CAP_SYS_RAWIO) from the bounding set.
    "PrivateDevices=yes": (_mknod_root, errno.EPERM),
    # A user namespace of its own: no capability over the callers, no reading their memory.
    "PrivateUsers=yes": (_guarded_mkdir, errno.EPERM),
}


@pytest.mark.parametrize("setting", list(TOO_TIGHT))
def test_each_setting_that_would_be_too_tight(service: Service, setting: str) -> None:
    check, err = TOO_TIGHT[setting]
    name = "tight-" + re.sub(r"[^a-z]+", "-", setting.lower()).strip("-")
    with drop_in(service, setting):
        done = check(service, name)
        assert done.returncode != 0 and os.strerror(err) in done.stderr, done
        [line] = service.audit(name)
        assert line["decision"] == "deny" and line["errno"] == err, line
        # The daemon's own failure, not a missed deadline (also EPERM).
        assert line.get("error") != "deadline", line


def test_proc_subset_would_drop_the_process_metrics(service: Service) -> None:
    """ProcSubset=pid (not set) hides /proc/stat: prometheus-client's process collector
    then exports no process_* metric at all."""
    with drop_in(service, "ProcSubset=pid"):
        url = re.findall(r"metrics on (http://\S+/metrics)", service.log())[-1]
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        assert "seccomp_supervisor_notifications_total" in text
        assert not re.search(r"^process_", text, re.MULTILINE), text


def test_a_target_hidden_by_protect_proc_gets_an_answer(service: Service) -> None:
    """ProtectProc=invisible hides a process the daemon may not ptrace: its /proc/<tid>
    is missing (ENOENT), not refused. A daemon without ptrace access to a live caller
    (here: no CAP_SYS_PTRACE, and a group other than root, which the kernel exempts from
    hidepid) must answer it (on_error), not take it for gone and leave it blocked."""
    with drop_in(service, "CapabilityBoundingSet=~CAP_SYS_PTRACE\nGroup=65534"):
        assert _status(service.pid)["Gid"].split()[0] == "65534"
        done = _guarded_mkdir(service, "hidden-caller")
        assert done.returncode != 0 and EPERM in done.stderr, done
        [line] = service.audit("hidden-caller")
        assert line["decision"] == "deny" and line["errno"] == errno.EPERM, line
        assert "not visible" in str(line["reason"]), line


def test_fd_store_reload_and_watchdog_under_the_sandbox(service: Service) -> None:
    """What the daemon does with systemd, under the shipped sandbox: a served container's
    notify fd goes to the fd store and comes back after a restart (its next call is
    answered by the new process), `systemctl reload` (ExecReload= runs in the sandbox
    too) reloads, and WATCHDOG=1 arrives."""
    m = service.m
    work = service.files / "fdstore"
    work.mkdir()
    script = ("import os, sys, time\n"
              "where = sys.argv[1]\n"
              "os.mkdir(f'{where}/a')\n"
              "open(f'{where}/ready', 'w').close()\n"
              "while not os.path.exists(f'{where}/go'):\n"
              "    time.sleep(0.02)\n"
              "os.mkdir(f'{where}/b')\n")
    target = subprocess.Popen(
        [*CLI, "run", "--socket", service.socket, "--id", "fdstore", "--notify", "mkdir",
         "--notify", "mkdirat", "--", sys.executable, "-c", script, str(work)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=service.files,
        start_new_session=True)  # its own group: the filtered child holds the pipes too
    try:
        deadline = time.monotonic() + 30
        while not (work / "ready").exists():
            assert target.poll() is None and time.monotonic() < deadline, target.stderr
            time.sleep(0.02)
        m.wait_for("NFileDescriptorStore", lambda v: v != "0")
        before = service.pid
        reloads = service.log().count("reloaded ")
        m.ctl("reload", SERVICE)
        # ExecReload= sends SIGHUP and returns: the daemon logs the reload a little later.
        deadline = time.monotonic() + 30
        while service.log().count("reloaded ") < reloads + 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert service.log().count("reloaded ") == reloads + 1, service.log()[-2000:]
        restarted = time.time()
        m.ctl("restart", SERVICE)
        assert service.pid != before
        assert "fd store: serving 1 sessions again" in service.log()
        (work / "go").touch()
        _out, err = target.communicate(timeout=30)
    finally:
        if target.poll() is None:
            os.killpg(target.pid, signal.SIGKILL)  # the group this test started
            target.communicate(timeout=30)
    assert target.returncode == 0, err
    assert (work / "b").is_dir()
    lines = service.audit("fdstore", 2)
    assert [a["decision"] for a in lines] == ["allow", "allow"], lines
    assert float(str(lines[0]["time"])) < restarted < float(str(lines[1]["time"])), lines
    # WatchdogSec= (30 s in the unit, so a ping every 15 s): shortened to see pings.
    with drop_in(service, "WatchdogSec=2s"):
        pid = service.pid
        first = m.wait_for("WatchdogTimestampMonotonic", lambda v: v not in ("", "0"))
        m.wait_for("WatchdogTimestampMonotonic", lambda v: v != first, timeout=10)
        time.sleep(2.5)  # longer than WatchdogSec: still the same process
        assert service.pid == pid


def test_a_runc_container_under_the_sandbox(service: Service) -> None:
    """A real container (its own pid and mount namespaces) served by the sandboxed
    daemon: path_guard reads the path from the container's memory, and devices creates
    /dev/null-like nodes in the container's mount namespace (the helper's
    setns(CLONE_NEWNS) under RestrictNamespaces=mnt, mknod under DevicePolicy=closed)."""
    from .runtime import oci_config, sync_container, unique_id

    script = ("mknod /tmp/null c 1 3; echo mknod=$?; echo data > /tmp/null; echo write=$?;"
              " stat -c node=%t:%T /tmp/null; mkdir /tmp/free; echo mkdir=$?")
    config = oci_config(["sh", "-c", script], notify=["mknod", "mknodat", "mkdir", "mkdirat"],
                        listener_path=service.socket)
    for mount in config["mounts"]:  # a /tmp where device nodes can be opened
        if mount["destination"] == "/tmp":
            mount["options"] = [o for o in mount["options"] if o != "nodev"]
    bundle = service.files / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps(config))
    name = unique_id("unit-hardening")
    with sync_container("runc", bundle, name) as ctr:
        done = ctr.run_sync()
    out = done.stdout.decode()
    assert done.returncode == 0, (out, done.stderr, service.log()[-2000:])
    lines = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert lines == {"mknod": "0", "write": "0", "node": "1:3", "mkdir": "0"}, out
    audit = service.audit(name, 2)
    assert {(a["policy"], a["decision"]) for a in audit} == {
        ("devices", "returns"), ("path_guard", "allow")}, audit
