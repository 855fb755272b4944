"""runc and crun end to end: real containers hand their notify fd to the real daemon.

Every container is started through tests/runtime.py, which deletes it (``delete --force``)
whatever happens. Container ids start with ``rt-``.
"""

from __future__ import annotations

import array
import json
import os
import re
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from supervisor.decide import UNHANDLED_POLICY
from supervisor.handoff import MessageAssembler

from .daemon_harness import RunningDaemon, running_daemon
from .runtime import RUNTIMES, Container, container, make_bundle, unique_id

pytestmark = pytest.mark.runtime

POLICY = Path(__file__).resolve().parent / "policies" / "containers.py"
HANDOFFS = "seccomp_supervisor_handoffs_total"
NOTIFICATIONS = "seccomp_supervisor_notifications_total"
MKDIR = ("mkdir", "mkdirat")
NOTIFY = (*MKDIR, "openat")

ONE_POLICY = f"""
[defaults]
policies = ["plain"]
unhandled = "deny:EXDEV"

[[policy]]
name = "plain"
path = "{POLICY}"
options = {{ tag = "plain" }}
"""


def _inject_line(text: str) -> dict[str, str]:
    """The ``tag=... id=...`` line ``cat /inject`` printed, as a dict."""
    for line in text.splitlines():
        if line.startswith("tag="):
            return dict(part.split("=", 1) for part in line.split(" "))
    raise AssertionError(f"no injected line in {text!r}")


async def _wait_output(ctr: Container, pattern: str, timeout: float = 15) -> str:
    with trio.fail_after(timeout):
        while not re.search(pattern, ctr.output()):
            await trio.sleep(0.02)
    return ctr.output()


