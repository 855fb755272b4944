"""A restarted daemon gives the sessions its fd keeper kept to the live daemon.

In a rolling update (deploy/kubernetes) the new pod's daemon B takes over from the old
pod's daemon A (:mod:`supervisor.takeover`), then A tells its keeper ``HANDEDOVER=1``.
If A dies before that message (SIGKILL right after B's commit), or crash-loops while B
starts afresh, the kubelet restarts A and its keeper still holds listeners: serving them
beside B would put two readers on each filter (and bind the notify socket over B's).

So a daemon started with ``--fd-keeper`` whose keeper holds sessions first asks whether
another daemon answers on the control socket. If one does, it gives the sessions to it
(a *reverse takeover*) instead of serving them::

    A binds   DIR/give-TOKEN  (mode 0600, uid 0 only; the takeover* commands)
    A → B     {"command": "adopt", "token": TOKEN}          on the control socket
    B → A     the takeover protocol of takeover.py on DIR/give-TOKEN, with commit
    B → A     {"adopted": N, "already_served": M, ...}      the reply to adopt
    A → keeper  HANDEDOVER=1; A idles as a retired daemon does

B derives the path from its own control socket and a token of 12 hex digits (the peer
names no file), accepts ``adopt`` only from uid 0, one at a time, and only from a socket
whose listener is uid 0; it refuses a listener it serves already (kcmp: case 1, where B
took them over before A died) and adopts the rest (case 2). A tells its keeper only
after B's reply: until then the keeper's copies are the last ones if B dies.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import trio

from . import control
from .control import ControlError, ControlServer
from .takeover import HANDOVER_TIMEOUT, HandedSession, Handover

__all__ = ["ADOPT_TIMEOUT", "GiveError", "KeptSessions", "give_path", "give_sessions",
           "valid_token"]

log = logging.getLogger("supervisor.giveback")

#: How long the live daemon spends on one ``adopt`` (its takeover of the giver).
ADOPT_TIMEOUT: Final = HANDOVER_TIMEOUT
_TOKEN: Final = re.compile(r"[0-9a-f]{12}")


class GiveError(Exception):
    """The live daemon did not adopt the sessions (the keeper still holds them)."""


def give_path(control_socket: str, token: str) -> str:
    """The temporary control socket a giver binds, in the control socket's directory
    (a short name: a unix socket path has at most 107 bytes)."""
    return os.path.join(os.path.dirname(control_socket), f"give-{token}")


def valid_token(token: object) -> bool:
    return isinstance(token, str) and _TOKEN.fullmatch(token) is not None


@dataclass
class KeptSessions:
    """The giver's side of :class:`~supervisor.takeover.Handover`: the sessions are not
    being served (nothing to pause); a failed takeover leaves them with the keeper."""

    sessions: list[HandedSession]
    committed: trio.Event = field(default_factory=trio.Event)

    async def pause_for_handover(self) -> tuple[int, list[HandedSession]]:
        return -1, list(self.sessions)

    def resume_after_handover(self, sessions: list[HandedSession]) -> None:
        log.warning("the live daemon did not commit: %d sessions stay with the keeper",
                    len(sessions))

    def finish_handover(self) -> None:
        self.committed.set()


async def give_sessions(control_socket: str, sessions: Sequence[HandedSession], *,
                        limit: float = ADOPT_TIMEOUT) -> dict[str, Any]:
    """Give ``sessions`` (their fds stay ours: close them after) to the daemon on
    ``control_socket``. Returns its ``adopt`` reply once it committed. Raises GiveError."""
    token = secrets.token_hex(6)
    path = give_path(control_socket, token)
    kept = KeptSessions(list(sessions))
    server = ControlServer(allowed_uids=frozenset({0}))
    async with trio.open_nursery() as nursery:
        handover = Handover(kept, nursery, timeout=limit)
        handover.register(server.register)
        try:
            await nursery.start(server.serve, path)
        except OSError as exc:
            raise GiveError(f"cannot bind {path}: {exc}") from None
        try:
            reply, fds = await trio.to_thread.run_sync(
                lambda: control.request(control_socket, "adopt", {"token": token},
                                        timeout=limit + 5))
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            # The commit's reply was sent before the live daemon answered adopt: only
            # the step after it may still be pending here.
            with trio.move_on_after(2):
                await kept.committed.wait()
        except (OSError, ControlError) as exc:
            raise GiveError(f"adopt on {control_socket}: {exc}") from None
        finally:
            nursery.cancel_scope.cancel()
    if not kept.committed.is_set():
        raise GiveError(f"adopt on {control_socket}: replied {reply!r} without a commit")
    return reply
