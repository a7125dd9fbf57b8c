"""Jobs a worker took off the queue and could not see through, handed back when it connects
again after losing Redis.

arq marks a job it starts as in progress (`arq:in-progress:<id>`, for the job timeout + 10 s)
and drops the mark when it writes the job's end. A worker that loses Redis mid-job cannot write
that end: its run hands the job on (`queue._hand_on`), but the writes that would put it back on
the queue fail too. A Redis that restarts with its data (an append-only file, a replica
promoted in a failover) brings the mark back, and the job waited out the mark's whole life
(10 minutes by default) at `running` before any worker would take it again.

So a worker remembers which jobs it took (`TakenJobs`) until arq has written their end, and
makes arq's mark its own: the mark holds the worker's token instead of arq's `1` (arq only asks
whether the mark exists). When the same process connects again, it drops the marks that still
hold its token — compare-and-delete, so a job another worker took over meanwhile keeps that
worker's mark — and the job is due again at once, to go on from its last checkpoint. A job
whose run is still going (it could not be stopped) is not handed back.

A worker process that dies (SIGKILL, OOM, a lost machine) cannot hand anything back, and its
jobs waited out arq's mark too. So each worker process also holds a lease (`Keys.worker_lease`,
`LEASE_MS`, renewed every `RENEW_S`) and lists the jobs it runs in `Keys.taken`; every worker,
as it renews its own lease, takes over the jobs of a worker whose lease is gone: it drops their
marks (compare-and-delete on the dead worker's token) and the jobs are due again at once, to
go on from their last checkpoints on whichever worker takes them. A worker that was only
stalled (a paused VM) and comes back finds its jobs taken: the fence on the commit journal
(`queue.RedisCommitJournal`) stops its run before it could send a commit a second time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

from redis.asyncio import Redis
from redis.exceptions import RedisError

from worker.contract import JobStatus
from worker.events import JobEvents
from worker.keys import ARQ_IN_PROGRESS_PREFIX, Keys, drop_if_holds, job_of

log = logging.getLogger("formwork.queue")

# A worker process not heard from for this long is gone, and its jobs are taken over. Long
# beside a renewal (a busy event loop is late by a second or two, not by fifteen), short beside
# arq's mark (the job timeout + 10 s: 10 minutes by default).
LEASE_MS = 20_000
RENEW_S = 5.0

# KEYS: the mark, the taken hash. ARGV: the token, the job id. Only a mark arq set a moment ago
# (it holds arq's `1`) is made ours: a mark that is already another worker's is left alone.
# KEEPTTL: arq's expiry stays.
_MAKE_OURS = """
if redis.call('GET', KEYS[1]) == '1' then
  redis.call('SET', KEYS[1], ARGV[1], 'XX', 'KEEPTTL')
  redis.call('HSET', KEYS[2], ARGV[2], ARGV[1])
  return 1
end
return 0
"""

# KEYS: the taken hash. ARGV: the job id, the token. The entry goes only if it is still ours.
_FORGET = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""

# KEYS: the taken hash, the job's mark. ARGV: the job id, the dead worker's token. 1: the mark
# was the dead worker's and is dropped (the job is due again); 2: only its entry was left (the
# job had ended, or another worker has it); 0: the entry is no longer the dead worker's.
_TAKE_OVER = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
if redis.call('GET', KEYS[2]) == ARGV[2] then
  redis.call('DEL', KEYS[2])
  return 1
end
return 2
"""


# Gives the events of a job this worker announces `queued` the job's webhook, if it has one:
# the job's record and the worker's HTTP session are the queue's (`queue.startup` sets it).
WebhookOf = Callable[[JobEvents], Awaitable[None]]


