"""``seccomp-supervisor``: serve, run, check."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence

from . import __version__
from .config import Config, add_policy_files, default_config, load_config, with_socket
from .errors import ConfigError, KernelMismatchError, ProfileError
from .policy import PolicySet

log = logging.getLogger("supervisor")

EXIT_USAGE = 2


def _setup_logging(level: str) -> None:
    # Under systemd the journal stamps each line itself.
    fmt = ("%(levelname)s %(name)s: %(message)s" if os.environ.get("JOURNAL_STREAM")
           else "%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.basicConfig(level=getattr(logging, level.upper()), format=fmt, stream=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seccomp-supervisor",
        description="Answer seccomp user notifications with Python policies.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the daemon")
    serve.add_argument("--config", help="TOML config (default: the embedded default)")
    serve.add_argument("--socket", help="notify socket path (overrides [listen] socket)")
    serve.add_argument("--policy", action="append", default=[], metavar="FILE",
                       help="add a policy file to the default chain (repeatable)")

    run = sub.add_parser(
        "run", help="run a command under a notify filter served by the daemon",
        description="Build a seccomp filter, start CMD under it and hand the listener to "
                    "the supervisor at --socket, as runc does for a container.")
    run.add_argument("--socket", required=True, help="the supervisor's notify socket")
    what = run.add_mutually_exclusive_group(required=True)
    what.add_argument("--profile", help="OCI seccomp profile (JSON)")
    what.add_argument("--notify", action="append", metavar="SYSCALL",
                      help="notify this system call, allow all others (repeatable)")
    run.add_argument("--metadata", default="", help="listenerMetadata to send")
    run.add_argument("--id", dest="container_id", help="container id to send")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")

    check = sub.add_parser("check", help="validate a config and load its policies")
    check.add_argument("--config", help="TOML config (default: the embedded default)")
    return parser


def load_everything(config_path: str | None, socket: str | None = None,
                    policy_files: Sequence[str] = ()) -> tuple[Config, Mapping[str, PolicySet]]:
    """Config plus loaded policies, with command-line overrides. Raises ConfigError."""
    from .plugins import load_policies

    config = load_config(config_path) if config_path else default_config()
    if socket:
        config = with_socket(config, socket)
    if policy_files:
        config = add_policy_files(config, policy_files)
    return config, load_policies(config)


def cmd_serve(args: argparse.Namespace) -> int:
    import trio

    from .daemon import Daemon

    def loader() -> tuple[Config, Mapping[str, PolicySet]]:
        return load_everything(args.config, args.socket, args.policy)

    try:
        config, policies = loader()
    except ConfigError as exc:
        print(f"seccomp-supervisor: {exc}", file=sys.stderr)
        return EXIT_USAGE
    daemon = Daemon(config, policies, loader=loader if args.config or args.policy else None)
    try:
        trio.run(daemon.run)
    except KernelMismatchError as exc:
        print(f"seccomp-supervisor: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"seccomp-supervisor: {exc}", file=sys.stderr)
        return 1
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
        program = build_program(profile)
    except (ProfileError, OSError) as exc:
        print(f"seccomp-supervisor run: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return run(cmd, program, socket_path=args.socket, metadata=args.metadata,
                   container_id=args.container_id, flags=filter_flags(profile))
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
    print(f"{args.config}: OK")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(args.log_level)
    if args.command == "serve":
        return cmd_serve(args)
    if args.command == "run":
        return cmd_run(args)
    return cmd_check(args)


if __name__ == "__main__":
    raise SystemExit(main())
