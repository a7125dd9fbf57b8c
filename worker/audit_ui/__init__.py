"""The review UI: a read-only web view of the audit trail, and the one-file export of a job.

`formwork audit serve` runs `serve` (aiohttp, bound to localhost by default): a job list with
filters and search, a page at a time, and a job page with the step timeline, each step's
annotated screenshot, attempts, the matched selector and drift, failure evidence, the handoff
request and decisions.
`formwork audit export JOB` renders the same job page into one HTML file with its stylesheet,
script and images inlined (data URIs), to attach to a ticket. Nothing is fetched from outside:
the machines that review evidence are often offline, and a CDN would see what is reviewed.

Every text the pages show from a site, an orchestrator, an operator or a registry (error texts,
notes, URLs, selector names, values) is rendered in a `<bdi>` of its own: a value holding a
bidirectional control (U+202E RIGHT-TO-LEFT OVERRIDE, an isolate left open) reorders only
itself, never the sentence, the amount or the reference around it.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from aiohttp import web
from jinja2 import Environment, FileSystemLoader, select_autoescape

from worker.artifacts import ArtifactStore, LocalArtifacts, content_type
from worker.audit import AuditRecord
from worker.contract import JobStatus, StepStatus
from worker.errors import ArtifactError, ArtifactUnreadable

if TYPE_CHECKING:  # the queue's modules are imported by `formwork audit serve` alone
    from worker.audit_ui.live import JobNow, Live, LiveState

__all__ = ["PAGE_SIZE", "JobIndex", "JobRow", "build_app", "export_html", "filter_rows", "serve"]

log = logging.getLogger("formwork.audit_ui")

PAGE_SIZE = 50  # jobs per page of the list

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
    JobStatus.awaiting_approval: "wait",
    JobStatus.running: "run",
    StepStatus.running: "run",
    JobStatus.queued: "idle",
    StepStatus.pending: "idle",
    StepStatus.skipped: "idle",
    JobStatus.cancelled: "idle",
    JobStatus.rejected: "bad",
    JobStatus.expired: "idle",
    JobStatus.rejected_by_approver: "idle",  # a person's answer, not a failure
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
class JobRow:
    """What the job list shows of one job, taken from its audit record and kept small: a store
    holds thousands of records, and a whole record (its report) is tens of kilobytes."""

    path: str
    job_id: str
    status: JobStatus
    site: str
    script: str
    script_version: int | None
    references: tuple[str, ...]  # what search looks in
    shown_references: tuple[str, ...]  # the orchestrator's ids and the customer's reference
    started_at: datetime | None
    written_at: datetime
    duration_ms: float | None
    steps_ok: int
    steps: int
    error: str | None
    drifted: int  # steps that fell back from their primary selector: the registry needs a fix
    thumbnail: str | None  # of the screen an operator looks at first (see `_first_look`)
    audited: bool = True  # False: shown from its report, its audit record never written
    # From the queue (`live.py`), for a job its record shows paused: `status` is then the
    # queue's (running again after a decision), and `decided` a decision waits for a worker.
    decided: bool = False
    recorded: JobStatus | None = None  # the record's status, when the queue's differs

    def now(self, job: JobNow | None) -> JobRow:
        """This row as the queue holds the job now (`job`: None when it cannot say)."""
        if job is None:
            return self
        recorded = self.status if job.status != self.status else None
        return dataclasses.replace(self, status=job.status, decided=job.decided, recorded=recorded)

    @classmethod
    def of(cls, record: AuditRecord, *, audited: bool = True) -> JobRow:
        report = record.report
        shown = [*report.correlation.values(), str(report.inputs.get("reference", ""))]
        look = _first_look(record)
        return cls(
            path=record.path,
            job_id=record.job_id,
            status=record.status,
            site=record.site,
            script=record.script,
            script_version=record.script_version,
            references=tuple(record.references),
            shown_references=tuple(dict.fromkeys(v for v in shown if v)),  # each once
            started_at=record.started_at,
            written_at=record.written_at,
            duration_ms=record.duration_ms,
            steps_ok=sum(1 for s in report.steps if s.status == StepStatus.succeeded),
            steps=len(report.steps),
            error=report.error.code if report.error else None,
            drifted=sum(1 for s in report.steps if s.drift is not None),
            thumbnail=record.evidence[look].thumbnail if look in record.evidence else None,
            audited=audited,
        )


def _first_look(record: AuditRecord) -> str | None:
    """The screenshot that says most about a job at a glance: its failed step's when a step
    failed (what went wrong), else its last step's (where it ended)."""
    shots = [s for s in record.report.steps if s.screenshot]
    failed = [s for s in shots if s.failure is not None]
    chosen = failed[-1] if failed else (shots[-1] if shots else None)
    return chosen.screenshot if chosen is not None else None


