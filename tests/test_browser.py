"""One Chromium per process; a context per job; a dead browser is relaunched."""

from __future__ import annotations

from worker.browser import BrowserHost, find_chromium


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
