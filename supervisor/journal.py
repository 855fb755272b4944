"""The in-flight journal: notifications received and not yet answered, in memory that
outlives the process, so a crash leaves no call blocked (issue 17).

The kernel hands a notification to one RECV only and never again; after the receiver
dies the call stays blocked, but its id stays valid (``ID_VALID``) and any process
holding the listener may still answer it (verified, DESIGN.md §4 and
``tests/test_crash.py``). So each session copies every notification it receives into a
slot of a shared ``memfd`` mapping and clears the slot once the answer was sent. The
memfd goes into systemd's fd store next to the session's notify fd (a third fd of its
``session-<hex>`` group, see :mod:`supervisor.fdstore`); after a crash the next process
reads the slots back (:func:`scan`) and decides every entry whose id is still valid on
that listener again (:meth:`supervisor.session.Session.recover`).

**One journal per session**, not one per daemon: notification ids belong to one filter
and ``ID_VALID`` must be asked on that filter's fd, so an entry only means something
next to its listener; the fd-store group keeps the two together through restarts, a
keeper and takeovers with no lookup table, and removing the group when the container
ends drops the journal with it. Ids of one filter are consecutive, so ``id & mask`` is a
perfect hash for the slot of an id (a slot still taken by a slow decision is probed
past).

Layout (little endian, 8-byte words)::

    header  64 bytes: MAGIC, version, slot size, slots
    slot    96 bytes: struct seccomp_notif as RECV filled it (80 bytes: id, pid, flags,
                      nr, arch, ip, args[6]), then ``commit`` (the id again), then 0

The hot path pays memory writes only: :meth:`Journal.record` copies the 80 bytes RECV
just wrote and then stores the id in ``commit``; :meth:`Journal.clear` stores 0 into
``commit``. A slot is **complete** when ``commit`` equals the id at its start. A crash
between the copy and the commit leaves it *torn* (the id at its start may be new while
the arguments are half written): it is never decided from its content; if its id is
still pending it gets ``on_error``. A stale slot (answered, ``commit`` 0) keeps its old
id, which ``ID_VALID`` refuses. So the content is only acted on when the kernel says the
id is still waiting on that listener, and an id is answered at most once.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from . import abi

__all__ = [
    "MAGIC",
    "Entry",
    "Journal",
    "JournalError",
    "create_journal_fd",
    "is_journal_fd",
    "scan",
    "slots_for",
]

MAGIC: Final = b"SSJRNL\x00\x01"
VERSION: Final = 1
HEADER_SIZE: Final = 64
SLOT_SIZE: Final = 96
_WORDS_PER_SLOT: Final = SLOT_SIZE // 8
_HEADER_WORDS: Final = HEADER_SIZE // 8
_COMMIT_WORD: Final = abi.NOTIF_SIZE // 8  # word 10 of a slot
_HEADER: Final = struct.Struct("<8sQQQ")
#: Upper bound for a journal read back (a session's max_inflight is far smaller).
MAX_SLOTS: Final = 1 << 16
_unpack_head: Final = abi.NOTIF_HEAD.unpack_from
_unpack_args: Final = abi.NOTIF_ARGS.unpack_from


class JournalError(ValueError):
    """A memfd that is no journal of this version, or one too large."""


def slots_for(max_inflight: int) -> int:
    """Slots for a session: every async decision under way, the parked one and the one
    being decided inline, rounded up to a power of two (at least 16)."""
    need = max(16, max_inflight + 2)
    return 1 << (need - 1).bit_length()


def create_journal_fd(slots: int) -> int:
    """A new, zeroed journal memfd with ``slots`` slots (a power of two). Its size is
    sealed; its content is written through the mapping. The caller owns the fd."""
    if slots <= 0 or slots & (slots - 1) or slots > MAX_SLOTS:
        raise ValueError(f"journal slots must be a power of two <= {MAX_SLOTS}: {slots}")
    fd = os.memfd_create("seccomp-supervisor-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, HEADER_SIZE + slots * SLOT_SIZE)
        os.pwrite(fd, _HEADER.pack(MAGIC, VERSION, SLOT_SIZE, slots), 0)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_header(fd: int) -> int:
    """The slot count of journal ``fd``. Raises JournalError, OSError."""
    head = os.pread(fd, _HEADER.size, 0)
    if len(head) < _HEADER.size:
        raise JournalError("too short for a journal header")
    magic, version, slot_size, slots = _HEADER.unpack(head)
    if magic != MAGIC:
        raise JournalError("not a journal")
    if version != VERSION or slot_size != SLOT_SIZE:
        raise JournalError(f"journal version {version}, slot size {slot_size}: not ours")
    if not 0 < slots <= MAX_SLOTS or slots & (slots - 1):
        raise JournalError(f"journal of {slots} slots")
    size = os.fstat(fd).st_size
    if size != HEADER_SIZE + slots * SLOT_SIZE:
        raise JournalError(f"journal of {slots} slots is {size} bytes")
    return int(slots)


def is_journal_fd(fd: int) -> bool:
    """Whether ``fd`` starts with the journal's magic. Never raises."""
    try:
        return os.pread(fd, len(MAGIC), 0) == MAGIC
    except OSError:
        return False


