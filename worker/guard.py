"""The navigation allowlist, enforced by Chromium's own network stack for every request a job's
context makes.

A script's `goto` is checked before it runs, but a page can send the browser anywhere by
itself: a link, a redirect, a form, an injected `fetch()`, a popup, a worker, a WebSocket. So
each job's context is made with a proxy configuration (`proxy_for`): the site's
`allowed_hosts` bypass the proxy and go direct, and every other host is sent to a "proxy" that
is a port bound on 127.0.0.1 and never listened on (`Sink`). Chromium fails such a request
(`net::ERR_PROXY_CONNECTION_FAILED`) before a byte of it leaves the machine.

Why a proxy rule rather than intercepting requests: Chromium applies proxy rules to everything
the context does — every hop of a redirect, popups, dedicated workers, WebSockets, subresources
— with no round trip per request. Allowed traffic pays nothing and the HTTP cache stays on. The
guard this replaced routed every request through Playwright (which pauses each one and turns
the cache off) and paused each page load once more for redirects: ~100 ms and ~125 ms of CPU
per billing job, measured in pairs against this one; and it still let WebSockets and
subresource redirects through. tests/test_guard.py tries each way out.

Because the allowlist is fixed when the context is made, `BrowserHost` keeps a warm page per
allowlist (the site of the worker's last job), see `worker.browser`.

`Guard` writes down what the page tried, from the context's request events (Chromium announces
a request before it fails it); the executor turns that into a `navigation_blocked` failure of
the step during which it happened.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

from playwright.async_api import BrowserContext, Page, ProxySettings, Request, WebSocket

from worker.secretstore import Redactor

log = logging.getLogger("formwork.guard")


def outside(hosts: Iterable[str]) -> re.Pattern[str]:
    """Matches http(s) and ws(s) URLs whose host is none of `hosts` (any port)."""
    alternatives = "|".join(re.escape(h) for h in sorted(set(hosts)))
    return re.compile(rf"^(?:https?|wss?)://(?!(?:{alternatives})(?::\d+)?(?:[/?#]|$))")


def _bypass_entry(host: str) -> str:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    return f"[{address}]" if address.version == 6 else str(address)


class Sink:
    """A TCP port on 127.0.0.1 that is bound but never listened on: a connection to it is
    refused at once, and while it is held no other process can listen there and receive what
    was meant to be refused (a fixed "dead" port could be taken by anyone)."""

    def __init__(self) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind(("127.0.0.1", 0))
        self.port: int = self._socket.getsockname()[1]

    def close(self) -> None:
        self._socket.close()


def proxy_for(hosts: Iterable[str], sink: Sink) -> ProxySettings:
    """The context proxy that lets only `hosts` through. `<-loopback>` first: Chromium
    otherwise never proxies localhost and 127.0.0.0/8, which would let a page reach any local
    service; loopback hosts the site really uses are listed like any other."""
    bypass = ["<-loopback>", *(_bypass_entry(h) for h in sorted(set(hosts)))]
    return {"server": f"http://127.0.0.1:{sink.port}", "bypass": ",".join(bypass)}


class Guard:
    """Writes down a context's requests to hosts outside the allowlist (refused by the
    context's proxy, see `proxy_for`)."""

    def __init__(self, hosts: Iterable[str], redact: Redactor | None = None) -> None:
        self.hosts = frozenset(hosts)
        # The job's secrets, inputs declared secret among them (the log's own redactor knows
        # only the configured ones): a page may try to send a typed value out as a host name.
        self.redact = redact or Redactor()
        self.pattern = outside(self.hosts)
        self.blocked: list[str] = []
        self._taken = 0

    def watch(self, context: BrowserContext) -> None:
        context.on("request", self._request)
        context.on("page", self._page)  # popups
        for page in context.pages:
            self._page(page)

    def _page(self, page: Page) -> None:
        page.on("websocket", self._websocket)

    def _request(self, request: Request) -> None:
        self._note(request.method, request.url)

    def _websocket(self, websocket: WebSocket) -> None:
        self._note("WebSocket", websocket.url)

    def _note(self, kind: str, url: str) -> None:
        if not self.pattern.match(url):
            return
        self.blocked.append(f"{kind} {url}")
        # The host only: the URL itself may carry what the page tried to send out; the step's
        # failure keeps it, redacted.
        host = self.redact(urlsplit(url).hostname)
        log.warning("blocked a request to %s, outside the allowlist", host)

    def take(self) -> list[str]:
        """What was blocked since the last call: each attempt is reported once, by the step
        that was running when it was heard of (or the next one, never by none)."""
        new = self.blocked[self._taken :]
        self._taken = len(self.blocked)
        return new