class JobIndex:
    """The job list's rows, each read from its audit record once: a job that has ended is
    never written again, so only the records of jobs that may still change (paused, waiting)
    are read again. Jobs pruned from the store drop out of the index with their paths."""

    def __init__(self, store: ArtifactStore) -> None:
        self.store = store
        self._final: dict[str, JobRow] = {}

    def rows(self) -> list[JobRow]:
        """Every job's row, newest day first (blocking: run it in a thread)."""
        return self.scan()[0]

    def scan(self) -> tuple[list[JobRow], dict[str, str]]:
        """Every readable job's row, newest day first, and why each other job's record could
        not be read, by path: a job the list leaves out must be said, not just logged
        (blocking: run it in a thread)."""
        rows, final, unreadable = [], {}, {}
        for path, audited in self.store.job_paths():
            row = self._final.get(path) if audited else None
            if row is None:
                try:
                    record, audited = self.store.review_record(path)
                    row = JobRow.of(record, audited=audited)
                except ArtifactError as exc:
                    log.warning("skipping %s: %s", path, exc.message)
                    unreadable[path] = exc.message
                    continue
            # A job shown from its report is read again: its audit record may yet come.
            if row.status.terminal and row.audited:
                final[path] = row
            rows.append(row)
        self._final = final
        return rows, unreadable


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

    def match(self, row: JobRow) -> bool:
        needle = self.q.lower()
        return (
            (not self.status or row.status == self.status)
            and (not self.site or row.site == self.site)
            and (not self.script or row.script == self.script)
            and (not self.day or row.path.startswith(self.day + "/"))
            and (not needle or any(needle in ref.lower() for ref in row.references))
        )

    def query(self, page: int) -> str:
        """The list's URL query for `page` of these filters."""
        values = {k: v for k, v in vars(self).items() if v}
        return urlencode({**values, "page": page} if page > 1 else values)


def filter_rows(rows: list[JobRow], filters: Filters) -> list[JobRow]:
    """The rows shown, newest first."""
    shown = [r for r in rows if filters.match(r)]
    return sorted(shown, key=lambda r: r.started_at or r.written_at, reverse=True)


def _page_number(raw: str | None, pages: int) -> int:
    # A page past the end (the list shrank since the link was made) shows the last one.
    try:
        number = int(raw or 1)
    except ValueError:
        number = 1
    return max(1, min(number, pages))


def _page(
    record: AuditRecord,
    src: Callable[[str], str | None],
    *,
    inline: bool,
    audited: bool = True,
    now: JobNow | None = None,
    live_unknown: str | None = None,
) -> str:
    """The job page; `src(key)` is where an artifact is read from, None when it is gone;
    `audited` False for a job shown from its report (`stand_in_record`); `now`, the job as
    the queue holds it when that is not as its record says (`live.py`)."""
    if now is not None and now.status == record.status and not now.decided:
        now = None  # as recorded: nothing to add
    context: dict[str, Any] = {
        "r": record, "report": record.report, "src": src, "inline": inline, "audited": audited,
        "now": now, "live_unknown": live_unknown,
    }  # fmt: skip
    if inline:
        context["css"] = (STATIC / "audit.css").read_text()
        context["js"] = (STATIC / "audit.js").read_text()
    return _env.get_template("job.html").render(**context)


def export_html(store: ArtifactStore, record: AuditRecord, *, audited: bool = True) -> str:
    """The job page as one self-contained HTML file: styles, script and images inlined
    (`audited` False for a record that stands in for one never written)."""

    def data_uri(key: str) -> str | None:
        try:
            data = store.get(key)
        except ArtifactError:
            return None  # the page says it is missing
        return f"data:{content_type(key)};base64,{base64.b64encode(data).decode()}"

    return _page(record, data_uri, inline=True, audited=audited)


