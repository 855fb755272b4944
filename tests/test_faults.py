"""Faults, with `seccomp-supervisor serve` as a real process: targets SIGKILLed under
load, handler exception storms, RLIMIT_NOFILE exhaustion, 10,000 hostile connections."""

from __future__ import annotations

import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

from supervisor.handoff import build_state_message

from .soak import (
    DaemonProcess,
    RunningTarget,
    config_text,
    daemon_process,
    start_target,
    wait_file,
)


def handoff_count(d: DaemonProcess) -> dict[str, float]:
    return {labels[0][1]: v for (name, labels), v in d.metrics().items()
            if name == "seccomp_supervisor_handoffs_total"}


def warm_up(d: DaemonProcess) -> int:
    """Serve one target (what a daemon opens once per process, e.g. the poller's epoll
    fd, is then open) and return the daemon's fd count."""
    assert start_target(d.socket_path, 99, 10).result(30)["ok"] == 10
    d.wait_sessions(0)
    return d.fd_count()


def test_targets_sigkilled_under_load_take_nothing_else_down(tmp_path: Path) -> None:
    stop = tmp_path / "stop"
    with daemon_process(tmp_path, config_text(tmp_path)) as d:
        d.start()
        baseline = warm_up(d)
        targets: list[RunningTarget] = []
        try:
            for i in range(10):
                targets.append(start_target(d.socket_path, i, 0, "--until", str(stop),
                                            "--ready", str(tmp_path / f"ready-{i}")))
            for i in range(10):
                wait_file(tmp_path / f"ready-{i}")
            victims, survivors = targets[:5], targets[5:]
            rng = random.Random(7)
            for t in victims:  # each is in the middle of its calls: some in flight
                time.sleep(rng.uniform(0, 0.05))
                t.process.send_signal(signal.SIGKILL)
            for t in victims:
                t.process.wait(10)
            d.wait_sessions(5)
            time.sleep(0.2)
            stop.touch()
            results = [t.result(30) for t in survivors]
        finally:
            for t in targets:
                t.kill()
        assert all(r["ok"] == r["calls"] > 0 and r["wrong"] == 0 for r in results), results
        d.wait_sessions(0)
        assert d.fd_count() == baseline
        assert start_target(d.socket_path, 42, 100).result(30)["ok"] == 100
        assert d.process.poll() is None


def test_a_storm_of_handler_exceptions(tmp_path: Path) -> None:
    """Every second call makes the policy raise: each gets on_error (EPERM), is counted,
    and the others are answered as usual, by both the inline and the task path."""
    calls, n = 1000, 4
    with daemon_process(tmp_path, config_text(tmp_path)) as d:
        d.start()
        targets = [start_target(d.socket_path, i, calls, "--storm", "2") for i in range(n)]
        try:
            results = [t.result(60) for t in targets]
        finally:
            for t in targets:
                t.kill()
        for r in results:
            assert r["wrong"] == 0, r["samples"]
            assert r["eperm"] == calls // 2 and r["ok"] == calls // 2
        errors = sum(v for (name, labels), v in d.metrics().items()
                     if name == "seccomp_supervisor_handler_errors_total"
                     and ("kind", "exception") in labels and ("policy", "echo") in labels)
        assert errors == n * calls // 2
        after = start_target(d.socket_path, 9, 200).result(30)
        assert after["ok"] == 200 and after["max_latency"] < 0.5
        assert d.process.poll() is None


