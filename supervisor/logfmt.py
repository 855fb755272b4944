"""Log lines that a container's creator cannot forge or break: one formatter for stderr.

Container ids, metadata, annotations, bundle paths and policy reasons come from whoever
creates a container, and the daemon logs them. Under systemd, stdout (the JSON audit
trail) and stderr (this log) go to the same journal stream, one entry per line: a newline
in a logged string would start a line of its choosing, e.g. a forged JSON audit line. So
:class:`OneLineFormatter` writes every record as

* one line for the message: control characters (C0, DEL, C1, U+2028, U+2029) and the
  bidirectional and invisible format characters (U+200E/F, U+202A-E, U+2066-9, U+FEFF:
  they can make a line read as something else in a viewer) escaped as
  ``\\n``, ``\\r``, ``\\t``, ``\\xNN`` or ``\\uNNNN`` (a backslash stays as it is: this is a
  display form, not a reversible encoding), cut at :data:`MAX_MESSAGE` characters with a
  marker saying how much was cut;
* then, for a traceback or a stack, one line per line of it, each escaped the same way
  and prefixed with :data:`CONTINUATION`, so no line of a record other than the first
  can start with what the message or an exception's text put there (in particular not
  with ``{``).

:func:`escape` is the same escaping for other human-readable output (``status``).
"""

from __future__ import annotations

import logging
import re
from typing import Final

__all__ = ["CONTINUATION", "MAX_MESSAGE", "OneLineFormatter", "escape"]

#: Longest message written, in characters (after escaping); longer ones are cut.
MAX_MESSAGE: Final = 8192
#: Prefix of every line of a record after its first (traceback, stack).
CONTINUATION: Final = "  | "

_CONTROL: Final = re.compile(
    "[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028-\u202e\u2066-\u2069\ufeff]")
_NAMED: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str, limit: int | None = None) -> str:
    """``text`` with control characters escaped (see the module docstring), cut to
    ``limit`` characters (None: not cut) with ``...[N more]`` appended when cut."""
    out = _CONTROL.sub(_escaped, text) if _CONTROL.search(text) else text
    if limit is not None and len(out) > limit:
        out = f"{out[:limit]}...[{len(out) - limit} more]"
    return out


class OneLineFormatter(logging.Formatter):
    """A :class:`logging.Formatter` whose records cannot contain a line of someone
    else's choosing (see the module docstring). Takes the same arguments."""

    def format(self, record: logging.LogRecord) -> str:
        record.message = escape(record.getMessage(), MAX_MESSAGE)
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        head = escape(self.formatMessage(record), 2 * MAX_MESSAGE)
        extra: list[str] = []
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            extra.extend(record.exc_text.splitlines())
        if record.stack_info:
            extra.extend(self.formatStack(record.stack_info).splitlines())
        if not extra:
            return head
        return "\n".join([head, *(CONTINUATION + escape(line, MAX_MESSAGE)
                                  for line in extra)])
