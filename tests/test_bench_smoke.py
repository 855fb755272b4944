"""The benchmark (bench/run.py) at a tiny scale, so it cannot rot: real targets, the real
daemon with a sync and an async policy, every answer checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_bench_quick_run_answers_every_call(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--json", str(out),
         "--out", str(tmp_path / "build")],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["runs"][0]
    by_name = {(r["sup"], r["k"]): r for r in rows}
    for sup in ("sync", "async"):
        for k in (1, 4):
            row = by_name[(sup, k)]
            assert "error" not in row, row
            assert row["calls"] == (400 // k) * k
            assert row["wrong"] == 0
            assert row["p50_us"] > 0 and row["calls_per_s"] > 0
            assert row["rss_idle_mb"] > 1
    # the default config, and the memory-reading rows (path_guard and the C reference):
    # every answer EACCES, checked by the target; the emulated mknod row
    for name, k in (("default", 1), ("default", 4), ("guard mkdirat/256", 1),
                    ("C mem mkdirat/256", 1), ("guard openat/256", 1),
                    ("C mem openat/256", 1), ("emulated mknod", 1)):
        row = by_name[(name, k)]
        assert "error" not in row, row
        assert row["wrong"] == 0 and row["calls"] > 0
    if (REPO.parent / "shared" / "bench" / "src" / "sup_c.c").exists():
        assert by_name[("C blk", 1)]["wrong"] == 0
        assert by_name[("C epoll", 4)]["wrong"] == 0
    assert "Issue 6 targets" in proc.stdout


def test_bench_emulate_runs(tmp_path: Path) -> None:
    """bench/emulate.py at a tiny scale: every row made its calls."""
    out = tmp_path / "emulate.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "emulate.py"), "--calls", "5",
                           "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {r["row"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"emulated mknod", "enforced open", "fifo (CONTINUE)"}
    assert all(r["calls"] == 5 and r["p50_us"] > 0 for r in rows.values())


def test_listen_time_bench_runs() -> None:
    """bench/listen_time.py at two runs: it starts the daemon, connects, sees it ready."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "listen_time.py"), "--runs", "2"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("listen  median") and "\nready   median" in proc.stdout


def test_guardcost_bench_runs() -> None:
    """bench/guardcost.py (path_guard's decision and the session's, without the kernel):
    each row checks its answers (EACCES for every call)."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "guardcost.py"), "--calls", "300",
         "--repeat", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("us per call") == 6, proc.stdout
