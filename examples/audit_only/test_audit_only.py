"""The audit-only observer: everything continues, and the summary is right."""

import logging
import os
from pathlib import Path

from supervisor.policy import Container
from supervisor.testing import load, run_policy

OBSERVER = Path(__file__).with_name("observer.py")


def test_every_call_continues_and_is_counted(tmp_path, caplog):
    def work():
        for i in range(3):
            os.mkdir(tmp_path / str(i))
        os.rmdir(tmp_path / "0")
        return os.getppid()

    caplog.set_level(logging.INFO, logger="supervisor.policy.audit_only")
    trial = run_policy(load(OBSERVER), work, syscalls=["mkdir", "rmdir", "getppid"],
                       container=Container(id="web-1"))
    assert trial.value == os.getpid()  # getppid ran: the parent is this process
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]
    assert set(trial.decided()) == {"allow"} and len(trial.decisions) == 5
    assert caplog.messages == ["container 'web-1': 5 notified calls: mkdir=3 rmdir=1 "
                               "getppid=1"]
