"""Emulated calls: what one call that a policy carries out on the caller's behalf
(``supervisor.emulate``) costs, as the caller sees it.

A forked child under a NOTIFY filter (``supervisor.testing``, the session code the daemon
uses) makes N calls one after the other, timing each with ``perf_counter_ns``; the rows
print p50 and p99 per call and the CPU time per call of this process tree: the session
(this process), the caller and the emulation (the children it reaped, and the emulation
helper with the children it reaped, when there is one). Rows:

- ``emulated mknod``: ``mknod`` of ``/dev/null`` (1:3) nodes, created by the ``devices``
  policy as the caller;
- ``enforced open``: ``open(O_WRONLY|O_CREAT)`` of new files, done by ``path_guard`` in
  ``mode = "enforce"`` as the caller and answered with the fd (ADDFD);
- ``fifo (CONTINUE)``: ``mknod`` of a FIFO, which ``devices`` lets the kernel run: the
  cost of the notification alone.

    .venv/bin/python bench/emulate.py [--calls 300] [--json FILE]

Needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from supervisor.testing import load, run_policy  # noqa: E402


def tree_ticks(pid: int) -> int:
    """utime + stime of ``pid`` and of the children it reaped, in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15])


def busy_jiffies() -> int:
    """CPU ticks of this process tree so far (see the module docstring)."""
    from supervisor import emulate

    total = tree_ticks(os.getpid())
    helper = getattr(emulate, "_helper", None)  # None: before the helper existed
    if helper is not None and helper.pid:
        total += tree_ticks(helper.pid)
    return total


def percentile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000.0


def make(kind: str, path: Path) -> None:
    if kind == "open":
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))
    elif kind == "chr":
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    else:
        os.mknod(path, stat.S_IFIFO | 0o666)


def row(name: str, kind: str, calls: int) -> dict[str, object]:
    where = Path(tempfile.mkdtemp(prefix="bench-emulate-", dir="/tmp"))
    try:
        def many() -> list[int]:
            times = []
            for i in range(calls):
                t0 = time.perf_counter_ns()
                make(kind, where / f"n{i}")
                times.append(time.perf_counter_ns() - t0)
            return times

        if kind == "open":
            (where / "guarded").mkdir()
            policy = load(ROOT / "policies" / "path_guard.py", mode="enforce",
                          prefixes=[str(where / "guarded")], emulation_rate=0.0)
        else:
            policy = load(ROOT / "policies" / "devices.py", emulation_rate=0.0)
        run_policy(policy, lambda: make(kind, where / "warm"))
        before = busy_jiffies()
        trial = run_policy(policy, many, timeout=600)
        jiffies = busy_jiffies() - before
        if trial.exception or not isinstance(trial.value, list):
            raise RuntimeError(f"{name}: {trial.exception or trial.value!r}")
        times: list[int] = trial.value
        return {"row": name, "calls": calls, "p50_us": percentile(times, 0.5),
                "p99_us": percentile(times, 0.99),
                "cpu_us_per_call": jiffies * 1e6 / os.sysconf("SC_CLK_TCK") / calls}
    finally:
        shutil.rmtree(where)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--json", help="write the rows to this file")
    args = ap.parse_args(argv)
    rows = [row("emulated mknod", "chr", args.calls),
            row("enforced open", "open", args.calls),
            row("fifo (CONTINUE)", "fifo", args.calls)]
    print(f"{'row':<18}{'calls':>7}{'p50 us':>10}{'p99 us':>10}{'CPU us/call':>13}")
    for r in rows:
        print(f"{r['row']:<18}{r['calls']:>7}{r['p50_us']:>10.0f}{r['p99_us']:>10.0f}"
              f"{r['cpu_us_per_call']:>13.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
