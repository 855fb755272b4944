"""The compiled hot loop and reading thread are built by the package's install and
selected by default; the pure-Python ones stay selectable (supervisor/accel.py)."""

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


_READER_PROBE = ("import supervisor.accel as a, supervisor.memory as m; "
                 "print(a.MEMREAD_WHY); print(a.MEMREAD_KIND); "
                 "print(m.MEMREAD is a.MEMREAD is not None)")


def _reader_probe(**env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k != accel.NO_EXTENSIONS_ENV}
    out = subprocess.run([sys.executable, "-c", _READER_PROBE], env={**clean, **env},
                         capture_output=True, text=True, check=True, timeout=60)
    return out.stdout.splitlines()


def test_the_install_built_the_compiled_reading_thread() -> None:
    # The reading thread of memory reads (supervisor/_memread.c) is built and selected
    # like the hot loop, and the same variable rules it out.
    assert _reader_probe() == ["compiled", "c", "True"]
    why, kind, compiled = _reader_probe(**{accel.NO_EXTENSIONS_ENV: "1"})
    assert accel.NO_EXTENSIONS_ENV in why and (kind, compiled) == ("python", "False")
