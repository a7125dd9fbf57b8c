"""Run one job: intake (script, inputs, secrets), then the steps in order on a fresh context.

Data flows one way: BrowserJob → LoadedScript → steps → screenshots → JobReport. Every step
transition is reported to a `RunListener` as it happens (the CLI prints it; the queue turns it
into events), and the report on disk is the same object the listener saw.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import urljoin, urlsplit

from playwright.async_api import Error as PlaywrightError
from playwright.async_api import Locator, Page, Response, expect

from worker.artifacts import LocalArtifacts
from worker.browser import BrowserHost
from worker.contract import (
    BrowserJob,
    Failure,
    FailureCode,
    JobReport,
    JobStatus,
    MatchedSelector,
    StepReport,
    StepStatus,
)
from worker.errors import RejectedError, StepError
from worker.evidence import IMAGE_SUFFIX, capture
from worker.failures import classify, observe_page, translate_playwright_error
from worker.script import (
    CheckStep,
    ClickStep,
    Expectation,
    ExpectStep,
    ExtractStep,
    FillStep,
    Frame,
    GotoStep,
    LoadedScript,
    PlannedStep,
    PressStep,
    ScreenshotStep,
    ScriptStore,
    SelectStep,
    WaitForStep,
    validate_inputs,
)
from worker.secretstore import Redactor, SecretStore
from worker.selectors import Resolved, WaitState, resolve
from worker.templating import references, render

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
    artifacts: LocalArtifacts
    secrets: SecretStore


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
) -> JobReport:
    """Execute `job` end to end and return its report (also written to the artifacts)."""
    listener = listener or NullListener()
    started = time.perf_counter()
    report = JobReport(
        job_id=job.job_id,
        status=JobStatus.running,
        script=job.script_name,
        script_version=job.script_version,
        correlation=job.correlation,
        started_at=now(),
        artifacts=runtime.artifacts.describe(job.job_id),
    )
    reason = await stop_check() if stop_check is not None else None
    if reason is not None:
        report.status = JobStatus.cancelled
        report.error = Failure(code=FailureCode.cancelled, message=reason)
        return await _finish(report, started, runtime, listener)
    try:
        loaded, inputs, secrets = intake(job, runtime)
    except RejectedError as exc:
        return await reject(
            job.job_id, job.script_name, exc, runtime, listener, correlation=job.correlation
        )

    report.script_version = loaded.script.version
    report.inputs = loaded.redacted_inputs(inputs)
    report.steps = [StepReport(id=p.id, action=p.action) for p in loaded.plan]
    await listener.job_changed(report)

    run = _Run(job, loaded, inputs, secrets, runtime, report, listener)
    async with gate(loaded) if gate is not None else nullcontext():
        context, run.page = await runtime.browser.open_page()
        try:
            context.set_default_timeout(loaded.script.timeout_ms)
            run.page.on("response", run.on_response)
            await run.steps(stop_check)
        finally:
            try:
                await context.close()
            except PlaywrightError:
                log.warning("job %s: context already gone at close", job.job_id)
    return await _finish(report, started, runtime, listener)


async def reject(
    job_id: str,
    script: str,
    error: RejectedError,
    runtime: Runtime,
    listener: RunListener | None = None,
    *,
    correlation: dict[str, str] | None = None,
) -> JobReport:
    """The report of a job refused before any browser work."""
    log.info("job %s rejected: %s", job_id, error.code)
    report = JobReport(
        job_id=job_id,
        status=JobStatus.rejected,
        script=script,
        correlation=correlation or {},
        started_at=now(),
        artifacts=runtime.artifacts.describe(job_id),
        error=error.to_failure(),
    )
    return await _finish(report, time.perf_counter(), runtime, listener or NullListener())


async def fail_internally(
    job: BrowserJob, error: Exception, runtime: Runtime, listener: RunListener
) -> JobReport:
    """The report of a job that Formwork itself failed (a bug, not the site)."""
    report = JobReport(
        job_id=job.job_id,
        status=JobStatus.failed,
        script=job.script_name,
        correlation=job.correlation,
        started_at=now(),
        artifacts=runtime.artifacts.describe(job.job_id),
        error=Failure(
            code=FailureCode.script_error,
            message=f"internal error in the worker: {type(error).__name__}",
        ),
    )
    return await _finish(report, time.perf_counter(), runtime, listener)


def intake(
    job: BrowserJob, runtime: Runtime
) -> tuple[LoadedScript, dict[str, Any], dict[str, str]]:
    """Everything checked before a browser is touched; raises RejectedError."""
    loaded = runtime.scripts.load(job.script_name, job.script_version)
    inputs = loaded.validate_inputs(job.inputs)
    secrets = runtime.secrets.resolve(loaded.secret_names(), script=loaded.name)
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
    report.duration_ms = _ms(started)
    runtime.artifacts.write_report(report)
    await listener.job_changed(report)
    return report


@dataclass
class _Run:
    """The mutable state of one job's steps."""

    job: BrowserJob
    loaded: LoadedScript
    inputs: dict[str, Any]
    secrets: dict[str, str]
    runtime: Runtime
    report: JobReport
    listener: RunListener
    page: Page = field(init=False)
    redact: Redactor = field(init=False)
    masked: list[Locator] = field(default_factory=list)
    frame_inputs: dict[int, dict[str, Any]] = field(default_factory=dict)
    document_status: int | None = None

    def __post_init__(self) -> None:
        secret_inputs = [
            str(v)
            for k, v in self.inputs.items()
            if k in self.loaded.script.inputs and self.loaded.script.inputs[k].secret
        ]
        self.redact = Redactor([*self.secrets.values(), *secret_inputs])

    def on_response(self, response: Response) -> None:
        # The status of the page's own document tells a 502 page from a changed form.
        if response.request.is_navigation_request() and response.frame == self.page.main_frame:
            self.document_status = response.status

    async def steps(self, stop_check: StopCheck | None) -> None:
        plan = self.loaded.plan
        for index, planned in enumerate(plan):
            stop_reason = await stop_check() if stop_check else None
            if stop_reason is None and self.job.deadline is not None and self.job.deadline <= now():
                stop_reason = "job deadline passed"
            if stop_reason is not None:
                self._end_remaining(index, JobStatus.cancelled, FailureCode.cancelled, stop_reason)
                return
            step = self.report.steps[index]
            ok = await self.step(index, planned, step)
            if not ok:
                assert step.failure is not None
                self.report.error = step.failure
                self._end_remaining(index + 1, JobStatus.failed, None, None)
                return
        self.report.status = JobStatus.succeeded

    def _end_remaining(
        self, start: int, status: JobStatus, code: FailureCode | None, message: str | None
    ) -> None:
        for step in self.report.steps[start:]:
            step.status = StepStatus.skipped
        self.report.status = status
        if code is not None and message is not None:
            self.report.error = Failure(code=code, message=message)

    async def step(self, index: int, planned: PlannedStep, report: StepReport) -> bool:
        report.status = StepStatus.running
        report.attempts += 1
        report.started_at = now()
        report.url_before = self.page.url
        started = time.perf_counter()
        await self.listener.step_changed(self.report, report)
        log.info("job %s step %s: %s", self.job.job_id, planned.id, planned.action)
        timeout_ms = float(planned.step.timeout_ms or planned.frame.script.timeout_ms)
        full_page = False
        try:
            report.selector = await self.perform(planned, timeout_ms)
            if planned.step.expect is not None and not isinstance(planned.step, ExpectStep):
                await self.check(planned.step.expect, planned.frame, timeout_ms, postcondition=True)
            report.status = StepStatus.succeeded
            full_page = (
                isinstance(planned.step, ScreenshotStep) and planned.step.screenshot.full_page
            )
        except StepError as exc:
            report.failure = await self.explain(exc, planned.id)
            report.status = StepStatus.failed
        except PlaywrightError as exc:
            error = translate_playwright_error(exc, doing=f"{planned.action} failed")
            report.failure = await self.explain(error, planned.id)
            report.status = StepStatus.failed
        report.url = self.page.url
        if report.failure is None or report.failure.code != FailureCode.browser_crashed:
            await self.screenshot(index, planned.id, report, full_page=full_page)
        report.ended_at = now()
        report.duration_ms = _ms(started)
        await self.listener.step_changed(self.report, report)
        return report.status == StepStatus.succeeded

    async def explain(self, error: StepError, step_id: str) -> Failure:
        """Turn a raw step error into a classified, redacted Failure."""
        code, evidence = error.code, error.evidence
        if code != FailureCode.browser_crashed:
            try:
                state = await observe_page(
                    self.page, self.loaded.registry.detectors, self.document_status
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

    async def screenshot(
        self, index: int, step_id: str, report: StepReport, *, full_page: bool
    ) -> None:
        path, rel = self.runtime.artifacts.step_image(
            self.job.job_id, index + 1, step_id, IMAGE_SUFFIX
        )
        try:
            await capture(self.page, path, mask=self.masked, full_page=full_page)
            report.screenshot = rel
        except StepError as exc:
            log.warning("job %s step %s: %s", self.job.job_id, step_id, exc.message)

    # ------------------------------------------------------------ values

    def context_for(self, frame: Frame) -> dict[str, dict[str, Any]]:
        return {
            "inputs": self.inputs_of(frame),
            "secrets": self.secrets,
            "outputs": self.report.outputs,
        }

    def inputs_of(self, frame: Frame) -> dict[str, Any]:
        if frame.parent is None:
            return self.inputs
        key = id(frame)
        if key not in self.frame_inputs:
            parent = self.context_for(frame.parent)
            raw = {name: render(source, parent) for name, source in frame.bindings.items()}
            self.frame_inputs[key] = validate_inputs(frame.script, raw)
        return self.frame_inputs[key]

    def value(self, source: str, frame: Frame) -> str:
        return render(source, self.context_for(frame))

    def is_secret(self, source: str, frame: Frame) -> bool:
        specs = frame.script.inputs
        return any(
            ref.namespace == "secrets"
            or (ref.namespace == "inputs" and ref.name in specs and specs[ref.name].secret)
            for ref in references(source)
        )

    async def find(self, target: str, timeout_ms: float, state: WaitState = "visible") -> Resolved:
        return await resolve(
            self.page, self.loaded.registry, target, timeout_ms=timeout_ms, state=state
        )

    # ------------------------------------------------------------ actions

    async def perform(self, planned: PlannedStep, timeout_ms: float) -> MatchedSelector | None:
        step, frame = planned.step, planned.frame
        if isinstance(step, GotoStep):
            await self.goto(self.value(step.goto, frame), timeout_ms)
            return None
        if isinstance(step, FillStep):
            found = await self.find(step.fill.target, timeout_ms)
            if self.is_secret(step.fill.value, frame):
                # Registered before typing: a failure screenshot mid-fill is masked too.
                self.masked.append(found.locator)
            await found.locator.fill(self.value(step.fill.value, frame), timeout=timeout_ms)
            return found.matched
        if isinstance(step, SelectStep):
            found = await self.find(step.select.target, timeout_ms)
            if step.select.value is not None:
                await found.locator.select_option(
                    value=self.value(step.select.value, frame), timeout=timeout_ms
                )
            else:
                assert step.select.label is not None
                await found.locator.select_option(
                    label=self.value(step.select.label, frame), timeout=timeout_ms
                )
            return found.matched
        if isinstance(step, CheckStep):
            found = await self.find(step.check.target, timeout_ms)
            await found.locator.set_checked(step.check.checked, timeout=timeout_ms)
            return found.matched
        if isinstance(step, ClickStep):
            found = await self.find(step.click, timeout_ms)
            await found.locator.click(timeout=timeout_ms)
            return found.matched
        if isinstance(step, PressStep):
            if step.press.target is None:
                await self.page.keyboard.press(step.press.key)
                return None
            found = await self.find(step.press.target, timeout_ms)
            await found.locator.press(step.press.key, timeout=timeout_ms)
            return found.matched
        if isinstance(step, WaitForStep):
            if step.wait_for.target is not None:
                return (
                    await self.find(step.wait_for.target, timeout_ms, step.wait_for.state)
                ).matched
            assert step.wait_for.url is not None
            await self.check(
                Expectation(url=step.wait_for.url), frame, timeout_ms, postcondition=False
            )
            return None
        if isinstance(step, ExpectStep):
            return await self.check(step.expect, frame, timeout_ms, postcondition=False)
        if isinstance(step, ExtractStep):
            matched = None
            for name, spec in step.extract.items():
                found = await self.find(spec.target, timeout_ms, state="attached")
                matched = matched or found.matched
                raw = (
                    await found.locator.get_attribute(spec.attribute, timeout=timeout_ms)
                    if spec.attribute
                    else await found.locator.inner_text(timeout=timeout_ms)
                )
                self.report.outputs[name] = _extracted(raw or "", spec.pattern, name, spec.target)
            return matched
        if isinstance(step, ScreenshotStep):
            return None  # the capture after every step is the action
        raise StepError(FailureCode.script_error, f"no executor for action {planned.action!r}")

    async def goto(self, url: str, timeout_ms: float) -> None:
        base = self.job.site_url or str(self.loaded.registry.base_url)
        target = urljoin(base.rstrip("/") + "/", url.lstrip("/")) if "://" not in url else url
        host = urlsplit(target).hostname or ""
        allowed = set(self.loaded.registry.allowed_hosts)
        if self.job.site_url:
            allowed.add(urlsplit(self.job.site_url).hostname or "")
        if host not in allowed:
            raise StepError(
                FailureCode.navigation_blocked,
                f"{host!r} is not an allowed host of site {self.loaded.registry.site}",
            )
        response = await self.page.goto(target, timeout=timeout_ms, wait_until="load")
        if response is not None and response.status >= 400:
            code = (
                FailureCode.server_error
                if response.status >= 500
                else FailureCode.navigation_failed
            )
            raise StepError(code, f"GET {urlsplit(target).path} answered HTTP {response.status}")

    async def check(
        self, expectation: Expectation, frame: Frame, timeout_ms: float, *, postcondition: bool
    ) -> MatchedSelector | None:
        """Wait until `expectation` holds; StepError(expectation_failed) when it does not."""
        what = "postcondition" if postcondition else "expectation"
        try:
            if expectation.visible is not None:
                return (await self.find(expectation.visible, timeout_ms)).matched
            if expectation.hidden is not None:
                return (await self.find(expectation.hidden, timeout_ms, "hidden")).matched
            if expectation.text is not None:
                spec = expectation.text
                found = await self.find(spec.target, timeout_ms)
                assertion = expect(found.locator)
                if spec.equals is not None:
                    await assertion.to_have_text(self.value(spec.equals, frame), timeout=timeout_ms)
                elif spec.contains is not None:
                    await assertion.to_contain_text(
                        self.value(spec.contains, frame), timeout=timeout_ms
                    )
                else:
                    assert spec.matches is not None
                    await assertion.to_have_text(re.compile(spec.matches), timeout=timeout_ms)
                return found.matched
            assert expectation.url is not None
            await self.page.wait_for_url(re.compile(expectation.url), timeout=timeout_ms)
            return None
        except StepError as exc:
            if exc.code != FailureCode.selector_not_found:
                raise
            raise StepError(
                FailureCode.expectation_failed, f"{what} failed: {exc.message}"
            ) from exc
        except AssertionError as exc:
            first = str(exc).strip().splitlines()[0]
            raise StepError(FailureCode.expectation_failed, f"{what} failed: {first}") from exc
        except PlaywrightError as exc:
            raise StepError(
                FailureCode.expectation_failed,
                f"{what} failed: URL {self.page.url} does not match {expectation.url!r}",
            ) from exc


def _extracted(raw: str, pattern: str | None, name: str, target: str) -> str:
    text = " ".join(raw.split())
    if pattern is None:
        return text
    match = re.search(pattern, text)
    if match is None:
        raise StepError(
            FailureCode.expectation_failed,
            f"output {name!r}: {target} text does not match {pattern!r}",
            evidence=text[:200],
        )
    return match.group(1) if match.groups() else match.group(0)
