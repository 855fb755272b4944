"""Rootless docker end to end: dockerd as an unprivileged user under rootlesskit.

The module creates a user (``useradd``: it gets subordinate uid/gid ranges) and runs
Debian's dockerd 20.10 as that user in rootlesskit's user and mount namespaces, with the
containerd dockerd starts itself, and ``deploy/docker/crun-seccomp-receiver`` registered
as runtime ``crun-supervised``. crun then runs inside the user namespace and connects to
the daemon's socket as the user's uid: the socket's directory must be reachable
(``socket_mode``, a 0755 directory) and the uid in ``allowed_uids``. On exit the
containers, dockerd, rootlesskit and whatever they left running are stopped, the
directory is removed and the user deleted (with its subordinate ranges).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from .daemon_harness import RunningDaemon, running_daemon
from .engines import (
    CRUN_RECEIVER,
    Dockerd,
    HostUser,
    crun_script,
    docker_version,
    private_rootless_dockerd,
    shared_tmpdir,
    temporary_user,
)
from .runtime import unique_id

pytestmark = pytest.mark.runtime

POLICY = Path(__file__).resolve().parent / "policies" / "containers.py"
HANDOFFS = "seccomp_supervisor_handoffs_total"
NOTIFY = ("mkdir", "mkdirat", "openat")
PROFILE = ('{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": '
           '[{"names": ["mkdir", "mkdirat", "openat"], "action": "SCMP_ACT_NOTIFY"}]}')
# A directory in the host's /run that only appears after the rootless dockerd started.
LATE_RECEIVER = Path(f"/run/sstest-late-{os.getpid()}") / "notify.sock"


@dataclass
class Rootless:
    dockerd: Dockerd
    user: HostUser
    receiver: Path   # the daemon's socket, in a directory the user can reach
    profile: Path


@pytest.fixture(scope="module")
def rootless() -> Iterator[Rootless]:
    base = shared_tmpdir("sstest-rootless-")
    try:
        sockets = base / "sup"
        sockets.mkdir(mode=0o755)
        sockets.chmod(0o755)  # the daemon keeps an existing directory's mode
        profile = base / "profile.json"
        profile.write_text(PROFILE)
        profile.chmod(0o644)
        receiver = sockets / "notify.sock"
        crun = crun_script(base / "crun", userns=True)

        def wrapper(socket: Path) -> dict[str, Any]:
            return {"path": str(CRUN_RECEIVER),
                    "runtimeArgs": [f"--receiver={socket}", f"--crun={crun}"]}

        runtimes = {"crun-supervised": wrapper(receiver), "crun-late": wrapper(LATE_RECEIVER),
                    "crun": {"path": str(crun)}}
        with (temporary_user() as user,
              private_rootless_dockerd(base / "dockerd", user, runtimes=runtimes) as dockerd):
            yield Rootless(dockerd, user, receiver, profile)
    finally:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(LATE_RECEIVER.parent, ignore_errors=True)


def _config(r: Rootless, allowed_uids: Sequence[int]) -> str:
    return f"""
[listen]
socket = "{r.receiver}"
control_socket = "{r.receiver.parent / 'control.sock'}"
socket_mode = 0o666
allowed_uids = {list(allowed_uids)}

[defaults]
policies = ["plain"]
unhandled = "deny:EXDEV"

