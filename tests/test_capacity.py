"""Per-site capacity: a Redis semaphore of expiring leases, shared by all workers."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from pathlib import Path

import pytest
from redis.asyncio import Redis

from worker.capacity import RENEW_EVERY_S, SiteCapacity
from worker.keys import Keys
from worker.selectors import SiteLimits
from worker.settings import Settings

from .conftest import own_redis


async def test_a_dead_workers_slot_frees_itself(settings: Settings) -> None:
    redis = Redis.from_url(settings.redis_url)
    keys = Keys(settings.key_prefix)
    try:
        # A worker that died holding the only slot: its lease runs out 300 ms from now.
        seconds, micros = await redis.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        await redis.zadd(keys.site_slots("billing"), {"dead-worker-lease": now_ms + 300})
        capacity = SiteCapacity(redis, keys)
        assert await capacity.holders("billing") == 1
        started = time.monotonic()
        async with capacity.slot("billing", SiteLimits(max_concurrent_jobs=1)):
            waited = time.monotonic() - started
            assert await capacity.holders("billing") == 1  # ours; the dead one was reaped
        assert 0.2 < waited < 5
        assert await capacity.holders("billing") == 0
    finally:
        await redis.aclose()


async def test_slots_are_capped_and_released(settings: Settings) -> None:
    redis = Redis.from_url(settings.redis_url)
    capacity = SiteCapacity(redis, Keys(settings.key_prefix))
    limits = SiteLimits(max_concurrent_jobs=2)
    inside = 0
    most = 0
    full = asyncio.Event()
    release = asyncio.Event()

    async def job() -> None:
        nonlocal inside, most
        async with capacity.slot("billing", limits):
            inside += 1
            most = max(most, inside)
            if inside == 2:
                full.set()
            await release.wait()
            inside -= 1

    try:
        tasks = [asyncio.create_task(job()) for _ in range(5)]
        await asyncio.wait_for(full.wait(), 10)
        # Not synchronisation: an observation window in which the three waiting jobs poll
        # several times and would get in if the cap leaked.
        await asyncio.sleep(0.3)
        assert inside == 2
        release.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        assert most == 2
        assert await capacity.holders("billing") == 0
    finally:
        await redis.aclose()


async def test_min_interval_spaces_job_starts(settings: Settings) -> None:
    redis = Redis.from_url(settings.redis_url)
    capacity = SiteCapacity(redis, Keys(settings.key_prefix))
    limits = SiteLimits(min_interval_ms=400)
    starts: list[float] = []

    async def job() -> None:
        async with capacity.slot("billing", limits):
            starts.append(time.monotonic())

    try:
        await asyncio.wait_for(asyncio.gather(*(job() for _ in range(3))), 10)
        starts.sort()
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        assert all(gap >= 0.38 for gap in gaps), gaps
    finally:
        await redis.aclose()


@pytest.mark.timeout(60)
async def test_redis_gone_while_a_slot_is_held_does_not_end_the_job(tmp_path: Path) -> None:
    # The slot is the site's courtesy: Redis unreachable for a moment while a job holds one
    # (a renewal fails, the lease cannot be given back) must not turn the job's outcome into
    # an internal error.
    renewal_failed = asyncio.Event()

    class Heard(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "not renewed" in record.getMessage():
                renewal_failed.set()

    heard = Heard()
    logging.getLogger("formwork.capacity").addHandler(heard)
    try:
        async with own_redis(tmp_path) as server:
            redis = Redis(port=server.port, socket_connect_timeout=0.5, socket_timeout=0.5)
            try:
                capacity = SiteCapacity(redis, Keys("cap"))
                async with capacity.slot("billing", SiteLimits(max_concurrent_jobs=1)):
                    await server.stop()
                    await asyncio.wait_for(renewal_failed.wait(), RENEW_EVERY_S + 10)
                # Leaving the slot raised nothing: the job's report would stand.
            finally:
                await redis.aclose()
    finally:
        logging.getLogger("formwork.capacity").removeHandler(heard)
