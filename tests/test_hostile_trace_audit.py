"""An attacker's probes against the daemon: what a container's creator controls (its id,
metadata, annotations, the trace annotation's files) and what a container does (the
system calls it makes, the paths in them) must not read or write host files, reach
another container's profile, forge a log or audit line, or flood the journal.

One test per attack; each attack test failed against the code before its fix. Three
tests pin the new mechanisms themselves (the byte budget, a hung file job, the
directory rules): they could not run before, the options or functions did not exist."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from supervisor import safefile
from supervisor.audit import Recorder
from supervisor.control import format_status, request
from supervisor.decide import Outcome
from supervisor.handoff import build_state_message
from supervisor.launcher import hand_over
from supervisor.learn import known_syscalls, learning_profile
from supervisor.metrics import Metrics
from supervisor.policy import Container, deny
from supervisor.profile import Action, load_profile
from supervisor.router import TRACE_ANNOTATION

from .conftest import sleeping_target, start_target
from .daemon_harness import CLI, RunningDaemon, running_daemon, write_config

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
            proc.wait(10)
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
    assert lines[-1].startswith("evil\\x0a{")  # control.printable: every non-ASCII escaped


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


# --------------------------------------------------------------------------- item 11

GUARD = f"""
[defaults]
policies = ["path_guard"]

[audit]
decisions = "deny"
rate_limit = 5

[[policy]]
name = "path_guard"
path = "{ROOT}/policies/path_guard.py"
options = {{ prefixes = ["{{tmp}}/guarded"] }}
"""


async def test_unique_paths_do_not_escape_the_audit_rate_limit(tmp_path: Path) -> None:
    """A container denied ``mkdir`` on 400 distinct long paths under a guarded prefix:
    the reason names each path, but the limit counts lines per container, call, decision
    and policy, so at most ``rate_limit`` lines a second are written, each at most
    ``max_line`` bytes, and every other one is counted in a summary and the metric."""
    calls = 400
    script = ("import os, sys\n"
              f"for i in range({calls}):\n"
              "    try:\n"
              "        os.mkdir(sys.argv[1] + '/' + str(i) + 'x' * 240 + ('/' + 'y' * 250) * 14)\n"
              "    except PermissionError:\n"
              "        pass\n"
              "    else:\n"
              "        sys.exit('created')\n")
    guarded = tmp_path / "guarded"
    guarded.mkdir()
    async with running_daemon(tmp_path, GUARD) as d:
        started = time.monotonic()
        done = await d.run(["--notify", "mkdir", "--id", "noisy", "--", sys.executable,
                            "-c", script, str(guarded)])
        elapsed = time.monotonic() - started
        assert done.returncode == 0, done.stderr
        d.daemon.recorder.flush()
        d.daemon.recorder._report(d.daemon.recorder.limiter.flush())
        text = d.audit.getvalue()
        suppressed_metric = d.metric("seccomp_supervisor_audit_lines_suppressed_total")
    lines = [json.loads(line) for line in text.splitlines()]
    denies = [r for r in lines if "suppressed" not in r]
    summaries = [r for r in lines if "suppressed" in r]
    assert all(r["container"] == "noisy" and r["syscall"] == "mkdir" for r in lines)
    windows = int(elapsed) + 2
    assert 1 <= len(denies) <= 5 * windows, (len(denies), elapsed)
    assert len(denies) + sum(s["suppressed"] for s in summaries) == calls
    assert sum(s["suppressed"] for s in summaries) == suppressed_metric
    assert max(len(line) + 1 for line in text.splitlines()) <= 4096
    assert "more]" in denies[0]["reason"]  # cut, with the marker
    assert len(text) <= 64 * 1024 * windows


def _deny_lines(recorder: Recorder, container: Container, syscalls: list[str],
                reason: str, repeats: int) -> None:
    for _ in range(repeats):
        for name in syscalls:
            recorder.decided(container, 1, 2, name, (0,) * 6,
                             Outcome(deny(1, reason=reason), "p"), 1e-5)


def test_audit_bytes_per_container_are_capped() -> None:
    """Distinct system calls are distinct rate-limit keys: a container that makes 300
    of them denied, each three times with a 3 KB reason, still gets at most the byte
    budget per window (the default, 64 KiB), and one summary line says how many lines
    it lost; another container keeps its own budget."""
    out = io.StringIO()
    metrics = Metrics(CollectorRegistry())
    recorder = Recorder(metrics, audit="deny", stream=out, rate_limit=10)
    names = sorted(known_syscalls())[:300]
    noisy, quiet = Container("noisy", pid=10), Container("quiet", pid=11)
    _deny_lines(recorder, noisy, names, "r" * 3000, 3)
    _deny_lines(recorder, quiet, names[:2], "fine", 1)
    recorder._report(recorder.limiter.flush())
    recorder.flush_budgets()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    written = {c: sum(len(json.dumps(r, separators=(",", ":"))) + 1 for r in lines
                      if r["container"] == c and "suppressed" not in r)
               for c in ("noisy", "quiet")}
    assert written["noisy"] <= 64 * 1024
    assert len([r for r in lines if r["container"] == "quiet"]) == 2
    lost = [r for r in lines if r["container"] == "noisy" and "suppressed" in r]
    shown = len([r for r in lines if r["container"] == "noisy" and "suppressed" not in r])
    assert len(lost) == 1 and lost[0]["byte_budget"] == 64 * 1024
    assert shown + lost[0]["suppressed"] == 900
    assert metrics.registry.get_sample_value(
        "seccomp_supervisor_audit_lines_suppressed_total") == 900 - shown


def test_audit_lines_are_capped_and_stay_one_line_of_json() -> None:
    """A 100,000-character id and reason full of newlines, U+2028, non-ASCII and lone
    surrogates: the audit line is at most ``max_line`` bytes (4096 by default), ASCII,
    one line, valid JSON (no lone surrogate escape), and says where it was cut."""
    out = io.StringIO()
    recorder = Recorder(None, audit="deny", stream=out)
    long = ("\n\u2028é\ud800" + FORGED) * 1500
    _deny_lines(recorder, Container(long, pid=1), ["mkdir"], long, 1)
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    assert len(text) <= 4096 and text.isascii()
    record = json.loads(text)
    assert record["container"].startswith("\n\u2028é\ufffd{")  # a lone surrogate: U+FFFD
    assert record["reason"].endswith("more]") and record["container"].endswith("more]")


@given(container=st.text(max_size=3000), reason=st.text(max_size=6000),
       policy=st.text(max_size=300), max_line=st.integers(1024, 6000))
@settings(max_examples=200, deadline=None)
def test_any_audit_line_fits_max_line(container: str, reason: str, policy: str,
                                      max_line: int) -> None:
    out = io.StringIO()
    recorder = Recorder(None, audit="deny", stream=out, max_line=max_line)
    recorder.decided(Container(container, pid=1), 1, 2, "mkdir", (2**64 - 1,) * 6,
                     Outcome(deny(1, reason=reason), policy), 1e-5)
    text = out.getvalue()
    assert len(text) <= max_line and text.isascii() and text.count("\n") == 1
    record = json.loads(text)
    assert record["container"] == container or record["container"].endswith("more]")


# --------------------------------------------------------------------------- items 1, 2


def learn_config(tmp_path: Path, options: str = "") -> str:
    return f"""
