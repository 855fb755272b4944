"""`seccomp-supervisor status` and the control socket it talks to."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
import trio

from supervisor import accel
from supervisor.control import (
    ControlError,
    ControlReply,
    ControlRequest,
    ControlServer,
    decode_reply,
    encode_reply,
    encode_request,
    format_status,
    parse_request,
    request,
)

from .daemon_harness import CLI, running_daemon

CONFIG = """
[defaults]
policies = []
unhandled = "deny:EACCES"
"""
MKDIR = ["--notify", "mkdir", "--notify", "mkdirat"]


# --------------------------------------------------------------------------- pure parts


def test_request_and_reply_framing() -> None:
    line = encode_request("status", {"verbose": True})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert parse_request(line) == ("status", {"verbose": True})
    for bad in (b"not json", b"[1]", b"{}", b'{"command": 3}', b"\xff"):
        with pytest.raises(ControlError):
            parse_request(bad)
    with pytest.raises(ValueError):
        encode_request("x", {"command": "y"})
    assert decode_reply(encode_reply({"a": 1})) == {"a": 1}
    with pytest.raises(ControlError, match="nope"):
        decode_reply(encode_reply(error="nope"))
    with pytest.raises(ControlError):
        decode_reply(b'{"result": {}}')


def test_format_status_table() -> None:
    status = {"version": "1.2", "pid": 9, "uptime_seconds": 3725, "notify_socket": "/n.sock",
              "metrics": "", "inflight": 0, "notifications": 12, "sessions": [
                  {"container": "web-1", "runtime_pid": 77, "peer_uid": 1000,
                   "policies": ["a", "b"],
                   "mode": "enforce", "notifications": 12, "decisions": {"deny": 2, "allow": 10},
                   "gone": 0, "inflight": 0, "age_seconds": 61, "metadata": "team=x\napp=y"}]}
    text = format_status(status)
    assert "pid 9, up 1h02m05s" in text and "metrics: off" in text
    header, row = text.splitlines()[-2:]
    assert header.split() == ["CONTAINER", "PID", "PEER_UID", "POLICIES", "MODE", "NOTIF",
                              "DECISIONS", "GONE", "INFLIGHT", "AGE", "METADATA"]
    assert row.split() == ["web-1", "77", "1000", "a,b", "enforce", "12", "allow=10", "deny=2", "0",
                           "0", "1m01s", "team=x", "app=y"]
    assert "no containers" in format_status({"sessions": []})


def test_format_status_says_when_slow_memory_holds_threads() -> None:
    """A line about memory reads only when a container's slow memory holds threads or
    cost refusals; what the daemon sends is printed escaped."""
    quiet = {"sessions": [], "memory_reads": {"threads_in_slow_reads": 0, "refused": 0,
                                              "retired_threads": 3}}
    assert "memory reads" not in format_status(quiet)
    busy = {"sessions": [], "memory_reads": {"threads_in_slow_reads": 2, "refused": 5}}
    assert "memory reads: 2 threads in slow reads, 5 reads refused (EAGAIN)" in \
        format_status(busy)
    odd = {"sessions": [], "memory_reads": {"threads_in_slow_reads": "1\x1b[2J"}}
    assert "\x1b" not in format_status(odd)
    assert "memory reads" not in format_status({"sessions": [], "memory_reads": None})


# --------------------------------------------------------------------------- the server


async def test_server_commands_errors_and_fds(tmp_path: Path) -> None:
    """A command added with register(); errors keep the connection; a reply carries fds
    (what a takeover command needs)."""
    path = str(tmp_path / "c.sock")
    server = ControlServer()
    r, w = os.pipe()

    async def echo(req: ControlRequest) -> dict[str, object]:
        return {"args": dict(req.args), "uid": req.peer.uid}

    async def give(req: ControlRequest) -> ControlReply:
        return ControlReply({"n": 1}, fds=[r])

    async def broken(req: ControlRequest) -> dict[str, object]:
        raise RuntimeError("bug")

    server.register("echo", echo)
    server.register("give", give)
    server.register("broken", broken)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, path)
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

            def client() -> None:
                assert request(path, "echo", {"x": [1]}) == ({"args": {"x": [1]}, "uid": 0}, [])
                result, fds = request(path, "give", max_fds=4)
                assert result == {"n": 1} and len(fds) == 1
                try:
                    assert os.fstat(fds[0]).st_ino == os.fstat(r).st_ino
                finally:
                    os.close(fds[0])
                with pytest.raises(ControlError, match="unknown command 'nope'"):
                    request(path, "nope")
                with pytest.raises(ControlError, match="internal error"):
                    request(path, "broken")
                # Several requests on one connection; garbage does not end it.
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.settimeout(5)
                    s.connect(path)
                    s.sendall(b"garbage\n" + encode_request("echo"))
                    buf = b""
                    while buf.count(b"\n") < 2:
                        buf += s.recv(4096)
                    first, second = buf.splitlines()
                    assert not json.loads(first)["ok"]
                    assert decode_reply(second) == {"args": {}, "uid": 0}

            await trio.to_thread.run_sync(client)
            nursery.cancel_scope.cancel()
    finally:
        os.close(r)
        os.close(w)
    assert not Path(path).exists()  # removed when the server stops  # noqa: ASYNC240


async def test_server_refuses_other_uids() -> None:
    # pytest's tmp_path is under a 0700 directory: use one that "nobody" can traverse.
    directory = tempfile.mkdtemp(prefix="seccomp-supervisor-ctl-", dir="/tmp")
    os.chmod(directory, 0o755)
    path = os.path.join(directory, "c.sock")
    python = "/usr/bin/python3"  # Debian's (dev.sh installs python3-venv): nobody can run it
    code = (f"import socket; s = socket.socket(socket.AF_UNIX); s.connect({path!r}); "
            f"print(s.recv(4096).decode())")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(ControlServer({}).serve, path)
            # 0600: nobody cannot even connect.
            denied = await trio.run_process([python, "-c", code], user=65534, check=False,
                                            capture_stdout=True, capture_stderr=True)
            assert denied.returncode != 0 and b"PermissionError" in denied.stderr
            # Opened up by mistake: the peer uid check still refuses.
            os.chmod(path, 0o666)
            refused = await trio.run_process([python, "-c", code], user=65534, check=False,
                                             capture_stdout=True, capture_stderr=True)
            assert refused.returncode == 0, refused.stderr
            reply = json.loads(refused.stdout)
            assert reply == {"ok": False, "error": "uid 65534 may not use this socket"}
            nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# --------------------------------------------------------------------------- the CLI


async def test_status_shows_a_live_session(tmp_path: Path) -> None:
    script = f"for i in 1 2 3; do mkdir {tmp_path}/x 2>/dev/null; done; exec sleep 60"
    async with running_daemon(tmp_path, CONFIG) as d:
        argv = [*CLI, "run", "--socket", d.socket_path, *MKDIR, "--id", "status-1",
                "--metadata", "team=build\napp=web", "--", "sh", "-c", script]
        proc = await trio.lowlevel.open_process(argv, stdout=subprocess.DEVNULL,
                                                stderr=subprocess.DEVNULL)
        try:
            with trio.fail_after(20):
                while not d.daemon.sessions or \
                        next(iter(d.daemon.sessions)).stats.notifications < 3:
                    await trio.sleep(0.02)
            result = await trio.run_process(
                [*CLI, "status", "--json", "--control", d.control_path],
                capture_stdout=True, capture_stderr=True, check=False)
            assert result.returncode == 0, result.stderr
            status = json.loads(result.stdout)
            table = await trio.run_process(
                [*CLI, "status", "--config", str(d.config_path)],
                capture_stdout=True, capture_stderr=True, check=False)
            assert table.returncode == 0, table.stderr
        finally:
            proc.kill()
            await proc.wait()

    assert status["pid"] == os.getpid() and status["uptime_seconds"] > 0
    assert status["hot_loop"] == {"kind": accel.KIND, "why": accel.WHY}
    assert f"hot loop: {accel.WHY}\n" in table.stdout.decode()
    assert status["notify_socket"] == d.socket_path and not status["socket_activated"]
    assert status["notifications"] == 3 and status["inflight"] == 0
    [session] = status["sessions"]
    assert session["container"] == "status-1"
    assert session["metadata"] == "team=build\napp=web"
    assert session["labels"] == {"team": "build", "app": "web"}
    assert session["policies"] == [] and session["mode"] == "enforce"
    assert session["notifications"] == 3 and session["decisions"] == {"deny": 3}
    assert session["runtime_pid"] > 0 and session["age_seconds"] >= 0
    assert session["peer_uid"] == os.getuid()  # SO_PEERCRED of `run`
    text = table.stdout.decode()
    assert "sessions: 1" in text
    row = text.splitlines()[-1].split()
    assert row[0] == "status-1" and row[2] == str(os.getuid())
    assert row[5] == "3" and row[6] == "deny=3"
    assert row[-2:] == ["team=build", "app=web"]


def test_status_without_a_daemon_fails_clearly(tmp_path: Path) -> None:
    result = subprocess.run([*CLI, "status", "--control", str(tmp_path / "none.sock")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "none.sock" in result.stderr and "No such file" in result.stderr
