"""One Chromium per process; a context per job; a dead browser is relaunched; the flags that
keep contexts lean."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
from playwright.async_api import Error as PlaywrightError
from redis.asyncio import Redis

from fixtures import FixtureServer
from worker.browser import FORMWORK_DISABLED_FEATURES, BrowserHost, find_chromium
from worker.keys import Keys
from worker.metrics import WorkerMetrics


def test_system_chromium_is_found() -> None:
    assert find_chromium() is not None


async def test_dead_browser_is_relaunched_on_next_context(browser_host: BrowserHost) -> None:
    launches = browser_host.launches
    assert browser_host.browser is not None
    await browser_host.browser.close()  # as if Chromium crashed
    context = await browser_host.new_context()
    try:
        page = await context.new_page()
        await page.set_content("<p>alive</p>")
        assert await page.inner_text("p") == "alive"
    finally:
        await context.close()
    assert browser_host.launches == launches + 1
    assert browser_host.browser is not None and browser_host.browser.is_connected()


def _chromium_command_lines() -> list[list[str]]:
    """The argument lists of the Chromium browser processes below this one (renderers and
    other helpers carry --type)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_bytes()
                parents[int(entry.name)] = int(stat[stat.rindex(b")") + 2 :].split()[1])
    found = []
    for pid in parents:
        ancestor = parents.get(pid)
        while ancestor is not None and ancestor != os.getpid():
            ancestor = parents.get(ancestor)
        if ancestor is None:
            continue
        with contextlib.suppress(OSError):
            args = (Path("/proc") / str(pid) / "cmdline").read_bytes().decode().split("\0")
            if "--remote-debugging-pipe" in args and not any(a.startswith("--type=") for a in args):
                found.append(args)
    return found


async def test_our_disabled_features_keep_playwrights_own(browser_host: BrowserHost) -> None:
    # Only the last --disable-features counts; Playwright puts its own list first.
    command_lines = _chromium_command_lines()
    assert command_lines
    for args in command_lines:
        lists = [a.split("=", 1)[1].split(",") for a in args if a.startswith("--disable-features=")]
        assert len(lists) >= 2
        playwrights, effective = lists[0], lists[-1]
        assert set(playwrights) <= set(effective), set(playwrights) - set(effective)
        assert set(FORMWORK_DISABLED_FEATURES) <= set(effective)


async def test_a_context_opens_no_browser_ui_pages(browser_host: BrowserHost) -> None:
    # The omnibox popup's WebUI page took a renderer process per context.
    assert browser_host.browser is not None
    session = await browser_host.browser.new_browser_cdp_session()
    context = await browser_host.new_context()
    try:
        await context.new_page()
        targets = await session.send("Target.getTargets", {"filter": [{}]})
    finally:
        await context.close()
        await session.detach()
    kinds = {t["type"] for t in targets["targetInfos"]}
    assert "page" in kinds and "browser_ui" not in kinds, kinds


async def test_the_next_warm_page_is_made_between_jobs(browser_host: BrowserHost) -> None:
    """Made when a job's page closes, not while the next job's first steps run."""
    browser_host.keep_warm = True
    try:
        job_page = await browser_host.open_page()
        assert not browser_host.warming  # taking a page starts nothing
        await browser_host.close_page(job_page)
        assert browser_host.warming  # closing one does
        following = await browser_host.open_page()
        assert not browser_host.warming and following.context is not job_page.context
        await following.page.set_content("<p>next job</p>")
        assert await following.page.inner_text("p") == "next job"
        await browser_host.close_page(following)
    finally:
        await _leave_nothing_warm(browser_host, hosts=None)


async def test_a_released_page_is_closed_in_the_background(browser_host: BrowserHost) -> None:
    """A job's report goes out without waiting for its context to close; the close is still
    done, and `settled` (as `stop`) waits for it."""
    assert browser_host.browser is not None
    job_page = await browser_host.open_page(hosts=["127.0.0.1"])
    assert job_page.context in browser_host.browser.contexts
    browser_host.release(job_page)
    await browser_host.settled()
    assert job_page.context not in browser_host.browser.contexts
    with pytest.raises(PlaywrightError, match="closed"):
        await job_page.page.title()


