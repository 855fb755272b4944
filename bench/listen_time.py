#!/usr/bin/env python3
"""Time from exec to a connectable notify socket, and to readiness, of ``serve``.

    .venv/bin/python bench/listen_time.py            # 20 runs, median and spread
    .venv/bin/python bench/listen_time.py --runs 50 --tree /tmp/old   # another checkout

What a runtime started right after the daemon meets (runc's own test helpers start
their agent in the background and use it at once): each run execs
``python -m supervisor serve --config C --socket S`` (a config naming one small policy,
metrics off, its control socket beside S), then
tries ``connect()`` every 0.5 ms from the moment just before the exec. ``listen`` is
exec → first successful connect (a runtime's connect waits in the backlog from then
on); ``ready`` is exec → the ``--ready-fd`` newline (config and policies loaded, the
sessions served; systemd's ``READY=1`` comes at the same moment), when the tree has
that option. The daemon is stopped with SIGTERM after each run.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
POLL = 0.0005


POLICY = """\
import errno
from supervisor.policy import PolicySet, deny

policy = PolicySet("chmod_enomedium")


@policy.on("chmod", "fchmod", "fchmodat")
def no_chmod(n):
    return deny(errno.ENOMEDIUM)
"""

CONFIG = """\
[listen]
control_socket = "{dir}/control.sock"

[metrics]
listen = ""

[defaults]
policies = ["agent"]

[[policy]]
name = "agent"
path = "{dir}/agent.py"
"""


def one_run(tree: Path, python: str, workdir: Path,
            ready_fd: bool) -> tuple[float, float | None]:
    sock_path = str(workdir / "notify.sock")
    cmd = [python, "-m", "supervisor", "--log-level", "warning", "serve",
           "--config", str(workdir / "config.toml"), "--socket", sock_path]
    env = dict(os.environ, PYTHONPATH=str(tree))
    env.pop("NOTIFY_SOCKET", None)
    ready_r = ready_w = -1
    if ready_fd:
        ready_r, ready_w = os.pipe()
        cmd[6:6] = ["--ready-fd", str(ready_w)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=workdir, pass_fds=(ready_w,) if ready_fd
                            else (), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if ready_fd:
        os.close(ready_w)
    listen = ready = None
    try:
        deadline = start + 30
        while time.perf_counter() < deadline:
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(sock_path)
            except (FileNotFoundError, ConnectionRefusedError):
                probe.close()
                if proc.poll() is not None:
                    raise SystemExit(f"the daemon exited with {proc.returncode}") from None
                time.sleep(POLL)
                continue
            listen = time.perf_counter() - start
            probe.close()
            break
        if listen is None:
            raise SystemExit("the daemon did not listen within 30 s")
        if ready_fd:
            readable, _, _ = select.select([ready_r], [], [], 30)
            if readable and os.read(ready_r, 1) == b"\n":
                ready = time.perf_counter() - start
    finally:
        if ready_r >= 0:
            os.close(ready_r)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return listen, ready


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--tree", type=Path, default=ROOT,
                        help="checkout whose supervisor package to start (default: this)")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--no-ready-fd", action="store_true",
                        help="the tree has no --ready-fd option (an older checkout)")
    args = parser.parse_args()
    listens: list[float] = []
    readies: list[float] = []
    with tempfile.TemporaryDirectory(prefix="listen-time-") as tmp:
        workdir = Path(tmp)
        (workdir / "agent.py").write_text(POLICY)
        (workdir / "config.toml").write_text(CONFIG.format(dir=tmp))
        for _ in range(args.runs):
            listen, ready = one_run(args.tree, args.python, workdir,
                                    not args.no_ready_fd)
            listens.append(listen)
            if ready is not None:
                readies.append(ready)
    for name, values in (("listen", listens), ("ready", readies)):
        if values:
            ms = sorted(v * 1000 for v in values)
            print(f"{name:7s} median {statistics.median(ms):6.1f} ms  min {ms[0]:6.1f}  "
                  f"max {ms[-1]:6.1f}  ({len(ms)} runs)")


if __name__ == "__main__":
    main()
