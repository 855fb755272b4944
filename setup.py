"""The optional compiled parts of the package (everything else is in pyproject.toml).

``supervisor/_hotloop.c`` is the notification hot loop (RECV, route, handler call, SEND,
counters), the audit line's formatting, and the flag through which the event loop and the
reading thread of race-checked memory reads hand a read over (it spins briefly, the GIL
released, before it sleeps). It is optional:
without a C compiler and Python's headers the build only warns, and the daemon runs the
pure-Python loop it always had (``SECCOMP_SUPERVISOR_NO_EXTENSIONS=1`` selects that one
even when the extension is built). See docs/performance.md.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "supervisor._hotloop",
            ["supervisor/_hotloop.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                "-fno-strict-aliasing"],
        ),
    ],
)
