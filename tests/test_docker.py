"""docker end to end: a real dockerd (Debian's docker.io) on a private containerd.

One dockerd per module (tests/engines.py: own directories and sockets, no network) with
three runtimes besides its runc:

* ``crun``: plain crun (through the host's hybrid-cgroup workaround);
* ``crun-supervised``: ``deploy/docker/crun-seccomp-receiver`` with
  ``runtimeArgs = ["--receiver=<the test daemon's socket>", "--crun=<that crun>"]``, the
  route documented for docker 20.10;
* ``crun-capture``: the same wrapper pointed at a bare recorder, to see the raw message.

docker 20.10 drops ``listenerPath``/``listenerMetadata`` from a ``--security-opt
seccomp=`` profile (moby's ``profiles/seccomp`` ``Seccomp`` struct has no such fields
before 23.0); the tests assert what the installed version does. Every container is
removed by the test that started it (``docker rm -f``, shielded), and the module fixture
removes whatever is left.
"""

from __future__ import annotations

import json
import re
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
    crun_script,
    docker_version,
    private_containerd,
    private_dockerd,
)
from .runtime import unique_id
from .test_runtimes import _recorder

pytestmark = pytest.mark.runtime

POLICY = Path(__file__).resolve().parent / "policies" / "containers.py"
HANDOFFS = "seccomp_supervisor_handoffs_total"
NOTIFY = ("mkdir", "mkdirat", "openat")


def _forwards_listener() -> bool:
    """Whether this dockerd passes a profile's listenerPath on (23.0 and later)."""
    return docker_version() >= (23, 0)


def _answers(n: int) -> str:
    """Shell: ask for each kind of answer (tests/policies/containers.py), print each rc."""
    return f'for k in deny ret allow; do mkdir /tmp/$k-{n}; echo "$k rc=$?"; done'


@dataclass
class Engine:
    dockerd: Dockerd
    receiver: Path   # the socket crun-supervised hands fds to: the test daemon's
    capture: Path    # the socket crun-capture hands fds to: a bare recorder


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    base = tmp_path_factory.mktemp("docker")
    crun = crun_script(base / "crun")
    receiver, capture = base / "sup" / "notify.sock", base / "capture.sock"

    def wrapper(socket: Path) -> dict[str, Any]:
        return {"path": str(CRUN_RECEIVER),
                "runtimeArgs": [f"--receiver={socket}", f"--crun={crun}"]}

    runtimes = {"crun": {"path": str(crun)}, "crun-supervised": wrapper(receiver),
                "crun-capture": wrapper(capture)}
    with (private_containerd(base / "containerd") as containerd,
          private_dockerd(base / "dockerd", containerd, runtimes=runtimes) as dockerd):
        yield Engine(dockerd, receiver, capture)


def _config(engine: Engine) -> str:
    return f"""
[listen]
socket = "{engine.receiver}"
control_socket = "{engine.receiver.parent / 'control.sock'}"

[defaults]
policies = ["plain"]
unhandled = "deny:EXDEV"

[[policy]]
name = "plain"
path = "{POLICY}"
options = {{ tag = "docker" }}
"""


def _profile(path: Path, listener: Path | str, notify: Sequence[str] = NOTIFY) -> Path:
    """A docker seccomp profile that notifies ``notify`` and names a listener."""
    path.write_text(json.dumps({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "listenerPath": str(listener),
        "listenerMetadata": "team=build",
        "syscalls": [{"names": list(notify), "action": "SCMP_ACT_NOTIFY"}],
    }))
    return path


