"""Step events: every job and step transition, appended to Redis Streams as it happens.

Each job has its own bounded stream (`<prefix>:events:<job_id>`, kept 7 days) that an
orchestrator reads from any point — the stream entry id is the resume token — plus one global
stream for monitoring. An event's `seq` counts 1, 2, 3… per job without gaps.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import cast

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from worker.contract import EventKind, JobEvent, JobReport, JobStatus, StepReport
from worker.keys import GLOBAL_STREAM_MAXLEN, JOB_STREAM_MAXLEN, RECORD_TTL_S, Keys
from worker.outbox import Outbox
from worker.webhooks import WebhookSender

log = logging.getLogger("formwork.events")


class JobEvents:
    """Publishes one job's events and keeps its record (`<prefix>:job:<id>`) in step.

    A job runs on one worker at a time (arq's in-progress key), so the sequence counter is kept
    here and written back with each event in the same transaction.
    """

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        job_id: str,
        *,
        seq: int = 0,
        webhook: WebhookSender | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.job_id = job_id
        self.seq = seq
        self.webhook = webhook
        self.outbox = Outbox(redis)  # the job's checkpoints go out through it too

    @classmethod
    async def open(
        cls, redis: Redis, keys: Keys, job_id: str, webhook: WebhookSender | None = None
    ) -> JobEvents:
        seq = await cast("Awaitable[bytes | None]", redis.hget(keys.job(job_id), "seq"))
        return cls(redis, keys, job_id, seq=int(seq or 0), webhook=webhook)

    async def publish(
        self,
        kind: EventKind,
        status: str,
        *,
        step: StepReport | None = None,
        report: JobReport | None = None,
        message: str | None = None,
    ) -> JobEvent:
        self.seq += 1
        event = JobEvent(
            seq=self.seq,
            job_id=self.job_id,
            kind=kind,
            status=status,
            at=datetime.now(UTC),
            step=step,
            report=report,
            message=message,
        )
        data = event.model_dump_json(exclude_none=True)
        record: dict[str, str | int] = {"seq": self.seq}
        if kind == EventKind.job:
            record["status"] = status
            if report is not None:
                record["report"] = report.model_dump_json()
        keys, job_id = self.keys, self.job_id

        def writes(pipe: Pipeline) -> None:
            pipe.hset(keys.job(job_id), mapping=record)
            pipe.expire(keys.job(job_id), RECORD_TTL_S)
            pipe.xadd(
                keys.events(job_id), {"event": data}, maxlen=JOB_STREAM_MAXLEN, approximate=True
            )
            pipe.expire(keys.events(job_id), RECORD_TTL_S)
            if kind == EventKind.job and JobStatus(status).paused:
                pipe.zadd(keys.paused, {job_id: int(event.at.timestamp() * 1000)})
            elif kind == EventKind.job:
                pipe.zrem(keys.paused, job_id)
            pipe.xadd(
                keys.all_events, {"event": data}, maxlen=GLOBAL_STREAM_MAXLEN, approximate=True
            )

        # A step's events go out in order while the job goes on; the job's own status changes
        # are written before it does (an orchestrator acts on them).
        # The webhook hears of the event once it was written (or the write failed: Redis gone
        # is no reason to keep a receiver in the dark), never of one a fence refused.
        webhook = self.webhook
        self.outbox.put(writes, None if webhook is None else lambda: webhook.send(data))
        if kind == EventKind.job:
            await self.outbox.flush()
        return event

    async def job(
        self, status: JobStatus, *, report: JobReport | None = None, message: str | None = None
    ) -> JobEvent:
        # The full report rides only on the event that settles the job; earlier ones stay small.
        final = report if status.settled else None
        return await self.publish(EventKind.job, status, report=final, message=message)


async def announce(redis: Redis, keys: Keys, event: JobEvent) -> None:
    """Put an event that belongs to no one job (a rollout change) on the global stream."""
    await redis.xadd(
        keys.all_events,
        {"event": event.model_dump_json(exclude_none=True)},
        maxlen=GLOBAL_STREAM_MAXLEN,
        approximate=True,
    )


class EventListener:
    """Adapts the executor's RunListener to published events."""

    def __init__(self, events: JobEvents) -> None:
        self.events = events
        self._last_job_status: JobStatus | None = None

    async def step_changed(self, report: JobReport, step: StepReport) -> None:
        await self.events.publish(EventKind.step, step.status, step=step)

    async def job_changed(self, report: JobReport) -> None:
        # The executor reports the job at start and at the end; publish each status once.
        if report.status == self._last_job_status:
            return
        self._last_job_status = report.status
        message = report.error.message if report.error and report.status.settled else None
        await self.events.job(report.status, report=report, message=message)
