"""The in-flight journal: notifications received and not yet answered, in memory that
outlives the process, so a crash leaves no call blocked (issue 17).

The kernel hands a notification to one RECV only and never again; after the receiver
dies the call stays blocked, but its id stays valid (``ID_VALID``) and any process
holding the listener may still answer it (verified: ``tests/test_crash.py``). So each
session copies every notification it receives into a shared ``memfd`` mapping. The
memfd goes into systemd's fd store next to the session's notify fd (a third fd of its
``session-<hex>`` group, see :mod:`supervisor.fdstore`); after a crash the next process
reads the slots back (:meth:`Journal.take_entries`) and decides every entry whose id is
still valid on that listener again (``Session._recover``).

**One journal per session**, not one per daemon: notification ids belong to one filter
and ``ID_VALID`` must be asked on that filter's fd, so an entry only means something
next to its listener; the fd-store group keeps the two together through restarts, a
keeper and takeovers with no lookup table, and removing the group when the container
ends drops the journal with it.

**The kernel is the ledger of what was answered.** An answered id is never valid again
(ids are a 64-bit counter per filter), so a slot need not be cleared when its answer is
sent: the next process asks ``ID_VALID`` for every id it finds and ignores the answered
ones. That keeps the hot path to two memory writes (the copy and its commit) into a
small *ring* (slot ``id & 3``): a session decides inline, answering before its next
RECV, or hands the decision on to wait, so one slot would do; four leave slack and stay
in one page. A decision that waits (a coroutine handler that suspends, a notification
parked for a ``max_inflight`` slot) first **pins** its entry: copies it to a slot of the
*pinned* area, kept until its answer was sent (:meth:`Journal.pin`,
:meth:`Journal.unpin`); free pinned slots are reused last-freed first, so only the
pages that many decisions waiting at once need are ever touched.

Layout (little endian, 8-byte words)::

    header  64 bytes: MAGIC, version, slot size, ring slots, pinned slots
    ring    ring slots x 96 bytes     slot of id X: X & (ring slots - 1)
    pinned  pinned slots x 96 bytes
    slot:   struct seccomp_notif as RECV filled it (80 bytes: id, pid, flags, nr, arch,
            ip, args[6]), then ``commit`` (the id again), then 0

A slot is **complete** when ``commit`` equals the id at its start. A crash between the
copy and the commit leaves it *torn* (the id at its start may be new while the arguments
are half written): it is never decided from its content; if its id is still pending it
gets ``on_error``. So the content is only acted on when the kernel says the id is still
waiting on that listener, and an id is answered at most once.
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
    "RING_SLOTS",
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
_NOTIF_SIZE: Final = abi.NOTIF_SIZE
_HEADER: Final = struct.Struct("<8sQQQQ")
#: Ring slots of a new journal (see the module docstring).
RING_SLOTS: Final = 4
#: Upper bound for a journal read back (a session's max_inflight is far smaller).
MAX_SLOTS: Final = 1 << 16
_unpack_head: Final = abi.NOTIF_HEAD.unpack_from
_unpack_args: Final = abi.NOTIF_ARGS.unpack_from


class JournalError(ValueError):
    """A memfd that is no journal of this version, or one too large."""


def slots_for(max_inflight: int) -> int:
    """Pinned slots for a session: every async decision under way, the parked one and
    the one being decided inline, rounded up to a power of two (at least 16)."""
    need = max(16, max_inflight + 2)
    return 1 << (need - 1).bit_length()


def create_journal_fd(slots: int) -> int:
    """A new, zeroed journal memfd with :data:`RING_SLOTS` ring slots and ``slots``
    pinned slots (a power of two). Its size is sealed; its content is written through
    the mapping. The caller owns the fd."""
    if slots <= 0 or slots & (slots - 1) or slots > MAX_SLOTS:
        raise ValueError(f"journal slots must be a power of two <= {MAX_SLOTS}: {slots}")
    fd = os.memfd_create("seccomp-supervisor-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, HEADER_SIZE + (RING_SLOTS + slots) * SLOT_SIZE)
        os.pwrite(fd, _HEADER.pack(MAGIC, VERSION, SLOT_SIZE, RING_SLOTS, slots), 0)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_header(fd: int) -> tuple[int, int]:
    """The ring and pinned slot counts of journal ``fd``. Raises JournalError,
    OSError."""
    head = os.pread(fd, _HEADER.size, 0)
    if len(head) < _HEADER.size:
        raise JournalError("too short for a journal header")
    magic, version, slot_size, ring, slots = _HEADER.unpack(head)
    if magic != MAGIC:
        raise JournalError("not a journal")
    if version != VERSION or slot_size != SLOT_SIZE:
        raise JournalError(f"journal version {version}, slot size {slot_size}: not ours")
    for count in (ring, slots):
        if not 0 < count <= MAX_SLOTS or count & (count - 1):
            raise JournalError(f"journal of {ring} + {slots} slots")
    size = os.fstat(fd).st_size
    if size != HEADER_SIZE + (ring + slots) * SLOT_SIZE:
        raise JournalError(f"journal of {ring} + {slots} slots is {size} bytes")
    return int(ring), int(slots)


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
    entries: list[Entry] = []
    with words.cast("B") as raw:
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
    """A session's view of one journal memfd: :meth:`record` after every RECV, and
    :meth:`pin` / :meth:`unpin` around a decision that waits. Owns its mapping, not the
    fd (close that after construction: the mapping keeps the memfd alive)."""

    __slots__ = ("_commits", "_free", "_mask", "_mm", "_offsets", "_pinned", "_recv_buf",
                 "_ring", "_total", "_words", "slots", "unjournaled")

    def __init__(self, fd: int, recv_buf: bytearray | memoryview) -> None:
        """``recv_buf``: the buffer the session's RECV fills (see
        :attr:`supervisor.notifyfd.NotifyFd.recv_buffer`); :meth:`record` copies it."""
        self._ring, self.slots = _read_header(fd)  # slots: pinned ones
        self._total = self._ring + self.slots
        self._mm = mmap.mmap(fd, HEADER_SIZE + self._total * SLOT_SIZE)
        self._words = memoryview(self._mm).cast("Q")
        self._mask = self._ring - 1
        self._recv_buf = recv_buf
        # Per ring slot: its byte offset and the index of its commit word (a lookup
        # costs less than the arithmetic, on the hot path).
        self._offsets = [HEADER_SIZE + slot * SLOT_SIZE for slot in range(self._ring)]
        self._commits = [(offset >> 3) + _COMMIT_WORD for offset in self._offsets]
        self._pinned: dict[int, int] = {}  # id -> pinned slot (ring..total-1)
        self._free = list(range(self._total - 1, self._ring - 1, -1))
        self.unjournaled = 0  # waiting decisions that found every pinned slot taken

    # -- the hot path: memory writes only ------------------------------------------------

    def record(self, notif_id: int) -> None:
        """Journal the notification RECV just returned (its buffer is copied as is)."""
        slot = notif_id & self._mask
        offset = self._offsets[slot]
        self._mm[offset:offset + _NOTIF_SIZE] = self._recv_buf
        self._words[self._commits[slot]] = notif_id  # last: the slot is complete now

    # -- decisions that wait -------------------------------------------------------------

    def pin(self, notif_id: int) -> None:
        """Keep the entry :meth:`record` just wrote for ``notif_id`` until
        :meth:`unpin`: its decision waits, and the ring slot will be reused."""
        if notif_id in self._pinned:
            return
        if not self._free:
            self.unjournaled += 1
            return
        slot = self._free.pop()
        ring = HEADER_SIZE + (notif_id & self._mask) * SLOT_SIZE
        offset = HEADER_SIZE + slot * SLOT_SIZE
        self._words[(offset >> 3) + _COMMIT_WORD] = 0  # torn until the copy is complete
        self._mm.move(offset, ring, _NOTIF_SIZE)
        self._words[(offset >> 3) + _COMMIT_WORD] = notif_id
        self._pinned[notif_id] = slot

    def unpin(self, notif_id: int) -> None:
        """The answer to a pinned ``notif_id`` was sent (or the call was withdrawn)."""
        slot = self._pinned.pop(notif_id, None)
        if slot is not None:
            self._words[((HEADER_SIZE + slot * SLOT_SIZE) >> 3) + _COMMIT_WORD] = 0
            self._free.append(slot)

    # -- a new home ----------------------------------------------------------------------

    def move_to_new_memfd(self) -> int:
        """Copy this journal into a new memfd and write there from now on; return that
        fd (the caller stores it, then closes it). For a session stored again after its
        fd store was lost (a keeper that died and came back): the old memfd is no longer
        held by anything that outlives us. Raises OSError (this journal is unchanged)."""
        fd = create_journal_fd(self.slots)
        try:
            if _read_header(fd) != (self._ring, self.slots):
                raise JournalError("a new journal of another geometry")
            mm = mmap.mmap(fd, HEADER_SIZE + self._total * SLOT_SIZE)
        except BaseException:
            os.close(fd)
            raise
        # One thread writes journals (the event loop's), so nothing is recorded between
        # the copy and the switch.
        mm[HEADER_SIZE:] = self._mm[HEADER_SIZE:]
        self._words.release()
        self._mm.close()
        self._mm = mm
        self._words = memoryview(mm).cast("Q")
        return fd

    # -- after a restart -----------------------------------------------------------------

    def entries(self) -> list[Entry]:
        """Every slot (ring and pinned) that names an id, once per id (a complete copy
        preferred over a torn one)."""
        by_id: dict[int, Entry] = {}
        for entry in scan(self._words, self._total):
            known = by_id.get(entry.id)
            if known is None or (known.torn and not entry.torn):
                by_id[entry.id] = entry
        return list(by_id.values())

    def take_entries(self, id_valid: Callable[[int], bool]) -> tuple[list[Entry],
                                                                      list[Entry]]:
        """The entries a crashed process left: ``(complete, torn)``, only those whose id
        ``id_valid`` (the listener's ID_VALID) says is still waiting. The complete ones
        are pinned (their decisions are about to wait); answered ids are wiped."""
        complete: list[Entry] = []
        torn: list[Entry] = []
        for entry in self.entries():
            if id_valid(entry.id):
                (torn if entry.torn else complete).append(entry)
        valid = {entry.id for entry in complete} | {entry.id for entry in torn}
        for entry in scan(self._words, self._total):
            if entry.id not in valid:
                self._wipe(entry.slot)
        # Pinned slots start free again; recovered entries in the pinned area stay.
        self._pinned.clear()
        taken = {e.slot for e in complete if e.slot >= self._ring}
        self._free = [s for s in range(self._total - 1, self._ring - 1, -1)
                      if s not in taken]
        for entry in complete:
            if entry.slot >= self._ring:
                self._pinned[entry.id] = entry.slot
            else:
                self.pin(entry.id)
        return complete, torn

    def _wipe(self, slot: int) -> None:
        base = (HEADER_SIZE + slot * SLOT_SIZE) >> 3
        self._words[base + _COMMIT_WORD] = 0
        self._words[base] = 0

    def unanswered(self, id_valid: Callable[[int], bool]) -> int:
        """Complete entries whose id is still waiting: what a crash now would leave for
        the next process to answer (0 is the proof a handover loses nothing)."""
        return sum(1 for entry in self.entries() if not entry.torn and id_valid(entry.id))

    @property
    def pinned(self) -> int:
        """Decisions that wait, holding a pinned slot."""
        return len(self._pinned)

    def close(self) -> None:
        """Unmap (the fd is not closed here)."""
        self._words.release()
        self._mm.close()
