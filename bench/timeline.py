#!/usr/bin/env python3
"""Where one K=1 round trip's time goes, from the kernel's own trace: ``perf record``
of the scheduler's switches and wake-ups and of the daemon's and the target's system
calls, for the timed phase of a ``bench/run.py`` row, then one line per round trip.

    .venv/bin/python bench/timeline.py --sup default --sup "C blk sw" --calls 4000
    .venv/bin/python bench/timeline.py --sup default --keep /tmp/tl   # + perf script text

A round trip is the target's ``getppid`` from its entry to its exit. Between them, in
order, the trace shows: the target switched out (its notification queued), the
supervisor thread switched in (woken from a sleep, or resumed after a preemption), the
supervisor's system calls up to its SEND, the target woken by the SEND (on which CPU),
the supervisor switched out, the target switched in. The table gives the median and
the 10th/90th percentiles of each segment and counts per round trip: the supervisor's
system calls by kind, how it left the CPU (preempted or asleep), and how many round
trips found it asleep in the event loop's own ``epoll_wait`` (trio's, not the
poller's).

Tracing costs time (each event is written to perf's buffer): the absolute figures are
higher than bench/run.py's, the comparison between rows in one run is what counts.
Needs root and perf with the sched and raw_syscalls tracepoints.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import perfrow  # noqa: E402 - bench/perfrow.py: the perf control fifo
import run  # noqa: E402 - bench/run.py, next to this file

NR_GETPPID = 110  # x86_64
# The target's call in each row: getppid (the default rows), openat and mkdirat (the
# memory-reading rows); the trace says which one a row's target makes.
CALL_NRS = (NR_GETPPID, 257, 258)
NR_PROCESS_VM_READV = 310
NR_IOCTL = 16
NR_EPOLL_WAIT = 232
NR_EPOLL_PWAIT = 281
NR_EPOLL_CTL = 233
RECV = 0xC0502100
SEND = 0xC0182101
EVENTS = ("sched:sched_switch", "sched:sched_wakeup", "raw_syscalls:sys_enter",
          "raw_syscalls:sys_exit")


@dataclass
class Event:
    time: float  # seconds
    cpu: int
    tid: int
    name: str  # switch, wakeup, enter, exit
    nr: int = -1
    args: tuple[int, ...] = ()
    ret: int = 0
    prev: int = 0  # switch: the task leaving
    prev_state: str = ""
    next: int = 0  # switch: the task coming in
    woken: int = 0  # wakeup: the task woken
    target_cpu: int = -1


_SWITCH = re.compile(r"prev_comm=.* prev_pid=(\d+) prev_prio=\d+ prev_state=(\S+) ==> "
                     r"next_comm=.* next_pid=(\d+)")
_WAKEUP = re.compile(r"comm=.* pid=(\d+) prio=\d+ target_cpu=(\d+)")
_ENTER = re.compile(r"NR (\d+) \(([0-9a-f, ]*)\)")
_EXIT = re.compile(r"NR (-?\d+) = (-?\d+)")
_LINE = re.compile(r"^\s*(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+(\S+):\s*(.*)$")


def parse(text: str) -> list[Event]:
    events = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        tid, cpu, t, name, rest = int(m[1]), int(m[2]), float(m[3]), m[4], m[5]
        if name == "sched:sched_switch":
            s = _SWITCH.search(rest)
            if s:
                events.append(Event(t, cpu, tid, "switch", prev=int(s[1]),
                                    prev_state=s[2], next=int(s[3])))
        elif name == "sched:sched_wakeup":
            w = _WAKEUP.search(rest)
            if w:
                events.append(Event(t, cpu, tid, "wakeup", woken=int(w[1]),
                                    target_cpu=int(w[2])))
        elif name == "raw_syscalls:sys_enter":
            e = _ENTER.search(rest)
            if e:
                args = tuple(int(a, 16) for a in e[2].split(",") if a.strip())
                events.append(Event(t, cpu, tid, "enter", nr=int(e[1]), args=args))
        elif name == "raw_syscalls:sys_exit":
            x = _EXIT.search(rest)
            if x:
                events.append(Event(t, cpu, tid, "exit", nr=int(x[1]), ret=int(x[2])))
    events.sort(key=lambda e: e.time)
    return events


@dataclass
class Trip:
    """One cycle: from the target's call's exit to its next one."""

    segments: dict[str, float] = field(default_factory=dict)  # microseconds
    counts: Counter[str] = field(default_factory=Counter)
    pattern: str = ""  # the supervisor's steps, in order


def syscall_kind(e: Event, poller_epfd: int | None) -> str:
    if e.nr == NR_IOCTL and len(e.args) > 1:
        return {RECV: "RECV", SEND: "SEND"}.get(e.args[1], "ioctl")
    if e.nr in (NR_EPOLL_WAIT, NR_EPOLL_PWAIT):
        if poller_epfd is None:
            return "epoll_wait"
        return "epoll(poller)" if e.args and e.args[0] == poller_epfd else "epoll(trio)"
    if e.nr == NR_EPOLL_CTL:
        return "epoll_ctl"
    return f"nr{e.nr}"


SEGMENTS = (
    # name, from mark, to mark; the marks of every cycle first
    ("target: exit -> switched out (its user time, entry, the notification)", "start", "t_out"),
    ("switch: target out -> supervisor in", "t_out", "d_in"),
    ("supervisor: in -> RECV exit", "d_in", "recv_exit"),
    ("supervisor: RECV exit -> SEND entry (the decision)", "recv_exit", "send_enter"),
    ("SEND", "send_enter", "send_exit"),
    ("supervisor: SEND exit -> switched out", "send_exit", "d_out"),
    ("switch: supervisor out -> target in", "d_out", "t_in"),
    ("target: in -> exit", "t_in", "end"),
    ("cycle (exit to exit)", "start", "end"),
    ("round trip seen by the target, less its user time (switched out -> exit)", "t_out", "end"),
    # where the supervisor RECVs in the cycle (not when it slept in RECV: C blk sw)
    ("  of which: in -> first syscall (what was left of the last call)", "d_in", "first"),
    ("  of which: first syscall -> RECV entry (epoll_wait(0), the round)", "first",
     "recv_enter"),
    ("  of which: RECV", "recv_enter", "recv_exit"),
)
REQUIRED = ("t_out", "d_in", "recv_exit", "send_enter", "send_exit", "d_out", "t_in")


def analyse(events: list[Event], target: int, daemon: int, call: int = NR_GETPPID,
            reader: int = -1) -> list[Trip]:
    """One Trip per cycle of the target between two exits of its ``call``. The steps of
    the daemon's reading thread ``reader`` (if any) are shown with an ``R`` prefix."""
    # The poller's epoll fd: the one epoll_wait is called on with timeout 0, 32 events.
    epfds = Counter(e.args[0] for e in events
                    if e.tid == daemon and e.name == "enter" and e.nr == NR_EPOLL_WAIT
                    and len(e.args) >= 4 and e.args[2] == 32 and e.args[3] == 0)
    poller_epfd = epfds.most_common(1)[0][0] if epfds else None
    exits = [i for i, e in enumerate(events)
             if e.tid == target and e.name == "exit" and e.nr == call]
    trips = []
    last_call = ""  # the supervisor's last system call entered, across cycles
    for a, b in itertools.pairwise(exits):
        span = events[a:b + 1]
        trip = Trip()
        marks: dict[str, float] = {"start": span[0].time, "end": span[-1].time}
        steps: list[str] = []
        daemon_cpu = target_cpu = -1
        for ev in span[1:-1]:
            if ev.name == "switch":
                # One switch is two steps: who leaves the CPU, then who comes in.
                if ev.prev == target:
                    marks.setdefault("t_out", ev.time)
                    target_cpu = ev.cpu
                    steps.append("T sleeps")
                elif ev.prev == daemon:
                    if "send_exit" in marks:
                        marks.setdefault("d_out", ev.time)
                    steps.append("S out " + ("(preempted)" if ev.prev_state.startswith("R")
                                             else "(sleeps)"))
                if ev.next == daemon:
                    if "t_out" in marks:
                        marks.setdefault("d_in", ev.time)
                    daemon_cpu = ev.cpu
                    steps.append("S in" + ("" if ev.cpu == target_cpu else " (other CPU)"))
                elif ev.next == target:
                    if "send_exit" in marks:
                        marks.setdefault("t_in", ev.time)
                    steps.append("T in" + ("" if ev.cpu == daemon_cpu else " (other CPU)"))
                elif ev.next == reader:
                    steps.append("R in")
                elif ev.next != 0 and ev.cpu in (daemon_cpu, target_cpu):
                    steps.append("other task in")
                if ev.prev == reader:
                    steps.append("R out " + ("(preempted)" if ev.prev_state.startswith("R")
                                             else "(sleeps)"))
            elif ev.name == "wakeup" and ev.woken == daemon:
                steps.append("S woken" + ("" if ev.target_cpu == target_cpu or target_cpu < 0
                                          else " (other CPU)"))
            elif ev.name == "wakeup" and ev.woken == target:
                steps.append("T woken" + ("" if ev.target_cpu == daemon_cpu
                                          else " (other CPU)"))
            elif ev.name == "wakeup" and ev.woken == reader:
                steps.append("R woken")
            elif ev.tid == reader and ev.name == "enter":
                steps.append("R " + ("readv" if ev.nr == NR_PROCESS_VM_READV
                                     else syscall_kind(ev, poller_epfd)))
            elif ev.tid == daemon and ev.name == "enter":
                kind = last_call = syscall_kind(ev, poller_epfd)
                steps.append(kind)
                if "d_in" in marks and "send_enter" not in marks:
                    marks.setdefault("first", ev.time)
                    if kind == "RECV":
                        marks.setdefault("recv_enter", ev.time)
                if kind == "SEND" and "recv_exit" in marks:
                    marks.setdefault("send_enter", ev.time)
            elif ev.tid == daemon and ev.name == "exit":
                # A RECV may have been entered in the last cycle (a loop asleep in it).
                if last_call == "RECV" and "d_in" in marks and "recv_exit" not in marks:
                    marks["recv_exit"] = ev.time
                    if "recv_enter" not in marks:
                        marks.pop("first", None)  # the cycle began asleep in RECV
                elif last_call == "SEND" and "send_enter" in marks:
                    marks.setdefault("send_exit", ev.time)
        trip.pattern = " | ".join(steps)
        trip.counts["complete"] = all(k in marks for k in REQUIRED)
        for name, frm, to in SEGMENTS:
            if frm in marks and to in marks and marks[to] >= marks[frm]:
                trip.segments[name] = (marks[to] - marks[frm]) * 1e6
        trips.append(trip)
    return trips


