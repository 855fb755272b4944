"""Per-container allowlist of the programs a container may start (``execve``).

Which list applies is chosen by a label of the container's ``listenerMetadata`` (one
``KEY=VALUE`` per line; the key is option ``label``, default ``app``): a container
labelled ``app=web`` may start the programs of ``allowed.web``; one without the label,
or with a value that has no list, those of ``allowed."*"``; with no ``"*"`` list,
nothing. Any other program fails with EACCES, as a file without execute permission
would, and gets an audit line naming it.

Options, in the ``[[policy]]`` entry::

    options = { label = "app", allowed = { web = ["/usr/sbin/nginx"], "*" = ["/bin/sh"] } }

Only absolute paths are compared, as written (``/bin/../bin/sh`` is not ``/bin/sh``,
and neither resolves symlinks); a relative path, and ``execveat`` from a directory fd
or an fd (``fexecve``), are refused: the path alone does not say which file runs.

**Race caveat: this is a tripwire, not a boundary.** The path is in the caller's
memory. After ``allow`` (CONTINUE) the kernel reads it again, and another thread of
the caller can rewrite it in between: a program that wants to get past this list can,
and ``allow(unchecked=True)`` below says so in the code. ``execve`` cannot be
emulated (the supervisor cannot start a program *in* the caller's place). What it is
good for: catching mistakes and ordinary payloads (a shell spawned by a web server),
with an audit line per refusal. For a boundary, make the image's filesystem read-only
and everything writable ``noexec``, so that only the programs in the image can run.

Run it (with the options above in a config file, or the defaults: only ``/bin/sh``)::

    seccomp-supervisor serve --socket /run/exec-allowlist.sock --policy allowlist.py
"""

import errno
import os

from supervisor.policy import Notification, PolicySet, allow, deny

policy = PolicySet("exec-allowlist", defaults={"label": "app",
                                               "allowed": {"*": ["/bin/sh"]}})
_allowed: dict[str, frozenset[bytes]] = {}
AT_FDCWD = -100


@policy.configure
def check(options):
    _allowed.clear()
    for key, paths in options["allowed"].items():
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise ValueError(f"options.allowed: {key!r} must be a list of paths")
        relative = [p for p in paths if not p.startswith("/")]
        if relative:
            raise ValueError(f"options.allowed: {key!r}: not absolute: {relative}")
        _allowed[key] = frozenset(os.fsencode(p) for p in paths)  # paths are bytes


def allowed_for(labels) -> frozenset[bytes]:
    value = labels.get(policy.options["label"])
    if value is not None and value in _allowed:
        return _allowed[value]
    return _allowed.get("*", frozenset())


@policy.on("execve", "execveat")
async def only_listed_programs(n: Notification):
    if n.syscall == "execveat" and n.fd(0) != AT_FDCWD:
        return deny(errno.EACCES, reason="execveat from a directory fd: not checked")
    path = await n.read_path(0 if n.syscall == "execve" else 1)
    if path in allowed_for(n.container.labels):
        # The kernel reads the path again after CONTINUE: see the race caveat above.
        return allow(unchecked=True, reason="listed")
    return deny(errno.EACCES, reason=f"not in the allowlist: {os.fsdecode(path)!r}")
