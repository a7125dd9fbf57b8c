"""The queue side: arq's WorkerSettings, the job function, and the JSON wire format.

Jobs and results cross Redis as JSON, never pickle: an orchestrator in any language can enqueue,
and whoever can write to Redis cannot make a worker run code. The job function never raises for
a bad job — a malformed payload, an unknown script or bad inputs end as a `rejected` report — so
one bad message can neither kill the worker nor be retried forever.

Run a worker with `formwork worker`, or `arq worker.queue.WorkerSettings`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import aiohttp
from arq import Worker
from arq.connections import RedisSettings
from arq.worker import Retry, func
from pydantic import BaseModel, ConfigDict, ValidationError
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker import logs
from worker.artifacts import store_for
from worker.browser import BrowserHost
from worker.capacity import SiteCapacity
from worker.checkpoint import (
    CHECKPOINT_FIELD,
    JOB_FIELD,
    Checkpoint,
    RedisCheckpoints,
    StateCipher,
    keep_job,
    kept_job,
)
from worker.contract import (
    BrowserJob,
    Claim,
    Decision,
    DecisionRecord,
    Failure,
    FailureCode,
    HandoffRequest,
    Interruption,
    JobReport,
    JobStatus,
    ResumeDecision,
    StepReport,
    Verification,
    WebhookTarget,
)
from worker.envelope import (
    MALFORMED,
    MALFORMED_FIELD,
    MAX_PAYLOAD_BYTES,
    MAX_TRIES,
    dumps,
    envelope,
    loads,
)
from worker.errors import ArtifactError, BrowserLost, JobInvalid, RejectedError, TakenOver
from worker.events import EventListener, JobEvents
from worker.executor import (
    ResumePoint,
    RunListener,
    Runtime,
    effect_text,
    fail_internally,
    intake,
    now,
    refuse_carried,
    reject,
    run_job,
    settle,
)
from worker.handback import TakenJobs
from worker.keys import (
    ARQ_IN_PROGRESS_PREFIX,
    ARQ_JOB_PREFIX,
    ARQ_RESULT_PREFIX,
    ARQ_RETRY_PREFIX,
    JOB_FUNCTION,
    RECORD_TTL_S,
    Keys,
    drop_if_holds,
    job_of,
    message_id,
)
from worker.metrics import Monitor, WorkerMetrics
from worker.outbox import Fence, Outbox
from worker.rollout import Rollouts
from worker.script import LoadedScript, ScriptStore
from worker.secretstore import Redactor, SecretStore
from worker.settings import Settings
from worker.webhooks import WebhookSender, check_target
from worker.webhooks import drain as drain_webhooks

log = logging.getLogger("formwork.queue")

JOB_TIMEOUT_MARGIN_S = 5.0
# How long a worker that lost Redis gives its runs to end (their browser is stopped first).
LOST_REDIS_GRACE_S = 30.0


# ---------------------------------------------------------------- internal messages


class ResumeMessage(BaseModel):
    """A decision about a paused job (`FormworkClient.resume`), for any worker to carry out."""

    model_config = ConfigDict(extra="forbid")
    resume: str
    # The pause decided about: the job's event `seq` when it was claimed (`claim_pause`).
    pause: int | None = None
    # Any JSON here: one that is not a ResumeDecision object (a bare `"approve"`) is refused by
    # `_read_decision` like any other bad decision, the pause announced again with why; refused
    # here, its claim was dropped without a word, and the orchestrator waited for nothing.
    decision: Any


class ExpireMessage(BaseModel):
    """A pause's deadline, queued to fall due at the deadline."""

    model_config = ConfigDict(extra="forbid")
    expire: str
    due: str


def _message(arq_id: str, payload: Any) -> ResumeMessage | ExpireMessage | None:
    """The internal message `payload` is, or None for a job. A message has no `job_id` or
    `script` and is queued under its job's message id: a job that merely carries a `resume`
    or `expire` field is a job (and is rejected for the extra field), never a decision."""
    if not isinstance(payload, dict) or payload.keys() & {"job_id", "script"}:
        return None
    kind = "resume" if "resume" in payload else "expire" if "expire" in payload else None
    if kind is None:
        return None
    try:
        message = (ResumeMessage if kind == "resume" else ExpireMessage).model_validate(payload)
    except ValidationError as exc:
        raise JobInvalid(f"{kind} message {arq_id!r} rejected: {exc.errors()[0]['msg']}") from exc
    about = message.resume if isinstance(message, ResumeMessage) else message.expire
    if arq_id == about or job_of(arq_id) != about:
        raise JobInvalid(f"{kind} message {arq_id!r} about {about!r} is not queued as one")
    return message


async def enqueue_message(
    redis: Redis, keys: Keys, message_id: str, body: dict[str, Any], run_at_ms: int
) -> None:
    """Queue one internal message (a resume, an expiry) for whichever worker is free at
    `run_at_ms`, in the same arq layout as a job."""
    data = envelope(body)
    ttl_ms = _message_ttl_ms(run_at_ms)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(ARQ_JOB_PREFIX + message_id, data, px=ttl_ms)
        pipe.zadd(keys.queue, {message_id: run_at_ms})
        await pipe.execute()


def _message_ttl_ms(run_at_ms: int) -> int:
    return max(run_at_ms - int(time.time() * 1000), 0) + 24 * 3600 * 1000


# ---------------------------------------------------------------- one decision per pause

# Field of the job record: `<seq>|<token>`, the decision taken about the pause whose event had
# that `seq` (token: the arq id of the message carrying it out, or of the expiry that ended it).
DECISION_FIELD = "decision"


class PauseClaim(StrEnum):
    """What became of an attempt to decide a paused job."""

    claimed = "claimed"  # this is the pause's one decision
    decided = "decided"  # another decision about this pause came first
    moved = "moved"  # the job changed since it was read: read it again
    not_paused = "not_paused"  # queued, running or ended: nothing to decide
    not_allowed = "not_allowed"  # the pause does not allow this decision
    unknown = "unknown"  # no such job, or its record expired


# KEYS: job record, abort flag, the message's arq job key, queue.
# ARGV: pause seq, token, message id ('' to claim only), envelope, run-at ms, envelope ttl ms,
#       paused statuses (comma-separated), DECISION_FIELD.
# The status, the pause and the claim are checked and the claim taken and its message queued
# in one step: of two decisions sent at once, exactly one is taken.
_CLAIM = """
local rec = redis.call('HMGET', KEYS[1], 'status', 'seq', ARGV[8])
local status, seq, claim = rec[1], rec[2], rec[3]
if not status then return 'unknown' end
if not string.find(',' .. ARGV[7] .. ',', ',' .. status .. ',', 1, true) then
  return 'not_paused'
end
if seq ~= ARGV[1] then return 'moved' end
if claim and string.sub(claim, 1, #ARGV[1] + 1) == ARGV[1] .. '|' then return 'decided' end
redis.call('HSET', KEYS[1], ARGV[8], ARGV[1] .. '|' .. ARGV[2])
redis.call('DEL', KEYS[2])
if ARGV[3] ~= '' then
  redis.call('SET', KEYS[3], ARGV[4], 'PX', tonumber(ARGV[6]))
  redis.call('ZADD', KEYS[4], tonumber(ARGV[5]), ARGV[3])
end
return 'claimed'
"""

# KEYS: job record, abort flag, the job's arq key. ARGV: reason, ttl s, running statuses,
# paused statuses (comma-separated), DECISION_FIELD. Returns what `request_abort` says. A job
# queued the raw way has no record until a worker takes it: its arq key says it is queued.
_ABORT = """
local rec = redis.call('HMGET', KEYS[1], 'status', 'seq', ARGV[5])
local status, seq, claim = rec[1], rec[2], rec[3]
if not status then
  if redis.call('EXISTS', KEYS[3]) == 0 then return 'unknown' end
  status = 'queued'
end
local function among(list) return string.find(',' .. list .. ',', ',' .. status .. ',', 1, true) end
if among(ARGV[4]) then
  if not (claim and seq and string.sub(claim, 1, #seq + 1) == seq .. '|') then return 'paused' end
elseif not among(ARGV[3]) then
  return 'ended'
end
redis.call('SET', KEYS[2], ARGV[1], 'EX', tonumber(ARGV[2]))
return 'flagged'
"""


def _statuses(paused: bool) -> str:
    return ",".join(s for s in JobStatus if not s.terminal and s.paused == paused)


