"""containerd end to end: ``ctr run --seccomp --seccomp-profile`` on a private containerd.

containerd 1.6's ``ctr`` reads the profile file straight into the runtime-spec
``LinuxSeccomp`` struct (``contrib/seccomp.WithProfile``), whose ``listenerPath`` and
``listenerMetadata`` fields it keeps: runc and crun under the containerd shim then hand
the listener to the daemon as usual, with metadata and ``--annotation`` annotations.

One containerd per module (tests/engines.py), and one rootless containerd (as a
temporary user under rootlesskit) for the rootless tests. Containers run from the shared
busybox rootfs (``--rootfs --read-only``, a tmpfs on /tmp), with their runc state root
and IO fifos in the engine's directory; each test kills and removes its task and
container (shielded), and the module fixtures remove whatever is left, then the user.
"""

from __future__ import annotations

import json
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
    Containerd,
    HostUser,
    crun_script,
    private_containerd,
    shared_tmpdir,
    temporary_user,
)
from .runtime import RUNTIMES, busybox_rootfs, unique_id

pytestmark = pytest.mark.runtime

POLICY = Path(__file__).resolve().parent / "policies" / "containers.py"
HANDOFFS = "seccomp_supervisor_handoffs_total"
NOTIFY = ("mkdir", "mkdirat", "openat")

ROUTED = f"""
[defaults]
policies = ["plain"]
unhandled = "deny:EXDEV"

[[policy]]
name = "plain"
path = "{POLICY}"
options = {{ tag = "plain" }}

[[policy]]
name = "routed"
path = "{POLICY}"
options = {{ tag = "routed" }}

[[route]]
match = {{ annotations = {{ "org.example/team" = "build" }}, labels = {{ env = "ci" }} }}
policies = ["routed"]
"""


@dataclass
class Engine:
    containerd: Containerd
    crun: Path   # crun as tests run it on this host (see tests.runtime.crun_argv0)

    def runc_binary(self, runtime: str) -> str:
        return str(self.crun) if runtime == "crun" else "runc"


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    base = tmp_path_factory.mktemp("containerd")
    crun = crun_script(base / "crun")
    with private_containerd(base / "containerd") as containerd:
        yield Engine(containerd, crun)


def _profile(path: Path, listener: str) -> Path:
    """An OCI ``LinuxSeccomp`` object, the format ``ctr --seccomp-profile`` reads."""
    path.write_text(json.dumps({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "listenerPath": listener,
        "listenerMetadata": "team=build\nenv=ci",
        "syscalls": [{"names": list(NOTIFY), "action": "SCMP_ACT_NOTIFY"}],
    }))
    return path


