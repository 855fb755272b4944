"""A real systemd for tests: ``systemd --user`` (as root, so the sandboxing options of a
unit do apply) in a private mount namespace, driven with ``systemctl --user`` over its
private socket in ``$XDG_RUNTIME_DIR/systemd/private``.

    with run_user_manager(xdg, tmp_path / "manager.log") as m:
        ...write units to m.unit_dir...
        m.ctl("daemon-reload"); m.ctl("start", m.unit)

On exit the units named in ``m.unit`` and ``m.also`` are stopped and the manager exits
(SIGKILLed if it does not within 20 s).
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# Run in the manager's mount namespace before systemd starts; see run_user_manager.
_BOOTED = (
    "mount --bind /run /run && mount -t tmpfs tmpfs /run/systemd && "
    "mkdir /run/systemd/system && "
    "cd /run/systemd && mkdir -m 0755 inaccessible && cd inaccessible && "
    "mkdir -m 000 dir && touch reg && mkfifo fifo && mknod chr c 0 0 && mknod blk b 0 0 && "
    f"{shlex.quote(sys.executable)} -c 'import socket; socket.socket(socket.AF_UNIX)"
    ".bind(\"sock\")' && chmod 000 reg fifo chr blk sock && cd /")

def _cgroup_mounts() -> list[Path]:
    """Where the cgroup hierarchies are mounted (cgroup2, and each v1 hierarchy of a
    "hybrid" or legacy layout), but v1 cpuset: joining a new cpuset cgroup needs its cpus
    and mems set first."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, _, fs = line.partition(" - ")
        fstype, _source, options = fs.split(" ", 2)
        if fstype == "cgroup2" or (fstype == "cgroup" and "cpuset" not in options.split(",")):
            found.append(Path(fields.split()[4]))
    return found


def _own_cgroup(name: str) -> str:
    """Shell that moves itself into a new cgroup ``name`` at the top of every hierarchy.
    A user manager takes the cgroup it starts in as the root of its tree: two managers
    started in the same cgroup (tests running at the same time) would both put
    seccomp-supervisor.service in <root>/app.slice/seccomp-supervisor.service, and kill or
    wait for each other's processes when they stop it. The same path in every hierarchy:
    with v1 controllers a manager realises a unit's devices cgroup only then (else
    DevicePolicy= does nothing)."""
    return " && ".join(f"mkdir {shlex.quote(str(m / name))} && "
                       f"echo $$ > {shlex.quote(str(m / name / 'cgroup.procs'))}"
                       for m in _cgroup_mounts())


def _remove_cgroups(name: str) -> None:
    """The cgroups ``name`` that the manager left, deepest first; a cgroup that still has
    processes stays."""
    for top in (m / name for m in _cgroup_mounts()):
        for directory, _subdirs, _files in os.walk(top, topdown=False):
            try:
                os.rmdir(directory)
            except OSError:
                pass


@dataclass
class UserManager:
    """``systemctl --user`` for the manager whose runtime directory is in ``env``."""

    env: dict[str, str]
    unit: str = "seccomp-supervisor-test.service"
    also: tuple[str, ...] = ()

    @property
    def unit_dir(self) -> Path:
        """Where this manager reads units from (a runtime unit directory)."""
        return Path(self.env["XDG_RUNTIME_DIR"]) / "systemd" / "user"

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["systemctl", "--user", *args], env=self.env,
                                capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"systemctl --user {' '.join(args)}: {result.stderr}")
        return result

    def show(self, *props: str, unit: str | None = None) -> dict[str, str]:
        out = self.ctl("show", *(f"--property={p}" for p in props), unit or self.unit).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait_for(self, prop: str, check: Callable[[str], bool], timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while True:
            value = self.show(prop)[prop]
            if check(value):
                return value
            assert time.monotonic() < deadline, f"{prop}={value}"
            time.sleep(0.05)


@contextmanager
def run_user_manager(xdg: Path, log: Path, unit: str = UserManager.unit,
                     also: tuple[str, ...] = ()) -> Iterator[UserManager]:
    """Start ``systemd --user`` with ``XDG_RUNTIME_DIR=xdg`` (an existing 0700
    directory); its output goes to ``log``."""
    # dev.sh installs the systemd package; a missing binary is a setup bug, not a skip.
    assert shutil.which("systemd") and shutil.which("unshare"), "systemd/unshare missing"
    env = dict(os.environ, XDG_RUNTIME_DIR=str(xdg))
    env.pop("NOTIFY_SOCKET", None)
    # systemd --user only runs on a system "booted with systemd": give it that view
    # (/run/systemd/system) in a mount namespace of its own (_BOOTED). Two more things a
    # booted system has and the sandboxing options of a unit rely on (without them a
    # sandboxed unit fails with 226/NAMESPACE or loses /run):
    # - /run is a mount point. Where it is not (this VM), ProtectControlGroups=,
    #   ProtectKernelTunables=... mount the API file systems, /run as an empty tmpfs
    #   "unless already mounted"; a bind mount of /run onto itself makes it one.
    # - /run/systemd/inaccessible/{reg,dir,chr,...}: a manager running as root mounts
    #   these over what a unit may not see (ProtectKernelLogs= hides /dev/kmsg with chr).
    #   PID 1 creates them at boot.
    cgroup = f"seccomp-supervisor-test-{secrets.token_hex(6)}"
    with open(log, "wb") as out:
        manager = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             f"{_own_cgroup(cgroup)} && {_BOOTED} && exec systemd --user"],
            env=env, stdout=out, stderr=subprocess.STDOUT)
    m = UserManager(env, unit, also)
    try:
        deadline = time.monotonic() + 20
        while not (xdg / "systemd" / "private").exists():
            assert manager.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "systemd --user did not start"
            time.sleep(0.02)
        yield m
    finally:
        subprocess.run(["systemctl", "--user", "stop", m.unit, *m.also], env=env,
                       capture_output=True, timeout=60)
        subprocess.run(["systemctl", "--user", "exit"], env=env, capture_output=True,
                       timeout=30)
        try:
            manager.wait(20)
        except subprocess.TimeoutExpired:
            manager.kill()
            manager.wait()
        _remove_cgroups(cgroup)
