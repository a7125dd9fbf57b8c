"""Step screenshots: taken after the page settles, with secret fields masked at capture time.

Masking uses Playwright's `mask`: the browser paints over the fields before the pixels are
encoded, so a secret never exists in any image file — not even briefly on disk.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from playwright.async_api import Error as PlaywrightError
from playwright.async_api import Locator, Page
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt

from worker.contract import FailureCode
from worker.errors import StepError

IMAGE_SUFFIX = ".jpg"
JPEG_QUALITY = 80
MASK_COLOR = "#1f1f1f"
SETTLE_TIMEOUT_MS = 5_000


async def capture(page: Page, path: Path, *, mask: list[Locator], full_page: bool = False) -> None:
    """Screenshot `page` to `path` (JPEG), masking `mask` and every password input."""
    # A screenshot taken while a click's navigation is still committing fails with "Unable to
    # capture screenshot": wait for the load, and once more if the capture still loses the race.
    always_masked = [*mask, page.locator("input[type=password]")]
    try:
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(3),
            retry=retry_if_exception_type(PlaywrightError),
            reraise=True,
        ):
            with attempt:
                await _settle(page)
                await page.screenshot(
                    path=path,
                    type="jpeg",
                    quality=JPEG_QUALITY,
                    full_page=full_page,
                    mask=always_masked,
                    mask_color=MASK_COLOR,
                    animations="disabled",
                    caret="hide",
                )
    except PlaywrightError as exc:
        raise StepError(FailureCode.browser_crashed, f"screenshot failed: {exc.message}") from exc


async def _settle(page: Page) -> None:
    # A page that never finishes loading is still worth a picture of what it shows.
    with contextlib.suppress(PlaywrightError):
        await page.wait_for_load_state("load", timeout=SETTLE_TIMEOUT_MS)
