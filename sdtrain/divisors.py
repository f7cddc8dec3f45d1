"""The divisors of a number a user typed, for the values a message suggests."""

from __future__ import annotations

from math import isqrt

# Divisors come in pairs (d, n // d) with d <= sqrt(n), so scanning up to sqrt(n) finds them
# all. The scan stops here: every divisor of any n up to 2**34 (far past any width, head or
# expert count), and for a typo past that, the small ones and their partners, at once.
MAX_SCAN = 1 << 17


def divisors(n: int) -> list[int]:
    """The divisors of n >= 1, ascending (see MAX_SCAN for the bound on the work)."""
    if n < 1:
        return []
    small = [d for d in range(1, min(isqrt(n), MAX_SCAN) + 1) if n % d == 0]
    large = [n // d for d in reversed(small) if n // d != d]
    return small + large
