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
launcher's handoff calls -- is allowed through the ``always_allow`` option; so are,
whatever that option says, :data:`supervisor.learn.GO_RUNTIME_SYSCALLS` (``futex``,
``rt_sigreturn``), which runc's init may make after its filter on some runs only.

Files (see :mod:`supervisor.safefile`): the previous file is read and the new one written
in a worker thread, never on the event loop; the file must be a regular file of at most
1 MiB (a symlink, FIFO or device in its place is not followed or opened, and is replaced);
the new file replaces the old one atomically (rename, which never follows a symlink).

Who owns which file: this policy writes ``DIRECTORY/<safe id>.json``, one name per
container id (:func:`supervisor.learn.profile_file_name` never gives two ids one name);
the ``io.containers.trace-syscall`` route writes only in ``trace_directory`` (its own
directory, never ``directory``) and never replaces a file it did not create for the same
container since the daemon started; its ``if:`` bases are read only from
``base_directory``, which must be neither of the two (a base from them would let one
container read another's profile).

Options:

* ``directory`` (absolute path): where profiles are written; created when needed;
* ``trace_directory`` (absolute path or "", default ``DIRECTORY/traced``): the only
  directory an ``io.containers.trace-syscall`` annotation's ``of:`` file may be in
  (directly, no subdirectory);
* ``base_directory`` (absolute path or "", default ""): the only directory an
  annotation's ``if:`` base profile may be in (directly); "" refuses every ``if:``;
* ``base`` (absolute path or ""): a profile to merge into; its default action must be
  SCMP_ACT_ERRNO, and its conditional and non-allow rules win over what was observed;
* ``always_allow`` (list of names): allowed in every profile, default
  :data:`supervisor.learn.HANDOFF_SYSCALLS` (:data:`supervisor.learn.GO_RUNTIME_SYSCALLS`
  are allowed in any case);
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
    learn_directories,
    learned_names,
    load_base,
    merge_profile,
    owner_directory,
    profile_file_name,
    read_profile_in,
)
from supervisor.logfmt import escape
from supervisor.policy import Container, Decision, Notification, PolicySet, allow
from supervisor.profile import Profile, dump_profile
from supervisor.safefile import FileRefused, submit, write_file

log = logging.getLogger("supervisor.policy.learn")

policy = PolicySet(
    "learn",
    defaults={
        "directory": "/var/lib/seccomp-supervisor/learned",
        "trace_directory": "",
        "base_directory": "",
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
    _, trace_directory, base_directory = learn_directories(options)
    for key in ("trace_directory", "base_directory"):
        if options[key] and not os.path.isabs(options[key]):
            raise ValueError(f"options.{key}: must be an absolute path or \"\", "
                             f"got {options[key]!r}")
    taken = {os.path.normpath(directory): "directory"}
    for key, path in (("trace_directory", trace_directory),
                      ("base_directory", base_directory)):
        if not path:
            continue
        other = taken.get(os.path.normpath(path))
        if other is not None:
            raise ValueError(f"options.{key}: must not be the same directory as "
                             f"options.{other} ({path})")
        taken[os.path.normpath(path)] = key
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
    directory = owner_directory(str(options["directory"]), container.peer_uid)
    name = profile_file_name(container.id)
    path = os.path.join(directory, name)
    base = _base[0]
    accumulate = bool(options["accumulate"])
    names = learned_names(recording.names(), options["always_allow"])
    architectures = recording.architectures()

    def write() -> None:  # in a worker thread
        merged_into = base
        if accumulate:
            try:
                merged_into = read_profile_in(directory, name)
            except FileNotFoundError:
                pass
            except (FileRefused, ProfileError, OSError) as exc:
                log.warning("learn: %s is not a readable profile, replacing it: %s", path,
                            escape(str(exc), 300))
        try:
            profile = merge_profile(merged_into, names, architectures)
            write_file(directory, name, dump_profile(profile).encode())
        except (OSError, ProfileError) as exc:
            log.error("learn: cannot write the profile of container %s to %s: %s",
                      container.id, path, escape(str(exc), 300))
            return
        log.info("learn: container %s: %d notifications of %d system calls; wrote %s",
                 container.id, recording.total, len(recording.names()), path)

    # The same file's writes one after the other (sessions of one container can end
    # together).
    submit(f"learn: container {container.id}: {path}", write,
           key=("learn", directory, name))
