"""A commit's request leaves the browser once: Chromium's own resend is taken out of its hands.

When a connection drops before any answer (a reset, a gateway cutting an idle keep-alive
connection), Chromium's network stack sends the request again, by itself, once — a POST too,
and even on a fresh connection (measured: with every POST reset, two reach the server). It does
so below DevTools: the page and the worker see one request. A site that took the first and then
lost the connection gets the commit twice, and the worker reports one confirmed success.

So while a commit step runs, every request that could change the site (any method but GET,
HEAD, OPTIONS) to a host the job may reach is sent by Playwright's own HTTP client instead
(`Route.fetch`), which never resends, and its answer is handed to the page as it came
(`Route.fulfill`), redirects included (the browser follows them itself). A request that gets no
answer fails in the page as a reset: the step sees its commit sent and not confirmed, and the
site is asked whether it happened (the commit's probe) — the rule for every unconfirmed commit.

Only commit steps pay for it: a route pauses each request of the context in the driver, and
turns Chromium's HTTP cache off while it is installed (`worker.guard` explains why the
allowlist is not a route). Left to Chromium, as before: a request whose body DevTools does not
hand over whole (a form with a file in it), and one to a host outside the allowlist (the
guard's proxy refuses it without a byte sent).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Iterable

from playwright.async_api import BrowserContext, Request, Route
from playwright.async_api import Error as PlaywrightError

from worker.guard import outside

log = logging.getLogger("formwork.sendonce")

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_background: set[asyncio.Task[None]] = set()  # routes waiting for their last answer


@contextlib.asynccontextmanager
async def sent_once(
    context: BrowserContext, hosts: Iterable[str] | None, timeout_ms: float
) -> AsyncIterator[None]:
    """While inside, the context's requests that could change the site are sent once, by
    Playwright's HTTP client; `hosts` is the job's allowlist (None: any host)."""
    elsewhere: re.Pattern[str] | None = outside(hosts) if hosts is not None else None

    pending: set[asyncio.Task[None]] = set()

    async def handler(route: Route, request: Request) -> None:
        # Kept until its answer is in: with the route gone, the driver would let a request it
        # still holds go on through Chromium — sent a second time.
        task = asyncio.current_task()
        assert task is not None
        pending.add(task)
        try:
            await _send(route, request)
        finally:
            pending.discard(task)

    async def _send(route: Route, request: Request) -> None:
        if (
            request.method in SAFE_METHODS
            or (elsewhere is not None and elsewhere.match(request.url))
            or not _whole_body(request)
        ):
            await route.fallback()
            return
        log.debug("%s %s: sent by Playwright, not by Chromium", request.method, request.url)
        try:
            response = await route.fetch(max_redirects=0, timeout=timeout_ms)
        except PlaywrightError as exc:
            # No answer: the page sees the reset it would have seen, without the resend.
            # First line only: the call log after it lists the request's headers (its cookies).
            why = exc.message.splitlines()[0] if exc.message else type(exc).__name__
            log.info("%s %s got no answer (%s): not sent again", request.method, request.url, why)
            with contextlib.suppress(PlaywrightError):  # the page may have moved on
                await route.abort("connectionreset")
            return
        with contextlib.suppress(PlaywrightError):
            await route.fulfill(response=response)

    await context.route("**/*", handler)

    async def unroute() -> None:
        if pending:
            await asyncio.wait(set(pending))
        with contextlib.suppress(PlaywrightError):  # the context may be gone with its browser
            await context.unroute("**/*", handler)

    try:
        yield
    finally:
        if pending:
            # A request still out (a hanging commit) keeps the route until its answer is in;
            # the step does not wait for it: a job cut short (its timeout) must end now.
            task = asyncio.create_task(unroute(), name="sendonce-unroute")
            _background.add(task)
            task.add_done_callback(_background.discard)
        else:
            await unroute()


def _whole_body(request: Request) -> bool:
    """Whether DevTools handed over the request's whole body. It leaves out a file's bytes: a
    form's file part comes with its headers and nothing in it (and a Blob's body may come
    empty). Sent from that, the site would get the form without its file."""
    body = request.post_data_buffer
    if not body:
        return False
    kind = (request.headers.get("content-type") or "").lower()
    return not (kind.startswith("multipart/") and b'filename="' in body)