def who(events: list[Event]) -> tuple[int, int, int, int]:
    """The target (the thread whose call returns), the supervisor thread (the one that
    SENDs), the target's call and the daemon's reading thread (the one that calls
    process_vm_readv, -1 if none does), from the trace itself."""
    calls = Counter((e.tid, e.nr) for e in events if e.name == "exit" and e.nr in CALL_NRS)
    (target, call), _ = calls.most_common(1)[0]
    daemon = Counter(e.tid for e in events if e.name == "enter" and e.nr == NR_IOCTL
                     and len(e.args) > 1 and e.args[1] == SEND)
    readers = Counter(e.tid for e in events
                      if e.name == "enter" and e.nr == NR_PROCESS_VM_READV)
    reader = readers.most_common(1)[0][0] if readers else -1
    return target, daemon.most_common(1)[0][0], call, reader


def report(name: str, trips: list[Trip]) -> str:
    done = [t for t in trips if t.counts["complete"]]
    lines = [f"## {name}: {len(trips)} cycles, {len(done)} with every mark"]
    if not done:
        return "\n".join(lines)
    lines.append("| segment | p10 µs | **p50 µs** | p90 µs | mean µs |")
    lines.append("|---|---|---|---|---|")
    for key, _, _ in SEGMENTS:
        vals = sorted(t.segments[key] for t in done if key in t.segments)
        if not vals:
            continue
        q = statistics.quantiles(vals, n=10) if len(vals) >= 10 else [vals[0]] * 9
        lines.append(f"| {key} | {q[0]:.2f} | **{statistics.median(vals):.2f}** | "
                     f"{q[8]:.2f} | {statistics.fmean(vals):.2f} |")
    patterns = Counter(t.pattern for t in trips)
    lines.append("")
    lines.append("| share | the cycle's steps (T target, S supervisor thread) |")
    lines.append("|---|---|")
    for pattern, count in patterns.most_common(8):
        lines.append(f"| {count / len(trips):.3f} | {pattern} |")
    return "\n".join(lines)


