"""deploy/grafana/seccomp-supervisor.json: a well-formed Grafana dashboard whose every query
returns data from a real Prometheus (Debian's ``prometheus``, on loopback) scraping a real
daemon that serves real calls; and the Prometheus rules (deploy/prometheus) loaded into
that server evaluate without error, every recording rule has data and every metric an
alert names exists."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .soak import DaemonProcess, RunningTarget, config_text, daemon_process, start_target

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "seccomp-supervisor.json"
RULES = ROOT / "deploy" / "prometheus" / "seccomp-supervisor.rules.yml"
JOB = "seccomp-supervisor"
# What Grafana puts for $__rate_interval is at least four scrape intervals; a second here.
RATE_INTERVAL = "10s"
# Metrics the rules use that come from elsewhere (the kubelet).
EXTERNAL = {"kubelet_running_containers"}
#: Exported only by a daemon started with --fd-keeper (its sample is labelled with the
#: keeper's path); tests/test_keeper.py scrapes it from one.
KEEPER_ONLY = {"seccomp_supervisor_fd_keeper_attached"}


def load() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def exprs(dashboard: dict[str, Any]) -> list[tuple[str, str, set[str]]]:
    """(panel title and refId, expression, labels its legend shows) of every target of
    every panel."""
    return [(f"{p['title']} {t['refId']}", t["expr"],
             set(re.findall(r"\{\{\s*(\w+)\s*\}\}", t.get("legendFormat", ""))))
            for p in dashboard["panels"] for t in p["targets"]]


def interpolate(expr: str, job: str, instance: str) -> str:
    """What Grafana sends for one job and one instance: a multi-value variable's value is
    regex-escaped, and the escape doubled for the PromQL string."""
    out = (expr.replace("$__rate_interval", RATE_INTERVAL)
           .replace("$job", job)
           .replace("$instance", re.escape(instance).replace("\\", "\\\\")))
    assert "$" not in out, f"a variable the test does not know: {out}"
    return out


# --------------------------------------------------------------------------- structure


def test_dashboard_structure() -> None:
    d = load()
    assert d["schemaVersion"] >= 36 and d["uid"] == "seccomp-supervisor" and d["title"]
    assert d["id"] is None  # importable into any Grafana
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert "label_values(seccomp_supervisor_build_info, job)" in variables["job"]["definition"]
    assert variables["instance"]["multi"] and variables["instance"]["includeAll"]
    assert '{job=~"$job"}' in variables["instance"]["definition"]
    source = {"type": "prometheus", "uid": "${datasource}"}
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for p in d["panels"]:
        title = p["title"]
        assert p["datasource"] == source, title
        assert p["description"], title
        grid = p["gridPos"]
        assert set(grid) == {"x", "y", "w", "h"}, title
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["h"] > 0, title
        assert grid["x"] + grid["w"] <= 24, title
        mine = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not mine & cells, f"{title} overlaps another panel"
        cells |= mine
        assert p["targets"], f"{title} has no query"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), title
        for target in p["targets"]:
            assert target["datasource"] == source, title
            expr = target["expr"]
            # Every selector is scoped to the chosen job and instances.
            selectors = re.findall(r"\b([a-z_:]+)\{([^}]*)\}", expr)
            assert selectors, expr
            for _name, matchers in selectors:
                assert 'job=~"$job"' in matchers and 'instance=~"$instance"' in matchers, expr
            bare = re.findall(r"\b(seccomp_supervisor_\w+|process_\w+)\b(?!\{)", expr)
            assert not bare, f"{title}: unscoped {bare}"
    types = {p["type"] for p in d["panels"]}
    assert {"timeseries", "heatmap", "stat"} <= types
    [heatmap] = [p for p in d["panels"] if p["type"] == "heatmap"]
    assert heatmap["targets"][0]["format"] == "heatmap"
    assert "_bucket" in heatmap["targets"][0]["expr"]
    titles = " | ".join(p["title"] for p in d["panels"]).lower()
    for wanted in ("policy and kind", "latency", "in flight", "sessions", "gone",
                   "handler errors", "handoffs", "suppressed"):
        assert wanted in titles, wanted


# --------------------------------------------------------------------------- real queries


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@contextmanager
def prometheus(tmp: Path, target: str) -> Iterator[str]:
    """A Prometheus server on a free loopback port scraping ``target`` every second,
    with the rules loaded; stopped (by its pid) at the end. Yields its base URL."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing: install the Debian package prometheus (dev.sh)"
    port = free_port()
    config = tmp / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {json.dumps(str(RULES))}\n"
        f"scrape_configs:\n  - job_name: {JOB}\n"
        f"    static_configs:\n      - targets: [{json.dumps(target)}]\n")
    with open(tmp / "prometheus.log", "wb") as log:
        proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}",
             f"--storage.tsdb.path={tmp / 'tsdb'}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, (tmp / "prometheus.log").read_text()
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "prometheus did not get ready"
            time.sleep(0.1)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def query(base: str, expr: str) -> list[Any]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    body = get_json(url)
    assert body["status"] == "success", body
    result: list[Any] = body["data"]["result"]
    return result


