"""Per-site capacity shared by every worker: a Redis semaphore with expiring leases.

Legacy systems fall over when many sessions hit them at once, so each site may cap how many jobs
run against it at the same time (and how soon one may start after the previous one). A slot is a
lease: an entry in a sorted set scored by its expiry. The holder renews it while the job runs; a
worker that dies simply stops renewing, and the slot frees itself when the lease runs out.
Jobs over the cap wait for a slot; they are never failed for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from worker.keys import Keys
from worker.selectors import SiteLimits

log = logging.getLogger("formwork.capacity")

LEASE_MS = 15_000
RENEW_EVERY_S = LEASE_MS / 1000 / 3
POLL_S = 0.05

# KEYS: slots zset, last-start key. ARGV: lease id, now ms, lease ms, max slots (0 = no cap),
# min interval ms. Returns 0 when acquired, else how many ms to wait before asking again.
_ACQUIRE = """
local now = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local max = tonumber(ARGV[4])
if max > 0 and redis.call('ZCARD', KEYS[1]) >= max then
  return 50
end
local interval = tonumber(ARGV[5])
if interval > 0 then
  local last = tonumber(redis.call('GET', KEYS[2]) or '0')
  if now - last < interval then
    return interval - (now - last)
  end
  redis.call('SET', KEYS[2], now, 'PX', interval * 2)
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) * 2)
return 0
"""

# Renew only a lease we still hold: one that expired and was reaped must be acquired again.
_RENEW = """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], tonumber(ARGV[2]), ARGV[1])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) * 2)
  return 1
end
return 0
"""


async def _redis_now_ms(redis: Redis) -> int:
    # Redis's clock, not ours: workers on several machines must agree on lease expiry.
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


class SiteCapacity:
    """`async with capacity.slot(site, limits): ...` holds one of the site's slots."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._acquire: Any = redis.register_script(_ACQUIRE)
        self._renew: Any = redis.register_script(_RENEW)

    @contextlib.asynccontextmanager
    async def slot(self, site: str, limits: SiteLimits) -> AsyncIterator[None]:
        if limits.max_concurrent_jobs is None and limits.min_interval_ms is None:
            yield
            return
        lease = uuid.uuid4().hex
        slots = self.keys.site_slots(site)
        waited = False
        while True:
            now = await _redis_now_ms(self.redis)
            wait_ms = int(
                await self._acquire(
                    keys=[slots, self.keys.site_last_start(site)],
                    args=[
                        lease,
                        now,
                        LEASE_MS,
                        limits.max_concurrent_jobs or 0,
                        limits.min_interval_ms or 0,
                    ],
                )
            )
            if wait_ms == 0:
                break
            if not waited:
                log.info("site %s at capacity; waiting for a slot", site)
                waited = True
            await asyncio.sleep(min(wait_ms / 1000, 1.0) if wait_ms > 50 else POLL_S)
        renewer = asyncio.create_task(self._keep(slots, lease), name=f"lease:{site}")
        try:
            yield
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            # The slot is the site's courtesy, not the job's outcome: with Redis gone for a
            # moment the lease simply runs out (LEASE_MS), and the job's report stands.
            try:
                await self.redis.zrem(slots, lease)
            except RedisError as exc:
                log.warning("lease %s on %s not given back (%s); it expires", lease, slots, exc)

    async def _keep(self, slots: str, lease: str) -> None:
        while True:
            await asyncio.sleep(RENEW_EVERY_S)
            try:
                now = await _redis_now_ms(self.redis)
                held = await self._renew(keys=[slots], args=[lease, now + LEASE_MS, LEASE_MS])
            except RedisError as exc:
                # Redis unreachable for a moment: try again at the next renewal; the job runs on.
                log.warning("lease %s on %s not renewed (%s)", lease, slots, exc)
                continue
            if not held:
                log.warning("lease %s on %s was lost (worker stalled?)", lease, slots)
                return

    async def holders(self, site: str) -> int:
        now = await _redis_now_ms(self.redis)
        count: int = await self.redis.zcount(self.keys.site_slots(site), now, "+inf")
        return count
