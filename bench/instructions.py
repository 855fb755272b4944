#!/usr/bin/env python3
"""Instructions per notification of the real daemon, counted by callgrind.

    .venv/bin/python bench/instructions.py                  # K=1, sync policy
    .venv/bin/python bench/instructions.py --k 100 --sup async
    .venv/bin/python bench/instructions.py --tree /tmp/old  # another copy of the package

Runs one ``bench/run.py`` row twice, with the daemon under ``valgrind --tool=callgrind``,
at two call counts, and prints the difference of the two instruction totals divided by
the difference of the calls: what one more notification costs in user space (the
interpreter, the ioctl and epoll calls' C code, libc), with start-up and shutdown
cancelled out. Unlike times on a shared VM, the count barely moves from run to run
(a few hundred instructions), so it shows changes of 1-2%. Kernel time is not in it.

valgrind does not know seccomp(2), so the daemon's start-up check of the kernel's struct
sizes would fail under it; a ``sitecustomize`` in a temporary directory answers that
check with our own sizes (only in the daemon started here). ``--keep DIR`` keeps both
callgrind files for ``callgrind_annotate``. ``--threads`` also prints each thread's share
(1: the event loop's; the reading thread of the memory-reading rows is started later).
Under callgrind the daemon runs ~50 times slower while the audit's rate limit counts per
second, so in rows that deny every call more of them write an audit line than in a
timed run (``format_audit_line`` then shows up in the count).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent

SITECUSTOMIZE = """\
# Written by bench/instructions.py: valgrind does not know seccomp(2).
import supervisor.abi as _abi
import supervisor.bpf as _bpf
_bpf.notif_sizes = lambda: (_abi.NOTIF_SIZE, _abi.NOTIF_RESP_SIZE, _abi.SECCOMP_DATA_SIZE)
"""

WRAPPER = """\
#!/bin/sh
export PYTHONPATH="$PYTHONPATH:{site}"
exec valgrind --tool=callgrind {extra}--callgrind-out-file={out}/callgrind.%p {python} "$@"
"""


def mem_args(sup: str) -> list[str]:
    """run.py's options that make the memory-reading row ``sup`` (e.g. 'guard openat/16')
    exist, and no other memory-reading or emulated row."""
    call, _, length = sup.partition(" ")[2].partition("/")
    if not sup.startswith("guard ") or not length.isdigit():
        return ["--mem-lengths", "", "--emulate-calls", "0"]
    return ["--mem-calls", call, "--mem-lengths", length, "--emulate-calls", "0"]


def count(run_py: Path, k: int, sup: str, scale: float, wrapper: Path, out: Path
          ) -> dict[str, dict[str, int]]:
    """The callgrind totals of one row's daemon, by event (Ir; with the cache
    simulation also D1mr, DLmr...): under "all", and with ``--threads`` (callgrind's
    ``--separate-threads=yes``, one file per thread) also under each thread's number
    (1 is the event loop's)."""
    for old in out.glob("callgrind.*"):
        old.unlink()
    done = subprocess.run(
        [sys.executable, str(run_py), "--k", str(k), "--only", sup, "--rounds", "1",
         *mem_args(sup),
         "--scale", str(scale), "--python", str(wrapper), "--timeout", "900",
         "--no-reference"],
        capture_output=True, text=True)
    # With --separate-threads, callgrind.PID is left empty beside callgrind.PID-NN.
    files = [f for f in out.glob("callgrind.*") if f.stat().st_size > 0]
    threads = any("-" in f.name for f in files)
    if done.returncode != 0 or not files or (len(files) != 1 and not threads) \
            or "FAILED" in done.stdout:
        sys.exit(f"bench row failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    totals: dict[str, dict[str, int]] = {"all": {}}
    for file in sorted(files):
        text = file.read_text(errors="replace")
        events = re.search(r"^events: (.+)$", text, re.M)
        match = re.search(r"^(?:summary|totals): ([\d ]+)$", text, re.M)
        if match is None or events is None:
            sys.exit(f"no events or summary line in {file}")
        found = dict(zip(events.group(1).split(), (int(x) for x in match.group(1).split()),
                         strict=True))
        totals[file.name.rpartition("-")[2].lstrip("0") if threads else "all"] = found
        if threads:
            for event, value in found.items():
                totals["all"][event] = totals["all"].get(event, 0) + value
    return totals


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=1, help="concurrent targets")
    ap.add_argument("--sup", default="sync",
                    help="the row: sync, async, default, or a memory-reading row such as "
                         "'guard mkdirat/256'")
    ap.add_argument("--tree", help="directory holding the supervisor package (and bench/)")
    ap.add_argument("--python", default=sys.executable, help="interpreter of the daemon")
    ap.add_argument("--keep", metavar="DIR", help="keep the two callgrind files here")
    ap.add_argument("--threads", action="store_true",
                    help="also count each thread of the daemon on its own (callgrind's "
                         "--separate-threads=yes): 1 is the event loop's")
    ap.add_argument("--cache-sim", action="store_true",
                    help="also simulate the caches (--cache-sim=yes, this CPU's L1 and "
                         "last level): misses per notification")
    ap.add_argument("--ll", metavar="SIZE,ASSOC,LINE",
                    help="with --cache-sim: simulate this last-level cache instead, e.g. "
                         "524288,8,64 for a 512 KiB L2 (callgrind models two levels only)")
    args = ap.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (apt-get install valgrind)")
    run_py = (Path(args.tree).resolve() / "bench" if args.tree else BENCH) / "run.py"
    # run.py's row sizes: DEFAULT_CALLS[k] * scale calls, split over the k targets.
    small, large = 0.05, 0.25
    with tempfile.TemporaryDirectory(prefix="ssbench-cg-") as tmp:
        tmpdir = Path(tmp)
        site = tmpdir / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
        wrapper = tmpdir / "python"
        extra = "--separate-threads=yes " if args.threads else ""
        if args.cache_sim:
            extra += "--cache-sim=yes " + (f"--LL={args.ll} " if args.ll else "")
        wrapper.write_text(WRAPPER.format(site=site, out=tmpdir, python=args.python,
                                          extra=extra))
        wrapper.chmod(0o755)
        sys.path.insert(0, str(run_py.parent))
        from run import DEFAULT_CALLS, MEM_CALLS, MEM_LENGTHS, SUPERVISORS, mem_supervisors

        share = {s.name: s.calls_share for s in
                 (*SUPERVISORS, *mem_supervisors(MEM_CALLS, MEM_LENGTHS))}.get(args.sup, 1.0)
        calls = {scale: int(int(DEFAULT_CALLS.get(args.k, 100_000) * scale) * share)
                 // args.k * args.k for scale in (small, large)}
        totals: dict[float, dict[str, dict[str, int]]] = {}
        for scale in (small, large):
            totals[scale] = count(run_py, args.k, args.sup, scale, wrapper, tmpdir)
            if args.keep:
                os.makedirs(args.keep, exist_ok=True)
                for f in tmpdir.glob("callgrind.*"):
                    if f.stat().st_size > 0:  # (callgrind.PID-NN: a thread's)
                        thread = f.name.partition("-")[2]
                        name = f"callgrind{'-' + thread if thread else ''}"
                        shutil.copy(f, Path(args.keep) / f"{name}.{calls[scale]}-calls")

    def per_call(event: str, thread: str = "all") -> float:
        return float((totals[large].get(thread, {}).get(event, 0)
                      - totals[small].get(thread, {}).get(event, 0))
                     / (calls[large] - calls[small]))

    print(f"{args.sup} K={args.k}: {per_call('Ir'):,.0f} instructions per notification "
          f"({calls[small]} and {calls[large]} calls: {totals[small]['all']['Ir']:,} and "
          f"{totals[large]['all']['Ir']:,})")
    if args.threads:
        numbers = sorted((t for t in totals[large] if t != "all"), key=int)
        print("  by thread: " + ", ".join(
            f"{t}: {per_call('Ir', t):,.0f}" for t in numbers))
    if args.cache_sim:
        print("  per notification: " + ", ".join(
            f"{event} {per_call(event):,.1f}" for event in totals[large]["all"]
            if event != "Ir"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
