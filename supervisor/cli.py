"""``seccomp-supervisor``: serve, run, check."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import threading
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING

from . import __version__
from .config import (
    Config,
    add_policy_files,
    control_socket_for,
    default_config,
    load_config,
    with_control_socket,
    with_metrics,
    with_socket,
)
from .errors import ConfigError, KernelMismatchError, ProfileError
from .policy import PolicySet

if TYPE_CHECKING:
    from ._start import PreBound

log = logging.getLogger("supervisor")

EXIT_USAGE = 2


def _setup_logging(level: str) -> None:
    """Log to stderr, every record escaped by :class:`~supervisor.logfmt.OneLineFormatter`:
    under systemd stderr shares the journal stream with the JSON audit trail on stdout,
    and logged strings come from containers' creators (see supervisor/logfmt.py)."""
    from .logfmt import OneLineFormatter

    # Under systemd the journal stamps each line itself.
    fmt = ("%(levelname)s %(name)s: %(message)s" if os.environ.get("JOURNAL_STREAM")
           else "%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter(fmt))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler],
                        force=True)
    # An exception nothing caught would otherwise be printed raw by the interpreter.
    sys.excepthook = _log_uncaught
    threading.excepthook = lambda args: _log_uncaught(
        args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback)


def _log_uncaught(exc_type: type[BaseException], exc: BaseException,
                  tb: TracebackType | None) -> None:
    logging.getLogger("supervisor").critical("uncaught exception", exc_info=(exc_type, exc, tb))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seccomp-supervisor",
        description="Answer seccomp user notifications with Python policies.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"],
                        help="the least severe log messages written to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the daemon")
    serve.add_argument("--config", help="TOML config (default: the embedded default)")
    serve.add_argument("--socket",
                       help="notify socket path (overrides [listen] socket); without "
                            "--config, the control socket is derived from it "
                            "(PATH.sock -> PATH.control.sock) and /metrics is off unless "
                            "--metrics is given, so several daemons can run side by side")
    serve.add_argument("--policy", action="append", default=[], metavar="FILE",
                       help="add a policy file to the default chain (repeatable)")
    serve.add_argument("--control-socket", metavar="PATH",
                       help="control socket path (overrides [listen] control_socket)")
    serve.add_argument("--metrics", metavar="HOST:PORT",
                       help="serve /metrics there, or 'off' (overrides [metrics] listen)")
    serve.add_argument("--pid-file", metavar="PATH",
                       help="write the daemon's pid to PATH (atomically) once it is ready, "
                            "remove it at exit; a file left by a dead process is removed "
                            "at start")
    serve.add_argument("--ready-fd", type=int, metavar="N",
                       help="write a newline to fd N and close it once the daemon is "
                            "ready (s6/runit style readiness; READY=1 for systemd is "
                            "sent at the same moment)")
    serve.add_argument("--takeover", action="store_true",
                       help="take the containers and the notify socket of the daemon "
                            "running on [listen] control_socket, which then exits (a "
                            "restart without systemd); starts afresh if none runs")
    serve.add_argument("--fd-keeper", metavar="PATH",
                       help="keep every session in the fd keeper (`keep`) at PATH instead "
                            "of systemd's fd store and serve again the sessions it holds "
                            "(after a crash); with --takeover, take over only when it "
                            "holds none. Serves nothing if this keeper's daemon handed its "
                            "sessions over (a rolling update); exits 1 if it cannot be used")

    run = sub.add_parser(
        "run", help="run a command under a seccomp filter (notify rules: served by the "
                    "daemon)",
        description="Build a seccomp filter, start CMD under it and hand the listener to "
                    "the supervisor at --socket, as runc does for a container. A profile "
                    "without SCMP_ACT_NOTIFY rules (one `record` wrote) is enforced by "
                    "the kernel alone: no daemon is involved and --socket is not needed.")
    run.add_argument("--socket", help="the supervisor's notify socket (required when the "
                                      "filter has SCMP_ACT_NOTIFY rules)")
    what = run.add_mutually_exclusive_group(required=True)
    what.add_argument("--profile", help="OCI seccomp profile (JSON)")
    what.add_argument("--notify", action="append", metavar="SYSCALL",
                      help="notify this system call, allow all others (repeatable)")
    run.add_argument("--metadata", default="", help="listenerMetadata to send")
    run.add_argument("--id", dest="container_id", help="container id to send")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")

    check = sub.add_parser("check", help="validate a config and load its policies")
    check.add_argument("--config", help="TOML config (default: the embedded default)")

    status = sub.add_parser(
        "status", help="show what the running daemon serves",
        description="Ask the daemon on its control socket for the containers it serves.")
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    where = status.add_mutually_exclusive_group()
    where.add_argument("--config", help="TOML config whose [listen] control_socket to use")
    where.add_argument("--control", metavar="PATH", help="the control socket")

    record = sub.add_parser(
        "record", help="run a command and write an OCI profile of the calls it made",
        description="Run CMD under a filter that notifies every system call, answer each "
                    "one CONTINUE while recording it, and write a profile that allows what "
                    "was seen (default SCMP_ACT_ERRNO). write, read, close, execve and "
                    "exit_group are always allowed: the launcher needs them after the filter "
                    "is in place, and write cannot be notified.")
    record.add_argument("--out", required=True, metavar="PROFILE.json",
                        help="where to write the profile")
    record.add_argument("--base", metavar="BASE.json",
                        help="profile to merge into (its default action must be "
                             "SCMP_ACT_ERRNO; its conditional rules win)")
    record.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")

    from .profile_cli import add_parser as add_profile_parser

    add_profile_parser(sub)
    from .top import add_parser as add_top_parser

    add_top_parser(sub)
    from .keeper import add_parser as add_keeper_parser

    add_keeper_parser(sub)
    return parser