@dataclass(frozen=True)
class PauseState:
    """A job's record as a decision sees it, read in one step."""

    status: JobStatus | None
    seq: int
    report: JobReport | None
    claim: str | None

    @property
    def decided(self) -> bool:
        """The current pause already has its decision (not yet carried out, or carried out
        and found refused — a refusal re-announces the pause under a new `seq`)."""
        return self.claim is not None and self.claim.startswith(f"{self.seq}|")

    @property
    def waiting(self) -> bool:
        """Paused, with a request, and no decision taken yet."""
        paused = self.status is not None and self.status.paused
        asks = self.report is not None and self.report.handoff is not None
        return paused and asks and not self.decided


async def read_pause(redis: Redis, keys: Keys, job_id: str) -> PauseState:
    """`job_id`'s status, event count, report and decision claim, as they stood together."""
    fields = await cast(
        "Any", redis.hmget(keys.job(job_id), ["status", "seq", "report", DECISION_FIELD])
    )
    status, seq, report, claim = (f.decode() if f is not None else None for f in fields)
    return PauseState(
        status=JobStatus(status) if status is not None else None,
        seq=int(seq or 0),
        report=JobReport.model_validate_json(report) if report else None,
        claim=claim,
    )


def resume_message(job_id: str, pause: int, decision: ResumeDecision) -> dict[str, Any]:
    """The body of the message carrying out `decision` about the pause at event `pause`."""
    return {"resume": job_id, "pause": pause, "decision": decision.model_dump(mode="json")}


# As long as a decision's note may be. An abort flag set by hand holds whatever its setter
# wrote: a 2 MB reason went whole into the report, both event streams and the webhook.
ABORT_REASON_CHARS = 2000


def abort_decision(reason: str, by: str) -> ResumeDecision:
    """The `abort` decision an abort request becomes (a note holds at most 2000 characters)."""
    return ResumeDecision(decision=Decision.abort, by=by, note=reason[:ABORT_REASON_CHARS])


WITHHELD = "(withheld: it carries the value of a configured secret)"


def _abort_reason(state: WorkerState, raw: bytes) -> str:
    """An abort request's reason as it may be shown: an abort is carried out whatever its
    reason says, but a reason holding a secret is never stored or announced; a long one is cut
    to ABORT_REASON_CHARS (after the secret check, so a secret cut in half is still found)."""
    reason = raw[:MAX_PAYLOAD_BYTES].decode(errors="replace")
    if state.runtime.secrets.carried_in({"reason": reason}):
        return WITHHELD
    return reason if len(reason) <= ABORT_REASON_CHARS else reason[: ABORT_REASON_CHARS - 1] + "…"


async def claim_decision(
    redis: Redis, keys: Keys, job_id: str, pause: int, decision: ResumeDecision
) -> PauseClaim:
    """Claim the pause at event `pause` for `decision`, and queue the message carrying it out."""
    token = message_id(job_id, "resume", pause)
    body = resume_message(job_id, pause, decision)
    return await claim_pause(redis, keys, job_id, pause, token, body)


async def claim_pause(
    redis: Redis,
    keys: Keys,
    job_id: str,
    pause: int,
    token: str,
    message: dict[str, Any] | None = None,
) -> PauseClaim:
    """Make `token` the one decision about `job_id`'s pause at event `pause` and, with a
    `message`, queue it under the id `token` — both or neither. The claim also drops an abort
    request left from before the pause: from here on, the decision is what happens."""
    now_ms = int(time.time() * 1000)
    script: Any = redis.register_script(_CLAIM)
    result = await script(
        keys=[keys.job(job_id), keys.abort(job_id), ARQ_JOB_PREFIX + token, keys.queue],
        args=[
            pause,
            token,
            token if message is not None else "",
            envelope(message) if message is not None else b"",
            now_ms,
            _message_ttl_ms(now_ms),
            _statuses(paused=True),
            DECISION_FIELD,
        ],
    )
    return PauseClaim(result.decode() if isinstance(result, bytes) else str(result))


async def request_abort(redis: Redis, keys: Keys, job_id: str, reason: str) -> str:
    """Flag a queued or running job — or a paused one whose decision is not yet carried out
    — to stop between steps. Checked and set in one step, so the flag is never left on a
    job waiting for a person, where it would overturn whatever was decided next. Returns
    `flagged`, `paused` (a pause with no decision: decide `abort` instead), `ended` or
    `unknown`."""
    script: Any = redis.register_script(_ABORT)
    result = await script(
        keys=[keys.job(job_id), keys.abort(job_id), ARQ_JOB_PREFIX + job_id],
        args=[
            reason,
            RECORD_TTL_S,
            _statuses(paused=False),
            _statuses(paused=True),
            DECISION_FIELD,
        ],
    )
    return result.decode() if isinstance(result, bytes) else str(result)


# How often each worker gives abort flags set by hand an expiry (and once when it starts).
ABORT_SWEEP_S = 3600

# KEYS: abort flags. ARGV: the expiry. Gives each one that has none the expiry, in one step
# (a flag set again meanwhile by `request_abort` has its own, and keeps it).
_EXPIRE_UNSET = """
local given = 0
for _, key in ipairs(KEYS) do
  if redis.call('TTL', key) == -1 then
    redis.call('EXPIRE', key, ARGV[1])
    given = given + 1
  end
end
return given
"""


async def expire_abort_flags(redis: Redis, keys: Keys) -> int:
    """Give every abort flag that has no expiry — one set by hand (`SET` without `EX`, the
    wire protocol's way) — the one `request_abort` gives its own (RECORD_TTL_S); returns how
    many. A flag for a job no worker will run (it ended, or never was: a mistyped id) is read
    by nothing and was kept for ever."""
    script: Any = redis.register_script(_EXPIRE_UNSET)
    given, batch = 0, []
    async for key in redis.scan_iter(match=keys.aborts, count=1000):
        batch.append(key)
        if len(batch) == 500:
            given += int(await script(keys=batch, args=[RECORD_TTL_S]))
            batch = []
    if batch:
        given += int(await script(keys=batch, args=[RECORD_TTL_S]))
    return given


async def _sweep_abort_flags(redis: Redis, keys: Keys) -> None:
    """`expire_abort_flags` now and every ABORT_SWEEP_S, for as long as the worker runs."""
    while True:
        try:
            given = await expire_abort_flags(redis, keys)
        except RedisError as exc:  # a lost Redis is the worker's to handle: try next time
            log.warning("abort flags not swept: %s", exc)
        else:
            if given:
                log.info("%d abort flag(s) set without an expiry given %d s", given, RECORD_TTL_S)
        await asyncio.sleep(ABORT_SWEEP_S)


# ---------------------------------------------------------------- the worker

# The arq job id the current run is under: the job's own id, or a decision message's (whose
# arq mark is the run's, not the job's).
queue_entry: ContextVar[str | None] = ContextVar("formwork_queue_entry", default=None)


@dataclass
class WorkerState:
    """What every job on this worker shares; lives in arq's ctx as `ctx["formwork"]`."""

    settings: Settings
    keys: Keys
    redis: Redis
    runtime: Runtime
    capacity: SiteCapacity
    http: aiohttp.ClientSession
    monitor: Monitor
    cipher: StateCipher | None = None
    owns_browser: bool = True
    # `formwork worker`'s (and build_worker's): the jobs this process runs, under its lease.
    taken: TakenJobs | None = None
    # Loops that run beside the jobs until shutdown: the lease's, the abort flags' sweep.
    background: list[asyncio.Task[None]] = field(default_factory=list)

    def checkpoints(self, job_id: str, outbox: Outbox | None = None) -> RedisCheckpoints:
        return RedisCheckpoints(self.redis, self.keys, job_id, self.cipher, outbox)


async def startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx.get("settings") or Settings.from_env()
    browser: BrowserHost | None = ctx.get("browser")
    owns_browser = browser is None
    if browser is None:
        browser = BrowserHost(
            settings.chromium,
            keep_warm=True,
            recycle_after=settings.browser_recycle_jobs or None,
        )
    await browser.start()
    redis = cast(Redis, ctx["redis"])
    keys = Keys(settings.key_prefix)
    scripts = ScriptStore(settings.scripts_dir, settings.selectors_dir)
    ctx["formwork"] = WorkerState(
        settings=settings,
        keys=keys,
        redis=redis,
        runtime=Runtime(
            scripts=scripts,
            browser=browser,
            artifacts=store_for(settings),
            secrets=SecretStore(settings.secrets_file),
            uploads=settings.uploads_dir,
            rollouts=Rollouts(redis, keys, scripts),
        ),
        capacity=SiteCapacity(redis, keys),
        http=aiohttp.ClientSession(),
        monitor=Monitor(redis, keys, browser, scripts=scripts, metrics=ctx.get("metrics")),
        cipher=StateCipher(settings.state_key) if settings.state_key else None,
        owns_browser=owns_browser,
    )
    if settings.state_key is None:
        log.warning(
            "FORMWORK_STATE_KEY is not set: checkpoints keep no session; resumed jobs sign in again"
        )
    # Kept for the worker `formwork worker` builds after losing Redis (`build_worker`).
    ctx["metrics"] = ctx["formwork"].monitor.metrics
    if settings.metrics_port is not None:
        await ctx["formwork"].monitor.serve(settings.metrics_host, settings.metrics_port)
    taken: TakenJobs | None = ctx.get("taken")
    if taken is not None:
        state = ctx["formwork"]
        state.taken = taken
        taken.webhook_of = functools.partial(_attach_kept_webhook, state)
        await taken.hand_back(redis, keys)  # what this process held when it lost Redis
        await taken.renew(redis, keys)  # leased before arq hands it a job
        state.background.append(asyncio.create_task(taken.keep_lease(redis, keys)))
    ctx["formwork"].background.append(asyncio.create_task(_sweep_abort_flags(redis, keys)))
    log.info("worker ready: max_jobs=%s queue=%s", settings.max_jobs, keys.queue)


