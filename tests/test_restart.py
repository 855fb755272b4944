"""Restarts that break no container: `serve --takeover` (no systemd) and the handover at
the session level. Every target checks every answer it gets; the daemons' own counters
show that each notification was answered exactly once."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client import CollectorRegistry

from supervisor import spawn
from supervisor.audit import Recorder
from supervisor.config import parse_config
from supervisor.decide import Chain
from supervisor.metrics import Metrics
from supervisor.notifyfd import NotifyFd
from supervisor.plugins import load_policies
from supervisor.policy import Container
from supervisor.profile import build_program, notify_profile
from supervisor.session import Session, SessionSettings

from .soak import (
    NOTIFIED,
    POLICY,
    SOAK,
    DaemonProcess,
    RunningTarget,
    config_text,
    daemon_process,
    hold_targets,
    release_targets,
    start_target,
    wait_file,
)
from .systemd_user import UserManager, run_user_manager

# --------------------------------------------------------------------------- session state


def test_session_state_round_trips_and_refuses_garbage() -> None:
    from types import MappingProxyType

    from supervisor.fdstore import container_from_state, decode_state, encode_state, session_state

    c = Container(id="ctr-1", pid=42, metadata="team=a\nx=y",
                  labels=MappingProxyType({"team": "a", "x": "y"}),
                  annotations=MappingProxyType({"io.k8s/ns": "ci", "long": "z" * 5000}),
                  bundle="/b", status="running", runtime_version="runc 1.1")
    state = session_state(c, ("hardening", "learn"), "shadow")
    assert state["route"] == {"policies": ["hardening", "learn"], "mode": "shadow"}
    assert decode_state(encode_state(state)) == c
    for bad in (None, [], {"version": 2}, {"version": 1},
                {"version": 1, "container": {"id": ""}},
                {"version": 1, "container": {"id": "x", "pid": -1}},
                {"version": 1, "container": {"id": "x", "annotations": {"a": 1}}}):
        with pytest.raises(ValueError):
            container_from_state(bad)
    with pytest.raises(ValueError):
        decode_state(b"\xff not json")


def test_restore_group_keeps_the_listener_and_closes_the_rest() -> None:
    from supervisor.fdstore import (
        StoredGroup,
        encode_state,
        group_listen_fds,
        restore_group,
        session_state,
        write_state_memfd,
    )
    from supervisor.systemd import ListenFd

    child = spawn.spawn_filtered([sys.executable, "-c", "import time; time.sleep(30)"],
                                 build_program(notify_profile(["getsid"])))
    try:
        listener = child.take_listener()
        memfd = write_state_memfd(encode_state(session_state(Container(id="c9", pid=9))))
        groups, others = group_listen_fds([
            ListenFd(3, "notify"), ListenFd(memfd, "session-abc"),
            ListenFd(listener, "session-abc")])
        assert [g.name for g in groups] == ["session-abc"] and others[0].name == "notify"
        restored = restore_group(groups[0])
        assert restored is not None and restored.error == ""
        assert restored.notify_fd == listener and restored.container.id == "c9"
        with pytest.raises(OSError):
            os.fstat(memfd)                      # the state fd was closed
        # No state: served under a placeholder, never dropped.
        alone = restore_group(StoredGroup("session-def", [listener]))
        assert alone is not None and alone.container.id == "unknown-session-def"
        assert "no session state" in alone.error
        # No listener: everything closed, None.
        junk = os.open("/dev/null", os.O_RDONLY)
        assert restore_group(StoredGroup("session-ghi", [junk])) is None
        with pytest.raises(OSError):
            os.fstat(junk)
        os.close(listener)
    finally:
        child.process.kill()
        child.process.wait()
        child.close()


# --------------------------------------------------------------------------- session level


async def test_handing_a_notify_fd_between_sessions_answers_every_call_once(
        tmp_path: Path) -> None:
    """Five handovers while a target makes calls as fast as it can (half of them through
    coroutine handlers), until told to stop after the last: each call is answered by
    exactly one session, none is lost."""
    (tmp_path / "echo.py").write_text(POLICY)
    config = parse_config({"policy": [{"name": "echo", "path": str(tmp_path / "echo.py")}]},
                          str(tmp_path / "c.toml"))
    chain = Chain(load_policies(config).items())
    registry = CollectorRegistry()
    recorder = Recorder(Metrics(registry), audit="none")
    ready, stop = tmp_path / "ready", tmp_path / "stop"
    # Not a fixed number of calls: a fast machine made 6,000 before the second handover.
    child = await trio.to_thread.run_sync(lambda: spawn.spawn_filtered(
        [sys.executable, SOAK, "target", "3", "0", "--until", str(stop),
         "--ready", str(ready)],
        build_program(notify_profile(list(NOTIFIED))), stdout=subprocess.PIPE))
    notify = NotifyFd(child.take_listener())
    sessions: list[Session] = []
    try:
        async with trio.open_nursery() as nursery:
            for i in range(5):
                session = Session(notify, Container(id="t"), chain, SessionSettings(),
                                  recorder)
                sessions.append(session)
                done = trio.Event()

                async def run(s: Session = session, ev: trio.Event = done) -> None:
                    await s.run()
                    ev.set()

                nursery.start_soon(run)
                if i == 0:
                    with trio.fail_after(20):
                        while not ready.exists():
                            await trio.sleep(0.005)
                await trio.sleep(0.1)
                session.stop_reading(keep_fd=True)
                await done.wait()
                assert not notify.closed  # keep_fd: still ours
            stop.touch()
            last = Session(notify, Container(id="t"), chain, SessionSettings(), recorder)
            sessions.append(last)
            await last.run()  # until the target exits (POLLHUP)
        out = await trio.to_thread.run_sync(lambda: child.process.communicate(timeout=60)[0])
    finally:
        if child.process.poll() is None:
            child.process.kill()
        child.process.wait()
        if child.process.stdout is not None:
            child.process.stdout.close()  # communicate() did not, if the test failed
        notify.close()
    result = json.loads(out)
    assert result["calls"] > 0 and result["ok"] == result["calls"], result
    answered = [s.stats.answered for s in sessions]
    assert sum(answered) == result["calls"], answered
    assert all(n > 0 for n in answered[:5]), answered  # each session really served
    assert sum(s.stats.gone for s in sessions) == 0
    assert registry.get_sample_value("seccomp_supervisor_notifications_gone_total",
                                     {"stage": "send"}) == 0


# --------------------------------------------------------------------------- serve --takeover


def takeover(d: DaemonProcess, window: Path | None = None) -> tuple[float, subprocess.Popen[bytes]]:
    """``serve --takeover``; returns (seconds until the old daemon exited, new process).
    Writes the restart window (monotonic) to ``window`` for the targets."""
    old = d.process
    begin = time.monotonic()
    new = d.start("--takeover")
    assert old.wait(20) == 0, d.log_text()[-3000:]
    end = time.monotonic()
    if window is not None:
        window.write_text(f"{begin} {end}")
    return end - begin, new


def test_takeover_under_load_loses_and_repeats_nothing(tmp_path: Path) -> None:
    stop, window = tmp_path / "stop", tmp_path / "window"
    with daemon_process(tmp_path, config_text(tmp_path)) as d:
        d.start()
        targets: list[RunningTarget] = []
        try:
            for i in range(8):
                targets.append(start_target(d.socket_path, i, 0, "--until", str(stop),
                                            "--window", str(window),
                                            "--ready", str(tmp_path / f"ready-{i}")))
            for i in range(8):
                wait_file(tmp_path / f"ready-{i}")
            old_pid = d.pid
            took, new = takeover(d, window)
            assert d.pid != old_pid
            d.wait_sessions(8)
            time.sleep(0.3)  # the new daemon serves them for a while
            stop.touch()
            results = [t.result(60) for t in targets]
        finally:
            for t in targets:
                t.kill()
        total = sum(r["calls"] for r in results)
        during = sum(r["during_restart"] for r in results)
        assert all(r["wrong"] == 0 for r in results), [r["samples"] for r in results]
        assert all(r["ok"] == r["calls"] for r in results)  # no ENOSYS, no EPERM
        # The new daemon answered the rest: its session counts plus the old one's logged
        # counts are the targets' calls, exactly.
        log = d.log_text()
        paused = sum(int(n) for n in _numbers(log, r"paused for a handover \((\d+) notif"))
        assert d.metric("seccomp_supervisor_notifications_gone_total", stage="send") == 0
        new_total = sum(v for (name, _), v in d.metrics().items()
                        if name == "seccomp_supervisor_notifications_total")
        assert paused + new_total == total, (paused, new_total, total)
        assert "takeover: 8 sessions and the notify socket" in log
        new.send_signal(signal.SIGTERM)
        assert new.wait(20) == 0
        print(f"\ntakeover: {total} notifications, {during} during the restart "
              f"({took:.2f} s), lost 0, wrong 0; slowest call across it "
              f"{max(r['max_latency_restart'] for r in results) * 1000:.1f} ms")


def test_takeover_then_new_handoffs_go_to_the_new_daemon(tmp_path: Path) -> None:
    with daemon_process(tmp_path, config_text(tmp_path)) as d:
        d.start()
        _took, new = takeover(d)
        result = start_target(d.socket_path, 5, 200).result(30)
        assert result["ok"] == 200
        assert d.metric("seccomp_supervisor_handoffs_total", result="accepted") == 1
        assert d.status()["pid"] == new.pid
        new.send_signal(signal.SIGTERM)
        assert new.wait(20) == 0


def test_takeover_without_a_running_daemon_starts_afresh(tmp_path: Path) -> None:
    with daemon_process(tmp_path, config_text(tmp_path)) as d:
        d.start("--takeover")
        assert "takeover: no daemon on" in d.log_text()
        assert start_target(d.socket_path, 1, 50).result(30)["ok"] == 50


def _begin_and_die(control: str, how: str) -> subprocess.CompletedProcess[str]:
    """A would-be new daemon that begins a takeover, receives everything, then gives up
    (``abort``) or just exits without committing (``exit``)."""
    code = f"""
