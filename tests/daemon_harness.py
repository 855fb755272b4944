"""A real daemon in the test's trio loop, configured from TOML text, on a socket in tmp.

    async with running_daemon(tmp_path, POLICIES_TOML) as d:
        await d.run(["--notify", "chmod", "--", "chmod", "u+s", path])   # the real CLI
        d.metric("seccomp_supervisor_notifications_total", syscall=..., ...)

The config text gets a ``[listen]`` and ``[metrics]`` table prepended unless it has its
own; ``{tmp}`` in it is replaced with the test's directory.
"""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio
from prometheus_client import CollectorRegistry

from supervisor.cli import load_everything
from supervisor.daemon import Daemon
from supervisor.systemd import Notifier

CLI = [sys.executable, "-m", "supervisor"]


@dataclass
class RunningDaemon:
    daemon: Daemon
    socket_path: str
    config_path: Path
    registry: CollectorRegistry
    audit: io.StringIO

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    async def run(self, args: Sequence[str], *, check: bool = False,
                  timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
        """``seccomp-supervisor run --socket SOCK ARGS`` as a real subprocess."""
        with trio.fail_after(timeout):
            return await trio.run_process(
                [*CLI, "run", "--socket", self.socket_path, *args],
                capture_stdout=True, capture_stderr=True, check=check)

    def audit_lines(self) -> list[str]:
        self.daemon.recorder.flush()  # lines wait for the writer task; write them now
        return [line for line in self.audit.getvalue().splitlines() if line]

    @property
    def control_path(self) -> str:
        return self.daemon.state.config.listen.control_socket


def write_config(tmp_path: Path, text: str, *, metrics: bool = False) -> Path:
    text = text.replace("{tmp}", str(tmp_path))
    head = ""
    if "[listen]" not in text:
        head += f'[listen]\nsocket = "{tmp_path}/sock/notify.sock"\n'
        head += f'control_socket = "{tmp_path}/sock/control.sock"\n'
    if "[metrics]" not in text:
        head += '[metrics]\nlisten = "127.0.0.1:0"\n' if metrics else '[metrics]\nlisten = ""\n'
    path = tmp_path / "config.toml"
    path.write_text(head + text)
    return path


@asynccontextmanager
async def running_daemon(tmp_path: Path, config_text: str, *, metrics: bool = False,
                         notifier: Notifier | None = None) -> AsyncIterator[RunningDaemon]:
    """Start a :class:`Daemon` from ``config_text`` in a child nursery; stop it on exit.
    ``notifier``: where its sd_notify messages go (else from the environment)."""
    config_path = write_config(tmp_path, config_text, metrics=metrics)
    config, policies = load_everything(str(config_path))
    registry = CollectorRegistry()
    audit = io.StringIO()

    daemon = Daemon(config, policies, registry=registry, audit_stream=audit,
                    loader=lambda: load_everything(str(config_path)),
                    notifier=notifier)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        try:
            yield RunningDaemon(daemon, config.listen.socket, config_path, registry, audit)
        finally:
            nursery.cancel_scope.cancel()