async def shutdown(ctx: dict[str, Any]) -> None:
    # Once: `formwork worker` calls it again when arq's own close failed on a lost Redis.
    state: WorkerState | None = ctx.pop("formwork", None)
    if state is None:
        return
    for task in state.background:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if state.taken is not None:
        await state.taken.release(state.redis, state.keys)
    await drain_webhooks()  # deliveries still pending get their last seconds, then go
    await state.http.close()
    await state.monitor.close()
    if state.owns_browser:
        await state.runtime.browser.stop()


async def browser_job(ctx: dict[str, Any], payload: Any) -> dict[str, Any]:
    """The arq job function: run one BrowserJob; return its report as JSON-able data."""
    state: WorkerState = ctx["formwork"]
    queue_entry.set(str(ctx["job_id"]))
    try:
        report = await execute(state, str(ctx["job_id"]), payload, run=int(ctx.get("job_try") or 1))
    except TakenOver:
        return {}  # the job is another worker's now: nothing of this run is written
    # Every path (run, reject, resume, expiry) ends here; counted once per settling.
    await state.monitor.settled(report)
    return report.model_dump(mode="json") if report is not None else {}


async def execute(
    state: WorkerState, job_id: str, payload: Any, *, run: int = 1
) -> JobReport | None:
    try:
        message = _message(job_id, payload)
    except JobInvalid:
        await _release_claim(state, job_id, payload)
        raise
    if message is None and job_of(job_id) != job_id:
        # Queued under a decision's id, and no decision (an envelope arq cannot read: its
        # `et` left out, say): the claim it holds goes, as any unreadable decision's does.
        await _release_claim(state, job_id, payload)
    if isinstance(message, ResumeMessage):
        return await execute_resume(state, message, job_id, run=run)
    if isinstance(message, ExpireMessage):
        return await execute_expire(state, message, job_id)
    redis, keys = state.redis, state.keys
    stored = await cast("Any", redis.hmget(keys.job(job_id), ["status", "report"]))
    if stored[0] is not None and JobStatus(stored[0].decode()).settled and stored[1]:
        # Delivered again after it ended (a raw re-enqueue, a retry after a lost result):
        # the job ran once; answer with what happened then.
        log.info("job %s already %s; not running it again", job_id, stored[0].decode())
        return JobReport.model_validate_json(stored[1])

    events = await JobEvents.open(redis, keys, job_id)
    listener = EventListener(events)
    try:
        job = _parse(job_id, payload)
        # Also checked at intake; here it is before the job is written to its record.
        refuse_carried(state.runtime.secrets, job)
        if job.webhook is not None:
            check_target(
                job.webhook.url, state.settings.webhook_secret, state.settings.webhook_hosts
            )
        logs.bind_job(job.job_id, job.site, job.script_name)  # webhook lines name the job too
        # From here on the webhook hears the job, its refusal as a duplicate included: a
        # receiver that hears nothing waits for ever for a job that will never run.
        _attach_webhook(state, events, job)
        await _own_idempotency_key(state, job)
    except RejectedError as exc:
        script = payload.get("script") if isinstance(payload, dict) else None
        if isinstance(script, str) and state.runtime.secrets.carried_in({"script": script}):
            script = None  # not written back into the report that refuses it
        key = payload.get("idempotency_key") if isinstance(payload, dict) else None
        if isinstance(key, str) and state.runtime.secrets.carried_in({"key": key}):
            # The client's enqueue took the key under its own name: a name holding a secret.
            await redis.delete(keys.idempotency(key))
        elif isinstance(key, str):
            await _give_key_back(state, job_id, key)
        # A correlation carrying a secret is not written to the report either; any other
        # refusal (a duplicate's, a secret in the key) keeps the orchestrator's correlation.
        in_correlation = (exc.field or "").split(".")[0] == "correlation"
        if events.webhook is None:
            _attach_payload_webhook(state, events, payload)
        try:
            return await reject(
                job_id,
                str(script or ""),
                exc,
                state.runtime,
                listener,
                correlation={} if in_correlation else _correlation(payload),
            )
        finally:
            if events.webhook is not None:
                await events.webhook.close()
    except BaseException:
        if events.webhook is not None:  # Redis lost, say: a later run has a sender of its own
            await events.webhook.close()
        raise

    # Kept for a later resume on any worker, whoever enqueued the job; secret inputs sealed.
    kept = keep_job(job, _secret_inputs(state, job), state.cipher)
    await cast("Any", redis.hset(keys.job(job_id), JOB_FIELD, kept))
    checkpoint = await state.checkpoints(job_id).load()
    resume = _after_interruption(checkpoint, run) if checkpoint is not None else None
    return await _run_tracked(state, job, events, listener, resume, run=run)


# KEYS: job record. ARGV: the claim to drop, DECISION_FIELD. Compare-and-delete: a claim taken
# by another decision since is left alone.
_RELEASE = """
if redis.call('HGET', KEYS[1], ARGV[2]) == ARGV[1] then
  redis.call('HDEL', KEYS[1], ARGV[2])
  return 1
end
return 0
"""


async def _drop_claim(state: WorkerState, job_id: str, claim: str) -> bool:
    """Drop `claim` from the job's pause, unless another decision has claimed it since."""
    script: Any = state.redis.register_script(_RELEASE)
    return bool(await script(keys=[state.keys.job(job_id)], args=[claim, DECISION_FIELD]))


async def _drop_own_claim(state: WorkerState, job_id: str, arq_id: str) -> bool:
    """Drop the job's claim if it is the one message `arq_id` took, for whichever pause."""
    raw = await cast("Any", state.redis.hget(state.keys.job(job_id), DECISION_FIELD))
    claim = raw.decode() if raw is not None else ""
    if claim.partition("|")[2] != arq_id:
        return False
    return await _drop_claim(state, job_id, claim)


async def _release_claim(state: WorkerState, arq_id: str, payload: Any) -> None:
    """A decision message this worker cannot carry out (queued under an id other than
    `<job_id>.resume<pause>`, as a client of the wire protocol might) must not hold the pause
    it claimed: the job would wait for it forever, deaf to other decisions and to its own
    deadline. The claim goes, and the job waits for a decision again (an abort asked for
    meanwhile is carried out now)."""
    if not isinstance(payload, dict):
        return
    about, pause = payload.get("resume"), payload.get("pause")
    own = job_of(arq_id)
    if own != arq_id and about != own:
        # Queued under job A's message id (the pause the client claimed is A's), its body
        # names another job or none: the claim it holds is A's, and A waited for it until its
        # deadline, a decision sent again refused as `decided`.
        if await _drop_own_claim(state, own, arq_id):
            log.warning(
                "job %s: decision message %s is about %r, not this job; its claim on the "
                "pause is dropped, and the job waits for a decision again",
                own,
                arq_id,
                about,
            )
            await _abort_if_requested(state, own)
        return
    if not isinstance(about, str):
        return
    if not isinstance(pause, int):
        # Its pause unreadable (`"pause": null`, missing, not a number): the claim it holds is
        # the one naming its own id, whichever pause that was.
        if await _drop_own_claim(state, about, arq_id):
            log.warning(
                "job %s: decision message %s cannot be read; its claim on the pause is "
                "dropped, and the job waits for a decision again",
                about,
                arq_id,
            )
            await _abort_if_requested(state, about)
        return
    if await _drop_claim(state, about, f"{pause}|{arq_id}"):
        expected = message_id(about, "resume", pause)
        why = "cannot be read" if arq_id == expected else f"is not queued as {expected}"
        log.warning(
            "job %s: decision message %s %s; its claim on the pause is dropped, and the job "
            "waits for a decision again",
            about,
            arq_id,
            why,
        )
        await _abort_if_requested(state, about)


