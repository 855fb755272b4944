#!/usr/bin/env python3
"""What the fd keeper (``seccomp-supervisor keep``) costs: start, memory, give-back.

    .venv/bin/python bench/keeper.py                 # 10 runs, 2000 names x 2 fds

Each run execs ``python -m supervisor keep --socket S --max-fds 4096`` and measures:

* ``start``: exec → the socket accepts an ``ATTACH`` (a daemon in the same pod waits
  for exactly this);
* ``rss idle``: the keeper's VmRSS holding nothing;
* ``store``: the time to send ``names`` ``FDSTORE=1`` datagrams of two fds each (an
  eventfd and a sealed state memfd of ~300 bytes, as a session stores its notify fd and
  state) and see them all held;
* ``rss full``: VmRSS holding them;
* ``attach``: a new daemon's :func:`supervisor.keeper.attach` receiving every fd back.

The keeper keeps fds as ints in a dict; what it holds does not depend on the kind of fd
(a seccomp listener is checked by one ``readlink``), so eventfds stand in for the
listeners of 2000 processes. Medians with min-max over the runs.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from supervisor.fdstore import write_state_memfd  # noqa: E402
from supervisor.keeper import KeeperError, attach  # noqa: E402
from supervisor.systemd import Notifier  # noqa: E402


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def one_run(tmp: Path, names: int) -> dict[str, float]:
    path = tmp / "k" / "keeper.sock"
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "supervisor", "--log-level", "warning",
                             "keep", "--socket", str(path), "--max-fds", "4096"], cwd=ROOT)
    try:
        while True:
            try:
                first = attach(str(path), timeout=1)
                break
            except KeeperError:
                time.sleep(0.0005)
        start = time.monotonic() - t0
        idle = rss_kib(proc.pid)
        base = fd_count(proc.pid)
        state = write_state_memfd(b"x" * 300)
        event = os.eventfd(0)
        notifier = Notifier(str(path))
        t1 = time.monotonic()
        for i in range(names):
            assert notifier.store_fds(f"name-{i:06d}", [event, state])
        while fd_count(proc.pid) < base + 2 * names:
            time.sleep(0.001)
        store = time.monotonic() - t1
        notifier.close()
        os.close(event)
        os.close(state)
        full = rss_kib(proc.pid)
        first.sock.close()
        while True:
            try:
                t2 = time.monotonic()
                second = attach(str(path), timeout=5)
                took = time.monotonic() - t2
                break
            except KeeperError:
                time.sleep(0.001)  # the first attachment's close not seen yet
        assert len(second.fds) == 2 * names, len(second.fds)
        for item in second.fds:
            os.close(item.fd)
        second.sock.close()
        return {"start": start * 1000, "rss idle": idle / 1024, "store": store * 1000,
                "rss full": full / 1024, "attach": took * 1000}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--names", type=int, default=2000)
    args = parser.parse_args()
    rows: list[dict[str, float]] = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(one_run(Path(tmp), args.names))
    units = {"start": "ms", "rss idle": "MiB", "store": "ms", "rss full": "MiB",
             "attach": "ms"}
    print(f"fd keeper, {args.runs} runs, {args.names} names x 2 fds")
    print("| measure | median | min-max |")
    print("|---|---|---|")
    for key, unit in units.items():
        values = [r[key] for r in rows]
        print(f"| {key} ({unit}) | {statistics.median(values):.1f} | "
              f"{min(values):.1f}-{max(values):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