async def test_a_warm_page_goes_only_to_a_job_for_the_same_hosts(
    browser_host: BrowserHost, billing_server: FixtureServer
) -> None:
    """The allowlist is the context's proxy, fixed when the context is made: a page warmed for
    one site's hosts must never serve a job of another site."""
    by_ip = billing_server.url
    by_name = by_ip.replace("127.0.0.1", "localhost")
    browser_host.keep_warm = True
    try:
        first = await browser_host.open_page(hosts=["127.0.0.1"])
        await browser_host.close_page(first)  # warms a page for 127.0.0.1
        other = await browser_host.open_page(hosts=["localhost"])
        assert other.hosts == {"localhost"}
        assert not browser_host.warming  # the page warmed for 127.0.0.1 was let go
        await other.page.goto(f"{by_name}/login")
        with pytest.raises(PlaywrightError, match="ERR_PROXY_CONNECTION_FAILED"):
            await other.page.goto(f"{by_ip}/login")
        await browser_host.close_page(other)  # warms a page for localhost
        same = await browser_host.open_page(hosts=["localhost"])
        assert same.hosts == {"localhost"}
        with pytest.raises(PlaywrightError, match="ERR_PROXY_CONNECTION_FAILED"):
            await same.page.goto(f"{by_ip}/login")
        await browser_host.close_page(same)
    finally:
        await _leave_nothing_warm(browser_host, hosts=["localhost"])


async def _leave_nothing_warm(browser_host: BrowserHost, hosts: list[str] | None) -> None:
    """The session's host makes no warm pages: take the one left (made for `hosts`) and close
    it, so no later test finds a context it did not make."""
    browser_host.keep_warm = False
    if browser_host.warming:
        await browser_host.close_page(await browser_host.open_page(hosts=hosts))
    await browser_host.settled()


def _driver_processes() -> int:
    """Playwright drivers (node) below this process."""
    count = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                args = (entry / "cmdline").read_bytes().split(b"\0")
                stat = (entry / "stat").read_bytes()
                ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
                if ppid == os.getpid() and any(a.endswith(b"cli.js") for a in args):
                    count += 1
    return count


async def test_a_recycled_browser_serves_its_jobs_to_the_end_then_goes() -> None:
    """After `recycle_after` job contexts, new jobs get a new driver and Chromium at once; the
    jobs already on the old pair go on undisturbed, and the old pair is shut down (driver and
    browser) when the last of them closes."""
    drivers_before, browsers_before = _driver_processes(), len(_chromium_command_lines())
    host = BrowserHost(recycle_after=2)
    try:
        first = await host.open_page()
        old = host.browser
        second = await host.open_page()  # the old pair's last: new jobs go elsewhere
        assert host.recycles == 1 and host.browser is None
        third = await host.open_page()
        assert host.browser is not None and host.browser is not old
        assert third.context.browser is host.browser and host.launches == 2
        assert _driver_processes() == drivers_before + 2
        for job_page in (first, second, third):  # all three work side by side
            await job_page.page.set_content("<p>working</p>")
            assert await job_page.page.inner_text("p") == "working"
        await host.close_page(first)
        assert old is not None and old.is_connected()  # `second` still runs on it
        host.release(second)  # closed in the background, as a job's page is
        await host.settled()  # which waits for the shutdown that close starts, too
        assert not old.is_connected()
        assert _driver_processes() == drivers_before + 1
        assert len(_chromium_command_lines()) == browsers_before + 1
        await third.page.set_content("<p>still here</p>")
        assert await third.page.inner_text("p") == "still here"
        await host.close_page(third)
        # A planned recycle is not a crash: the metrics tell them apart. (Reading these two
        # values needs no Redis: the client is never connected.)
        metrics = WorkerMetrics(Redis.from_url("redis://127.0.0.1:1/0"), Keys("unused"), host)
        assert metrics.registry.get_sample_value("formwork_browser_recycles_total") == 1
        assert metrics.registry.get_sample_value("formwork_browser_restarts_total") == 0
    finally:
        await host.stop()
    assert _driver_processes() == drivers_before
    assert len(_chromium_command_lines()) == browsers_before
