"""Graceful stop on SIGTERM, with `seccomp-supervisor serve` as a real process: stop
accepting, let the decisions under way finish (bounded by the deadline), exit 0."""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

from .soak import (
    NR_GETPGID,
    NR_GETSID,
    DaemonProcess,
    daemon_process,
    one_call_program,
    start_filtered,
)

SLOW = '''
import trio
from supervisor.policy import PolicySet, returns

policy = PolicySet("slow")


@policy.on("getsid")
async def slow(n):
    await trio.sleep(n.args[0] / 1000)   # the argument is a number of milliseconds
    return returns(n.args[0] + 1)


@policy.on("getpgid")
def fast(n):
    return returns(n.args[0] + 1)
'''


def slow_config(tmp: Path, deadline: str = "5s") -> str:
    (tmp / "slow.py").write_text(SLOW)
    return (f'[defaults]\npolicies = ["slow"]\ndeadline = "{deadline}"\n'
            f'[[policy]]\nname = "slow"\npath = "{tmp}/slow.py"\n')


def wait_inflight(d: DaemonProcess, count: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while d.status()["inflight"] != count:
        assert time.monotonic() < deadline, d.status()
        time.sleep(0.01)


def test_sigterm_lets_a_decision_under_way_finish_then_exits_0(tmp_path: Path) -> None:
    with daemon_process(tmp_path, slow_config(tmp_path)) as d:
        d.start()
        prog = start_filtered(d.socket_path, one_call_program(NR_GETSID, 800))
        try:
            wait_inflight(d, 1)
            stopped_at = time.monotonic()
            d.signal(signal.SIGTERM)
            result = prog.result(20)
            assert d.process.wait(20) == 0
            took = time.monotonic() - stopped_at
        finally:
            prog.kill()
        assert result["rc"] == 801, result  # the policy's answer, not ENOSYS
        assert took > 0.3  # it waited for the decision
        log = d.log_text()
        assert "SIGTERM: stopping" in log
        assert "stopped: 1 sessions finished their decisions" in log
        assert not os.path.exists(d.socket_path)  # we bound it, we removed it


def test_the_deadline_bounds_how_long_a_stop_waits(tmp_path: Path) -> None:
    with daemon_process(tmp_path, slow_config(tmp_path, deadline="300ms")) as d:
        d.start()
        prog = start_filtered(d.socket_path, one_call_program(NR_GETSID, 60_000))
        try:
            wait_inflight(d, 1)
            stopped_at = time.monotonic()
            d.signal(signal.SIGTERM)
            assert d.process.wait(20) == 0
            took = time.monotonic() - stopped_at
            result = prog.result(20)
        finally:
            prog.kill()
        assert took < 3, took
        # The handler wanted a minute: the deadline gave the on_error answer instead.
        assert result["rc"] == -1 and result["errno"] == errno.EPERM, result


def test_no_handoff_is_accepted_once_stopping(tmp_path: Path) -> None:
    with daemon_process(tmp_path, slow_config(tmp_path)) as d:
        d.start()
        slow = start_filtered(d.socket_path, one_call_program(NR_GETSID, 1500))
        late = None
        try:
            wait_inflight(d, 1)
            d.signal(signal.SIGTERM)
            d.wait_log("SIGTERM: stopping")
            # The daemon is still finishing the slow decision: the socket is there, but
            # no longer accepted from, so this container is never served.
            late = start_filtered(d.socket_path, one_call_program(NR_GETPGID, 41),
                                  container_id="late")
            assert slow.result(20)["rc"] == 1501
            assert d.process.wait(20) == 0
            # Its handoff died with the listening socket: the listener fd in the queued
            # message was released, so the filter answers ENOSYS (see docs/restarts.md).
            result = late.result(20)
        finally:
            slow.kill()
            if late is not None:
                late.kill()
        assert result["rc"] == -1 and result["errno"] == errno.ENOSYS, result
        assert "container 'late'" not in d.log_text()


def test_a_second_sigterm_stops_at_once(tmp_path: Path) -> None:
    with daemon_process(tmp_path, slow_config(tmp_path, deadline="60s")) as d:
        d.start()
        prog = start_filtered(d.socket_path, one_call_program(NR_GETSID, 30_000))
        try:
            wait_inflight(d, 1)
            d.signal(signal.SIGTERM)
            d.wait_log("SIGTERM: stopping")
            stopped_at = time.monotonic()
            d.signal(signal.SIGTERM)
            assert d.process.wait(20) == 0
            assert time.monotonic() - stopped_at < 3
            result = prog.result(20)
        finally:
            prog.kill()
        # The session answers the call it received on_error (EPERM) before it closes
        # the fd: with a copy of the listener elsewhere (the fd store, the keeper) the
        # kernel's ENOSYS at the last close would never come (tests/test_session_end.py).
        assert result["rc"] == -1 and result["errno"] == errno.EPERM, result
        assert "SIGTERM again: stopping at once" in d.log_text()
        assert "session ended (cancelled) with 1 calls still being decided" in d.log_text()


def test_sigterm_with_idle_sessions_exits_promptly(tmp_path: Path) -> None:
    with daemon_process(tmp_path, slow_config(tmp_path, deadline="1s")) as d:
        d.start()
        progs = [start_filtered(d.socket_path, one_call_program(NR_GETSID, 20_000),
                                container_id=f"idle-{i}") for i in range(3)]
        try:
            wait_inflight(d, 3)
            # Three decisions of 20 s each; the deadline (1 s) ends them.
            stopped_at = time.monotonic()
            d.signal(signal.SIGTERM)
            assert d.process.wait(30) == 0
            took = time.monotonic() - stopped_at
            results = [p.result(20) for p in progs]
        finally:
            for p in progs:
                p.kill()
        assert took < 4, took
        assert all(r["rc"] == -1 and r["errno"] == errno.EPERM for r in results), results
