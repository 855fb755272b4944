"""The compiled hot loop is built by the package's install and selected by default; the
pure-Python loop stays selectable (supervisor/accel.py)."""

from __future__ import annotations

import os
import subprocess
import sys

from supervisor import accel

_PROBE = ("import supervisor.accel as a, supervisor.metrics as m; "
          "print(a.KIND); print(a.WHY); "
          "import prometheus_client as p; r = p.CollectorRegistry(); m.Metrics(r); "
          "print(r.get_sample_value('seccomp_supervisor_build_info', "
          "{'version': m.__version__, 'python': m.platform.python_version(), "
          "'hot_loop': a.KIND}) and a.KIND)")


def _probe(**env: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", _PROBE], env={**os.environ, **env},
                         capture_output=True, text=True, check=True, timeout=60)
    return out.stdout.splitlines()


def test_the_install_built_the_compiled_hot_loop() -> None:
    # The setup (./dev.sh) installs gcc and python3-dev: a missing extension here means
    # the build failed quietly (setup.py marks it optional), and CI would test only the
    # pure-Python loop.
    env = {k: v for k, v in os.environ.items() if k != accel.NO_EXTENSIONS_ENV}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                         text=True, check=True, timeout=60).stdout.splitlines()
    assert out == ["c", "compiled", "c"], out


def test_the_environment_variable_selects_pure_python() -> None:
    kind, why, label = _probe(**{accel.NO_EXTENSIONS_ENV: "1"})
    assert (kind, label) == ("python", "python")
    assert accel.NO_EXTENSIONS_ENV in why


def test_zero_keeps_the_compiled_loop() -> None:
    assert _probe(**{accel.NO_EXTENSIONS_ENV: "0"})[0] == "c"
