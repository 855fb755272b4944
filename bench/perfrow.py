#!/usr/bin/env python3
"""What one notification costs the daemon, counted by the kernel: ``perf stat`` (and
optionally ``perf record``) attached to the supervisor of a ``bench/run.py`` row for
exactly its timed phase, divided by the calls of the row.

    .venv/bin/python bench/perfrow.py --sup sync --k 100,1000
    .venv/bin/python bench/perfrow.py --sup "C epoll" --k 100,1000 --repeat 3
    .venv/bin/python bench/perfrow.py --sup sync --k 1000 --record /tmp/rec  # perf.data

Software events and tracepoints only (task-clock, context switches, migrations, page
faults, the daemon's system calls by kind, the scheduler's wake-ups): a VM without a
PMU has no cycles or cache-miss counters. ``--record DIR`` samples the daemon's stacks
(``perf record -g``, the interpreter started with ``-X perf`` so Python frames have
names); read them with ``perf report -i DIR/<row>.data``.

Per row: calls/s, the daemon's CPU µs per call (task-clock) and its user share
(utime/stime ticks), then per call: context switches and migrations of the daemon,
``epoll_wait`` calls, ioctls (RECV + SEND: 2 per call), all system calls, and
machine-wide context switches and wake-ups (the targets' side; other load on the
machine counts too).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import run  # noqa: E402 - bench/run.py, next to this file

DAEMON_EVENTS = ("task-clock", "context-switches", "cpu-migrations", "page-faults",
                 "syscalls:sys_enter_epoll_wait", "syscalls:sys_enter_ioctl",
                 "raw_syscalls:sys_enter", "ipi:ipi_send_cpu")
MACHINE_EVENTS = ("context-switches", "sched:sched_wakeup", "sched:sched_wake_idle_without_ipi",
                  "irq_vectors:reschedule_entry", "irq_vectors:call_function_single_entry")


class _Perf:
    """A perf process started disabled (-D -1) and switched on and off through its
    control fifo, so it counts exactly between enable() and disable()."""

    def __init__(self, argv: list[str], tmp: Path, name: str) -> None:
        self.ctl = tmp / f"{name}.ctl"
        self.ack = tmp / f"{name}.ack"
        for fifo in (self.ctl, self.ack):
            if fifo.exists():
                fifo.unlink()
            os.mkfifo(fifo)
        self.out = tmp / f"{name}.out"
        self.proc = subprocess.Popen(
            ["perf", *argv[:1], "-D", "-1", "--control", f"fifo:{self.ctl},{self.ack}",
             *argv[1:]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.ctl_fd = os.open(self.ctl, os.O_WRONLY | os.O_CLOEXEC)
        self.ack_fd = os.open(self.ack, os.O_RDONLY | os.O_CLOEXEC)

    def _command(self, word: str) -> None:
        os.write(self.ctl_fd, word.encode() + b"\n")
        os.read(self.ack_fd, 16)

    def enable(self) -> None:
        self._command("enable")

    def disable(self) -> None:
        self._command("disable")

    def finish(self) -> None:
        for fd in (self.ctl_fd, self.ack_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=60)


def stat_counts(path: Path) -> dict[str, float]:
    counts: dict[str, float] = {}
    for line in path.read_text().splitlines():
        fields = line.split(",")
        if len(fields) < 3 or line.startswith("#"):
            continue
        try:
            counts[fields[2]] = float(fields[0])
        except ValueError:
            counts[fields[2]] = float("nan")  # <not counted>
    return counts


def measure(sup: run.Supervisor, k: int, calls: int, opts: run.Options, tmp: Path,
            record: Path | None, pin: bool = False) -> dict[str, float]:
    """One row with perf attached for its timed phase; the counts per call."""
    perfs: list[_Perf] = []
    state = {"calls": 0}
    real_cpu_ns = run.cpu_ns

    def cpu_ns(pid: int) -> int:  # run_row reads it just before "go" and after "done"
        if not perfs:
            if pin:  # the daemon alone on CPU 0, the targets (and we) on the others
                for tid in os.listdir(f"/proc/{pid}/task"):
                    os.sched_setaffinity(int(tid), {0})
            perfs.append(_Perf(["stat", "-x,", "-e", ",".join(DAEMON_EVENTS), "-p", str(pid),
                                "-o", str(tmp / "daemon.out")], tmp, "daemon"))
            perfs.append(_Perf(["stat", "-x,", "-a", "-e", ",".join(MACHINE_EVENTS),
                                "-o", str(tmp / "machine.out")], tmp, "machine"))
            if record is not None:
                record.mkdir(parents=True, exist_ok=True)
                data = record / f"{sup.name.replace(' ', '_').replace('/', '_')}-k{k}.data"
                perfs.append(_Perf(["record", "-F", "2999", "-g", "-p", str(pid), "-o",
                                    str(data)], tmp, "record"))
            time.sleep(0.5)  # perf attached (the ack below only says the fifo was read)
            for p in perfs:
                p.enable()
        else:
            for p in perfs:
                p.disable()
        return real_cpu_ns(pid)

    run.cpu_ns = cpu_ns
    try:
        sample = run.run_row(sup, k, calls, opts, tmp)
    finally:
        run.cpu_ns = real_cpu_ns
        for p in perfs:
            p.finish()
    if os.environ.get("PERFROW_DEBUG"):
        print((tmp / "daemon.out").read_text(), (tmp / "machine.out").read_text())
    daemon = stat_counts(tmp / "daemon.out")
    machine = stat_counts(tmp / "machine.out")
    n = len(sample.latencies)
    state["calls"] = n
    return {
        "calls/s": n / sample.wall,
        "cpu us": daemon.get("task-clock", float("nan")) * 1e3 / n,  # msec -> us
        "sched us": sample.cpu_ns / 1e3 / n,
        "user%": 100 * (1 - sample.sys_ticks / sample.cpu_ticks) if sample.cpu_ticks else 0,
        "cs": daemon.get("context-switches", 0) / n,
        "migr": daemon.get("cpu-migrations", 0) / n,
        "faults": daemon.get("page-faults", 0) / n,
        "epoll": daemon.get("syscalls:sys_enter_epoll_wait", 0) / n,
        "ioctl": daemon.get("syscalls:sys_enter_ioctl", 0) / n,
        "syscalls": daemon.get("raw_syscalls:sys_enter", 0) / n,
        "all cs": machine.get("context-switches", 0) / n,
        "wakeups": machine.get("sched:sched_wakeup", 0) / n,
        "ipi sent": daemon.get("ipi:ipi_send_cpu", 0) / n,
        "idle wake": machine.get("sched:sched_wake_idle_without_ipi", 0) / n,
        "resched": machine.get("irq_vectors:reschedule_entry", 0) / n,
        "fn irq": machine.get("irq_vectors:call_function_single_entry", 0) / n,
        "wrong": sample.wrong,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sup", action="append", help="run.py row name (repeatable; "
                    "memory-reading rows too); default: sync and C epoll")
    ap.add_argument("--k", default="100,1000")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=1, help="median of N")
    ap.add_argument("--tree", help="take the daemon from this checkout (a before tree)")
    ap.add_argument("--compare", metavar="DIR",
                    help="also run each daemon row with the package of DIR (NAME@before)")
    ap.add_argument("--env", action="append", default=[], help="VAR=VALUE for the daemon")
    ap.add_argument("--record", help="also perf record -g into DIR")
    ap.add_argument("--reference", help="the C rows run this sup_c binary instead")
    ap.add_argument("--audit", default="none")
    ap.add_argument("--pin", action="store_true",
                    help="experiment: the daemon alone on CPU 0 for the timed phase, the "
                         "targets on the other CPUs (no target runs on the daemon's CPU)")
    ap.add_argument("--out", default=os.environ.get(
        "BENCH_OUT", os.path.join(tempfile.gettempdir(), "seccomp-supervisor-bench")))
    args = ap.parse_args()
    target, mem, reference = run.build(Path(args.out))
    if args.reference:
        reference = Path(args.reference)
    names = args.sup or ["C epoll", "sync"]
    env = tuple(tuple(e.split("=", 1)) for e in args.env)
    sups = []
    for name in names:
        base = next(s for s in (*run.SUPERVISORS,
                                *run.mem_supervisors(run.MEM_CALLS, run.MEM_LENGTHS))
                    if s.name == name)
        if base.kind == "ours":
            base = replace(base, env=env, tree=args.tree or base.tree)
        sups.append(base)
        if args.compare and base.kind == "ours":
            sups.append(replace(base, name=f"{name}@before",
                                tree=str(Path(args.compare).resolve())))
    python = sys.executable
    opts = run.Options(target, mem, reference, args.audit, python, 300.0)
    record = Path(args.record) if args.record else None
    if record is not None:
        os.environ["PYTHONPERFSUPPORT"] = "1"  # named Python frames in perf's stacks
    ks = [int(x) for x in args.k.split(",")]
    if args.pin:
        os.sched_setaffinity(0, set(range(1, os.cpu_count() or 2)))
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="perfrow-", dir="/dev/shm") as d:
        tmp = Path(d)
        for _ in range(args.repeat):
            for k in ks:
                for s in sups:
                    calls = int(run.DEFAULT_CALLS.get(k, 100_000) * args.scale
                                * s.calls_share)
                    results.setdefault((s.name, k), []).append(
                        measure(s, k, calls, opts, tmp, record, args.pin))
    columns = list(next(iter(results.values()))[0])
    print(f"{'row':<14} {'K':>5} " + " ".join(f"{c:>9}" for c in columns))
    for (name, k), got in results.items():
        med = {c: statistics.median(r[c] for r in got) for c in columns}
        print(f"{name:<14} {k:>5} " + " ".join(
            f"{med[c]:>9.0f}" if c == "calls/s" else f"{med[c]:>9.2f}" for c in columns))
    if args.repeat > 1:
        print("spread (min / median / max):")
        for (name, k), got in results.items():
            print(f"{name:<14} {k:>5} " + "   ".join(
                f"{c} " + " / ".join(f"{v:.0f}" if c == "calls/s" else f"{v:.2f}"
                                     for v in (min(r[c] for r in got),
                                               statistics.median(r[c] for r in got),
                                               max(r[c] for r in got)))
                for c in ("calls/s", "cpu us", "user%")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
