"""An attacker's probes against the daemon: what a container's creator controls (its id,
metadata, annotations, the trace annotation's files) and what a container does (the
system calls it makes, the paths in them) must not read or write host files, reach
another container's profile, forge a log or audit line, or flood the journal.

One test per attack; each failed before its fix (see the commit that added it)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from supervisor.control import format_status
from supervisor.handoff import build_state_message
from supervisor.launcher import hand_over
from supervisor.router import TRACE_ANNOTATION

from .conftest import start_target
from .daemon_harness import CLI, write_config

ROOT = Path(__file__).resolve().parent.parent

FORGED = '{"time":1.0,"container":"victim","syscall":"mount","decision":"allow"}'
HOSTILE = f'evil\n{FORGED}\r{FORGED}\x1b[2J\u2028{FORGED}\u2029x'


# --------------------------------------------------------------------------- item 3


@contextmanager
def serve_process(tmp_path: Path, config_text: str) -> Iterator[subprocess.Popen[bytes]]:
    """``seccomp-supervisor serve`` as a real subprocess (so the CLI's logging set-up is
    what runs), stdout and stderr to their own files; SIGTERM on exit."""
    config = write_config(tmp_path, config_text)
    with open(tmp_path / "stdout", "wb") as out, open(tmp_path / "stderr", "wb") as err:
        proc = subprocess.Popen([*CLI, "serve", "--config", str(config)], cwd=ROOT,
                                stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while b"serving on" not in (tmp_path / "stderr").read_bytes():
            assert proc.poll() is None, (tmp_path / "stderr").read_text()
            assert time.monotonic() < deadline, "the daemon did not start"
            time.sleep(0.02)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_creator_strings_cannot_forge_log_or_audit_lines(tmp_path: Path) -> None:
    """A handoff whose id, metadata, bundle and annotations carry newlines, CR, escape
    sequences, U+2028/U+2029 and whole JSON audit lines: every line the real daemon
    writes on stderr is one log record's (no line starts with ``{``, none carries a raw
    control character), and every line on stdout is one valid JSON audit line whose
    container is the hostile id, escaped."""
    config = f"""
[defaults]
policies = []
unhandled = "deny:ENOSYS"

[audit]
decisions = "all"

[[policy]]
name = "learn"
path = "{ROOT}/policies/learn.py"
options = {{ directory = "{tmp_path}/learned" }}
"""
    with serve_process(tmp_path, config):
        target = start_target(["getppid"], "getppid", "2")
        try:
            message = build_state_message(
                pid=target.pid, container_id=HOSTILE, metadata=f"team={HOSTILE}",
                bundle=f"/b/{HOSTILE}",
                annotations={TRACE_ANNOTATION: f"of:/x/{HOSTILE}", f"k{HOSTILE}": HOSTILE})
            hand_over(str(tmp_path / "sock" / "notify.sock"), target.child.take_listener(),
                      message)
            out, _ = target.child.process.communicate(timeout=20)
        finally:
            target.child.close()
            if target.child.process.poll() is None:
                target.child.process.kill()
                target.child.process.wait()
        assert [r["errno"] for r in json.loads(out)["results"]] == [38, 38]
        deadline = time.monotonic() + 10
        while (tmp_path / "stdout").read_bytes().count(b"\n") < 2:
            assert time.monotonic() < deadline, "no audit lines"
            time.sleep(0.02)
    stderr = (tmp_path / "stderr").read_text()
    stdout = (tmp_path / "stdout").read_text()
    raw_control = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]")
    assert "annotation io.containers.trace-syscall ignored" in stderr
    assert "evil\\n{" in stderr  # the id is there, escaped
    for line in stderr.split("\n"):
        assert not line.startswith("{"), line
        assert not raw_control.search(line), repr(line)
    lines = stdout.split("\n")
    assert lines[-1] == ""
    audit = [json.loads(line) for line in lines[:-1]]
    assert len(audit) == 2
    for line, record in zip(lines, audit, strict=False):
        assert not raw_control.search(line), repr(line)
        assert line.isascii()
        assert record["container"] == HOSTILE
        assert record["decision"] == "deny" and record["errno"] == 38


def test_status_table_escapes_creator_strings() -> None:
    """``seccomp-supervisor status`` (the table, not ``--json``): a hostile id or
    metadata cannot add rows or send terminal escape sequences."""
    status = {"version": "x", "pid": 1, "uptime_seconds": 1, "notify_socket": "/s",
              "sessions": [{"container": HOSTILE, "runtime_pid": 7, "policies": ["p"],
                            "mode": "enforce", "metadata": HOSTILE,
                            "decisions": {"deny": 1}, "age_seconds": 1}]}
    table = format_status(status)
    lines = table.splitlines()
    assert len(lines) == 7, table  # 4 head lines, blank, header, one row
    assert not re.search("[\x00-\x1f\x7f-\x9f\u2028\u2029]", table.replace("\n", ""))
    assert lines[-1].startswith("evil\\n{")


def test_log_formatter_keeps_tracebacks_off_the_audit_stream(tmp_path: Path) -> None:
    """An exception whose text carries a forged audit line, logged with its traceback by
    the CLI's logging set-up: no line of stderr starts with ``{``."""
    code = (
        "import logging, sys\n"
        "from supervisor.cli import _setup_logging\n"
        "_setup_logging('info')\n"
        "log = logging.getLogger('supervisor.test')\n"
        "try:\n"
        f"    raise ValueError({HOSTILE!r})\n"
        "except ValueError:\n"
        f"    log.exception('session of container %s failed', {HOSTILE!r})\n"
        f"log.info('stack', stack_info=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=30, check=True,
                          env={**os.environ, "JOURNAL_STREAM": "8:1"})
    lines = done.stderr.split("\n")
    assert lines[0].startswith("ERROR supervisor.test: session of container evil\\n{")
    assert "Traceback" in done.stderr and "ValueError" in done.stderr
    for line in lines:
        assert not line.startswith("{"), line
        assert not re.search("[\x00-\x1f\x7f-\x9f\u2028\u2029]", line), repr(line)
