"""``seccomp-supervisor top``: a live view of the running daemon, like ``systemd-cgtop``.

One line per container the daemon serves: its notified calls and denies per second, the
99th percentile of the time to answer, the decisions under way and its policies; sorted,
refreshed every ``--interval`` seconds; ``q`` quits.

Everything comes from the control socket's ``status`` command (see
:meth:`supervisor.daemon.Daemon.status`): per session the counters since it started and
``latency_counts`` (answers per latency bucket, bounds in ``latency_bounds``). Rates and
the p99 are the differences of two successive snapshots, so the first screen shows ``-``
until the second snapshot is in.

Container ids, policy names and paths come from the daemon, and a container id comes from
whoever created the container: every such string is shown escaped (printable ASCII only;
anything else, a backslash included, as a Python-style ``\\xNN``/``\\uNNNN`` escape), so
nothing in it can move the cursor, clear the screen or change the terminal's state.

The pure parts (:func:`~supervisor.control.printable`, :func:`quantile`, :func:`container_rows`,
:func:`render`) take and return plain data; :func:`run_curses` and :func:`run_batch` are
the thin loops around them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Final

__all__ = [
    "SORT_KEYS",
    "ContainerRow",
    "add_parser",
    "container_rows",
    "format_rate",
    "format_seconds",
    "main",
    "quantile",
    "render",
    "sort_rows",
]

# Sort orders: name -> (key in the terminal, column title).
SORT_KEYS: Final = {
    "calls": ("c", "CALLS/S"),
    "denies": ("d", "DENIES/S"),
    "p99": ("l", "P99"),
    "inflight": ("i", "INFLIGHT"),
    "container": ("n", "CONTAINER"),
}
_KEY_TO_SORT: Final = {key: name for name, (key, _title) in SORT_KEYS.items()}
_MAX_ID_WIDTH: Final = 64
_NUMERIC: Final = (("SESS", 4), ("CALLS/S", 8), ("DENIES/S", 8), ("P99", 8),
                   ("INFLIGHT", 8))


# --------------------------------------------------------------------------- pure parts


def quantile(q: float, bounds: Sequence[float], counts: Sequence[int]) -> float | None:
    """The ``q`` quantile of a histogram with ``counts[i]`` observations (not cumulative)
    at most ``bounds[i]`` and above ``bounds[i-1]`` (the last count is above every bound),
    interpolated linearly within the bucket, as Prometheus's ``histogram_quantile`` does.
    None without observations; ``inf`` when it falls above the last bound."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(counts):
        if count > 0 and seen + count >= rank:
            if i >= len(bounds):
                return float("inf")
            lower = bounds[i - 1] if i > 0 else 0.0
            return lower + (bounds[i] - lower) * (rank - seen) / count
        seen += count
    return float("inf")


@dataclass
class ContainerRow:
    """One container's line. Rates are None on the first snapshot."""

    container: str
    sessions: int = 0
    policies: list[str] = field(default_factory=list)
    inflight: int = 0
    calls_per_second: float | None = None
    denies_per_second: float | None = None
    p99_seconds: float | None = None


def _session_key(session: Mapping[str, Any]) -> object:
    serial = session.get("session")
    if serial is not None:
        return serial
    return (session.get("container"), session.get("runtime_pid"))


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _counts(session: Mapping[str, Any], size: int) -> list[int]:
    raw = session.get("latency_counts")
    values = [_int(v) for v in raw] if isinstance(raw, list) else []
    return (values + [0] * size)[:size]


