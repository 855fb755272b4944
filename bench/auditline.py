#!/usr/bin/env python3
"""Instructions per **written** audit line, split by piece, counted by callgrind.

    .venv/bin/python bench/auditline.py                 # every piece, this tree
    .venv/bin/python bench/auditline.py --piece format  # one piece
    SECCOMP_SUPERVISOR_NO_EXTENSIONS=1 .venv/bin/python bench/auditline.py

The path of a line the rate limit admits, as the `default` row at K=1000 takes it (the
benchmark makes ~36 calls per container there, so ~28% of calls are written): a deny
from ``deny(errno.EPERM, reason=...)`` for one of ``--containers`` containers in turn,
through ``Recorder.decided`` (metrics on, ``[audit]`` as ``default.toml``), the writer's
``flush`` every ``--batch`` lines into ``/dev/null``. Pieces:

* ``admit``: ``Recorder._audit``, what the compiled loop calls past its common case (the
  limiter's key and ``admit``, the queue), no writer;
* ``format``: ``audit_text`` of an admitted line's entry;
* ``budget``: the writer's byte budget per line (``_add_text``) on pre-formatted text;
* ``write``: ``_write`` in full (format, budget, join, ``write``/``flush``);
* ``all``: ``decided`` then the writer;
* ``loop``: this script's own loop, doing nothing: part of every figure above.

Each piece runs twice under ``valgrind --tool=callgrind`` (N and 3N lines); the
difference divided by 2N is one line's cost, start-up cancelled out.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIECES = ("admit", "format", "budget", "write", "all", "loop")


def run_piece(piece: str, lines: int, containers: int, batch: int) -> None:
    """The measured work: ``lines`` admitted lines (the setup is the same for any N)."""
    import errno

    from prometheus_client import CollectorRegistry

    import supervisor.audit as audit_mod
    from supervisor import accel
    from supervisor.audit import Recorder, audit_text
    from supervisor.decide import Outcome
    from supervisor.metrics import Metrics
    from supervisor.policy import Container, deny

    class _Wakeup:
        def set(self) -> None:
            pass

    stream = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the process)
    recorder = Recorder(Metrics(CollectorRegistry()), audit="deny", stream=stream,
                        rate_limit=10)
    recorder._wakeup = _Wakeup()  # type: ignore[assignment]  # queue, as under the daemon
    pool = [Container(id=f"bench-{i:04d}-0123456789abcdef", pid=10000 + i, peer_uid=0)
            for i in range(containers)]
    outcome = Outcome(deny(errno.EPERM, reason="getppid is not for you"), "bench")
    args = (0, 0x7FFD12345678, 0, 0, 0, 0)
    # Every 10 rounds of `containers` lines start a new second: each key's window and
    # each container's byte budget take 10 lines, as the rate limit lets through.
    clock = [1_765_000_000.0]
    audit_mod.time.time = lambda: clock[0]  # type: ignore[attr-defined]
    recorder.decided(pool[0], 1, 2, "getppid", args, outcome, 3.1e-6)  # warm caches
    recorder._pending.clear()
    entries = [(clock[0] + i * 1e-6, c, 4242, 0x6C1D0F4E2A9B0001 + i, "getppid", args,
                outcome, 3.14e-6, False) for i, c in enumerate(pool)]
    texts = [audit_text(e, 4096) for e in entries]
    print(f"hot loop: {accel.KIND}", file=sys.stderr)
    for n in range(lines):
        i = n % containers
        if i == 0 and n // containers % 10 == 0:
            clock[0] += 1.0
        if piece == "admit":  # what the compiled loop calls past its common case
            recorder._audit(pool[i], n, 4242, "getppid", args, outcome, 3.14e-6, False,
                            clock[0], 0)
            recorder._pending.clear()
        elif piece == "all":
            recorder.decided(pool[i], n, 4242, "getppid", args, outcome, 3.14e-6)
            if len(recorder._pending) >= batch:
                recorder.flush()
        elif piece == "format":
            audit_text(entries[i], 4096)
        elif piece == "budget":
            out: list[str] = []
            recorder._add_text(out, texts[i], pool[i], clock[0], 1, counted=False)
        elif piece == "write":
            recorder._pending.append((entries[i], None))
            if len(recorder._pending) >= batch:
                recorder.flush()
    recorder.flush()


def count(piece: str, lines: int, containers: int, batch: int, env: dict[str, str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cg.out"
        subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
             sys.executable, __file__, "--inner", piece, "--lines", str(lines),
             "--containers", str(containers), "--batch", str(batch)],
            check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        text = out.read_text()
    match = re.search(r"^summary:\s+(\d+)", text, re.M) or re.search(
        r"^totals:\s+(\d+)", text, re.M)
    assert match, "no totals in the callgrind output"
    return int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--piece", choices=PIECES, action="append")
    parser.add_argument("--lines", type=int, default=4000)
    parser.add_argument("--containers", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64,
                        help="lines per writer wake-up (default 64)")
    parser.add_argument("--tree", default=str(ROOT),
                        help="the copy of the package to measure (default: this tree)")
    parser.add_argument("--inner", choices=PIECES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        run_piece(args.inner, args.lines, args.containers, args.batch)
        return
    env = dict(os.environ, PYTHONPATH=args.tree)
    for piece in args.piece or PIECES:
        low = count(piece, args.lines, args.containers, args.batch, env)
        high = count(piece, 3 * args.lines, args.containers, args.batch, env)
        print(f"{piece:<7} {(high - low) / (2 * args.lines):9.0f} instructions per line")


if __name__ == "__main__":
    main()
