"""One Chromium per process; a context per job; a dead browser is relaunched; the flags that
keep contexts lean."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
from playwright.async_api import Error as PlaywrightError

from fixtures import FixtureServer
from worker.browser import FORMWORK_DISABLED_FEATURES, BrowserHost, find_chromium


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
