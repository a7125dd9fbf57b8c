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
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any, cast

from redis.asyncio import Redis
from redis.exceptions import RedisError

from worker.contract import JobStatus
from worker.events import JobEvents
from worker.keys import ARQ_IN_PROGRESS_PREFIX, Keys, drop_if_holds

log = logging.getLogger("formwork.queue")

# KEYS: the mark. ARGV: the token. Only a mark arq set a moment ago (it holds arq's `1`) is
# made ours: a mark that is already another worker's is left alone. KEEPTTL: arq's expiry stays.
_MAKE_OURS = """
if redis.call('GET', KEYS[1]) == '1' then
  return redis.call('SET', KEYS[1], ARGV[1], 'XX', 'KEEPTTL') and 1 or 0
end
return 0
"""


@dataclass
class TakenJobs:
    """The jobs one worker process took and arq has not yet seen through; lives across the
    arq workers `formwork worker` builds each time it connects again."""

    token: str = field(default_factory=lambda: f"formwork:{uuid.uuid4().hex}")
    unfinished: set[str] = field(default_factory=set)

    async def take(self, redis: Redis, job_id: str) -> None:
        """Called as arq starts `job_id` on this worker: remember it and make its mark ours."""
        self.unfinished.add(job_id)
        script: Any = redis.register_script(_MAKE_OURS)
        await script(keys=[ARQ_IN_PROGRESS_PREFIX + job_id], args=[self.token])

    def seen_through(self, job_id: str) -> None:
        """arq wrote the job's end (or it went back on the queue): nothing to hand back."""
        self.unfinished.discard(job_id)

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
                await _say_queued(redis, keys, job_id)
            self.unfinished.discard(job_id)
        return handed


async def _say_queued(redis: Redis, keys: Keys, job_id: str) -> None:
    status = await cast("Any", redis.hget(keys.job(job_id), "status"))
    if status is not None and JobStatus(status.decode()).settled:
        # It ended and said so; arq had not written that down. Its next delivery answers
        # with the stored report: nothing to announce.
        log.info("job %s: handed back to the queue to record its end", job_id)
        return
    log.warning(
        "job %s: handed back to the queue (this worker lost Redis while running it); "
        "it goes on from its last checkpoint",
        job_id,
    )
    with contextlib.suppress(RedisError):
        events = await JobEvents.open(redis, keys, job_id)
        await events.job(JobStatus.queued, message="lost Redis mid-job; it will run again")
