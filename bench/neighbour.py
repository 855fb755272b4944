#!/usr/bin/env python3
"""Benchmark: what one container's flood costs another container (its neighbour).

    .venv/bin/python bench/neighbour.py                    # every flood kind, 3 rounds
    .venv/bin/python bench/neighbour.py --kinds async,slow --rounds 5
    .venv/bin/python bench/neighbour.py --neighbour mkdir  # the neighbour reads memory too
    .venv/bin/python bench/neighbour.py --compare old=/path/to/checkout

A fresh ``seccomp-supervisor serve`` per kind and round, with the chain
``[path_guard (prefixes = ["/guarded"]), bench/policies/sync_deny.py]``. Two containers
are handed to it the way runc does:

* ``--flooders`` **flooders** (``bench/flood.c``), each THREADS threads making notified
  calls as fast as they are answered, of one kind:

  - ``sync``: getppid, denied by a plain-function handler (inline);
  - ``async``: mkdir("/guarded/flood"): path_guard reads the path from the flooder's
    memory in a worker thread (race-checked) and denies it;
  - ``parked``: the same with more threads than ``max_inflight``, so notifications wait
    for a slot;
  - ``slow``: the same with each path on a userfaultfd page that the flooder serves only
    after ``--delay`` (every read of its memory takes that long);
  - ``compute``: getppid as ``sync``, then ``--delay`` of CPU-bound work before the
    next call (a container that computes between calls; with SYNC_WAKE_UP each
    answered thread is woken on the daemon's CPU);
  - ``none``: the flooder stays idle (the control: what the machine's noise is).

* the **neighbour** (``bench/target.c``): ``--calls`` getppid calls (decided inline), or
  with ``--neighbour mkdir`` path_guard-read mkdir calls, ``--pause`` apart, each timed
  and its answer checked. It runs twice: once while the flooder is attached but idle
  (quiet), then while it floods.

Printed per kind: the neighbour's quiet and flooded p50/p99, flooded/quiet of each
(the target: p99 flooded <= 2x quiet p99), the flood's calls/s, and the CPUs the daemon
and the flooders themselves used while they flooded. Ratios are per round; the summary
gives their median.
"""

from __future__ import annotations

import argparse
import array
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from run import RowFailed, collect, cpu_ns

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent

# kind -> (flood.c KIND, threads): --threads and --parked-threads change the counts.
KINDS = ("none", "sync", "async", "parked", "slow", "compute")


@dataclass(frozen=True)
class Tree:
    name: str
    path: str
    env: tuple[tuple[str, str], ...] = ()  # set for the daemon (--variant)


@dataclass
class Result:
    kind: str
    tree: str
    quiet: list[int]  # neighbour latencies, ns
    flooded: list[int]
    flood_calls_per_s: float
    daemon_cpu: float  # CPUs the daemon used while it was flooded
    flood_cpu: float  # CPUs the flooders themselves used meanwhile
    wrong: int

    @staticmethod
    def pct(lat: list[int], q: int) -> float:
        s = sorted(lat)
        return s[min(len(s) - 1, len(s) * q // 100)] / 1e3

    def row(self) -> dict[str, float]:
        q50, q99 = self.pct(self.quiet, 50), self.pct(self.quiet, 99)
        f50, f99 = self.pct(self.flooded, 50), self.pct(self.flooded, 99)
        return {"q50": q50, "q99": q99, "f50": f50, "f99": f99, "r50": f50 / q50,
                "r99": f99 / q99, "flood": self.flood_calls_per_s, "cpu": self.daemon_cpu,
                "fcpu": self.flood_cpu}


def build(out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    target, flood = out / "bench-target", out / "bench-flood"
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(target),
                    str(BENCH / "target.c")], check=True)
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread", "-o",
                    str(flood), str(BENCH / "flood.c")], check=True)
    return target, flood


def write_config(tmp: Path, max_inflight: int, extra: str, tree: str = str(REPO)) -> Path:
    text = f"""\
[listen]
socket = "{tmp}/notify.sock"
control_socket = "{tmp}/control.sock"

[metrics]
listen = ""

[defaults]
policies = ["path_guard", "bench"]
deadline = "2s"
max_inflight = {max_inflight}
{extra}

[[policy]]
name = "path_guard"
path = "{Path(tree) / "policies" / "path_guard.py"}"
options = {{ prefixes = ["/guarded"], errno = "EACCES" }}

[[policy]]
name = "bench"
path = "{BENCH / "policies" / "sync_deny.py"}"

[audit]
decisions = "none"
"""
    path = tmp / "config.toml"
    path.write_text(text)
    return path