def test_rlimit_nofile_exhaustion_backs_off_and_recovers(tmp_path: Path) -> None:
    """No fd left: running containers are still answered; a new handoff waits in the
    backlog (its listener fd safe in the queue) and is served once fds are free again."""
    stop = tmp_path / "stop"
    with daemon_process(tmp_path, config_text(tmp_path)) as d:
        d.start()
        running = start_target(d.socket_path, 1, 0, "--until", str(stop),
                               "--ready", str(tmp_path / "ready"))
        late: RunningTarget | None = None
        soft, hard = resource.prlimit(d.pid, resource.RLIMIT_NOFILE)
        try:
            wait_file(tmp_path / "ready")
            d.wait_sessions(1)
            time.sleep(0.2)  # let transient fds (control connection) close
            highest = max(int(fd) for fd in os.listdir(f"/proc/{d.pid}/fd"))
            # One fd would still fit: the accept, but not the listener inside it.
            resource.prlimit(d.pid, resource.RLIMIT_NOFILE, (highest + 2, hard))
            late = start_target(d.socket_path, 2, 300, container_id="late")
            d.wait_log("out of file descriptors")
            time.sleep(0.5)  # it backs off; the running container is still served
            resource.prlimit(d.pid, resource.RLIMIT_NOFILE, (soft, hard))
            late_result = late.result(30)
            stop.touch()
            running_result = running.result(30)
        finally:
            resource.prlimit(d.pid, resource.RLIMIT_NOFILE, (soft, hard))
            running.kill()
            if late is not None:
                late.kill()
        assert late_result["ok"] == 300, late_result     # not lost, not ENOSYS
        assert running_result["ok"] == running_result["calls"] > 0
        assert running_result["wrong"] == 0
        counts = handoff_count(d)
        assert counts.get("accepted") == 2 and counts.get("too_large", 0) == 0, counts


HOSTILE = """
import os, socket, sys
path, count, first = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
state = bytes.fromhex(sys.argv[4])
devnull = os.open("/dev/null", os.O_RDONLY)
rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, devnull.to_bytes(4, "little"))]
payloads = [b"", b"\\x00garbage{{{" * 10, state, state, b'{"x": "' + b"y" * 2000 + b'"}']
for i in range(first, first + count):
    kind = i % 5
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        try:                      # the daemon may hang up first: its right
            if kind == 3:
                sock.sendmsg([payloads[kind]], rights)   # an fd that is not a listener
            elif kind:
                sock.sendall(payloads[kind])             # garbage, no fd, too large
            if kind:
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(4096):
                    pass
        except ConnectionError:
            pass
"""


def test_ten_thousand_hostile_connections(tmp_path: Path) -> None:
    """Connect-and-hang-up, garbage, no fd, a /dev/null fd, too large: 2,000 of each from
    four client processes at once, while a container is being served."""
    total, clients = 10_000, 4
    stop = tmp_path / "stop"
    listen = (f'[listen]\nsocket = "{tmp_path}/sock/notify.sock"\n'
              f'control_socket = "{tmp_path}/sock/control.sock"\nmax_message = 1024\n')
    with daemon_process(tmp_path, listen + config_text(tmp_path)) as d:
        d.start()
        baseline = warm_up(d)
        running = start_target(d.socket_path, 1, 0, "--until", str(stop), "--pause", "0.001")
        state = build_state_message(pid=1, container_id="x", bundle="/").hex()
        started = time.monotonic()
        procs = [subprocess.Popen([sys.executable, "-c", HOSTILE, d.socket_path,
                                   str(total // clients), str(i * total // clients), state])
                 for i in range(clients)]
        try:
            assert all(p.wait(120) == 0 for p in procs)
            took = time.monotonic() - started
            stop.touch()
            result = running.result(30)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
            running.kill()
        deadline = time.monotonic() + 30
        while sum(v for k, v in handoff_count(d).items() if k != "accepted") < total:
            assert time.monotonic() < deadline, handoff_count(d)
            time.sleep(0.05)
        counts = handoff_count(d)
        assert sum(v for k, v in counts.items() if k != "accepted") == total, counts
        assert counts["invalid"] >= 2 * total // 5 and counts["bad_fd"] == total // 5
        assert counts["too_large"] == total // 5
        # A container served all along: every answer right, none slow.
        assert result["ok"] == result["calls"] > 0 and result["wrong"] == 0
        assert result["max_latency"] < 1.0, result
        d.wait_sessions(0)
        assert d.fd_count() == baseline
        print(f"\n{total} hostile connections in {took:.1f} s; a live container made "
              f"{result['calls']} calls meanwhile, slowest {result['max_latency'] * 1000:.1f} ms")