def container_rows(previous: Mapping[str, Any] | None, current: Mapping[str, Any],
                   elapsed: float) -> list[ContainerRow]:
    """The lines for ``current`` (a ``status`` result), with rates over the ``elapsed``
    seconds since ``previous`` (None: no rates yet). Sessions are matched by their
    ``session`` serial; one that is new since ``previous`` counts from zero. Sessions of
    one container (``runc exec`` makes more) share its line."""
    bounds = [float(b) for b in current.get("latency_bounds", [])]
    size = len(bounds) + 1
    before: dict[object, Mapping[str, Any]] = {}
    if previous is not None:
        before = {_session_key(s): s for s in previous.get("sessions", [])}
    rows: dict[str, ContainerRow] = {}
    latency: dict[str, list[int]] = {}
    rates = previous is not None and elapsed > 0
    for session in current.get("sessions", []):
        name = str(session.get("container", ""))
        row = rows.get(name)
        if row is None:
            row = rows[name] = ContainerRow(name)
            latency[name] = [0] * size
            if rates:
                row.calls_per_second = row.denies_per_second = 0.0
        row.sessions += 1
        row.inflight += _int(session.get("inflight"))
        for policy in session.get("policies", []):
            if str(policy) not in row.policies:
                row.policies.append(str(policy))
        if not rates:
            continue
        old = before.get(_session_key(session), {})
        calls = _int(session.get("notifications")) - _int(old.get("notifications"))
        denies = (_int(session.get("decisions", {}).get("deny"))
                  - _int(old.get("decisions", {}).get("deny")))
        assert row.calls_per_second is not None and row.denies_per_second is not None
        row.calls_per_second += max(0, calls) / elapsed
        row.denies_per_second += max(0, denies) / elapsed
        now_counts, old_counts = _counts(session, size), _counts(old, size)
        merged = latency[name]
        for i in range(size):
            merged[i] += max(0, now_counts[i] - old_counts[i])
    if rates:
        for name, row in rows.items():
            row.p99_seconds = quantile(0.99, bounds, latency[name])
    return list(rows.values())


def sort_rows(rows: Iterable[ContainerRow], by: str) -> list[ContainerRow]:
    """Busiest first (``by``: a :data:`SORT_KEYS` name); ``container`` sorts by name.
    Unknown values (``-``) go last; ties by name."""
    if by == "container":
        return sorted(rows, key=lambda r: r.container)
    getters: dict[str, Callable[[ContainerRow], float | None]] = {
        "calls": lambda r: r.calls_per_second,
        "denies": lambda r: r.denies_per_second,
        "p99": lambda r: r.p99_seconds,
        "inflight": lambda r: float(r.inflight),
    }
    getter = getters[by]

    def key(row: ContainerRow) -> tuple[bool, float, str]:
        value = getter(row)
        return (value is None, -(value or 0.0), row.container)

    return sorted(rows, key=key)


def format_rate(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 999_950:
        return f"{value / 1e6:.1f}M"
    if value >= 9_999.5:
        return f"{value / 1e3:.1f}k"
    return f"{value:.1f}"


def format_seconds(value: float | None, last_bound: float = 10.0) -> str:
    """A latency in the unit that suits it: ``45us``, ``1.2ms``, ``2.50s``; ``-`` for
    none, ``>10.00s`` above the last bucket's bound."""
    if value is None:
        return "-"
    if value == float("inf"):
        return ">" + format_seconds(last_bound)
    if value < 1e-3:
        return f"{value * 1e6:.0f}us"
    if value < 1.0:
        return f"{value * 1e3:.1f}ms"
    return f"{value:.2f}s"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:max(0, width - 2)] + ".."


