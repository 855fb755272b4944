"""A private containerd and dockerd for tests: own directories and sockets, no network.

    with private_containerd(tmp_path_factory.mktemp("ctd")) as ctd:
        ctd.ctr(["run", "--rm", ...])              # ctr --address ADDR -n NAMESPACE ...
        with private_dockerd(tmp, ctd, runtimes={"crun-x": {"path": ...}}) as dockerd:
            dockerd.docker(["run", "--rm", ...])   # Debian's docker CLI on our socket

Nothing is shared with a containerd or dockerd of the host: containerd gets its own
``root``, ``state``, gRPC/ttrpc sockets and no CRI or ``opt`` plugin (the ``opt`` plugin
would create ``/opt/containerd``); dockerd gets its own ``--data-root``, ``--exec-root``,
``--pidfile``, ``-H unix://`` socket, ``--config-file`` (whose ``deprecated-key-path``
keeps 20.10 from writing ``/etc/docker/key.json``), containerd namespaces and no network
(``--bridge=none --iptables=false --ip-masq=false``). What the engines still put in fixed
places (containerd's shim sockets in ``/run/containerd/s``, dockerd's plugin directory
``/run/docker/plugins``) is removed again when empty and not there before.

On exit, always, also after a failure: every container and task the engine still has is
removed, then the engine stops (SIGTERM, SIGKILL after a grace period: by the pid this
module started), leftover shims of *this* containerd (their command line names its
unique socket) are killed by pid, mounts under the directory are unmounted and the
directory is removed.

Host quirks handled here: root may lack CAP_SYS_RESOURCE, so containers get
``nofile=1024:1024`` (dockerd ``--default-ulimit``; ctr's default spec has it); crun runs
through :func:`tests.runtime.crun_argv0` (the hybrid-cgroup workaround), written into a
small script because engines take a runtime *path*: :func:`crun_script`.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .runtime import _hybrid_cgroups, busybox_rootfs, crun_argv0

__all__ = [
    "CRUN_RECEIVER",
    "Containerd",
    "Dockerd",
    "HostUser",
    "crun_script",
    "docker_version",
    "private_containerd",
    "private_dockerd",
    "private_rootless_dockerd",
    "shared_tmpdir",
    "temporary_user",
]

REPO = Path(__file__).resolve().parent.parent
CRUN_RECEIVER = REPO / "deploy" / "docker" / "crun-seccomp-receiver"
# Fixed directories the engines create whatever they are told (see module docstring).
_SHARED_DIRS = (Path("/run/containerd"), Path("/run/docker"))
_START_TIMEOUT = 30.0
_STOP_GRACE = 10.0


def _require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise RuntimeError(f"{binary} is not installed (./dev.sh installs docker.io and "
                           "containerd)")
    return path


def docker_version() -> tuple[int, int]:
    """dockerd's (major, minor), from ``dockerd --version``."""
    out = subprocess.run([_require("dockerd"), "--version"], check=True,
                         capture_output=True, text=True).stdout
    match = re.search(r"version (\d+)\.(\d+)", out)
    if match is None:
        raise RuntimeError(f"cannot parse {out!r}")
    return int(match[1]), int(match[2])


def crun_script(path: Path, *, userns: bool = False) -> Path:
    """An executable ``path`` that runs crun the way tests run it on this host.

    ``userns``: for a crun inside a user namespace (rootless docker), where the cgroup2
    mount cannot be unmounted (it is locked to its parent): hide it under a tmpfs
    instead, which has the same effect on crun's cgroup detection.
    """
    argv = crun_argv0()
    if userns and _hybrid_cgroups():
        argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                'mount -t tmpfs none /sys/fs/cgroup/unified && exec "$@"', "crun",
                "crun", "--cgroup-manager=disabled"]
    path.write_text("#!/bin/sh\nexec " + shlex.join(argv) + ' "$@"\n')
    path.chmod(0o755)
    return path


def _empty_dirs_created(before: set[Path]) -> None:
    """Remove the shared engine directories we created, if nothing else is in them."""
    for top in _SHARED_DIRS:
        if top in before or not top.is_dir():
            continue
        for dirpath, _, _ in sorted(os.walk(top), key=lambda e: -len(e[0])):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)


