"""A job's writes to Redis, in order, without the job waiting on each one.

A step sends two events (running, then its outcome) and leaves a checkpoint: three Redis round
trips a step, each a pause in driving the browser (~1.5 ms a step on this machine, more on a
busy Redis; bench/overhead.py). Those writes need order, not the job's attention: the `Outbox`
queues them and one task writes whatever has queued up, as one pipeline, in the order given.

What must be durable before the job goes on is flushed: a job's own status changes (the
orchestrator acts on them) and its settling event. The commit journal never goes through here
(`queue.RedisCommitJournal`): "this commit was sent" is written before the click, always.

A failed write is not lost silently: the next `put` or `flush` raises it, so the job ends the
way it would have had the write been awaited.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

Writes = Callable[[Pipeline], object]  # adds commands to the pipeline


class Outbox:
    """Ordered, batched Redis writes for one job."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._queued: list[Writes] = []
        self._task: asyncio.Task[None] | None = None
        self._error: Exception | None = None

    def put(self, writes: Writes) -> None:
        """Queue `writes` (commands added to a pipeline) after everything queued before."""
        self._raise_failed()
        self._queued.append(writes)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain(), name="outbox")

    async def flush(self) -> None:
        """Return once everything queued so far is written; raise what failed."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)
        self._raise_failed()

    async def _drain(self) -> None:
        while self._queued and self._error is None:
            batch, self._queued = self._queued, []
            try:
                # One transaction: a reader sees an event and the record it updates together.
                async with self.redis.pipeline(transaction=True) as pipe:
                    for writes in batch:
                        writes(pipe)
                    await pipe.execute()
            except Exception as exc:  # raised to the job at its next put or flush
                self._error = exc

    def _raise_failed(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            self._queued.clear()
            raise error
