"""Per-container back-pressure: a token bucket. Pure: no clock of its own, no I/O.

A session with ``[defaults] rate`` set owns one :class:`TokenBucket` and asks it once per
notification, with the time it already read for the decision latency. A call that finds
the bucket empty gets ``[defaults] rate_exceeded`` at once, without asking the policies,
so one container that floods the supervisor with notified calls spends its own budget and
not the others' time.
"""

from __future__ import annotations

import math
from typing import Final

__all__ = ["RATE_POLICY", "TokenBucket"]

#: ``policy`` label of the answers the rate limit gave (not a valid policy name, so it
#: cannot collide with one).
RATE_POLICY: Final = "(rate)"
# A whole token, less what float sums of refills lose (0.1 s at 10/s is 0.99999...).
_ONE: Final = 1.0 - 1e-9


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; starts full.

    Raises ValueError unless ``rate`` is a finite number > 0 and ``burst`` >= 1.
    """

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if not (isinstance(rate, int | float) and math.isfinite(rate) and rate > 0):
            raise ValueError(f"rate must be a finite number > 0, got {rate!r}")
        if not (isinstance(burst, int | float) and math.isfinite(burst) and burst >= 1):
            raise ValueError(f"burst must be >= 1, got {burst!r}")
        self.rate = float(rate)
        self.burst = float(burst)
        self._tokens = self.burst
        self._last = now

    def __repr__(self) -> str:
        return f"<TokenBucket {self.rate:g}/s burst {self.burst:g} has {self._tokens:.2f}>"

    def take(self, now: float) -> bool:
        """Take one token at time ``now`` (seconds, any monotonic clock); False if none is
        left. A clock that goes backwards adds nothing."""
        tokens = self._tokens
        elapsed = now - self._last
        if elapsed > 0:
            tokens = min(self.burst, tokens + elapsed * self.rate)
            self._last = now
        if tokens >= _ONE:
            self._tokens = max(0.0, tokens - 1.0)
            return True
        self._tokens = tokens
        return False

    @property
    def tokens(self) -> float:
        """Tokens left at the last :meth:`take` (for tests and logs)."""
        return self._tokens

    def same_limits(self, rate: float, burst: float) -> bool:
        return self.rate == float(rate) and self.burst == float(burst)
