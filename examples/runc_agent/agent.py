"""runc's test seccomp agent (``contrib/cmd/seccompagent`` in runc), as a policy.

What runc's agent does with the calls a container's profile notifies:

* ``chmod``, ``fchmod``, ``fchmodat``: fail with ENOMEDIUM ("No medium found"), a value
  no real chmod returns, so a test sees at once that the agent answered;
* ``mkdir PATH``: creates ``PATH-<listenerMetadata>`` instead, as the container would
  (its root, working directory and credentials), and answers the call with that result;
* every other notified call continues.

Here the first and the last are the whole policy: the handlers, and ``unhandled=allow()``,
which says "everything else continues" in the policy itself, so that
``seccomp-supervisor serve --socket S --policy agent.py`` runs it with no config file.

``mkdir`` is not emulated yet: it needs the "act as the caller" primitive (do the call
in the caller's root, working directory, mount namespace and credentials, race-free),
which comes with the supervisor's emulation rework. Until then ``mkdir`` continues (the
container creates ``PATH`` itself), and ``mkdir_suffix`` only reports, in the audit
reason, the name runc's agent would have made. Creating it from here with
``/proc/<pid>/root/PATH`` would follow the container's symlinks as root on the host:
exactly the bug class the emulation primitive exists to avoid.

Run it::

    seccomp-supervisor serve --socket /run/seccomp-agent.socket --policy agent.py

and point ``linux.seccomp.listenerPath`` of a container at that socket (runc's agent
listens on the same path by default), with ``SCMP_ACT_NOTIFY`` for ``chmod``,
``fchmod``, ``fchmodat`` and ``mkdir``.
"""

import errno
import os

from supervisor.policy import Notification, PolicySet, allow, deny

policy = PolicySet("runc-agent", unhandled=allow(),
                   description="runc's test agent: ENOMEDIUM for chmod, the rest continues")


@policy.on("chmod", "fchmod", "fchmodat")
def no_medium(n: Notification):
    return deny(errno.ENOMEDIUM, reason="runc test agent")


@policy.on("mkdir")
def mkdir_suffix(n: Notification):
    # Decided on nothing but the container's metadata: CONTINUE is exact.
    return allow(reason=f"would create PATH-{suffix(n.container.metadata)}")


def suffix(metadata: str) -> str:
    """The metadata as a file name suffix, as runc's agent makes it safe: its last path
    component; a fixed string if that still holds a '/' (or is empty)."""
    name = os.path.basename(metadata)
    return name if name and "/" not in name and name not in (".", "..") \
        else "agent-generated-suffix"
