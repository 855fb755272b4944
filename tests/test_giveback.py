"""A restarted old daemon gives its keeper's sessions to the live daemon (giveback.py):
the two rolling-update edge cases with real keepers, daemons and targets calling in a
loop, and the attacks on the ``adopt`` command."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from supervisor.control import ControlError, request
from supervisor.handoff import build_state_message
from supervisor.launcher import hand_over
from supervisor.takeover import PAGE_FDS

from .soak import (
    DaemonProcess,
    RunningTarget,
    config_text,
    daemon_process,
    hold_targets,
    release_targets,
    start_target,
    wait_file,
)
from .test_keeper import FDS_PER_SESSION, KeeperProcess, keeper_process

N = 4


def _targets(d_socket: str, tmp: Path, stop: Path, hold: Path) -> list[RunningTarget]:
    return [start_target(d_socket, i, 0, "--until", str(stop), "--hold", str(hold),
                         "--ready", str(tmp / f"ready-{i}"), container_id=f"ctr-{i}")
            for i in range(N)]


def _finish(targets: list[RunningTarget], stop: Path) -> None:
    time.sleep(0.3)  # calls after the old pod is gone
    stop.touch()
    results = [t.result(60) for t in targets]
    assert all(r["ok"] == r["calls"] and r["calls"] > 0 and r["wrong"] == 0
               for r in results), results


@dataclass
class _Rollout:
    """Two pods' keepers (``k1`` the old pod's, ``k2`` the new one's), the old daemon
    ``a`` serving N targets through ``k1`` (their calls held), and the daemons' files."""

    k1: KeeperProcess
    k2: KeeperProcess
    d: DaemonProcess
    a: subprocess.Popen[bytes]
    old_args: tuple[str, ...]
    targets: list[RunningTarget]
    stop: Path
    hold: Path


@contextlib.contextmanager
def _old_pod_serving(tmp_path: Path) -> Iterator[_Rollout]:
    """The old pod with N containers, each session stored in its keeper, every target
    holding before its next call; the targets are killed on exit."""
    stop, hold = tmp_path / "stop", tmp_path / "hold"
    with keeper_process(tmp_path, name="old-pod") as k1, \
            keeper_process(tmp_path, name="new-pod") as k2, \
            daemon_process(tmp_path, config_text(tmp_path)) as d:
        old_args = ("--takeover", "--fd-keeper", str(k1.path))
        a = d.start(*old_args)
        targets = _targets(d.socket_path, tmp_path, stop, hold)
        try:
            for i in range(N):
                wait_file(tmp_path / f"ready-{i}")
            k1.wait_log(f"stored {FDS_PER_SESSION} fds under session-", count=N)
            hold_targets(hold, N)
            yield _Rollout(k1, k2, d, a, old_args, targets, stop, hold)
        finally:
            for t in targets:
                t.kill()


def _refused(d: object, reason: str) -> float:
    metrics = d.metrics()  # type: ignore[attr-defined]
    return float(metrics.get(("seccomp_supervisor_listeners_refused_total",
                              (("reason", reason),)), 0))


