"""The outbox: a job's Redis writes go out in order, batched, and a failed one is not lost."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from worker.outbox import Outbox


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def test_writes_land_in_the_order_they_were_put(redis: Redis) -> None:
    key = f"outbox-{uuid.uuid4().hex}"
    outbox = Outbox(redis)
    for n in range(50):
        outbox.put(lambda pipe, n=n: pipe.rpush(key, n))
        outbox.put(lambda pipe, n=n: pipe.set(f"{key}:last", n))
        if n % 10 == 0:
            await redis.ping()  # the outbox writes meanwhile: more puts land in later batches
    await outbox.flush()
    assert [int(v) for v in await redis.lrange(key, 0, -1)] == list(range(50))  # type: ignore[misc]
    assert int(await redis.get(f"{key}:last") or -1) == 49
    await redis.delete(key, f"{key}:last")


async def test_a_failed_write_is_raised_at_the_next_put_or_flush(redis: Redis) -> None:
    key = f"outbox-{uuid.uuid4().hex}"
    await redis.set(key, "a string")
    outbox = Outbox(redis)
    outbox.put(lambda pipe: pipe.rpush(key, 1))  # WRONGTYPE: the key holds a string
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await outbox.flush()
    # Raised once: the job that saw it decides; the outbox goes on with what comes next.
    outbox.put(lambda pipe: pipe.set(key, "next"))
    await outbox.flush()
    assert await redis.get(key) == b"next"
    await redis.delete(key)
