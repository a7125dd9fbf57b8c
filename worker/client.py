"""The orchestrator's side: enqueue browser jobs, follow their events, read reports, abort.

    async with FormworkClient("redis://127.0.0.1:6379/0") as client:
        handle = await client.enqueue(BrowserJob(job_id="t-88812", script="billing/issue_credit",
                                                 inputs={...}))
        async for event_id, event in handle.events():
            ...                                 # every job and step transition, in order
        report = await handle.report()

Enqueueing is idempotent and durable: the same job_id — or the same idempotency key — is
accepted once and answered with the existing handle for as long as the job record lives
(7 days), long after arq's own result has expired.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, cast

from pydantic import ConfigDict, TypeAdapter
from redis.asyncio import Redis

from worker.backlog import backlog
from worker.contract import (
    BrowserJob,
    EventKind,
    JobEvent,
    JobReport,
    JobStatus,
    ResumeDecision,
)
from worker.envelope import MAX_PAYLOAD_BYTES, envelope
from worker.errors import JobInvalid
from worker.keys import ARQ_JOB_PREFIX, RECORD_TTL_S, Keys
from worker.queue import (
    PauseClaim,
    abort_decision,
    claim_decision,
    read_pause,
    request_abort,
)

# KEYS: job record, idempotency key, arq job key, queue, job stream, global stream.
# ARGV: job id, envelope, score ms, script, ttl s, enqueued-at, has-idempotency-key,
#       arq job key ttl ms, queued event JSON, job stream maxlen.
# Returns {created (1/0), owning job id}.
_ENQUEUE = """
local job_id = ARGV[1]
if redis.call('EXISTS', KEYS[1]) == 1 then return {0, job_id} end
if ARGV[7] == '1' then
  local owner = redis.call('GET', KEYS[2])
  if owner then return {0, owner} end
  redis.call('SET', KEYS[2], job_id, 'EX', tonumber(ARGV[5]))