[defaults]
policies = []
unhandled = "allow"

[trace_annotation]
enabled = true

[[policy]]
name = "learn"
path = "{ROOT}/policies/learn.py"
options = {{ directory = "{tmp_path}/learned"{options} }}
"""


def status_of(control: str, timeout: float = 5.0) -> dict[str, object]:
    """The daemon's ``status``; raises TimeoutError (socket.timeout) if its event loop
    does not answer in time."""
    result, _fds = request(control, "status", timeout=timeout)
    return result


@pytest.mark.parametrize("base", ["fifo", "/dev/ptmx"])
def test_trace_base_cannot_freeze_the_event_loop(tmp_path: Path, base: str) -> None:
    """``if:`` naming a FIFO or ``/dev/ptmx``: the daemon never opens or reads it on its
    event loop (it used to block there for good: every container's calls and
    ``status`` hung). It still serves, and the annotation is refused."""
    if base == "fifo":
        base = str(tmp_path / "fifo")
        os.mkfifo(base)
    (tmp_path / "learned").mkdir()
    with serve_process(tmp_path, learn_config(tmp_path)), sleeping_target() as child:
        message = build_state_message(
            pid=child.pid, container_id="prober", bundle="/b",
            annotations={TRACE_ANNOTATION: f"of:{tmp_path}/learned/x.json;if:{base}"})
        hand_over(str(tmp_path / "sock" / "notify.sock"), child.take_listener(), message)
        deadline = time.monotonic() + 10
        while "prober" not in (tmp_path / "stderr").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        status = status_of(str(tmp_path / "sock" / "control.sock"))
        assert [s["container"] for s in status["sessions"]] == ["prober"]  # type: ignore
    assert "annotation io.containers.trace-syscall ignored" in (
        tmp_path / "stderr").read_text()


def test_learn_accumulate_does_not_follow_a_planted_symlink_to_a_fifo(
        tmp_path: Path) -> None:
    """The learn policy merges the container's existing profile file: one replaced by a
    symlink to a FIFO is neither followed nor opened blocking; the daemon stays
    responsive and writes a regular file in its place. The FIFO is left alone."""
    learned = tmp_path / "learned"
    learned.mkdir()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (learned / "planted.json").symlink_to(fifo)
    learning = tmp_path / "learning.json"
    learning.write_text(json.dumps(learning_profile().to_dict()))
    config = learn_config(tmp_path).replace('policies = []', 'policies = ["learn"]')
    with serve_process(tmp_path, config):
        done = subprocess.run(
            [*CLI, "run", "--socket", str(tmp_path / "sock" / "notify.sock"), "--profile",
             str(learning), "--id", "planted", "--", "true"],
            capture_output=True, timeout=30, cwd=ROOT)
        assert done.returncode == 0, done.stderr
        deadline = time.monotonic() + 10
        while (learned / "planted.json").is_symlink():
            assert time.monotonic() < deadline, "the profile was not written"
            time.sleep(0.05)
        status_of(str(tmp_path / "sock" / "control.sock"))
    assert (learned / "planted.json").is_file()
    assert load_profile(learned / "planted.json").default_action == Action.ERRNO
    assert stat.S_ISFIFO(fifo.lstat().st_mode)


async def test_trace_output_cannot_replace_a_learned_profile(tmp_path: Path) -> None:
    """``of:`` naming the profile the learn policy wrote for another container: refused
    (trace outputs live in their own directory), the victim's file is untouched."""
    learned = tmp_path / "learned"
    learned.mkdir()
    victim = learned / "victim.json"
    victim.write_text(json.dumps({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
        {"names": ["read"], "action": "SCMP_ACT_ALLOW"}]}))
    before = victim.read_bytes()
    async with running_daemon(tmp_path, learn_config(tmp_path)) as d:
        attacker = Container("attacker", annotations={TRACE_ANNOTATION: f"of:{victim}"},
                             peer_uid=0)
        assert d.daemon._trace_route(attacker) is None
    assert victim.read_bytes() == before