async def _ctr(c: Containerd, args: Sequence[str],
               timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    # Never blocks the loop: the daemon under test answers the container from it.
    with trio.fail_after(timeout):
        return await trio.run_process(c.ctr_argv(args), check=False, capture_stdout=True,
                                      capture_stderr=True, stdin=subprocess.DEVNULL)


@asynccontextmanager
async def _ctr_container(c: Containerd, prefix: str) -> AsyncIterator[str]:
    """A container id; its task is killed and removed, then the container, on exit."""
    cid = unique_id(prefix)
    try:
        yield cid
    finally:
        with trio.CancelScope(shield=True):
            await _ctr(c, ["tasks", "kill", "-s", "SIGKILL", cid])
            await _ctr(c, ["tasks", "rm", "-f", cid])
            await _ctr(c, ["containers", "rm", cid])


def _inject_line(text: str) -> dict[str, str]:
    for line in text.splitlines():
        if line.startswith("tag="):
            return dict(part.split("=", 1) for part in line.split(" "))
    raise AssertionError(f"no injected line in {text!r}")


def _answers(n: int) -> str:
    """Shell: ask for each kind of answer (tests/policies/containers.py), print each rc."""
    return f'for k in deny ret allow; do mkdir /tmp/$k-{n}; echo "$k rc=$?"; done'


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


async def _wait_file(path: Path, pattern: str, timeout: float = 20) -> str:
    with trio.fail_after(timeout):
        while True:
            text = _read(path)  # a small local file
            if re.search(pattern, text):
                return text
            await trio.sleep(0.05)


async def _wait_sessions(d: RunningDaemon, n: int, timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while len(d.daemon.sessions) != n:
            await trio.sleep(0.02)


async def _serve_run_and_exec(c: Containerd, runc_binary: str, sup: RunningDaemon,
                              profile: Path, log: Path, extra: Sequence[str] = ()
                              ) -> None:
    """``ctr run -d`` a container under ``profile`` that asks for each answer, then
    ``ctr task exec`` the same; check both were routed and answered, remove the
    container, wait for the sessions to end."""
    script = f"cat /inject; {_answers(1)}; exec sleep 60"
    async with _ctr_container(c, "ctd") as cid:
        started = await _ctr(c, [
            "run", "--detach", "--rootfs", "--read-only", "--env", "PATH=/bin",
            "--mount", "type=tmpfs,src=tmpfs,dst=/tmp,options=rw:nosuid:nodev",
            "--fifo-dir", str(c.fifo_dir), "--runc-root", str(c.runc_root),
            "--runc-binary", runc_binary, "--log-uri", f"file://{log}",
            "--seccomp", "--seccomp-profile", str(profile),
            "--annotation", "org.example/team=build", *extra,
            str(busybox_rootfs()), cid, "sh", "-c", script])
        assert started.returncode == 0, started.stderr
        seccomp = c.bundle_config(cid)["linux"]["seccomp"]
        assert seccomp["listenerPath"] == sup.socket_path
        assert seccomp["listenerMetadata"] == "team=build\nenv=ci"

        out = await _wait_file(log, r"allow rc=\d")
        first = _inject_line(out)
        assert first["tag"] == "routed"
        assert first["id"] == cid and first["status"] == "creating"
        assert first["labels"] == "env=ci,team=build"
        assert "deny rc=1" in out and "ret rc=0" in out and "allow rc=0" in out

        execd = await _ctr(c, ["tasks", "exec", "--exec-id", "e1",
                               "--fifo-dir", str(c.fifo_dir), cid,
                               "sh", "-c", f"cat /inject; {_answers(2)}"])
        assert execd.returncode == 0, execd.stderr
        second = _inject_line(execd.stdout.decode())
        assert second["tag"] == "routed"
        assert second["id"] == cid and second["status"] == "running"
        assert b"deny rc=1" in execd.stdout and b"allow rc=0" in execd.stdout
        assert sup.metric(HANDOFFS, result="accepted") == 2
        await _wait_sessions(sup, 1)
    await _wait_sessions(sup, 0)


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_ctr_profile_listener_path_serves_run_and_exec(tmp_path: Path, engine: Engine,
                                                             runtime: Any) -> None:
    """The profile's listenerPath and listenerMetadata reach the runtime; ``--annotation``
    reaches the state: a route on both picks the policy. ``ctr task exec`` hands over
    again; removing the task ends the sessions."""
    async with running_daemon(tmp_path, ROUTED) as sup:
        profile = _profile(tmp_path / "profile.json", sup.socket_path)
        await _serve_run_and_exec(engine.containerd, engine.runc_binary(runtime), sup,
                                  profile, tmp_path / "out.log")


# --------------------------------------------------------------------------- rootless


@dataclass
class Rootless:
    containerd: Containerd
    crun: Path
    user: HostUser
    base: Path       # 0755: the user reaches the profile and the daemon's socket here

    def runc_binary(self, runtime: str) -> str:
        return str(self.crun) if runtime == "crun" else "runc"


@pytest.fixture(scope="module")
def rootless() -> Iterator[Rootless]:
    """containerd as a temporary user under rootlesskit (tests/engines.py)."""
    base = shared_tmpdir("sstest-ctd-rootless-")
    try:
        crun = crun_script(base / "crun", userns=True)
        with (temporary_user("sstest-rlc") as user,
              private_containerd(base / "containerd", user=user) as containerd):
            yield Rootless(containerd, crun, user, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_rootless_ctr_serves_run_and_exec(tmp_path: Path, rootless: Rootless,
                                                runtime: Any) -> None:
    """Rootless containerd: the runtime hands over from the user namespace as the user's
    uid, the only one allowed; the socket's directory is reachable and the socket 0666.
    ``--cgroup "" --cpu-shares 0``: an unprivileged runc cannot set ctr's default cpu
    shares on a cgroup v1 host ("cannot set cpu limit: container could not join or create
    cgroup")."""
    sockets = rootless.base / unique_id("sup")
    sockets.mkdir(mode=0o755)
    sockets.chmod(0o755)  # the daemon keeps an existing directory's mode
    config = ROUTED.replace("[defaults]", f"""[listen]
socket = "{sockets / 'notify.sock'}"
control_socket = "{sockets / 'control.sock'}"
socket_mode = 0o666
allowed_uids = [{rootless.user.uid}]

[defaults]""", 1)
    try:
        async with running_daemon(tmp_path, config) as sup:
            profile = _profile(sockets / "profile.json", sup.socket_path)
            profile.chmod(0o644)
            await _serve_run_and_exec(
                rootless.containerd, rootless.runc_binary(runtime), sup, profile,
                rootless.containerd.fifo_dir / f"{sockets.name}.log",
                extra=["--cgroup", "", "--cpu-shares", "0"])
            assert sup.metric(HANDOFFS, result="forbidden") == 0
    finally:
        shutil.rmtree(sockets, ignore_errors=True)
