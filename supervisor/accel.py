"""Which implementation of the hot loop runs: the compiled one (``supervisor._hotloop``,
built from ``supervisor/_hotloop.c`` by the package's install when a C compiler and
Python's headers are there) or the pure-Python one, which every part keeps as its
reference.

``SECCOMP_SUPERVISOR_NO_EXTENSIONS=1`` in the daemon's environment selects pure Python
even when the extension is built (the tests run both; an operator can rule out the
compiled code when chasing a problem). The choice is made once, at import, and shown in
the log at start, in ``status`` and in the ``seccomp_supervisor_build`` metric.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Final

#: The environment variable that selects the pure-Python loop.
NO_EXTENSIONS_ENV: Final = "SECCOMP_SUPERVISOR_NO_EXTENSIONS"
#: The ``API_VERSION`` of ``_hotloop.c`` this Python code was written against.
API_VERSION: Final = 14


def _load() -> tuple[ModuleType | None, str]:
    """The extension module (None for pure Python) and why that one."""
    if os.environ.get(NO_EXTENSIONS_ENV, "") not in ("", "0"):
        return None, f"pure Python ({NO_EXTENSIONS_ENV} is set)"
    try:
        module = importlib.import_module("supervisor._hotloop")
    except ImportError as exc:
        return None, f"pure Python (the compiled hot loop is not built: {exc})"
    if getattr(module, "API_VERSION", None) != API_VERSION:
        return None, (f"pure Python (the compiled hot loop is a stale build: API "
                      f"{getattr(module, 'API_VERSION', None)}, this code needs "
                      f"{API_VERSION}; reinstall the package)")
    return module, "compiled"


HOTLOOP, WHY = _load()
#: "c" or "python": the value of the build metric's ``hot_loop`` label.
KIND: Final = "c" if HOTLOOP is not None else "python"
