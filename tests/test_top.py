"""`seccomp-supervisor top`: rates, p99 and escaping as plain functions, then the real
thing: a daemon serving real targets, `top` in a real terminal (tmux), read off the screen
as a person would see it."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from supervisor import __version__
from supervisor.control import format_status, printable
from supervisor.metrics import DECISION_BUCKETS
from supervisor.top import (
    ContainerRow,
    container_rows,
    format_rate,
    format_seconds,
    quantile,
    render,
    sort_rows,
)

from .soak import DaemonProcess, RunningTarget, config_text, daemon_process, start_target

ROOT = Path(__file__).resolve().parent.parent
BOUNDS = list(DECISION_BUCKETS)
# A container id its creator chose to attack the operator's terminal: clear the screen,
# home the cursor, a newline to forge a line of its own, a bidi override.
HOSTILE_ID = "evil\x1b[2J\x1b[H\nweb-1 1 99999.0\u202e"


def counts(by_bound: dict[float, int]) -> list[int]:
    """latency_counts with ``n`` answers in the bucket of each bound (inf: above all)."""
    out = [0] * (len(BOUNDS) + 1)
    for bound, n in by_bound.items():
        out[len(BOUNDS) if bound == float("inf") else BOUNDS.index(bound)] = n
    return out


def session(serial: int, container: str, notifications: int, deny: int = 0, *,
            latency: list[int] | None = None, inflight: int = 0,
            policies: tuple[str, ...] = ("p",)) -> dict[str, Any]:
    return {"session": serial, "container": container, "notifications": notifications,
            "decisions": {"deny": deny, "allow": notifications - deny},
            "inflight": inflight, "policies": list(policies),
            "latency_counts": latency or [0] * (len(BOUNDS) + 1)}


def status(*sessions: dict[str, Any]) -> dict[str, Any]:
    return {"version": "1.0", "pid": 7, "uptime_seconds": 65, "inflight": 0,
            "latency_bounds": BOUNDS, "sessions": list(sessions)}


# --------------------------------------------------------------------------- pure parts


def test_quantile_interpolates_within_the_bucket_as_prometheus_does() -> None:
    assert quantile(0.99, BOUNDS, [0] * (len(BOUNDS) + 1)) is None
    # 100 answers between 50 and 100 us: the 99th is at 99% of that bucket.
    one_bucket = counts({0.0001: 100})
    assert quantile(0.99, BOUNDS, one_bucket) == pytest.approx(0.00005 + 0.00005 * 0.99)
    # 98 fast, 2 slow (between 0.1 and 0.25 s): the 99th is among the slow ones.
    mixed = counts({0.00001: 98, 0.25: 2})
    assert quantile(0.99, BOUNDS, mixed) == pytest.approx(0.1 + 0.15 * 0.5)
    assert quantile(0.5, BOUNDS, mixed) == pytest.approx(0.00001 * 0.5 / 0.98)
    assert quantile(0.99, BOUNDS, counts({float("inf"): 1})) == float("inf")


def test_rates_come_from_two_snapshots_matched_by_session() -> None:
    before = status(session(1, "web", 100, 10, latency=counts({0.0001: 100})),
                    session(2, "web", 50),
                    session(3, "gone-now", 500))
    after = status(session(1, "web", 300, 30, latency=counts({0.0001: 150, 0.25: 50}),
                           inflight=2, policies=("a", "b")),
                   session(2, "web", 50, policies=("b", "c")),
                   session(4, "new", 40, 40, latency=counts({0.001: 40})))
    first = container_rows(None, before, 0.0)
    assert [r.container for r in first] == ["web", "gone-now"]
    assert all(r.calls_per_second is None and r.p99_seconds is None for r in first)

    rows = {r.container: r for r in container_rows(before, after, 2.0)}
    assert set(rows) == {"web", "new"}  # an ended session has no line
    web = rows["web"]
    assert web.sessions == 2 and web.inflight == 2 and web.policies == ["a", "b", "c"]
    assert web.calls_per_second == 100.0 and web.denies_per_second == 10.0
    # Only the interval's answers count: 50 fast, 50 slow -> the p99 is a slow one.
    assert web.p99_seconds is not None and 0.1 < web.p99_seconds <= 0.25
    new = rows["new"]  # started between the snapshots: counted from zero
    assert new.calls_per_second == 20.0 and new.denies_per_second == 20.0
    assert new.p99_seconds is not None and 0.0005 < new.p99_seconds <= 0.001
    # A session the daemon restarted from scratch (counters back to 0) gives no negative.
    again = container_rows(after, status(session(2, "web", 0)), 1.0)
    assert again[0].calls_per_second == 0.0


def test_sorting_busiest_first_unknown_last() -> None:
    rows = [ContainerRow("b", calls_per_second=5.0, p99_seconds=0.1, inflight=1),
            ContainerRow("a", calls_per_second=50.0, p99_seconds=0.001),
            ContainerRow("c"),
            ContainerRow("d", calls_per_second=5.0, p99_seconds=None, inflight=3)]
    assert [r.container for r in sort_rows(rows, "calls")] == ["a", "b", "d", "c"]
    assert [r.container for r in sort_rows(rows, "p99")] == ["b", "a", "c", "d"]
    assert [r.container for r in sort_rows(rows, "inflight")] == ["d", "b", "a", "c"]
    assert [r.container for r in sort_rows(rows, "container")] == ["a", "b", "c", "d"]


def test_formats() -> None:
    assert [format_rate(v) for v in (None, 0.0, 12.34, 9999.4, 12345.0, 2.5e6)] == \
        ["-", "0.0", "12.3", "9999.4", "12.3k", "2.5M"]
    assert [format_seconds(v) for v in (None, 4.5e-5, 0.0012, 2.5, float("inf"))] == \
        ["-", "45us", "1.2ms", "2.50s", ">10.00s"]


def test_render_fits_the_width_and_shows_every_column() -> None:
    rows = container_rows(status(session(1, "web-1", 0)),
                          status(session(1, "web-1", 250, 5, latency=counts({0.0001: 250}),
                                         inflight=1, policies=("hardening", "audit"))), 0.5)
    lines = render(status(), rows, width=80)
    assert all(len(line) <= 80 for line in lines)
    assert lines[0] == "seccomp-supervisor 1.0  pid 7  up 1m05s  containers 1  sessions 1"
    assert lines[1].startswith("calls/s 500.0  denies/s 10.0  in flight 0  every 1s")
    assert lines[2].startswith("q quit")
    assert lines[3].split() == ["CONTAINER", "SESS", "CALLS/S", "DENIES/S", "P99",
                                "INFLIGHT", "POLICIES"]
    assert lines[4].split() == ["web-1", "1", "500.0", "10.0", "100us", "1", "hardening,audit"]
    # A long id is clipped so that the numbers stay on screen.
    long_rows = [ContainerRow("x" * 300, 1, ["p"], 0, 1.0, 0.0, None)]
    assert all(len(line) <= 100 for line in render(status(), long_rows, width=100))
    assert "(no containers are being served)" in render(status(), [])


def test_creator_strings_cannot_reach_the_terminal_raw() -> None:
    """An id with ESC [2J (clear screen), a newline and a bidi override is shown escaped,
    in its own line's cell: nothing of it acts on the terminal or forges a line."""
    hostile = [ContainerRow(HOSTILE_ID, 1, ["p\x07"], 0, 1.0, 0.0, 0.0001)]
    lines = render(status(), hostile, width=200)
    for line in lines:
        assert all(0x20 <= ord(c) < 0x7F for c in line), line
    assert len(lines) == 5 and lines[3].startswith("CONTAINER")  # no line of its own
    assert lines[4].startswith(r"evil\x1b[2J\x1b[H\x0aweb-1 1 99999.0\u202e")
    assert r"p\x07" in lines[4]
    assert printable("a\\x1b") == r"a\\x1b"  # a literal backslash is not an escape
    assert printable("\U0001f600\x7f\x9b") == r"\U0001f600\x7f\x9b"  # C1 CSI too
    # The same class of bug in `seccomp-supervisor status`: its table escapes too.
    text = format_status({"sessions": [{"container": HOSTILE_ID, "policies": ["p"],
                                        "metadata": "a=\x1b]0;title\x07"}]})
    assert all(0x20 <= ord(c) < 0x7F for c in text.replace("\n", "")), text
    assert r"evil\x1b[2J" in text and r"\x1b]0;title\x07" in text
    assert text.count("\n") == len(format_status({"sessions": [
        {"container": "plain", "policies": ["p"]}]}).splitlines())


# --------------------------------------------------------------------------- real daemon


@contextmanager
def served(tmp: Path) -> Iterator[tuple[DaemonProcess, list[RunningTarget]]]:
    """A real daemon (the echo policy) serving two looping targets: "web-1" (every 4th
    call makes the handler raise: a deny) and one with HOSTILE_ID."""
    stop = tmp / "stop"
    targets: list[RunningTarget] = []
    with daemon_process(tmp, config_text(tmp)) as d:
        d.start()
        try:
            targets.append(start_target(d.socket_path, 0, 0, "--until", str(stop),
                                        "--pause", "0.002", "--storm", "4",
                                        container_id="web-1"))
            targets.append(start_target(d.socket_path, 1, 0, "--until", str(stop),
                                        "--pause", "0.02", container_id=HOSTILE_ID))
            d.wait_sessions(2)
            yield d, targets
            stop.touch()
            for target in targets:
                report = target.result(20)
                assert report["wrong"] == 0, report
        finally:
            stop.touch()
            for target in targets:
                target.kill()


def test_status_has_what_top_needs(tmp_path: Path) -> None:
    with served(tmp_path) as (d, _targets):
        deadline = time.monotonic() + 20
        result = d.status()
        while not all(s["decisions"] for s in result["sessions"]):
            assert time.monotonic() < deadline, result
            time.sleep(0.05)
            result = d.status()
    assert result["latency_bounds"] == BOUNDS
    serials = set()
    for s in result["sessions"]:
        assert len(s["latency_counts"]) == len(BOUNDS) + 1
        # Every answer is in the histogram (counted after it went out: a snapshot may
        # catch one answer between the two counters).
        assert sum(s["decisions"].values()) - sum(s["latency_counts"]) in (0, 1)
        assert sum(s["latency_counts"]) > 0
        serials.add(s["session"])
    assert len(serials) == 2


def test_top_batch(tmp_path: Path) -> None:
    with served(tmp_path) as (d, _targets):
        out = subprocess.run(
            [sys.executable, "-m", "supervisor", "top", "--control", d.control_path,
             "--batch", "--interval", "0.5", "-n", "2", "--sort", "container"],
            cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    screens = out.stdout.split("\n\n")
    assert len(screens) == 4  # two screens, each with a blank line after its header
    table = screens[3].splitlines()
    assert table[0].split()[:3] == ["CONTAINER", "SESS", "CALLS/S"]
    assert [line.split()[0] for line in table[1:]] == [
        r"evil\x1b[2J\x1b[H\x0aweb-1", "web-1"]
    web = table[2].split()
    assert float(web[2]) > 0 and float(web[3]) > 0 and web[-1] == "echo"
    assert all(0x20 <= ord(c) < 0x7F for c in out.stdout.replace("\n", ""))
    missing = subprocess.run(
        [sys.executable, "-m", "supervisor", "top", "--control", str(tmp_path / "none"),
         "--batch"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert missing.returncode == 1 and "No such file" in missing.stderr


class Tmux:
    """A tmux server of our own (its own socket, no user config), killed at the end."""

    def __init__(self, socket_path: Path) -> None:
        tool = shutil.which("tmux")
        assert tool, "tmux is missing: install the Debian package tmux (dev.sh)"
        self.base = [tool, "-S", str(socket_path), "-f", "/dev/null"]

    def __call__(self, *args: str) -> str:
        return subprocess.run([*self.base, *args], check=True, capture_output=True,
                              text=True, timeout=10).stdout

    def screen(self) -> list[str]:
        return self("capture-pane", "-p", "-t", "top").splitlines()

    def kill(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True, timeout=10)


def wait_screen(tmux: Tmux, ready: Any, timeout: float = 20) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        screen = tmux.screen()
        if ready(screen):
            return screen
        if time.monotonic() > deadline:
            raise AssertionError("the screen never got there:\n" + "\n".join(screen))
        time.sleep(0.1)


def row(screen: list[str], container: str) -> list[str] | None:
    for line in screen:
        if line.startswith(container + " "):
            return line.split()
    return None


def busy(screen: list[str]) -> bool:
    web = row(screen, "web-1")
    return web is not None and re.fullmatch(r"[0-9.]+k?", web[2]) is not None \
        and float(web[2].rstrip("k")) > 0


def test_top_in_a_real_terminal(tmp_path: Path) -> None:
    tmux = Tmux(tmp_path / "tmux.sock")
    with served(tmp_path) as (d, _targets):
        # The pane's shell writes top's exit status. (tmux's own #{pane_dead_status}
        # with remain-on-exit sometimes never came: tmux 3.3a left top a zombie.)
        exit_status = tmp_path / "top.status"
        command = shlex.join([sys.executable, "-m", "supervisor", "top", "--control",
                              d.control_path, "--interval", "0.5"])
        command += f"; echo $? > {shlex.quote(str(exit_status))}"
        try:
            tmux("new-session", "-d", "-s", "top", "-x", "120", "-y", "30",
                 "-c", str(ROOT), command)
            screen = wait_screen(tmux, busy)
            head = screen[0].split()
            assert head[:4] == ["seccomp-supervisor", __version__, "pid", str(d.pid)]
            assert screen[0].endswith("containers 2  sessions 2")
            assert "sorted by CALLS/S" in screen[1] and screen[2].startswith("q quit")
            assert screen[3].split() == ["CONTAINER", "SESS", "CALLS/S", "DENIES/S", "P99",
                                         "INFLIGHT", "POLICIES"]
            web = row(screen, "web-1")
            assert web is not None
            assert web[1] == "1" and float(web[2]) > 0 and float(web[3]) > 0
            assert re.fullmatch(r"[0-9.]+(us|ms|s)", web[4]) and web[6] == "echo"
            # The hostile id: on one line, escaped, the rest of the screen intact (a
            # clear screen would have wiped the header; a raw newline would have split
            # the line and forged a second "web-1" row).
            hostile = [line for line in screen if line.startswith("evil")]
            assert len(hostile) == 1
            assert hostile[0].startswith(r"evil\x1b[2J\x1b[H\x0aweb-1 1 99999.0\u202e")
            assert hostile[0].split()[-1] == "echo"
            assert sum(1 for line in screen if line.startswith("web-1")) == 1
            # Sorted busiest first: web-1 makes ten times the calls.
            rows = [line for line in screen[4:] if line.strip()]
            assert rows[0].startswith("web-1")
            # A key changes the order: n sorts by name.
            tmux("send-keys", "-t", "top", "n")
            wait_screen(tmux, lambda s: "sorted by CONTAINER" in s[1]
                        and next(x for x in s[4:] if x.strip()).startswith("evil"))
            tmux("send-keys", "-t", "top", "q")
            deadline = time.monotonic() + 10
            while not exit_status.exists() or not exit_status.read_text().strip():
                assert time.monotonic() < deadline, "top did not exit on q"
                time.sleep(0.05)
            assert exit_status.read_text().strip() == "0"
        finally:
            tmux.kill()
    assert not os.path.exists(tmp_path / "tmux.sock") or not _tmux_alive(tmux)


def _tmux_alive(tmux: Tmux) -> bool:
    return subprocess.run([*tmux.base, "has-session"], capture_output=True,
                          timeout=10).returncode == 0


def test_the_cli_parser_does_not_import_trio() -> None:
    """Every `seccomp-supervisor` command builds the parser, `top`'s included: that must
    not cost every command the import of trio (170 ms)."""
    code = ("import sys, supervisor.cli\nsupervisor.cli._parser()\n"
            "assert 'trio' not in sys.modules, 'trio imported'\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
