"""A commit's requests are sent once: by Playwright's HTTP client, not by Chromium, which sends a
request whose connection dropped a second time by itself (worker/sendonce.py). Against a real
HTTP server that records what reaches it."""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from playwright.async_api import BrowserContext

from worker.browser import BrowserHost
from worker.sendonce import sent_once

FORM = """<form method=post action=/send><input name=amount value="15.00">
<button id=send>Send</button></form>
<form method=post action=/upload enctype=multipart/form-data><input type=file name=receipt>
<input name=note value=hi><button id=upload>Upload</button></form>"""


@dataclass
class Server:
    url: str
    posts: list[tuple[str, bytes, str]] = field(default_factory=list)  # path, body, cookie
    reset_next: bool = False


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    app = web.Application()
    seen = Server("")

    async def form(request: web.Request) -> web.Response:
        response = web.Response(text=FORM, content_type="text/html")
        response.set_cookie("session", "s1")
        return response

    async def send(request: web.Request) -> web.StreamResponse:
        seen.posts.append((request.path, await request.read(), request.cookies.get("session", "")))
        if seen.reset_next:
            # The site took the request, then the connection dropped before any answer.
            seen.reset_next = False
            sock = request.transport.get_extra_info("socket") if request.transport else None
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=499)
        response = web.HTTPSeeOther("/done")
        response.set_cookie("receipt", "R-1")
        raise response

    async def upload(request: web.Request) -> web.Response:
        data = await request.post()
        receipt = data["receipt"]
        assert isinstance(receipt, web.FileField)
        seen.posts.append((request.path, receipt.file.read(), request.cookies.get("session", "")))
        return web.Response(text="uploaded", content_type="text/html")

    async def done(request: web.Request) -> web.Response:
        return web.Response(text="<h1>Done</h1>", content_type="text/html")

    app.router.add_get("/", form)
    app.router.add_post("/send", send)
    app.router.add_post("/upload", upload)
    app.router.add_get("/done", done)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    seen.url = f"http://127.0.0.1:{port}"
    try:
        yield seen
    finally:
        await runner.cleanup()


@pytest.fixture
async def context(browser_host: BrowserHost) -> AsyncIterator[BrowserContext]:
    context = await browser_host.new_context()
    try:
        yield context
    finally:
        await context.close()


async def test_a_commit_is_sent_with_its_cookies_and_its_redirect_followed(
    server: Server, context: BrowserContext
) -> None:
    page = await context.new_page()
    await page.goto(server.url)
    async with sent_once(context, ["127.0.0.1"], 10_000):
        await page.click("#send")
        await page.wait_for_url("**/done")
    assert await page.inner_text("h1") == "Done"
    assert server.posts == [("/send", b"amount=15.00", "s1")]
    assert {c["name"]: c["value"] for c in await context.cookies()}["receipt"] == "R-1"


async def test_a_commit_whose_connection_drops_reaches_the_site_once(
    server: Server, context: BrowserContext
) -> None:
    page = await context.new_page()
    await page.goto(server.url)
    server.reset_next = True
    async with sent_once(context, ["127.0.0.1"], 10_000):
        await page.click("#send")
        await page.wait_for_url("chrome-error://**")
    # Left to Chromium, the POST went twice: the second one answered, the page none the wiser.
    assert server.posts == [("/send", b"amount=15.00", "s1")]


async def test_a_form_with_a_file_is_left_to_chromium_and_arrives_whole(
    server: Server, context: BrowserContext, tmp_path: Path
) -> None:
    # DevTools hands over such a body without the file's bytes: sent from it, the site would
    # get an empty file.
    receipt = tmp_path / "receipt.bin"
    receipt.write_bytes(b"RECEIPT" * 5000)
    page = await context.new_page()
    await page.goto(server.url)
    await page.set_input_files("input[type=file]", receipt)
    async with sent_once(context, ["127.0.0.1"], 10_000):
        await page.click("#upload")
        await page.wait_for_load_state()
    assert server.posts == [("/upload", receipt.read_bytes(), "s1")]


async def test_a_request_to_a_host_outside_the_allowlist_is_left_to_chromium(
    server: Server, context: BrowserContext
) -> None:
    # In a job, the guard's proxy rule refuses it in Chromium without a byte sent; Playwright's
    # client, which that rule does not bind, must not send it instead. Here (no proxy rule) the
    # sign that Chromium sent it is its own resend after the reset.
    page = await context.new_page()
    await page.goto(server.url)
    server.reset_next = True
    async with sent_once(context, ["allowed.example"], 10_000):
        await page.click("#send")
        await page.wait_for_url("**/done")
    assert [path for path, _, _ in server.posts] == ["/send", "/send"]
