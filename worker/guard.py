"""The navigation allowlist, enforced on every request a job's browser makes.

A script's `goto` is checked before it runs, but a page can send the browser anywhere by
itself: a link, a redirect, a form action, an injected `fetch()`. So each job's context routes
every request whose host is not one of the site's `allowed_hosts` to a handler that aborts it
and writes it down; the executor turns what was written into a `navigation_blocked` failure of
the step during which it happened.

The pattern is a regular expression Playwright matches in the browser's driver: requests to
allowed hosts (nearly all of them) are never intercepted, so the guard costs nothing on the
normal path.

Playwright never routes the later hops of a redirect (by design, for all browsers), so a
redirect from an allowed page to another host would slip through. Redirects are caught one
level down, on the job's DevTools session: every document response is paused at the response
stage (one round trip per page load), and a 3xx whose `Location` leaves the allowlist is failed
before the browser follows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import urljoin, urlsplit

from playwright.async_api import BrowserContext, CDPSession, Route
from playwright.async_api import Error as PlaywrightError

log = logging.getLogger("formwork.guard")


def outside(hosts: Iterable[str]) -> re.Pattern[str]:
    """Matches http(s) and ws(s) URLs whose host is none of `hosts` (any port)."""
    alternatives = "|".join(re.escape(h) for h in sorted(set(hosts)))
    return re.compile(rf"^(?:https?|wss?)://(?!(?:{alternatives})(?::\d+)?(?:[/?#]|$))")


class Guard:
    """Aborts a context's requests to hosts outside the allowlist; remembers each one."""

    def __init__(self, hosts: Iterable[str]) -> None:
        self.hosts = set(hosts)
        self.pattern = outside(self.hosts)
        self.blocked: list[str] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def install(self, context: BrowserContext, cdp: CDPSession | None = None) -> None:
        await context.route(self.pattern, self._block)
        if cdp is not None:
            cdp.on("Fetch.requestPaused", self._paused)
            await cdp.send(
                "Fetch.enable",
                {
                    "patterns": [
                        {"urlPattern": "*", "resourceType": "Document", "requestStage": "Response"}
                    ]
                },
            )
            self._cdp = cdp

    def _paused(self, event: dict[str, Any]) -> None:
        task = asyncio.create_task(self._answer(event))
        self._tasks.add(task)  # held until done: an unreferenced task may be collected
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, event: dict[str, Any]) -> None:
        request_id = event["requestId"]
        status = event.get("responseStatusCode") or 0
        headers = event.get("responseHeaders") or []
        location = next((h["value"] for h in headers if h["name"].lower() == "location"), None)
        with contextlib.suppress(PlaywrightError):  # the page may be gone already
            if 300 <= status < 400 and location:
                target = urljoin(event["request"]["url"], location)
                if (urlsplit(target).hostname or "") not in self.hosts:
                    self.blocked.append(f"GET {target} (redirect)")
                    log.warning(
                        "blocked a redirect to %s, outside the allowlist", urlsplit(target).hostname
                    )
                    await self._cdp.send(
                        "Fetch.failRequest",
                        {"requestId": request_id, "errorReason": "BlockedByClient"},
                    )
                    return
            await self._cdp.send("Fetch.continueResponse", {"requestId": request_id})

    async def _block(self, route: Route) -> None:
        request = route.request
        self.blocked.append(f"{request.method} {request.url}")
        # The host only: the URL itself may carry what the page tried to send out; the step's
        # failure keeps it, redacted.
        log.warning(
            "blocked a request to %s, outside the allowlist", urlsplit(request.url).hostname
        )
        await route.abort("blockedbyclient")

    def since(self, mark: int) -> list[str]:
        return self.blocked[mark:]
