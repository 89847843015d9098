"""Per-tenant rate limits on the API's POST endpoints, counted in Redis so every API process agrees.

A fixed one-minute window per tenant: the first request of a window creates the counter
`keys.rate_limit_key(tenant, window)` and gives it an expiry, later ones increment it; both happen
in one Lua script, so a crash between INCR and EXPIRE can never leave a counter that lives forever
and concurrent requests never over-admit. Past the limit the request is refused with 429 and a
`Retry-After` of the seconds left in the window. `FACEPARSE_RATE_LIMIT_PER_MINUTE=0` turns it off.

A fixed window admits up to twice the limit across a window boundary; that is the usual price for
one key and one round trip per request, and it is fine for a guard against runaway clients.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from storage import keys
from storage.errors import RateLimited

if TYPE_CHECKING:
    import redis

log = structlog.get_logger(__name__)

WINDOW_SECONDS = 60
# Returns the count after this request. The expiry outlives the window a little, so a clock skew
# between API hosts never resets a counter early; the window number in the key does the rollover.
_HIT_SCRIPT = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then
  redis.call('EXPIRE', KEYS[1], ARGV[1])
end
return count
"""


class RateLimiter:
    """`hit(tenant)` counts one request and raises `RateLimited` past `per_minute` in this window."""

    def __init__(
        self,
        client: redis.Redis,
        per_minute: int,
        *,
        window_seconds: int = WINDOW_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.per_minute = per_minute
        self.window_seconds = window_seconds
        self._clock = clock  # injected by tests to cross a window boundary without sleeping
        self._script = client.register_script(_HIT_SCRIPT)

    @property
    def enabled(self) -> bool:
        return self.per_minute > 0

    def hit(self, tenant: str) -> int:
        """Count one request of `tenant`; returns the count so far in this window.

        Raises RateLimited (429, with `retry_after`) over the limit, and redis' ConnectionError
        when Redis is down (the API answers 503, as for every other Redis outage).
        """
        if not self.enabled:
            return 0
        now = self._clock()
        window = int(now // self.window_seconds)
        count = int(self._script(keys=[keys.rate_limit_key(tenant, window)],
                                 args=[self.window_seconds + 5]))
        if count > self.per_minute:
            retry_after = max(1, math.ceil((window + 1) * self.window_seconds - now))
            log.info("rate limited", tenant=tenant, count=count, limit=self.per_minute)
            raise RateLimited(
                f"more than {self.per_minute} requests a minute; retry in {retry_after}s",
                retry_after=retry_after,
            )
        return count