[[policy]]
name = "plain"
path = "{POLICY}"
options = {{ tag = "rootless" }}
"""


def _answers(n: int) -> str:
    return f'for k in deny ret allow; do mkdir /tmp/$k-{n}; echo "$k rc=$?"; done'


async def _docker(d: Dockerd, args: Sequence[str],
                  timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(timeout):
        return await trio.run_process(d.docker_argv(args), check=False, capture_stdout=True,
                                      capture_stderr=True, stdin=subprocess.DEVNULL)


@asynccontextmanager
async def _named(d: Dockerd, prefix: str) -> AsyncIterator[str]:
    name = unique_id(prefix)
    try:
        yield name
    finally:
        with trio.CancelScope(shield=True):
            await _docker(d, ["rm", "-f", name])


def _inject_line(text: str) -> dict[str, str]:
    for line in text.splitlines():
        if line.startswith("tag="):
            return dict(part.split("=", 1) for part in line.split(" "))
    raise AssertionError(f"no injected line in {text!r}")


async def _wait_sessions(d: RunningDaemon, n: int, timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while len(d.daemon.sessions) != n:
            await trio.sleep(0.02)


async def test_rootless_wrapper_serves_run_and_exec(tmp_path: Path, rootless: Rootless) -> None:
    """Handed over from inside the user namespace, as the user's uid (the only uid
    allowed); the pid in the message is the host's pid of the container's init, whose
    root is the user."""
    d = rootless.dockerd
    async with running_daemon(tmp_path, _config(rootless, [rootless.user.uid])) as sup:
        async with _named(d, "dkrl") as name:
            started = await _docker(d, [
                "run", "-d", "--name", name, "--runtime", "crun-supervised",
                "--network", "none", "--security-opt", f"seccomp={rootless.profile}",
                d.image, "sh", "-c", f"cat /inject; {_answers(1)}; exec sleep 60"])
            assert started.returncode == 0, started.stderr
            cid = started.stdout.decode().strip()
            with trio.fail_after(20):
                while True:
                    logs = await _docker(d, ["logs", name])
                    out = (logs.stdout + logs.stderr).decode()
                    if re.search(r"allow rc=\d", out):
                        break
                    await trio.sleep(0.05)
            first = _inject_line(out)
            assert first["tag"] == "rootless" and first["id"] == cid
            assert first["status"] == "creating"
            assert os.stat(f"/proc/{first['pid']}").st_uid == rootless.user.uid
            assert "deny rc=1" in out and "ret rc=0" in out and "allow rc=0" in out

            execd = await _docker(d, ["exec", name, "sh", "-c", f"cat /inject; {_answers(2)}"])
            assert execd.returncode == 0, execd.stderr
            second = _inject_line(execd.stdout.decode())
            assert second["id"] == cid and second["status"] == "running"
            assert b"deny rc=1" in execd.stdout and b"allow rc=0" in execd.stdout
            assert sup.metric(HANDOFFS, result="accepted") == 2
        await _wait_sessions(sup, 0)


async def test_rootless_handoff_of_a_uid_not_allowed(tmp_path: Path,
                                                     rootless: Rootless) -> None:
    """``allowed_uids = [0]``: the user's handoff is refused; no notified call of the
    container passes unchecked (it does not start, or its calls get ENOSYS)."""
    d = rootless.dockerd
    async with running_daemon(tmp_path, _config(rootless, [0])) as sup:
        done = await _docker(d, [
            "run", "--rm", "--runtime", "crun-supervised", "--network", "none",
            "--security-opt", f"seccomp={rootless.profile}", d.image,
            "sh", "-c", "mkdir /tmp/allow-1; echo rc=$?"])
        err = done.stderr.decode()
        assert (done.returncode != 0 and "send listener fd" in err) or (
            "'/tmp/allow-1': Function not implemented" in err), err
        assert sup.metric(HANDOFFS, result="forbidden") == 1
        assert not sup.daemon.sessions


async def test_rootless_docker_20_10_drops_listener_path_too(tmp_path: Path,
                                                             rootless: Rootless) -> None:
    """The drop is dockerd's, rootless or not: runc refuses the container, crun runs it
    with nobody holding the listener (ENOSYS)."""
    d = rootless.dockerd
    profile = tmp_path / "listener.json"
    profile.write_text(PROFILE.replace('"syscalls"',
                                       f'"listenerPath": "{rootless.receiver}", "syscalls"'))
    # (the docker CLI runs as root: it reads the file and sends its content)
    opts = ["--network", "none", "--security-opt", f"seccomp={profile}", d.image,
            "sh", "-c", "mkdir /tmp/x; echo rc=$?"]
    async with running_daemon(tmp_path, _config(rootless, [rootless.user.uid])) as sup:
        by_runc = await _docker(d, ["run", "--rm", "--runtime", "runc", *opts])
        by_crun = await _docker(d, ["run", "--rm", "--runtime", "crun", *opts])
        if docker_version() >= (23, 0):
            assert sup.metric(HANDOFFS, result="accepted") == 2
        else:
            assert by_runc.returncode == 125
            assert b"listenerPath is not set" in by_runc.stderr, by_runc.stderr
            assert b"'/tmp/x': Function not implemented" in by_crun.stderr, by_crun.stderr
            assert sup.metric(HANDOFFS, result="accepted") == 0


async def test_rootless_docker_sees_only_the_run_it_started_with(tmp_path: Path,
                                                                 rootless: Rootless) -> None:
    """rootlesskit's ``--copy-up=/run`` replaces /run with a tmpfs of symlinks to what
    /run held when dockerd started: a directory made in /run later is not there for the
    runtime, so the handoff fails although the socket exists on the host."""
    d = rootless.dockerd
    LATE_RECEIVER.parent.mkdir(mode=0o755)
    try:
        config = _config(rootless, [rootless.user.uid]).replace(
            str(rootless.receiver.parent), str(LATE_RECEIVER.parent))
        async with running_daemon(tmp_path, config) as sup:
            assert LATE_RECEIVER.is_socket()
            done = await _docker(d, ["run", "--rm", "--runtime", "crun-late",
                                     "--network", "none", d.image, "true"])
            assert done.returncode == 125
            assert (f"open seccomp receiver: connect socket to `{LATE_RECEIVER}`: "
                    "No such file or directory").encode() in done.stderr, done.stderr
            assert sup.metric(HANDOFFS, result="accepted") == 0
    finally:
        shutil.rmtree(LATE_RECEIVER.parent, ignore_errors=True)
