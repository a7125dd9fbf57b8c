"""How many jobs wait for a worker: the number an operator scales workers on.

arq keeps a job in its queue (a sorted set scored by run-at time) until the job *finishes*, and
the queue also holds messages due later (pause deadlines). So the backlog is the queue's due
members less those a worker has already taken (arq's in-progress key).
"""

from __future__ import annotations

import time

from redis.asyncio import Redis

from worker.keys import ARQ_IN_PROGRESS_PREFIX, Keys


async def backlog(redis: Redis, keys: Keys) -> int:
    """Jobs due on the queue that no worker has taken yet."""
    due: list[bytes | str] = await redis.zrangebyscore(keys.queue, "-inf", int(time.time() * 1000))
    if not due:
        return 0
    # Keys as bytes, never decoded: an id written by hand need not be UTF-8 (the worker takes
    # such an entry off the queue only when it next polls), and a decode failed every scrape.
    prefix = ARQ_IN_PROGRESS_PREFIX.encode()
    names = [job_id if isinstance(job_id, bytes) else job_id.encode() for job_id in due]
    taken: int = await redis.exists(*(prefix + name for name in names))
    # Two reads, not one transaction: a job taken in between is counted as taken. A gauge.
    return max(len(due) - taken, 0)