async def _drop_unqueued_claim(state: WorkerState, job_id: str) -> bool:
    """Drop the pause's claim when its decision message is nowhere: not queued, not being
    carried out, not carried out. A wire-protocol client that set the claim and stopped
    before queueing the message (the protocol asks for both in one script) would otherwise
    keep the job from its own deadline for ever. Only at the deadline, so a client that is
    merely slow between its two writes loses nothing but a decision that came too late."""
    raw = await cast("Any", state.redis.hget(state.keys.job(job_id), DECISION_FIELD))
    claim = raw.decode() if raw is not None else ""
    token = claim.partition("|")[2]
    arq_keys = (ARQ_JOB_PREFIX + token, ARQ_IN_PROGRESS_PREFIX + token, ARQ_RESULT_PREFIX + token)
    if not token or await cast("Any", state.redis.exists(*arq_keys)):
        return False
    if not await _drop_claim(state, job_id, claim):
        return False
    log.warning(
        "job %s: the decision %s claimed its pause but was never queued; its claim is dropped "
        "at the pause's deadline",
        job_id,
        token,
    )
    return True


async def _own_idempotency_key(state: WorkerState, job: BrowserJob) -> None:
    """Take the job's idempotency key for it, or refuse the job when another job has it.

    `FormworkClient.enqueue` takes the key as it queues the job; a job queued the raw way (the
    wire protocol) reaches the worker with its key untaken: the worker takes it here, so two
    jobs sent with one key never both run (two credits for one request)."""
    key = job.idempotency_key
    if key is None:
        return
    redis, name = state.redis, state.keys.idempotency(key)
    if await redis.set(name, job.job_id, nx=True, ex=RECORD_TTL_S):
        return
    owner = await redis.get(name)
    if owner is not None and owner.decode() != job.job_id:
        raise JobInvalid(
            f"idempotency key {key!r} belongs to job {owner.decode()}: this job is a "
            "duplicate of it and was not run",
            field="idempotency_key",
        )


async def _give_key_back(state: WorkerState, job_id: str, key: str) -> None:
    """A job refused before any browser work did nothing on the site for its idempotency key
    to guard: the key is let go, so the corrected job can be sent with it (as Stripe does with
    a request that fails validation). A key another job holds (this one its duplicate) stays."""
    if await drop_if_holds(state.redis, state.keys.idempotency(key), job_id):
        log.info("job %s: rejected; its idempotency key is free again", job_id)


def _attach_payload_webhook(state: WorkerState, events: JobEvents, payload: Any) -> None:
    """A payload refused before it was read as a job (a misspelt field, a value of the wrong
    type) still says where its orchestrator listens: the refusal goes there too, or an
    orchestrator that follows its jobs by webhook waited for ever for a job that never ran.
    Not when the webhook itself is at fault, nor when the payload carries a secret."""
    hook = payload.get("webhook") if isinstance(payload, dict) else None
    try:
        target = WebhookTarget.model_validate(hook)
        check_target(target.url, state.settings.webhook_secret, state.settings.webhook_hosts)
    except (ValidationError, JobInvalid):
        return
    if state.runtime.secrets.carried_in(payload) is None and state.settings.webhook_secret:
        events.webhook = WebhookSender(
            state.http, target.url, state.settings.webhook_secret, events.job_id
        )


def _attach_webhook(state: WorkerState, events: JobEvents, job: BrowserJob) -> None:
    """Every event of the job goes to its webhook, whichever worker (a first run, a decision
    carried out, an expiry) announces it."""
    if job.webhook is not None and state.settings.webhook_secret:
        events.webhook = WebhookSender(
            state.http, job.webhook.url, state.settings.webhook_secret, job.job_id
        )


async def _attach_kept_webhook(state: WorkerState, events: JobEvents) -> None:
    """The webhook of a job this worker announces without running it (`queued`, taken over
    from a dead worker or handed back after losing Redis), from the job its record keeps."""
    raw = await cast("Any", state.redis.hget(state.keys.job(events.job_id), JOB_FIELD))
    if raw is None:
        return
    try:
        job = BrowserJob.model_validate_json(raw)
    except ValidationError:  # kept by a worker of another contract: the event still goes out
        log.warning("job %s: its kept job cannot be read; no webhook for this event", events.job_id)
        return
    _attach_webhook(state, events, job)


async def _settle(
    state: WorkerState, report: JobReport, events: JobEvents, *, unchanged: bool = False
) -> JobReport:
    """`settle` a report changed by a decision or an expiry, its webhook drained after."""
    try:
        return await settle(report, state.runtime, EventListener(events), unchanged=unchanged)
    finally:
        if events.webhook is not None:
            await events.webhook.close()


def _secret_inputs(state: WorkerState, job: BrowserJob) -> set[str]:
    """The job's inputs declared `secret: true` by any version of its script (a rollout picks
    the version later). A script that does not load keeps nothing in the clear: every input
    counts. Whatever went wrong is not this function's to report: the run's intake loads the
    script again and reports it as the job's outcome (a ScriptInvalid, or an internal error),
    where an exception raised here would leave the job `queued` with no event, for ever."""
    scripts = state.runtime.scripts
    try:
        return {
            name
            for version in scripts.versions(job.script_name)
            for name, spec in scripts.load(job.script_name, version).script.inputs.items()
            if spec.secret
        }
    except Exception:  # reported by the run, see above
        return set(job.inputs)


def _after_interruption(checkpoint: Checkpoint, run: int) -> ResumePoint:
    """An earlier run of this job left a checkpoint and died (killed, OOM, machine lost):
    go on after its last completed step, and say so in the report."""
    report = checkpoint.report
    report.interruptions.append(
        Interruption(
            detected_at=now(),
            run=run,
            last_checkpoint=checkpoint.last_step,
            resumed_at=checkpoint.next_step,
            checkpoint_at=checkpoint.at,
        )
    )
    log.warning("job %s: run %s takes over after step %s", report.job_id, run, checkpoint.last_step)
    return ResumePoint(
        report=report,
        step_id=checkpoint.next_step,
        outputs=checkpoint.outputs,
        storage_state=checkpoint.storage_state,
    )


class _OutcomeCounter:
    """Counts a job's outcome against its script version (worker/rollout.py) before the event
    that settles it goes out — so the next job is routed knowing it. The job's outcome stands
    whatever happens here."""

    def __init__(self, inner: RunListener, rollouts: Rollouts | None) -> None:
        self.inner = inner
        self.rollouts = rollouts

    async def step_changed(self, report: JobReport, step: StepReport) -> None:
        await self.inner.step_changed(report, step)

    async def job_changed(self, report: JobReport) -> None:
        if self.rollouts is not None and report.status.settled:
            try:
                await self.rollouts.record(report)
            except RedisError:
                log.exception("job %s: outcome not counted for the rollout", report.job_id)
        await self.inner.job_changed(report)


