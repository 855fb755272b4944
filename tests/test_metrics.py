"""/metrics over real HTTP (prometheus-client's exporter, started by the daemon) after real
notifications, checked value by value and by ``promtool check metrics`` (Debian package
``prometheus``)."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
import trio
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from supervisor import __version__
from supervisor.metrics import DECISION_BUCKETS, Metrics

from .daemon_harness import RunningDaemon, running_daemon

ROOT = Path(__file__).resolve().parent.parent
HARDENING = f"""
[defaults]
policies = ["hardening"]

[[policy]]
name = "hardening"
path = "{ROOT}/policies/hardening.py"
"""
CHMOD = ["--notify", "chmod", "--notify", "fchmodat", "--notify", "fchmodat2", "--"]
# Labels that would make the number of series grow with the number of containers.
UNBOUNDED = {"pid", "tid", "container", "container_id", "id"}


async def scrape(d: RunningDaemon) -> str:
    address = d.daemon.metrics_address
    assert address is not None
    url = f"http://{address[0]}:{address[1]}/metrics"

    def get() -> str:
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            return str(response.read().decode())

    return await trio.to_thread.run_sync(get)


def samples(text: str) -> list[Sample]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(text: str, name: str, **labels: str) -> float | None:
    for s in samples(text):
        if s.name == name and s.labels == labels:
            return s.value
    return None


@pytest.mark.usefixtures("hot_loop")
async def test_scrape_after_real_notifications(tmp_path: Path) -> None:
    victim = tmp_path / "file"
    victim.write_text("")
    async with running_daemon(tmp_path, HARDENING, metrics=True) as d:
        denied = await d.run([*CHMOD, "chmod", "u+s", str(victim)])
        assert denied.returncode == 1
        for mode in ("600", "640"):
            allowed = await d.run([*CHMOD, "chmod", mode, str(victim)])
            assert allowed.returncode == 0, allowed.stderr
        with trio.fail_after(10):
            while d.daemon.sessions:
                await trio.sleep(0.01)
        text = await scrape(d)

    # Which of chmod/fchmodat/fchmodat2 coreutils uses depends on its version: sum them.
    def by_decision(decision: str) -> float:
        return sum(value(text, "seccomp_supervisor_notifications_total", syscall=name,
                         policy="hardening", decision=decision) or 0.0
                   for name in ("chmod", "fchmodat", "fchmodat2"))

    assert by_decision("deny") == 1
    assert by_decision("allow") == 2
    histogram = [s for s in samples(text) if s.name.startswith("seccomp_supervisor_decision_")]
    count = sum(s.value for s in histogram if s.name.endswith("_count"))
    assert count == 3
    total_seconds = sum(s.value for s in histogram if s.name.endswith("_sum"))
    assert 0 < total_seconds < 3  # seconds, not micro- or nanoseconds
    bounds = sorted({float(s.labels["le"]) for s in histogram if s.name.endswith("_bucket")})
    assert bounds[0] == 1e-05 and bounds[-2] == 10.0 and bounds[-1] == float("inf")
    assert value(text, "seccomp_supervisor_handoffs_total", result="accepted") == 3
    assert value(text, "seccomp_supervisor_handoffs_total", result="invalid") == 0
    assert value(text, "seccomp_supervisor_sessions") == 0
    assert value(text, "seccomp_supervisor_inflight") == 0
    assert value(text, "seccomp_supervisor_notifications_gone_total", stage="recv") == 0
    [build] = [s for s in samples(text) if s.name == "seccomp_supervisor_build_info"]
    assert build.labels["version"] == __version__ and build.value == 1
    assert (value(text, "process_open_fds") or 0) > 0
    assert (value(text, "process_start_time_seconds") or 0) > 0
    for s in samples(text):
        if s.name.startswith("seccomp_supervisor_"):
            assert not UNBOUNDED & set(s.labels), s


def promtool(tool: str, text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool, "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=60)


async def test_promtool_accepts_a_real_scrape(tmp_path: Path) -> None:
    tool = shutil.which("promtool")
    assert tool, "promtool is missing: install the Debian package prometheus (dev.sh)"
    async with running_daemon(tmp_path, HARDENING, metrics=True) as d:
        result = await d.run([*CHMOD, "chmod", "u+s", str(tmp_path)])
        assert result.returncode == 1
        text = await scrape(d)
    assert "seccomp_supervisor_notifications_total{" in text
    checked = promtool(tool, text)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # The check can fail: a counter without _total is a lint error.
    broken = text + "# HELP bad_counter x\n# TYPE bad_counter counter\nbad_counter 1\n"
    checked = promtool(tool, broken)
    assert checked.returncode != 0 and "bad_counter" in checked.stdout + checked.stderr


def test_buckets_span_10us_to_10s() -> None:
    assert DECISION_BUCKETS[0] == 10e-6 and DECISION_BUCKETS[-1] == 10.0
    assert list(DECISION_BUCKETS) == sorted(set(DECISION_BUCKETS))


def test_metrics_live_on_the_registry_passed_in() -> None:
    one, two = CollectorRegistry(), CollectorRegistry()
    Metrics(one).notifications.labels("chmod", "p", "deny").inc()
    Metrics(two, process=True)
    assert one.get_sample_value("seccomp_supervisor_notifications_total",
                                {"syscall": "chmod", "policy": "p", "decision": "deny"}) == 1
    assert two.get_sample_value("seccomp_supervisor_notifications_total",
                                {"syscall": "chmod", "policy": "p", "decision": "deny"}) is None
    assert one.get_sample_value("process_open_fds") is None
    assert (two.get_sample_value("process_open_fds") or 0) > 0