import sys, trio
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from supervisor.takeover import TakeoverClient

async def main():
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.connect({control!r})
    client = TakeoverClient(sock)
    hello, fds = await client.call("takeover", max_fds=1)
    result, more = await client.call("takeover-page", {{"page": 0}}, max_fds=200)
    print(hello["sessions"], len(more), flush=True)
    if {how!r} == "abort":
        await client.call("takeover-abort")

trio.run(main)
"""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30)


@pytest.mark.parametrize("how", ["abort", "exit"])
def test_a_takeover_that_does_not_commit_leaves_the_old_daemon_serving(
        tmp_path: Path, how: str) -> None:
    stop = tmp_path / "stop"
    with daemon_process(tmp_path, config_text(tmp_path)) as d:
        d.start()
        targets = [start_target(d.socket_path, i, 0, "--until", str(stop),
                                "--ready", str(tmp_path / f"ready-{i}")) for i in range(3)]
        try:
            for i in range(3):
                wait_file(tmp_path / f"ready-{i}")
            begun = _begin_and_die(d.control_path, how)
            assert begun.returncode == 0, begun.stderr
            assert begun.stdout.split() == ["3", "3"]
            d.wait_log("serving 3 sessions again")
            d.wait_sessions(3)
            time.sleep(0.2)
            # And a real takeover still works afterwards.
            _took, new = takeover(d)
            d.wait_sessions(3)
            stop.touch()
            results = [t.result(30) for t in targets]
        finally:
            for t in targets:
                t.kill()
        assert all(r["ok"] == r["calls"] and r["wrong"] == 0 for r in results), results
        new.send_signal(signal.SIGTERM)
        assert new.wait(20) == 0


def test_a_second_takeover_request_is_refused_while_one_is_under_way(tmp_path: Path) -> None:
    from supervisor.control import ControlError, request

    code = f"""