def start_daemon(tree: Tree, python: str, config: Path, tmp: Path, log: IO[bytes],
                 profile: str | None = None) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["PYTHONPATH"] = tree.path + os.pathsep + env.get("PYTHONPATH", "")
    env.update(tree.env)
    argv = [python, "-m", "supervisor", "--log-level", "warning", "serve", "--config",
            str(config)]
    if profile:
        argv[1:1] = ["-m", "cProfile", "-o", profile]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                            env=env, cwd=str(tmp))
    deadline = time.monotonic() + 30
    while not (tmp / "notify.sock").exists():
        if proc.poll() is not None:
            raise RowFailed(f"daemon exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RowFailed("daemon did not listen")
        time.sleep(0.01)
    return proc


def neighbour_phase(target: Path, sock: str, name: str, calls: int, pause_us: int,
                    call: str, procs: list[subprocess.Popen[bytes]], tmp: Path
                    ) -> tuple[list[int], int]:
    """One run of the neighbour: its latencies (ns) and wrong answers."""
    pipes = {p: os.pipe() for p in ("ready", "go", "done", "exit")}
    keep = {"ready": 0, "go": 1, "done": 0, "exit": 1}
    child_fds = [pipes[p][1 - keep[p]] for p in pipes]
    out = tmp / f"{name}.out"
    argv = [str(target), sock, name, str(calls), "20", str(out), *map(str, child_fds),
            str(pause_us)]
    if call == "mkdir":
        argv.append("mkdir")
    proc = subprocess.Popen(argv, pass_fds=child_fds, stdin=subprocess.DEVNULL)
    try:
        for fd in child_fds:
            os.close(fd)
        deadline = time.monotonic() + 60 + calls * (pause_us + 2000) / 1e6
        collect(pipes["ready"][0], 1, [*procs, proc], deadline, "the neighbour's session")
        os.close(pipes["go"][1])
        collect(pipes["done"][0], 1, [*procs, proc], deadline, "the neighbour's calls")
        os.close(pipes["exit"][1])
        if proc.wait(timeout=10) != 0:
            raise RowFailed(f"neighbour exited with {proc.returncode}")
    finally:
        for r, w in pipes.values():
            for fd in (r, w):
                try:
                    os.close(fd)
                except OSError:
                    pass
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with open(out, "rb") as f:
        n, bad, _t0, _t1 = (int(x) for x in f.readline().split())
        lat = array.array("I")
        lat.frombytes(f.read(n * 4))
    return list(lat), bad


def run_kind(kind: str, tree: Tree, opts: argparse.Namespace, target: Path, flood: Path,
             tmp: Path) -> Result:
    for stale in tmp.iterdir():
        if stale.is_file() or stale.is_socket():
            stale.unlink()
    log = open(tmp / "daemon.log", "w+b")  # noqa: SIM115 - closed in finally
    # The tree's own path_guard: a --compare tree's policy goes with its supervisor.
    config = write_config(tmp, opts.max_inflight, opts.config_extra.replace("\\n", "\n"),
                          tree.path)
    daemon = None
    flooders: list[subprocess.Popen[bytes]] = []
    # One ready pipe for all flooders; go and stop are closed once for all of them.
    pipes = {p: os.pipe() for p in ("ready", "go", "stop")}
    try:
        profile = None
        if opts.profile:
            Path(opts.profile).mkdir(parents=True, exist_ok=True)
            profile = str(Path(opts.profile) / f"{kind}-{time.monotonic_ns()}.prof")
        daemon = start_daemon(tree, opts.python, config, tmp, log, profile)
        sock = str(tmp / "notify.sock")
        flood_kind = {"none": "sync", "parked": "async"}.get(kind, kind)
        threads = opts.parked_threads if kind == "parked" else opts.threads
        child_fds = [pipes["ready"][1], pipes["go"][0], pipes["stop"][0]]
        for i in range(opts.flooders):
            flooders.append(subprocess.Popen(
                [str(flood), sock, str(i), flood_kind, str(threads), str(opts.delay_us),
                 *map(str, child_fds), str(tmp / f"flood{i}.out")],
                pass_fds=child_fds, stdin=subprocess.DEVNULL))
        for fd in child_fds:
            os.close(fd)
        pipes["ready"] = (pipes["ready"][0], -1)
        pipes["go"] = (-1, pipes["go"][1])
        pipes["stop"] = (-1, pipes["stop"][1])
        procs = [daemon, *flooders]
        collect(pipes["ready"][0], opts.flooders, procs, time.monotonic() + 30,
                "the flooders' sessions")
        quiet, bad_quiet = neighbour_phase(target, sock, "quiet", opts.calls, opts.pause_us,
                                           opts.neighbour, procs, tmp)
        if kind != "none":
            os.close(pipes["go"][1])
            pipes["go"] = (-1, -1)
        time.sleep(opts.settle)
        t0, cpu0 = time.monotonic(), cpu_ns(daemon.pid)
        fcpu0 = sum(cpu_ns(f.pid) for f in flooders)
        flooded, bad_flooded = neighbour_phase(target, sock, "flooded", opts.calls,
                                               opts.pause_us, opts.neighbour, procs, tmp)
        t1, cpu1 = time.monotonic(), cpu_ns(daemon.pid)
        fcpu1 = sum(cpu_ns(f.pid) for f in flooders)
        flood_start = t0 - opts.settle
        if kind == "none":
            flood_start = time.monotonic()
            os.close(pipes["go"][1])
            pipes["go"] = (-1, -1)
        os.close(pipes["stop"][1])
        pipes["stop"] = (-1, -1)
        for f in flooders:
            if f.wait(timeout=30) != 0:
                raise RowFailed(f"flooder exited with {f.returncode}")
        flood_end = time.monotonic()
        flood_calls = flood_wrong = 0
        for i in range(opts.flooders):
            n, bad = (int(x) for x in (tmp / f"flood{i}.out").read_text().split())
            flood_calls += n
            flood_wrong += bad
        rate = flood_calls / (flood_end - flood_start) if kind != "none" else 0.0
        return Result(kind, tree.name, quiet, flooded, rate, (cpu1 - cpu0) / 1e9 / (t1 - t0),
                      (fcpu1 - fcpu0) / 1e9 / (t1 - t0), bad_quiet + bad_flooded + flood_wrong)
    finally:
        for r, w in pipes.values():
            for fd in (r, w):
                if fd >= 0:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
        for p in [*flooders, daemon]:
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM if p is daemon else signal.SIGKILL)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        log.seek(0)
        text = log.read().decode(errors="replace").strip()
        log.close()
        # Kept per run in --out (a round's wrong answers are explained by its log).
        if opts.out:
            name = f"daemon-{kind}{tree.name.lstrip('%')}-{time.time_ns()}.log"
            kept = Path(opts.out) / "logs" / name
            kept.parent.mkdir(parents=True, exist_ok=True)
            kept.write_text(text + "\n" if text else "")
            print(f"    [{kind}] daemon log: {kept}", file=sys.stderr)
        if text and opts.show_log:
            print(f"    [{kind}] daemon output: {text[-1500:]}", file=sys.stderr)


