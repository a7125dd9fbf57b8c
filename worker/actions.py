"""What each step action does on a live page, and how postconditions are checked.

`PageActions` holds the page of one job and the values its templates read (inputs, secrets,
outputs). It knows nothing of attempts, rules or reports: the executor decides what happens
next; this module only does one thing on the page and says what it found.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urljoin, urlsplit

from playwright.async_api import Dialog, FilePayload, Locator, Page, Request, Response, expect
from playwright.async_api import Error as PlaywrightError

from worker.contract import (
    BrowserJob,
    DialogSeen,
    FailureCode,
    MatchedSelector,
    Verification,
)
from worker.errors import StepError
from worker.evidence import mark_secret, redact_script
from worker.failures import detectors_seen
from worker.script import (
    CheckStep,
    ClickStep,
    DialogSpec,
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
    SelectStep,
    UploadStep,
    WaitForStep,
    is_secret_reference,
    validate_inputs,
)
from worker.secretstore import Redactor
from worker.selectors import Candidate, Resolved, WaitState, combined, resolve, wait_any
from worker.templating import references, render
from worker.uploads import (
    INLINE_UPLOAD_BYTES,
    UploadRefused,
    discard_staged,
    read_upload,
    stage_upload,
)

log = logging.getLogger("formwork.actions")

# After a side effect, how long the expected page may still take once a detector showed up on
# a page that was already there before the action (the old page, still on screen).
_STALE_GRACE_MS = 2_000
# After an action's navigation landed on an HTTP error page: how long its document may take to
# be read (its detectors, the evidence), and how long a postcondition that the error page
# itself satisfies (a search's "no such record" served as a 404) still has to hold.
_LANDING_LOAD_MS = 5_000
_LANDING_LOOK_S = 0.25
# A navigation's failure that says the site gave no answer (see `_on_request_failed`).
_NO_ANSWER = (
    "ERR_CONNECTION_",
    "ERR_EMPTY_RESPONSE",
    "ERR_TIMED_OUT",
    "ERR_ADDRESS_UNREACHABLE",
    "ERR_NETWORK_",
    "ERR_INTERNET_DISCONNECTED",
)
# Such a navigation fails at once, but Chromium's error page commits only ~10-100 ms later, and
# until then the page can be neither read nor captured ("Not attached to an active page"): the
# step fails when the error page shows, or after this long if none does.
_NO_ANSWER_COMMIT_S = 1.0
_ERROR_PAGE = "chrome-error://"

T = TypeVar("T")


@dataclass
class Extracted:
    """An output as read from the page, with what is needed to judge the claim."""

    value: str
    step_id: str
    source: str
    verified: Verification


@dataclass
class PageActions:
    job: BrowserJob
    loaded: LoadedScript
    inputs: dict[str, Any]
    secrets: dict[str, str]
    page: Page
    outputs: dict[str, str] = field(default_factory=dict)
    extracted: dict[str, Extracted] = field(default_factory=dict)
    document_status: int | None = None
    navigations: int = 0
    responses: int = 0  # every response the page received (what may have set a cookie)
    # The URL on which a postcondition last held: what is read there was confirmed by it.
    confirmed_url: str | None = None
    dispatched: bool = False  # the current commit step's action reached the site
    probing: bool = False  # running the verify_effect probe: what it reads is verified by it
    entered: dict[str, str] = field(default_factory=dict)  # element -> value, secrets masked
    uploads: Path | None = None  # the only directory upload steps may take files from
    staged: Path | None = None  # the job's private copies of what it uploads (stage_upload)
    dialogs: list[DialogSeen] = field(default_factory=list)  # since the last take_dialogs()
    dialog: DialogSpec | None = None  # how the running step answers a dialog
    unexpected_dialog: DialogSeen | None = None
    _frame_inputs: dict[int, dict[str, Any]] = field(default_factory=dict)
    _first_found: Resolved | None = None  # the element the current step acts on
    _navigations_at_start: int = 0  # of the current step
    # The failure detectors showing before the current click or key press (see `check`).
    showing_before: frozenset[str] = frozenset()
    # Where the current step's action led the page when it led nowhere good: an HTTP error
    # document (`expectation_failed`, left to `classify` to read its status and page) or a
    # navigation that got no answer (`network_error`). Set by the page's own events, so a
    # postcondition stops waiting at once (see `_unless_landed`) at no cost to a step that
    # went well.
    landing: StepError | None = None
    _landed: asyncio.Event = field(default_factory=asyncio.Event)
    _committed: asyncio.Event = field(default_factory=asyncio.Event)  # a main-frame navigation
    # A call the page made during this step (fetch, XHR) that the site answered with a 5xx or
    # 429: what a page that drew "Search failed" (or nothing) after a click is showing.
    call_failure: tuple[str, int] | None = None
    # A frame of the page showing (a provider's widget) whose document got no answer: what
    # a step looking into it meets is Chromium's error page, until the page is loaded again.
    frame_no_answer: str | None = None
    _error_document: str | None = None  # an error response whose document is not shown yet
    _no_answer: str | None = None  # a navigation that got no answer, its error page not shown yet
    _no_answer_timer: asyncio.TimerHandle | None = None
    _redacting: bool = False
    # Every secret this job may type (configured, and inputs declared secret): text read from
    # the page passes through it before it becomes an output, a claim or evidence.
    redact: Redactor = field(init=False)

    def __post_init__(self) -> None:
        secret_inputs = self.loaded.secret_inputs(self.inputs).values()
        self.redact = Redactor([*self.secrets.values(), *secret_inputs])
        self.page.on("response", self._on_response)
        self.page.on("framenavigated", self._on_navigated)
        self.page.on("requestfailed", self._on_request_failed)
        # With a listener, Playwright no longer dismisses dialogs itself: this one must answer
        # every dialog, or the page (and the job) would wait forever.
        self.page.on("dialog", self._on_dialog)

    def _on_response(self, response: Response) -> None:
        self.responses += 1
        request, status = response.request, response.status
        if request.resource_type in ("fetch", "xhr") and (status >= 500 or status == 429):
            self.call_failure = (f"{request.method} {urlsplit(request.url).path}", status)
        # The status of the page's own document tells a 502 page from a changed form.
        if response.request.is_navigation_request() and response.frame == self.page.main_frame:
            self.document_status = status = response.status
            request = response.request
            self._error_document = (
                f"{request.method} {urlsplit(request.url).path} answered HTTP {status}"
                if status >= 400
                else None
            )

    def _on_navigated(self, frame: Any) -> None:
        if frame == self.page.main_frame:
            self.navigations += 1
            self._committed.set()
            self.frame_no_answer = None  # a new document, with new frames
            # Committed: the error page is the one showing now, and it can be read.
            if self._error_document is not None:
                self._land(FailureCode.expectation_failed, f"the page {self._error_document}")
                self._error_document = None
            self._land_no_answer()

    def _on_request_failed(self, request: Request) -> None:
        if not request.is_navigation_request():
            return
        failure = request.failure or ""
        # Only the site not answering: not a navigation stopped (`ERR_ABORTED`: Esc,
        # `Page.stopLoading`, another navigation), refused by the allowlist's proxy (the guard
        # reports it) or aborted by a route (`ERR_FAILED`: replay's request the HAR lacks).
        if not any(marker in failure for marker in _NO_ANSWER):
            return
        where = f"{request.method} {urlsplit(request.url).path}"
        if request.frame != self.page.main_frame:
            self.frame_no_answer = f"a frame's {where} got no answer from the site ({failure})"
            return
        self._forget_no_answer()
        self._no_answer = f"{where} got no answer from the site ({failure})"
        if self.page.main_frame.url.startswith(_ERROR_PAGE):
            self._land_no_answer()  # its error page was quicker than this event
        else:
            loop = asyncio.get_running_loop()
            self._no_answer_timer = loop.call_later(_NO_ANSWER_COMMIT_S, self._land_no_answer)

    def _land_no_answer(self) -> None:
        message = self._no_answer
        self._forget_no_answer()
        if message is not None:
            self._land(FailureCode.network_error, message)

    def _forget_no_answer(self) -> None:
        self._no_answer = None
        if self._no_answer_timer is not None:
            self._no_answer_timer.cancel()
            self._no_answer_timer = None

    def _land(self, code: FailureCode, message: str) -> None:
        self.landing = StepError(code, message)
        self._landed.set()

    async def _on_dialog(self, dialog: Dialog) -> None:
        """Answer as the running step declared; any other dialog is dismissed — never accepted:
        an unreviewed "Are you sure?" may be the very thing that must not happen."""
        spec = self.dialog
        expected = spec is not None and (
            spec.message is None or re.search(spec.message, dialog.message) is not None
        )
        accept = spec is not None and expected and spec.action == "accept"
        try:
            await (dialog.accept() if accept else dialog.dismiss())
        except PlaywrightError as exc:  # the page went away with its dialog
            log.warning("job %s: could not answer a dialog: %s", self.job.job_id, exc.message)
        seen = DialogSeen(
            type=dialog.type,
            message=dialog.message,
            action="accepted" if accept else "dismissed",
            expected=expected,
        )
        self.dialogs.append(seen)
        if not expected:
            self.unexpected_dialog = seen

    def take_dialogs(self) -> list[DialogSeen]:
        """The dialogs seen since the last call (for the step report)."""
        seen, self.dialogs = self.dialogs, []
        return seen

    def _no_unexpected_dialog(self) -> None:
        seen = self.unexpected_dialog
        if seen is not None:
            raise StepError(
                FailureCode.unexpected_page,
                f"the page opened an unexpected {seen.type} dialog (dismissed it)",
                evidence=seen.message,
            )

    # ------------------------------------------------------------ values

    def context_for(self, frame: Frame) -> dict[str, dict[str, Any]]:
        return {"inputs": self.inputs_of(frame), "secrets": self.secrets, "outputs": self.outputs}

    def inputs_of(self, frame: Frame) -> dict[str, Any]:
        if frame.parent is None:
            return self.inputs
        key = id(frame)
        if key not in self._frame_inputs:
            parent = self.context_for(frame.parent)
            raw = {name: render(source, parent) for name, source in frame.bindings.items()}
            self._frame_inputs[key] = validate_inputs(frame.script, raw)
        return self._frame_inputs[key]

    def value(self, source: str, frame: Frame) -> str:
        return render(source, self.context_for(frame))

    def is_secret(self, source: str, frame: Frame) -> bool:
        return any(is_secret_reference(ref, frame.script) for ref in references(source))

    async def find(
        self, target: str, frame: Frame, timeout_ms: float, state: WaitState = "visible"
    ) -> Resolved:
        found = await resolve(
            self.page,
            self.loaded.registry,
            target,
            timeout_ms=timeout_ms,
            state=state,
            context=self.context_for(frame),
        )
        self._first_found = self._first_found or found
        return found

    # ------------------------------------------------------------ actions

    async def perform(self, planned: PlannedStep, timeout_ms: float) -> MatchedSelector | None:
        """Do the step's action. Raises StepError (or Playwright's errors) when it cannot."""
        self.dialog, self.unexpected_dialog = planned.step.dialog, None
        if not self._redacting and self.loaded.script.redact:
            self._redacting = True
            script = redact_script(self.loaded.script.redact)
            await self.page.add_init_script(script)  # every later document of this page
            await self.page.evaluate(script)  # and the one showing now (a resumed job's)
        self._first_found = None
        self.showing_before = frozenset()
        self._navigations_at_start = self.navigations
        self.landing = None
        self._landed.clear()
        self._forget_no_answer()
        self.call_failure = None
        matched = await self._perform(planned, timeout_ms)
        self._no_unexpected_dialog()
        return matched

    def entered_by(self, planned: PlannedStep) -> str | None:
        """What a fill or select step put in its element ('***' for a secret); None for others."""
        step = planned.step
        if isinstance(step, FillStep):
            return self.entered.get(step.fill.target)
        if isinstance(step, SelectStep):
            return self.entered.get(step.select.target)
        return None

    def acted_on(self) -> Locator | None:
        """The element the step acted on, while its page is still the one showing (a step that
        navigated away has nothing left to point at)."""
        if self._first_found is None or self.navigations != self._navigations_at_start:
            return None
        return self._first_found.locator

    async def _perform(self, planned: PlannedStep, timeout_ms: float) -> MatchedSelector | None:
        step, frame = planned.step, planned.frame
        if isinstance(step, GotoStep):
            await self.goto(self.value(step.goto, frame), timeout_ms)
            return None
        if isinstance(step, FillStep):
            found = await self.find(step.fill.target, frame, timeout_ms)
            value = self.value(step.fill.value, frame)
            secret = self.is_secret(step.fill.value, frame)
            if secret:
                # Masked before typing: no frame ever paints the value, even mid-fill.
                await mark_secret(found.locator, timeout_ms)
            self.entered[step.fill.target] = "***" if secret else value
            await found.locator.fill(value, timeout=timeout_ms)
            if found.matched.index:
                # A fallback candidate is only trusted when the field really took the value.
                await self._holds(expect(found.locator).to_have_value(value, timeout=timeout_ms))
            elif not secret:
                await self._took_whole(found.locator, step.fill.target, value)
            return found.matched
        if isinstance(step, SelectStep):
            found = await self.find(step.select.target, frame, timeout_ms)
            if step.select.value is not None:
                choice = self.value(step.select.value, frame)
                self.entered[step.select.target] = choice
                await found.locator.select_option(value=choice, timeout=timeout_ms)
            else:
                assert step.select.label is not None
                label = self.value(step.select.label, frame)
                self.entered[step.select.target] = label
                await found.locator.select_option(label=label, timeout=timeout_ms)
            return found.matched
        if isinstance(step, CheckStep):
            found = await self.find(step.check.target, frame, timeout_ms)
            await found.locator.set_checked(step.check.checked, timeout=timeout_ms)
            return found.matched
        if isinstance(step, UploadStep):
            return await self.upload(step, frame, timeout_ms)
        # A commit counts as sent from the moment the click or key press starts: Playwright's
        # click waits for the navigation it starts, so a request whose answer never comes
        # surfaces as a click timeout — after the site may well have acted on it.
        if isinstance(step, ClickStep):
            found = await self._find_and_look(step, step.click, frame, timeout_ms)
            self.dispatched = step.commit
            await found.locator.click(timeout=timeout_ms)
            return found.matched
        if isinstance(step, PressStep):
            if step.press.target is None:
                self.showing_before = await self._showing_before(step)
                self.dispatched = step.commit
                await self.page.keyboard.press(step.press.key)
                return None
            found = await self._find_and_look(step, step.press.target, frame, timeout_ms)
            self.dispatched = step.commit
            await found.locator.press(step.press.key, timeout=timeout_ms)
            return found.matched
        if isinstance(step, WaitForStep):
            if step.wait_for.target is not None:
                return (
                    await self.find(step.wait_for.target, frame, timeout_ms, step.wait_for.state)
                ).matched
            assert step.wait_for.url is not None
            await self.check(Expectation(url=step.wait_for.url), frame, timeout_ms)
            return None
        if isinstance(step, ExpectStep):
            return await self.check(step.expect, frame, timeout_ms, postcondition=False)
        if isinstance(step, ExtractStep):
            return await self.extract(planned, step, timeout_ms, probe=self.probing)
        if isinstance(step, ScreenshotStep):
            return None  # the capture after every step is the action
        raise StepError(FailureCode.script_error, f"no executor for action {planned.action!r}")

    async def _find_and_look(
        self, step: ClickStep | PressStep, target: str, frame: Frame, timeout_ms: float
    ) -> Resolved:
        """Find the element to act on and, at the same time (both only read the page), note
        which failure detectors show before the action (see `check`)."""
        found, self.showing_before = await asyncio.gather(
            self.find(target, frame, timeout_ms), self._showing_before(step)
        )
        return found

    async def _showing_before(self, step: ClickStep | PressStep) -> frozenset[str]:
        if step.expect is None:
            return frozenset()
        return frozenset(await detectors_seen(self.page, self.loaded.registry.detectors.selectors))

    async def upload(self, step: UploadStep, frame: Frame, timeout_ms: float) -> MatchedSelector:
        """Hand a file from the uploads directory to a file input (the input may be hidden
        behind a styled button, so it only needs to be in the page)."""
        name = self.value(step.upload.file, frame)
        try:
            file = await asyncio.to_thread(read_upload, self.uploads, name)
        except UploadRefused as exc:
            raise StepError(FailureCode.script_error, str(exc)) from exc
        found = await self.find(step.upload.target, frame, timeout_ms, state="attached")
        self.entered[step.upload.target] = file.name
        har = self.job.har if self.job.har is not None else self.loaded.script.har
        if har or len(file.content) <= INLINE_UPLOAD_BYTES:
            payload = FilePayload(name=file.name, mimeType=file.mime_type, buffer=file.content)
            await found.locator.set_input_files(payload, timeout=timeout_ms)
        else:
            self.staged, copy = await asyncio.to_thread(stage_upload, file, self.staged)
            await found.locator.set_input_files(copy, timeout=timeout_ms)
        return found.matched

    async def discard_uploads(self) -> None:
        """Remove the job's upload copies: its page will send no form any more."""
        await asyncio.to_thread(discard_staged, self.staged)
        self.staged = None

    async def extract(
        self, planned: PlannedStep, step: ExtractStep, timeout_ms: float, *, probe: bool = False
    ) -> MatchedSelector | None:
        matched = None
        for name, spec in step.extract.items():
            found = await self.find(spec.target, planned.frame, timeout_ms, state="attached")
            matched = matched or found.matched
            raw = (
                await found.locator.get_attribute(spec.attribute, timeout=timeout_ms)
                if spec.attribute
                else await found.locator.inner_text(timeout=timeout_ms)
            )
            # Redacted before the pattern sees it: a page that echoes a secret (a sign-in name
            # filled back into its field, a banner repeating it) must not make it an output,
            # which travels in the clear in reports, claims, checkpoints and later steps.
            text = self.redact(raw) or ""
            value = _extracted(text, spec.pattern, name, spec.target)
            self.outputs[name] = value
            verified = (
                Verification.probe
                if probe
                else Verification.postcondition
                if self.page.url == self.confirmed_url
                else Verification.none
            )
            self.extracted[name] = Extracted(
                value=value,
                step_id=planned.id,
                source=self.redact(f"{spec.target} ({found.matched.candidate}) on {self.page.url}")
                or "",
                verified=verified,
            )
        return matched

    async def goto(self, url: str, timeout_ms: float) -> None:
        base = self.job.site_url or str(self.loaded.registry.base_url)
        target = urljoin(base.rstrip("/") + "/", url.lstrip("/")) if "://" not in url else url
        host = urlsplit(target).hostname or ""
        # The job's site_url was checked against the same list at intake.
        if host not in self.loaded.registry.allowed_hosts:
            raise StepError(
                FailureCode.navigation_blocked,
                f"{host!r} is not an allowed host of site {self.loaded.registry.site}",
            )
        self._committed.clear()
        try:
            response = await self.page.goto(target, timeout=timeout_ms, wait_until="load")
        except PlaywrightError as exc:
            if any(marker in exc.message for marker in _NO_ANSWER):
                # goto fails the moment the site does not answer, before Chromium's error page
                # commits and loads: read then, that page replaces the one being read. (A retry
                # starts on the last error page: its address says nothing.)
                with contextlib.suppress(TimeoutError, PlaywrightError):
                    async with asyncio.timeout(_NO_ANSWER_COMMIT_S):
                        await self._committed.wait()
                        await self.page.wait_for_load_state("load")
            raise
        if response is not None and response.status >= 400:
            code = (
                FailureCode.server_error
                if response.status >= 500
                else FailureCode.navigation_failed
            )
            raise StepError(code, f"GET {urlsplit(target).path} answered HTTP {response.status}")

    async def check(
        self,
        expectation: Expectation,
        frame: Frame,
        timeout_ms: float,
        *,
        postcondition: bool = True,
        navigations_before: int | None = None,
        detectors_before: frozenset[str] = frozenset(),
    ) -> MatchedSelector | None:
        """Wait until `expectation` holds; StepError(expectation_failed) when it does not.

        A `visible` postcondition after a side effect races the site's failure detectors, so a
        rejected form fails in milliseconds instead of after the whole timeout. A detector counts
        only if it belongs to the page the action led to: after a navigation, or one that was
        not showing before the action (the old page may still be on screen for a moment).
        """
        what = "postcondition" if postcondition else "expectation"
        waiting = self._holding(
            expectation, frame, timeout_ms, navigations_before, detectors_before
        )
        try:
            if navigations_before is not None:
                matched = await self._unless_landed(waiting)
            else:
                matched = await waiting
        except StepError as exc:
            if exc.code not in (FailureCode.selector_not_found, FailureCode.expectation_failed):
                raise
            raise StepError(
                FailureCode.expectation_failed, f"{what} failed: {exc.message}"
            ) from exc
        self._no_unexpected_dialog()
        self.confirmed_url = self.page.url
        return matched

    async def _holding(
        self,
        expectation: Expectation,
        frame: Frame,
        timeout_ms: float,
        navigations_before: int | None,
        detectors_before: frozenset[str],
    ) -> MatchedSelector | None:
        """Wait until `expectation` holds (see `check`)."""
        if expectation.visible is not None and navigations_before is not None:
            return await self._race(
                expectation.visible, frame, timeout_ms, navigations_before, detectors_before
            )
        if expectation.visible is not None:
            return (await self.find(expectation.visible, frame, timeout_ms)).matched
        if expectation.hidden is not None:
            return (await self.find(expectation.hidden, frame, timeout_ms, "hidden")).matched
        if expectation.text is not None:
            return await self._text(expectation, frame, timeout_ms)
        assert expectation.url is not None
        await self._holds(
            self.page.wait_for_url(re.compile(expectation.url), timeout=timeout_ms),
            f"URL {self.page.url} does not match {expectation.url!r}",
        )
        return None

    async def _unless_landed(self, waiting: Awaitable[T]) -> T:
        """`waiting` (a postcondition after a click or key press), unless the action's
        navigation lands on an HTTP error page or gets no answer first: then the step fails at
        once (`landing`), instead of when the postcondition times out."""
        holds = asyncio.ensure_future(waiting)
        landed = asyncio.ensure_future(self._landed.wait())
        try:
            await asyncio.wait((holds, landed), return_when=asyncio.FIRST_COMPLETED)
            landing = self.landing
            if not holds.done() and landing and landing.code != FailureCode.network_error:
                with contextlib.suppress(PlaywrightError):
                    await self.page.wait_for_load_state(
                        "domcontentloaded", timeout=_LANDING_LOAD_MS
                    )
                await asyncio.wait((holds,), timeout=_LANDING_LOOK_S)
        finally:
            landed.cancel()
            if not holds.done():
                holds.cancel()
        await asyncio.wait((holds,))
        if self.landing is None or (not holds.cancelled() and holds.exception() is None):
            return holds.result()  # the postcondition held (or failed on its own)
        if not holds.cancelled():
            holds.exception()  # retrieved: the landing says more than a postcondition's miss
        raise self.landing

    async def _race(
        self,
        target: str,
        frame: Frame,
        timeout_ms: float,
        navigations_before: int,
        detectors_before: frozenset[str],
    ) -> MatchedSelector:
        watched = self.loaded.registry.detectors.selectors
        if not watched:
            return (await self.find(target, frame, timeout_ms)).matched
        expected = [
            c.render(self.context_for(frame)) for c in self.loaded.registry.candidates(target)
        ]
        expected += [Candidate(css=selector) for selector in watched]
        either = combined(expected, [candidate.locator(self.page) for candidate in expected])
        try:
            await wait_any(either, "visible", timeout_ms)
        except PlaywrightError:
            pass  # the plain wait below gives the precise message
        else:
            # Usually the expected page is what showed up: settle that in one short look.
            with contextlib.suppress(StepError):
                return (await self.find(target, frame, 50)).matched
            showing = await detectors_seen(self.page, watched)
            fresh = showing - detectors_before or self.navigations > navigations_before
            if showing and fresh:
                raise StepError(
                    FailureCode.expectation_failed,
                    f"element {target!r} not visible: the page shows a failure instead",
                )
            if showing:
                timeout_ms = min(timeout_ms, _STALE_GRACE_MS)
        return (await self.find(target, frame, timeout_ms)).matched

    async def _text(
        self, expectation: Expectation, frame: Frame, timeout_ms: float
    ) -> MatchedSelector:
        spec = expectation.text
        assert spec is not None
        found = await self.find(spec.target, frame, timeout_ms)
        assertion = expect(found.locator)
        if spec.equals is not None:
            check = assertion.to_have_text(self.value(spec.equals, frame), timeout=timeout_ms)
        elif spec.contains is not None:
            check = assertion.to_contain_text(self.value(spec.contains, frame), timeout=timeout_ms)
        else:
            assert spec.matches is not None
            check = assertion.to_have_text(re.compile(spec.matches), timeout=timeout_ms)
        await self._holds(check)
        return found.matched

    @staticmethod
    async def _took_whole(locator: Locator, target: str, value: str) -> None:
        """StepError(validation_rejected) when the field kept only the start of `value`: a
        `maxlength` cuts a fill short without a word (Playwright types what fits), and the
        site then keeps the cut value while the step said it entered the whole. A field whose
        own script reformats what it is given (`15` shown as `$15.00`) is not a cut: what the
        site makes of it is for the step's postconditions to judge."""
        # One round trip: `evaluate` on a locator is three (find, evaluate, let go), and the
        # field was just filled, so there is nothing to wait for.
        held = await locator.evaluate_all(_FIELD_VALUE_JS)
        if held is None or not _cut_short(value, held[0]):
            return
        limit = f" (its maxlength is {held[1]})" if held[1] else ""
        raise StepError(
            FailureCode.validation_rejected,
            f"fill of {target}: the field kept {len(held[0])} of the value's {len(value)} "
            f"characters{limit}: the site would get another value than the one given",
            evidence=f"{target} takes at most {held[1]} characters" if held[1] else None,
        )

    @staticmethod
    async def _holds(check: Any, message: str | None = None) -> None:
        """Await a Playwright assertion or wait, turning its failure into expectation_failed."""
        try:
            await check
        except AssertionError as exc:
            first = str(exc).strip().splitlines()[0]
            raise StepError(FailureCode.expectation_failed, message or first) from exc
        except PlaywrightError as exc:
            raise StepError(FailureCode.expectation_failed, message or exc.message) from exc

    async def side_effect_check(self) -> None:
        """After a click or key press with no postcondition: trouble the page shows is a
        failure, not a success."""
        if self.landing is not None:
            raise self.landing
        detectors = self.loaded.registry.detectors
        validation = await detectors_seen(self.page, detectors.validation_error)
        if validation:
            raise StepError(FailureCode.validation_rejected, "the site rejected the form")
        if await detectors_seen(self.page, detectors.login_page):
            raise StepError(FailureCode.auth_expired, "the site asks to sign in again")
        self._no_unexpected_dialog()


def _extracted(raw: str, pattern: str | None, name: str, target: str) -> str:
    text = " ".join(raw.split())
    if pattern is None:
        return text
    match = re.search(pattern, text)
    if match is None:
        raise StepError(
            FailureCode.expectation_failed,
            f"output {name!r}: {target} text does not match {pattern!r}",
            evidence=text if len(text) <= 200 else text[:199] + "…",  # see failures._evidence
        )
    return match.group(1) if match.groups() else match.group(0)


# The value a filled element holds and its maxlength; null for an element with no value
# (a contenteditable), which has nothing to compare.
_FIELD_VALUE_JS = """([el]) => (el && 'value' in el && typeof el.value === 'string')
  ? [el.value, el.getAttribute('maxlength')] : null"""


def _cut_short(value: str, held: str) -> bool:
    """Whether a field holding `held` kept only the start of `value`, as browsers keep text:
    line breaks normalised (a textarea keeps `\\n`, a one-line input makes each a space) and
    the ends trimmed (an email field trims; so do the sites)."""
    lines = re.sub(r"\r\n?", "\n", value)
    kept = held.strip()
    return any(
        len(kept) < len(whole) and whole.startswith(kept)
        for whole in (lines.strip(), lines.replace("\n", " ").strip())
    )