import sys, time, trio
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from supervisor.takeover import TakeoverClient

async def main():
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.connect({str(tmp_path / 'sock' / 'control.sock')!r})
    await TakeoverClient(sock).call("takeover", max_fds=1)
    print("begun", flush=True)
    await trio.sleep(3)
    await TakeoverClient(sock).call("takeover-abort")

trio.run(main)
"""
    with daemon_process(tmp_path, config_text(tmp_path)) as d:
        d.start()
        first = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                 text=True)
        try:
            assert first.stdout is not None
            assert first.stdout.readline().strip() == "begun"
            with pytest.raises(ControlError, match="already under way"):
                request(d.control_path, "takeover")
            with pytest.raises(ControlError, match="belongs to pid"):
                request(d.control_path, "takeover-commit")
            assert first.wait(20) == 0
        finally:
            if first.poll() is None:
                first.kill()
            first.wait()
            if first.stdout is not None:
                first.stdout.close()
        d.wait_log("did not complete")
        assert start_target(d.socket_path, 1, 20).result(30)["ok"] == 20


# --------------------------------------------------------------------------- runc


PROBE = '''
import errno
from supervisor.policy import PolicySet, allow, deny, returns

policy = PolicySet("probe")


@policy.on("kill")
def probe(n):
    pid, sig = n.args[0], n.args[1]
    if sig != 0:
        return allow()            # decided on register values only
    return returns(0) if pid % 2 == 0 else deny(errno.ESRCH)
'''

LOOP = """
i=0
while [ $i -lt {n} ]; do
  p=$((100000 + i))
  if kill -0 $p 2>/dev/null; then echo "ok $p"; else echo "no $p"; fi
  i=$((i + 1))
  usleep 2000
