"""Real podman for tests: a private storage per session, one imported busybox image,
root and rootless, runc and crun.

    with podman_session("root") as pm:                  # or podman_session(ROOTLESS_USER)
        name = pm.name("web")
        async with pm.container(name) as ctr:             # always `podman rm -f NAME`
            done = await pm.run("runc", name, ["sh", "-c", "..."], profile=path,
                                annotations={...})

Everything podman writes goes under one directory made for the session (``--root``,
``--runroot``, ``--tmpdir``, the rootless user's ``XDG_RUNTIME_DIR`` and ``HOME``), with
the ``vfs`` storage driver (no overlay mounts left behind), ``--network none`` and the
file events backend: nothing touches the host's own podman state, and the session's end
removes every container, the image and the directory, also when a test failed.

Host quirks handled here (Debian 12 test hosts):

* root lacks ``CAP_SYS_RESOURCE`` in the test environment, so podman's default rlimits
  (``nofile``/``nproc`` raised to the hard limit) fail: every run passes
  ``--ulimit nofile=1024:1024 --ulimit nproc=1024:1024``.
* crun 1.8 refuses the hybrid cgroup layout (see :func:`tests.runtime.crun_argv0`):
  podman calls crun through a wrapper script that hides ``/sys/fs/cgroup/unified`` in a
  private mount namespace (unmounted as root; covered by an empty tmpfs inside rootless
  podman's user namespace, where the inherited mount is locked).
* No registry: the image is ``podman import`` of the busybox rootfs of
  :func:`tests.runtime.busybox_rootfs`.

The rootless user (``seccomp-rootless``, uid 2950, with ``/etc/subuid`` ranges and in the
``seccomp-handoff`` group) is created by ``./dev.sh`` setup.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tarfile
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from .runtime import _hybrid_cgroups, busybox_rootfs, unique_id

__all__ = ["HANDOFF_GROUP", "IMAGE", "ROOTLESS_USER", "PodmanSession", "podman_session",
           "podman_version"]

ROOTLESS_USER = "seccomp-rootless"
HANDOFF_GROUP = "seccomp-handoff"
IMAGE = "localhost/seccomp-supervisor-busybox:test"
ULIMITS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")

CRUN_WRAPPER = """#!/bin/sh
# crun without the hybrid cgroup2 mount it refuses (tests/podman.py).
exec unshare --mount --propagation private -- sh -c '
  umount /sys/fs/cgroup/unified 2>/dev/null \\
    || mount -t tmpfs -o ro,size=4k none /sys/fs/cgroup/unified
  exec "$@"' crun crun "$@"