async def _docker(d: Dockerd, args: Sequence[str],
                  timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    # Never blocks the loop: the daemon under test answers the container from it.
    with trio.fail_after(timeout):
        return await trio.run_process(d.docker_argv(args), check=False, capture_stdout=True,
                                      capture_stderr=True, stdin=subprocess.DEVNULL)


@asynccontextmanager
async def _named(d: Dockerd, prefix: str) -> AsyncIterator[str]:
    """A container name; ``docker rm -f NAME`` on exit, whatever happened."""
    name = unique_id(prefix)
    try:
        yield name
    finally:
        with trio.CancelScope(shield=True):
            await _docker(d, ["rm", "-f", name])


async def _logs_with(d: Dockerd, name: str, pattern: str, timeout: float = 20) -> str:
    with trio.fail_after(timeout):
        while True:
            logs = await _docker(d, ["logs", name])
            text = (logs.stdout + logs.stderr).decode()
            if re.search(pattern, text):
                return text
            await trio.sleep(0.05)


def _inject_line(text: str) -> dict[str, str]:
    for line in text.splitlines():
        if line.startswith("tag="):
            return dict(part.split("=", 1) for part in line.split(" "))
    raise AssertionError(f"no injected line in {text!r}")


async def _wait_sessions(d: RunningDaemon, n: int, timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while len(d.daemon.sessions) != n:
            await trio.sleep(0.02)


# --------------------------------------------------------------------------- the profile


async def test_profile_listener_path_reaches_the_runtime_only_from_docker_23(
        tmp_path: Path, engine: Engine) -> None:
    """docker < 23 drops listenerPath: runc refuses the NOTIFY rule ("listenerPath is not
    set"), crun installs it with nobody holding the listener, so notified calls get
    ENOSYS. docker >= 23 passes the field through and the daemon serves the container."""
    d = engine.dockerd
    async with running_daemon(tmp_path, _config(engine)) as sup:
        profile = _profile(tmp_path / "profile.json", sup.socket_path, notify=("mkdir",
                                                                               "mkdirat"))
        opts = ["--network", "none", "--security-opt", f"seccomp={profile}", d.image]
        by_runc = await _docker(d, ["run", "--rm", "--runtime", "runc", *opts,
                                    "sh", "-c", "mkdir /tmp/deny-1; echo rc=$?"])
        async with _named(d, "dk-plain") as name:
            started = await _docker(d, ["run", "-d", "--name", name, "--runtime", "crun",
                                        *opts, "sleep", "60"])
            assert started.returncode == 0, started.stderr
            seccomp = d.bundle_config(started.stdout.decode().strip())["linux"]["seccomp"]
            by_crun = await _docker(d, ["exec", name, "sh", "-c",
                                        "mkdir /tmp/deny-2; echo rc=$?"])
        if _forwards_listener():
            assert seccomp["listenerPath"] == sup.socket_path
            assert b"rc=1" in by_runc.stdout and b"rc=1" in by_crun.stdout
            assert b"Operation not permitted" in by_crun.stderr
            assert sup.metric(HANDOFFS, result="accepted") == 2
        else:
            assert by_runc.returncode == 125
            assert b"listenerPath is not set" in by_runc.stderr, by_runc.stderr
            assert "listenerPath" not in seccomp and "listenerMetadata" not in seccomp
            assert {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_NOTIFY"} in [
                {k: rule[k] for k in ("names", "action")} for rule in seccomp["syscalls"]]
            assert by_crun.returncode == 0
            assert b"rc=1" in by_crun.stdout
            assert b"'/tmp/deny-2': Function not implemented" in by_crun.stderr
            assert sup.metric(HANDOFFS, result="accepted") == 0


# --------------------------------------------------------------------------- the wrapper


async def test_crun_receiver_wrapper_serves_run_and_exec(tmp_path: Path,
                                                         engine: Engine) -> None:
    """``docker run --runtime crun-supervised``: the init and each ``docker exec`` are
    handed over and answered; removing the container ends the sessions."""
    d = engine.dockerd
    script = f"cat /inject; {_answers(1)}; exec sleep 60"
    async with running_daemon(tmp_path, _config(engine)) as sup:
        # docker 20.10 drops this listenerPath (a path where nothing listens); the
        # wrapper's receiver is what counts. docker >= 23 would use this one instead.
        profile = _profile(tmp_path / "profile.json", sup.socket_path)
        async with _named(d, "dk-wrap") as name:
            started = await _docker(d, ["run", "-d", "--name", name,
                                        "--runtime", "crun-supervised", "--network", "none",
                                        "--security-opt", f"seccomp={profile}", d.image,
                                        "sh", "-c", script])
            assert started.returncode == 0, started.stderr
            cid = started.stdout.decode().strip()
            out = await _logs_with(d, name, r"allow rc=\d")
            first = _inject_line(out)
            assert first["tag"] == "docker"
            assert first["id"] == cid and re.fullmatch(r"[0-9a-f]{64}", cid)
            assert first["status"] == "creating"
            assert first["labels"] == ("team=build" if _forwards_listener() else "")
            assert "deny rc=1" in out and "'/tmp/deny-1': Operation not permitted" in out
            assert "ret rc=0" in out and "allow rc=0" in out

            execd = await _docker(d, ["exec", name, "sh", "-c", f"cat /inject; {_answers(2)}"])
            assert execd.returncode == 0, execd.stderr
            second = _inject_line(execd.stdout.decode())
            assert second["id"] == cid and second["status"] == "running"
            assert second["pid"] == "0"  # crun sends pid 0 for an exec
            assert b"deny rc=1" in execd.stdout and b"allow rc=0" in execd.stdout
            assert sup.metric(HANDOFFS, result="accepted") == 2
            await _wait_sessions(sup, 1)  # the exec'd shell has exited
        await _wait_sessions(sup, 0)      # docker rm -f: the init is gone too


async def test_wrapper_refuses_to_start_without_the_daemon(tmp_path: Path,
                                                           engine: Engine) -> None:
    """Fail closed: with the daemon down, crun-supervised starts nothing; with it up,
    every filtered container is handed over (docker's default profile too); an
    unconfined container has no filter, so nothing is handed over or supervised."""
    d = engine.dockerd
    base = ["run", "--rm", "--runtime", "crun-supervised", "--network", "none"]
    down = await _docker(d, [*base, d.image, "true"])
    assert down.returncode != 0
    assert b"open seccomp receiver" in down.stderr, down.stderr
    async with running_daemon(tmp_path, _config(engine)) as sup:
        default_profile = await _docker(d, [*base, d.image, "true"])
        assert default_profile.returncode == 0, default_profile.stderr
        assert sup.metric(HANDOFFS, result="accepted") == 1
        unconfined = await _docker(d, [*base, "--security-opt", "seccomp=unconfined",
                                       d.image, "true"])
        assert unconfined.returncode == 0, unconfined.stderr
        assert sup.metric(HANDOFFS, result="accepted") == 1


async def test_what_docker_sends(tmp_path: Path, engine: Engine) -> None:
    """The raw messages through the wrapper: no metadata, no annotations; the state's id
    is docker's full container id and the bundle is containerd's task directory."""
    d = engine.dockerd
    profile = _profile(tmp_path / "profile.json", engine.capture, notify=("swapon",))
    async with _recorder(engine.capture) as got:
        try:
            async with _named(d, "dk-wire") as name:
                started = await _docker(d, ["run", "-d", "--name", name,
                                            "--runtime", "crun-capture", "--network", "none",
                                            "--security-opt", f"seccomp={profile}", d.image,
                                            "sleep", "60"])
                assert started.returncode == 0, started.stderr
                cid = started.stdout.decode().strip()
                execd = await _docker(d, ["exec", name, "true"])
                assert execd.returncode == 0, execd.stderr
        finally:
            engine.capture.unlink(missing_ok=True)
    assert len(got) == 2
    run, exec_ = (json.loads(raw) for raw, _ in got)
    for (raw, kinds), status in zip(got, ("creating", "running"), strict=True):
        print(f"docker {docker_version()} crun-capture {status}: {raw.decode()!r}")
        assert kinds == ["anon_inode:seccomp notify"]
    for message in (run, exec_):
        assert message["fds"] == ["seccompFd"]
        assert "metadata" not in message
        assert "annotations" not in message["state"]
        assert message["state"]["id"] == cid
    assert run["state"]["status"] == "creating" and run["pid"] == run["state"]["pid"] > 0
    assert run["state"]["bundle"].endswith(f"/io.containerd.runtime.v2.task/{d.namespace}/{cid}")
    assert exec_["state"]["status"] == "running" and exec_["pid"] == 0
    assert exec_["state"]["bundle"] == "."
