"""A bounded retry policy: exponential backoff with jitter, capped, given up after a number
of attempts and/or an age.

Shared by every durable retry loop (ADT Subscription delivery, the messaging outbox and its
worker), so they back off alike and a bound is set the same way everywhere.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    base: float = 1.0
    """The delay after the first failed attempt (seconds); doubled after each one."""
    cap: float = 300.0
    """The longest delay between two attempts."""
    max_attempts: int = 10
    """Attempts before giving up (0: no limit by count)."""
    max_age: float = 0.0
    """Seconds from the first attempt after which no further attempt starts (0: no limit)."""
    jitter: float = 0.2
    """Each delay is spread by ±this fraction, so retries of many items do not fall due at
    the same instant (a receiver coming back is not hit by all of them at once)."""

    def delay(self, attempts: int) -> float:
        """Seconds to wait after ``attempts`` failed attempts (1 or more)."""
        plain = min(self.cap, self.base * 2.0 ** max(0, attempts - 1))
        return float(plain * random.uniform(1 - self.jitter, 1 + self.jitter))

    def exhausted(self, attempts: int, age: float = 0.0) -> bool:
        """Give up after ``attempts`` failed attempts, the first ``age`` seconds ago?"""
        return ((self.max_attempts > 0 and attempts >= self.max_attempts)
                or (self.max_age > 0 and age >= self.max_age))
