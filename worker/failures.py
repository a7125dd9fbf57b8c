"""The failure taxonomy in action: translate browser errors, classify what the page shows.

`translate_playwright_error` is the one place Playwright's exceptions become Formwork's.
`classify` is a pure function from a failed step and an observed page state to the final code:
a step that timed out waiting for the confirmation is really a `validation_rejected` when the
page shows a field error, or `auth_expired` when it shows a login form.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from playwright.async_api import Error as PlaywrightError
from playwright.async_api import Page
from playwright.async_api import TimeoutError as PlaywrightTimeoutError

from worker.contract import FailureCode
from worker.errors import StepError
from worker.selectors import Detectors

# Codes that only say "the expected thing did not happen": what the page shows may explain why.
_VAGUE = {
    FailureCode.timeout,
    FailureCode.selector_not_found,
    FailureCode.expectation_failed,
    FailureCode.navigation_failed,
}
_NETWORK_MARKERS = ("net::ERR_", "NS_ERROR_", "ECONNREFUSED", "Connection refused")
_CRASH_MARKERS = (
    "Target page, context or browser has been closed",
    "Target crashed",
    # A navigation on a page whose renderer died: "Page.goto: Page crashed", or "Navigation
    # failed because page crashed!" (read as a script error, a probe's goto made the commit
    # it checked a person's to decide, where a fresh run would have looked).
    "Page crashed",
    "page crashed",
    "Browser has been closed",
    "browser has disconnected",
)
_EVIDENCE_LIMIT = 500


def translate_playwright_error(exc: PlaywrightError, *, doing: str) -> StepError:
    """Map a Playwright exception to a StepError: the most specific class wins."""
    first_line = (exc.message or str(exc)).strip().splitlines()[0] if str(exc) else "error"
    if isinstance(exc, PlaywrightTimeoutError):
        return StepError(FailureCode.timeout, f"{doing}: timed out ({first_line})")
    text = str(exc)
    if any(marker in text for marker in _CRASH_MARKERS):
        return StepError(FailureCode.browser_crashed, f"{doing}: browser gone ({first_line})")
    if any(marker in text for marker in _NETWORK_MARKERS):
        return StepError(FailureCode.network_error, f"{doing}: {first_line}")
    return StepError(FailureCode.script_error, f"{doing}: {first_line}")


@dataclass(frozen=True)
class PageState:
    """What the page showed when a step failed: plain data, so classification is testable."""

    url: str = ""
    status: int | None = None  # HTTP status of the last document response
    login_page: bool = False
    validation_errors: list[str] = field(default_factory=list)
    error_banners: list[str] = field(default_factory=list)
    # A call of the page's own (fetch, XHR) during the step the site answered with a 5xx or
    # 429, and that status: the page may draw that failure any way it likes, or not at all.
    call: str = ""
    call_status: int | None = None
    # A frame of the page (a provider's widget) whose document got no answer, said how.
    frame_no_answer: str = ""


def status_code(status: int) -> FailureCode:
    """The code an HTTP error status of the page's own document means.

    5xx is the site failing (`server_error`), and so is 429, the site refusing load for now:
    both are worth another try after a wait. 408 is a request the site gave up waiting for
    (`timeout`). Any other 4xx (a record gone: 404, 410; access refused: 401, 403 without a
    sign-in form) is a page the script does not know: `unexpected_page`. A 401 or 403 that
    shows the sign-in form is `auth_expired`, as any login page is (see `classify`).
    """
    if status >= 500 or status == 429:
        return FailureCode.server_error
    if status == 408:
        return FailureCode.timeout
    return FailureCode.unexpected_page


def classify(code: FailureCode, state: PageState) -> tuple[FailureCode, str | None]:
    """Refine a vague failure code by what the page shows; return (code, evidence)."""
    if code not in _VAGUE:
        return code, None
    if state.login_page:
        # The form's own error ("Invalid username or password") says more than where it is.
        where = f"redirected to a login page ({state.url})"
        return FailureCode.auth_expired, _evidence(state.error_banners) or where
    status = state.status
    if status is not None and status >= 500:
        return status_code(status), _evidence(state.error_banners) or f"HTTP {status}"
    if state.validation_errors:
        # Before other 4xx: a form refused with 400 or 422 shows its field errors.
        return FailureCode.validation_rejected, _evidence(state.validation_errors)
    if status is not None and status >= 400:
        return status_code(status), _evidence(state.error_banners) or f"HTTP {status}"
    if state.call_status is not None:
        answered = f"{state.call} answered HTTP {state.call_status}"
        return status_code(state.call_status), _evidence(state.error_banners) or answered
    if state.frame_no_answer:
        return FailureCode.network_error, state.frame_no_answer
    if state.error_banners:
        return code, _evidence(state.error_banners)
    return code, None


def _evidence(texts: list[str]) -> str | None:
    joined = " | ".join(t for t in (" ".join(t.split()) for t in texts) if t)
    if len(joined) > _EVIDENCE_LIMIT:
        # Cut with an ellipsis: the evidence is redacted after this, and a secret the cut falls
        # inside is only recognised by its head running into `…` (see `Redactor`).
        return joined[: _EVIDENCE_LIMIT - 1] + "…"
    return joined or None


# One round trip for all detectors: which selectors match a visible element, and its text.
_DETECT_JS = """
(selectors) => {
  const found = {};
  for (const selector of selectors) {
    let nodes;
    try { nodes = document.querySelectorAll(selector); } catch (e) {
      (found[""] = found[""] || []).push(selector);  // not valid CSS
      continue;
    }
    const texts = [];
    for (const node of nodes) {
      const box = node.getBoundingClientRect();
      const style = getComputedStyle(node);
      if (box.width > 0 && box.height > 0 && style.visibility !== "hidden") {
        texts.push(node.innerText || "");
      }
    }
    if (texts.length) found[selector] = texts;
  }
  return found;
}
"""


_INVALID = ""  # the key under which _DETECT_JS lists selectors that are not valid CSS


async def _detect(page: Page, selectors: list[str]) -> dict[str, list[str]]:
    if not selectors:
        return {}
    found: dict[str, list[str]] = await page.evaluate(_DETECT_JS, selectors)
    return found


async def detectors_seen(page: Page, selectors: list[str]) -> set[str]:
    """The selectors among `selectors` that match a visible element right now. Read before
    every click that expects something, so a detector that is not valid CSS (and would never
    see the error it is there for) stops the first job that uses it, before the click."""
    try:
        found = await _detect(page, selectors)
    except PlaywrightError:
        return set()  # the page is navigating: nothing is showing yet
    invalid = found.pop(_INVALID, [])
    if invalid:
        raise StepError(
            FailureCode.script_error,
            f"selector registry: failure detector(s) {invalid} are not valid CSS",
        )
    return set(found)


async def observe_page(
    page: Page,
    detectors: Detectors,
    status: int | None,
    call_failure: tuple[str, int] | None = None,
    frame_no_answer: str | None = None,
) -> PageState:
    """Read the detectors off the live page (the thin shell around `classify`)."""
    found = await _detect(page, detectors.selectors)
    found.pop(_INVALID, None)  # said before the click (detectors_seen); the step failed anyway

    def texts(selectors: list[str]) -> list[str]:
        return [text for selector in selectors for text in found.get(selector, [])]

    return PageState(
        url=page.url,
        status=status,
        login_page=any(selector in found for selector in detectors.login_page),
        validation_errors=texts(detectors.validation_error),
        error_banners=texts(detectors.error_banner),
        call=call_failure[0] if call_failure else "",
        call_status=call_failure[1] if call_failure else None,
        frame_no_answer=frame_no_answer or "",
    )
