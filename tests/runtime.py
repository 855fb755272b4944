"""Real runc / crun containers for tests: a busybox rootfs, OCI bundles, lifecycle.

Owned by the runtimes work (issue 3). Other test files import it; keep the surface small::

    from tests.runtime import make_bundle, container, unique_id

    bundle = make_bundle(tmp_path / "b1", ["sh", "-c", "mkdir /tmp/x; echo rc=$?"],
                         notify=["mkdir", "mkdirat"], listener_path=d.socket_path,
                         metadata="team=build\\napp=web", annotations={"a": "b"})
    async with container("runc", bundle, unique_id("myfile")) as c:
        done = await c.run()                 # foreground: waits, captures stdout/stderr
        # or: await c.run(detach=True); await c.exec(["mkdir", "/tmp/y"]); await c.state()
    # on exit, always: `runc delete --force ID` (also when the body raised)

Pieces:

``busybox_rootfs()``
    A read-only shared rootfs: ``/bin/busybox`` (busybox-static) plus a symlink per
    applet, and the mount points the config uses. Built once into a cache directory
    (``$SECCOMP_SUPERVISOR_TEST_CACHE`` or ``/tmp/seccomp-supervisor-tests``) keyed by the
    busybox binary's hash; built in a temporary directory and renamed into place, so
    concurrent pytest runs never see half a rootfs. Bundles point ``root.path`` at it
    with ``readonly: true``; nothing writes into it. Writable: ``/tmp`` (a tmpfs).

``oci_config(...)`` -> dict
    Pure: an OCI runtime-spec ``config.json`` for root without a user namespace (pid, ipc,
    uts, mount and network namespaces; the runc default capability set; no terminal;
    ``noNewPrivileges``). With ``listener_path`` it adds ``linux.seccomp``: default
    ``SCMP_ACT_ALLOW``, ``SCMP_ACT_NOTIFY`` for the ``notify`` names, ``listenerPath``
    and ``listenerMetadata``. runc refuses NOTIFY for ``write`` and as the default action.

``make_bundle(dir, args, ...)`` -> Path
    Writes ``dir/config.json`` from :func:`oci_config` and returns ``dir``.

``container(runtime, bundle, id)``
    Async context manager (for tests whose daemon runs in the same trio loop, so the
    runtime never blocks the loop) yielding a :class:`Container`. ``runtime`` is
    ``"runc"`` or ``"crun"``; containers use the runtime's default state root, so
    ``runc list`` / ``crun list`` show them. ``sync_container`` is the same for plain
    (non-trio) tests. Both ALWAYS run ``delete --force`` on exit.

``unique_id(prefix)``
    ``PREFIX-<pid>-<n>-<random>``; give every test file its own prefix.

Detached containers (``run(detach=True)``) inherit the runtime's stdio, so their stdout
and stderr go to ``bundle/detached.out`` (pipes would never reach EOF while the container
lives); :meth:`Container.output` reads it.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import trio

__all__ = [
    "DEFAULT_ENV",
    "RUNTIMES",
    "Container",
    "busybox_rootfs",
    "container",
    "make_bundle",
    "oci_config",
    "runtime_version",
    "sync_container",
    "unique_id",
]

Runtime = Literal["runc", "crun"]
RUNTIMES: tuple[Runtime, ...] = ("runc", "crun")

BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
CACHE_DIR = Path(os.environ.get("SECCOMP_SUPERVISOR_TEST_CACHE",
                                "/tmp/seccomp-supervisor-tests"))
# Bump when the rootfs layout changes, so old caches are not reused.
_ROOTFS_LAYOUT = 1
_MOUNT_POINTS = ("proc", "dev", "sys", "tmp", "etc", "run", "var", "root")

DEFAULT_ENV = ("PATH=/bin:/sbin:/usr/bin:/usr/sbin", "HOME=/root")
# runc's `runc spec` default set: enough for root to work in its own tmpfs.
DEFAULT_CAPS = ("CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE")

_counter = itertools.count()


# --------------------------------------------------------------------------- rootfs


def _busybox() -> Path:
    for candidate in BUSYBOX_CANDIDATES:
        path = Path(candidate)
        if path.is_file():
            return path
    raise RuntimeError("busybox-static is not installed (apt-get install busybox-static)")


def busybox_rootfs() -> Path:
    """The shared read-only busybox rootfs, built on first use (see module docstring)."""
    busybox = _busybox()
    data = busybox.read_bytes()
    key = hashlib.sha256(data).hexdigest()[:16]
    target = CACHE_DIR / f"rootfs-v{_ROOTFS_LAYOUT}-{key}"
    if (target / "bin" / "busybox").is_file():
        return target
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    CACHE_DIR.chmod(0o755)
    build = Path(tempfile.mkdtemp(prefix="rootfs-build-", dir=CACHE_DIR))
    try:
        build.chmod(0o755)
        (build / "bin").mkdir()
        shutil.copy2(busybox, build / "bin" / "busybox")
        applets = subprocess.run([str(busybox), "--list"], check=True, capture_output=True,
                                 text=True).stdout.split()
        for applet in applets:
            if applet != "busybox" and "/" not in applet:
                (build / "bin" / applet).symlink_to("busybox")
        for name in _MOUNT_POINTS:
            (build / name).mkdir(exist_ok=True)
        (build / "etc" / "passwd").write_text(
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
        (build / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
        try:
            build.rename(target)
        except OSError:
            # Someone else finished first: theirs is identical.
            if not (target / "bin" / "busybox").is_file():
                raise
    finally:
        if build.exists():
            shutil.rmtree(build, ignore_errors=True)
    return target


# --------------------------------------------------------------------------- config


def oci_config(
    args: Sequence[str],
    *,
    rootfs: str | os.PathLike[str] | None = None,
    notify: Sequence[str] = (),
    listener_path: str | os.PathLike[str] | None = None,
    metadata: str | None = None,
    annotations: Mapping[str, str] | None = None,
    env: Sequence[str] = DEFAULT_ENV,
    cwd: str = "/",
    hostname: str = "ctr",
    uid: int = 0,
    gid: int = 0,
    no_new_privileges: bool = True,
    extra_seccomp_rules: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """An OCI ``config.json`` as a dict (pure; ``rootfs`` defaults to the shared one).

    With ``listener_path`` set, ``linux.seccomp`` notifies ``notify`` (every other call is
    allowed) and names the listener; ``metadata`` becomes ``listenerMetadata`` when not
    None. ``extra_seccomp_rules`` are appended to ``linux.seccomp.syscalls`` as given.
    """
    root = str(rootfs) if rootfs is not None else str(busybox_rootfs())
    config: dict[str, Any] = {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": uid, "gid": gid},
            "args": list(args),
            "env": list(env),
            "cwd": cwd,
            "capabilities": {kind: list(DEFAULT_CAPS)
                             for kind in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": no_new_privileges,
        },
        "root": {"path": root, "readonly": True},
        "hostname": hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "mode=1777", "size=16m"]},
        ],
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list"],
            "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"],
        },
    }
    if annotations:
        config["annotations"] = dict(annotations)
    if listener_path is not None:
        seccomp: dict[str, Any] = {
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            "listenerPath": str(listener_path),
            "syscalls": [],
        }
        if metadata is not None:
            seccomp["listenerMetadata"] = metadata
        if notify:
            seccomp["syscalls"].append({"names": list(notify), "action": "SCMP_ACT_NOTIFY"})
        seccomp["syscalls"].extend(dict(rule) for rule in extra_seccomp_rules)
        config["linux"]["seccomp"] = seccomp
    return config


def make_bundle(directory: str | os.PathLike[str], args: Sequence[str],
                **options: Any) -> Path:
    """Create ``directory`` with a ``config.json`` from :func:`oci_config`; return it."""
    bundle = Path(directory)
    bundle.mkdir(parents=True, exist_ok=True)
    (bundle / "config.json").write_text(json.dumps(oci_config(args, **options), indent=2))
    return bundle


def unique_id(prefix: str) -> str:
    """A container id no other test (or concurrent pytest run) uses."""
    return f"{prefix}-{os.getpid()}-{next(_counter)}-{secrets.token_hex(3)}"


def runtime_version(runtime: Runtime) -> str:
    """First line of ``RUNTIME --version`` (e.g. ``runc version 1.1.5+ds1``)."""
    out = subprocess.run([runtime, "--version"], check=True, capture_output=True, text=True)
    return out.stdout.splitlines()[0].strip()


# --------------------------------------------------------------------------- lifecycle


def _hybrid_cgroups() -> bool:
    # A tmpfs /sys/fs/cgroup with v1 hierarchies and a cgroup2 "unified" mount that still
    # holds controllers (here: hugetlb, not mounted as v1).
    try:
        controllers = Path("/sys/fs/cgroup/unified/cgroup.controllers").read_text().split()
    except OSError:
        return False
    return bool(controllers) and not Path("/sys/fs/cgroup/cgroup.controllers").exists()


def crun_argv0() -> list[str]:
    """How to call crun on this host.

    crun 1.8 refuses a hybrid cgroup layout whose cgroup2 mount has controllers ("cgroups
    in hybrid mode not supported, drop all controllers from cgroupv2"), even with
    ``--cgroup-manager=disabled``. On such a host every crun command runs in a private
    mount namespace (``unshare -m``) with ``/sys/fs/cgroup/unified`` unmounted, so crun
    sees plain cgroup v1; nothing changes for the rest of the host. crun always runs
    with ``--cgroup-manager=disabled`` (test containers need no cgroup limits), so its
    state under ``/run/crun`` is shared by every command as usual.
    """
    crun = ["crun", "--cgroup-manager=disabled"]
    if not _hybrid_cgroups():
        return crun
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
            'umount /sys/fs/cgroup/unified && exec "$@"', "crun", *crun]



@dataclass
class Container:
    """One container id under one runtime. Methods return ``CompletedProcess`` (bytes).

    ``check=True`` raises :class:`subprocess.CalledProcessError` (its ``stderr`` carries
    the runtime's message). Every call has a ``timeout`` (seconds, ``trio.fail_after``).
    """

    runtime: Runtime
    bundle: Path
    id: str
    started: bool = field(default=False)

    @property
    def argv0(self) -> list[str]:
        """The runtime command with its global options (see :func:`crun_argv0`)."""
        return crun_argv0() if self.runtime == "crun" else ["runc"]

    @property
    def log_path(self) -> Path:
        return self.bundle / "detached.out"

    def output(self) -> str:
        """What a detached container (and its runtime) wrote to stdout/stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def run_argv(self, *, detach: bool) -> list[str]:
        return [*self.argv0, "run", *(["-d"] if detach else []), "--bundle",
                str(self.bundle), self.id]

    async def run(self, *, detach: bool = False, check: bool = False,
                  timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
        """``RUNTIME run [-d] --bundle B ID``. Foreground: waits for the container to exit
        and captures its output. Detached: returns once started; output to :attr:`log_path`.
        """
        self.started = True
        with trio.fail_after(timeout):
            if not detach:
                return await trio.run_process(self.run_argv(detach=False), check=check,
                                              capture_stdout=True, capture_stderr=True,
                                              stdin=subprocess.DEVNULL)
            with open(self.log_path, "ab") as log:  # noqa: ASYNC230 - a local file, once
                proc = await trio.run_process(self.run_argv(detach=True), check=False,
                                              stdin=subprocess.DEVNULL, stdout=log,
                                              stderr=log)
            result = subprocess.CompletedProcess(proc.args, proc.returncode,
                                                 b"", self.output().encode())
            if check:
                result.check_returncode()
            return result

    async def exec(self, args: Sequence[str], *, check: bool = False,
                   timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
        """``RUNTIME exec ID ARGS`` in the foreground, output captured."""
        with trio.fail_after(timeout):
            return await trio.run_process([*self.argv0, "exec", self.id, *args],
                                          check=check, capture_stdout=True,
                                          capture_stderr=True, stdin=subprocess.DEVNULL)

    async def state(self, *, timeout: float = 10) -> dict[str, Any]:
        """``RUNTIME state ID`` parsed (``status``, ``pid``, ...)."""
        with trio.fail_after(timeout):
            proc = await trio.run_process([*self.argv0, "state", self.id], check=True,
                                          capture_stdout=True, capture_stderr=True)
        data: dict[str, Any] = json.loads(proc.stdout)
        return data

    async def kill(self, signal: str = "KILL", *, timeout: float = 10) -> None:
        with trio.fail_after(timeout):
            await trio.run_process([*self.argv0, "kill", self.id, signal], check=False,
                                   capture_stdout=True, capture_stderr=True)

    async def wait_stopped(self, *, timeout: float = 10) -> None:
        """Poll ``state`` until ``status`` is ``stopped`` (or the id is gone)."""
        with trio.fail_after(timeout):
            while True:
                try:
                    if (await self.state())["status"] == "stopped":
                        return
                except subprocess.CalledProcessError:
                    return
                await trio.sleep(0.05)

    async def delete(self, *, timeout: float = 20) -> None:
        with trio.fail_after(timeout):
            await trio.run_process(self.delete_argv(), check=False, capture_stdout=True,
                                   capture_stderr=True)

    def delete_argv(self) -> list[str]:
        return [*self.argv0, "delete", "--force", self.id]

    def delete_sync(self) -> None:
        subprocess.run(self.delete_argv(), check=False, capture_output=True, timeout=20)

    # Plain blocking variants, for tests without a trio loop (and a daemon elsewhere).

    def run_sync(self, *, detach: bool = False, check: bool = False,
                 timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
        self.started = True
        if not detach:
            return subprocess.run(self.run_argv(detach=False), check=check,
                                  capture_output=True, stdin=subprocess.DEVNULL,
                                  timeout=timeout)
        with open(self.log_path, "ab") as log:
            proc = subprocess.run(self.run_argv(detach=True), check=False,
                                  stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                  timeout=timeout)
        result = subprocess.CompletedProcess(proc.args, proc.returncode, b"",
                                             self.output().encode())
        if check:
            result.check_returncode()
        return result

    def exec_sync(self, args: Sequence[str], *, check: bool = False,
                  timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*self.argv0, "exec", self.id, *args], check=check,
                              capture_output=True, stdin=subprocess.DEVNULL, timeout=timeout)


@contextlib.asynccontextmanager
async def container(runtime: Runtime, bundle: str | os.PathLike[str],
                    id: str) -> AsyncIterator[Container]:
    """Yield a :class:`Container`; ``RUNTIME delete --force ID`` on exit, always.

    The delete runs shielded from cancellation (a failing test's cancelled scope must
    not leave a container behind); if even that fails it is retried synchronously.
    """
    ctr = _new_container(runtime, bundle, id)
    try:
        yield ctr
    finally:
        with trio.CancelScope(shield=True):
            try:
                await ctr.delete()
            except BaseException:
                ctr.delete_sync()


@contextlib.contextmanager
def sync_container(runtime: Runtime, bundle: str | os.PathLike[str],
                   id: str) -> Iterator[Container]:
    """Like :func:`container` without trio: use the ``*_sync`` methods."""
    ctr = _new_container(runtime, bundle, id)
    try:
        yield ctr
    finally:
        ctr.delete_sync()


def _new_container(runtime: Runtime, bundle: str | os.PathLike[str], id: str) -> Container:
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, not {runtime!r}")
    return Container(runtime, Path(bundle), id)
