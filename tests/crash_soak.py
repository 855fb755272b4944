"""The chaos soak of issue 17: the daemon SIGKILLed at random moments under a real
systemd, with calls in flight, and no call stuck, answered twice or answered wrong.

    sudo .venv/bin/python -m tests.crash_soak --kills 10 --targets 8

CI runs a short version (``tests/test_crash.py``). The daemon runs as the unit of a real
``systemd --user`` (``Restart=always``, the fd store; as ``tests/test_restart.py`` runs
it) with the chaos policy below: ``getpgid`` answered inline, ``getsid`` by a coroutine
handler that sleeps 0-200 ms first, so a kill nearly always finds decisions under way.
The targets are ``tests/soak.py`` targets: each alternates the two calls with a distinct
argument and checks every answer (the policy's answer is a function of it).

Kills: ``systemctl kill --signal=KILL`` at a random moment, and two of them during a
``takeover``: one SIGKILLs the process taking over after it received every session and
before it commits (the old daemon must serve them again), one SIGKILLs the old daemon
while it stops reading for the handover (decisions in flight: systemd restarts it and
the journal answers them). After each restart the soak reads, from the log, how many
notifications the new process found in the journals (``in flight``: the calls received
and not answered at the kill) and how many it answered; and the new process's fds and
RSS once it serves. At the end:

* **stuck**: targets that did not finish within the deadline plus the restart time of
  their last call (a call left blocked never returns);
* **double**: notification ids answered twice (the audit log, ``decisions = "all"``,
  holds the id of every answer; lines still queued at a kill are lost, so this is a
  lower bound) plus errors a second answer would cause in the daemon's log;
* **wrong**: answers a target did not expect.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .soak import ROOT, DaemonProcess, RunningTarget, start_target, wait_file
from .systemd_user import UserManager, run_user_manager

CHAOS_POLICY = '''\
"""Chaos soak policy: answers are a function of the argument; the coroutine handler
sleeps, so a kill finds decisions under way."""
import random

import trio

from supervisor.policy import PolicySet, returns

policy = PolicySet("echo")


@policy.on("getpgid")
def sync_echo(n):
    return returns(n.args[0] * 3 + 1)


@policy.on("getsid")
async def async_echo(n):
    await trio.sleep(random.random() * 0.2)
    return returns(n.args[0] * 5 + 2)
'''

DEADLINE = 2.0
RECOVERED = re.compile(r"container (\S+): answering (\d+) notifications a crashed process "
                       r"had received \((\d+) torn: on_error\): ids ([0-9a-fx ]+)")


@dataclass
class Kill:
    kind: str  # crash, takeover-new, takeover-old
    pid: int
    in_flight: int = 0  # journal entries the next process found pending
    recovered: int = 0  # of those, answered (an audit line with that id and container)
    torn: int = 0
    restart_seconds: float = 0.0
    fds: int = 0  # of the process serving afterwards
    rss_kib: int = 0
    fd_kinds: dict[str, int] = field(default_factory=dict)


@dataclass
class ChaosReport:
    kills: list[Kill] = field(default_factory=list)
    targets: int = 0
    calls: int = 0
    stuck: int = 0
    double: int = 0
    wrong: int = 0
    slowest_call: float = 0.0
    session_errors: int = 0
    samples: list[str] = field(default_factory=list)
    # The survivor (the process serving at the end): fds and RSS right after the last
    # kill's restart and again after `settle` more seconds of load.
    survivor_fds: tuple[int, int] = (0, 0)
    survivor_rss_kib: tuple[int, int] = (0, 0)

    def table(self) -> str:
        rows = ["| # | kill | in flight | recovered | torn | restart s | fds | RSS KiB |",
                "|---|---|---|---|---|---|---|---|"]
        for i, k in enumerate(self.kills, 1):
            rows.append(f"| {i} | {k.kind} | {k.in_flight} | {k.recovered} | {k.torn} | "
                        f"{k.restart_seconds:.2f} | {k.fds} | {k.rss_kib} |")
        rows.append("")
        rows.append(f"kills {len(self.kills)}, in flight {sum(k.in_flight for k in self.kills)}, "
                    f"recovered {sum(k.recovered for k in self.kills)}, stuck {self.stuck}, "
                    f"double {self.double}, wrong {self.wrong}; {self.targets} targets, "
                    f"{self.calls} calls, slowest call {self.slowest_call:.2f} s; survivor "
                    f"fds {self.survivor_fds[0]} -> {self.survivor_fds[1]}, RSS KiB "
                    f"{self.survivor_rss_kib[0]} -> {self.survivor_rss_kib[1]}")
        kinds = {tuple(sorted(k.fd_kinds.items())) for k in self.kills}
        if len(kinds) > 1:
            rows.append("fds by kind after each kill: " + "; ".join(
                str(k.fd_kinds) for k in self.kills))
        return "\n".join(rows)

    @property
    def ok(self) -> bool:
        return (self.stuck == 0 and self.double == 0 and self.wrong == 0
                and self.session_errors == 0 and self.flat)

    @property
    def flat(self) -> bool:
        """The survivor's fds did not change under load and its RSS grew by less than
        8 MiB (allocator noise); every process after a kill had about the same fds (a
        transient one: a pidfd or /proc/PID/mem opened by a decision)."""
        fds = [k.fds for k in self.kills]
        return (self.survivor_fds[0] == self.survivor_fds[1]
                and self.survivor_rss_kib[1] - self.survivor_rss_kib[0] < 8192
                and (not fds or max(fds) - min(fds) <= 2))


def install_unit(m: UserManager, d: DaemonProcess, store_max: int) -> None:
    units = m.unit_dir
    units.mkdir(parents=True, exist_ok=True)
    # No start rate limit: ten crashes in a few seconds would trip systemd's default
    # (5 starts in 10 s), and the unit would stay down.
    (units / m.unit).write_text(f"""[Unit]