async def _wait_sessions(d: RunningDaemon, n: int, timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while len(d.daemon.sessions) != n:
            await trio.sleep(0.02)


async def _wait_no_sessions(d: RunningDaemon, timeout: float = 10) -> None:
    await _wait_sessions(d, 0, timeout)


# --------------------------------------------------------------------------- run, exec


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_run_hands_over_creating_and_exec_running(tmp_path: Path, runtime: Any) -> None:
    """``run``: status creating, pid = container init. ``exec``: status running, pid = the
    exec'd process. Container exit ends every session."""
    async with running_daemon(tmp_path, ONE_POLICY) as d:
        bundle = make_bundle(tmp_path / "bundle", ["sh", "-c", "cat /inject; exec sleep 60"],
                             notify=NOTIFY, listener_path=d.socket_path,
                             metadata="team=build\nenv=ci")
        async with container(runtime, bundle, unique_id("rt-life")) as ctr:
            started = await ctr.run(detach=True)
            assert started.returncode == 0, started.stderr
            first = _inject_line(await _wait_output(ctr, r"tag=.*\n"))
            state = await ctr.state()
            assert state["status"] == "running"
            assert first["status"] == "creating"
            assert first["id"] == ctr.id
            assert first["labels"] == "env=ci,team=build"
            # runc/crun name the container's init; cat is its child.
            assert int(first["pid"]) == state["pid"]
            assert int(first["caller"]) != state["pid"]

            execd = await ctr.exec(["cat", "/inject"])
            assert execd.returncode == 0, execd.stderr
            second = _inject_line(execd.stdout.decode())
            assert second["status"] == "running"
            assert second["id"] == ctr.id
            assert int(second["caller"]) not in (0, state["pid"])
            if runtime == "runc":
                # the exec'd process itself opened /inject: runc named it
                assert int(second["pid"]) == int(second["caller"])
            else:
                assert second["pid"] == "0"  # crun 1.8.1 sends pid 0 for exec
            assert d.metric(HANDOFFS, result="accepted") == 2
            await _wait_sessions(d, 1)  # the exec'd cat has exited: its session ended

            await ctr.kill("KILL")
            await ctr.wait_stopped()
            await _wait_no_sessions(d, timeout=1.0)  # DESIGN §8: within a second
            assert d.metric("seccomp_supervisor_sessions") == 0


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_routed_policy_answers_deny_returns_allow_inject(tmp_path: Path,
                                                               runtime: Any) -> None:
    script = """
        for k in deny ret allow; do mkdir /tmp/$k-1; echo "$k rc=$?"; done
        [ -d /tmp/ret-1 ] && echo "ret exists" || echo "ret missing"
        [ -d /tmp/allow-1 ] && echo "allow exists" || echo "allow missing"
        mkdir /tmp/other; echo "other rc=$?"
        cat /inject
    """
    async with running_daemon(tmp_path, ONE_POLICY) as d:
        bundle = make_bundle(tmp_path / "bundle", ["sh", "-c", script], notify=NOTIFY,
                             listener_path=d.socket_path, metadata="app=web")
        async with container(runtime, bundle, unique_id("rt-answer")) as ctr:
            done = await ctr.run()
        out, err = done.stdout.decode(), done.stderr.decode()
        assert done.returncode == 0, err
        assert "deny rc=1" in out
        assert "'/tmp/deny-1': Operation not permitted" in err
        assert "ret rc=0" in out and "ret missing" in out     # answered, never run
        assert "allow rc=0" in out and "allow exists" in out  # CONTINUE: really created
        assert "other rc=1" in out                             # no handler: unhandled
        assert "'/tmp/other': Invalid cross-device link" in err
        injected = _inject_line(out)
        assert injected["tag"] == "plain" and injected["id"] == ctr.id
        assert injected["labels"] == "app=web"

        decisions = {k: sum(d.metric(NOTIFICATIONS, syscall=s, policy=p, decision=k)
                            for s in MKDIR for p in ("plain", UNHANDLED_POLICY))
                     for k in ("deny", "returns", "allow")}
        # deny-1 and other (unhandled) are denies; busybox mkdir makes one call each.
        assert decisions == {"deny": 2, "returns": 1, "allow": 1}, decisions
        assert d.metric(NOTIFICATIONS, syscall="openat", policy="plain",
                        decision="inject_fd") == 1
        audit = [json.loads(line) for line in d.audit_lines()]
        assert any(a["container"] == ctr.id and a["decision"] == "deny" for a in audit)
        await _wait_no_sessions(d)


# --------------------------------------------------------------------------- routing


ROUTED = f"""
[defaults]
policies = ["fallback"]

[[policy]]
name = "fallback"
path = "{POLICY}"
options = {{ tag = "fallback", errno = 1 }}

[[policy]]
name = "alpha"
path = "{POLICY}"
options = {{ tag = "alpha", errno = 13 }}

[[policy]]
name = "beta"
path = "{POLICY}"
options = {{ tag = "beta", errno = 30 }}

[[policy]]
name = "gamma"
path = "{POLICY}"
options = {{ tag = "gamma", errno = 28 }}

[[policy]]
name = "delta"
path = "{POLICY}"
options = {{ tag = "delta", errno = 31 }}

[[route]]
match = {{ metadata = "team=alpha*" }}
policies = ["alpha"]

[[route]]
match = {{ labels = {{ team = "beta" }} }}
policies = ["beta"]

[[route]]
match = {{ container = "rt-special-*" }}
policies = ["gamma"]

[[route]]
match = {{ annotations = {{ "org.example/team" = "delta" }} }}
policies = ["delta"]
"""

# (runtime, id prefix, metadata, annotations) -> tag and the errno text it answers with
CASES: list[tuple[Any, str, str | None, dict[str, str], str, str]] = [
    ("runc", "rt-route", "team=alpha\nenv=prod", {}, "alpha", "Permission denied"),
    ("crun", "rt-route", "env=prod\nteam=beta", {}, "beta", "Read-only file system"),
    ("runc", "rt-special", "team=zeta", {}, "gamma", "No space left on device"),
    ("crun", "rt-route", None, {"org.example/team": "delta"}, "delta", "Too many links"),
    ("runc", "rt-route", "team=omega", {"org.example/team": "x"}, "fallback",
     "Operation not permitted"),
]


async def test_containers_routed_by_metadata_labels_id_and_annotations_at_once(
        tmp_path: Path) -> None:
    async with running_daemon(tmp_path, ROUTED) as d, trio.open_nursery() as nursery:
        ctrs: list[Container] = []
        started = trio.Semaphore(0)

        async def one(i: int, runtime: Any, prefix: str, metadata: str | None,
                      annotations: dict[str, str]) -> None:
            bundle = make_bundle(tmp_path / f"b{i}", ["sh", "-c",
                                                      "cat /inject; exec sleep 60"],
                                 notify=NOTIFY, listener_path=d.socket_path,
                                 metadata=metadata, annotations=annotations)
            async with container(runtime, bundle, unique_id(prefix)) as ctr:
                ctrs.append(ctr)
                result = await ctr.run(detach=True)
                assert result.returncode == 0, result.stderr
                started.release()
                await trio.sleep_forever()

        for i, (runtime, prefix, metadata, annotations, _, _) in enumerate(CASES):
            nursery.start_soon(one, i, runtime, prefix, metadata, annotations)
        for _ in CASES:
            await started.acquire()
        by_id = {c.bundle.name: c for c in ctrs}

        # All five run at the same time, each with its own chain.
        await _wait_sessions(d, len(CASES))
        chains = sorted(tuple(s.chain.names) for s in d.daemon.sessions)
        assert chains == sorted((tag,) for *_, tag, _ in CASES)
        for i, (_, _, _, _, tag, message) in enumerate(CASES):
            ctr = by_id[f"b{i}"]
            assert _inject_line(await _wait_output(ctr, r"tag=.*\n"))["tag"] == tag
            execd = await ctr.exec(["mkdir", "/tmp/deny-x"])
            assert execd.returncode == 1
            assert f"'/tmp/deny-x': {message}" in execd.stderr.decode(), (tag, execd)
        nursery.cancel_scope.cancel()  # the containers are deleted on the way out


# --------------------------------------------------------------------------- daemon down


DOWN = {
    # runc 1.1.5: "runc run failed: unable to start container process: failed to connect
    # with seccomp agent specified in the seccomp profile: dial unix PATH: connect: no such
    # file or directory" (or "connection refused" for a stale socket file)
    "runc": r"failed to connect with seccomp agent.*(no such file or directory|"
            r"connection refused)",
    # crun 1.8.1: "open seccomp receiver: connect socket to `PATH`: No such file or
    # directory" (or "Connection refused")
    "crun": r"open seccomp receiver: connect socket to .*(No such file|Connection refused)",
}

SEND_FAILED = {
    # runc 1.1.5: "runc run failed: unable to start container process: cannot send seccomp
    # fd to PATH: broken pipe"
    "runc": r"cannot send seccomp fd to .*: (broken pipe|connection reset by peer)",
    # crun 1.8.1: "send listener fd `5` to receiver: Unknown error 141"
    "crun": r"send listener fd `\d+` to receiver: ",
}


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_runtime_refuses_to_start_when_nothing_listens(tmp_path: Path,
                                                              runtime: Any) -> None:
    expected = DOWN[runtime]
    for case in ("missing", "stale"):
        path = tmp_path / f"{case}.sock"
        if case == "stale":  # a socket file nobody listens on (a daemon that crashed)
            with socket.socket(socket.AF_UNIX) as s:
                s.bind(str(path))
        bundle = make_bundle(tmp_path / f"bundle-{case}", ["sh", "-c", "echo started"],
                             notify=MKDIR, listener_path=path)
        async with container(runtime, bundle, unique_id("rt-down")) as ctr:
            done = await ctr.run()
            err = done.stderr.decode()
            assert done.returncode != 0
            assert b"started" not in done.stdout
            assert re.search(expected, err), err


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_notified_calls_get_enosys_after_the_daemon_dies(tmp_path: Path,
                                                               runtime: Any) -> None:
    script = """
        i=0
        while [ $i -lt 300 ]; do
            mkdir /tmp/allow-$i 2>&1; echo "mkdir $i rc=$?"; i=$((i+1)); sleep 0.05
        done
    """
    async with container(runtime, tmp_path / "bundle", unique_id("rt-dies")) as ctr:
        (tmp_path / "d").mkdir()
        async with running_daemon(tmp_path / "d", ONE_POLICY) as d:
            make_bundle(ctr.bundle, ["sh", "-c", script], notify=MKDIR,
                        listener_path=d.socket_path)
            result = await ctr.run(detach=True)
            assert result.returncode == 0, result.stderr
            await _wait_output(ctr, r"mkdir \d+ rc=0")
        # The daemon is gone: its sessions closed their notify fds, its socket is removed.
        out = await _wait_output(ctr, r"Function not implemented")
        assert re.search(r"can't create directory '/tmp/allow-\d+': Function not "
                         r"implemented", out)
        # and no new process can join the container while nothing listens
        execd = await ctr.exec(["true"])
        assert execd.returncode != 0
        assert re.search(DOWN[runtime], execd.stderr.decode()), execd.stderr


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_a_rejected_handoff_leaves_the_container_with_enosys(tmp_path: Path,
                                                                   runtime: Any) -> None:
    """There is no answer in the protocol. When the daemon hangs up (here: uid 0 is not
    allowed) before the runtime's sendmsg, the runtime refuses to start the container
    (what this host shows); when the message was already queued, the container starts
    and its notified calls fail with ENOSYS. Never a container whose calls pass."""
    config = ('[listen]\nsocket = "{tmp}/sock/notify.sock"\nallowed_uids = [4242]\n'
              + ONE_POLICY)
    async with running_daemon(tmp_path, config) as d:
        bundle = make_bundle(tmp_path / "bundle", ["sh", "-c", "mkdir /tmp/allow-1"],
                             notify=MKDIR, listener_path=d.socket_path)
        async with container(runtime, bundle, unique_id("rt-refused")) as ctr:
            done = await ctr.run()
        err = done.stderr.decode()
        assert done.returncode == 1
        assert (re.search(SEND_FAILED[runtime], err)
                or "'/tmp/allow-1': Function not implemented" in err), err
        assert d.metric(HANDOFFS, result="forbidden") == 1
        assert not d.daemon.sessions


@asynccontextmanager
async def _recorder(path: Path) -> AsyncIterator[list[tuple[bytes, list[str]]]]:
    """A bare listener that records each connection's bytes and fd kinds (no daemon)."""
    got: list[tuple[bytes, list[str]]] = []
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen()

    async def serve() -> None:
        while True:
            conn, _ = await sock.accept()
            with conn:
                message, fds = MessageAssembler(), array.array("i")
                while not message.complete:  # runc sends no EOF: stop at the closing }
                    chunk, anc, _, _ = await conn.recvmsg(65536, socket.CMSG_SPACE(64))
                    for _, _, payload in anc:
                        fds.frombytes(payload[:len(payload) // 4 * 4])
                    if not chunk:
                        break
                    message.feed(chunk)
                kinds = [os.readlink(f"/proc/self/fd/{fd}") for fd in fds]
                for fd in fds:
                    os.close(fd)
                got.append((message.data, kinds))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        try:
            yield got
        finally:
            nursery.cancel_scope.cancel()
            sock.close()


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_what_each_runtime_sends(tmp_path: Path, runtime: Any) -> None:
    """The exact ContainerProcessState messages (the recorder closes the fd at once, so the
    container's own notified calls then fail with ENOSYS)."""
    async with _recorder(tmp_path / "rec.sock") as got:
        bundle = make_bundle(tmp_path / "bundle", ["sleep", "60"], notify=("swapon",),
                             listener_path=tmp_path / "rec.sock",
                             metadata="team=a\nenv=b", annotations={"org.example/k": "v"})
        async with container(runtime, bundle, unique_id("rt-wire")) as ctr:
            assert (await ctr.run(detach=True)).returncode == 0
            pid = (await ctr.state())["pid"]
            assert (await ctr.exec(["true"])).returncode == 0
        assert len(got) == 2
    for (raw, kinds), status in zip(got, ("creating", "running"), strict=True):
        message = json.loads(raw)
        print(f"{runtime} {status}: {raw.decode()!r}")  # shown with -s (for the docs)
        assert kinds == ["anon_inode:seccomp notify"]
        assert message["fds"] == ["seccompFd"]
        assert message["metadata"] == "team=a\nenv=b"
        state = message["state"]
        assert state["id"] == ctr.id and state["status"] == status
        assert state["annotations"] == {"org.example/k": "v"}
        assert message["ociVersion"] == state["ociVersion"] == {
            "runc": "1.0.2-dev", "crun": "0.2.0"}[runtime]
        if status == "creating":
            assert message["pid"] == state["pid"] == pid
            assert state["bundle"] == str(bundle)
        elif runtime == "runc":
            # runc exec: pid = the exec'd process, state.pid = the container's init
            assert message["pid"] not in (0, pid)
            assert state["pid"] == pid
            assert state["bundle"] == str(bundle)
        else:
            # crun 1.8.1 exec: no pid at all (0 in both places) and bundle "."
            assert message["pid"] == state["pid"] == 0
            assert state["bundle"] == "."
        assert set(message) == {"ociVersion", "fds", "pid", "metadata", "state"}


# --------------------------------------------------------------------------- a failed start


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_a_runtime_failing_before_the_handoff_is_logged_as_such(
        tmp_path: Path, runtime: Any, caplog: pytest.LogCaptureFixture) -> None:
    """An rlimit above fs.nr_open fails the start even with CAP_SYS_RESOURCE. crun has
    connected by then and closes without a word; runc fails before connecting. Neither
    is reported as a malformed message."""
    import logging

    async with running_daemon(tmp_path, '[defaults]\npolicies = []\n') as d:
        bundle = make_bundle(tmp_path / "bundle", ["true"], notify=["mkdir"],
                             listener_path=d.socket_path)
        config = json.loads((bundle / "config.json").read_text())
        config["process"]["rlimits"] = [{"type": "RLIMIT_NOFILE", "hard": 1 << 30,
                                         "soft": 1 << 30}]
        (bundle / "config.json").write_text(json.dumps(config))
        with caplog.at_level(logging.WARNING, logger="supervisor.listener"):
            async with container(runtime, bundle, unique_id("closed-empty")) as c:
                done = await c.run()
            assert done.returncode != 0
            await trio.sleep(0.2)
        empty = d.metric("seccomp_supervisor_handoffs_total", result="closed_empty")
        assert d.metric("seccomp_supervisor_handoffs_total", result="invalid") == 0
        assert "not JSON" not in caplog.text
        if runtime == "crun":
            assert empty == 1
            assert ("the runtime closed the connection before sending anything; the "
                    "container probably failed to start") in caplog.text