done
echo done
"""


def loop_verdict(lines: list[str], n: int) -> tuple[int, list[str]]:
    """(calls lost, wrong lines) of LOOP's output: every pid answered exactly once, `ok`
    for even pids (the policy allows them) and `no` for odd ones."""
    seen: dict[int, str] = {}
    wrong = []
    for line in lines:
        word, _, pid = line.partition(" ")
        if word in ("ok", "no"):
            assert int(pid) not in seen, f"{pid} twice"
            seen[int(pid)] = word
            if word != ("ok" if int(pid) % 2 == 0 else "no"):
                wrong.append(line)
    return n - len(seen), wrong


def probe_config(tmp_path: Path) -> str:
    """A daemon config with only the PROBE policy (written to ``tmp_path``)."""
    (tmp_path / "probe.py").write_text(PROBE)
    return (f'[defaults]\npolicies = ["probe"]\n[[policy]]\nname = "probe"\n'
            f'path = "{tmp_path}/probe.py"\n')


@contextlib.contextmanager
def loop_container(tmp_path: Path, socket_path: str, n: int, name: str) -> Iterator[Any]:
    """A runc container running LOOP (``n`` notified ``kill -0`` calls) with its listener
    handed to ``socket_path``, yielded once it printed 150 lines; deleted on exit."""
    from .runtime import make_bundle, sync_container, unique_id

    bundle = make_bundle(tmp_path / "bundle", ["sh", "-c", LOOP.format(n=n)],
                         notify=["kill"], listener_path=socket_path, metadata="app=loop")
    with sync_container("runc", bundle, unique_id(name)) as c:
        c.run_sync(detach=True, check=True)
        deadline = time.monotonic() + 30
        while c.output().count("\n") < 150:
            assert time.monotonic() < deadline, c.output()[-2000:]
            time.sleep(0.01)
        yield c


def loop_output(c: Any, timeout: float = 90) -> list[str]:
    """LOOP's lines, once it printed ``done``."""
    deadline = time.monotonic() + timeout
    while "done" not in c.output():
        assert time.monotonic() < deadline, c.output()[-2000:]
        time.sleep(0.02)
    return str(c.output()).split("\n")


def answered_before_and_after(d: DaemonProcess, log: str) -> tuple[int, float]:
    """LOOP's calls the old daemon answered before a handover (its log) and the ones the
    new daemon answered (its /metrics)."""
    paused = sum(int(x) for x in _numbers(log, r"paused for a handover \((\d+) notif"))
    new_count = sum(v for (name, labels), v in d.metrics().items()
                    if name == "seccomp_supervisor_notifications_total"
                    and ("syscall", "kill") in labels)
    return paused, new_count


@pytest.mark.runtime
def test_a_runc_container_calling_in_a_loop_across_a_takeover(tmp_path: Path) -> None:
    """`kill -0 PID` in a busybox container: the policy says even PIDs exist and odd ones
    do not (no such PIDs exist in the container, so any answer not from the policy --
    ENOSYS, a CONTINUE, a default -- shows up as a wrong line)."""
    n = 800
    with daemon_process(tmp_path, probe_config(tmp_path)) as d:
        d.start()
        with loop_container(tmp_path, d.socket_path, n, "rel-restart") as c:
            before = c.output().count("\n")
            took, new = takeover(d)
            after = c.output().count("\n")
            lines = loop_output(c)
        lost, wrong = loop_verdict(lines, n)
        assert lost == 0 and not wrong, (lost, wrong[:5])
        assert before < n and after > before  # the loop ran across the restart
        log = d.log_text()
        paused, new_count = answered_before_and_after(d, log)
        assert paused + new_count == n, (paused, new_count)
        print(f"\nrunc across a takeover: {n} notified calls, {after - before} made while "
              f"the new daemon took over ({took:.2f} s), old answered {paused}, new "
              f"{new_count:g}; lost {lost}, wrong {len(wrong)}")
        new.send_signal(signal.SIGTERM)
        assert new.wait(20) == 0


# --------------------------------------------------------------------------- systemd


@pytest.fixture
def user_manager(tmp_path: Path) -> Iterator[UserManager]:
    """A real ``systemd --user`` (tests/systemd_user.py) with a unit running the daemon."""
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    with run_user_manager(xdg, tmp_path / "manager.log") as m:
        yield m