@dataclass(frozen=True, slots=True)
class Entry:
    """One slot read back. ``torn``: its id was written but the rest may not be (a crash
    in :meth:`Journal.record`): never decide it from its content."""

    slot: int
    id: int
    pid: int
    nr: int
    arch: int
    args: tuple[int, ...]
    torn: bool


def scan(words: memoryview, slots: int) -> list[Entry]:
    """Every slot of a journal mapping (``words``: the mapping cast to ``Q``) that names
    an id: complete entries and torn ones. Stale slots (answered: commit 0) are listed as
    torn too when their id is not 0: only ``ID_VALID`` can tell them apart, and it
    refuses an answered id. Pure: reads the mapping only."""
    raw = words.cast("B")
    entries: list[Entry] = []
    for slot in range(slots):
        base = _HEADER_WORDS + slot * _WORDS_PER_SLOT
        head = words[base]
        if head == 0:
            continue
        commit = words[base + _COMMIT_WORD]
        offset = base * 8
        notif_id, pid, nr, arch = _unpack_head(raw, offset)
        args = _unpack_args(raw, offset + abi.NOTIF_ARGS_OFFSET)
        entries.append(Entry(slot, notif_id, pid, nr, arch, args, torn=commit != head))
    return entries


class Journal:
    """A session's view of one journal memfd: :meth:`record` after RECV, :meth:`clear`
    once the answer went out. Owns its mapping, not the fd (close that after
    construction if you do not need it: the mapping keeps the memfd alive)."""

    __slots__ = ("_mask", "_mm", "_owners", "_raw", "_recv_buf", "_words", "slots",
                 "unjournaled")

    def __init__(self, fd: int, recv_buf: bytearray | memoryview) -> None:
        """``recv_buf``: the buffer the session's RECV fills (see
        :attr:`supervisor.notifyfd.NotifyFd.recv_buffer`); :meth:`record` copies it."""
        self.slots = _read_header(fd)
        self._mm = mmap.mmap(fd, HEADER_SIZE + self.slots * SLOT_SIZE)
        self._raw = memoryview(self._mm)
        self._words = self._raw.cast("Q")
        self._mask = self.slots - 1
        self._recv_buf = recv_buf
        # Which id holds each slot (0: free), kept in Python: reading the mapping back
        # costs more. Rebuilt from the mapping by take_entries().
        self._owners = [0] * self.slots
        self.unjournaled = 0  # received while every slot was taken: not recoverable

    # -- the hot path: memory writes only ------------------------------------------------

    def record(self, notif_id: int) -> None:
        """Journal the notification RECV just returned (its buffer is copied as is)."""
        slot = notif_id & self._mask
        owners = self._owners
        if owners[slot]:
            slot = self._free_slot(slot)
            if slot < 0:
                return
        owners[slot] = notif_id
        base = _HEADER_WORDS + slot * _WORDS_PER_SLOT
        self._raw[base * 8:base * 8 + abi.NOTIF_SIZE] = self._recv_buf
        self._words[base + _COMMIT_WORD] = notif_id  # last: the slot is complete now

    def clear(self, notif_id: int) -> None:
        """The answer to ``notif_id`` was sent (or the kernel withdrew the call)."""
        slot = notif_id & self._mask
        owners = self._owners
        if owners[slot] != notif_id:
            try:
                slot = owners.index(notif_id)
            except ValueError:
                return  # never journaled (every slot was taken)
        owners[slot] = 0
        self._words[_HEADER_WORDS + slot * _WORDS_PER_SLOT + _COMMIT_WORD] = 0

    def _free_slot(self, start: int) -> int:
        owners = self._owners
        for step in range(1, self.slots):
            slot = (start + step) & self._mask
            if not owners[slot]:
                return slot
        self.unjournaled += 1
        return -1

    # -- after a restart -----------------------------------------------------------------

    def take_entries(self, id_valid: Callable[[int], bool]) -> tuple[list[Entry],
                                                                      list[Entry]]:
        """The entries a crashed process left: ``(complete, torn)``, only those whose id
        ``id_valid`` (the listener's ID_VALID) says is still waiting. They keep their
        slots until :meth:`clear`; every other slot is wiped."""
        complete: list[Entry] = []
        torn: list[Entry] = []
        for entry in scan(self._words, self.slots):
            if id_valid(entry.id):
                self._owners[entry.slot] = entry.id
                (torn if entry.torn else complete).append(entry)
            else:
                self._wipe(entry.slot)
        return complete, torn

    def _wipe(self, slot: int) -> None:
        base = _HEADER_WORDS + slot * _WORDS_PER_SLOT
        self._words[base + _COMMIT_WORD] = 0
        self._words[base] = 0

    def pending(self) -> int:
        """Slots holding a notification not yet answered (as this process tracks them)."""
        return sum(1 for owner in self._owners if owner)

    def unanswered(self) -> int:
        """Committed entries in the mapping itself: what a crash now would leave for
        the next process (0 is the proof a handover loses nothing)."""
        return sum(1 for entry in scan(self._words, self.slots) if not entry.torn)

    def close(self) -> None:
        """Unmap (the fd is not closed here)."""
        self._words.release()
        self._raw.release()
        self._mm.close()
