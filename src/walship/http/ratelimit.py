"""Per-credential request limits: a rate (token bucket) and a number of requests in flight.

One client that floods a node must not take the capacity every other client shares: past its
rate, or with as many requests in flight as it may have, a key (or JWT subject) is answered
429 ``rate_limited`` with ``Retry-After`` at once, before its request is read or parsed, while
the others go on. Anonymous requests (``--auth none``) and the health checks are not limited.
Pure bookkeeping, no I/O: ``AuthMiddleware`` asks ``admit`` and calls ``release``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from walship.errors import RateLimited
from walship.limits import DEFAULT_LIMITS


@dataclass(frozen=True)
class RateLimits:
    """``rate_per_s`` requests a second on average with bursts of ``burst``; at most
    ``concurrent`` in flight. 0 turns a limit off."""

    rate_per_s: float = 0.0
    burst: int = 0
    concurrent: int = 0

    @property
    def enabled(self) -> bool:
        return self.rate_per_s > 0 or self.concurrent > 0


class _Bucket:
    __slots__ = ("in_flight", "stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp
        self.in_flight = 0


class RateLimiter:
    """The limits of every credential; see the module."""

    def __init__(
        self,
        limits: RateLimits,
        *,
        clock: Callable[[], float] = time.monotonic,
        principals_max: int = DEFAULT_LIMITS.rate_limited_principals_max,
    ) -> None:
        self.limits = limits
        self.burst = max(limits.burst, math.ceil(limits.rate_per_s), 1)
        self._clock = clock
        self._principals_max = principals_max
        self._buckets: dict[str, _Bucket] = {}

    def _bucket(self, name: str, now: float) -> _Bucket:
        bucket = self._buckets.get(name)
        if bucket is None:
            if len(self._buckets) >= self._principals_max:
                idle = [k for k, b in self._buckets.items() if b.in_flight == 0]
                for key in idle[: max(1, len(idle) // 2)]:
                    del self._buckets[key]
            bucket = self._buckets[name] = _Bucket(float(self.burst), now)
        return bucket

    def admit(self, name: str) -> None:
        """Count one request of ``name`` in; RateLimited (nothing counted) when over a limit.
        Every admitted request must be ``release``\\ d."""
        now = self._clock()
        bucket = self._bucket(name, now)
        limits = self.limits
        if limits.concurrent and bucket.in_flight >= limits.concurrent:
            raise RateLimited(
                f"{name} has {bucket.in_flight} requests in flight, its limit",
                retry_after_s=1,
                limit="concurrent",
            )
        if limits.rate_per_s:
            bucket.tokens = min(
                float(self.burst), bucket.tokens + (now - bucket.stamp) * limits.rate_per_s
            )
            bucket.stamp = now
            if bucket.tokens < 1:
                wait_s = math.ceil((1 - bucket.tokens) / limits.rate_per_s)
                raise RateLimited(
                    f"{name} is over its rate of {limits.rate_per_s:g} requests a second",
                    retry_after_s=wait_s,
                    limit="rate",
                )
            bucket.tokens -= 1
        bucket.in_flight += 1

    def release(self, name: str) -> None:
        bucket = self._buckets.get(name)
        if bucket is not None and bucket.in_flight > 0:
            bucket.in_flight -= 1