StartLimitIntervalSec=0
[Service]
Type=notify
NotifyAccess=main
ExecStart={sys.executable} -m supervisor serve --config {d.config}
WorkingDirectory={ROOT}
FileDescriptorStoreMax={store_max}
Restart=always
RestartSec=100ms
TimeoutStopSec=30
StandardOutput=append:{d.tmp / "audit.log"}
StandardError=append:{d.log}
""")
    m.ctl("daemon-reload")
    m.ctl("start", m.unit)


def _begin_takeover(control: str) -> subprocess.Popen[str]:
    """A process taking over: begins, receives every page, prints, then waits (never
    commits) until it is killed or the old daemon closes the connection."""
    code = f"""
import sys, time, trio
sys.path.insert(0, {str(ROOT)!r})
from supervisor.takeover import TakeoverClient

async def main():
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.connect({control!r})
    client = TakeoverClient(sock)
    try:
        hello, fds = await client.call("takeover", max_fds=1)
    except Exception as exc:  # the old daemon was killed before it answered
        print("broken", exc, flush=True)
        return
    got = 0
    for page in range(hello["pages"]):
        result, more = await client.call("takeover-page", {{"page": page}}, max_fds=200)
        got += len(more)
    print(hello["sessions"], got, flush=True)
    with trio.move_on_after(60):
        await sock.recv(1)

trio.run(main)
"""
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def _main_pid(m: UserManager) -> int:
    return int(m.show("MainPID")["MainPID"])


def _restarted(m: UserManager, d: DaemonProcess, old_pid: int, serving: int,
               sessions: int) -> int:
    """Wait for the process after ``old_pid`` to serve its ``sessions`` again (the
    ``serving``-th such log line); returns its pid."""
    new = int(m.wait_for("MainPID", lambda v: v not in ("0", str(old_pid))))
    d.wait_log(f"fd store: serving {sessions} sessions again", count=serving, timeout=30)
    return new


def run_chaos(tmp: Path, *, kills: int = 10, targets: int = 6, takeover: bool = True,
              seed: int | None = None, pause: float = 0.002,
              gap: tuple[float, float] = (0.3, 1.0), settle: float = 2.0) -> ChaosReport:
    rng = random.Random(seed)
    report = ChaosReport(targets=targets)
    (tmp / "chaos.py").write_text(CHAOS_POLICY)
    d = DaemonProcess.configure(tmp, f"""[defaults]
