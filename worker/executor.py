"""Run one job: intake (script, inputs, secrets), then the steps in order on a fresh context.

Data flows one way: BrowserJob → LoadedScript → steps → screenshots → JobReport. Every step
transition is reported to a `RunListener` as it happens (the CLI prints it; the queue turns it
into events), and the report on disk is the same object the listener saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import Any, Protocol
from urllib.parse import urlsplit

from playwright.async_api import BrowserContext, CDPSession, Page
from playwright.async_api import Error as PlaywrightError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from worker import logs
from worker.actions import Extracted, PageActions
from worker.artifacts import ArtifactStore
from worker.audit import step_mark
from worker.browser import BrowserHost
from worker.checkpoint import Checkpoint, Checkpoints, storage_state
from worker.contract import (
    Attempt,
    BrowserJob,
    Claim,
    Decision,
    Failure,
    FailureCode,
    JobReport,
    JobStatus,
    MatchedSelector,
    RuleAction,
    RuleFired,
    SelectorDrift,
    StepReport,
    StepStatus,
    Verification,
    WouldSubmit,
)
from worker.downloads import Downloads
from worker.errors import ArtifactError, BrowserLost, RejectedError, SecretMissing, StepError
from worker.evidence import IMAGE_SUFFIX, capture, echo_mask_script, measure
from worker.failures import classify, detectors_seen, observe_page, translate_playwright_error
from worker.guard import Guard
from worker.handoff import approval_request, handoff_request
from worker.har import scrub
from worker.policy import Rule, retry_wait_s, rule_for
from worker.rollout import Rollouts, Route, route
from worker.script import (
    PAUSE_TIMEOUT_S,
    ClickStep,
    ExpectStep,
    ExtractStep,
    GotoStep,
    LoadedScript,
    PlannedStep,
    PressStep,
    ScreenshotStep,
    ScriptStore,
)
from worker.secretstore import ENV_PREFIX, Redactor, SecretStore
from worker.sendonce import sent_once
from worker.templating import TemplateError, holds, references, render
from worker.trace import job_trace

log = logging.getLogger("formwork.executor")


class RunListener(Protocol):
    """Told about every transition, in order, as it happens."""

    async def step_changed(self, report: JobReport, step: StepReport) -> None: ...

    async def job_changed(self, report: JobReport) -> None: ...


class NullListener:
    async def step_changed(self, report: JobReport, step: StepReport) -> None:
        return None

    async def job_changed(self, report: JobReport) -> None:
        return None


@dataclass
class Runtime:
    """The long-lived things every job run uses."""

    scripts: ScriptStore
    browser: BrowserHost
    artifacts: ArtifactStore
    secrets: SecretStore
    # Called on each job's context before its first step (replay serves a HAR through it).
    context_setup: Callable[[BrowserContext], Awaitable[None]] | None = None
    uploads: Path | None = None  # the only directory upload steps may take files from
    # Routes unpinned jobs with the rollout state in Redis; without it, by the rollout file.
    rollouts: Rollouts | None = None
    # A commit's requests are sent by Playwright, never resent (`worker.sendonce`); off where
    # nothing reaches a site (a replay answered from its HAR).
    send_once: bool = True


class CommitJournal(Protocol):
    """Remembers, outside the worker, which commit steps of a job were ever sent — so a job
    run again after its worker died checks the site before sending anything twice."""

    previously_sent: set[str]

    async def sent(self, step_id: str) -> None: ...


# Asked between steps; returning a reason stops the job as `cancelled`.
StopCheck = Callable[[], Awaitable[str | None]]
# Entered after intake and before any browser work (the per-site capacity slot).
Gate = Callable[[LoadedScript], AbstractAsyncContextManager[None]]


def now() -> datetime:
    return datetime.now(UTC)


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 1)


async def run_job(
    job: BrowserJob,
    runtime: Runtime,
    listener: RunListener | None = None,
    *,
    stop_check: StopCheck | None = None,
    gate: Gate | None = None,
    journal: CommitJournal | None = None,
    resume: ResumePoint | None = None,
    checkpoints: Checkpoints | None = None,
    hand_over_crashes: bool = False,
) -> JobReport:
    """Execute `job` end to end and return its report (also written to the artifacts).

    With `resume`, continue a job's report at a step — the one a person decided about, or the
    one after the last checkpoint of a run that died — in a fresh context: restore the session
    (or sign in again), rebuild that step's page, and go on from there. With `checkpoints`,
    leave a checkpoint after every completed step. With `hand_over_crashes`, a step whose
    renderer or browser died is not retried on the dead page: `BrowserLost` is raised, the
    job unsettled, for a fresh run to go on from the last checkpoint.
    """
    listener = listener or NullListener()
    started = time.perf_counter()
    logs.bind_job(job.job_id, job.site, job.script_name)
    report = _new_report(job, runtime, JobStatus.running)
    reason = await stop_check() if stop_check is not None else None
    if reason is not None:
        report.status = JobStatus.cancelled
        report.error = Failure(code=FailureCode.cancelled, message=reason)
        return await _finish(report, started, runtime, listener)
    chosen: Route | None = None
    try:
        refuse_carried(runtime.secrets, job)  # before routing, which names the script
        chosen = await route(
            job, runtime.scripts, runtime.rollouts, resume.report if resume else None
        )
        loaded, inputs, secrets = intake(job, runtime, chosen.version)
    except RejectedError as exc:
        if resume is not None:
            return await _held_at_intake(job, resume, exc, runtime, listener, started)
        # As the queue does (worker.queue.execute): a correlation (or script) refused for
        # carrying a secret is not written back into the report that refuses it.
        field = (exc.field or "").split(".")[0]
        correlation = {} if field == "correlation" else job.correlation
        # Only a name that carries a secret goes: an unknown script is refused under its name
        # too (field `script`), and is counted and shown under it.
        carried = runtime.secrets.carried_in({"script": job.script}) is not None
        script = "" if carried else job.script_name
        # Routed, it is refused by a version of its own (a canary's inputs may differ from
        # stable's): the report, stats and metrics name it, as they do every run's.
        # Never a version no file has (a pin to @9): the label would be the payload's to pick.
        if carried or exc.code == FailureCode.script_not_found:
            chosen = None
        return await reject(
            job.job_id, script, exc, runtime, listener, correlation=correlation, route=chosen
        )

    if resume is not None:
        report = resume.report
        report.status, report.error, report.handoff = JobStatus.running, None, None
        report.ended_at = None
    else:
        report.steps = [
            StepReport(id=p.id, action=p.action, commit=p.step.commit) for p in loaded.plan
        ]
    report.script_version = loaded.script.version
    report.routing = chosen.routing
    report.inputs = loaded.redacted_inputs(inputs)
    await listener.job_changed(report)

    report.script_digest = loaded.digest
    report.dry_run = job.dry_run
    async with gate(loaded) if gate is not None else nullcontext():
        record = job.har if job.har is not None else loaded.script.har
        har, har_key = runtime.artifacts.har_file(job.job_id) if record else (None, None)
        hosts = loaded.registry.allowed_hosts
        job_page = await runtime.browser.open_page(
            resume.storage_state if resume else None, record_har=har, hosts=hosts
        )
        context = job_page.context
        # What the page sends out or names may hold a typed secret, inputs declared secret
        # among them (the log's own redactor knows only the configured ones).
        redact = Redactor([*secrets.values(), *loaded.secret_inputs(inputs).values()])
        downloads = Downloads(runtime.artifacts.downloads_dir(job.job_id), redact)
        downloads.watch(job_page.page)
        actions: PageActions | None = None
        try:
            guard = Guard(hosts, redact)
            if job_page.hosts != guard.hosts:
                # The allowlist is the context's proxy (worker.guard): never drive one without.
                raise RuntimeError(f"job page made for hosts {job_page.hosts}, not {guard.hosts}")
            guard.watch(context)
            if runtime.context_setup is not None:
                await runtime.context_setup(context)
            context.set_default_timeout(loaded.script.timeout_ms)
            actions = PageActions(
                job, loaded, inputs, secrets, job_page.page, uploads=runtime.uploads
            )
            run = _Run(
                job,
                loaded,
                runtime,
                report,
                listener,
                actions,
                job_page.cdp,
                journal,
                checkpoints,
                context,
                guard,
                hand_over_crashes=hand_over_crashes,
            )
            echoes = echo_mask_script(run.redact.values)
            if echoes is not None:
                await context.add_init_script(echoes)  # every document the job loads
            async with job_trace(
                context,
                job.trace or loaded.script.trace,
                runtime.artifacts.trace_file(job.job_id),
                # Every value, short ones too: the trace finds those where they stand whole.
                [*secrets.values(), *loaded.secret_inputs(inputs).values()],
                failed=lambda: report.status != JobStatus.succeeded,
            ):
                if resume is not None:
                    await run.resume(resume, stop_check)
                else:
                    await run.steps(stop_check)
            # Only a job that ran its course waits for its downloads: one cut short (the job
            # timeout, a shutdown) must end now, not up to Downloads.SETTLE_S later — past the
            # timeout's margin, arq would cancel it with no report.
            await downloads.settle()
        except PlaywrightError as exc:
            # Outside a step (the context's setup, its trace): a page or browser that died is
            # handed over as one a step finds dead; anything else is the worker's to report.
            lost = translate_playwright_error(exc, doing="setting up the job's page")
            if hand_over_crashes and lost.code == FailureCode.browser_crashed:
                raise BrowserLost(lost.message) from exc
            raise
        finally:
            if actions is not None:
                await actions.discard_uploads()
            if har is None:
                # Nothing in the report waits for the close: it goes on in the background.
                runtime.browser.release(job_page)
            else:
                # The HAR is written as the context closes, and scrubbed before the report
                # names it.
                await runtime.browser.close_page(job_page)
            if har is not None and har.is_file():
                named = {**secrets, **loaded.secret_inputs(inputs)}
                await asyncio.to_thread(scrub, har, named)
                if report.artifacts is not None:
                    report.artifacts.har = har_key
    return await _finish(report, started, runtime, listener)


async def _nothing() -> None:
    return None


async def reject(
    job_id: str,
    script: str,
    error: RejectedError,
    runtime: Runtime,
    listener: RunListener | None = None,
    *,
    correlation: dict[str, str] | None = None,
    route: Route | None = None,
) -> JobReport:
    """The report of a job refused before any browser work; `route`: the script version it
    was routed to, when it got that far."""
    log.info("job %s rejected: %s", job_id, error.code)
    report = JobReport(
        job_id=job_id,
        status=JobStatus.rejected,
        script=script,
        script_version=route.version if route is not None else None,
        routing=route.routing if route is not None else None,
        correlation=correlation or {},
        started_at=now(),
        artifacts=runtime.artifacts.describe(job_id),
        error=error.to_failure(),
    )
    return await _finish(report, time.perf_counter(), runtime, listener or NullListener())


async def _held_at_intake(
    job: BrowserJob,
    resume: ResumePoint,
    error: RejectedError,
    runtime: Runtime,
    listener: RunListener,
    started: float,
) -> JobReport:
    """A job under way that this worker cannot take up again (its script version is not here,
    a secret is missing here) waits for a person with its report as it was. Refused like a new
    job, its record would be replaced by an empty one, and the steps it did (a commit maybe
    among them) would be lost from it. Once the worker is put right, `retry_step` goes on."""
    log.warning("job %s: cannot be taken up again here: %s", job.job_id, error.code)
    report = resume.report
    failure = error.to_failure()
    failure.step_id = resume.step_id
    status = JobStatus.paused_for_handoff
    report.status, report.error = status, failure
    why = f"this worker could not take the job up again ({error.message})"
    report.handoff = handoff_request(report, failure, status, [], why)
    wait_s = job.pause_timeout_s or PAUSE_TIMEOUT_S
    report.handoff.expires_at = now() + timedelta(seconds=wait_s)
    return await _finish(report, started, runtime, listener)


async def settle(
    report: JobReport, runtime: Runtime, listener: RunListener, *, unchanged: bool = False
) -> JobReport:
    """Write and announce a report changed without running anything (a decision). With
    `unchanged` (a refused decision: the job waits as before), its end time stays as it was,
    so it is not counted as settling a second time."""
    if unchanged:
        runtime.artifacts.write_report(report)
        await runtime.artifacts.record(report)
        await listener.job_changed(report)
        return report
    return await _finish(report, time.perf_counter(), runtime, listener)


@dataclass
class ResumePoint:
    """Where a job goes on: its report, the step to go on at (None: every step is done), and
    what the last checkpoint kept of the browser (the session, the page it was on)."""

    report: JobReport
    step_id: str | None
    skip: bool = False
    outputs: dict[str, str] = field(default_factory=dict)
    storage_state: dict[str, Any] | None = None


def _new_report(job: BrowserJob, runtime: Runtime, status: JobStatus) -> JobReport:
    return JobReport(
        job_id=job.job_id,
        status=status,
        script=job.script_name,
        script_version=job.script_version,
        correlation=job.correlation,
        started_at=now(),
        artifacts=runtime.artifacts.describe(job.job_id),
    )


async def fail_internally(
    job: BrowserJob,
    error: Exception,
    runtime: Runtime,
    listener: RunListener,
    *,
    code: FailureCode = FailureCode.script_error,
    message: str | None = None,
    last: JobReport | None = None,
    sent: Iterable[str] = (),
) -> JobReport:
    """The report of a job the worker itself ended: a bug, the job timeout, or runs all cut
    short (`message`, when given, says why in place of the generic words).

    `last` is the run's report as it last stood: its steps stay on record, the one running
    marked failed. A commit step among `sent` (the commit journal's) that the report does not
    show confirmed may have taken effect: the job then waits for a person to look
    (`outcome_unknown`), never a bare `failed` an orchestrator would retry into a second one."""
    failure = Failure(
        code=code,
        message=message
        or (
            str(error)
            if code == FailureCode.timeout
            else f"internal error in the worker: {type(error).__name__}"
        ),
    )
    if last is None or last.status.settled:
        report = _new_report(job, runtime, JobStatus.failed)
        report.error = failure
        return await _finish(report, time.perf_counter(), runtime, listener)
    report = last.model_copy(deep=True)
    for step in report.steps:
        if step.status == StepStatus.running:
            step.status = StepStatus.failed
            step.failure = failure.model_copy(update={"step_id": step.id})
            failure.step_id = step.id
        elif step.status == StepStatus.pending:
            step.status = StepStatus.skipped
    sent_ids = set(sent)
    unconfirmed = [
        s
        for s in report.steps
        if s.commit and s.id in sent_ids and s.status != StepStatus.succeeded
    ]
    if unconfirmed:
        step_id = unconfirmed[-1].id
        failure = Failure(
            code=FailureCode.outcome_unknown,
            message=f"{step_id} was sent to the site, then the worker ended the job "
            f"({failure.message}): whether it took effect is not known",
            step_id=step_id,
        )
        status = JobStatus.paused_for_handoff
        report.status, report.error = status, failure
        report.handoff = handoff_request(report, failure, status, [])
        wait_s = job.pause_timeout_s or PAUSE_TIMEOUT_S
        report.handoff.expires_at = now() + timedelta(seconds=wait_s)
    else:
        report.status, report.error = JobStatus.failed, _after_confirmed_commit(report, failure)
    return await _finish(report, time.perf_counter(), runtime, listener)


def _after_confirmed_commit(report: JobReport, failure: Failure) -> Failure:
    """`failure`, saying so when it came after a commit the site confirmed. The job is
    `failed` (a later step did not work: an output not read, say), but its effect exists:
    whoever reads "failed" and a retryable code must not run it again for a second one."""
    done = [s.id for s in report.steps if s.commit and s.status == StepStatus.succeeded]
    if not done:
        return failure
    after = (
        f"after {done[-1]} was confirmed by the site: its effect exists, and running the job "
        "again would repeat it"
    )
    return failure.model_copy(update={"message": f"{failure.message} ({after})"})


def refuse_carried(secrets: SecretStore, job: BrowserJob) -> None:
    """JobInvalid when anything the job was sent with carries a configured secret's value:
    its id (a folder, a key, in every event), script, inputs, correlation, idempotency key,
    site and webhook addresses — each is stored and shown in the clear."""
    secrets.refuse_carried({"job_id": job.job_id}, "")
    secrets.refuse_carried(job.inputs)
    secrets.refuse_carried(job.correlation, "correlation")
    named = {
        # A script name is letters, digits and `_`, as many a token is: it names the job's
        # folder in reports, events, metrics labels and the unknown-script error.
        "script": job.script,
        "idempotency_key": job.idempotency_key,
        "site_url": job.site_url,
        "webhook.url": job.webhook.url if job.webhook is not None else None,
    }
    secrets.refuse_carried({k: v for k, v in named.items() if v is not None}, "")


def refuse_secret_inputs_carried(secret_inputs: dict[str, str], job: BrowserJob) -> None:
    """JobInvalid when a value given as an input declared `secret: true` is also sent where
    it is shown in the clear: another input (a report's `inputs`, the `entered` of a fill),
    the correlation, the idempotency key or an address. Only the secret input is masked."""
    if not secret_inputs:
        return
    # The same checks as for configured secrets (plain, percent-encoded, base64), with these
    # values as the only "configured" ones.
    values = {f"{ENV_PREFIX}{i}": v for i, v in enumerate(secret_inputs.values())}
    shown = {k: v for k, v in job.inputs.items() if k not in secret_inputs}
    refuse_carried(SecretStore(None, environ=values), job.model_copy(update={"inputs": shown}))


def intake(
    job: BrowserJob, runtime: Runtime, version: int | None = None
) -> tuple[LoadedScript, dict[str, Any], dict[str, str]]:
    """Everything checked before a browser is touched; raises RejectedError. `version`: the
    one routing chose (the job's pin otherwise)."""
    pinned = job.script_version if version is None else version
    loaded = runtime.scripts.load(job.script_name, pinned)
    inputs = loaded.validate_inputs(job.inputs)
    loaded.check_uploads(inputs, runtime.uploads)
    secrets = runtime.secrets.resolve(loaded.secret_names(), script=loaded.name)
    login = loaded.relogin_secret_names() - set(secrets)
    if login:
        try:
            secrets |= runtime.secrets.resolve(login, script=str(loaded.registry.login_flow))
        except SecretMissing as exc:
            # The script signs in with its own steps, and this worker has no credentials for
            # the site's login flow: an expired session is then handed to a person, not
            # signed into again (a sign-in typed from missing secrets would fail anyway).
            log.warning("job %s: no signing in again: %s", job.job_id, exc.message)
            loaded = dataclasses.replace(loaded, relogin=[])
    if job.site_url is not None:
        host = urlsplit(job.site_url).hostname or ""
        if host not in loaded.registry.allowed_hosts:
            # The site's credentials are typed into whatever site_url serves: only the site's
            # own hosts may be named, never one an orchestrator picks.
            raise RejectedError(
                f"site_url host {host!r} is not one of site {loaded.registry.site}'s allowed "
                f"hosts {loaded.registry.allowed_hosts}",
                code=FailureCode.job_invalid,
                field="site_url",
            )
    refuse_carried(runtime.secrets, job)
    refuse_secret_inputs_carried(loaded.secret_inputs(inputs), job)
    if job.deadline is not None and job.deadline <= now():
        raise RejectedError(
            f"deadline {job.deadline.isoformat()} passed before the job started",
            code=FailureCode.job_invalid,
            field="deadline",
        )
    return loaded, inputs, secrets


async def _finish(
    report: JobReport, started: float, runtime: Runtime, listener: RunListener
) -> JobReport:
    report.ended_at = now()
    # The worker's time on the job, over all its runs: a pause's wait is not in it.
    report.duration_ms = (report.duration_ms or 0.0) + _ms(started)
    try:
        runtime.artifacts.write_report(report)
    except ArtifactError as exc:
        # The outcome stands, and is announced: a job whose folder cannot be written still
        # settles (it stayed `running` for ever). Its report names no folder that is not there.
        log.error("job %s: report not stored: %s", report.job_id, exc.message)
        report.artifacts = None
    else:
        await runtime.artifacts.record(report)
    await listener.job_changed(report)
    return report


_PAUSE = {
    RuleAction.handoff: JobStatus.paused_for_handoff,
    RuleAction.ask_customer: JobStatus.needs_customer_input,
}
# A commit step whose effect the probe found absent is redone at most this many times in all.
COMMIT_TRIES = 2
# `present` is checked once on the probe's page, already loaded: no long wait for an absence.
PRESENT_TIMEOUT_MS = 1_500


class _AttemptFailed(Exception):
    def __init__(self, failure: Failure, dispatched: bool) -> None:
        super().__init__(failure.message)
        self.failure = failure
        self.dispatched = dispatched


@dataclass
class _Run:
    """One job's steps: attempts, the rule that decides after a failure, the claims."""

    job: BrowserJob
    loaded: LoadedScript
    runtime: Runtime
    report: JobReport
    listener: RunListener
    actions: PageActions
    cdp: CDPSession
    journal: CommitJournal | None = None
    checkpoints: Checkpoints | None = None
    context: BrowserContext | None = None
    guard: Guard | None = None
    redact: Redactor = field(init=False)
    dynamic_css: list[str] = field(init=False)
    shots: int = 0
    relogins: dict[str, int] = field(default_factory=dict)
    stop_refused: bool = False  # an abort (or the deadline) came after a commit was sent
    hand_over_crashes: bool = False  # see run_job
    commit_tries: dict[str, int] = field(default_factory=dict)
    probe_used: bool = False
    # The storage state last read for a checkpoint, and (responses, navigations) at the time.
    state: dict[str, Any] | None = None
    state_heard: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        self.redact = self.actions.redact
        elements = self.loaded.registry.elements
        self.dynamic_css = [
            c.css
            for name in self.loaded.script.dynamic
            for c in elements[name]
            if c.css and "{{" not in c.css
        ]
        # A run that goes on with an earlier run's report numbers its captures after that
        # run's: starting again at 01 would write over the first run's evidence.
        self.shots = max((_shot_number(p) for p in _shots_of(self.report)), default=0)

    @property
    def page(self) -> Page:
        return self.actions.page

    def here(self) -> str:
        """The page's URL as a report may keep it: a site may redirect to a URL that carries a
        value typed into it (`/login?failed=1&username=...`). A step that goes back to a
        redacted URL cannot get there again; that is the price of never storing the value."""
        return self.redact(self.page.url) or ""

    def step_report(self, step_id: str) -> StepReport:
        return next(s for s in self.report.steps if s.id == step_id)

    # ------------------------------------------------------------ the loop

    async def resume(self, point: ResumePoint, stop_check: StopCheck | None) -> None:
        """Continue in this fresh context at `point.step_id`: restore what the steps before it
        produced, get the session and the page back, and go on."""
        plan = self.loaded.plan
        index = len(plan) if point.step_id is None else self.loaded.index_of(point.step_id)
        self.actions.outputs.update(self.report.outputs)
        self.actions.outputs.update(point.outputs)
        self.restore_extracted()
        if point.skip and index < len(plan):
            skipped = self.step_report(plan[index].id)
            skipped.status = StepStatus.skipped
            skipped.recovered_by = SKIPPED_BY_DECISION
            index += 1
            if index < len(plan):
                # The next step goes on where the skipped one left the page (a person did it
                # by hand), never by running the skipped step again to rebuild that page.
                self.step_report(plan[index].id).url_before = skipped.url or skipped.url_before
        for step in plan[index:]:
            self.step_report(step.id).status = StepStatus.pending
        sent_before = self.journal is not None and any(
            p.id in self.journal.previously_sent for p in plan[index : index + 1]
        )
        # A commit an earlier run sent goes straight to its probe, which finds its own page —
        # signed in first when no session was kept: the probe's first page would otherwise
        # wait out its timeout on the sign-in form, and count as a session that expired.
        signed_out = point.storage_state is None and index > 0
        if sent_before and signed_out and not await self.sign_in_again(plan[index].id):
            return
        if index < len(plan) and not sent_before and self.page_gone_with_commit(index):
            # The run before sent the commit, the site confirmed it, and the run died before
            # the next step read its answer: that page (a confirmation) was the commit's
            # response and has no address to open again. The probe reads the effect back.
            commit = plan[index - 1]
            if signed_out and not await self.sign_in_again(plan[index].id):
                return
            if await self.read_back(commit) is None:
                return
        elif index < len(plan) and not sent_before:
            start = await self.reenter(index, restored=point.storage_state is not None)
            if start is None:
                return
            if self.report.interruptions and start < index:
                self.report.interruptions[-1].redone = [p.id for p in plan[start:index]]
            index = start
        await self.steps(stop_check, start=index)

    def page_gone_with_commit(self, index: int) -> bool:
        """Whether step `index` worked on the page a confirmed commit left, with nothing
        recorded to get back there: never started, so no `url_before`, and no redoing across
        the commit before it."""
        plan = self.loaded.plan
        if index == 0 or isinstance(plan[index].step, GotoStep):
            return False
        before = self.step_report(plan[index - 1].id)
        return (
            plan[index - 1].step.commit
            and before.status == StepStatus.succeeded
            and self.step_report(plan[index].id).url_before is None
        )

    async def read_back(self, commit: PlannedStep) -> int | None:
        """Read a confirmed commit's outputs back through its probe (the steps that would
        have read them on its response page are then skipped as recovered). None: the job
        waits for a person, who is told why."""
        at = self.loaded.index_of(commit.id)
        probe = self.loaded.script.verify_effect
        gone = Failure(
            code=FailureCode.unexpected_page,
            message=f"the page {commit.id} left (its confirmation) is gone with the run that "
            "died, and there is no probe to read the effect back",
            step_id=self.loaded.plan[at + 1].id,
        )
        if probe is None or probe.opt_out is not None or probe.present is None:
            self.end(JobStatus.paused_for_handoff, gone)
            return None
        why = "reading back the confirmed effect: its confirmation page was lost with the run"
        self.fire(commit.id, FailureCode.outcome_unknown, "verify_effect", why)
        self.probe_used = True
        if await self.probe(commit) != "present":
            gone.message = (
                f"{commit.id} was confirmed by the site, but its probe does not find the "
                "effect now: a person looks"
            )
            self.end(JobStatus.paused_for_handoff, gone)
            return None
        return at + 1

    def restore_extracted(self) -> None:
        """Outputs read by an earlier run, with how they were verified (for the claims)."""
        for claim in self.report.claims:
            if claim.kind == "output" and claim.step_id is not None:
                self.actions.extracted.setdefault(
                    claim.name,
                    Extracted(
                        value=claim.value,
                        step_id=claim.step_id,
                        source=claim.source or "",
                        verified=claim.how,
                    ),
                )

    async def reenter(self, index: int, *, restored: bool) -> int | None:
        """Get back the page step `index` needs, in a context that has only what the
        checkpoint restored. Returns the step to run from (earlier than `index` when steps
        must be redone to rebuild the page), or None: the job is paused for a person."""
        plan = self.loaded.plan
        start = self.rebuild_from(index)
        at = plan[index].id
        if start > 0 and not restored and not await self.sign_in_again(at):
            return None
        if isinstance(plan[start].step, GotoStep):
            # The step opens its own page; a dead session shows there as auth_expired, which
            # the relogin rule handles like any expiry mid-job.
            return start
        page = self.step_report(plan[start].id).url_before
        if page and await self.detour_failed(page):
            self.lost(f"could not get back to {page} to resume", at)
            return None
        if restored and await self.on_login_page():
            # The restored session died while the job waited: sign in, then back again.
            if not await self.sign_in_again(at):
                return None
            if page and await self.detour_failed(page):
                self.lost(f"could not get back to {page} to resume", at)
            return None
        return start

    def rebuild_from(self, index: int) -> int:
        """The step to redo from so that step `index` finds its page as it was: back over the
        steps that filled it, then to the last `goto` before them — a page reached by
        submitting a form (a review page) has no address to open again. Never back over a
        commit."""
        plan = self.loaded.plan
        start = self.page_start(index)
        for earlier in range(start, -1, -1):
            if isinstance(plan[earlier].step, GotoStep):
                return earlier
            if earlier == 0 or self.boundary(earlier - 1):
                break
        return start

    def boundary(self, index: int) -> bool:
        """Rebuilding a page never redoes step `index`: a commit (it would be sent twice) or a
        step a person decided to skip."""
        step = self.loaded.plan[index]
        return step.step.commit or self.step_report(step.id).recovered_by == SKIPPED_BY_DECISION

    async def sign_in_again(self, at: str) -> bool:
        if not self.loaded.relogin:
            return True
        plan = self.loaded.plan
        anchor = plan[max(self.loaded.index_of(at) - 1, 0)].id
        if await self.run_subplan(self.loaded.relogin, anchor, "resume_login", drop="relogin."):
            return True
        failure = Failure(
            code=FailureCode.auth_expired, message="could not sign in again to resume", step_id=at
        )
        self.end(JobStatus.paused_for_handoff, failure)
        return False

    def lost(self, message: str, at: str) -> None:
        self.end(
            JobStatus.paused_for_handoff,
            Failure(code=FailureCode.unexpected_page, message=message, step_id=at),
        )

    async def on_login_page(self) -> bool:
        login = self.loaded.registry.detectors.login_page
        return bool(login) and bool(await detectors_seen(self.page, login))

    async def steps(self, stop_check: StopCheck | None, start: int = 0) -> None:
        plan = self.loaded.plan
        index = start
        while index < len(plan):
            reason = await stop_check() if stop_check else None
            if reason is None and self.job.deadline is not None and self.job.deadline <= now():
                reason = "job deadline passed"
            if reason is not None and self.committed():
                # Too late to stop: the site took (or may have taken) the commit. Ended here,
                # the job would read "cancelled" over an effect that exists; it goes on to read
                # what the site confirmed, once, and says why it did not stop.
                if not self.stop_refused:
                    self.stop_refused = True
                    self.fire(
                        plan[index].id,
                        FailureCode.cancelled,
                        "continue",
                        f"{reason}, after a commit was sent: finishing the job instead",
                    )
                reason = None
            if reason is not None:
                self.end(JobStatus.cancelled, Failure(code=FailureCode.cancelled, message=reason))
                return
            planned = plan[index]
            report = self.step_report(planned.id)
            if self.job.dry_run and planned.step.commit:
                await self.stop_before_commit(planned, report)
                return
            if self.journal is not None and planned.id in self.journal.previously_sent:
                # An earlier run of this job sent this commit and then died: look before
                # sending it again.
                self.journal.previously_sent.discard(planned.id)
                interrupted = Failure(
                    code=FailureCode.outcome_unknown,
                    message=f"{planned.id} was sent by an earlier run of this job that was "
                    "interrupted; checking the site before sending it again",
                    step_id=planned.id,
                )
                next_index = await self.verify_commit(index, planned, report, interrupted)
            elif self.needs_approval(planned):
                await self.ask_approval(planned)
                return
            elif self.recovered(planned, report):
                next_index = index + 1
            else:
                failure = await self.run_step(planned, report, index)
                if failure is None:
                    next_index = index + 1
                else:
                    next_index = await self.recover(index, planned, report, failure)
            if next_index is None:
                return
            if next_index > index:
                await self.checkpoint(next_index)
            index = next_index
        self.report.status = JobStatus.succeeded
        self.report.outputs = dict(self.actions.outputs)
        self.claims()

    async def checkpoint(self, next_index: int) -> None:
        """Steps before `next_index` are done: leave what another run needs to go on."""
        if self.checkpoints is None or self.context is None:
            return
        plan = self.loaded.plan
        self.claims()  # outputs read so far travel as claims, with how they were verified
        state = await self.session()
        await self.checkpoints.save(
            Checkpoint(
                job_id=self.job.job_id,
                at=now(),
                completed=[p.id for p in plan[:next_index]],
                last_step=plan[next_index - 1].id,
                next_step=plan[next_index].id if next_index < len(plan) else None,
                outputs=dict(self.actions.outputs),
                url=self.here(),
                report=self.report,
                storage_state=state,
            )
        )

    async def session(self) -> dict[str, Any] | None:
        """The session (cookies, local storage) a checkpoint keeps, as of now.

        It changes with what the site sends: after a step that received nothing (a fill, a
        check) the last state read is still the state. Two round trips saved on most steps; a
        change a page's script makes on its own is kept from the next load on."""
        if self.context is None:
            return None
        heard = (self.actions.responses, self.actions.navigations)
        if heard != self.state_heard:
            self.state = await storage_state(self.context, self.page)
            self.state_heard = heard
        return self.state

    # ------------------------------------------------------------ approval gates

    def needs_approval(self, planned: PlannedStep) -> bool:
        approval = planned.step.approval
        if approval is None:
            return False
        approved = any(
            d.decision == Decision.approve and d.step_id == planned.id
            for d in self.report.decisions
        )
        if approved:
            return False
        if approval.when is None:
            return True
        try:
            return holds(approval.when, self.actions.inputs_of(planned.frame))
        except TemplateError as exc:
            # A condition that cannot be judged (a value of the wrong type) asks a person:
            # the gate fails closed.
            log.warning("job %s step %s: %s", self.job.job_id, planned.id, exc)
            return True

    def form_fields(self) -> dict[str, str]:
        """What the form about to be sent holds, as entered (secrets as '***'). The sign-in
        fields (the registry's secret elements) were filled on another page, long before, and
        are not part of it."""
        secret = self.loaded.registry.secret_elements
        return {k: v for k, v in self.actions.entered.items() if k not in secret}

    async def ask_approval(self, planned: PlannedStep) -> None:
        """Pause before the commit with the filled form as evidence; nothing is sent."""
        approval = planned.step.approval
        assert approval is not None
        shot = await self.screenshot(f"{planned.id}.approval", full_page=False)
        why = f"approval.when: {approval.when}" if approval.when else "always"
        self.fire(
            planned.id, FailureCode.approval_required, "approval", f"needs {approval.role} ({why})"
        )
        failure = Failure(
            code=FailureCode.approval_required,
            message=f"{planned.id} needs approval by {approval.role} before it is sent",
            step_id=planned.id,
        )
        self.end(JobStatus.awaiting_approval, failure)
        assert self.report.handoff is not None
        self.report.handoff = approval_request(
            self.report.handoff,
            approval,
            fields=self.form_fields(),
            screenshot=shot,
            url=self.here(),
        )

    async def stop_before_commit(self, planned: PlannedStep, report: StepReport) -> None:
        """A dry run reached its first commit step: record what would be sent, send nothing."""
        shot = await self.screenshot(f"{planned.id}.dry_run", full_page=False)
        self.report.would_submit = WouldSubmit(
            step_id=planned.id,
            fields=self.form_fields(),
            url=self.here(),
            screenshot=shot,
        )
        report.recovered_by = "dry_run: not sent"
        self.fire(
            planned.id, FailureCode.cancelled, "dry_run", "dry run: stopped before the commit"
        )
        self.end(JobStatus.succeeded, None)

    def recovered(self, planned: PlannedStep, report: StepReport) -> bool:
        """An extract step whose outputs the commit probe already recovered is not rerun
        (its page — the confirmation the site never sent — does not exist)."""
        step = planned.step
        if not (self.probe_used and isinstance(step, ExtractStep)):
            return False
        if not all(self.actions.extracted.get(n, None) for n in step.extract):
            return False
        if not all(self.actions.extracted[n].verified == Verification.probe for n in step.extract):
            return False
        report.status = StepStatus.skipped
        report.recovered_by = "verify_effect"
        return True

    def end(self, status: JobStatus, failure: Failure | None, why: str | None = None) -> None:
        for step in self.report.steps:
            if step.status == StepStatus.pending:
                step.status = StepStatus.skipped
        self.report.status = status
        self.report.error = failure
        self.report.outputs = dict(self.actions.outputs)
        self.claims()
        if status == JobStatus.failed and failure is not None:
            self.report.error = _after_confirmed_commit(self.report, failure)
        if status.paused and failure is not None:
            self.report.handoff = handoff_request(
                self.report, failure, status, list(self.loaded.script.inputs), why
            )
            wait_s = self.job.pause_timeout_s or self.loaded.script.pause_timeout_s
            self.report.handoff.expires_at = now() + timedelta(seconds=wait_s)

    def fire(self, step_id: str, code: FailureCode, action: str, reason: str) -> None:
        log.info("job %s step %s: %s -> %s (%s)", self.job.job_id, step_id, code, action, reason)
        self.report.rules_fired.append(
            RuleFired(step_id=step_id, code=code, action=action, reason=reason, at=now())
        )

    # ------------------------------------------------------------ one step, with retries

    def rule(self, planned: PlannedStep, code: FailureCode) -> Rule:
        step = planned.step
        return rule_for(
            code,
            step.on_failure,
            planned.frame.script.on_failure,
            self.loaded.script.on_failure,
            self.loaded.registry.on_failure,
            alternate=step.alternate,
        )

    async def run_step(
        self, planned: PlannedStep, report: StepReport, index: int | None = None
    ) -> Failure | None:
        """Run the step; retry it while its rule says `retry`. The last failure, or None.

        A retry first puts the page back as the step found it (`index`: its place in the
        plan): a form whose submit hit a 502 page is opened and filled again, then submitted.
        """

        def give_up(state: RetryCallState) -> bool:
            error = state.outcome.exception() if state.outcome else None
            if not isinstance(error, _AttemptFailed) or error.dispatched:
                return True  # a commit that reached the site is never simply sent again
            if self.handed_over(error.failure):
                return True
            rule = self.rule(planned, error.failure.code)
            return rule.action != RuleAction.retry or state.attempt_number >= rule.attempts

        def wait(state: RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome else None
            assert isinstance(error, _AttemptFailed)
            return retry_wait_s(self.rule(planned, error.failure.code), state)

        def before_sleep(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            assert isinstance(error, _AttemptFailed) and state.next_action is not None
            wait_s = state.next_action.sleep
            report.attempt_log[-1].wait_ms = round(wait_s * 1000, 1)
            rule = self.rule(planned, error.failure.code)
            self.fire(
                planned.id,
                error.failure.code,
                RuleAction.retry,
                f"attempt {state.attempt_number} of {rule.attempts} failed; "
                f"trying again in {wait_s:.2f}s",
            )

        navigations = self.actions.navigations
        try:
            async for attempt in AsyncRetrying(
                stop=give_up,
                wait=wait,
                retry=retry_if_exception_type(_AttemptFailed),
                before_sleep=before_sleep,
                reraise=True,
            ):
                with attempt:
                    if attempt.retry_state.attempt_number > 1 and index is not None:
                        # A frame that got no answer comes back only with its page.
                        navigated = (
                            self.actions.navigations != navigations
                            or self.actions.frame_no_answer is not None
                        )
                        await self.restore_page(index, planned, report, navigated=navigated)
                    navigations = self.actions.navigations
                    await self.attempt(planned, report)
        except _AttemptFailed as exc:
            if self.handed_over(exc.failure):
                raise BrowserLost(exc.failure.message) from exc
            return exc.failure
        return None

    def handed_over(self, failure: Failure) -> bool:
        """Whether `failure` (the page's renderer or the browser died) ends this run for a fresh
        one: every retry on this page would fail the same way (`Target crashed`)."""
        return self.hand_over_crashes and failure.code == FailureCode.browser_crashed

    async def attempt(self, planned: PlannedStep, report: StepReport) -> None:
        """One try: act, check the postcondition, look for trouble, take the screenshot."""
        step, actions = planned.step, self.actions
        logs.step_id.set(planned.id)
        report.status = StepStatus.running
        report.attempts += 1
        report.commit = step.commit
        report.started_at = report.started_at or now()
        if report.attempts == 1:
            report.url_before = self.here()
        report.failure = None
        at, started = now(), time.perf_counter()
        await self.listener.step_changed(self.report, report)
        log.info(
            "job %s step %s: %s (attempt %s)",
            self.job.job_id,
            planned.id,
            planned.action,
            report.attempts,
        )
        timeout_ms = float(
            step.timeout_ms or self.job.step_timeout_ms or planned.frame.script.timeout_ms
        )
        actions.dispatched = False
        if step.commit and self.journal is not None:
            await self.journal.sent(planned.id)  # before the click: it may land and we die
        navigations = actions.navigations
        side_effect = isinstance(step, ClickStep | PressStep)
        failure: Failure | None = None
        full_page = False
        try:
            async with contextlib.AsyncExitStack() as once:
                if step.commit and self.runtime.send_once and self.context is not None:
                    hosts = self.guard.hosts if self.guard is not None else None
                    await once.enter_async_context(sent_once(self.context, hosts, timeout_ms))
                report.selector = await actions.perform(planned, timeout_ms)
            report.entered = actions.entered_by(planned)
            report.drift = self._drift(report.selector)
            report.verified = Verification.none
            if isinstance(step, ExpectStep):
                report.verified = Verification.postcondition
            elif step.expect is not None:
                await actions.check(
                    step.expect,
                    planned.frame,
                    timeout_ms,
                    navigations_before=navigations if side_effect else None,
                    detectors_before=actions.showing_before,
                )
                report.verified = Verification.postcondition
            elif side_effect:
                await actions.side_effect_check()
            full_page = isinstance(step, ScreenshotStep) and step.screenshot.full_page
        except StepError as exc:
            failure = await self.explain(exc, planned.id, stop_loading=actions.dispatched)
        except PlaywrightError as exc:
            error = translate_playwright_error(exc, doing=f"{planned.action} failed")
            failure = await self.explain(error, planned.id, stop_loading=actions.dispatched)
        except Exception as exc:
            # A bug of ours, or a script value nothing checked: the step fails like any other
            # (the report keeps every step and claim so far, and a sent commit is still
            # probed), instead of the job ending with a report that knows nothing.
            log.exception("job %s step %s: internal error", self.job.job_id, planned.id)
            error = StepError(
                FailureCode.script_error,
                f"{planned.action} failed: internal error ({type(exc).__name__}: {exc})",
            )
            failure = await self.explain(error, planned.id, stop_loading=actions.dispatched)
        if (
            failure is not None
            and failure.code == FailureCode.auth_expired
            and side_effect
            and (self.signing_in(planned) or self.on_sign_in_form(actions))
        ):
            # The sign-in form again, right after sending it: not a session that expired (the
            # relogin rule would send the same values again), but credentials the site refused.
            failure = failure.model_copy(
                update={
                    "code": FailureCode.credentials_rejected,
                    "message": f"the site refused the sign-in sent by {planned.id}",
                }
            )
        report.dialogs += [
            seen.model_copy(update={"message": self.redact(seen.message) or ""})
            for seen in actions.take_dialogs()
        ]
        report.url = self.here()
        shot = None
        if failure is None or failure.code != FailureCode.browser_crashed:
            # Both only read the page: measuring what the annotations need while the browser
            # renders the capture costs no time of its own.
            acted = actions.acted_on() if report.selector is not None else None
            # So does reading the session for the checkpoint that follows a step that went
            # well (~5 ms of round trips on a step that heard from the site): it is then fresh.
            checkpointed = failure is None and self.checkpoints is not None
            shot, (box, dynamic), _ = await asyncio.gather(
                self.screenshot(planned.id, full_page=full_page),
                measure(self.page, acted, self.dynamic_css),
                self.session() if checkpointed else _nothing(),
            )
            if report.selector is not None:
                report.selector.box = box
            if shot and self.dynamic_css:
                report.dynamic = dynamic
        report.screenshot = shot or report.screenshot
        # Looked at after the capture: a request the page made on its own near the end of the
        # step (a popup's, a worker's) has had the capture's round trips to be heard of.
        blocked = self.guard.take() if self.guard is not None else []
        if blocked:
            # Whatever else went wrong, the page tried to leave the site: that is the finding.
            failure = Failure(
                code=FailureCode.navigation_blocked,
                message=self.redact(
                    f"the page tried to reach a host outside the site's allowlist: {blocked[0]}"
                )
                or "",
                evidence=self.redact("; ".join(blocked)),
                step_id=planned.id,
            )
        if failure is not None and actions.dispatched and failure.code not in _KNOWN_OUTCOMES:
            failure = Failure(
                code=FailureCode.outcome_unknown,
                message=f"{planned.id} was sent to the site but not confirmed "
                f"({failure.code}: {failure.message})",
                evidence=failure.evidence,
                step_id=planned.id,
            )
        report.attempt_log.append(
            Attempt(
                number=report.attempts,
                started_at=at,
                duration_ms=_ms(started),
                failure=failure,
                screenshot=shot,
            )
        )
        report.ended_at = now()
        report.duration_ms = round(
            sum(a.duration_ms + (a.wait_ms or 0) for a in report.attempt_log), 1
        )
        if failure is not None:
            report.status = StepStatus.failed
            report.failure = failure
            report.verified = None
        else:
            report.status = StepStatus.succeeded
        if shot:
            self.runtime.artifacts.prepare(shot, step_mark(report))
        await self.listener.step_changed(self.report, report)
        if failure is not None:
            raise _AttemptFailed(failure, actions.dispatched)

    def committed(self) -> bool:
        """Whether a commit step of this job reached the site (and was not refused by it)."""
        return any(_sent(s) for s in self.report.steps if s.commit)

    def signing_in(self, planned: PlannedStep) -> bool:
        """Whether `planned` is a step of the site's login flow."""
        login = self.loaded.relogin
        return bool(login) and planned.frame.path == login[0].frame.path

    def on_sign_in_form(self, actions: PageActions) -> bool:
        """Whether the step's action was sent from the site's sign-in form (its `login_page`
        detector showed before the click): a script signing in with steps of its own."""
        return bool(actions.showing_before & set(self.loaded.registry.detectors.login_page))

    def _drift(self, matched: MatchedSelector | None) -> SelectorDrift | None:
        if matched is None or matched.index == 0:
            return None
        primary = self.loaded.registry.candidates(matched.element)[0]
        return SelectorDrift(
            element=matched.element, expected=primary.describe(), used=matched.candidate
        )

    async def explain(
        self, error: StepError, step_id: str, *, stop_loading: bool = False
    ) -> Failure:
        """Turn a raw step error into a classified, redacted Failure."""
        code, evidence = error.code, error.evidence
        # A step that timed out may have left a page loading (a click whose next page is slow
        # to come): reading the page would wait for it, well past the step's timeout.
        # Not after a navigation that got no answer: nothing is pending, and stopping would
        # stop Chromium's error page from loading, which then never paints (a capture of it
        # hung, unanswered).
        if (stop_loading and code != FailureCode.network_error) or code == FailureCode.timeout:
            # A sent commit whose answer is still pending: stop waiting for it (as a person
            # would press Esc), so the evidence can be taken and the probe can navigate —
            # anything run in the page blocks until that navigation ends. The site has the
            # request either way; the probe decides what became of it.
            with contextlib.suppress(PlaywrightError):
                await self.cdp.send("Page.stopLoading")
        if code != FailureCode.browser_crashed:
            try:
                state = await observe_page(
                    self.page,
                    self.loaded.registry.detectors,
                    self.actions.document_status,
                    self.actions.call_failure,
                    self.actions.frame_no_answer,
                )
                code, seen = classify(code, state)
                evidence = evidence or seen
            except PlaywrightError as exc:
                log.warning("job %s: could not observe the page: %s", self.job.job_id, exc.message)
        return Failure(
            code=code,
            message=self.redact(error.message) or "",
            evidence=self.redact(evidence),
            step_id=step_id,
        )

    async def screenshot(self, step_id: str, *, full_page: bool) -> str | None:
        self.shots += 1
        path, rel = self.runtime.artifacts.step_image(
            self.job.job_id, self.shots, step_id, IMAGE_SUFFIX
        )
        try:
            data = await capture(self.page, self.cdp, full_page=full_page)
        except StepError as exc:
            log.warning("job %s step %s: %s", self.job.job_id, step_id, exc.message)
            return None
        if not await self.runtime.artifacts.keep_capture(self.job.job_id, path, data):
            log.warning(
                "job %s step %s: screenshot not kept: the job's captures are at their budget "
                "(%s bytes)",
                self.job.job_id,
                step_id,
                self.runtime.artifacts.image_budget,
            )
            return None
        return rel

    # ------------------------------------------------------------ after a failure

    async def recover(
        self, index: int, planned: PlannedStep, report: StepReport, failure: Failure
    ) -> int | None:
        """Apply the failure's rule. The plan index to continue at, or None: the job ended."""
        code = failure.code
        if planned.step.commit and code == FailureCode.outcome_unknown:
            return await self.verify_commit(index, planned, report, failure)
        rule = self.rule(planned, code)
        action = rule.action
        if action == RuleAction.retry:
            action = rule.then  # the retries are spent
        if action == RuleAction.relogin:
            used = self.relogins.get(planned.id, 0)
            if used < rule.attempts and self.loaded.relogin:
                self.relogins[planned.id] = used + 1
                self.fire(
                    planned.id,
                    code,
                    RuleAction.relogin,
                    "the session expired: signing in again, then redoing this page",
                )
                start = self.page_start(index)
                back_to = self.step_report(planned.id).url_before
                relogged = await self.run_subplan(self.loaded.relogin, planned.id, "relogin")
                if relogged and back_to and not await self.detour_failed(back_to):
                    return start
            action = rule.then
        if action == RuleAction.alternate and rule.alternate is not None:
            self.fire(
                planned.id, code, RuleAction.alternate, f"taking alternate path {rule.alternate!r}"
            )
            key = self.loaded.alternate_key(planned, code, rule.alternate)
            drop = key.removesuffix(rule.alternate)  # a sub-flow's steps' prefix, not repeated
            if await self.run_subplan(
                self.loaded.alternates[key], planned.id, rule.alternate, drop or None
            ):
                report.recovered_by = f"alternate:{rule.alternate}"
                return index + 1
            action = rule.then
        self.fire(planned.id, code, action, failure.message)
        self.end(_PAUSE.get(action, JobStatus.failed), failure)
        return None

    def page_start(self, index: int) -> int:
        """The first of the steps that worked on the page step `index` started on (filling a
        form, say): the steps to redo to rebuild that page. Never reaches back over a commit."""
        plan = self.loaded.plan
        page_url = self.step_report(plan[index].id).url_before
        start = index
        while start > 0:
            previous = self.step_report(plan[start - 1].id)
            if self.boundary(start - 1) or previous.url_before != page_url:
                break
            start -= 1
        return start

    async def restore_page(
        self, index: int, planned: PlannedStep, report: StepReport, *, navigated: bool
    ) -> None:
        """Before a retry: back to the step's page, and redo what had been done on it.

        `navigated`: the failed attempt loaded another document (or a frame of the page got
        no answer). A form posted to its own address answers there too (a 502 page at the
        form's URL): the URL alone does not say that the form is still showing."""
        if isinstance(planned.step, GotoStep) or report.url_before is None:
            return
        if report.url_before == self.here() and not navigated:
            return
        start = self.page_start(index)
        failure = None
        if await self.detour_failed(report.url_before or ""):
            failure = f"could not return to {report.url_before}"
        else:
            for earlier in self.loaded.plan[start:index]:
                if await self.run_step(earlier, self.step_report(earlier.id)) is not None:
                    failure = f"could not redo step {earlier.id!r} on {report.url_before}"
                    break
        if failure is not None:
            lost = Failure(code=FailureCode.unexpected_page, message=failure, step_id=planned.id)
            raise _AttemptFailed(lost, dispatched=False)

    async def detour_failed(self, url: str) -> bool:
        try:
            await self.page.goto(url, wait_until="load")
        except PlaywrightError as exc:
            log.warning("job %s: could not return to %s: %s", self.job.job_id, url, exc.message)
            return True
        return False

    async def run_subplan(
        self, steps: list[PlannedStep], after: str, name: str, drop: str | None = None
    ) -> bool:
        """Run extra steps (a sign-in, an alternate path, a probe) inserted into the report
        after step `after` in execution order, named `<after>.<name>.<step>`: the plan's own
        prefix (`drop`, by default `<name>.`) is not repeated. True when all succeeded."""
        drop = f"{name}." if drop is None else drop
        reports = [
            StepReport(id=f"{after}.{name}.{p.id.removeprefix(drop)}", action=p.action)
            for p in steps
        ]
        position = next(i for i, s in enumerate(self.report.steps) if s.id == after) + 1
        while position < len(self.report.steps) and self.report.steps[position].id.startswith(
            after + "."
        ):
            position += 1
        self.report.steps[position:position] = reports
        for planned, report in zip(steps, reports, strict=True):
            if await self.run_step(planned, report) is not None:
                for rest in reports:
                    if rest.status == StepStatus.pending:
                        rest.status = StepStatus.skipped
                return False
        return True

    async def verify_commit(
        self, index: int, planned: PlannedStep, report: StepReport, failure: Failure
    ) -> int | None:
        """The commit was sent but not confirmed: ask the site whether the effect happened."""
        probe = self.loaded.script.verify_effect
        if probe is None or probe.opt_out is not None:
            self.fire(planned.id, failure.code, RuleAction.handoff, "no probe to verify the effect")
            self.end(JobStatus.paused_for_handoff, failure)
            return None
        self.fire(planned.id, failure.code, "verify_effect", "checking whether the effect happened")
        self.probe_used = True
        outcome = await self.probe(planned)
        if outcome == "present":
            report.status = StepStatus.succeeded
            report.verified = Verification.probe
            report.failure = None
            report.recovered_by = "verify_effect: the site shows the effect"
            await self.listener.step_changed(self.report, report)
            return index + 1
        tries = self.commit_tries.get(planned.id, 1)
        if outcome == "absent" and tries < COMMIT_TRIES:
            self.commit_tries[planned.id] = tries + 1
            start = self.loaded.retry_start(planned)
            restart = self.loaded.plan[start].id
            self.fire(
                planned.id,
                failure.code,
                "retry_from",
                f"the site does not show the effect: redoing from step {restart!r}",
            )
            back_to = self.step_report(restart).url_before
            if back_to and await self.detour_failed(back_to):
                self.end(JobStatus.paused_for_handoff, failure)
                return None
            return start
        why = "the probe could not tell" if outcome == "inconclusive" else "still not applied"
        self.fire(planned.id, failure.code, RuleAction.handoff, f"{why}: a person decides")
        absent = (
            "a submission was sent but the site never confirmed it, and checking afterwards "
            "found no effect, also after the form was redone once"
        )
        self.end(JobStatus.paused_for_handoff, failure, absent if outcome == "absent" else None)
        return None

    async def probe(self, planned: PlannedStep) -> str:
        """ "present", "absent" or "inconclusive"."""
        probe = self.loaded.script.verify_effect
        assert probe is not None and probe.present is not None
        reach, recover = self.loaded.probe_reach, self.loaded.probe_recover
        self.actions.probing = True
        try:
            if not await self.run_subplan(reach, planned.id, "verify"):
                # A session that expired with the commit is the commonest reason the probe
                # cannot look: sign in once more and look again.
                last = [s for s in self.report.steps if s.id.startswith(f"{planned.id}.verify.")]
                expired = any(
                    s.failure is not None and s.failure.code == FailureCode.auth_expired
                    for s in last
                )
                if not (expired and self.loaded.relogin):
                    return "inconclusive"
                self.fire(
                    planned.id,
                    FailureCode.auth_expired,
                    RuleAction.relogin,
                    "the session expired: signing in again to run the probe",
                )
                if not await self.run_subplan(self.loaded.relogin, planned.id, "relogin"):
                    return "inconclusive"
                if not await self.run_subplan(reach, planned.id, "verify"):
                    return "inconclusive"
            try:
                await self.actions.check(probe.present, planned.frame, PRESENT_TIMEOUT_MS)
            except StepError as exc:
                return "absent" if exc.code == FailureCode.expectation_failed else "inconclusive"
            except PlaywrightError:
                return "inconclusive"
            if recover:
                await self.run_subplan(recover, planned.id, "verify")
            return "present"
        finally:
            self.actions.probing = False

    # ------------------------------------------------------------ claims

    def claims(self) -> None:
        """What the orchestrator may tell the customer, each marked verified or not."""
        claims: list[Claim] = []
        for name, found in self.actions.extracted.items():
            claims.append(
                Claim(
                    kind="output",
                    name=name,
                    value=found.value,
                    verified=found.verified != Verification.none,
                    how=found.verified,
                    source=found.source,
                    step_id=found.step_id,
                    screenshot=self.step_report(found.step_id).screenshot
                    if any(s.id == found.step_id for s in self.report.steps)
                    else None,
                )
            )
        effect = self.loaded.script.effect
        commits = [s for s in self.report.steps if s.commit]
        # Told only once a commit may have taken effect: a job that stopped before its commit
        # reached the site (or whose commit the site refused) has no effect to tell of, and an
        # unverified "credit … issued" would read as if it had been sent.
        if effect is not None and any(_sent(s) for s in commits):
            text = effect_text(effect, self.actions.inputs, self.actions.outputs)
            done = self.report.status == JobStatus.succeeded and all(
                s.status == StepStatus.succeeded
                and s.verified in (Verification.postcondition, Verification.probe)
                for s in commits
            )
            how = (
                Verification.probe
                if any(s.verified == Verification.probe for s in commits)
                else Verification.postcondition
                if done
                else Verification.none
            )
            claims.append(
                Claim(
                    kind="effect",
                    name=self.loaded.name,
                    value=self.redact(text) or "",
                    verified=done,
                    how=how,
                    step_id=commits[-1].id,
                    screenshot=commits[-1].screenshot,
                )
            )
        self.report.claims = claims


def _shots_of(report: JobReport) -> Iterable[str]:
    """Every screenshot a report refers to, from any of its steps' attempts."""
    for step in report.steps:
        if step.screenshot:
            yield step.screenshot
        yield from (a.screenshot for a in step.attempt_log if a.screenshot)


def _shot_number(path: str) -> int:
    """The capture number a screenshot's name starts with (`…/07-review.jpg` → 7)."""
    head = PurePosixPath(path).name.split("-", 1)[0]
    return int(head) if head.isdigit() else 0


def _sent(step: StepReport) -> bool:
    """Whether the commit `step` reached the site and was not refused by it: it succeeded, or
    an attempt of it was sent but not confirmed (`outcome_unknown`)."""
    return step.status == StepStatus.succeeded or any(
        a.failure is not None and a.failure.code == FailureCode.outcome_unknown
        for a in step.attempt_log
    )


def effect_text(effect: str, inputs: dict[str, Any], outputs: dict[str, str]) -> str:
    """The script's `effect` sentence for this job. An output the job never read (it stopped
    first) is said to be missing, rather than the whole sentence left as its template."""
    unread = {
        r.name: "(not read)"
        for r in references(effect)
        if r.namespace == "outputs" and r.name not in outputs
    }
    try:
        return render(effect, {"inputs": inputs, "outputs": {**unread, **outputs}})
    except TemplateError:
        return effect


SKIPPED_BY_DECISION = "skip_step decision"

# Failures after a commit was sent that still tell what happened: the site said no.
_KNOWN_OUTCOMES = {FailureCode.validation_rejected}