"""


def podman_version() -> str:
    out = subprocess.run(["podman", "--version"], check=True, capture_output=True, text=True)
    return out.stdout.strip()


@dataclass
class PodmanSession:
    """podman as ``user`` (``"root"`` or the rootless user) on a private storage."""

    user: str
    base: Path
    created: list[str] = field(default_factory=list)
    storage_driver: str = "vfs"

    @property
    def uid(self) -> int:
        return pwd.getpwnam(self.user).pw_uid

    @property
    def rootless(self) -> bool:
        return self.uid != 0

    def runtime_path(self, runtime: str) -> str:
        if runtime == "crun" and _hybrid_cgroups():
            return str(self.base / "crun-wrapper")
        return shutil.which(runtime) or runtime

    def argv(self, *args: str) -> list[str]:
        cmd = ["podman", "--root", str(self.base / "storage"),
               "--runroot", str(self.base / "run"), "--tmpdir", str(self.base / "tmp"),
               "--storage-driver", self.storage_driver, "--events-backend", "file",
               "--cgroup-manager", "cgroupfs", *args]
        if not self.rootless:
            return cmd
        account = pwd.getpwnam(self.user)
        return ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}",
                "--init-groups", "--reset-env", "env", f"HOME={self.base / 'home'}",
                f"XDG_RUNTIME_DIR={self.base / 'xdg'}",
                f"XDG_CONFIG_HOME={self.base / 'home' / '.config'}",
                "PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", *cmd]

    def sync(self, *args: str, check: bool = True,
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args), check=check, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    async def podman(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``podman ARGS`` (never checked), output captured as text."""
        with trio.fail_after(timeout):
            done = await trio.run_process(self.argv(*args), check=False, capture_stdout=True,
                                          capture_stderr=True, stdin=subprocess.DEVNULL)
        return subprocess.CompletedProcess(done.args, done.returncode,
                                           done.stdout.decode(errors="replace"),
                                           done.stderr.decode(errors="replace"))

    def name(self, prefix: str) -> str:
        """A container name no other test uses."""
        return unique_id(prefix)

    def run_args(self, runtime: str, name: str, *, profile: str | os.PathLike[str],
                 annotations: Mapping[str, str] | None = None, detach: bool = False,
                 extra: Sequence[str] = ()) -> list[str]:
        args = ["run", "--runtime", self.runtime_path(runtime), "--name", name,
                "--network", "none", *ULIMITS, "--security-opt", f"seccomp={profile}"]
        for key, value in (annotations or {}).items():
            args += ["--annotation", f"{key}={value}"]
        if detach:
            args.append("-d")
        return [*args, *extra]

    async def run(self, runtime: str, name: str, cmd: Sequence[str], *,
                  profile: str | os.PathLike[str], annotations: Mapping[str, str] | None = None,
                  detach: bool = False, extra: Sequence[str] = (),
                  timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``podman run --name NAME ... IMAGE CMD`` (use inside :meth:`container`)."""
        return await self.podman(*self.run_args(runtime, name, profile=profile,
                                                annotations=annotations, detach=detach,
                                                extra=extra), IMAGE, *cmd, timeout=timeout)

    async def exec(self, name: str, cmd: Sequence[str],
                   timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return await self.podman("exec", name, *cmd, timeout=timeout)

    @contextlib.asynccontextmanager
    async def container(self, name: str) -> AsyncIterator[str]:
        """Yields ``name``; on exit ``podman rm -f -t 0 NAME``, whatever happened."""
        try:
            yield name
        finally:
            with trio.CancelScope(shield=True):
                await self.podman("rm", "-f", "-t", "0", "--ignore", name, timeout=60)

    @contextlib.contextmanager
    def sync_container(self, name: str) -> Iterator[str]:
        try:
            yield name
        finally:
            self.sync("rm", "-f", "-t", "0", "--ignore", name, check=False)


def _chown(path: Path, uid: int, gid: int, mode: int = 0o700) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, gid)
    path.chmod(mode)


@contextlib.contextmanager
def podman_session(user: str = "root", *,
                   storage_driver: str = "vfs") -> Iterator[PodmanSession]:
    """A private podman for ``user`` with :data:`IMAGE` imported; removes every container,
    the image and its directory on exit. ``storage_driver="overlay"`` (root only) for
    large images: vfs copies a whole image for every container."""
    account = pwd.getpwnam(user)  # KeyError: run ./dev.sh setup (it creates the user)
    base = Path(tempfile.mkdtemp(prefix=f"podman-{user}-", dir="/tmp"))
    base.chmod(0o755)
    session = PodmanSession(user, base, storage_driver=storage_driver)
    try:
        for sub in ("storage", "run", "tmp", "xdg", "home"):
            _chown(base / sub, account.pw_uid, account.pw_gid)
        wrapper = base / "crun-wrapper"
        wrapper.write_text(CRUN_WRAPPER)
        wrapper.chmod(0o755)
        archive = base / "busybox.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(busybox_rootfs(), arcname=".")
        archive.chmod(0o644)
        session.sync("import", str(archive), IMAGE)
        archive.unlink()
        yield session
    finally:
        session.sync("rm", "-a", "-f", "-t", "0", check=False)
        session.sync("rmi", "-a", "-f", check=False)
        if session.rootless:
            # Files of the user namespace's subordinate ids: removed from inside it.
            session.sync("unshare", "rm", "-rf", str(base / "storage"), str(base / "run"),
                         check=False)
            # Rootless podman leaves a pause process holding its user namespace (and
            # conmon may linger): end this session's, found by their XDG_RUNTIME_DIR.
            _kill_session_processes(account.pw_uid, f"XDG_RUNTIME_DIR={base / 'xdg'}")
        shutil.rmtree(base, ignore_errors=True)


def _kill_session_processes(uid: int, marker: str) -> None:
    """SIGKILL the processes of ``uid`` whose environment holds ``marker`` (by pid)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        if marker.encode() in environ:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)