policies = ["echo"]
deadline = {DEADLINE}
[audit]
decisions = "all"
rate_limit = 0
container_bytes = 0
[[policy]]
name = "echo"
path = "{tmp}/chaos.py"
""")
    xdg = tmp / "xdg"
    xdg.mkdir(mode=0o700)
    stop = tmp / "stop"
    kinds = ["crash"] * kills
    if takeover and kills >= 3:
        kinds[kills // 3] = "takeover-new"
        kinds[2 * kills // 3] = "takeover-old"
    with run_user_manager(xdg, tmp / "manager.log") as m:
        install_unit(m, d, store_max=3 * targets + 16)
        pid = int(m.wait_for("MainPID", lambda v: v != "0"))
        d.wait_log("serving on")
        running: list[RunningTarget] = []
        recovered_ids: list[tuple[Kill, str, list[str]]] = []
        try:
            for i in range(targets):
                running.append(start_target(d.socket_path, i, 0, "--until", str(stop),
                                            "--pause", str(pause),
                                            "--ready", str(tmp / f"ready-{i}"),
                                            container_id=f"chaos-{i}"))
            for i in range(targets):
                wait_file(tmp / f"ready-{i}")
            m.wait_for("NFileDescriptorStore", lambda v: v == str(3 * targets))
            serving = 0
            for kind in kinds:
                time.sleep(rng.uniform(*gap))
                kill = Kill(kind, pid)
                log_before = len(d.log_text())
                begin = time.monotonic()
                if kind == "crash":
                    m.ctl("kill", "--signal=KILL", m.unit)
                    serving += 1
                    pid = _restarted(m, d, pid, serving, targets)
                elif kind == "takeover-new":
                    new = _begin_takeover(d.control_path)
                    assert new.stdout is not None
                    line = new.stdout.readline().split()
                    assert line == [str(targets)] * 2, line
                    new.send_signal(signal.SIGKILL)
                    new.wait()
                    new.stdout.close()
                    d.wait_log(f"did not complete: serving {targets} sessions again",
                               count=1 + sum(1 for k in report.kills
                                             if k.kind == "takeover-new"))
                else:  # takeover-old: killed while it stops reading for the handover
                    new = _begin_takeover(d.control_path)
                    d.wait_log(f"takeover requested by pid {new.pid}")
                    m.ctl("kill", "--signal=KILL", m.unit)
                    serving += 1
                    pid = _restarted(m, d, pid, serving, targets)
                    new.wait(30)  # the takeover broke off: it exits
                    if new.stdout is not None:
                        new.stdout.close()
                kill.restart_seconds = time.monotonic() - begin
                time.sleep(0.3)  # recovered decisions finish (<= 0.2 s of sleep each)
                for container, found, torn, ids in RECOVERED.findall(
                        d.log_text()[log_before:]):
                    kill.in_flight += int(found)
                    kill.torn += int(torn)
                    recovered_ids.append((kill, container, ids.split()))
                kill.fds = d.fd_count(pid)
                kill.fd_kinds = _fd_kinds(pid)
                kill.rss_kib = d.rss_kib(pid)
                report.kills.append(kill)
            report.survivor_fds = (report.kills[-1].fds, 0) if report.kills else (0, 0)
            report.survivor_rss_kib = (d.rss_kib(pid), 0)
            if not report.kills:
                report.survivor_fds = (d.fd_count(pid), 0)
            time.sleep(settle)
            report.survivor_fds = (report.survivor_fds[0], d.fd_count(pid))
            report.survivor_rss_kib = (report.survivor_rss_kib[0], d.rss_kib(pid))
            stop.touch()
            deadline = time.monotonic() + 30
            for t in running:
                try:
                    r = t.result(max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    report.stuck += 1
                    continue
                report.calls += r["calls"]
                report.wrong += r["wrong"]
                report.samples.extend(r["samples"])
                report.slowest_call = max(report.slowest_call, r["max_latency"])
        finally:
            for t in running:
                t.kill()
            m.ctl("stop", m.unit, check=False)
    answered = _answered_ids(d.tmp / "audit.log")
    report.double = sum(n - 1 for n in answered.values() if n > 1)
    for kill, container, ids in recovered_ids:
        kill.recovered += sum(1 for i in ids if answered[(container, i)])
    text = d.log_text()
    report.session_errors = len(re.findall(r"session of container \S+ failed", text))
    return report


def _fd_kinds(pid: int) -> dict[str, int]:
    import os

    kinds: Counter[str] = Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        kinds[re.sub(r"\[\d+\]|:\d+|/proc/\d+", "", target)] += 1
    return dict(kinds)


def _answered_ids(audit: Path) -> Counter[tuple[str, str]]:
    """How often each (container, notification id) was answered, from the audit log."""
    ids: Counter[tuple[str, str]] = Counter()
    for line in audit.read_text(errors="replace").splitlines():
        try:
            entry: dict[str, Any] = json.loads(line)
        except ValueError:
            continue
        if "id" in entry and "container" in entry:
            ids[(str(entry["container"]), str(entry["id"]))] += 1
    return ids


def main(argv: Sequence[str] | None = None) -> int:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--targets", type=int, default=8)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--no-takeover", action="store_true")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="crash-soak-") as tmp:
        report = run_chaos(Path(tmp), kills=a.kills, targets=a.targets,
                           takeover=not a.no_takeover, seed=a.seed)
    print(report.table())
    for sample in report.samples[:5]:
        print("  wrong:", sample)
    print("OK" if report.ok else "FAILED")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