async def _run_tracked(
    state: WorkerState,
    job: BrowserJob,
    events: JobEvents,
    listener: RunListener,
    resume: ResumePoint | None = None,
    *,
    run: int = 1,
) -> JobReport:
    """run_job with the queue around it: abort flag, site slot, commit journal, job timeout,
    drift counters, and the right last word when the worker is stopped or fails."""
    redis, keys, job_id = state.redis, state.keys, job.job_id
    latest = _Latest(_OutcomeCounter(listener, state.runtime.rollouts))
    listener = latest

    token = state.taken.token if state.taken is not None else None
    # arq's mark is the queue entry's: a resume runs under its decision message's id.
    entry = queue_entry.get() or job_id
    if token is not None:
        # From here on, the run writes its steps' events and checkpoints only while the job is
        # still its own (a stalled run woken after a takeover writes nothing).
        events.outbox.fence = Fence(job_id, ARQ_IN_PROGRESS_PREFIX + entry, token)

    async def stop_check() -> str | None:
        # Between steps: an abort, or (in the same round trip) a job taken over by another
        # worker while this one stalled. The run stops before its next step writes anything.
        async with redis.pipeline(transaction=False) as pipe:
            pipe.get(keys.abort(job_id))
            pipe.get(ARQ_IN_PROGRESS_PREFIX + entry)
            reason, mark = await pipe.execute()
        if token is not None and mark not in (token.encode(), b"1"):
            raise TakenOver(f"job {job_id} was taken over by another worker")
        if reason is None:
            return None
        # Recorded as the job's error: redacted like a decision's note.
        return _redactor(state, job)(f"aborted: {_abort_reason(state, reason)}")

    def gate(loaded: LoadedScript) -> contextlib.AbstractAsyncContextManager[None]:
        return state.capacity.slot(loaded.script.site, loaded.registry.limits)

    settled: JobReport | None = None  # the run's report, once announced: then only bookkeeping
    try:
        journal = await RedisCommitJournal.open(redis, keys, job_id, token, entry)
        if run > MAX_TRIES:
            report = await _give_up(state, job, listener, resume, journal.previously_sent, run)
            await _after_run(state, job_id, report)
            return report
        # Our own limit, a little inside arq's: a job that overruns ends with a report and a
        # terminal event, instead of arq cancelling it silently with the record at "running".
        try:
            async with asyncio.timeout(
                max(1.0, state.settings.job_timeout_s - JOB_TIMEOUT_MARGIN_S)
            ):
                report = await run_job(
                    job,
                    state.runtime,
                    listener,
                    stop_check=stop_check,
                    gate=gate,
                    journal=journal,
                    resume=resume,
                    checkpoints=state.checkpoints(job_id, events.outbox),
                    hand_over_crashes=True,
                )
        except TimeoutError:
            log.warning("job %s: over FORMWORK_JOB_TIMEOUT", job_id)
            report = await fail_internally(
                job,
                TimeoutError(f"over the job timeout of {state.settings.job_timeout_s}s"),
                state.runtime,
                listener,
                code=FailureCode.timeout,
                last=latest.report,
                sent=(await RedisCommitJournal.open(redis, keys, job_id)).previously_sent,
            )
        settled = report
        if report.status == JobStatus.rejected and job.idempotency_key is not None:
            await _give_key_back(state, job_id, job.idempotency_key)
        await _count_drift(redis, keys, job.site, report)
        await _after_run(state, job_id, report)
        return report
    except (RedisConnectionError, RedisTimeoutError) as exc:
        if settled is None:
            raise await _hand_on(job_id, events, "lost Redis", exc) from exc
        # The job has ended and said so: losing Redis in its bookkeeping is no reason to run it
        # again, nor to announce it as queued after its last word.
        log.error("job %s: ended %s, then lost Redis (%s)", job_id, settled.status, exc)
        return settled
    except BrowserLost as exc:
        raise await _hand_on(job_id, events, "the browser crashed", exc) from exc
    except TakenOver:
        log.error("job %s: taken over by another worker; this run stops here", job_id)
        if state.taken is not None:
            state.taken.lost.add(job_id)  # arq must not write this run's end over the other's
        raise
    except Exception as exc:
        # A bug or an unexpected failure of ours: the job still ends with a report and a
        # terminal event, so no orchestrator waits forever on a job stuck at "running".
        log.exception("job %s: internal error", job_id)
        if settled is not None:
            return settled  # it had ended already: a second last word would contradict it
        sent: set[str] = set()
        with contextlib.suppress(RedisError):
            sent = (await RedisCommitJournal.open(redis, keys, job_id)).previously_sent
        # The artifact store failing (no folder, a full disk) is a code of its own, not a bug.
        stored = exc if isinstance(exc, ArtifactError) else None
        report = await fail_internally(
            job,
            exc,
            state.runtime,
            listener,
            code=stored.code if stored else FailureCode.script_error,
            message=stored.message if stored else None,
            last=latest.report,
            sent=sent,
        )
        with contextlib.suppress(RedisError):
            await _after_run(state, job_id, report)
        return report
    except asyncio.CancelledError:
        # Shutdown (or arq's job timeout) cancelled us mid-job. arq puts the job back on the
        # queue; say so, so a watcher knows it is not lost. (Cancelled once it had ended, its
        # next run only answers with the stored report: nothing to announce.)
        if settled is not None:
            raise
        with contextlib.suppress(Exception):
            await asyncio.shield(
                events.job(JobStatus.queued, message="worker stopped mid-job; it will run again")
            )
        raise
    finally:
        if events.webhook is not None:
            await events.webhook.close()


async def _hand_on(job_id: str, events: JobEvents, why: str, exc: Exception) -> Retry:
    """The page's renderer or the browser died (a retry on that page would fail the same way),
    or Redis dropped the run's connection (a restart, a failover: the run cannot keep its
    record). Neither is the job's outcome: back on the queue, it goes on from its last
    checkpoint in a fresh run and a new context, as after a worker that died — one of its 3
    runs. With Redis still gone, arq hands it on once Redis is back."""
    log.warning("job %s: %s (%s); it runs again from its last checkpoint", job_id, why, exc)
    with contextlib.suppress(RedisError):
        await events.outbox.flush()  # raises (and clears) what the run failed to write
    with contextlib.suppress(RedisError):
        await events.job(JobStatus.queued, message=f"{why} mid-job; it will run again")
    return Retry()


async def _give_up(
    state: WorkerState,
    job: BrowserJob,
    listener: RunListener,
    resume: ResumePoint | None,
    sent: set[str],
    run: int,
) -> JobReport:
    """Every run the job was given was cut short (its worker stopped past the shutdown grace,
    or died): it is not run again, and it ends with a report — from its last checkpoint — where
    arq would drop it with a log line, leaving it `queued` for ever. A commit it sent and never
    saw confirmed makes it wait for a person instead (`fail_internally`)."""
    last = resume.report if resume is not None else None
    if last is not None and last.interruptions:
        last.interruptions[-1].resumed_at = None  # it did not go on
    tries = run - 1
    log.warning("job %s: its %s runs were all cut short; not run again", job.job_id, tries)
    message = (
        f"each of the job's {tries} runs was cut short (its worker stopped or died, or its "
        "browser crashed): "
        "it is not run again"
    )
    return await fail_internally(
        job,
        RuntimeError(message),
        state.runtime,
        listener,
        message=message,
        last=last,
        sent=sent,
    )


async def _after_run(state: WorkerState, job_id: str, report: JobReport) -> None:
    """What a run's end leaves in Redis: an ended job forgets what it kept for a resume; a
    paused one gets its deadline, and an abort asked for while it ran."""
    if report.status.terminal:
        await _forget_kept(state, job_id)
    if report.status.paused and report.handoff and report.handoff.expires_at:
        # The pause's deadline, as a message any worker acts on when it falls due.
        due = report.handoff.expires_at
        await _schedule_expiry(state, job_id, due, int(due.timestamp() * 1000))
    if report.status.paused:
        await _abort_if_requested(state, job_id)


class _Latest:
    """Passes every transition on, keeping the report as it last stood: a run cut short (the
    job timeout, a bug of ours) is reported from it, steps and all."""

    def __init__(self, inner: RunListener) -> None:
        self.inner = inner
        self.report: JobReport | None = None

    async def step_changed(self, report: JobReport, step: StepReport) -> None:
        self.report = report
        await self.inner.step_changed(report, step)

    async def job_changed(self, report: JobReport) -> None:
        self.report = report
        await self.inner.job_changed(report)


async def _schedule_expiry(state: WorkerState, job_id: str, due: datetime, at_ms: int) -> None:
    await enqueue_message(
        state.redis,
        state.keys,
        message_id(job_id, "expire", at_ms),
        {"expire": job_id, "due": due.isoformat()},
        at_ms,
    )


async def _drop_expiry(state: WorkerState, job_id: str, handoff: HandoffRequest) -> None:
    """The pause is over (decided): its deadline's message, queued for when it falls due, is
    taken off the queue. It would change nothing then, but it would sit there until that day
    (a day by default), and keep a `--burst` worker from finding the queue empty."""
    if handoff.expires_at is None:
        return
    token = message_id(job_id, "expire", int(handoff.expires_at.timestamp() * 1000))
    async with state.redis.pipeline(transaction=True) as pipe:
        pipe.zrem(state.keys.queue, token)
        pipe.delete(ARQ_JOB_PREFIX + token)
        await pipe.execute()


async def _abort_if_requested(state: WorkerState, job_id: str) -> None:
    """An abort asked for while the job ran, which paused before it next looked: carried out
    now, as an abort decision — an operator who asked to stop the job should not find it
    waiting, and a flag left on a paused job would overturn whatever was decided next."""
    redis, keys = state.redis, state.keys
    reason = await redis.get(keys.abort(job_id))
    if reason is None:
        return
    paused = await read_pause(redis, keys, job_id)
    if not paused.waiting:
        return  # a decision came first (its claim dropped the flag)
    decision = abort_decision(_abort_reason(state, reason), by="abort request")
    claimed = await claim_decision(redis, keys, job_id, paused.seq, decision)
    log.info("job %s paused with an abort pending: abort decision %s", job_id, claimed)


async def _count_drift(redis: Redis, keys: Keys, site: str, report: JobReport) -> None:
    """Selector drift per site and element: where the registry needs its primary fixed."""
    drifted = [step.drift.element for step in report.steps if step.drift is not None]
    if drifted:
        async with redis.pipeline(transaction=False) as pipe:
            for element in drifted:
                pipe.hincrby(keys.drift(site), element, 1)
            await pipe.execute()