@dataclass
class TakenJobs:
    """The jobs one worker process took and arq has not yet seen through; lives across the
    arq workers `formwork worker` builds each time it connects again."""

    token: str = field(default_factory=lambda: f"formwork:{uuid.uuid4().hex}")
    unfinished: set[str] = field(default_factory=set)
    leased: bool = False  # the lease was set once and not released since
    lost: set[str] = field(default_factory=set)  # runs stopped: their job was taken over
    webhook_of: WebhookOf | None = None

    async def take(self, redis: Redis, keys: Keys, job_id: str) -> None:
        """Called as arq starts `job_id` on this worker: remember it, make its mark ours and
        list it under this worker (`Keys.taken`)."""
        self.unfinished.add(job_id)
        script: Any = redis.register_script(_MAKE_OURS)
        await script(keys=[ARQ_IN_PROGRESS_PREFIX + job_id, keys.taken], args=[self.token, job_id])

    async def seen_through(self, redis: Redis, keys: Keys, job_id: str) -> None:
        """arq wrote the job's end (or it went back on the queue): nothing to hand back."""
        self.unfinished.discard(job_id)
        # Left behind if this fails, the entry is dropped by `keep_lease` (or, once this
        # worker is gone, by the worker that finds it dead).
        with contextlib.suppress(RedisError):
            await _forget(redis, keys, job_id, self.token)

    def still_running(self, job_ids: set[str]) -> None:
        """These runs could not be stopped: a hand-back would run the job twice at once.
        arq's mark expires with the job timeout, as it always did."""
        for job_id in job_ids & self.unfinished:
            log.error(
                "job %s: its run did not stop when Redis was lost; it is left to arq's "
                "in-progress mark, which expires with the job timeout",
                job_id,
            )
        self.unfinished -= job_ids

    async def hand_back(self, redis: Redis, keys: Keys) -> list[str]:
        """Connected again: put back on the queue each job this worker took and could not see
        through, unless another worker has it now. Returns the ids handed back."""
        handed = []
        for job_id in sorted(self.unfinished):
            if await drop_if_holds(redis, ARQ_IN_PROGRESS_PREFIX + job_id, self.token):
                handed.append(job_id)
                await _say_queued(redis, keys, job_id, _LOST_REDIS, self.webhook_of)
            await _forget(redis, keys, job_id, self.token)
            self.unfinished.discard(job_id)
        return handed

    async def keep_lease(self, redis: Redis, keys: Keys) -> None:
        """Renew this worker's lease every RENEW_S, and each time take over the jobs of
        workers whose lease is gone. Runs until cancelled; a Redis error waits for the next
        round (losing Redis for good is the worker's to notice)."""
        while True:
            try:
                await self.renew(redis, keys)
                await take_over_dead(redis, keys, self)
            except RedisError:
                pass  # the next round tries again; the worker notices a Redis gone for good
            except Exception:
                # Never the end of the loop: a lease not renewed has this live worker's jobs
                # taken over by the others.
                log.exception("renewing this worker's lease failed; trying again")
            await asyncio.sleep(RENEW_S)

    async def renew(self, redis: Redis, keys: Keys) -> None:
        lapsed = await cast(
            "Any", redis.set(keys.worker_lease(self.token), "1", px=LEASE_MS, get=True)
        )
        if lapsed is None and self.leased:
            # Not renewed for LEASE_MS while this process lived (a paused VM, a stalled
            # loop): other workers may have taken its jobs over. The commit fence stops a
            # run of them before it sends a commit again.
            log.error(
                "this worker's lease lapsed (not renewed for %d s): its jobs may have been "
                "taken over by other workers",
                LEASE_MS // 1000,
            )
        self.leased = True

    async def release(self, redis: Redis, keys: Keys) -> None:
        """A clean stop: arq has put this worker's jobs back on the queue itself."""
        self.leased = False
        with contextlib.suppress(RedisError):
            await redis.delete(keys.worker_lease(self.token))


async def take_over_dead(redis: Redis, keys: Keys, own: TakenJobs) -> list[str]:
    """Drop the marks of jobs whose worker's lease is gone, so they are due again at once; and
    this worker's own entries for jobs it no longer runs. Returns the ids taken over."""
    raw = await cast("Any", redis.hgetall(keys.taken))
    listed = {job.decode(): token.decode() for job, token in raw.items()}
    for job_id, token in listed.items():
        if token == own.token and job_id not in own.unfinished:
            await _forget(redis, keys, job_id, token)  # its end was written, its entry not
    others = sorted({t for t in listed.values() if t != own.token})
    if not others:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for token in others:
            pipe.exists(keys.worker_lease(token))
        alive = await pipe.execute()
    dead = {token for token, live in zip(others, alive, strict=True) if not live}
    taken = []
    script: Any = redis.register_script(_TAKE_OVER)
    for job_id, token in sorted(listed.items()):
        if token not in dead:
            continue
        if (
            await script(keys=[keys.taken, ARQ_IN_PROGRESS_PREFIX + job_id], args=[job_id, token])
            == 1
        ):
            taken.append(job_id)
            await _say_queued(redis, keys, job_id, _WORKER_GONE, own.webhook_of)
    return taken


async def _forget(redis: Redis, keys: Keys, job_id: str, token: str) -> None:
    script: Any = redis.register_script(_FORGET)
    await script(keys=[keys.taken], args=[job_id, token])


# Why a job went back on the queue: (for the log, for the job's `queued` event).
_LOST_REDIS = ("this worker lost Redis while running it", "lost Redis mid-job; it will run again")
_WORKER_GONE = (
    "the worker running it stopped answering",
    "its worker stopped answering mid-job; it will run again",
)


async def _say_queued(
    redis: Redis,
    keys: Keys,
    arq_id: str,
    why: tuple[str, str],
    webhook_of: WebhookOf | None = None,
) -> None:
    job_id = job_of(arq_id)  # a decision's message runs under an id of its own
    status = await cast("Any", redis.hget(keys.job(job_id), "status"))
    if status is not None and JobStatus(status.decode()).settled:
        # It ended and said so; arq had not written that down. Its next delivery answers
        # with the stored report: nothing to announce.
        log.info("job %s: handed back to the queue to record its end", job_id)
        return
    logged, message = why
    log.warning(
        "job %s: handed back to the queue (%s); it goes on from its last checkpoint",
        job_id,
        logged,
    )
    with contextlib.suppress(RedisError):
        events = await JobEvents.open(redis, keys, job_id)
        if webhook_of is not None:
            # Every event reaches the job's webhook, whichever worker announces it: this one
            # too, or the receiver's next event after the dead run's was a `running` from
            # nowhere, one `seq` further on.
            await webhook_of(events)
        try:
            await events.job(JobStatus.queued, message=message)
        finally:
            if events.webhook is not None:
                await events.webhook.close()
