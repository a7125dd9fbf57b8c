"""A worker that lost Redis hands back the jobs it held, and only those still its own; a
worker whose lease is gone has its jobs taken over by the others (`worker.handback`). The
whole paths, a real Redis restarted under a running job and a worker killed -9 mid-job, are in
test_worker_process.py; here, the marks, leases and the commit fence themselves, on the test
session's Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from worker.contract import JobEvent, JobStatus
from worker.errors import TakenOver
from worker.handback import TakenJobs, take_over_dead
from worker.keys import ARQ_IN_PROGRESS_PREFIX, Keys, message_id
from worker.queue import RedisCommitJournal
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
        await mine.take(redis, keys, job_id)
    assert await redis.get(mark(running)) == mine.token.encode()
    assert 0 < await redis.pttl(mark(running)) <= 60_000  # arq's expiry kept
    # Our mark expired during a long outage and another worker took the job.
    await redis.delete(mark(taken_over))
    await started_by_arq(redis, taken_over)
    await theirs.take(redis, keys, taken_over)
    await mine.take(redis, keys, taken_over)  # a mark that is another worker's is not made ours
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
        await taken.take(redis, keys, job_id)
    await taken.seen_through(redis, keys, done)  # arq wrote its end (and dropped the mark itself)
    taken.still_running({stuck})  # its run did not stop: a hand-back would run it twice

    assert await taken.hand_back(redis, keys) == []
    assert await redis.get(mark(stuck)) == taken.token.encode()  # left to expire
    await redis.delete(mark(done), mark(stuck))


async def test_each_worker_process_has_a_token_of_its_own() -> None:
    # Two workers' marks must never compare equal: hand-back is a compare-and-delete.
    assert len({TakenJobs().token for _ in range(100)}) == 100


async def test_the_jobs_of_a_worker_whose_lease_is_gone_are_taken_over_by_another(
    redis: Redis, settings: Settings
) -> None:
    keys = Keys(settings.key_prefix)
    dead, alive, me = TakenJobs(), TakenJobs(), TakenJobs()
    lost, held, ended, resumed = (
        f"{settings.key_prefix}-{n}" for n in ("lost", "held", "ended", "resumed")
    )
    decision = message_id(resumed, "resume", 2)  # a resumed job runs under its decision's id
    await dead.renew(redis, keys)
    await alive.renew(redis, keys)
    await me.renew(redis, keys)
    for owner, job_id in ((dead, lost), (alive, held), (dead, ended), (dead, decision)):
        await started_by_arq(redis, job_id)
        await owner.take(redis, keys, job_id)
    await redis.hset(keys.job(lost), mapping={"status": "running", "seq": 4})
    await redis.hset(keys.job(resumed), mapping={"status": "running", "seq": 9})
    await redis.delete(mark(ended))  # arq wrote its end; the dead worker never forgot it
    assert await take_over_dead(redis, keys, me) == []  # every lease is there

    await redis.delete(keys.worker_lease(dead.token))  # as when it ran out: SIGKILL, OOM
    assert await take_over_dead(redis, keys, me) == sorted([lost, decision])

    assert not await redis.exists(mark(lost), mark(decision))  # due again at arq's next poll
    for job_id, seq in ((lost, 5), (resumed, 10)):
        [queued] = await events_of(redis, keys, job_id)  # on the job's own stream
        assert (queued.seq, queued.status, queued.message) == (
            seq,
            JobStatus.queued,
            "its worker stopped answering mid-job; it will run again",
        )
    assert await redis.get(mark(held)) == alive.token.encode()  # a live worker keeps its own
    assert await redis.hgetall(keys.taken) == {held.encode(): alive.token.encode()}
    assert await take_over_dead(redis, keys, alive) == []  # once
    await alive.seen_through(redis, keys, held)
    assert await redis.hgetall(keys.taken) == {}
    for owner in (alive, me):
        await owner.release(redis, keys)
    assert not await redis.exists(*(keys.worker_lease(t.token) for t in (dead, alive, me)))
    await redis.delete(mark(held))


async def test_a_run_whose_job_was_taken_over_is_stopped_before_its_commit(
    redis: Redis, settings: Settings
) -> None:
    # A stalled worker (a paused VM) comes back after its jobs were taken over: the run must
    # not send a commit the other run may send too.
    keys = Keys(settings.key_prefix)
    job_id = f"{settings.key_prefix}-fenced"
    stalled, other = TakenJobs(), TakenJobs()
    await started_by_arq(redis, job_id)
    await stalled.take(redis, keys, job_id)
    journal = await RedisCommitJournal.open(redis, keys, job_id, stalled.token)
    await journal.sent("review")  # its own mark: noted
    assert await redis.hget(keys.job(job_id), "commit:review") is not None

    await redis.delete(mark(job_id))  # taken over: due again, not yet started anywhere
    with pytest.raises(TakenOver):
        await journal.sent("submit")
    await started_by_arq(redis, job_id)
    await other.take(redis, keys, job_id)  # started by the other worker
    with pytest.raises(TakenOver):
        await journal.sent("submit")
    assert await redis.hget(keys.job(job_id), "commit:submit") is None

    ours = await RedisCommitJournal.open(redis, keys, job_id, other.token)
    assert ours.previously_sent == {"review"}
    await ours.sent("submit")
    assert await redis.hget(keys.job(job_id), "commit:submit") is not None
    await redis.delete(mark(job_id), keys.job(job_id), keys.taken)
