"""Start-up fixes for the suite under AddressSanitizer and UBSan (``./dev.sh asan``).

Python imports ``sitecustomize`` at start-up from the first directory of ``sys.path``
that has one; ``./dev.sh asan`` puts this directory first on ``PYTHONPATH``, so every
Python process of the run (pytest, and the daemons and tools it starts) loads it, and
a normal run, which does not, never sees it. It is not a test: pytest collects only
``test_*.py``. (It shadows Debian's ``/usr/lib/python3.*/sitecustomize.py``, which
has nothing a test needs.)
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from typing import Any

# 1. pyseccomp frees the strings libseccomp returns (resolve_syscall's names, reached
# by the daemon's every decision through supervisor's syscall_name) with a `free` it
# looks up in libc's own handle, CDLL(find_library("c")): glibc's free, not the one
# ASan interposes with LD_PRELOAD. The memory came from ASan's malloc (libseccomp's
# strdup goes through the global namespace), so glibc aborts with "free(): invalid
# size" at a target's first notification. CDLL(None) is the global namespace, where
# the preloaded ASan comes first: its free matches its malloc.
try:
    import pyseccomp
except ImportError:  # a process that does not need it (no libseccomp): nothing to fix
    pass
else:
    _global = ctypes.CDLL(None)
    _global.free.argtypes = (ctypes.c_void_p,)
    _global.free.restype = None
    pyseccomp._libc = _global

# 2. UBSan's reports to the file UBSAN_OPTIONS' log_path names, as ASan's go to
# ASAN_OPTIONS' one. With both runtimes preloaded (gcc links a -fsanitize=address,undefined
# module to libasan and libubsan, two libraries with a copy each of the sanitizers'
# common code), UBSan ignores its log_path and writes to stderr, which pytest captures
# and loses when UBSan ends the process. Set through libubsan's own
# __sanitizer_set_report_path (looked up in its handle: libasan, first, exports one too).
_log_path = next((option.partition("=")[2]
                  for option in os.environ.get("UBSAN_OPTIONS", "").split(":")
                  if option.startswith("log_path=")), "")
for _library in os.environ.get("LD_PRELOAD", "").split():
    if _log_path and "libubsan" in os.path.basename(_library):
        _ubsan = ctypes.CDLL(_library, mode=os.RTLD_NOLOAD)
        _ubsan.__sanitizer_set_report_path(os.fsencode(_log_path))

# 3. A command that supervisor.spawn starts under a filter runs through a helper,
# `python -I -c BOOTSTRAP ...`, which installs the filter and execs the command. It
# must run without the sanitizers, as it runs in production: ASan in a filtered
# process makes system calls of its own (it reads /proc/self/maps, and more) that the
# tests' policies see and the tests do not expect, and its shadow memory takes address
# ranges that the hostile tests map on purpose. So its environment loses the variables
# that load them (and this file's directory). -I already makes it ignore PYTHON*
# variables but not LD_PRELOAD, which is the one that loads ASan; PYTHONMALLOC goes
# too, as the helper would run with it, and the sanitizers' options mean nothing
# without them.
_STRIP = ("LD_PRELOAD", "PYTHONMALLOC", "ASAN_OPTIONS", "UBSAN_OPTIONS", "PYTHONPATH")
_popen_init = subprocess.Popen.__init__


def _is_filter_helper(args: Any) -> bool:
    # Exactly spawn's helper: its bootstrap string, only when supervisor.spawn is loaded
    # (it always is before it starts one; importing it here would load the package
    # before pytest does).
    spawn = sys.modules.get("supervisor.spawn")
    bootstrap = getattr(spawn, "_BOOTSTRAP", None)
    return (bootstrap is not None and isinstance(args, list | tuple) and len(args) > 3
            and args[0] == sys.executable and list(args[1:3]) == ["-I", "-c"]
            and args[3] == bootstrap)


def _popen_init_unsanitized(self: subprocess.Popen[Any], args: Any, *rest: Any,
                            **kwargs: Any) -> None:
    if _is_filter_helper(args):
        env = dict(os.environ if kwargs.get("env") is None else kwargs["env"])
        for name in _STRIP:
            env.pop(name, None)
        kwargs["env"] = env
    _popen_init(self, args, *rest, **kwargs)


subprocess.Popen.__init__ = _popen_init_unsanitized  # type: ignore[assignment, method-assign]