def children_running(binary: Path) -> list[int]:
    me = os.getpid()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid == me and os.readlink(f"/proc/{entry}/exe") == str(binary):
                pids.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return pids


def trace_row(sup: run.Supervisor, calls: int, opts: run.Options, tmp: Path,
              keep: Path | None) -> tuple[str, list[Trip]]:
    perfs: list[perfrow._Perf] = []
    real_cpu_ns = run.cpu_ns
    data = tmp / "timeline.data"

    def cpu_ns(pid: int) -> int:  # run_row reads it just before "go" and after "done"
        if not perfs:
            targets = children_running(opts.target)
            assert len(targets) == 1, targets
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
            who = " || ".join(f"common_pid == {t}" for t in (*tids, targets[0]))
            argv = ["record", "-a", "-m", "8192", "-o", str(data)]
            for ev in EVENTS:
                argv += ["-e", ev]
                if ev.startswith("raw_syscalls"):
                    argv += ["--filter", who]
            perfs.append(perfrow._Perf(argv, tmp, "timeline"))
            time.sleep(0.5)
            perfs[0].enable()
        else:
            perfs[0].disable()
        return real_cpu_ns(pid)

    run.cpu_ns = cpu_ns
    try:
        sample = run.run_row(sup, 1, calls, opts, tmp)
    finally:
        run.cpu_ns = real_cpu_ns
        for p in perfs:
            p.finish()
    text = subprocess.run(
        ["perf", "script", "--ns", "-i", str(data), "-F", "tid,cpu,time,event,trace"],
        capture_output=True, text=True, check=True).stdout
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        (keep / f"{sup.name.replace(' ', '_').replace('/', '@')}.txt").write_text(text)
    events = parse(text)
    trips = analyse(events, *who(events))
    p50 = statistics.median(sample.latencies) / 1e3 if sample.latencies else float("nan")
    return f"(target's own p50 under tracing: {p50:.1f} µs)", trips


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sup", action="append", help="run.py row name (repeatable)")
    ap.add_argument("--calls", type=int, default=4000)
    ap.add_argument("--tree", help="take the daemon from this checkout")
    ap.add_argument("--compare", metavar="DIR",
                    help="also trace each daemon row with the package of DIR (NAME@before)")
    ap.add_argument("--env", action="append", default=[], help="VAR=VALUE for the daemon")
    ap.add_argument("--keep", help="keep perf script's text in DIR")
    ap.add_argument("--again", metavar="DIR",
                    help="analyse the text kept in DIR (--keep) again, run nothing")
    ap.add_argument("--out", default=os.environ.get(
        "BENCH_OUT", os.path.join(tempfile.gettempdir(), "seccomp-supervisor-bench")))
    args = ap.parse_args()
    if args.again:
        for path in sorted(Path(args.again).glob("*.txt")):
            events = parse(path.read_text())
            name = path.stem.replace("_", " ").replace("@", "/")
            print(report(name, analyse(events, *who(events))))
            print()
        return 0
    target, mem, reference = run.build(Path(args.out))
    env = tuple(tuple(e.split("=", 1)) for e in args.env)
    opts = run.Options(target, mem, reference, "none", sys.executable, 300.0)
    keep = Path(args.keep) if args.keep else None
    with tempfile.TemporaryDirectory(prefix="timeline-", dir="/dev/shm") as d:
        sups = []
        rows = [*run.SUPERVISORS, *run.mem_supervisors(run.MEM_CALLS, run.MEM_LENGTHS)]
        for name in args.sup or ["default", "C blk sw"]:
            sup = next(s for s in rows if s.name == name)
            if sup.kind == "ours":
                sup = replace(sup, env=env, tree=args.tree or sup.tree)
                if args.compare:
                    sups.append(replace(sup, name=f"{name}@before",
                                        tree=str(Path(args.compare).resolve())))
            sups.append(sup)
        for sup in sups:
            note, trips = trace_row(sup, args.calls, opts, Path(d), keep)
            print(report(sup.name, trips))
            print(note)
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