def test_a_daemon_killed_before_telling_its_keeper_gives_the_duplicates_back(
        tmp_path: Path) -> None:
    """Case 1: the new daemon B holds every listener (it took them over), but the old
    daemon A was SIGKILLed before it told its keeper K1 ``HANDEDOVER=1``. The kubelet
    restarts A: it must not serve them beside B nor bind over B's sockets; B refuses
    them as served already, K1 retires, the old pod goes, and no call is lost.

    The moment between B's commit and A's message is built by hand: this test takes
    the sessions over from A (takeover, pages, no commit), SIGKILLs A and hands the
    listeners to B as a runtime would."""
    with _old_pod_serving(tmp_path) as r:
        k1, k2, d, a, old_args = r.k1, r.k2, r.d, r.a, r.old_args
        hello, fds = request(d.control_path, "takeover", max_fds=1)
        for fd in fds:
            os.close(fd)
        taken: list[tuple[int, dict[str, object]]] = []
        for page in range(hello["pages"]):
            result, fds = request(d.control_path, "takeover-page", {"page": page},
                                  max_fds=PAGE_FDS)
            taken.extend(zip(fds, result["sessions"], strict=True))
        assert len(taken) == N
        a.kill()
        a.wait()
        b = d.start("--takeover", "--fd-keeper", str(k2.path))
        for fd, state in taken:
            container = state["container"]
            assert isinstance(container, dict)
            hand_over(d.socket_path, fd, build_state_message(
                pid=int(container["pid"]), container_id=str(container["id"]),
                bundle="/"))
            os.close(fd)
        deadline = time.monotonic() + 20
        while len(d.status()["sessions"]) < N:
            assert time.monotonic() < deadline, d.log_text()[-3000:]
            time.sleep(0.05)
        # The kubelet restarts A; K1 still holds every listener, not retired.
        restarted = d.start(*old_args, wait=False)
        d.wait_log(f"the live daemon adopted 0 and served {N} already of {N} sessions")
        k1.wait_log("handed its sessions over to a newer daemon")
        d.wait_log("handed its sessions over to a live one")
        assert restarted.poll() is None
        status = d.status()
        assert status["pid"] == b.pid and len(status["sessions"]) == N
        assert _refused(d, "already_served") == N
        release_targets(r.hold, N)
        time.sleep(0.3)
        # The old pod is deleted: its daemon, then its keeper.
        restarted.send_signal(signal.SIGTERM)
        assert restarted.wait(20) == 0
        assert k1.stop() == 0
        _finish(r.targets, r.stop)
        assert _refused(d, "read_elsewhere") == 0
        assert "serving on" not in d.log_text().split("the live daemon adopted")[-1]
        b.send_signal(signal.SIGTERM)
        assert b.wait(20) == 0


def test_a_crash_looping_daemon_gives_its_kept_sessions_to_the_new_pod(
        tmp_path: Path) -> None:
    """Case 2: A is down (crash-looping) when the rollout starts; B finds nobody to take
    over from and starts afresh. A restarted gives K1's sessions to B (adopted), K1
    retires, the old pod goes, and every container is still served: no ENOSYS, no
    lost call."""
    with _old_pod_serving(tmp_path) as r:
        k1, k2, d, a, old_args = r.k1, r.k2, r.d, r.a, r.old_args
        a.kill()
        a.wait()
        b = d.start("--takeover", "--fd-keeper", str(k2.path))
        d.wait_log("takeover: no daemon on")
        release_targets(r.hold, N)  # their calls wait in the kernel: K1 holds the listeners
        restarted = d.start(*old_args, wait=False)
        d.wait_log(f"the live daemon adopted {N} and served 0 already of {N} sessions")
        k1.wait_log("handed its sessions over to a newer daemon")
        k2.wait_log(f"stored {FDS_PER_SESSION} fds under session-", count=N)
        assert restarted.poll() is None
        status = d.status()
        assert status["pid"] == b.pid
        assert {s["container"] for s in status["sessions"]} == \
            {f"ctr-{i}" for i in range(N)}
        restarted.send_signal(signal.SIGTERM)
        assert restarted.wait(20) == 0
        assert k1.stop() == 0
        _finish(r.targets, r.stop)
        assert _refused(d, "already_served") == 0
        b.send_signal(signal.SIGTERM)
        assert b.wait(20) == 0


def test_adopt_is_refused_to_a_bad_token_and_to_a_second_caller(tmp_path: Path) -> None:
    """``adopt`` names no file (a token of 12 hex digits, the path beside the control
    socket); a token whose socket nobody serves is an error, not a hang."""
    with daemon_process(tmp_path, config_text(tmp_path)) as d:
        d.start()
        for token in ("../../etc/x", "A" * 12, "0" * 11, 5, None):
            with pytest.raises(ControlError, match="token of 12 hex digits"):
                request(d.control_path, "adopt", {"token": token})
        with pytest.raises(ControlError, match="adopt: "):
            request(d.control_path, "adopt", {"token": "0" * 12})
        assert d.status()["sessions"] == []