def render(status: Mapping[str, Any] | None, rows: Sequence[ContainerRow], *,
           sort: str = "calls", width: int | None = None, interval: float = 1.0,
           error: str | None = None, keys: bool = True) -> list[str]:
    """The screen: the daemon and its totals, the refresh and sort order, the keys (or
    the error of the last poll; blank for neither), the table header and one line per
    row (in the order given). Every line is printable ASCII, at most ``width`` long."""
    # Here, not at the top: the CLI imports this module to build its parser, and the
    # control module brings trio with it.
    from .control import printable

    status = status or {}
    known = [r for r in rows if r.calls_per_second is not None]
    calls = sum(r.calls_per_second or 0.0 for r in known)
    denies = sum(r.denies_per_second or 0.0 for r in known)
    sessions = sum(r.sessions for r in rows)
    lines = [
        f"seccomp-supervisor {printable(status.get('version', '?'))}  "
        f"pid {printable(status.get('pid', '?'))}  "
        f"up {_duration(float(status.get('uptime_seconds', 0) or 0))}  "
        f"containers {len(rows)}  sessions {sessions}",
        f"calls/s {format_rate(calls if known else None)}  "
        f"denies/s {format_rate(denies if known else None)}  "
        f"in flight {printable(status.get('inflight', 0))}  "
        f"every {interval:g}s  sorted by {SORT_KEYS[sort][1]}",
        (f"error: {printable(error)}" if error else
         "q quit  sort: c calls  d denies  l p99  i in flight  n name" if keys else ""),
    ]
    bounds = status.get("latency_bounds") or [10.0]
    ids = [printable(r.container) or "-" for r in rows]
    numeric_width = sum(w + 2 for _t, w in _NUMERIC)
    id_width = max([len("CONTAINER"), *map(len, ids)])
    id_width = min(id_width, _MAX_ID_WIDTH)
    if width is not None:
        # Leave the policies column at least 12 characters.
        id_width = max(len("CONTAINER"), min(id_width, width - numeric_width - 2 - 12))

    def line(first: str, numbers: Sequence[str], last: str) -> str:
        cells = [_clip(first, id_width).ljust(id_width)]
        cells += [n.rjust(w) for n, (_t, w) in zip(numbers, _NUMERIC, strict=True)]
        return "  ".join([*cells, last]).rstrip()

    lines.append(line("CONTAINER", [t for t, _w in _NUMERIC], "POLICIES"))
    if not rows:
        lines.append("(no containers are being served)")
    for shown_id, row in zip(ids, rows, strict=True):
        lines.append(line(shown_id, [
            str(row.sessions), format_rate(row.calls_per_second),
            format_rate(row.denies_per_second), format_seconds(row.p99_seconds, float(bounds[-1])),
            str(row.inflight)], ",".join(printable(p) for p in row.policies) or "-"))
    if width is not None:
        lines = [_clip(text, width) for text in lines]
    return lines


# --------------------------------------------------------------------------- I/O


class _Poller:
    """Fetches ``status`` and keeps the last snapshot to take rates against."""

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self.previous: tuple[float, Mapping[str, Any]] | None = None
        self.status: Mapping[str, Any] | None = None
        self.rows: list[ContainerRow] = []
        self.error: str | None = None

    def poll(self) -> None:
        from .control import ControlError, request

        try:
            status, _fds = request(self.path, "status", timeout=self.timeout)
        except (OSError, ControlError) as exc:
            self.error = f"{self.path}: {exc}"
            self.previous = None  # the daemon may have restarted: no rates across it
            return
        now = time.monotonic()
        self.error = None
        if self.previous is not None and self.previous[1].get("pid") != status.get("pid"):
            self.previous = None  # another daemon: its sessions are not the old ones
        if self.previous is None:
            self.rows = container_rows(None, status, 0.0)
        else:
            self.rows = container_rows(self.previous[1], status, now - self.previous[0])
        self.previous = (now, status)
        self.status = status

    def lines(self, sort: str, width: int | None, interval: float, *,
              keys: bool = True) -> list[str]:
        return render(self.status, sort_rows(self.rows, sort), sort=sort, width=width,
                      interval=interval, error=self.error, keys=keys)