def build_app(
    store: ArtifactStore, *, page_size: int = PAGE_SIZE, live: LiveState | None = None
) -> web.Application:
    """The read-only review app over `store`, listing `page_size` jobs a page; with `live`,
    a job its record shows paused is shown as the queue holds it now (a decision sent, the
    job running again)."""
    index = JobIndex(store)

    async def live_of(job_ids: list[str]) -> Live | None:
        return await live.of(job_ids) if live is not None else None

    async def jobs(request: web.Request) -> web.Response:
        try:
            rows, unreadable = await asyncio.to_thread(index.scan)
        except ArtifactError as exc:  # the bucket unreachable, its credentials refused
            raise web.HTTPServiceUnavailable(text=f"cannot list the jobs: {exc.message}") from exc
        # Only a job whose record is not final can have moved on since it was written.
        now = await live_of([r.job_id for r in rows if not r.status.terminal])
        if now is not None:
            rows = [r.now(now.jobs.get(r.job_id)) for r in rows]
        filters = Filters.from_query(request.query)
        shown = filter_rows(rows, filters)
        pages = max(1, math.ceil(len(shown) / page_size))
        page = _page_number(request.query.get("page"), pages)
        first = (page - 1) * page_size
        html = _env.get_template("list.html").render(
            rows=shown[first : first + page_size],
            first=first + 1,
            matching=len(shown),
            total=len(rows),
            newer=f"/?{filters.query(page - 1)}" if page > 1 else None,
            older=f"/?{filters.query(page + 1)}" if page < pages else None,
            f=filters,
            statuses=sorted({r.status for r in rows}),
            sites=sorted({r.site for r in rows}),
            scripts=sorted({r.script for r in rows}),
            days=sorted({r.path.split("/")[0] for r in rows}, reverse=True),
            unreadable=unreadable,
            live_unknown=now.unknown if now is not None else None,
            location=store.location,
            missing=isinstance(store, LocalArtifacts) and not store.root.is_dir(),
        )
        return web.Response(text=html, content_type="text/html")

    async def job(request: web.Request) -> web.Response:
        path = f"{request.match_info['day']}/{request.match_info['job']}"
        try:
            record, audited = await asyncio.to_thread(store.review_record, path)
        except ArtifactUnreadable as exc:
            # Said on a page of its own, with the report it was made from if that is there.
            keys = await asyncio.to_thread(store.keys, f"{path}/")
            html = _env.get_template("unreadable.html").render(
                path=path,
                why=exc.message,
                audited=f"{path}/audit.json" in keys,  # else its report is what does not read
                report=f"/files/{path}/report.json" if f"{path}/report.json" in keys else None,
            )
            return web.Response(text=html, content_type="text/html")
        except ArtifactError as exc:
            raise web.HTTPNotFound(text=f"no audit record or report at {path}") from exc
        # What is there now: a file deleted since the record was written is said to be gone.
        present = set(await asyncio.to_thread(store.keys, f"{path}/"))
        now = None if record.status.terminal else await live_of([record.job_id])
        html = _page(
            record,
            lambda key: f"/files/{key}" if key in present else None,
            inline=False,
            audited=audited,
            now=now.jobs.get(record.job_id) if now is not None else None,
            live_unknown=now.unknown if now is not None else None,
        )
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
        # A file a site put in the evidence (a download, a page saved as text) is served as
        # the type its name says, never as what a browser sniffs in it (HTML, say).
        response.headers["X-Content-Type-Options"] = "nosniff"
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


async def serve(
    store: ArtifactStore,
    host: str,
    port: int,
    live: LiveState | None = None,
    listening: Callable[[int], None] | None = None,
) -> None:
    """Serve the review UI until cancelled (Ctrl-C); `listening` is given the bound port
    (asked for port 0, the one the system chose) once it takes connections."""
    runner = web.AppRunner(build_app(store, live=live))
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        if listening is not None:
            listening(int(runner.addresses[0][1]))
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        if live is not None:
            await live.close()