async def test_trace_output_of_another_traced_container_is_not_replaced(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Two containers name the same ``of:`` file: the first to end creates it, the
    second is refused (it never merges into or replaces a file it did not create), also
    after a restart (the daemon keeps no record, so an existing file is never taken)."""
    traced = tmp_path / "learned" / "traced"
    traced.mkdir(parents=True)
    shared = traced / "shared.json"
    annotation = {TRACE_ANNOTATION: f"of:{shared}"}

    async def end_session(d: RunningDaemon, container: Container) -> None:
        got = d.daemon._trace_route(container)
        assert got is not None
        for _name, policy in got[0].policies:
            policy.session_ended(container)
        await settle(d)

    async with running_daemon(tmp_path, learn_config(tmp_path)) as d:
        await end_session(d, Container("first", annotations=annotation, peer_uid=0))
        owner = shared.stat()
        with caplog.at_level(logging.ERROR):
            await end_session(d, Container("second", annotations=annotation, peer_uid=0))
        assert "second" in caplog.text and "not written" in caplog.text
        assert shared.stat().st_ino == owner.st_ino
        await end_session(d, Container("first", annotations=annotation, peer_uid=0))  # its own
        assert shared.stat().st_ino != owner.st_ino
        owner = shared.stat()
    (tmp_path / "again").mkdir()
    async with running_daemon(tmp_path / "again", learn_config(tmp_path)) as d:
        await end_session(d, Container("first", annotations=annotation, peer_uid=0))
    assert shared.stat().st_ino == owner.st_ino
    assert sorted(p.name for p in traced.iterdir()) == ["shared.json"]  # no temp left


async def settle(d: RunningDaemon) -> None:
    """Wait for the daemon's file work (off the event loop) to finish."""
    with trio.fail_after(10):
        await safefile.drain()


async def test_a_file_job_that_hangs_is_given_up_and_the_loop_runs_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """What an NFS or FUSE file system that stops answering does to a profile write,
    played by a FIFO opened blocking: the job is given up after its time, logged, and
    the event loop never waited for it; its thread ends when the open returns."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0.01)

    def stuck() -> None:
        with open(fifo, "rb") as f:  # blocks until a writer opens it
            f.read()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        with caplog.at_level(logging.ERROR, logger="supervisor.safefile"):
            safefile.submit("stuck job", stuck, timeout=0.3)
            with trio.fail_after(5):
                await safefile.drain()
        assert "stuck job: gave up after 0.3 s" in caplog.text
        assert ticks >= 10  # the loop ran all along
        # Let the abandoned thread go.
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("options", "message"), [
    (', trace_directory = "{tmp}/learned"',
     "options.trace_directory: must not be the same directory as options.directory"),
    (', base_directory = "{tmp}/learned/"',
     "options.base_directory: must not be the same directory as options.directory"),
    (', base_directory = "{tmp}/learned/traced"',
     "options.base_directory: must not be the same directory as options.trace_directory"),
    (', trace_directory = "t"', "options.trace_directory: must be an absolute path"),
])
def test_learn_and_trace_namespaces_cannot_overlap(tmp_path: Path, options: str,
                                                   message: str) -> None:
    """The learn policy's files, trace outputs and trace bases live in three distinct
    directories: a base read from the other two would let one container's trace read
    another container's profile; a trace output among the learn policy's files could
    replace one."""
    from supervisor.cli import load_everything
    from supervisor.errors import ConfigError

    path = write_config(tmp_path, learn_config(tmp_path, options.replace(
        "{tmp}", str(tmp_path))))
    with pytest.raises(ConfigError) as info:
        load_everything(str(path))
    assert message in str(info.value)
