"""A worker that lost Redis hands back the jobs it held, and only those still its own
(`worker.handback`). The whole path, a real Redis restarted under a running job, is in
test_worker_process.py; here, the marks themselves, on the test session's Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from worker.contract import JobEvent, JobStatus
from worker.handback import TakenJobs
from worker.keys import ARQ_IN_PROGRESS_PREFIX, Keys
from worker.settings import Settings


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


def mark(job_id: str) -> str:
    return ARQ_IN_PROGRESS_PREFIX + job_id


async def started_by_arq(redis: Redis, job_id: str) -> None:
    # What arq's start_jobs writes: a mark holding 1, for the job timeout + 10 s.
    await redis.psetex(mark(job_id), 60_000, b"1")


async def events_of(redis: Redis, keys: Keys, job_id: str) -> list[JobEvent]:
    entries = await redis.xrange(keys.events(job_id))
    return [JobEvent.model_validate_json(fields[b"event"]) for _, fields in entries]


async def test_a_worker_hands_back_only_the_jobs_whose_mark_is_still_its_own(
    redis: Redis, settings: Settings
) -> None:
    keys = Keys(settings.key_prefix)
    running, taken_over, ended = (f"{settings.key_prefix}-{n}" for n in ("a", "b", "c"))
    mine, theirs = TakenJobs(), TakenJobs()
    for job_id in (running, taken_over, ended):
        await started_by_arq(redis, job_id)
        await mine.take(redis, job_id)
    assert await redis.get(mark(running)) == mine.token.encode()
    assert 0 < await redis.pttl(mark(running)) <= 60_000  # arq's expiry kept
    # Our mark expired during a long outage and another worker took the job.
    await redis.delete(mark(taken_over))
    await started_by_arq(redis, taken_over)
    await theirs.take(redis, taken_over)
    await mine.take(redis, taken_over)  # a mark that is another worker's is not made ours
    assert await redis.get(mark(taken_over)) == theirs.token.encode()
    await redis.hset(keys.job(running), mapping={"status": "running", "seq": 7})
    await redis.hset(keys.job(ended), mapping={"status": "succeeded", "seq": 12})

    handed = await mine.hand_back(redis, keys)

    assert handed == sorted([running, ended])
    assert not await redis.exists(mark(running), mark(ended))
    assert await redis.get(mark(taken_over)) == theirs.token.encode()
    assert mine.unfinished == set()
    [queued] = await events_of(redis, keys, running)  # the watcher hears it will run again
    assert (queued.seq, queued.status) == (8, JobStatus.queued)
    assert await redis.hget(keys.job(running), "status") == b"queued"
    assert await events_of(redis, keys, ended) == []  # it said its last word already
    assert await redis.hget(keys.job(ended), "status") == b"succeeded"


async def test_a_job_seen_through_or_still_running_is_not_handed_back(
    redis: Redis, settings: Settings
) -> None:
    keys = Keys(settings.key_prefix)
    done, stuck = f"{settings.key_prefix}-done", f"{settings.key_prefix}-stuck"
    taken = TakenJobs()
    for job_id in (done, stuck):
        await started_by_arq(redis, job_id)
        await taken.take(redis, job_id)
    taken.seen_through(done)  # arq wrote its end (and dropped the mark itself)
    taken.still_running({stuck})  # its run did not stop: a hand-back would run it twice

    assert await taken.hand_back(redis, keys) == []
    assert await redis.get(mark(stuck)) == taken.token.encode()  # left to expire
    await redis.delete(mark(done), mark(stuck))


async def test_each_worker_process_has_a_token_of_its_own() -> None:
    # Two workers' marks must never compare equal: hand-back is a compare-and-delete.
    assert len({TakenJobs().token for _ in range(100)}) == 100