end
redis.call('HSET', KEYS[1], 'status', 'queued', 'script', ARGV[4], 'enqueued_at', ARGV[6], 'seq', 1)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[10], '*', 'event', ARGV[9])
redis.call('EXPIRE', KEYS[5], tonumber(ARGV[5]))
redis.call('XADD', KEYS[6], 'MAXLEN', '~', '100000', '*', 'event', ARGV[9])
redis.call('SET', KEYS[3], ARGV[2], 'PX', tonumber(ARGV[8]))
redis.call('ZADD', KEYS[4], tonumber(ARGV[3]), job_id)
return {1, job_id}
"""
ARQ_JOB_TTL_MS = 24 * 3600 * 1000  # arq's own default expiry for a queued job
# How often a decision or an abort is judged again when the job changed under it: each retry
# follows an event of the job's, so a few are plenty.
_ATTEMPTS = 3
_STATUS = TypeAdapter(JobStatus, config=ConfigDict(title="status"))


class JobHandle:
    """A job on the queue, seen from the orchestrator."""

    def __init__(self, client: FormworkClient, job_id: str, *, created: bool = True) -> None:
        self.client = client
        self.job_id = job_id
        self.created = created  # False: this enqueue was a duplicate of an existing job

    def __repr__(self) -> str:
        return f"<JobHandle {self.job_id} created={self.created}>"

    async def status(self) -> JobStatus | None:
        value = await cast(
            "Any", self.client.redis.hget(self.client.keys.job(self.job_id), "status")
        )
        if value is None:
            # Queued the raw way (the wire protocol): no record until a worker takes it.
            queued = await self.client.redis.exists(ARQ_JOB_PREFIX + self.job_id)
            return JobStatus.queued if queued else None
        # A status this version does not know (written by a newer worker) fails as a report
        # it cannot read does: a pydantic ValidationError (a ValueError, as before).
        return _STATUS.validate_python(value.decode())

    async def report(self) -> JobReport | None:
        value = await cast(
            "Any", self.client.redis.hget(self.client.keys.job(self.job_id), "report")
        )
        return JobReport.model_validate_json(value) if value else None

    async def events(
        self, after: str = "0-0", *, follow: bool = True, block_ms: int = 1000
    ) -> AsyncIterator[tuple[str, JobEvent]]:
        """(event id, event) pairs after `after` — pass the last id seen to resume without a
        gap. With `follow`, waits for new events and stops once the job settles (ends, or
        pauses for a person) — at its latest settling: a job that paused and was resumed since
        is followed through what the decision brought."""
        key = self.client.keys.events(self.job_id)
        last = after
        redis = self.client.redis
        while True:
            response = await redis.xread({key: last}, count=100, block=block_ms if follow else None)
            if not response:
                if not follow:
                    return
                status = await self.status()
                if status is None or status.terminal:
                    # Ended before we looked (and we are past its last event), or unknown.
                    # A paused job is not done: following past its pause waits for what the
                    # decision (or the deadline) brings.
                    return
                continue
            for _, entries in response:
                for raw_id, fields in entries:
                    last = raw_id.decode()
                    event = JobEvent.model_validate_json(fields[b"event"])
                    yield last, event
                    if follow and event.settled and last == await self.last_event_id():
                        return

    async def last_event_id(self) -> str:
        """The id of the job's newest event ("0-0" if none): follow from here to see only
        what happens next (after a resume, say)."""
        newest = await self.client.redis.xrevrange(self.client.keys.events(self.job_id), count=1)
        return str(newest[0][0].decode()) if newest else "0-0"

    async def wait(self, timeout_s: float = 300, *, after: str = "0-0") -> JobReport:
        """Follow the job (from event `after`) until it settles; return that report."""
        async with asyncio.timeout(timeout_s):
            async for _, event in self.events(after=after):
                if event.settled and event.report is not None:
                    return event.report
            report = await self.report()
        if report is None:
            raise LookupError(f"job {self.job_id} has no report (unknown job?)")
        return report


class FormworkClient:
    """Async client for orchestrators (Python); other languages use the wire protocol
    documented in the README."""

    def __init__(
        self,
        redis_url: str = "redis://127.0.0.1:6379/0",
        *,
        key_prefix: str = "formwork",
        timeout_s: float | None = None,
    ) -> None:
        """`timeout_s`: how long connecting, or any one call, may take before it fails with
        redis's `TimeoutError` (None: as long as the system waits; following a job's events
        blocks 1 s a call, so it needs more than that)."""
        self.redis = Redis.from_url(
            redis_url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s
        )
        self.keys = Keys(key_prefix)
        self._enqueue: Any = self.redis.register_script(_ENQUEUE)

    async def __aenter__(self) -> FormworkClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self.redis.aclose()

    def handle(self, job_id: str) -> JobHandle:
        return JobHandle(self, job_id, created=False)

    async def enqueue(self, job: BrowserJob) -> JobHandle:
        """Queue `job` once. A job with a job_id or idempotency key seen before is not queued
        again: the existing job's handle comes back, with `created=False`."""
        body = envelope(job.model_dump(mode="json", exclude_none=True))
        if len(body) > MAX_PAYLOAD_BYTES:
            raise JobInvalid(
                f"job {job.job_id} is {len(body)} bytes; workers refuse more than "
                f"{MAX_PAYLOAD_BYTES}",
                field="payload",
            )
        now_ms = int(time.time() * 1000)
        queued = JobEvent(
            seq=1,
            job_id=job.job_id,
            kind=EventKind.job,
            status=JobStatus.queued,
            at=datetime.now(UTC),
        ).model_dump_json(exclude_none=True)
        keys = self.keys
        idem = job.idempotency_key or ""
        created, owner = await self._enqueue(
            keys=[
                keys.job(job.job_id),
                keys.idempotency(idem) if idem else keys.idempotency("-"),
                ARQ_JOB_PREFIX + job.job_id,
                keys.queue,
                keys.events(job.job_id),
                keys.all_events,
            ],
            args=[
                job.job_id,
                body,
                now_ms,
                job.script,
                RECORD_TTL_S,
                datetime.now(UTC).isoformat(),
                "1" if idem else "0",
                ARQ_JOB_TTL_MS,
                queued,
                2000,
            ],
        )
        owner_id = owner.decode() if isinstance(owner, bytes) else str(owner)
        return JobHandle(self, owner_id, created=bool(created))

    async def abort(
        self, job_id: str, reason: str = "aborted by the orchestrator", *, by: str = "unknown"
    ) -> bool:
        """Stop the job. A queued or running one stops between steps (or before it starts)
        and ends `cancelled`; a paused one is sent an `abort` decision, and ends `cancelled`
        when a worker carries it out. False if it already ended or is unknown."""
        for _ in range(_ATTEMPTS):
            flagged = await request_abort(self.redis, self.keys, job_id, reason)
            if flagged != "paused":
                return flagged == "flagged"
            if await self.decide(job_id, abort_decision(reason, by)) == PauseClaim.claimed:
                return True
            # Decided or resumed meanwhile: look again — a pending decision is flagged.
        return False

    async def resume(self, job_id: str, decision: ResumeDecision) -> bool:
        """Answer a paused job. Any worker picks it up: a fresh context signs in again,
        rebuilds the paused step's page and goes on (or the job ends, for abort, reject and
        mark_done). False when the job is not paused, the decision is not one it allows, or
        the pause already has its decision (`decide` says which)."""
        return await self.decide(job_id, decision) == PauseClaim.claimed

    async def decide(self, job_id: str, decision: ResumeDecision) -> PauseClaim:
        """`resume`, saying what became of the decision: `claimed` (it is the pause's one
        decision and is queued), `decided` (another decision about this pause came first),
        `not_allowed`, `not_paused` or `unknown`. Of two decisions sent at once, exactly one
        is claimed."""
        for _ in range(_ATTEMPTS):
            paused = await read_pause(self.redis, self.keys, job_id)
            if paused.status is None:
                return PauseClaim.unknown
            report = paused.report
            if not paused.status.paused or report is None or report.handoff is None:
                return PauseClaim.not_paused
            if paused.decided:
                return PauseClaim.decided
            if decision.decision not in report.handoff.allowed_decisions:
                return PauseClaim.not_allowed
            claimed = await claim_decision(self.redis, self.keys, job_id, paused.seq, decision)
            if claimed != PauseClaim.moved:
                return claimed
            # The job changed between the read and the claim (a refused decision re-announced
            # the pause, say): judge the decision again against what it is now.
        return PauseClaim.moved

    async def paused(self) -> list[tuple[str, datetime, JobReport | None]]:
        """Jobs waiting for a person or the customer, oldest first: (id, paused at, report).
        A pause whose decision is taken and waits for a worker is no longer listed."""
        entries = await self.redis.zrange(self.keys.paused, 0, -1, withscores=True)
        found = []
        for raw_id, score in entries:
            job_id = raw_id.decode()
            at = datetime.fromtimestamp(score / 1000, UTC)
            paused = await read_pause(self.redis, self.keys, job_id)
            if paused.decided:
                continue
            found.append((job_id, at, paused.report))
        return found

    async def queue_depth(self) -> int:
        """Jobs due on the queue that no worker has taken yet (`worker.backlog`)."""
        return await backlog(self.redis, self.keys)