def _unmount_under(directory: Path) -> None:
    prefix = str(directory).rstrip("/") + "/"
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1] for line in mounts]
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(_STOP_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(_STOP_GRACE)


def _wait_ready(proc: subprocess.Popen[bytes], log: Path, ready: Callable[[], bool],
                what: str) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}): {log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready in {_START_TIMEOUT}s: "
                               f"{log.read_text()[-3000:]}")
        time.sleep(0.05)


# --------------------------------------------------------------------------- containerd


@dataclass
class Containerd:
    directory: Path
    address: str
    namespace: str
    process: subprocess.Popen[bytes]
    user: HostUser | None = None   # rootless: containerd and ctr run as this user

    @property
    def state(self) -> Path:
        return self.directory / "state"

    @property
    def fifo_dir(self) -> Path:
        """For ``ctr run/exec --fifo-dir`` (ctr's default is in /run/containerd)."""
        return self.directory / "fifo"

    @property
    def runc_root(self) -> Path:
        """For ``ctr run --runc-root`` (the shim's default is /run/containerd/runc)."""
        return self.directory / "runc-root"

    def ctr_argv(self, args: Sequence[str], *, namespace: str | None = None) -> list[str]:
        as_user = ["runuser", "-u", self.user.name, "--"] if self.user else []
        return [*as_user, "ctr", "--address", self.address, "--namespace",
                namespace or self.namespace, *args]

    def ctr(self, args: Sequence[str], *, namespace: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.ctr_argv(args, namespace=namespace), check=False,
                              capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def bundle_config(self, container_id: str, namespace: str | None = None) -> Any:
        """The ``config.json`` the shim handed to the runtime (a running task's bundle)."""
        bundle = (self.state / "io.containerd.runtime.v2.task" /
                  (namespace or self.namespace) / container_id)
        return json.loads((bundle / "config.json").read_text())

    def remove_everything(self) -> None:
        """Kill and delete every task and container, in every namespace."""
        namespaces = self.ctr(["namespaces", "ls", "-q"], timeout=30).stdout.split()
        for ns in namespaces:
            for task in self.ctr(["tasks", "ls", "-q"], namespace=ns, timeout=30).stdout.split():
                self.ctr(["tasks", "kill", "-s", "SIGKILL", task], namespace=ns, timeout=30)
                self.ctr(["tasks", "rm", "-f", task], namespace=ns, timeout=30)
            for ctr_id in self.ctr(["containers", "ls", "-q"], namespace=ns,
                                   timeout=30).stdout.split():
                self.ctr(["containers", "rm", ctr_id], namespace=ns, timeout=30)

    def own_shims(self) -> list[int]:
        """Pids of containerd-shim processes started by this containerd."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if (argv and b"containerd-shim" in argv[0]
                    and self.address.encode() in argv):
                pids.append(int(entry.name))
        return pids


@contextlib.contextmanager
def private_containerd(directory: Path, *, namespace: str = "sstest",
                       user: HostUser | None = None) -> Iterator[Containerd]:
    """A containerd of its own in ``directory`` (see module docstring), with empty
    ``fifo_dir`` and ``runc_root`` directories for ``ctr run --fifo-dir --runc-root``.

    ``user``: rootless containerd, as ``user`` in rootlesskit's user and mount namespaces
    (``--net=host --copy-up=/etc --copy-up=/run``, like nerdctl's
    ``containerd-rootless.sh`` without its network); ``directory`` must be reachable by
    the user (:func:`shared_tmpdir`), and ``ctr`` runs as the user too.
    """
    containerd = _require("containerd")
    _require("ctr")
    before = {d for d in _SHARED_DIRS if d.exists()}
    directory.mkdir(parents=True, exist_ok=True)
    address = str(directory / "containerd.sock")
    config = directory / "containerd.toml"
    config.write_text(
        "version = 2\n"
        f'root = "{directory / "root"}"\n'
        f'state = "{directory / "state"}"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.internal.v1.opt"]\n'
        f'[grpc]\naddress = "{address}"\n'
        f'[ttrpc]\naddress = "{address}.ttrpc"\n'
        '[debug]\naddress = ""\n'
        '[metrics]\naddress = ""\n')
    config.chmod(0o644)
    argv = [containerd, "--config", str(config)]
    for owned in (directory, directory / "fifo", directory / "runc-root"):
        owned.mkdir(exist_ok=True)
        if user is not None:
            os.chown(owned, user.uid, user.gid)
    if user is not None:
        argv = _rootless(user, directory, argv)
    log = directory / "containerd.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    ctd = Containerd(directory, address, namespace, process, user)
    try:
        _wait_ready(process, log,
                    lambda: ctd.ctr(["version"], timeout=10).returncode == 0, "containerd")
        yield ctd
    finally:
        try:
            if process.poll() is None:
                ctd.remove_everything()
        finally:
            _stop(process)
            leftovers = ctd.own_shims() + (_processes_naming(directory) if user else [])
            for pid in leftovers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            _unmount_under(directory)
            shutil.rmtree(directory, ignore_errors=True)
            _empty_dirs_created(before)


def _rootless(user: HostUser, directory: Path, argv: Sequence[str]) -> list[str]:
    """``argv`` as ``user`` under rootlesskit, the way the rootless scripts of docker and
    nerdctl start their daemons (their network set-up left out: ``--net=host``)."""
    home = directory / "home"
    home.mkdir(exist_ok=True)
    os.chown(home, user.uid, user.gid)
    child = "rm -f /run/docker /run/containerd /run/xtables.lock; exec " + shlex.join(argv)
    return ["runuser", "-u", user.name, "--", "env", f"HOME={home}",
            f"XDG_RUNTIME_DIR={directory}", "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
            "rootlesskit", "--net=host", "--copy-up=/etc", "--copy-up=/run",
            "--propagation=rslave", f"--state-dir={directory / 'rootlesskit'}",
            "sh", "-c", child]


# --------------------------------------------------------------------------- dockerd


@dataclass
class Dockerd:
    directory: Path
    host: str
    containerd: Containerd | None   # None: rootless, dockerd runs its own inside
    namespace: str
    process: subprocess.Popen[bytes]
    cli: str
    image: str = ""

    def docker_argv(self, args: Sequence[str]) -> list[str]:
        return [self.cli, "--host", self.host, *args]

    def docker(self, args: Sequence[str], *, timeout: float = 60,
               input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(self.docker_argv(args), check=False, capture_output=True,
                              timeout=timeout, input=input,
                              stdin=None if input is not None else subprocess.DEVNULL)

    def bundle_config(self, container_id: str) -> Any:
        """The ``config.json`` dockerd (through containerd) gave the runtime."""
        if self.containerd is None:
            raise ValueError("the bundles of a rootless dockerd are inside its namespaces")
        return self.containerd.bundle_config(container_id, self.namespace)

    def remove_everything(self) -> None:
        ids = self.docker(["ps", "-aq", "--no-trunc"], timeout=30).stdout.split()
        if ids:
            self.docker(["rm", "-f", *[i.decode() for i in ids]], timeout=60)


def _docker_cli() -> str:
    # The CLI that comes with this dockerd (Debian's docker.io: /usr/sbin/dockerd and
    # /usr/bin/docker), not whatever `docker` comes first on PATH.
    dockerd = Path(_require("dockerd"))
    for candidate in (dockerd.parent / "docker", dockerd.parent.parent / "bin" / "docker"):
        if candidate.is_file():
            return str(candidate)
    return _require("docker")


@contextlib.contextmanager
def private_dockerd(directory: Path, containerd: Containerd, *,
                    runtimes: Mapping[str, Mapping[str, Any]]) -> Iterator[Dockerd]:
    """A dockerd on ``containerd`` with ``runtimes`` (daemon.json's ``runtimes`` table)
    and the busybox rootfs imported as image ``sstest/busybox`` (``.image``)."""
    namespace = f"{containerd.namespace}-moby"
    argv = ["--containerd", containerd.address,
            "--containerd-namespace", namespace,
            "--containerd-plugins-namespace", f"{namespace}-plugins"]
    with _dockerd(directory, argv, runtimes, containerd, namespace, user=None) as d:
        yield d


@contextlib.contextmanager
def private_rootless_dockerd(directory: Path, user: HostUser, *,
                             runtimes: Mapping[str, Mapping[str, Any]]) -> Iterator[Dockerd]:
    """Rootless docker: dockerd as ``user`` in rootlesskit's user and mount namespaces
    (``--net=host``: the containers have no network anyway; ``--copy-up=/etc
    --copy-up=/run`` as ``dockerd-rootless.sh`` does), with the containerd it starts
    itself. ``directory`` must be reachable by ``user``: a 0755 directory of its own
    (:func:`shared_tmpdir`). The docker CLI runs as root on the user's socket."""
    with _dockerd(directory, [], runtimes, None, "moby", user=user) as d:
        yield d


@contextlib.contextmanager
def _dockerd(directory: Path, engine_argv: list[str], runtimes: Mapping[str, Mapping[str, Any]],
             containerd: Containerd | None, namespace: str, *,
             user: HostUser | None) -> Iterator[Dockerd]:
    dockerd = _require("dockerd")
    before = {d for d in _SHARED_DIRS if d.exists()}
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "daemon.json"
    config.write_text(json.dumps({
        "deprecated-key-path": str(directory / "key.json"),
        "runtimes": {name: dict(spec) for name, spec in runtimes.items()},
    }, indent=2))
    config.chmod(0o644)
    host = f"unix://{directory / 'docker.sock'}"
    pidfile = directory / "docker.pid"
    argv = [dockerd, "--config-file", str(config), *engine_argv,
            "--data-root", str(directory / "data"), "--exec-root", str(directory / "exec"),
            "--pidfile", str(pidfile), "-H", host,
            "--bridge=none", "--iptables=false", "--ip-masq=false",
            "--storage-driver", "overlay2",
            "--default-ulimit", "nofile=1024:1024"]
    if user is not None:
        os.chown(directory, user.uid, user.gid)  # dockerd creates its directories here
        argv = _rootless(user, directory, argv)
    log = directory / "dockerd.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    d = Dockerd(directory, host, containerd, namespace, process, _docker_cli())
    try:
        _wait_ready(process, log,
                    lambda: d.docker(["version"], timeout=10).returncode == 0, "dockerd")
        d.image = "sstest/busybox:1"
        tar = subprocess.run(["tar", "-C", str(busybox_rootfs()), "-c", "."], check=True,
                             capture_output=True).stdout
        imported = d.docker(["import", "-", d.image], input=tar)
        if imported.returncode != 0:
            raise RuntimeError(f"docker import: {imported.stderr.decode()}")
        yield d
    finally:
        try:
            if process.poll() is None:
                d.remove_everything()
        finally:
            if user is not None:
                _stop_rootless(process, pidfile, directory)
            _stop(process)
            _unmount_under(directory)
            shutil.rmtree(directory, ignore_errors=True)
            _empty_dirs_created(before)


def _stop_rootless(process: subprocess.Popen[bytes], pidfile: Path, directory: Path) -> None:
    """Stop a rootless dockerd (rootlesskit exits with it), then whatever it left running
    (its containerd, shims): processes whose command line names ``directory``."""
    with contextlib.suppress(OSError, ValueError):
        os.kill(int(pidfile.read_text()), signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(_STOP_GRACE)
    for pid in _processes_naming(directory):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _processes_naming(directory: Path) -> list[int]:
    needle = str(directory).encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


# --------------------------------------------------------------------------- a user


@dataclass
class HostUser:
    name: str
    uid: int
    gid: int


@contextlib.contextmanager
def temporary_user(prefix: str = "sstest-rl") -> Iterator[HostUser]:
    """A user with subordinate uid and gid ranges (``useradd`` gives a new regular user
    ``SUB_UID_COUNT`` of each from /etc/login.defs), deleted with them on exit."""
    name = f"{prefix}-{os.getpid()}"
    subprocess.run(["useradd", "--no-create-home", "--home-dir", "/nonexistent",
                    "--shell", "/usr/sbin/nologin", "--user-group", name],
                   check=True, capture_output=True)
    try:
        entry = pwd.getpwnam(name)
        for path in ("/etc/subuid", "/etc/subgid"):
            if not any(line.startswith(f"{name}:") for line in Path(path).read_text().splitlines()):
                raise RuntimeError(f"useradd gave {name} no range in {path}")
        yield HostUser(name, entry.pw_uid, entry.pw_gid)
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


def shared_tmpdir(prefix: str) -> Path:
    """A new 0755 directory in /tmp (pytest's are 0700 under a 0700 parent: another user
    cannot reach them). The caller removes it."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path