def run_curses(path: str, interval: float, sort: str) -> None:
    """The live view until ``q`` (or Ctrl-C)."""
    import curses

    def loop(screen: Any) -> None:
        try:
            curses.curs_set(0)
        except curses.error:
            pass  # a terminal without an invisible cursor
        screen.timeout(100)
        poller = _Poller(path, timeout=max(1.0, min(interval, 5.0)))
        current = sort
        next_poll = 0.0
        dirty = True
        while True:
            now = time.monotonic()
            if now >= next_poll:
                poller.poll()
                next_poll = now + interval
                dirty = True
            if dirty:
                height, width = screen.getmaxyx()
                screen.erase()
                try:
                    for y, text in enumerate(
                            poller.lines(current, max(1, width - 1), interval)[:height]):
                        attr = curses.A_REVERSE if y == 3 else curses.A_NORMAL
                        screen.addnstr(y, 0, text, max(1, width - 1), attr)
                except curses.error:
                    pass  # the terminal shrank under us: KEY_RESIZE comes next
                screen.refresh()
                dirty = False
            key = screen.getch()
            if key in (ord("q"), ord("Q")):
                return
            if key == curses.KEY_RESIZE:
                dirty = True
            elif 0 <= key < 256 and chr(key) in _KEY_TO_SORT:
                current = _KEY_TO_SORT[chr(key)]
                dirty = True

    # The terminal's size from the terminal (TIOCGWINSZ): curses prefers LINES and
    # COLUMNS when they are set, and a shell may have exported them for the size it had
    # when it started (seen under tmux: an 80-column view in a 120-column pane).
    os.environ.pop("LINES", None)
    os.environ.pop("COLUMNS", None)
    try:
        curses.wrapper(loop)
    except KeyboardInterrupt:
        pass


def run_batch(path: str, interval: float, sort: str, iterations: int,
              out: IO[str]) -> int:
    """``--batch``: ``iterations`` screens, one every ``interval``, as plain text."""
    poller = _Poller(path, timeout=10.0)
    poller.poll()
    if poller.error:
        print(f"seccomp-supervisor top: {poller.error}", file=sys.stderr)
        return 1
    for i in range(iterations):
        time.sleep(interval)
        poller.poll()
        out.write("\n".join(poller.lines(sort, None, interval, keys=False)) + "\n")
        if i + 1 < iterations:
            out.write("\n")
        out.flush()
    return 1 if poller.error else 0


def add_parser(sub: Any) -> None:
    """The ``top`` subcommand, on the CLI's subparsers."""
    top = sub.add_parser(
        "top", help="live view of the containers the daemon serves",
        description="One line per container the running daemon serves: notified calls "
                    "and denies per second, p99 time to answer, decisions in flight and "
                    "policies, sorted and refreshed like systemd-cgtop. Keys: q quits; "
                    "c, d, l, i, n sort by calls, denies, p99, in flight, name.")
    where = top.add_mutually_exclusive_group()
    where.add_argument("--config", help="TOML config whose [listen] control_socket to use")
    where.add_argument("--control", metavar="PATH", help="the control socket")
    top.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                     help="refresh every SECONDS (default 1)")
    top.add_argument("--sort", choices=list(SORT_KEYS), default="calls",
                     help="column to sort by (default calls)")
    top.add_argument("--batch", action="store_true",
                     help="print screens as plain text instead of the live view")
    top.add_argument("-n", "--iterations", type=int, default=1, metavar="N",
                     help="with --batch: how many screens (default 1)")


def main(args: argparse.Namespace) -> int:
    from .config import default_config, load_config
    from .errors import ConfigError

    if not 0.1 <= args.interval <= 3600:
        print("seccomp-supervisor top: --interval must be between 0.1 and 3600 seconds",
              file=sys.stderr)
        return 2
    path = args.control
    if path is None:
        try:
            config = load_config(args.config) if args.config else default_config()
        except ConfigError as exc:
            print(f"seccomp-supervisor top: {exc}", file=sys.stderr)
            return 2
        path = config.listen.control_socket
    if args.batch:
        return run_batch(path, args.interval, args.sort, max(1, args.iterations), sys.stdout)
    if not sys.stdout.isatty():
        print("seccomp-supervisor top: stdout is not a terminal (use --batch)",
              file=sys.stderr)
        return 2
    run_curses(path, args.interval, args.sort)
    return 0
