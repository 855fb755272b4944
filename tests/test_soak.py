"""The soak at CI scale: every target checks every answer; nothing lost, nothing wrong,
the daemon's fds and RSS flat from wave to wave. Full scale: ``python -m tests.soak``
(see tests/soak.py); ``SOAK_TARGETS`` / ``SOAK_CALLS`` change the scale here."""

from __future__ import annotations

import os
from pathlib import Path

from .soak import run_soak


def test_soak(tmp_path: Path) -> None:
    targets = int(os.environ.get("SOAK_TARGETS", "20"))
    calls = int(os.environ.get("SOAK_CALLS", "2000"))
    report = run_soak(tmp_path, targets, calls, waves=3)
    print("\n" + report.summary())
    assert report.lost == 0, report.summary()
    assert report.wrong == 0, report.samples[:5]
    assert report.notifications == targets * calls
    assert report.gone == 0 and report.handler_errors == 0
    # Flat: the same fds after every wave (sessions all ended), and no RSS growth
    # beyond allocator noise between the first wave and the last.
    assert len(set(report.fds)) == 1, report.fds
    assert report.rss_kib[-1] - report.rss_kib[0] < 4096, report.rss_kib