def load_everything(config_path: str | None, socket: str | None = None,
                    policy_files: Sequence[str] = (), *, control_socket: str | None = None,
                    metrics: str | None = None
                    ) -> tuple[Config, Mapping[str, PolicySet]]:
    """Config plus loaded policies, with command-line overrides. Raises ConfigError.

    ``socket`` without ``config_path`` also moves the control socket beside it
    (:func:`~supervisor.config.control_socket_for`) and turns ``/metrics`` off: a
    daemon started with only ``--socket`` must not collide with another one on the
    built-in default control socket and port. ``control_socket`` and ``metrics`` (a
    ``HOST:PORT``, or ``off``) override both.
    """
    from .plugins import load_policies

    config = load_config(config_path) if config_path else default_config()
    if socket:
        config = with_socket(config, socket)
        if not config_path:
            config = with_control_socket(config, control_socket_for(config.listen.socket),
                                         key="--socket")
            config = with_metrics(config, "off")
    if control_socket:
        config = with_control_socket(config, control_socket)
    if metrics is not None:
        config = with_metrics(config, metrics)
    if policy_files:
        config = add_policy_files(config, policy_files)
    return config, load_policies(config)


def cmd_serve(args: argparse.Namespace, prebound: PreBound | None = None) -> int:
    """``serve``. ``prebound``: the notify socket :mod:`supervisor._start` bound before
    the imports; used if the config names the same path, else closed and removed."""
    import functools

    import trio

    from ._start import in_use
    from .daemon import Daemon
    from .keeper import KeeperError
    from .readiness import ReadinessError, ReadinessNotifier
    from .takeover import TakeoverError

    def loader() -> tuple[Config, Mapping[str, PolicySet]]:
        return load_everything(args.config, args.socket, args.policy,
                               control_socket=args.control_socket, metrics=args.metrics)

    try:
        config, policies = loader()
        notifier = ReadinessNotifier.from_environ(pid_file=args.pid_file,
                                                  ready_fd=args.ready_fd)
    except (ConfigError, ReadinessError) as exc:
        print(f"seccomp-supervisor: {exc}", file=sys.stderr)
        return EXIT_USAGE
    control = config.listen.control_socket
    notify = config.listen.socket
    if not args.takeover and prebound is None and not os.environ.get("LISTEN_FDS") \
            and in_use(notify):
        # What binding it would say, before the control socket (the same daemon has
        # both): the notify socket is the one that matters.
        print(f"seccomp-supervisor: [Errno {errno.EADDRINUSE}] another process is "
              f"listening on this socket: {notify!r}", file=sys.stderr)
        notifier.cleanup()
        return 1
    if not args.takeover and in_use(control):
        # Another daemon answers there: `status` and `--takeover` would reach it.
        print(f"seccomp-supervisor: control socket {control}: another process is listening "
              f"on it (give this daemon its own with --control-socket or [listen] "
              f"control_socket)", file=sys.stderr)
        notifier.cleanup()
        return 1
    sock = None
    if prebound is not None and not args.takeover and \
            os.path.abspath(prebound.path) == os.path.abspath(config.listen.socket):
        sock = trio.socket.from_stdlib_socket(prebound.sock)
        prebound.taken = True  # the daemon closes it and removes its file at exit
    from . import emulate

    # The helper that acts as callers starts with our capabilities; then the daemon
    # drops what only the helper needs (see emulate.DAEMON_DROPS).
    try:
        emulate.start_helper()
        emulate.drop_helper_capabilities()
    except (OSError, RuntimeError) as exc:
        print(f"seccomp-supervisor: the emulation helper: {exc}", file=sys.stderr)
        notifier.cleanup()
        return 1
    daemon = Daemon(config, policies, loader=loader if args.config or args.policy else None,
                    notifier=notifier, fd_keeper=args.fd_keeper)
    takeover = control if args.takeover else None
    from . import heap

    heap.tune()
    try:
        trio.run(functools.partial(daemon.run, sock=sock,
                                   sock_file=config.listen.socket if sock else None,
                                   takeover=takeover))
    except TakeoverError as exc:
        print(f"seccomp-supervisor: takeover failed, the running daemon serves on: {exc}",
              file=sys.stderr)
        return 1
    except KeeperError as exc:
        print(f"seccomp-supervisor: fd keeper: {exc}", file=sys.stderr)
        return 1
    except KernelMismatchError as exc:
        if prebound is not None:
            prebound.taken = False  # refused before the daemon used it
        print(f"seccomp-supervisor: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"seccomp-supervisor: {exc}", file=sys.stderr)
        return 1
    finally:
        notifier.cleanup()
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .launcher import LaunchError, run
    from .profile import build_program, filter_flags, load_profile, notify_profile

    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        print("seccomp-supervisor run: no command given (use: run ... -- CMD ARGS)",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        profile = load_profile(args.profile) if args.profile else notify_profile(args.notify)
        if profile.has_notify and args.socket is None:
            raise ProfileError(f"{profile.source}: has SCMP_ACT_NOTIFY rules: --socket "
                               "must name the supervisor that answers them")
        program = build_program(profile)
        flags = filter_flags(profile)  # ProfileError if the kernel lacks a flag
    except (ProfileError, OSError) as exc:
        print(f"seccomp-supervisor run: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return run(cmd, program, socket_path=args.socket, metadata=args.metadata,
                   container_id=args.container_id, flags=flags)
    except (LaunchError, OSError) as exc:
        print(f"seccomp-supervisor run: {exc}", file=sys.stderr)
        return 126


def cmd_check(args: argparse.Namespace) -> int:
    from .plugins import check_config

    if args.config is None:
        try:
            config = default_config()
        except ConfigError as exc:
            print(exc)
            return 1
        print(f"embedded default config: OK ({len(config.policies)} policies)")
        return 0
    problems = check_config(args.config)
    for line in problems:
        print(line)
    if problems:
        return 1
    # Warnings (not errors): routes that whoever creates a container can choose.
    from .config import load_config
    from .router import route_warnings

    for line in route_warnings(load_config(args.config)):
        print(line)
    print(f"{args.config}: OK")
    return 0


def cmd_record(args: argparse.Namespace) -> int:
    from .learn import load_base, record
    from .spawn import SpawnError

    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        print("seccomp-supervisor record: no command given (use: record --out P -- CMD ARGS)",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        base = load_base(args.base) if args.base else None
    except ProfileError as exc:
        print(f"seccomp-supervisor record: --base: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = record(cmd, args.out, base=base)
    except SpawnError as exc:
        print(f"seccomp-supervisor record: {exc}", file=sys.stderr)
        return 126
    except OSError as exc:
        print(f"seccomp-supervisor record: cannot write {args.out}: {exc}", file=sys.stderr)
        return 1
    allowed = sum(len(rule.names) for rule in result.profile.syscalls
                  if rule.action == "SCMP_ACT_ALLOW")
    log.info("recorded %d notifications of %d system calls; %s allows %d",
             result.recording.total, len(result.recording.names()), args.out, allowed)
    return result.status


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from .control import ControlError, format_status, request

    path = args.control
    if path is None:
        try:
            config = load_config(args.config) if args.config else default_config()
        except ConfigError as exc:
            print(f"seccomp-supervisor status: {exc}", file=sys.stderr)
            return EXIT_USAGE
        path = config.listen.control_socket
    try:
        result, _fds = request(path, "status")
    except (OSError, ControlError) as exc:
        print(f"seccomp-supervisor status: {path}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        sys.stdout.write(format_status(result))
    return 0


def main(argv: Sequence[str] | None = None, *, prebound: PreBound | None = None) -> int:
    """The command line. ``prebound``: see :func:`cmd_serve` (the console script's
    :func:`supervisor._start.main` passes it; the caller closes what is not taken)."""
    args = _parser().parse_args(argv)
    _setup_logging(args.log_level)
    if args.command == "status":
        return cmd_status(args)
    if args.command == "serve":
        return cmd_serve(args, prebound)
    if args.command == "run":
        return cmd_run(args)
    if args.command == "record":
        return cmd_record(args)
    if args.command == "top":
        from .top import main as top_main

        return top_main(args)
    if args.command == "keep":
        from .keeper import main as keeper_main

        return keeper_main(args)
    if args.command == "profile":
        from .profile_cli import main as profile_main

        return profile_main(args)
    return cmd_check(args)


if __name__ == "__main__":
    raise SystemExit(main())
