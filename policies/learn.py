"""learn: record what each container calls and write an OCI seccomp profile for it.

Every notified call is counted per container (arch, name, count) and answered CONTINUE:
no memory is read, so the answer is exact. When a container's session ends (its last
process exited), the profile is written to ``DIRECTORY/<container id>.json`` (the id made
safe for a file name, see :func:`supervisor.learn.profile_file_name`), or to
``DIRECTORY/uid-UID/<container id>.json`` for a container whose listener a user other
than root handed over (a rootless runtime: :func:`supervisor.learn.owner_directory`), so
one user's containers never write, nor merge into, another user's profiles:
``defaultAction: SCMP_ACT_ERRNO``, the observed calls allowed, the architectures seen,
merged with the ``base`` profile if one is configured, and with the previous file of the
same container when ``accumulate`` is on (a second ``runc exec`` session, a rerun).

The policy only sees calls the container's filter notifies: give the container a
learning profile (every known call except ``write`` notified, see
:func:`supervisor.learn.learning_profile`). What cannot be recorded -- ``write`` and the
launcher's handoff calls -- is allowed through the ``always_allow`` option.

Options:

* ``directory`` (absolute path): where profiles are written; created when needed;
* ``base`` (absolute path or ""): a profile to merge into; its default action must be
  SCMP_ACT_ERRNO, and its conditional and non-allow rules win over what was observed;
* ``always_allow`` (list of names): allowed in every profile, default
  :data:`supervisor.learn.HANDOFF_SYSCALLS`;
* ``accumulate`` (bool, default true): merge with the container's existing profile file;
* ``answer``: ``"allow"`` (CONTINUE, the default) or ``"pass"`` (record, then let the
  next policy of the chain decide: put ``learn`` first to observe everything).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from supervisor.errors import ProfileError
from supervisor.learn import (
    HANDOFF_SYSCALLS,
    UNRECORDABLE,
    Recording,
    known_syscalls,
    load_base,
    merge_profile,
    owner_directory,
    profile_file_name,
    write_profile,
)
from supervisor.policy import Container, Decision, Notification, PolicySet, allow
from supervisor.profile import Profile, load_profile

log = logging.getLogger("supervisor.policy.learn")

policy = PolicySet(
    "learn",
    defaults={
        "directory": "/var/lib/seccomp-supervisor/learned",
        "base": "",
        "always_allow": list(HANDOFF_SYSCALLS),
        "accumulate": True,
        "answer": "allow",
    },
    description="record each container's system calls and write an OCI profile",
)

# Per (peer uid, container id): what its sessions recorded since the profile was last
# written. Ids are chosen by whoever hands over; the uid keeps two users' containers apart.
recordings: dict[tuple[int | None, str], Recording] = {}
_base: list[Profile | None] = [None]
_ALLOWED = allow(reason="learn mode")


@policy.configure
def _check_options(options: Mapping[str, Any]) -> None:
    directory = options["directory"]
    if not directory or not os.path.isabs(directory):
        raise ValueError(f"options.directory: must be an absolute path, got {directory!r}")
    base = options["base"]
    _base[0] = None
    if base:
        if not os.path.isabs(base):
            raise ValueError(f"options.base: must be an absolute path, got {base!r}")
        try:
            _base[0] = load_base(base)
        except ProfileError as exc:
            raise ValueError(f"options.base: {exc}") from None
    known = known_syscalls()
    for i, name in enumerate(options["always_allow"]):
        if not isinstance(name, str) or name not in known:
            raise ValueError(f"options.always_allow[{i}]: unknown system call {name!r}")
    if options["answer"] not in ("allow", "pass"):
        raise ValueError(f"options.answer: expected \"allow\" or \"pass\", "
                         f"got {options['answer']!r}")


@policy.on(*sorted(known_syscalls() - set(UNRECORDABLE)))
def observe(n: Notification) -> Decision | None:
    key = (n.container.peer_uid, n.container.id)
    recording = recordings.get(key)
    if recording is None:
        recording = recordings[key] = Recording()
    recording.add(n.arch, n.syscall)
    return _ALLOWED if policy.options["answer"] == "allow" else None


@policy.on_session_end
def write_learned_profile(container: Container) -> None:
    recording = recordings.pop((container.peer_uid, container.id), None)
    if recording is None:
        return  # this session saw nothing (or another session already wrote it all)
    options = policy.options
    path = os.path.join(owner_directory(options["directory"], container.peer_uid),
                        profile_file_name(container.id))
    base = _base[0]
    if options["accumulate"] and os.path.exists(path):
        try:
            base = load_profile(path)
        except ProfileError as exc:
            log.warning("learn: %s is not a valid profile, replacing it: %s", path, exc)
    names = recording.names() | set(options["always_allow"])
    try:
        profile = merge_profile(base, names, recording.architectures())
        write_profile(path, profile)
    except (OSError, ProfileError) as exc:
        log.error("learn: cannot write the profile of container %s to %s: %s",
                  container.id, path, exc)
        return
    log.info("learn: container %s: %d notifications of %d system calls; wrote %s",
             container.id, recording.total, len(recording.names()), path)