async def _forget_kept(state: WorkerState, job_id: str) -> None:
    # An ended job will not resume: its session and its secret inputs (sealed or not) have no
    # reason to outlive it, nor has an abort request (one set the raw way may have no expiry
    # until the next sweep gives it one).
    keys = state.keys
    async with state.redis.pipeline(transaction=False) as pipe:
        pipe.hdel(keys.job(job_id), CHECKPOINT_FIELD, JOB_FIELD)
        pipe.delete(keys.abort(job_id))
        await pipe.execute()


def _kept(job_id: str, raw: bytes, cipher: StateCipher | None) -> BrowserJob:
    job, lost = kept_job(raw, cipher)
    if lost:
        log.warning(
            "job %s: secret inputs %s were sealed under another FORMWORK_STATE_KEY (or none is "
            "set here): the job cannot go on with them",
            job_id,
            ", ".join(lost),
        )
    return job


async def execute_resume(
    state: WorkerState, message: ResumeMessage, arq_id: str, *, run: int = 1
) -> JobReport | None:
    """Carry out a decision about a paused job, on whichever worker took the message — if it
    is the decision claimed for the job's current pause (`claim_pause`); any other message
    about the job (a second one, a stale one, one queued around the client) changes nothing."""
    redis, keys = state.redis, state.keys
    job_id = message.resume
    paused = await read_pause(redis, keys, job_id)
    raw_job = await cast("Any", redis.hget(keys.job(job_id), JOB_FIELD))
    if paused.report is None or paused.status is None:
        # No record: a job that never was, or one whose record has expired. Nothing to carry
        # out, and nothing wrong with the worker (it was an error, with a traceback).
        log.warning("decision %s about unknown job %r: ignored", arq_id, job_id)
        return None
    report, status = paused.report, paused.status
    if raw_job is None:  # it ended, and dropped what it kept for a resume
        log.info("job %s is %s: decision ignored", job_id, status)
        return report
    checkpoint = await state.checkpoints(job_id).load()
    if run > 1 and not status.settled and checkpoint is not None:
        # The worker carrying out this decision died mid-run: go on from its checkpoint.
        job = _kept(job_id, raw_job, state.cipher)
        logs.bind_job(job.job_id, job.site, job.script_name)
        events = await JobEvents.open(redis, keys, job_id)
        _attach_webhook(state, events, job)
        resume = _after_interruption(checkpoint, run)
        return await _run_tracked(state, job, events, EventListener(events), resume, run=run)
    if not status.paused or report.handoff is None:
        log.info("job %s is %s, not paused: decision ignored", job_id, status)
        return report
    if message.pause != paused.seq or paused.claim != f"{paused.seq}|{arq_id}":
        log.warning("job %s: %s is not the decision taken for its pause; ignored", job_id, arq_id)
        if await _drop_own_claim(state, job_id, arq_id):
            # It holds the claim but names no pause, or another one (a wire-protocol message
            # without `pause`, or with a stale one): kept, the claim left the job deaf to
            # decisions and to its deadline.
            await _abort_if_requested(state, job_id)
        return report
    handoff = report.handoff
    job = _kept(job_id, raw_job, state.cipher)
    logs.bind_job(job.job_id, job.site, job.script_name)
    events = await JobEvents.open(redis, keys, job_id)
    _attach_webhook(state, events, job)
    aborted = await redis.get(keys.abort(job_id))
    if aborted is not None:
        # Asked after this decision was taken (taking it dropped any earlier request), before
        # it was carried out: the later word wins.
        await redis.delete(keys.abort(job_id))
        decision: ResumeDecision | None = abort_decision(
            _abort_reason(state, aborted), by="abort request"
        )
        why = None
    else:
        decision, why = _read_decision(state, message.decision, handoff)
    if decision is not None:
        decision = _recordable(state, job, decision)
    if why is not None:
        if decision is not None:
            record = DecisionRecord(
                decision=decision.decision,
                step_id=handoff.step_id,
                by=decision.by,
                at=now(),
                request=handoff,
            )
            report.decisions.append(record)
        return await _refuse(state, job_id, report, events, why, recorded=decision is not None)
    assert decision is not None  # read, and nothing against it
    if decision.inputs:
        job = job.model_copy(update={"inputs": {**job.inputs, **decision.inputs}})
    report.decisions.append(
        DecisionRecord(
            decision=decision.decision,
            step_id=handoff.step_id,
            by=decision.by,
            at=now(),
            note=decision.note,
            inputs_changed=sorted(decision.inputs),
            outputs_given=sorted(decision.outputs),
            request=handoff,
        )
    )
    listener = EventListener(events)
    if decision.decision in (Decision.reject, Decision.abort):
        rejected = decision.decision == Decision.reject
        report.status = JobStatus.rejected_by_approver if rejected else JobStatus.cancelled
        report.handoff = None
        report.error = Failure(
            code=FailureCode.rejected_by_approver if rejected else FailureCode.cancelled,
            message=f"{decision.decision} by {decision.by}"
            + (f": {decision.note}" if decision.note else ""),
            step_id=handoff.step_id,
        )
        await _forget_kept(state, job_id)
        await _drop_expiry(state, job_id, handoff)
        return await _settle(state, report, events)
    refusal = _refusal(state, job, report, decision)
    if refusal is not None:
        return await _refuse(state, job_id, report, events, refusal)
    await _drop_expiry(state, job_id, handoff)
    if decision.decision == Decision.mark_done:
        report.status, report.handoff, report.error = JobStatus.succeeded, None, None
        report.outputs.update(decision.outputs)
        _claims_done_by_hand(state, job, report, decision, step_id=handoff.step_id)
        await _forget_kept(state, job_id)
        return await _settle(state, report, events)
    point = ResumePoint(
        report=report,
        step_id=handoff.step_id,
        skip=decision.decision == Decision.skip_step,
        outputs=decision.outputs,
        storage_state=checkpoint.storage_state if checkpoint is not None else None,
    )
    return await _run_tracked(state, job, events, listener, resume=point)


def _unread(state: WorkerState, sent: Any) -> ResumeDecision | None:
    """What the record of a refused decision can say of one that does not validate (an
    `approve` carrying inputs, say, or a bare `"approve"`): its kind and who sent it. Without it
    the refusal was only in the worker's log, and the orchestrator saw the pause announced
    again with no reason."""
    if isinstance(sent, str):
        sent = {"decision": sent}
    if not isinstance(sent, dict):
        return None
    kind = sent.get("decision")
    if not isinstance(kind, str) or kind not in set(Decision):
        return None
    by = sent.get("by")
    if not isinstance(by, str) or not 0 < len(by) <= 200:
        by = "unknown"
    elif state.runtime.secrets.carried_in({"by": by}) is not None:
        by = "(withheld)"
    return ResumeDecision(decision=Decision(kind), by=by)


def _redactor(state: WorkerState, job: BrowserJob, *more: dict[str, Any]) -> Redactor:
    """Every secret `job` may carry: the configured ones, and the values of its inputs
    declared secret (and of those in `more`: corrected inputs)."""
    secret = _secret_inputs(state, job)
    typed = [
        str(value)
        for given in (job.inputs, *more)
        for name, value in given.items()
        if name in secret
    ]
    return Redactor([*state.runtime.secrets.values(), *typed])


def _recordable(state: WorkerState, job: BrowserJob, decision: ResumeDecision) -> ResumeDecision:
    """`decision` with its note and name redacted of the job's secret inputs (those it was
    sent with, and those the decision corrects), as everything else the job records is: a
    person may paste a customer's password into a note. A configured secret there has already
    been refused or withheld (`_read_decision`); the redactor knows those too."""
    redact = _redactor(state, job, decision.inputs)
    return decision.model_copy(
        update={"note": redact(decision.note), "by": redact(decision.by) or decision.by}
    )


def _read_decision(
    state: WorkerState, sent: Any, handoff: HandoffRequest
) -> tuple[ResumeDecision | None, str | None]:
    """The decision a message carries, and why it cannot be carried out at all (None when it
    can be tried). The client checks all this before it claims a pause; a message sent around
    it is checked here, so that it is refused instead of holding the pause for ever."""
    try:
        decision = ResumeDecision.model_validate(sent)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'decision'}: {e['msg']}" for e in exc.errors()
        )
        return _unread(state, sent), f"invalid decision: {problems}"
    if decision.decision not in handoff.allowed_decisions:
        allowed = ", ".join(handoff.allowed_decisions)
        return decision, f"{decision.decision} is not a decision this pause takes ({allowed})"
    secrets = state.runtime.secrets
    in_note = secrets.carried_in({"note": decision.note or ""})
    in_by = secrets.carried_in({"by": decision.by})
    carried = in_note or in_by
    if carried is not None:
        # Its note and name are shown to every operator and orchestrator: never stored (only
        # the one that carries it: an operator's name stays beside a note withheld). An
        # abort is still carried out (stopping must always be possible); any other decision
        # is refused, to be sent again without it.
        withheld = decision.model_copy(
            update={
                "by": "(withheld)" if in_by else decision.by,
                "note": WITHHELD if in_note else decision.note,
            }
        )
        if decision.decision == Decision.abort:
            return withheld, None
        return withheld, f"its {carried} carries the value of a configured secret"
    return decision, None