def _suffix(name: str) -> str:
    """A row's name after its kind: @NAME for a --compare tree, %NAME for a variant."""
    return name if name.startswith("%") else f"@{name}" if name else ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", default=",".join(KINDS), help="flood kinds, comma separated")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--calls", type=int, default=2000, help="neighbour calls per phase")
    ap.add_argument("--pause-us", type=int, default=500,
                    help="the neighbour's pause between calls, microseconds")
    ap.add_argument("--neighbour", choices=("getppid", "mkdir"), default="getppid",
                    help="getppid: decided inline; mkdir: path_guard reads its memory")
    ap.add_argument("--flooders", type=int, default=1, help="flooding containers")
    ap.add_argument("--threads", type=int, default=8, help="flooding threads per flooder")
    ap.add_argument("--parked-threads", type=int, default=160,
                    help="flooding threads of the 'parked' kind (over --max-inflight)")
    ap.add_argument("--max-inflight", type=int, default=64)
    ap.add_argument("--delay-us", type=int, default=20000,
                    help="how long the 'slow' flooder takes to serve each page fault, and "
                         "the 'compute' flooder computes between two calls")
    ap.add_argument("--settle", type=float, default=0.3,
                    help="seconds of flood before the neighbour's flooded phase")
    ap.add_argument("--config-extra", default="",
                    help="more [defaults] lines for the daemon's config (\\n separated)")
    ap.add_argument("--compare", action="append", default=[], metavar="NAME=DIR",
                    help="also run every kind with the supervisor package found in DIR")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=VAR=V;VAR=V",
                    help="also run every kind (named KIND%%NAME) with these environment "
                         "variables set for this tree's daemon, e.g. "
                         "py=SECCOMP_SUPERVISOR_NO_EXTENSIONS=1")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--profile", metavar="DIR",
                    help="run the daemon under cProfile, one .prof file per run in DIR")
    ap.add_argument("--show-log", action="store_true", help="print the daemon's output")
    ap.add_argument("--out", help="build directory (default: a fresh one under the run's "
                                  "temporary directory, so other runs cannot replace them); "
                                  "with it, every run's daemon log is kept in OUT/logs")
    opts = ap.parse_args(argv)
    kinds = [k for k in opts.kinds.split(",") if k]
    for k in kinds:
        if k not in KINDS:
            ap.error(f"unknown kind {k!r}; known: {', '.join(KINDS)}")
    trees = [Tree("", str(REPO))]
    for spec in opts.compare:
        label, _, path = spec.partition("=")
        if not label or not (Path(path) / "supervisor" / "__init__.py").exists():
            ap.error(f"--compare {spec!r}: want NAME=DIR with DIR/supervisor/")
        trees.append(Tree(label, str(Path(path).resolve())))
    for spec in opts.variant:
        label, _, assignments = spec.partition("=")
        trees.append(Tree("%" + label, str(REPO), tuple(
            (name, value) for name, _, value in
            (a.partition("=") for a in assignments.split(";") if a))))
    tmp = Path(tempfile.mkdtemp(prefix="ssneighbour-", dir="/dev/shm"
                                if os.path.isdir("/dev/shm") else None))
    target, flood = build(Path(opts.out) if opts.out else tmp / "build")
    print(f"neighbour benchmark: {os.cpu_count()} CPUs, kernel {os.uname().release}; "
          f"neighbour {opts.neighbour} x {opts.calls} every {opts.pause_us} us; "
          f"{opts.flooders} flooder(s) of {opts.threads} threads ({opts.parked_threads} "
          f"parked), max_inflight {opts.max_inflight}, slow pages {opts.delay_us} us"
          + (f"; extra config {opts.config_extra!r}" if opts.config_extra else ""))
    results: dict[tuple[str, str], list[Result]] = {}
    failed = False
    head = (f"{'kind':<14} {'round':>5} {'quiet p50':>9} {'p99':>8} {'flooded p50':>11} "
            f"{'p99':>8} {'x p50':>7} {'x p99':>7} {'flood/s':>8} {'daemon CPU':>10} "
            f"{'flood CPU':>9}")
    print(head)
    print("-" * len(head))
    try:
        for rnd in range(opts.rounds):
            for kind in kinds:
                for tree in trees:
                    label = kind + _suffix(tree.name)
                    try:
                        res = run_kind(kind, tree, opts, target, flood, tmp)
                    except (RowFailed, OSError, subprocess.SubprocessError) as exc:
                        print(f"{label:<14} {rnd + 1:>5}  FAILED: {exc}")
                        failed = True
                        continue
                    results.setdefault((kind, tree.name), []).append(res)
                    r = res.row()
                    print(f"{label:<14} {rnd + 1:>5} {r['q50']:>9.1f} {r['q99']:>8.1f} "
                          f"{r['f50']:>11.1f} {r['f99']:>8.1f} {r['r50']:>7.2f} "
                          f"{r['r99']:>7.2f} {r['flood']:>8.0f} {r['cpu']:>10.2f} {r['fcpu']:>9.2f}"
                          + (f"  WRONG {res.wrong}" if res.wrong else ""), flush=True)
                    failed = failed or res.wrong > 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nMedians over {opts.rounds} rounds (latencies in us; x = flooded / quiet; "
          "target: x p99 <= 2)")
    print(head.replace(" round", "      "))
    for (kind, name), rs in results.items():
        rows = [r.row() for r in rs]

        def med(key: str, rows: list[dict[str, float]] = rows) -> float:
            return statistics.median(x[key] for x in rows)
        label = kind + _suffix(name)
        print(f"{label:<14} {'':>5} {med('q50'):>9.1f} {med('q99'):>8.1f} "
              f"{med('f50'):>11.1f} {med('f99'):>8.1f} {med('r50'):>7.2f} "
              f"{med('r99'):>7.2f} {med('flood'):>8.0f} {med('cpu'):>10.2f} "
              f"{med('fcpu'):>9.2f}")
    # One round's p99 is its 20th-slowest call and moves 3-5x between rounds on a shared
    # machine: the flooded calls of every round together say more.
    print(f"\nFlooded calls of all {opts.rounds} rounds together (latencies in us)")
    print(f"{'kind':<14} {'calls':>6} {'p50':>7} {'p90':>7} {'p99':>7} {'p99.9':>7} "
          f"{'> 1 ms':>7} {'> 2 ms':>7}")
    for (kind, name), rs in results.items():
        lat = sorted(x for r in rs for x in r.flooded)
        over = [100 * sum(x > ns for x in lat) / len(lat) for ns in (1_000_000, 2_000_000)]
        print(f"{kind + _suffix(name):<14} {len(lat):>6} "
              + " ".join(f"{lat[min(len(lat) - 1, len(lat) * q // 1000)] / 1e3:>7.0f}"
                         for q in (500, 900, 990, 999))
              + f" {over[0]:>6.2f}% {over[1]:>6.2f}%")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
