"""System call numbers ↔ names, per architecture, through libseccomp (pyseccomp).

Notifications carry (arch, nr). x32 calls arrive with arch x86_64 and ``X32_SYSCALL_BIT``
set in nr; libseccomp knows them under its own x32 arch, by the full number.
"""

from __future__ import annotations

import functools

import pyseccomp

from . import abi

# arch name as policies see it → libseccomp arch token
ARCH_TOKENS: dict[str, int] = {
    "x86_64": pyseccomp.Arch.X86_64,
    "x86": pyseccomp.Arch.X86,
    "x32": pyseccomp.Arch.X32,
}


def arch_name(audit_arch: int, nr: int) -> str:
    """The architecture a call was made in: ``x86_64``, ``x86``, ``x32`` or ``0x…``."""
    if audit_arch == abi.AUDIT_ARCH_X86_64:
        return "x32" if nr & abi.X32_SYSCALL_BIT else "x86_64"
    if audit_arch == abi.AUDIT_ARCH_I386:
        return "x86"
    return f"{audit_arch:#x}"


def is_unnamed(name: str) -> bool:
    """True for a :func:`syscall_name` of a number libseccomp has no name for
    (``nr_<n>``): there are 2**32 of those, so nothing may be kept per such name."""
    return name.startswith("nr_")


@functools.lru_cache(maxsize=4096)
def syscall_name(audit_arch: int, nr: int) -> str:
    """Name of call ``nr`` in ``audit_arch``; ``"nr_<n>"`` when libseccomp has none."""
    arch = arch_name(audit_arch, nr)
    token = ARCH_TOKENS.get(arch)
    if token is None or nr < 0:
        return f"nr_{nr}"
    try:
        name = pyseccomp.resolve_syscall(token, nr)
    except (OSError, ValueError):
        return f"nr_{nr}"
    if not name:
        return f"nr_{nr}"
    return name.decode() if isinstance(name, bytes) else str(name)


@functools.lru_cache(maxsize=4096)
def syscall_number(name: str, arch: str = "x86_64") -> int | None:
    """Number of ``name`` in ``arch`` (None if the arch has no such call)."""
    token = ARCH_TOKENS.get(arch)
    if token is None:
        raise ValueError(f"unknown architecture {arch!r}")
    try:
        nr = pyseccomp.resolve_syscall(token, name)
    except (OSError, ValueError):
        return None
    # libseccomp returns negative pseudo numbers for calls an arch does not have.
    return int(nr) if nr >= 0 else None


def is_known(name: str) -> bool:
    """True if ``name`` is a system call on at least one supported architecture."""
    return any(syscall_number(name, arch) is not None for arch in ARCH_TOKENS)
