"""Reliability tooling: a self-checking target, a daemon run as a real process, the soak.

The full-scale soak (100 targets x 20,000 notifications, as issue 7 asks)::

    sudo .venv/bin/python -m tests.soak --targets 100 --calls 20000

CI runs the same code at 20 x 2,000 (``tests/test_soak.py``); ``SOAK_TARGETS`` and
``SOAK_CALLS`` change that scale. The soak starts ``seccomp-supervisor serve`` as a real
process with the ``echo`` policy below, then runs the targets in waves: every target is
a separate process under its own notify filter (handed to the daemon the way runc does
it) and checks every answer it gets. At the end of each wave the daemon's open fds and
RSS are read from ``/proc``. It reports lost (a target that never finished), wrong (an
answer that is not the one the policy gives for that argument) and the daemon's
``gone``/handler-error counters, and fails if any is non-zero or fds/RSS grew.

**The target** (``python tests/soak.py target ...``, run under a filter that notifies
``getpgid`` and ``getsid``) passes a distinct argument to every call: ``(index << 24) |
seq``. The policy answers ``getpgid(a)`` with ``3a + 1`` (a plain-function handler, the
inline path) and ``getsid(a)`` with ``5a + 2`` (a coroutine handler, the task path); an
argument with :data:`STORM` set makes the handler raise (the target then expects the
``on_error`` answer, EPERM). So a lost, swapped, doubled or defaulted answer shows up as
a wrong value in the target itself.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SOAK = str(Path(__file__).resolve())
CLI = [sys.executable, "-m", "supervisor"]
NR_GETPGID = 121
NR_GETSID = 124
STORM = 1 << 23
NOTIFIED = ("getpgid", "getsid")

POLICY = '''\
"""Soak policy: answers are a function of the argument, so targets can check them."""
import trio

from supervisor.policy import PolicySet, returns

policy = PolicySet("echo")
STORM = 1 << 23


def decide(a, k, c):
    if a & STORM:
        raise RuntimeError(f"storm {a:#x}")
    return returns(a * k + c)


@policy.on("getpgid")
def sync_echo(n):
    return decide(n.args[0], 3, 1)


@policy.on("getsid")
async def async_echo(n):
    await trio.sleep(0)
    return decide(n.args[0], 5, 2)
'''


def expected(nr: int, arg: int) -> int:
    return arg * 3 + 1 if nr == NR_GETPGID else arg * 5 + 2


# --------------------------------------------------------------------------- the target


def target_main(argv: Sequence[str]) -> dict[str, Any]:
    """Runs inside the filtered process. Prints one JSON line when done."""
    p = argparse.ArgumentParser(prog="soak.py target")
    p.add_argument("index", type=int)
    p.add_argument("calls", type=int, help="calls to make (0: until --until exists)")
    p.add_argument("--storm", type=int, default=0, help="every Nth call makes the handler raise")
    p.add_argument("--eagain-ok", action="store_true", help="EAGAIN (rate limit) is expected")
    p.add_argument("--only", choices=["sync", "async"], help="use one of the two calls only")
    p.add_argument("--until", help="loop until this file exists")
    p.add_argument("--pause", type=float, default=0.0, help="seconds between calls")
    p.add_argument("--ready", help="create this file after the first answered call")
    p.add_argument("--hold", help="while this file exists, make no calls (and create "
                   "HOLD.held to say so)")
    p.add_argument("--window", help="at the end, count the calls that overlapped the "
                   "interval 'T0 T1' (CLOCK_MONOTONIC seconds) written in this file")
    a = p.parse_args(argv)
    spans: list[tuple[float, float]] = []
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.syscall.argtypes = [ctypes.c_long, ctypes.c_long]
    counts = {"ok": 0, "wrong": 0, "eagain": 0, "eperm": 0}
    samples: list[str] = []
    max_latency = 0.0
    start = time.monotonic()
    seq = 0
    while True:
        if a.calls and seq >= a.calls:
            break
        if not a.calls and a.until and os.path.exists(a.until) and seq > 0:
            break
        nr = NR_GETPGID if a.only == "sync" or (a.only is None and seq % 2 == 0) \
            else NR_GETSID
        arg = (a.index << 24) | (seq % STORM)
        storm = bool(a.storm) and seq % a.storm == a.storm - 1
        if storm:
            arg |= STORM
        t0 = time.monotonic()
        ctypes.set_errno(0)
        rc = libc.syscall(nr, arg)
        err = ctypes.get_errno() if rc == -1 else 0
        t1 = time.monotonic()
        max_latency = max(max_latency, t1 - t0)
        if a.window:
            spans.append((t0, t1))
        if storm and rc == -1 and err == errno.EPERM:
            counts["eperm"] += 1
        elif not storm and rc == expected(nr, arg):
            counts["ok"] += 1
        elif a.eagain_ok and rc == -1 and err == errno.EAGAIN:
            counts["eagain"] += 1
        else:
            counts["wrong"] += 1
            if len(samples) < 5:
                samples.append(f"nr={nr} arg={arg:#x} storm={storm} rc={rc} errno={err}")
        seq += 1
        if seq == 1 and a.ready:
            Path(a.ready).touch()
        if a.pause:
            time.sleep(a.pause)
        if a.hold and os.path.exists(a.hold):
            Path(a.hold + f".held-{a.index}").touch()
            while os.path.exists(a.hold):
                time.sleep(0.005)
    report: dict[str, Any] = {
        "index": a.index, "calls": seq, **counts, "samples": samples,
        "seconds": round(time.monotonic() - start, 4), "max_latency": round(max_latency, 6)}
    if a.window and os.path.exists(a.window):
        begin, end = (float(x) for x in Path(a.window).read_text().split())
        during = [t1 - t0 for t0, t1 in spans if t0 < end and t1 > begin]
        report["during_restart"] = len(during)
        report["max_latency_restart"] = round(max(during, default=0.0), 6)
    return report


# --------------------------------------------------------------------------- spawning


@dataclass
class RunningTarget:
    index: int
    process: subprocess.Popen[bytes]

    def result(self, timeout: float) -> dict[str, Any]:
        """The target's report. Raises subprocess.TimeoutExpired (a lost answer leaves
        the target waiting forever) or AssertionError if it failed."""
        out, _ = self.process.communicate(timeout=timeout)
        assert self.process.returncode == 0, f"target {self.index} exited with " \
            f"{self.process.returncode}"
        report: dict[str, Any] = json.loads(out)
        return report

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


def start_target(socket_path: str, index: int, calls: int, *args: str,
                 container_id: str | None = None, metadata: str = "") -> RunningTarget:
    """Start ``soak.py target INDEX CALLS ARGS`` under a filter notifying getpgid and
    getsid, and hand its listener to the daemon at ``socket_path`` as runc would."""
    return start_filtered(socket_path, [sys.executable, SOAK, "target", str(index), str(calls),
                                        *args],
                          container_id=container_id or f"soak-{index}", metadata=metadata,
                          index=index)


def start_filtered(socket_path: str, argv: Sequence[str], *,
                   notify: Sequence[str] = NOTIFIED, container_id: str = "prog",
                   metadata: str = "", index: int = 0) -> RunningTarget:
    """Start ``argv`` (stdout piped) under a filter notifying ``notify`` and hand its
    listener to the daemon at ``socket_path``."""
    from supervisor.handoff import build_state_message
    from supervisor.launcher import hand_over
    from supervisor.profile import build_program, notify_profile
    from supervisor.spawn import spawn_filtered

    child = spawn_filtered(list(argv), build_program(notify_profile(list(notify))),
                           stdout=subprocess.PIPE)
    try:
        hand_over(socket_path, child.listener_fd, build_state_message(
            pid=child.pid, container_id=container_id, bundle="/", metadata=metadata))
    except BaseException:
        child.process.kill()
        child.process.wait()
        raise
    finally:
        child.close()  # the daemon has its own copy now
    return RunningTarget(index, child.process)


def loop_program(nr: int, arg: int, until: str | Path, *, pause: float = 0.005,
                 ready: str | Path | None = None) -> list[str]:
    """argv of a Python program that calls ``syscall(nr, arg)`` every ``pause`` s until
    the file ``until`` exists (after at least one call), then prints ``{"calls": N,
    "values": [[answer, count], ...]}``: the answers in order, run-length encoded (a
    failed call as ``-errno``). It creates ``ready`` after its first answer."""
    code = (
        "import ctypes, json, os, time\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "libc.syscall.restype = ctypes.c_long\n"
        "libc.syscall.argtypes = [ctypes.c_long, ctypes.c_long]\n"
        "values, n = [], 0\n"
        f"until, ready, pause = {str(until)!r}, {str(ready) if ready else ''!r}, {pause!r}\n"
        "while not (n and os.path.exists(until)):\n"
        f"    rc = libc.syscall({nr}, {arg})\n"
        "    key = -ctypes.get_errno() if rc == -1 else rc\n"
        "    if values and values[-1][0] == key:\n"
        "        values[-1][1] += 1\n"
        "    else:\n"
        "        values.append([key, 1])\n"
        "    n += 1\n"
        "    if n == 1 and ready:\n"
        "        open(ready, 'w').close()\n"
        "    time.sleep(pause)\n"
        "print(json.dumps({'calls': n, 'values': values}), flush=True)\n"
    )
    return [sys.executable, "-c", code]


def wait_file(path: str | Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.005)


def hold_targets(hold: Path, count: int) -> None:
    """Make the ``count`` targets started with ``--hold HOLD`` stop between two calls,
    and wait until all have (none has a call in flight then)."""
    hold.touch()
    for i in range(count):
        wait_file(f"{hold}.held-{i}")


def release_targets(hold: Path, count: int) -> None:
    """Let targets held by :func:`hold_targets` call again (their markers go too, so a
    later hold waits for new ones)."""
    for i in range(count):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{hold}.held-{i}")
    hold.unlink()


def one_call_program(nr: int, arg: int) -> list[str]:
    """argv of a Python program that makes ``syscall(nr, arg)`` once and prints
    ``{"rc": ..., "errno": ..., "seconds": ...}``."""
    code = (
        "import ctypes, json, sys, time\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "libc.syscall.restype = ctypes.c_long\n"
        "libc.syscall.argtypes = [ctypes.c_long, ctypes.c_long]\n"
        "t = time.monotonic()\n"
        f"rc = libc.syscall({nr}, {arg})\n"
        "print(json.dumps({'rc': rc, 'errno': ctypes.get_errno() if rc == -1 else 0,"
        " 'seconds': time.monotonic() - t}), flush=True)\n"
    )
    return [sys.executable, "-c", code]


# --------------------------------------------------------------------------- the daemon


def config_text(tmp: Path, extra: str = "", *, policy: bool = True) -> str:
    """A config with the echo policy (written next to it) as the default chain."""
    text = ""
    if policy:
        (tmp / "echo.py").write_text(POLICY)
        text = f'[defaults]\npolicies = ["echo"]\n{extra}\n[[policy]]\nname = "echo"\n' \
               f'path = "{tmp}/echo.py"\n'
    else:
        text = extra
    return text


@dataclass
class DaemonProcess:
    """``seccomp-supervisor serve`` as a real process, configured in ``tmp``."""

    tmp: Path
    config: Path
    socket_path: str
    control_path: str
    log: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @classmethod
    def configure(cls, tmp: Path, text: str) -> DaemonProcess:
        from tests.daemon_harness import write_config

        config = write_config(tmp, text, metrics=True)
        return cls(tmp, config, str(tmp / "sock" / "notify.sock"),
                   str(tmp / "sock" / "control.sock"), tmp / "daemon.log")

    @property
    def process(self) -> subprocess.Popen[bytes]:
        return self.processes[-1]

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self, *args: str, wait: bool = True,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start one more ``serve`` (``--takeover`` for a restart); wait until it serves."""
        before = self.log_text().count("serving on")
        with open(self.log, "ab") as log, open(self.tmp / "audit.log", "ab") as audit:
            proc = subprocess.Popen([*CLI, "serve", "--config", str(self.config), *args],
                                    cwd=ROOT, stdout=audit, stderr=log, env=env)
        self.processes.append(proc)
        if wait:
            deadline = time.monotonic() + 30
            while self.log_text().count("serving on") <= before:
                if proc.poll() is not None:
                    raise AssertionError(f"serve exited with {proc.returncode}:\n"
                                         f"{self.log_text()[-3000:]}")
                if time.monotonic() > deadline:
                    raise AssertionError("serve did not start:\n" + self.log_text()[-3000:])
                time.sleep(0.01)
        return proc

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait_log(self, pattern: str, *, count: int = 1, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while len(re.findall(pattern, self.log_text())) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} ({count}x) in the log:\n"
                                     + self.log_text()[-3000:])
            time.sleep(0.01)

    def status(self) -> dict[str, Any]:
        from supervisor.control import request

        result, _ = request(self.control_path, "status")
        return result

    def wait_sessions(self, count: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while len(self.status()["sessions"]) != count:
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {count} sessions, have "
                                     f"{len(self.status()['sessions'])}")
            time.sleep(0.02)

    def metrics_url(self) -> str:
        found = re.findall(r"metrics on (http://\S+/metrics)", self.log_text())
        assert found, "the daemon logged no metrics address"
        return str(found[-1])

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """A real scrape of /metrics: (name, sorted labels) -> value."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(self.metrics_url(), timeout=10) as response:
            text = response.read().decode()
        values = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return values

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def fd_count(self, pid: int | None = None) -> int:
        """Open fds of the daemon, once transient ones (a control connection that is
        being closed, a metrics scrape) are gone: the least of a few readings."""
        readings = []
        for _ in range(5):
            readings.append(len(os.listdir(f"/proc/{pid or self.pid}/fd")))
            time.sleep(0.05)
        return min(readings)

    def rss_kib(self, pid: int | None = None) -> int:
        for line in Path(f"/proc/{pid or self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def stop(self) -> None:
        """SIGKILL whatever is still running (tests stop the daemon themselves)."""
        for proc in self.processes:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@contextlib.contextmanager
def daemon_process(tmp: Path, text: str) -> Iterator[DaemonProcess]:
    d = DaemonProcess.configure(tmp, text)
    try:
        yield d
    finally:
        d.stop()


# --------------------------------------------------------------------------- the soak


@dataclass
class SoakReport:
    targets: int
    calls: int
    notifications: int = 0
    lost: int = 0
    wrong: int = 0
    gone: float = 0.0
    handler_errors: float = 0.0
    fds: list[int] = field(default_factory=list)
    rss_kib: list[int] = field(default_factory=list)
    seconds: float = 0.0
    samples: list[str] = field(default_factory=list)

    def summary(self) -> str:
        rate = self.notifications / self.seconds if self.seconds else 0.0
        return (f"soak: {self.targets} targets x {self.calls} calls = {self.notifications} "
                f"notifications answered in {self.seconds:.1f} s ({rate:,.0f}/s); lost "
                f"{self.lost}, wrong {self.wrong}, gone {self.gone:g}, handler errors "
                f"{self.handler_errors:g}; daemon fds per wave {self.fds}, RSS KiB per "
                f"wave {self.rss_kib}")


def run_soak(tmp: Path, targets: int, calls: int, *, waves: int = 3,
             per_target_timeout: float = 600) -> SoakReport:
    """Run the soak against a fresh daemon process in ``tmp``."""
    report = SoakReport(targets, calls)
    per_wave = [calls // waves + (1 if i < calls % waves else 0) for i in range(waves)]
    with daemon_process(tmp, config_text(tmp)) as d:
        d.start()
        start = time.monotonic()
        for wave, n in enumerate(per_wave):
            running: list[RunningTarget] = []
            try:
                for index in range(targets):
                    running.append(start_target(d.socket_path, index, n))
                for t in running:
                    try:
                        result = t.result(per_target_timeout)
                    except subprocess.TimeoutExpired:
                        report.lost += n
                        continue
                    report.notifications += result["calls"]
                    report.lost += n - result["calls"]
                    report.wrong += result["wrong"]
                    report.samples.extend(result["samples"])
            finally:
                for t in running:
                    t.kill()
            d.wait_sessions(0, timeout=30)
            report.fds.append(d.fd_count())
            report.rss_kib.append(d.rss_kib())
            del wave
        report.seconds = time.monotonic() - start
        values = d.metrics()
        report.gone = sum(v for (name, _), v in values.items()
                          if name == "seccomp_supervisor_notifications_gone_total")
        report.handler_errors = sum(v for (name, _), v in values.items()
                                    if name == "seccomp_supervisor_handler_errors_total")
        d.signal(signal.SIGTERM)
        d.process.wait(30)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["target"]:
        print(json.dumps(target_main(args[1:])), flush=True)
        return 0
    import tempfile

    p = argparse.ArgumentParser(prog="python -m tests.soak",
                                description="Soak the daemon (see the module docstring).")
    p.add_argument("--targets", type=int, default=100)
    p.add_argument("--calls", type=int, default=20000, help="notifications per target")
    p.add_argument("--waves", type=int, default=4)
    a = p.parse_args(args)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        report = run_soak(Path(tmp), a.targets, a.calls, waves=a.waves)
    print(report.summary())
    for sample in report.samples[:10]:
        print("  wrong:", sample)
    ok = (report.lost == 0 and report.wrong == 0 and report.gone == 0
          and report.handler_errors == 0 and len(set(report.fds)) == 1)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["target"]:
        # Inside a filtered target: no package imports, nothing but the calls.
        print(json.dumps(target_main(sys.argv[2:])), flush=True)
        raise SystemExit(0)
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
