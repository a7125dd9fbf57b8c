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

A run on a worker that stalled past its lease (a paused VM) may wake after another worker took
its job over (`worker.handback`), and the step it was in would still write its end over the
other run's record: a stale event, a seq counted again, a checkpoint (with the signed-in
session) put back on a job that had ended. So a queued run's writes are fenced (`Fence`): one
Lua script writes a batch only while arq's in-progress mark is still the run's own, in the same
round trip the transaction took; refused, the run stops with `TakenOver`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from worker.errors import TakenOver

Writes = Callable[[Pipeline], object]  # adds commands to the pipeline
Then = Callable[[], object]  # runs once its writes are in Redis

# KEYS: the run's arq mark. ARGV: the run's token, then each command as its word count and
# words. A mark that is arq's own `1` is the run's too: arq set it a moment before the worker
# made it its own (as the run's stop check reads it).
_FENCED = """
local mark = redis.call('GET', KEYS[1])
if mark ~= ARGV[1] and mark ~= '1' then return 0 end
local i = 2
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
return 1
"""


@dataclass(frozen=True)
class Fence:
    """A run's writes go out only while arq's in-progress `mark` for its queue entry holds the
    run's worker `token`."""

    job_id: str
    mark: str
    token: str


class Outbox:
    """Ordered, batched Redis writes for one job."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.fence: Fence | None = None
        self._queued: list[tuple[Writes, Then | None]] = []
        self._task: asyncio.Task[None] | None = None
        self._error: Exception | None = None
        self._fenced: Any = None  # the registered script, once fenced

    def put(self, writes: Writes, then: Then | None = None) -> None:
        """Queue `writes` (commands added to a pipeline) after everything queued before;
        `then` runs once they were tried (a webhook delivery: what a fence refused, no one
        hears of)."""
        self._raise_failed()
        self._queued.append((writes, then))
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
                async with self.redis.pipeline(transaction=self.fence is None) as pipe:
                    for writes, _ in batch:
                        writes(pipe)
                    if self.fence is None:
                        await pipe.execute()
                    else:
                        await self._write_fenced(self.fence, pipe)
            except TakenOver as exc:
                self._error = exc
                continue  # nothing of it was written: nothing to announce
            except Exception as exc:  # raised to the job at its next put or flush
                self._error = exc
            for _, then in batch:
                if then is not None:
                    then()

    async def _write_fenced(self, fence: Fence, pipe: Pipeline) -> None:
        # The pipeline only collected the commands; the script runs them, atomically.
        words: list[Any] = [fence.token]
        for args, _ in pipe.command_stack:
            words.append(len(args))
            words.extend(args)
        if self._fenced is None:
            self._fenced = self.redis.register_script(_FENCED)
        if not await self._fenced(keys=[fence.mark], args=words):
            raise TakenOver(f"job {fence.job_id} was taken over by another worker")

    def _raise_failed(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            dropped, self._queued = self._queued, []
            if not isinstance(error, TakenOver):  # as if written: the run ends on the error
                for _, then in dropped:
                    if then is not None:
                        then()
            raise error
