"""The review UI: a read-only web view of the audit trail, and the one-file export of a job.

`formwork audit serve` runs `serve` (aiohttp, bound to localhost by default): a job list with
filters and search, and a job page with the step timeline, each step's annotated screenshot,
attempts, the matched selector and drift, failure evidence, the handoff request and decisions.
`formwork audit export JOB` renders the same job page into one HTML file with its stylesheet,
script and images inlined (data URIs), to attach to a ticket. Nothing is fetched from outside:
the machines that review evidence are often offline, and a CDN would see what is reviewed.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from aiohttp import web
from jinja2 import Environment, FileSystemLoader, select_autoescape

from worker.artifacts import ArtifactStore, content_type
from worker.audit import AuditRecord
from worker.contract import JobStatus, StepStatus
from worker.errors import ArtifactError

__all__ = ["build_app", "export_html", "filter_records", "serve"]

_HERE = Path(__file__).parent
STATIC = _HERE / "static"
_env = Environment(
    loader=FileSystemLoader(_HERE / "templates"),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)

# The colour family of each status, shared by the list and the job page.
TONE = {
    JobStatus.succeeded: "ok",
    StepStatus.succeeded: "ok",
    JobStatus.failed: "bad",
    StepStatus.failed: "bad",
    JobStatus.paused_for_handoff: "wait",
    JobStatus.needs_customer_input: "wait",
    JobStatus.running: "run",
    StepStatus.running: "run",
    JobStatus.queued: "idle",
    StepStatus.pending: "idle",
    StepStatus.skipped: "idle",
    JobStatus.cancelled: "idle",
    JobStatus.rejected: "bad",
    JobStatus.expired: "idle",
}


def _ms(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.0f} ms" if value < 10_000 else f"{value / 1000:.1f} s"


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value else "—"


_env.filters["ms"] = _ms
_env.filters["when"] = _when
_env.globals["tone"] = lambda status: TONE.get(status, "idle")


@dataclass(frozen=True)
class Filters:
    """The job list's filters, from the query string."""

    status: str = ""
    site: str = ""
    script: str = ""
    day: str = ""
    q: str = ""

    @classmethod
    def from_query(cls, query: Any) -> Filters:
        return cls(
            **{k: str(query.get(k, "")).strip() for k in ("status", "site", "script", "day", "q")}
        )

    def match(self, record: AuditRecord) -> bool:
        needle = self.q.lower()
        return (
            (not self.status or record.status == self.status)
            and (not self.site or record.site == self.site)
            and (not self.script or record.script == self.script)
            and (not self.day or record.path.startswith(self.day + "/"))
            and (not needle or any(needle in ref.lower() for ref in record.references))
        )


def filter_records(records: list[AuditRecord], filters: Filters) -> list[AuditRecord]:
    """The records shown, newest first."""
    shown = [r for r in records if filters.match(r)]
    return sorted(shown, key=lambda r: r.started_at or r.written_at, reverse=True)


def _page(record: AuditRecord, src: Callable[[str], str], *, inline: bool) -> str:
    context: dict[str, Any] = {"r": record, "report": record.report, "src": src, "inline": inline}
    if inline:
        context["css"] = (STATIC / "audit.css").read_text()
        context["js"] = (STATIC / "audit.js").read_text()
    return _env.get_template("job.html").render(**context)


def export_html(store: ArtifactStore, record: AuditRecord) -> str:
    """The job page as one self-contained HTML file: styles, script and images inlined."""

    def data_uri(key: str) -> str:
        try:
            data = store.get(key)
        except ArtifactError:
            return ""
        return f"data:{content_type(key)};base64,{base64.b64encode(data).decode()}"

    return _page(record, data_uri, inline=True)


def build_app(store: ArtifactStore) -> web.Application:
    """The read-only review app over `store`."""

    async def jobs(request: web.Request) -> web.Response:
        records = await asyncio.to_thread(store.audits)
        filters = Filters.from_query(request.query)
        html = _env.get_template("list.html").render(
            records=filter_records(records, filters),
            total=len(records),
            f=filters,
            statuses=sorted({r.status for r in records}),
            sites=sorted({r.site for r in records}),
            scripts=sorted({r.script for r in records}),
            days=sorted({r.path.split("/")[0] for r in records}, reverse=True),
        )
        return web.Response(text=html, content_type="text/html")

    async def job(request: web.Request) -> web.Response:
        path = f"{request.match_info['day']}/{request.match_info['job']}"
        try:
            record = await asyncio.to_thread(store.audit, path)
        except ArtifactError as exc:
            raise web.HTTPNotFound(text=f"no audit record at {path}") from exc
        html = _page(record, lambda key: f"/files/{key}", inline=False)
        return web.Response(text=html, content_type="text/html")

    async def files(request: web.Request) -> web.Response:
        key = request.match_info["key"]
        try:
            data = await asyncio.to_thread(store.get, key)
        except ArtifactError as exc:
            raise web.HTTPNotFound() from exc
        disposition = {"Content-Disposition": "attachment"} if key.endswith(".zip") else {}
        return web.Response(body=data, content_type=content_type(key), headers=disposition)

    async def headers(request: web.Request, response: web.StreamResponse) -> None:
        # Evidence shows customer data: never cached, never framed, nothing loaded from outside.
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'"
        )

    app = web.Application()
    app.on_response_prepare.append(headers)
    app.router.add_get("/", jobs)
    app.router.add_get("/jobs/{day}/{job}", job)
    app.router.add_get("/files/{key:.+}", files)
    app.router.add_static("/static/", STATIC)
    return app


async def serve(store: ArtifactStore, host: str, port: int) -> None:
    """Serve the review UI until cancelled (Ctrl-C)."""
    runner = web.AppRunner(build_app(store))
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
