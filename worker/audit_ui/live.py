"""What the queue says now of jobs whose audit record shows them paused.

A job's audit record is written when it pauses and again when it settles; in between it says
nothing. A decision sent for a paused job (claimed in the job's Redis record, its message
queued) and the run that carries it out are in Redis alone: the review UI read from the store
alone listed a job whose decision waits for a worker, and then one running again, as still
waiting for a person, with its request as an open question. So it asks Redis, for those jobs
only: one pipelined read per page, nothing for jobs that have ended.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, cast

from redis.exceptions import RedisError

from worker.client import FormworkClient
from worker.contract import JobStatus
from worker.queue import DECISION_FIELD, PauseState
from worker.settings import shown_url

log = logging.getLogger("formwork.audit_ui")


@dataclass(frozen=True)
class JobNow:
    """A job as the queue holds it now."""

    status: JobStatus
    decided: bool  # paused, and a decision about this pause waits for a worker


@dataclass(frozen=True)
class Live:
    """What the queue said of the jobs asked about (those it has a record of), or why it
    could not be asked (`unknown`: the page shows the records as they last stood)."""

    jobs: dict[str, JobNow]
    unknown: str | None = None


class LiveState:
    """Reads the jobs' state from the queue's Redis (`client`: its URL and key prefix)."""

    def __init__(self, client: FormworkClient, url: str) -> None:
        self.client = client
        self.url = shown_url(url)
        self._failing = False  # logged once per outage, not once per page

    async def of(self, job_ids: list[str]) -> Live:
        if not job_ids:
            return Live({})
        fields = ["status", "seq", DECISION_FIELD]
        try:
            async with self.client.redis.pipeline(transaction=False) as pipe:
                for job_id in job_ids:
                    pipe.hmget(self.client.keys.job(job_id), fields)
                answers = await cast("Any", pipe.execute())
        except (RedisError, OSError) as exc:
            why = f"the queue's Redis at {self.url} did not answer ({exc or type(exc).__name__})"
            if not self._failing:
                log.warning("%s: paused jobs are shown as their records last stood", why)
            self._failing = True
            return Live({}, unknown=why)
        self._failing = False
        found = {}
        for job_id, raw in zip(job_ids, answers, strict=True):
            status, seq, claim = (v.decode() if v is not None else None for v in raw)
            if status is None:
                continue  # its record expired, or another prefix's: the audit record stands
            try:
                now = JobStatus(status)
            except ValueError:
                continue  # not a status this version knows: the audit record stands
            state = PauseState(status=now, seq=int(seq or 0), report=None, claim=claim)
            found[job_id] = JobNow(status=now, decided=now.paused and state.decided)
        return Live(found)

    async def close(self) -> None:
        await self.client.close()