@contextmanager
def busy_daemon(tmp: Path) -> Iterator[DaemonProcess]:
    """`seccomp-supervisor serve` with metrics on a free loopback port, a rate limit, and
    two looping targets: "web-1" (fast, every 10th call makes the handler raise, over the
    rate limit) and "db-1" (slower)."""
    tmp.mkdir()
    stop = tmp / "stop"
    targets: list[RunningTarget] = []
    with daemon_process(tmp, config_text(tmp, "rate = 200\nrate_burst = 20\n")) as d:
        d.start()
        try:
            targets.append(start_target(d.socket_path, 0, 0, "--until", str(stop),
                                        "--pause", "0.001", "--storm", "10",
                                        "--eagain-ok", container_id="web-1"))
            targets.append(start_target(d.socket_path, 1, 0, "--until", str(stop),
                                        "--pause", "0.02", container_id="db-1"))
            d.wait_sessions(2)
            yield d
            stop.touch()
            for target in targets:
                report = target.result(20)
                assert report["wrong"] == 0 and report["ok"] > 0, report
        finally:
            stop.touch()
            for target in targets:
                target.kill()


def test_every_query_returns_data_from_a_real_prometheus(tmp_path: Path) -> None:
    dashboard = load()
    with busy_daemon(tmp_path / "daemon") as d:
        target = urllib.parse.urlsplit(d.metrics_url()).netloc
        (tmp_path / "prom").mkdir()
        with prometheus(tmp_path / "prom", target) as base:
            queries = [(where, interpolate(expr, JOB, target), legend)
                       for where, expr, legend in exprs(dashboard)]
            records = re.findall(r"^\s+- record: (\S+)$", RULES.read_text(), re.M)
            queries += [(f"record {name}", name, set()) for name in records]
            # Until every query has data (a few scrapes, and rule evaluations), or 30 s.
            results: dict[str, list[Any]] = {}
            empty = queries
            deadline = time.monotonic() + 30
            while empty and time.monotonic() < deadline:
                time.sleep(0.5)
                results = {expr: query(base, expr) for _where, expr, _legend in empty}
                empty = [q for q in empty if not results[q[1]]]
            assert not empty, "no data for:\n" + "\n".join(f"{w}: {e}" for w, e, _ in empty)
            # The labels a legend shows are in every series the query returns (a grouping
            # by a label the metric does not have still returns data).
            for where, expr, legend in queries:
                for sample in query(base, expr):
                    assert legend <= set(sample["metric"]), (where, sample["metric"])

            # The variables' queries (label_values) find this job and instance.
            jobs = {s["metric"]["job"] for s in query(base, "seccomp_supervisor_build_info")}
            instances = {s["metric"]["instance"] for s in query(
                base, f'seccomp_supervisor_build_info{{job=~"{JOB}"}}')}
            assert jobs == {JOB} and instances == {target}

            # Real traffic of each kind the panels are about reached Prometheus.
            decided = {(s["metric"]["policy"], s["metric"]["decision"]) for s in query(
                base, "sum by (policy, decision) (seccomp_supervisor_notifications_total)")}
            assert {("echo", "returns"), ("echo", "deny"), ("(rate)", "deny")} <= decided
            errors = query(base, "seccomp_supervisor_handler_errors_total")
            assert {s["metric"]["kind"] for s in errors} == {"exception"}

            # Every rule evaluates without error; every metric an alert names exists.
            groups = get_json(f"{base}/api/v1/rules")["data"]["groups"]
            rules = [r for g in groups for r in g["rules"]]
            assert len(rules) == RULES.read_text().count("- record:") + \
                RULES.read_text().count("- alert:")
            bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
            assert not bad, bad
            names = set(re.findall(r"\b((?:seccomp_supervisor|process|kubelet)_[a-z_]+)\b",
                                   RULES.read_text()))
            names = {n for n in names if not n.endswith("_")} - EXTERNAL - KEEPER_ONLY
            missing = [n for n in sorted(names) if not query(base, f"count({n})")]
            assert not missing, missing
            up = query(base, f'up{{job="{JOB}"}}')
            assert [s["value"][1] for s in up] == ["1"]
    assert not os.path.exists(tmp_path / "prom" / "tsdb" / "lock")
