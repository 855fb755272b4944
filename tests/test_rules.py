"""deploy/prometheus: the rules pass `promtool check rules`, their unit tests pass `promtool
test rules`, every alert is written for an operator (severity, summary, description) and
tested both ways, and the unit tests bite: a rule broken on purpose fails them.

(That the metric names in the rules exist on a real daemon is checked by
tests/test_dashboard.py, which loads these rules into a real Prometheus.)"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
RULES = DEPLOY / "seccomp-supervisor.rules.yml"
TESTS = DEPLOY / "seccomp-supervisor.rules.test.yml"


def promtool() -> str:
    tool = shutil.which("promtool")
    assert tool, "promtool is missing: install the Debian package prometheus (dev.sh)"
    return tool


def alert_blocks(text: str) -> dict[str, str]:
    """Alert name -> the text of its rule (up to the next rule or the end)."""
    starts = [(m.start(), m.group(1)) for m in re.finditer(r"^\s+- alert: (\S+)$", text, re.M)]
    ends = [m.start() for m in re.finditer(r"^\s+- (?:alert|record): ", text, re.M)]
    blocks = {}
    for start, name in starts:
        end = min([e for e in ends if e > start] + [len(text)])
        blocks[name] = text[start:end]
    return blocks


def test_promtool_check_rules() -> None:
    checked = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout


def test_promtool_unit_tests_pass() -> None:
    tested = subprocess.run([promtool(), "test", "rules", str(TESTS)], capture_output=True,
                            text=True, timeout=120, cwd=DEPLOY)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_alert_is_written_for_an_operator_and_tested_both_ways() -> None:
    blocks = alert_blocks(RULES.read_text())
    assert set(blocks) >= {
        "SeccompSupervisorDown", "SeccompSupervisorHandlerErrors",
        "SeccompSupervisorDeadlineMisses", "SeccompSupervisorNotificationsGone",
        "SeccompSupervisorSlowDecisions", "SeccompSupervisorRateLimited",
        "SeccompSupervisorAuditLinesSuppressed", "SeccompSupervisorRestarted",
        "SeccompSupervisorReloadFailed", "SeccompSupervisorHandoffsFailing",
        "SeccompSupervisorNoSessions", "SeccompSupervisorFdKeeperGone",
        "SeccompSupervisorMemoryReadsStuck"}
    tests = TESTS.read_text()
    for name, block in blocks.items():
        assert re.search(r"^\s+severity: (critical|warning|info)$", block, re.M), name
        assert re.search(r"^\s+summary: \S", block, re.M), name
        assert re.search(r"^\s+description: \S", block, re.M), name
        # Fires where it should (a non-empty exp_alerts) and stays quiet where it should
        # not (an empty one; the firing cases list every alert, so the quiet instances of
        # the same evaluation are checked too).
        cases = re.findall(rf"alertname: {name}\n\s+exp_alerts:( \[\])?", tests)
        assert "" in cases, f"{name}: no test where it fires"
        assert " []" in cases, f"{name}: no test where it stays quiet"


# Each change breaks one rule the way a careless edit would; the unit tests must fail,
# naming the alert. (old text, new text, the alert whose test must fail)
MUTATIONS = [
    ('up{job="seccomp-supervisor"} == 0', 'up{job="seccomp-supervisor"} >= 0',
     "SeccompSupervisorDown"),
    ('{kind!="deadline"} > 0', '{kind!="deadline"} >= 0', "SeccompSupervisorHandlerErrors"),
    ('{kind="deadline"} > 0', '{kind="deadline"} >= 0', "SeccompSupervisorDeadlineMisses"),
    ("ratio_rate5m > 0.05", "ratio_rate5m > 0.005", "SeccompSupervisorNotificationsGone"),
    ("(seccomp_supervisor:notifications_gone:rate5m) > 1",
     "(seccomp_supervisor:notifications_gone:rate5m) > 0.01",
     "SeccompSupervisorNotificationsGone"),
    ("p99_rate5m > 0.1", "p99_rate5m > 0.01", "SeccompSupervisorSlowDecisions"),
    ('{policy="(rate)"}', '{policy=~".+"}', "SeccompSupervisorRateLimited"),
    ("audit_lines_suppressed:rate5m > 0", "audit_lines_suppressed:rate5m >= 0",
     "SeccompSupervisorAuditLinesSuppressed"),
    ("and on (job, instance) seccomp_supervisor_build_info", "",
     "SeccompSupervisorRestarted"),
    ("changes(process_start_time_seconds[15m])", "changes(process_start_time_seconds[30m])",
     "SeccompSupervisorRestarted"),
    ('{result="failed"}', '{result=~".+"}', "SeccompSupervisorReloadFailed"),
    ('{result!="accepted"}[5m])) > 0', '{result!="accepted"}[5m])) >= 0',
     "SeccompSupervisorHandoffsFailing"),
    ("(seccomp_supervisor_sessions) == 0", "(seccomp_supervisor_sessions) >= 0",
     "SeccompSupervisorNoSessions"),
    ('{container_state="running"}', "", "SeccompSupervisorNoSessions"),
    ('"([^:]+)(?::[0-9]+)?")\n          and on (host)', '"(.*)")\n          and on (host)',
     "SeccompSupervisorNoSessions"),
    ("fd_keeper_attached == 0\n        for: 2m", "fd_keeper_attached >= 0\n        for: 2m",
     "SeccompSupervisorFdKeeperGone"),
    ("fd_keeper_attached == 0\n        for: 2m", "fd_keeper_attached == 0\n        for: 0m",
     "SeccompSupervisorFdKeeperGone"),
    ("memory_read_threads_slow > 16", "memory_read_threads_slow > 26",
     "SeccompSupervisorMemoryReadsStuck"),
    ("memory_read_threads_slow > 16\n        for: 10m",
     "memory_read_threads_slow > 16\n        for: 3m", "SeccompSupervisorMemoryReadsStuck"),
    # Never fires: every firing case must notice.
    ("- alert: SeccompSupervisorDeadlineMisses", "- alert: SeccompSupervisorDeadlineMissed",
     "SeccompSupervisorDeadlineMisses"),
]


def unit_tests_of(alert: str) -> str:
    """The unit-test file with only the test groups that evaluate ``alert``."""
    text = TESTS.read_text()
    head, *groups = re.split(r"^(?=  - name: )", text, flags=re.M)
    return head + "".join(g for g in groups if f"alertname: {alert}\n" in g)


def test_the_unit_tests_fail_on_broken_rules(tmp_path: Path) -> None:
    original = RULES.read_text()
    runs = []
    for i, (old, new, alert) in enumerate(MUTATIONS):
        assert original.count(old) == 1, f"mutation {i} matches {original.count(old)} times"
        where = tmp_path / str(i)
        where.mkdir()
        (where / RULES.name).write_text(original.replace(old, new))
        (where / TESTS.name).write_text(unit_tests_of(alert))
        # In parallel: promtool spends most of its time waiting.
        runs.append((old, alert, subprocess.Popen(
            [promtool(), "test", "rules", TESTS.name], cwd=where, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)))
    try:
        for old, alert, proc in runs:
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode != 0, f"the tests pass with {old!r} broken"
            assert f"alertname: {alert}," in out, out
    finally:
        for _old, _alert, proc in runs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    # The unmutated rules pass the same reduced tests (so each failure above is the
    # mutation's).
    for alert in {alert for _old, _new, alert in MUTATIONS}:
        (tmp_path / alert).mkdir()
        shutil.copy(RULES, tmp_path / alert / RULES.name)
        (tmp_path / alert / TESTS.name).write_text(unit_tests_of(alert))
    tested = subprocess.run(
        [promtool(), "test", "rules",
         *(f"{alert}/{TESTS.name}" for alert in {a for _o, _n, a in MUTATIONS})],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert tested.returncode == 0, tested.stdout + tested.stderr
