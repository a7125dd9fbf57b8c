"""One headless Chromium per worker process; a fresh, isolated context per job.

Launching Chromium costs hundreds of milliseconds and tens of megabytes; a context costs a few
milliseconds. So the browser is shared and long-lived, every job gets its own context (cookies,
storage and cache never leak between jobs), and a browser that died is relaunched on demand.
`CHROMIUM_ARGS` also turns off browser UI that headless jobs never see but would pay for in
every context (see the comment there).

Long-lived is not forever. Over 500 jobs (bench/memory.py) Chromium's browser process grew
from ~131 to ~155 MB PSS and the Playwright driver's from ~130 to ~240 MB, most of it in the
first 50 jobs; nothing says either stops in a worker that runs for weeks. So with
`recycle_after`, the pair is retired after that many job contexts: the next page is made
on a new driver and browser (with `keep_warm`, between jobs: the launch is off every job's
critical path but under a burst), and the old pair is shut down when its last job's context
closes, so no running job is cut short by a recycle.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import shutil
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from playwright.async_api import (
    Browser,
    BrowserContext,
    CDPSession,
    Page,
    Playwright,
    async_playwright,
)
from playwright.async_api import Error as PlaywrightError

from worker.evidence import MASK_SCRIPT
from worker.guard import Sink, proxy_for

log = logging.getLogger("formwork.browser")

# The features Playwright itself disables (its chromiumSwitches.ts): Chromium honours only the
# last --disable-features, so ours must repeat them. tests/test_browser.py checks that it does.
PLAYWRIGHT_DISABLED_FEATURES = (
    "AvoidUnnecessaryBeforeUnloadCheckSync",
    "DestroyProfileOnBrowserClose",
    "HttpsUpgrades",
    "HttpsFirstBalancedModeAutoEnable",
    "LensOverlay",
    "MediaRouter",
    "PaintHolding",
    "ThirdPartyStoragePartitioning",
    "AvoidCorsURLLoaderRestartOnRedirect",
    "TcpPortRandomizationWin",
    "OptimizationHints",
    "NetworkTimeServiceQuerying",
    "AimEnabled",
    "PreconnectToSearch",
    "msForceBrowserSignIn",
    "msEdgeUpdateLaunchServicesPreferredVersion",
)
# Debian's Chromium is the full browser run headless: each context opens a window whose omnibox
# preloads its suggestion popup, a WebUI page in a renderer process of its own. Nobody sees it,
# yet it doubled the renderers per job and cost ~40 MB and ~0.7 s of CPU per job
# (bench/memory.py, bench/throughput.py). Browser UI only: pages and their isolation are as before.
FORMWORK_DISABLED_FEATURES = (
    "WebUIOmniboxPopup",
    "WebUIOmniboxAimPopup",
    "WebUIOmniboxFullPopup",
)
# Flags that work on these machines: no sandbox as root, no GPU, and none of Chromium's
# background network chatter (the network is closed; those connections fail noisily).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    # WebRTC's STUN and TURN go over UDP, which the allowlist's proxy rules (worker/guard.py)
    # do not cover: a page could send packets to any address. Only through the proxy, it can't.
    "--webrtc-ip-handling-policy=disable_non_proxied_udp",
    "--disable-features=" + ",".join(PLAYWRIGHT_DISABLED_FEATURES + FORMWORK_DISABLED_FEATURES),
]
VIEWPORT = {"width": 1280, "height": 800}


def find_chromium() -> str | None:
    """`FORMWORK_CHROMIUM`, then the system Chromium; None lets Playwright use its own build."""
    configured = os.environ.get("FORMWORK_CHROMIUM")
    if configured:
        return configured
    for candidate in (
        "/usr/bin/chromium",
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
    ):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@dataclass(frozen=True)
class JobPage:
    """A job's own context, its page, and a DevTools session on it (for fast screenshots).
    `hosts`: the only hosts the context can reach (`worker.guard`); None: unguarded."""

    context: BrowserContext
    page: Page
    cdp: CDPSession
    hosts: frozenset[str] | None = None


@dataclass(eq=False)
class _Launch:
    """A Playwright driver and the Chromium it launched, with the job contexts made on them."""

    playwright: Playwright
    browser: Browser | None = None
    contexts: int = 0  # job contexts made on it so far
    retired: bool = False  # no more job contexts: shut down when the last open one closes


class BrowserHost:
    """Owns Playwright and the Chromium process; hands out isolated contexts."""

    def __init__(
        self,
        executable: str | None = None,
        *,
        headless: bool = True,
        keep_warm: bool = False,
        recycle_after: int | None = None,
    ) -> None:
        if recycle_after is not None and recycle_after < 1:
            raise ValueError(f"recycle_after must be at least 1, not {recycle_after}")
        self.executable = executable if executable is not None else find_chromium()
        self.headless = headless
        self.keep_warm = keep_warm
        self.recycle_after = recycle_after
        self.launches = 0  # Chromium launches: the first, relaunches after a crash, recycles
        self.recycles = 0
        self._warm: asyncio.Task[JobPage] | None = None
        self._warm_hosts: frozenset[str] | None = None
        self._sink: Sink | None = None
        self._closing: set[asyncio.Task[None]] = set()  # contexts being closed, in the background
        self._launch: _Launch | None = None  # where new job contexts are made
        # Every open job context, with the launch it was made on: a retired launch is shut down
        # when it owns none any more.
        self._owner: dict[BrowserContext, _Launch] = {}
        self._lock = asyncio.Lock()

    async def start(self, hosts: Iterable[str] | None = None) -> None:
        """Launch Chromium. With `keep_warm` and the allowlist `hosts` of the site the first job
        is expected for, also make that job's page now, not when the job arrives. Without
        `hosts` nothing is made: a page is made for one allowlist, and a guess would be thrown
        away by the first job of another site."""
        await self._ensure_launch()
        warm = self.warm_up(hosts) if hosts is not None else None
        if warm is not None:
            await warm

    async def _ensure_launch(self) -> tuple[_Launch, Browser]:
        async with self._lock:
            launch = self._launch
            if launch is not None and launch.browser is not None and launch.browser.is_connected():
                return launch, launch.browser
            if launch is None:
                launch = self._launch = _Launch(await async_playwright().start())
            elif launch.browser is not None:
                log.warning("chromium disconnected; relaunching")
            launch.browser = await launch.playwright.chromium.launch(
                executable_path=self.executable, headless=self.headless, args=CHROMIUM_ARGS
            )
            self.launches += 1
            return launch, launch.browser

    async def new_context(self, **options: Any) -> BrowserContext:
        _, browser = await self._ensure_launch()
        return await self._new_context(browser, **options)

    async def _new_context(self, browser: Browser, **options: Any) -> BrowserContext:
        options.setdefault("viewport", VIEWPORT)
        context = await browser.new_context(**options)
        # Secret fields are masked by the page's own rendering, in every document.
        await context.add_init_script(MASK_SCRIPT)
        return context

    async def open_page(
        self,
        storage_state: dict[str, Any] | None = None,
        *,
        record_har: Path | None = None,
        hosts: Iterable[str] | None = None,
    ) -> JobPage:
        """A fresh context with one page, able to reach only `hosts` (None: anywhere; a job
        always names its site's). With `keep_warm`, the pair was made ahead of time (see
        `close_page`) when the last job was for the same hosts, so a job does not pay context
        and page creation on its critical path.

        With `storage_state` (a resumed job's cookies and local storage), the context is made
        from it: the rare resume pays for its context, the warm page stays for the next job.
        So does a job that records a HAR (`record_har`: written when the context closes)."""
        allowed = frozenset(hosts) if hosts is not None else None
        if storage_state is not None or record_har is not None:
            options: dict[str, Any] = {"storage_state": storage_state}
            if record_har is not None:
                options.update(
                    record_har_path=record_har,
                    record_har_content="embed",
                    record_har_mode="minimal",
                )
            return await self._fresh_page(allowed, **options)
        warm, self._warm = self._warm, None
        if warm is not None and self._warm_hosts != allowed:
            self._discard(warm)  # made for another site: its proxy rules are not this job's
        elif warm is not None:
            try:
                job_page = await warm
                browser = job_page.context.browser
                if browser is not None and browser.is_connected():
                    return job_page
            except PlaywrightError as exc:
                log.warning("warm page unusable (%s); making a fresh one", exc.message)
        return await self._fresh_page(allowed)

    async def close_page(self, job_page: JobPage) -> None:
        """Close a job's context; with `keep_warm`, start making the next job's page.

        The next page is made now, not as soon as the warm one is taken: making a context and
        its page starts a renderer process, CPU a running job's first steps would wait behind
        (~80 ms of its first step on 2 cores, bench/overhead.py); between jobs it is free.
        It is started before this context is closed: a queued job may be waiting for it.
        A context that is already gone (the browser crashed) is logged, not raised."""
        self.warm_up(job_page.hosts)
        await self._close(job_page.context)

    def release(self, job_page: JobPage) -> None:
        """Like `close_page`, without waiting for the close: the job's report does not depend
        on it (~20-35 ms on 2 cores). `settled` and `stop` wait for it."""
        self.warm_up(job_page.hosts)
        self._in_background(self._close(job_page.context), "close-job-context")

    async def settled(self) -> None:
        """Wait until the background work is done: the next job's page made (or failed to be),
        released contexts closed, retired browsers shut down (which a close may start)."""
        while True:
            pending: set[asyncio.Future[Any]] = {t for t in self._closing if not t.done()}
            if self._warm is not None and not self._warm.done():
                pending.add(self._warm)
            if not pending:
                return
            await asyncio.wait(pending)

    @property
    def warming(self) -> bool:
        """A page for the next job is made or being made."""
        return self._warm is not None

    def warm_up(self, hosts: Iterable[str] | None = None) -> asyncio.Task[JobPage] | None:
        """With `keep_warm`, make sure a page for the next job is made or being made: for
        `hosts`, the allowlist of the job that just ended (the next is most likely for the
        same site), unless one is already there."""
        if self.keep_warm and self._warm is None:
            allowed = frozenset(hosts) if hosts is not None else None
            self._warm_hosts = allowed
            # Made for no job in particular: its log lines (a recycle, say) must not name the
            # job whose end started it, as a task copying that job's context would.
            self._warm = asyncio.create_task(
                self._fresh_page(allowed), name="warm-page", context=contextvars.Context()
            )
        return self._warm

    def _discard(self, warm: asyncio.Task[JobPage]) -> None:
        async def close() -> None:
            try:
                job_page = await warm
            except PlaywrightError:
                return  # never made: nothing to close
            await self._close(job_page.context)

        self._in_background(close(), "discard-warm-page")

    async def _close(self, context: BrowserContext) -> None:
        try:
            await context.close()
        except PlaywrightError as exc:
            log.warning("context already gone at close: %s", exc.message)
        except Exception:
            # In the background nobody awaits this but `settled` and `stop`: a close that fails
            # in a way of its own is logged here, and must not end the worker's shutdown.
            log.exception("context not closed")
        finally:
            launch = self._owner.pop(context, None)
            if launch is not None and launch.retired and launch not in self._owner.values():
                self._in_background(self._shut_down(launch), "shut-down-retired-browser")

    def _made(self, context: BrowserContext, launch: _Launch) -> None:
        launch.contexts += 1
        self._owner[context] = launch
        if (
            self.recycle_after is not None
            and launch.contexts >= self.recycle_after
            and not launch.retired
        ):
            # The next job's context is made on a new driver and browser; this one still
            # serves the jobs (and the warm page) already made on it.
            launch.retired = True
            self.recycles += 1
            if self._launch is launch:
                self._launch = None
            log.info("recycling chromium and the playwright driver after %s jobs", launch.contexts)

    async def _shut_down(self, launch: _Launch) -> None:
        try:
            if launch.browser is not None:
                await launch.browser.close()
            await launch.playwright.stop()
        except Exception:  # already gone (a crash): nothing left to free
            log.exception("browser not shut down cleanly")

    def _in_background(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._closing.add(task)  # held until done: an unreferenced task may be collected
        task.add_done_callback(self._closing.discard)

    async def _fresh_page(self, hosts: frozenset[str] | None, **options: Any) -> JobPage:
        if hosts is not None:
            if self._sink is None:
                self._sink = Sink()
            options["proxy"] = proxy_for(hosts, self._sink)
        launch, browser = await self._ensure_launch()
        context = await self._new_context(browser, **options)
        self._made(context, launch)
        try:
            page = await context.new_page()
            return JobPage(context, page, await context.new_cdp_session(page), hosts)
        except BaseException:
            await self._close(context)
            raise

    @property
    def browser(self) -> Browser | None:
        """The browser new contexts are made in (None before the first, or just after a
        recycle)."""
        return self._launch.browser if self._launch is not None else None

    async def stop(self) -> None:
        if self._warm is not None:
            warm, self._warm = self._warm, None
            self._discard(warm)
        while self._closing:  # a context's close may start a retired browser's shutdown
            await asyncio.gather(*self._closing)
        async with self._lock:
            # The current launch, and any retired one a context left open keeps alive.
            launches = dict.fromkeys([*self._owner.values(), self._launch])
            self._launch = None
            self._owner.clear()
            for launch in launches:
                if launch is not None:
                    await self._shut_down(launch)
            if self._sink is not None:
                self._sink.close()
                self._sink = None

    async def __aenter__(self) -> BrowserHost:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