async def _refuse(
    state: WorkerState,
    job_id: str,
    report: JobReport,
    events: JobEvents,
    why: str,
    *,
    recorded: bool = True,
) -> JobReport:
    """A decision refused: why, on the record of it (`recorded`: the report's last decision),
    and the pause announced again under a new `seq`, free for the next decision."""
    assert report.handoff is not None
    log.warning("job %s: decision refused: %s", job_id, why)
    if recorded:
        report.decisions[-1].note = f"refused: {why}"
    expires_at = report.handoff.expires_at
    settled = await _settle(state, report, events, unchanged=True)
    if expires_at is not None and expires_at <= now():
        # Its deadline fell due while the decision was pending, and the expiry stood aside
        # for it: the pause is over now.
        await _schedule_expiry(state, job_id, expires_at, int(time.time() * 1000))
    return settled


def _refusal(
    state: WorkerState, job: BrowserJob, report: JobReport, decision: ResumeDecision
) -> str | None:
    """Why the job cannot go on as decided, or None. Everything the run's intake would refuse
    is checked here first: a refused decision leaves the job paused with the refusal on
    record, never a fresh `rejected` report in place of the job's own."""
    secrets = state.runtime.secrets
    try:
        # First: a schema error quotes the value it refuses, and this value is a secret.
        refuse_carried(secrets, job)
        secrets.refuse_carried(decision.outputs, "outputs")
        version = report.script_version or job.script_version  # the one it started on
        if decision.outputs:
            loaded = state.runtime.scripts.load(job.script_name, version)
            refused = loaded.refused_outputs(decision.outputs)
            if refused is not None:
                return refused
        if decision.decision != Decision.mark_done:  # nothing runs for mark_done
            intake(job, state.runtime, version)
    except RejectedError as exc:
        return exc.message
    return None


def _claims_done_by_hand(
    state: WorkerState,
    job: BrowserJob,
    report: JobReport,
    decision: ResumeDecision,
    *,
    step_id: str | None,
) -> None:
    """A person says the effect happened and supplies the outputs the job could not read: the
    effect's sentence is told again with them, and each is a claim of its own, both verified
    by that person (`manual`), never by the site."""
    loaded = state.runtime.scripts.load(job.script_name, report.script_version or None)
    inputs = loaded.validate_inputs(job.inputs)
    effect = loaded.script.effect
    if effect is not None and not any(c.kind == "effect" for c in report.claims):
        # The job stopped before its commit was sent; the person did it by hand.
        commits = [s for s in report.steps if s.commit]
        claim = Claim(
            kind="effect", name=loaded.name, value="", verified=True, how=Verification.manual
        )
        claim.step_id = commits[-1].id if commits else step_id
        report.claims.append(claim)
    for claim in report.claims:
        if claim.kind == "effect":
            claim.verified, claim.how = True, Verification.manual
            if effect is not None:
                claim.value = effect_text(effect, inputs, report.outputs)
    given = decision.outputs
    report.claims = [c for c in report.claims if not (c.kind == "output" and c.name in given)]
    report.claims += [
        Claim(
            kind="output",
            name=name,
            value=value,
            verified=True,
            how=Verification.manual,
            source=f"given by {decision.by}",
            step_id=step_id,
        )
        for name, value in given.items()
    ]


async def execute_expire(
    state: WorkerState, message: ExpireMessage, arq_id: str
) -> JobReport | None:
    """A pause's deadline fell due: end the job `expired` unless a decision came first."""
    redis, keys = state.redis, state.keys
    job_id = message.expire
    paused = await read_pause(redis, keys, job_id)
    report, status = paused.report, paused.status
    if report is None or status is None:
        return None
    handoff = report.handoff
    # Only the pause this message was scheduled for: a later pause has its own deadline.
    if not status.paused or handoff is None or handoff.expires_at is None:
        return report
    if handoff.expires_at.isoformat() != message.due:
        return report
    # Claimed like a decision: a decision taken before now is carried out, not expired.
    claimed = await claim_pause(redis, keys, job_id, paused.seq, arq_id)
    if claimed == PauseClaim.decided and paused.claim == f"{paused.seq}|{arq_id}":
        # This message claimed the pause in a run that ended before the job did (its worker
        # killed, a Redis error): it goes on. Stood aside as if another decision held the
        # pause, it left the job paused for ever, past its deadline, deaf to decisions.
        claimed = PauseClaim.claimed
    if claimed == PauseClaim.decided and await _drop_unqueued_claim(state, job_id):
        claimed = await claim_pause(redis, keys, job_id, paused.seq, arq_id)
    if claimed != PauseClaim.claimed:
        return report
    raw_job = await cast("Any", redis.hget(keys.job(job_id), JOB_FIELD))
    job = _kept(job_id, raw_job, state.cipher) if raw_job is not None else None
    await _forget_kept(state, job_id)
    report.status = JobStatus.expired
    report.error = Failure(
        code=FailureCode.timeout,
        message=f"no decision before the pause deadline ({handoff.expires_at.isoformat()})",
        step_id=handoff.step_id,
    )
    events = await JobEvents.open(redis, keys, job_id)
    if job is not None:
        logs.bind_job(job.job_id, job.site, job.script_name)
        _attach_webhook(state, events, job)
    return await _settle(state, report, events)


# KEYS: the job's arq mark, its record. ARGV: the run's worker token, the field, the time. The
# commit is noted, and may be sent, only while the mark is this worker's (or arq's own `1`,
# before it was made ours): a mark that is gone or another's means the job was taken over.
_NOTE_COMMIT = """
local mark = redis.call('GET', KEYS[1])
if mark ~= ARGV[1] and mark ~= '1' then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return 1
"""


class RedisCommitJournal:
    """Commit steps ever sent for a job, kept in its record (`commit:<step id>` fields). With
    the run's worker `token`, it is also the fence against a second run of the job: a worker
    whose job was taken over (`worker.handback`) is refused before its commit goes out."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        job_id: str,
        previously_sent: set[str],
        token: str | None = None,
        entry: str | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.job_id = job_id
        self.previously_sent = previously_sent
        self.token = token
        self.entry = entry or job_id  # the queue entry the run is under (arq's mark's)

    @classmethod
    async def open(
        cls,
        redis: Redis,
        keys: Keys,
        job_id: str,
        token: str | None = None,
        entry: str | None = None,
    ) -> RedisCommitJournal:
        fields = await cast("Any", redis.hkeys(keys.job(job_id)))
        sent = {f.decode().removeprefix("commit:") for f in fields if f.startswith(b"commit:")}
        return cls(redis, keys, job_id, sent, token, entry)

    async def sent(self, step_id: str) -> None:
        at_ms = str(int(time.time() * 1000))
        record, field = self.keys.job(self.job_id), f"commit:{step_id}"
        if self.token is None:  # arq's own Worker: no token, no takeover either
            await cast("Any", self.redis.hset(record, field, at_ms))
            return
        note: Any = self.redis.register_script(_NOTE_COMMIT)
        mark = ARQ_IN_PROGRESS_PREFIX + self.entry
        if not await note(keys=[mark, record], args=[self.token, field, at_ms]):
            raise TakenOver(f"job {self.job_id} was taken over before its commit {step_id}")


def _parse(job_id: str, payload: Any) -> BrowserJob:
    if isinstance(payload, dict) and MALFORMED in payload:
        field = str(payload.get(MALFORMED_FIELD) or "payload")
        raise JobInvalid(f"payload rejected: {payload[MALFORMED]}", field=field)
    try:
        job = BrowserJob.model_validate(payload)
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(p) for p in e['loc']) or '(payload)'}: {e['msg']}" for e in exc.errors()
        ]
        first = ".".join(str(p) for p in exc.errors()[0]["loc"]) or "payload"
        raise JobInvalid("payload rejected: " + "; ".join(problems), field=first) from exc
    if job.job_id != job_id:
        raise JobInvalid(
            f"payload job_id {job.job_id!r} differs from the queue's job id {job_id!r}",
            field="job_id",
        )
    return job


def _correlation(payload: Any) -> dict[str, str]:
    value = payload.get("correlation") if isinstance(payload, dict) else None
    if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
        return {str(k): v for k, v in value.items()}
    return {}


async def on_job_start(ctx: dict[str, Any]) -> None:
    # arq logs a job's start and end lines from the task it runs this hook in: bound here, they
    # name the job like every other line (`bind_job` adds site and script once it is read).
    logs.job_id.set(job_of(str(ctx["job_id"])))


# KEYS: the queue. Scores arq cannot take, written by a wire-protocol client by hand, become
# 1 ms: due, and first in line. arq converts a score to an int outside its error handling, so
# `-inf` killed the worker (and every worker after it, while the entry stayed queued); it reads
# a score of 0 as "not queued" and left such a job there, never run, for ever.
_MEND_SCORES = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', 0)
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], 'XX', 1, id) end
return #ids
"""