def install_unit(m: UserManager, d: DaemonProcess) -> None:
    units = Path(m.env["XDG_RUNTIME_DIR"]) / "systemd" / "user"
    units.mkdir(parents=True, exist_ok=True)
    (units / m.unit).write_text(f"""[Service]
Type=notify
NotifyAccess=main
ExecStart={sys.executable} -m supervisor serve --config {d.config}
WorkingDirectory={Path(__file__).resolve().parent.parent}
# Three fds per container (the notify fd, its state, its journal): see docs/restarts.md.
FileDescriptorStoreMax=64
Restart=always
RestartSec=100ms
TimeoutStopSec=30
StandardOutput=append:{d.tmp / "audit.log"}
StandardError=append:{d.log}
""")
    m.ctl("daemon-reload")
    m.ctl("start", m.unit)


def test_systemd_restart_and_crash_keep_containers_served(
        tmp_path: Path, user_manager: UserManager) -> None:
    """Under a real systemd: sessions go to the fd store when they start; `systemctl
    restart` (graceful) and a SIGKILL of the daemon (crash, Restart=always) both bring
    them back in the next process, with their container ids."""
    m = user_manager
    stop, hold, window = tmp_path / "stop", tmp_path / "hold", tmp_path / "window"
    n = 4
    with daemon_process(tmp_path, config_text(tmp_path)) as d:
        install_unit(m, d)
        first_pid = m.wait_for("MainPID", lambda v: v != "0")
        d.wait_log("serving on")
        targets = [start_target(d.socket_path, i, 0, "--until", str(stop), "--hold", str(hold),
                                "--window", str(window), "--ready",
                                str(tmp_path / f"ready-{i}"), container_id=f"ctr-{i}")
                   for i in range(n)]
        try:
            for i in range(n):
                wait_file(tmp_path / f"ready-{i}")
            m.wait_for("NFileDescriptorStore", lambda v: v == str(3 * n))
            # 1. A restart under load (SIGTERM, graceful stop, a new process).
            begin = time.monotonic()
            m.ctl("restart", m.unit)
            second_pid = m.wait_for("MainPID", lambda v: v not in ("0", first_pid))
            d.wait_log(f"fd store: serving {n} sessions again")
            window.write_text(f"{begin} {time.monotonic()}")
            time.sleep(0.3)
            # 2. A crash: the daemon is SIGKILLed while no call is in flight (calls in
            # flight at a crash are tests/test_crash.py's).
            hold_targets(hold, n)
            m.ctl("kill", "--signal=KILL", m.unit)
            m.wait_for("MainPID", lambda v: v not in ("0", first_pid, second_pid))
            d.wait_log(f"fd store: serving {n} sessions again", count=2)
            release_targets(hold, n)
            time.sleep(0.3)
            status = {s["container"] for s in d.status()["sessions"]}
            assert status == {f"ctr-{i}" for i in range(n)}
            stop.touch()
            results = [t.result(60) for t in targets]
        finally:
            for t in targets:
                t.kill()
        assert all(r["ok"] == r["calls"] and r["wrong"] == 0 for r in results), results
        # The containers are gone: their sessions left the store.
        m.wait_for("NFileDescriptorStore", lambda v: v == "0")
        assert m.show("NRestarts")["NRestarts"] == "1"  # the crash
        total = sum(r["calls"] for r in results)
        during = sum(r["during_restart"] for r in results)
        slowest = max(r["max_latency_restart"] for r in results)
        print(f"\nsystemd restart: {total} notifications, {during} during the restart, "
              f"lost 0, wrong 0; slowest call across it {slowest * 1000:.0f} ms")


def _numbers(text: str, pattern: str) -> list[str]:
    import re

    return re.findall(pattern, text)


def test_a_failed_takeover_closes_each_received_fd_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A session whose state was refused is served under a placeholder, so its fd is in
    both ``sessions`` and ``invalid``: releasing must close it once, since a second
    close could hit an fd another thread opened under that number in between."""
    from supervisor import takeover
    from supervisor.policy import Container

    r, w = os.pipe()
    journal_r, journal_w = os.pipe()
    taken = takeover.TakenOver(old_pid=1, listen_fd=-1,
                               sessions=[(r, Container(id=f"unknown-takeover-{r}"))],
                               invalid=[(r, "bad state")], journals={r: journal_r})
    closed: list[int] = []
    real_close = os.close

    def counting_close(fd: int) -> None:
        closed.append(fd)
        real_close(fd)

    monkeypatch.setattr(takeover.os, "close", counting_close)
    takeover._release(taken)
    monkeypatch.undo()
    assert sorted(closed) == sorted([r, journal_r])
    for fd in (w, journal_w):
        os.close(fd)
