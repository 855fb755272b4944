"""runc's test seccomp agent (``contrib/cmd/seccompagent`` in runc), as a policy.

What runc's agent does with the calls a container's profile notifies:

* ``chmod``, ``fchmod``, ``fchmodat``: fail with ENOMEDIUM ("No medium found"), a value
  no real chmod returns, so a test sees at once that the agent answered;
* ``mkdir PATH``: creates ``PATH-<listenerMetadata>`` instead, as the container would
  (its root, working directory and credentials), and answers the call with that result;
* every other notified call continues.

The handlers, and ``unhandled=allow()``, which says "everything else continues" in the
policy itself, so that ``seccomp-supervisor serve --socket S --policy agent.py`` runs it
with no config file.

``mkdir`` is done by the supervisor as the caller (:func:`supervisor.caller.mkdir`): in
its mount namespace and root, relative to its working directory, with its fsuid, fsgid,
groups and umask, from the path the handler read (nothing is read twice); the container
gets 0 or the errno of that mkdir. Creating it from here with ``/proc/<pid>/root/PATH``
instead would follow the container's symlinks as root on the host. The path is bytes,
as the kernel has it: a name that is not UTF-8 gets its suffix like any other.

Run it::

    seccomp-supervisor serve --socket /run/seccomp-agent.socket --policy agent.py

and point ``linux.seccomp.listenerPath`` of a container at that socket (runc's agent
listens on the same path by default), with ``SCMP_ACT_NOTIFY`` for ``chmod``,
``fchmod``, ``fchmodat`` and ``mkdir``.
"""

import errno
import os

from supervisor import caller
from supervisor.policy import Notification, PolicySet, allow, deny

policy = PolicySet("runc-agent", unhandled=allow(),
                   description="runc's test agent: ENOMEDIUM for chmod, the rest continues")


@policy.on("chmod", "fchmod", "fchmodat")
def no_medium(n: Notification):
    return deny(errno.ENOMEDIUM, reason="runc test agent")


@policy.on("mkdir")
async def mkdir_suffix(n: Notification):
    path = await n.read_path(0)
    made = path + b"-" + os.fsencode(suffix(n.container.metadata))
    return await caller.mkdir(n, made, n.mode(1),
                              reason=f"created PATH-{suffix(n.container.metadata)}")


def suffix(metadata: str) -> str:
    """The metadata as a file name suffix, as runc's agent makes it safe: its last path
    component; a fixed string if that still holds a '/' (or is empty)."""
    name = os.path.basename(metadata)
    return name if name and "/" not in name and name not in (".", "..") \
        else "agent-generated-suffix"
