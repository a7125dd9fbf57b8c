"""Every Redis key, stream and queue name Formwork uses — spelled here and nowhere else.

arq's own keys (`arq:job:<id>`, `arq:in-progress:<id>`, `arq:result:<id>`, `arq:retry:<id>`)
are fixed by arq; ours share one configurable prefix so deployments (and tests) can share a
Redis without sharing state.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from redis.asyncio import Redis

from worker.contract import MESSAGE_ID

DEFAULT_PREFIX = "formwork"
ARQ_JOB_PREFIX = "arq:job:"  # arq.constants.job_key_prefix: the plain-Redis wire protocol uses it
ARQ_IN_PROGRESS_PREFIX = "arq:in-progress:"  # arq.constants.in_progress_key_prefix
ARQ_RESULT_PREFIX = "arq:result:"  # arq.constants.result_key_prefix
ARQ_RETRY_PREFIX = "arq:retry:"  # arq.constants.retry_key_prefix: a job's try count
JOB_FUNCTION = "browser_job"  # the arq function name a raw enqueuer writes into the payload

MessageKind = Literal["resume", "expire"]
_MESSAGE_ID = re.compile(MESSAGE_ID)


def message_id(job_id: str, kind: MessageKind, number: int) -> str:
    """The arq id of an internal message about `job_id` (a resume, a pause's expiry): unique per
    `number`, so a second resume is a second message rather than a duplicate arq drops."""
    return f"{job_id}.{kind}{number}"


def job_of(arq_id: str) -> str:
    """The job an arq id is about: the id itself for a job, its job's for a message."""
    found = _MESSAGE_ID.match(arq_id)
    return found.group("job") if found else arq_id


# KEYS: the key. ARGV: the value it must hold. Compare-and-delete.
_DROP_IF_HOLDS = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


async def drop_if_holds(redis: Redis, key: str, value: str) -> bool:
    """Delete `key` if it still holds `value`, in one step: a key that names its owner (a job
    holding an idempotency key, a worker holding arq's mark) is let go only by that owner."""
    script: Any = redis.register_script(_DROP_IF_HOLDS)
    return bool(await script(keys=[key], args=[value]))


RECORD_TTL_S = 7 * 24 * 3600  # job records, de-duplication keys and event streams
# Hourly rollups outlive the job records a little, so `formwork stats --last 7d` stays whole.
STATS_TTL_S = 8 * 24 * 3600
JOB_STREAM_MAXLEN = 2_000
GLOBAL_STREAM_MAXLEN = 100_000


@dataclass(frozen=True)
class Keys:
    prefix: str = DEFAULT_PREFIX

    @property
    def queue(self) -> str:
        """The arq queue (a sorted set of job ids scored by run-at time in ms)."""
        return f"{self.prefix}:queue"

    def job(self, job_id: str) -> str:
        """Hash: status, script, site, seq, report (JSON), enqueued_at; `decision`, the one
        decision taken about the current pause (`queue.claim_pause`)."""
        return f"{self.prefix}:job:{job_id}"

    def idempotency(self, key: str) -> str:
        """String: the job id that owns an idempotency key."""
        return f"{self.prefix}:idem:{key}"

    def events(self, job_id: str) -> str:
        """Stream: this job's events, in order."""
        return f"{self.prefix}:events:{job_id}"

    @property
    def all_events(self) -> str:
        """Stream: every job's events, for monitoring."""
        return f"{self.prefix}:events"

    @property
    def paused(self) -> str:
        """Sorted set: job ids waiting for a person or the customer, scored by pause time (ms)."""
        return f"{self.prefix}:paused"

    def abort(self, job_id: str) -> str:
        """String: a reason, set to stop a queued or running job between steps. Taking a
        decision about a pause drops it (`queue.claim_pause`). It expires after RECORD_TTL_S:
        set so by `queue.request_abort`, and by the workers' sweep when set by hand without
        one (`queue.expire_abort_flags`)."""
        return f"{self.prefix}:abort:{job_id}"

    @property
    def taken(self) -> str:
        """Hash: job id -> the token of the worker process running it (`worker.handback`)."""
        return f"{self.prefix}:taken"

    def worker_lease(self, token: str) -> str:
        """String with a short expiry, renewed while the worker process with `token` lives: a
        job whose worker has none is taken over (`worker.handback`)."""
        return f"{self.prefix}:worker:{token}"

    @property
    def aborts(self) -> str:
        """A SCAN pattern matching every `abort` key (and only those) under this prefix."""
        return re.sub(r"([*?\[\]\\])", r"\\\1", self.prefix) + ":abort:*"

    def site_slots(self, site: str) -> str:
        """Sorted set: lease id -> lease expiry (ms), the per-site concurrency semaphore."""
        return f"{self.prefix}:site:{site}:slots"

    def site_last_start(self, site: str) -> str:
        return f"{self.prefix}:site:{site}:last-start"

    def drift(self, site: str) -> str:
        """Hash: element name -> how many steps found it only through a fallback candidate."""
        return f"{self.prefix}:site:{site}:drift"

    def rollout(self, script: str) -> str:
        """Hash: canary version -> rollout state (JSON) that overrides the script's rollout file
        for that canary — a rollback or a promotion — until reset."""
        return f"{self.prefix}:rollout:{script}"

    def rollout_outcomes(self, script: str, version: int) -> str:
        """Hash: outcome counters of one script version (succeeded, system_failure, business,
        code:<failure code>)."""
        return f"{self.prefix}:rollout:{script}@{version}:outcomes"

    def stats_hour(self, hour: str) -> str:
        """Hash: the hourly rollup of finished jobs (`hour` is `YYYYMMDDHH`, UTC);
        field `<metric>|<script@version>|<label>` -> count."""
        return f"{self.prefix}:stats:{hour}"

    @property
    def finished(self) -> str:
        """Sorted set: job id -> when it last settled (ms): ended, or paused for a person.
        Trimmed to RECORD_TTL_S; `formwork insights` reads the window's reports through it."""
        return f"{self.prefix}:finished"