def test_adopt_refuses_a_give_socket_not_served_by_root(tmp_path: Path) -> None:
    """Only uid 0 gives sessions: a ``give-`` socket whose listener is another uid (a
    process that got to the name, in a directory it may write) is refused before a
    byte is read from it."""
    import subprocess
    import sys

    from supervisor.giveback import give_path

    with daemon_process(tmp_path, config_text(tmp_path)) as d:
        d.start()
        token = "0123456789ab"
        path = give_path(d.control_path, token)
        # Bound as root, listening as nobody: SO_PEERCRED is taken at listen().
        squatter = subprocess.Popen(
            [sys.executable, "-c",
             "import os, socket, sys, time\n"
             "s = socket.socket(socket.AF_UNIX)\n"
             f"s.bind({path!r})\n"
             "os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)\n"
             "s.listen(8); print('ready', flush=True); time.sleep(60)\n"],
            stdout=subprocess.PIPE)
        try:
            assert squatter.stdout is not None
            assert squatter.stdout.readline() == b"ready\n"
            with pytest.raises(ControlError, match="served by uid 65534, not 0"):
                request(d.control_path, "adopt", {"token": token})
        finally:
            squatter.kill()
            squatter.wait()
            if squatter.stdout is not None:
                squatter.stdout.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        assert d.status()["sessions"] == []


SLOW_POLICY = '''\
"""Answers are a function of the argument; the coroutine handler sleeps, so a SIGKILL
finds each target's call under way."""
import trio

from supervisor.policy import PolicySet, returns

policy = PolicySet("echo")


@policy.on("getpgid")
def sync_echo(n):
    return returns(n.args[0] * 3 + 1)


@policy.on("getsid")
async def async_echo(n):
    await trio.sleep(0.5)
    return returns(n.args[0] * 5 + 2)
'''


def test_calls_a_crashed_daemon_had_received_are_answered_by_the_daemon_it_gives_to(
        tmp_path: Path) -> None:
    """Case 2 with a call in flight in every target when the old daemon is SIGKILLed:
    its keeper's in-flight journals go with the listeners, and the live daemon answers
    those calls (each once, by its policy): none stays blocked."""
    stop = tmp_path / "stop"
    (tmp_path / "slow.py").write_text(SLOW_POLICY)
    text = (f'[defaults]\npolicies = ["echo"]\n[[policy]]\nname = "echo"\n'
            f'path = "{tmp_path}/slow.py"\n')
    with keeper_process(tmp_path, name="old-pod") as k1, \
            keeper_process(tmp_path, name="new-pod") as k2, \
            daemon_process(tmp_path, text) as d:
        old_args = ("--takeover", "--fd-keeper", str(k1.path))
        a = d.start(*old_args)
        targets = [start_target(d.socket_path, i, 0, "--only", "async", "--until", str(stop),
                                "--ready", str(tmp_path / f"ready-{i}"),
                                container_id=f"ctr-{i}") for i in range(N)]
        try:
            for i in range(N):
                wait_file(tmp_path / f"ready-{i}")
            k1.wait_log(f"stored {FDS_PER_SESSION} fds under session-", count=N)
            time.sleep(0.2)  # every target is in a call: each decision sleeps 0.5 s
            a.kill()
            a.wait()
            b = d.start("--takeover", "--fd-keeper", str(k2.path))
            restarted = d.start(*old_args, wait=False)
            d.wait_log(f"the live daemon adopted {N} and served 0 already of {N} sessions")
            d.wait_log("answering 1 notifications a crashed process had received",
                       count=N)
            assert restarted.poll() is None
            restarted.send_signal(signal.SIGTERM)
            assert restarted.wait(20) == 0
            assert k1.stop() == 0
            time.sleep(1.2)
            stop.touch()
            results = [t.result(30) for t in targets]
        finally:
            for t in targets:
                t.kill()
        assert all(r["ok"] == r["calls"] and r["wrong"] == 0 for r in results), results
        b.send_signal(signal.SIGTERM)
        assert b.wait(20) == 0
