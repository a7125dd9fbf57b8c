"""Downloads: whatever a job's page downloads is kept in the job's own directory, nowhere else.

The site picks the file's name, never its place: `../../etc/x` is saved as `x`, inside the job's
artifacts (`<day>/<job_id>/downloads/`, readable by the worker's user only). Saves still under
way when the job ends are awaited before its browser context closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from pathlib import Path, PurePosixPath

from playwright.async_api import Download, Page, Request
from playwright.async_api import Error as PlaywrightError

from worker.secretstore import Redactor

log = logging.getLogger("formwork.downloads")


class Downloads:
    """Saves a job's downloads into `folder` under plain file names.

    A download starts some time after the click that asked for it: the page's navigation
    requests still in flight are tracked too, so `settle` (at the end of the job) waits for a
    download that is about to start, not only for saves already under way."""

    SETTLE_S = 30.0

    def __init__(self, folder: Path, redact: Redactor | None = None) -> None:
        self.folder = folder
        # A site may name a file after what was typed (`export-<sign-in name>.csv`): the name
        # is a file in the artifact store, listed and logged, so a secret in it is masked.
        self.redact = redact or Redactor()
        self._pending: set[asyncio.Task[None]] = set()
        self._navigating: set[Request] = set()
        self._changed = asyncio.Event()

    def watch(self, page: Page) -> None:
        page.on("download", self.keep)
        page.on("request", self._started)
        page.on("requestfinished", self._ended)
        page.on("requestfailed", self._ended)

    def _started(self, request: Request) -> None:
        if request.is_navigation_request():
            self._navigating.add(request)

    def _ended(self, request: Request) -> None:
        self._navigating.discard(request)
        self._changed.set()

    def keep(self, download: Download) -> None:
        task = asyncio.create_task(self._save(download))
        self._pending.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._pending.discard(task)
        self._changed.set()

    async def _save(self, download: Download) -> None:
        suggested = self.redact(download.suggested_filename) or ""
        name = _SAFE_NAME.sub("_", PurePosixPath(suggested.replace("\\", "/")).name)
        name = name.lstrip(".")[:120] or "download"
        target = self.folder / name
        try:
            await download.save_as(target)
            target.chmod(0o600)
        except PlaywrightError as exc:
            log.warning("download %s not kept: %s", name, exc.message)
            return
        log.info("kept download %s", target.name)

    async def settle(self) -> None:
        """Wait (bounded) until no navigation is in flight and every save is done."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.SETTLE_S):
                while self._pending or self._navigating:
                    self._changed.clear()
                    await self._changed.wait()


_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")