class _Worker(Worker):
    """arq's Worker, minding queue entries it would choke on before it reads them, and
    remembering the jobs it takes until their end is written (`worker.handback`)."""

    def __init__(self, *args: Any, taken: TakenJobs, keys: Keys, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.taken = taken
        self.keys = keys

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        if job_ids:
            mend: Any = self.pool.register_script(_MEND_SCORES)
            if await mend(keys=[self.queue_name]):
                log.warning("queue %s: entries scored 0 or below are due now", self.queue_name)
        readable = []
        for job_id in job_ids:
            try:
                job_id.decode()
            except UnicodeDecodeError:
                # arq decodes it outside its error handling: the worker died, and every worker
                # after it, at once, for as long as it stayed queued. No job can have it for
                # an id, so there is no record to report it in: it goes, and is logged.
                log.error("queue %s: entry %r is not UTF-8; taken off", self.queue_name, job_id)
                async with self.pool.pipeline(transaction=True) as pipe:
                    pipe.zrem(self.queue_name, job_id)
                    pipe.delete(ARQ_JOB_PREFIX.encode() + job_id)
                    await pipe.execute()
                continue
            readable.append(job_id)
        await super().start_jobs(readable)

    async def run_job(self, job_id: str, score: int) -> None:
        await self.taken.take(self.pool, self.keys, job_id)
        await self._run_job(job_id, score)
        # Not reached when writing its end failed.
        await self.taken.seen_through(self.pool, self.keys, job_id)

    async def finish_job(self, job_id: str, *args: Any, **kwargs: Any) -> None:
        if job_id in self.taken.lost:
            # Taken over: arq's end for this run would drop the other worker's mark and take
            # the job off the queue under it.
            self.taken.lost.discard(job_id)
            return
        await super().finish_job(job_id, *args, **kwargs)

    def lost_redis(self) -> None:
        """Redis went away under this worker: runs that are still going (their page is gone
        with the browser, so they end soon) are given a moment; one that does not end is not
        handed back when the next worker connects."""
        running = {job_id for job_id, task in self.tasks.items() if not task.done()}
        if running:
            tasks = [self.tasks[job_id] for job_id in running]
            self.loop.run_until_complete(asyncio.wait(tasks, timeout=LOST_REDIS_GRACE_S))
            running = {job_id for job_id, task in self.tasks.items() if not task.done()}
        self.taken.still_running(running)

    async def _run_job(self, job_id: str, score: int) -> None:
        try:
            await super().run_job(job_id, score)
        except ResponseError as exc:
            # arq reads a job's envelope and counts its try outside its error handling: an
            # `arq:job:<id>` of another type than a string, or an `arq:retry:<id>` that is not
            # a number (written by hand), raised out of the poll loop and restarted the worker,
            # again each time the entry fell due.
            if "not an integer" in str(exc):
                # The count alone is unreadable: it starts again, and the job runs.
                log.error("job %s: its try count cannot be read (%s); reset", job_id, exc)
                drop = [ARQ_RETRY_PREFIX + job_id, ARQ_IN_PROGRESS_PREFIX + job_id]
                await self.pool.delete(*drop)
                return
            if "WRONGTYPE" not in str(exc):
                raise
            log.error(
                "queue %s: job %s cannot be read (%s); taken off", self.queue_name, job_id, exc
            )
            async with self.pool.pipeline(transaction=True) as pipe:
                pipe.zrem(self.queue_name, job_id)
                pipe.delete(ARQ_IN_PROGRESS_PREFIX + job_id)
                await pipe.execute()


def build_worker(
    settings: Settings,
    *,
    browser: BrowserHost | None = None,
    burst: bool = False,
    handle_signals: bool = True,
    taken: TakenJobs | None = None,
    metrics: WorkerMetrics | None = None,
) -> _Worker:
    """An arq Worker for `settings` (tests pass a shared browser and handle_signals=False).
    `formwork worker` passes the same `taken`, and the previous worker's `metrics` (its
    `ctx["metrics"]`, once started), to each worker it builds after losing Redis."""
    keys = Keys(settings.key_prefix)
    taken = taken or TakenJobs()
    return _Worker(
        functions=[func(browser_job, name=JOB_FUNCTION)],
        queue_name=keys.queue,
        redis_settings=redis_settings(settings.redis_url),
        on_startup=startup,
        on_shutdown=shutdown,
        on_job_start=on_job_start,
        ctx={"settings": settings, "browser": browser, "taken": taken, "metrics": metrics},
        taken=taken,
        keys=keys,
        burst=burst,
        handle_signals=handle_signals,
        max_jobs=settings.max_jobs,
        job_timeout=settings.job_timeout_s,
        poll_delay=settings.poll_delay_s,
        job_completion_wait=settings.shutdown_grace_s,
        keep_result=3600,
        job_serializer=dumps,
        job_deserializer=loads,
        # A job whose run was interrupted goes back on the queue a bounded number of times.
        # One more than a job's runs: the last delivery only settles it (`_give_up`).
        max_tries=MAX_TRIES + 1,
    )


# REDIS_URL's query settings that arq's own `RedisSettings.from_dsn` drops (it reads `db` only),
# by the name of arq's field: without them a worker connected unlike the commands, which read
# the URL with redis-py (a `rediss://…?ssl_cert_reqs=none` the commands used, workers refused).
_ARQ_QUERY: dict[str, tuple[str, Callable[[str], object]]] = {
    "username": ("username", str),
    "password": ("password", str),
    "ssl_cert_reqs": ("ssl_cert_reqs", str),
    "ssl_ca_certs": ("ssl_ca_certs", str),
    "ssl_certfile": ("ssl_certfile", str),
    "ssl_keyfile": ("ssl_keyfile", str),
    "ssl_check_hostname": (
        "ssl_check_hostname",
        lambda v: v.upper() not in ("", "0", "F", "FALSE", "N", "NO"),  # as redis-py reads it
    ),
    "socket_connect_timeout": ("conn_timeout", lambda v: max(1, math.ceil(float(v)))),
}


def redis_settings(url: str) -> RedisSettings:
    """arq's connection settings for `url`, with the query settings it has a field for; any
    other (bar `db`) is named in the log (never its value), as workers do not use it."""
    found = RedisSettings.from_dsn(url)
    extra: dict[str, Any] = {}
    for name, values in parse_qs(urlsplit(url).query).items():
        if name in _ARQ_QUERY:
            field_name, read = _ARQ_QUERY[name]
            extra[field_name] = read(values[-1])
        elif name != "db":
            log.warning("REDIS_URL: %s= is not used by workers (arq has no such setting)", name)
    return replace(found, **extra)


class WorkerSettings:
    """For `arq worker.queue.WorkerSettings`: the worker configured from the environment, but
    run by arq's own `Worker`, without `_Worker`'s guards against entries arq cannot read."""

    _settings = Settings.from_env()
    functions = (func(browser_job, name=JOB_FUNCTION),)
    queue_name = Keys(_settings.key_prefix).queue
    redis_settings = redis_settings(_settings.redis_url)
    on_startup = startup
    on_shutdown = shutdown
    on_job_start = on_job_start
    max_jobs = _settings.max_jobs
    job_timeout = _settings.job_timeout_s
    poll_delay = _settings.poll_delay_s
    job_completion_wait = _settings.shutdown_grace_s
    keep_result = 3600
    job_serializer = dumps
    job_deserializer = loads
    max_tries = MAX_TRIES + 1


@contextlib.asynccontextmanager
async def running_worker(settings: Settings, browser: BrowserHost) -> AsyncIterator[Worker]:
    """Run a worker inside the current event loop (tests, benchmarks, the demo)."""
    worker = build_worker(settings, browser=browser, handle_signals=False)
    task = asyncio.create_task(worker.async_run())
    try:
        yield worker
    finally:
        # Stop taking jobs, let running ones finish, then stop the poll loop and clean up.
        worker.allow_pick_jobs = False
        running = [t for t in worker.tasks.values() if not t.done()]
        if running:
            await asyncio.wait(running, timeout=60)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with contextlib.suppress(asyncio.CancelledError):
            await worker.close()
