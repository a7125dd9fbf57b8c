"""The review UI in real Chromium, as an operator uses it: the job list, its filters and search,
a job page stepped through by keyboard, the one-file export — and no secret anywhere."""

from __future__ import annotations

import json
import logging
import re
import shutil
import socket
import zipfile
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from playwright.async_api import Page, expect

from fixtures import FixtureServer
from worker.artifacts import ArtifactStore, LocalArtifacts
from worker.audit import AuditRecord
from worker.audit_ui import JobIndex, build_app, export_html
from worker.audit_ui.live import LiveState
from worker.browser import BrowserHost
from worker.cli import main
from worker.client import FormworkClient
from worker.contract import BrowserJob, EventKind, JobStatus, ResumeDecision, TraceMode
from worker.executor import Runtime, run_job
from worker.queue import PauseClaim, running_worker
from worker.script import ScriptStore
from worker.secretstore import SecretStore
from worker.settings import Settings

from .conftest import CREDIT_INPUTS, SCRIPTS, SECRETS_FILE, SELECTORS, Site
from .test_handoff import paused_job


@pytest.fixture(scope="module")
async def audited(
    billing_server: FixtureServer,
    browser_host: BrowserHost,
    tmp_path_factory: pytest.TempPathFactory,
) -> LocalArtifacts:
    """Three real jobs: one clean, one waiting for the customer, one that survived drift."""
    store = LocalArtifacts(tmp_path_factory.mktemp("audit") / "artifacts")
    runtime = Runtime(
        scripts=ScriptStore(SCRIPTS, SELECTORS),
        browser=browser_host,
        artifacts=store,
        secrets=SecretStore(SECRETS_FILE, environ={}),
    )
    site = Site(billing_server)

    async def run(job_id: str, trace: TraceMode, **faults: object) -> JobStatus:
        site.reset()
        if faults:
            site.faults(**faults)
        job = BrowserJob(
            job_id=job_id,
            script="billing/issue_credit",
            inputs=CREDIT_INPUTS,
            site_url=site.url,
            correlation={"ticket": f"ZD-{job_id}"},
            trace=trace,
        )
        return (await run_job(job, runtime)).status

    assert await run("ui-ok", TraceMode.always) == JobStatus.succeeded
    rule = {"field": "amount", "value": "15.00", "message": "Credits over 10.00 need approval"}
    asked = await run("ui-ask", TraceMode.on_failure, reject_value=[rule])
    assert asked == JobStatus.needs_customer_input
    assert await run("ui-drift", TraceMode.on_failure, skin="v2") == JobStatus.succeeded
    site.reset()
    return store


@pytest.fixture(scope="module")
async def ui(audited: LocalArtifacts) -> AsyncIterator[str]:
    runner, host, port = await serve_ui(audited)
    yield f"http://{host}:{port}"
    await runner.cleanup()


async def serve_ui(store: ArtifactStore, **options: Any) -> tuple[web.AppRunner, str, int]:
    """The review UI over `store`, serving on a free port: its runner (to clean up), host, port."""
    runner = web.AppRunner(build_app(store, **options))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    return runner, host, port


@pytest.fixture
async def page(browser_host: BrowserHost) -> AsyncIterator[Page]:
    context = await browser_host.new_context()
    yield await context.new_page()
    await context.close()


async def shows_jobs(page: Page, *job_ids: str) -> None:
    """The list shows exactly these jobs, newest first (waits for the page to settle)."""
    await expect(page.locator("tr.job-row .job-link")).to_have_text(list(job_ids))


async def test_the_job_list_filters_by_status_site_script_and_date_and_searches(
    ui: str, page: Page
) -> None:
    await page.goto(ui + "/")
    await shows_jobs(page, "ui-drift", "ui-ask", "ui-ok")
    row = page.locator("tr.job-row", has_text="ui-ask")
    await expect(row.locator(".pill")).to_have_text("needs customer input")
    await expect(row).to_contain_text("validation_rejected")
    await expect(page.locator("tr.job-row", has_text="ui-ok").locator(".pill")).to_have_class(
        re.compile(r"\bok\b")
    )

    await page.get_by_label("Status").select_option("needs_customer_input")
    await page.get_by_role("button", name="Filter").click()
    await shows_jobs(page, "ui-ask")
    await page.get_by_role("link", name="Clear").click()

    # Search by the orchestrator's ticket, then by the job's reference input.
    await page.get_by_label("Search").fill("ZD-ui-drift")
    await page.keyboard.press("Enter")
    await shows_jobs(page, "ui-drift")
    await page.get_by_label("Search").fill("T-88812")
    await page.keyboard.press("Enter")
    await shows_jobs(page, "ui-drift", "ui-ask", "ui-ok")

    await page.goto(ui + "/")
    await page.get_by_label("Site").select_option("billing")
    await page.get_by_label("Script").select_option("billing/issue_credit")
    day = (await page.get_by_label("Date").locator("option").all_inner_texts())[1]
    await page.get_by_label("Date").select_option(day)
    await page.get_by_role("button", name="Filter").click()
    await shows_jobs(page, "ui-drift", "ui-ask", "ui-ok")
    await page.get_by_label("Search").fill("no-such-job")
    await page.keyboard.press("Enter")
    await expect(page.locator(".empty")).to_contain_text("No jobs match")


async def test_the_job_list_pages_keep_the_filters(audited: LocalArtifacts, page: Page) -> None:
    runner, host, port = await serve_ui(audited, page_size=2)
    try:
        await page.goto(f"http://{host}:{port}/?q=T-88812")
        await shows_jobs(page, "ui-drift", "ui-ask")
        pager = page.get_by_role("navigation", name="Pages")
        await expect(pager).to_contain_text("1\N{EN DASH}2 of 3")
        await expect(pager.get_by_role("link", name="← Newer")).to_have_count(0)
        await pager.get_by_role("link", name="Older →").click()
        await shows_jobs(page, "ui-ok")
        await expect(pager).to_contain_text("3\N{EN DASH}3 of 3")
        assert "q=T-88812" in page.url and "page=2" in page.url
        await expect(page.get_by_label("Search")).to_have_value("T-88812")
        await pager.get_by_role("link", name="← Newer").click()
        await shows_jobs(page, "ui-drift", "ui-ask")
        # A page past the end (the list shrank since the link was made) shows the last one.
        await page.goto(f"http://{host}:{port}/?page=9")
        await shows_jobs(page, "ui-ok")
        # One page of matches needs no pager.
        await page.goto(f"http://{host}:{port}/?q=ZD-ui-ok")
        await shows_jobs(page, "ui-ok")
        await expect(pager).to_have_count(0)
    finally:
        await runner.cleanup()


async def test_each_job_shows_the_screen_it_ended_or_failed_on(
    audited: LocalArtifacts, ui: str, page: Page
) -> None:
    await page.goto(ui + "/")
    await shows_jobs(page, "ui-drift", "ui-ask", "ui-ok")
    for job_id in ("ui-drift", "ui-ask", "ui-ok"):
        record = audited.find_audit(job_id)
        steps = record.report.steps
        failed = [s for s in steps if s.failure is not None and s.screenshot]
        look = failed[-1] if failed else steps[-1]
        assert (job_id == "ui-ask") == bool(failed)  # it waits for the customer at a step
        assert look.screenshot is not None
        thumb = page.locator("tr.job-row", has_text=job_id).locator("td.thumb img")
        await expect(thumb).to_have_attribute(
            "src", f"/files/{record.evidence[look.screenshot].thumbnail}"
        )
        # Loaded, as a person would see it: a real image, not a broken icon.
        assert await thumb.evaluate("(img) => img.complete && img.naturalWidth") > 100


def test_the_list_reads_a_finished_jobs_record_once(audited: LocalArtifacts) -> None:
    reads: list[str] = []

    class Counting(LocalArtifacts):
        def audit(self, path: str) -> AuditRecord:
            reads.append(path.split("/")[-1])
            return super().audit(path)

    index = JobIndex(Counting(audited.root))
    assert sorted(r.job_id for r in index.rows()) == ["ui-ask", "ui-drift", "ui-ok"]
    assert sorted(reads) == ["ui-ask", "ui-drift", "ui-ok"]
    reads.clear()
    assert len(index.rows()) == 3
    # ui-ask waits for the customer: its record may still change. The others have ended.
    assert reads == ["ui-ask"]


async def test_a_paused_job_opens_at_its_failed_step_and_steps_by_keyboard(
    ui: str, page: Page
) -> None:
    await page.goto(ui + "/")
    await page.get_by_role("link", name="ui-ask").click()
    await expect(page.locator("#job-status")).to_have_text("needs customer input")
    handoff = page.locator("#handoff")
    await expect(handoff).to_contain_text("Credits over 10.00 need approval")
    await expect(handoff).to_contain_text("Tell the customer")
    await expect(page.locator("#failure")).to_contain_text("validation_rejected")

    # It opens on the failed step, its annotated screenshot loaded and framed as a failure.
    current = page.locator(".detail:not([hidden])")
    await expect(current.locator(".step-title")).to_have_text(re.compile(r"\d+\. review$"))
    await expect(current.locator(".pill")).to_have_text("failed")
    shot = current.locator("img.shot")
    await expect(shot).to_be_visible()
    assert await shot.evaluate("img => img.decode().then(() => img.naturalWidth)") == 1280
    await expect(page.locator(".step.current")).to_contain_text("validation_rejected")

    await page.keyboard.press("k")
    await expect(current.locator(".step-title")).to_have_text(re.compile(r"\. reference$"))
    await expect(current.locator(".selector")).to_have_text("credit.reference → label=Reference")
    await page.keyboard.press("ArrowUp")
    await expect(current.locator(".step-title")).to_have_text(re.compile(r"\. reason$"))
    await page.keyboard.press("j")
    await expect(current.locator(".step-title")).to_have_text(re.compile(r"\. reference$"))
    assert page.url.endswith(f"#step-{await current.get_attribute('data-index')}")

    # Enter enlarges the screenshot; Esc closes it.
    await page.keyboard.press("Enter")
    lightbox = page.locator("#lightbox")
    await expect(lightbox).to_be_visible()
    shown = await current.locator("img.shot").evaluate("img => img.src")
    assert await lightbox.locator("img").evaluate("img => img.src") == shown
    await page.keyboard.press("Escape")
    await expect(lightbox).to_be_hidden()
    # A click on a step in the timeline shows it too.
    await page.locator(".step", has_text="login.password").click()
    await expect(current.locator(".step-title")).to_have_text(re.compile(r"login\.password$"))


async def test_the_list_flags_a_job_that_survived_selector_drift(ui: str, page: Page) -> None:
    # A job that succeeded on a fallback selector looked like any clean success in the list:
    # the registry fix it calls for was seen only by opening each job.
    await page.goto(ui + "/")
    flag = page.locator("tr.job-row", has_text="ui-drift").locator(".warn")
    await expect(flag).to_have_text(re.compile(r"^drift \u00d7[1-9][0-9]*$"))
    await expect(page.locator("tr.job-row", has_text="ui-ok").locator(".warn")).to_have_count(0)


async def test_drift_and_attempts_are_shown_on_the_step(ui: str, page: Page) -> None:
    await page.goto(ui + "/")
    await page.get_by_role("link", name="ui-drift").click()
    drifted = page.locator(".step", has=page.locator(".warn"))
    assert await drifted.count() >= 1
    await drifted.first.click()
    current = page.locator(".detail:not([hidden])")
    await expect(current.locator(".drift")).to_contain_text("no longer matched")
    await expect(current.locator("table.attempts tbody tr")).to_have_count(1)


async def test_a_fill_step_shows_what_it_entered_and_a_secret_as_stars(ui: str, page: Page) -> None:
    await page.goto(ui + "/")
    await page.get_by_role("link", name="ui-ok").click()
    for step, entered in (("reason", CREDIT_INPUTS["reason"]), ("login.password", "***")):
        await page.locator(f'.step[data-step="{step}"]').click()
        current = page.locator(".detail:not([hidden])")
        await expect(current.locator("dt", has_text="Entered")).to_have_count(1)
        await expect(current.locator("dt:text-is('Entered') + dd")).to_have_text(entered)
    await page.locator('.step[data-step="review"]').click()  # a click enters nothing
    await expect(page.locator(".detail:not([hidden]) dt", has_text="Entered")).to_have_count(0)


async def test_export_is_one_offline_file_without_secrets(
    audited: LocalArtifacts,
    page: Page,
    tmp_path: Path,
    fixture_secrets: dict[str, str],
) -> None:
    out = tmp_path / "ui-ask.html"
    root = str(audited.root)
    assert main(["audit", "export", "ui-ask", "--artifacts", root, "--out", str(out)]) == 0
    html = out.read_text()
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    await page.goto(out.as_uri())
    await expect(page.locator("#job-status")).to_have_text("needs customer input")
    images = page.locator("img.shot")
    assert await images.count() >= 5
    for i in range(await images.count()):
        src = await images.nth(i).get_attribute("src")
        assert src is not None and src.startswith("data:image/jpeg;base64,")
    visible = page.locator(".detail:not([hidden]) img.shot")
    await expect(visible).to_be_visible()
    assert await visible.evaluate("img => img.decode().then(() => img.naturalWidth)") == 1280
    # Nothing but the file itself (data: URIs are not requests).
    assert requested == [out.as_uri()]
    await page.keyboard.press("k")  # the inlined script works offline
    await expect(page.locator(".detail:not([hidden]) .step-title")).to_have_text(
        re.compile(r"\. reference$")
    )

    # A secret is nowhere: not in the export, the audit records, nor the trace.
    secrets = [fixture_secrets["billing_password"], fixture_secrets["billing_username"]]
    ok = audited.find_audit("ui-ok")
    assert len(ok.traces) == 1
    places = {"export": html}
    for record in (ok, audited.find_audit("ui-ask"), audited.find_audit("ui-drift")):
        places[record.job_id] = audited.get(f"{record.path}/audit.json").decode()
    with zipfile.ZipFile(audited.root / ok.traces[0]) as trace:
        places["trace"] = b"".join(trace.read(n) for n in trace.namelist()).decode("latin-1")
        # A real trace show-trace can open: the fills are in it, their secret values are not.
        assert "trace.trace" in trace.namelist()
    assert '"value":"***"' in places["trace"]
    for where, text in places.items():
        for secret in secrets:
            assert secret not in text, where


async def test_an_empty_list_says_where_it_looked_and_a_file_is_no_artifacts_directory(
    page: Page, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A mistyped --artifacts (or FORMWORK_ARTIFACTS_DIR) served "0 of 0 jobs, No jobs match."
    # as if the store had none, and a file there was served, exported from and pruned alike.
    (tmp_path / "empty").mkdir()
    for root, said in (
        (
            tmp_path / "mistyped",
            f"No jobs in {tmp_path / 'mistyped'} (there is no such directory).",
        ),
        (tmp_path / "empty", f"No jobs in {tmp_path / 'empty'}."),
    ):
        runner, host, port = await serve_ui(LocalArtifacts(root))
        try:
            await page.goto(f"http://{host}:{port}/")
            await expect(page.locator("p.empty")).to_have_text(said)
        finally:
            await runner.cleanup()
    assert not (tmp_path / "mistyped").exists()
    a_file = tmp_path / "report.json"
    a_file.write_text("{}")
    handlers = logging.getLogger().handlers[:]
    try:
        for args in (["serve", "--port", "0"], ["export", "j"], ["prune", "--older-than", "1d"]):
            assert main(["audit", *args, "--artifacts", str(a_file)]) == 2
            err = capsys.readouterr().err
            said = f"formwork: --artifacts={str(a_file)!r}: a file, not the artifacts directory\n"
            assert err == said
    finally:
        # main() points the root logger at this test's captured stderr, closed once it ends.
        logging.getLogger().handlers[:] = handlers
    assert a_file.read_text() == "{}"


async def test_an_unreadable_audit_record_is_said_in_the_list_the_page_and_the_export(
    audited: LocalArtifacts, page: Page, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A record cut short or edited used to vanish from the list (a log line only), answer
    # its page with a bare 500, and end the export in a traceback.
    store = LocalArtifacts(tmp_path / "artifacts")
    ok = audited.find_audit("ui-ok")
    day = ok.path.split("/")[0]
    for name in ("cut-short", "edited", "fine"):
        shutil.copytree(audited.root / ok.path, store.root / day / name)
    (store.root / day / "cut-short" / "audit.json").write_text('{"job_id": "cut-sh')
    edited = json.loads((store.root / day / "edited" / "audit.json").read_text())
    edited["status"] = "weird"
    (store.root / day / "edited" / "audit.json").write_text(json.dumps(edited))

    runner, host, port = await serve_ui(store)
    try:
        await page.goto(f"http://{host}:{port}/")
        await shows_jobs(page, "ui-ok")  # the readable copy
        card = page.locator("#unreadable")
        await expect(card.locator("h2")).to_contain_text("2 jobs not listed")
        await expect(card.locator("li", has_text="cut-short")).to_contain_text("Invalid JSON")
        await expect(card.locator("li", has_text="edited")).to_contain_text("status: Input")
        await card.get_by_role("link", name=f"{day}/edited").click()
        await expect(page.locator("#unreadable h2")).to_have_text(
            "This job's audit record cannot be read"
        )
        await expect(page.locator("#unreadable")).to_contain_text(
            f"{day}/edited/audit.json is not a readable audit record: status: Input should be"
        )
        answer = await page.goto(f"http://{host}:{port}/jobs/{day}/cut-short")
        assert answer is not None and answer.status == 200
        await expect(page.locator("#unreadable")).to_contain_text("Invalid JSON")
        await page.get_by_role("link", name="report.json").click()
        await expect(page.locator("body")).to_contain_text('"job_id": "ui-ok"')
    finally:
        await runner.cleanup()

    out = tmp_path / "edited.html"
    code = main(["audit", "export", "edited", "--artifacts", str(store.root), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and not out.exists()
    assert err.startswith(f"formwork: {day}/edited/audit.json is not a readable audit record")
    assert "Traceback" not in err and len(err.splitlines()) == 1


async def test_evidence_deleted_from_the_store_is_said_to_be_missing(
    audited: LocalArtifacts, page: Page, tmp_path: Path
) -> None:
    # A deleted image showed as a broken-image icon (an empty src in the export), with
    # nothing to say what was lost; the capture as taken, still there, went unused.
    store = LocalArtifacts(tmp_path / "artifacts")
    ok = audited.find_audit("ui-ok")
    shutil.copytree(audited.root / ok.path, store.root / ok.path)
    shots = [s.screenshot for s in ok.report.steps if s.screenshot]
    first, second = ok.evidence[shots[0]], ok.evidence[shots[1]]
    assert first.image != second.image
    (store.root / first.image).unlink()  # the annotated image only: the capture stands in
    (store.root / second.image).unlink()
    (store.root / second.source).unlink()  # nothing left of this one
    (store.root / ok.traces[0]).unlink()

    runner, host, port = await serve_ui(store)
    export = tmp_path / "ui-ok.html"
    export.write_text(export_html(store, store.find_audit("ui-ok")))
    try:
        for url in (f"http://{host}:{port}/jobs/{ok.path}", export.as_uri()):
            await page.goto(url)
            current = page.locator(".detail:not([hidden])")
            await expect(current.locator("figcaption")).to_contain_text(
                "the annotated image is missing from the store: this is the capture as taken"
            )
            shot = current.locator("img.shot")
            assert await shot.evaluate("img => img.decode().then(() => img.naturalWidth)") > 100
            await page.keyboard.press("j")
            await expect(current.locator(".noshot")).to_have_text(
                f"The screenshot of this step is missing from the store: {second.image} "
                f"(and the capture {second.source})."
            )
            await expect(current.locator("img")).to_have_count(0)
        await page.goto(f"http://{host}:{port}/jobs/{ok.path}")
        await expect(page.locator(".summary")).to_contain_text(
            f"{ok.traces[0].split('/')[-1]} (missing)"
        )
    finally:
        await runner.cleanup()


async def test_a_thumbnail_deleted_from_the_store_is_said_to_be_missing_in_the_list(
    audited: LocalArtifacts, page: Page, tmp_path: Path
) -> None:
    # The list showed a broken-image icon for it.
    store = LocalArtifacts(tmp_path / "artifacts")
    ok = audited.find_audit("ui-ok")
    shutil.copytree(audited.root / ok.path, store.root / ok.path)
    row = JobIndex(store).rows()[0]
    assert row.thumbnail is not None
    (store.root / row.thumbnail).unlink()
    runner, host, port = await serve_ui(store)
    try:
        await page.goto(f"http://{host}:{port}/")
        thumb = page.locator("tr.job-row", has_text="ui-ok").locator("td.thumb")
        await expect(thumb).to_have_text("image missing")
        await expect(thumb.locator("img")).to_have_count(0)
    finally:
        await runner.cleanup()


async def test_long_ids_and_texts_wrap_instead_of_widening_the_page(
    audited: LocalArtifacts, page: Page, tmp_path: Path
) -> None:
    # A 128-character job id or a long ticket stretched the job list to thousands of pixels
    # (every other column squeezed off screen) and ran out of the job page's header bar.
    store = LocalArtifacts(tmp_path / "artifacts")
    asked = audited.find_audit("ui-ask")
    day = asked.path.split("/")[0]
    shutil.copytree(audited.root / asked.path, store.root / day / "long")
    record = json.loads((store.root / day / "long" / "audit.json").read_text())
    long_id = "J" * 128
    record["job_id"] = record["report"]["job_id"] = long_id
    record["path"] = f"{day}/long"
    record["report"]["correlation"] = {"ticket": "ZD-" + "7" * 600}
    record["report"]["error"]["message"] += " " + "M" * 500
    failed = next(step for step in record["report"]["steps"] if step["failure"])
    failed["failure"]["message"] += " " + "M" * 500
    (store.root / day / "long" / "audit.json").write_text(json.dumps(record))

    runner, host, port = await serve_ui(store)
    await page.set_viewport_size({"width": 1280, "height": 800})
    wide = "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"
    try:
        await page.goto(f"http://{host}:{port}/")
        await shows_jobs(page, long_id)
        assert await page.evaluate(wide) <= 0
        await page.get_by_role("link", name=long_id).click()
        await expect(page.locator("h1.job-id")).to_have_text(long_id)
        assert await page.evaluate(wide) <= 0
        bar = await page.locator("header.bar").bounding_box()
        title = await page.locator("h1.job-id").bounding_box()
        assert bar is not None and title is not None
        assert title["x"] + title["width"] <= bar["x"] + bar["width"]
    finally:
        await runner.cleanup()


def fresh_billing(
    billing_server: FixtureServer, browser_host: BrowserHost, tmp_path: Path
) -> tuple[LocalArtifacts, Runtime, Site]:
    """A store of the test's own, a runtime writing into it, and the billing site reset."""
    store = LocalArtifacts(tmp_path / "artifacts")
    runtime = Runtime(
        scripts=ScriptStore(SCRIPTS, SELECTORS),
        browser=browser_host,
        artifacts=store,
        secrets=SecretStore(SECRETS_FILE, environ={}),
    )
    site = Site(billing_server)
    site.reset()
    return store, runtime, site


async def test_a_job_awaiting_approval_stands_out_as_waiting_for_a_person(
    billing_server: FixtureServer, browser_host: BrowserHost, page: Page, tmp_path: Path
) -> None:
    # It was grey, like a cancelled job, while the other paused statuses are amber.
    store, runtime, site = fresh_billing(billing_server, browser_host, tmp_path)
    job = BrowserJob(
        job_id="ui-approve", script="billing/issue_credit", site_url=site.url,
        inputs={**CREDIT_INPUTS, "amount": "150.00"},
    )  # fmt: skip
    assert (await run_job(job, runtime)).status == JobStatus.awaiting_approval
    runner, host, port = await serve_ui(store)
    try:
        await page.goto(f"http://{host}:{port}/")
        pill = page.locator("tr.job-row", has_text="ui-approve").locator(".pill")
        await expect(pill).to_have_text("awaiting approval")
        await expect(pill).to_have_class(re.compile(r"\bwait\b"))
        await page.get_by_role("link", name="ui-approve").click()
        await expect(page.locator("#job-status")).to_have_class(re.compile(r"\bwait\b"))
    finally:
        await runner.cleanup()
        site.reset()


async def test_an_approval_and_a_dry_run_show_the_form_they_would_send(
    billing_server: FixtureServer, browser_host: BrowserHost, page: Page, tmp_path: Path
) -> None:
    # The approver's evidence (the filled form, the values to be sent) and a dry run's result
    # (would_submit) were in audit.json but on no page and in no export.
    store, runtime, site = fresh_billing(billing_server, browser_host, tmp_path)
    big = {**CREDIT_INPUTS, "amount": "150.00"}
    for job_id, inputs, dry_run in (("ui-gate", big, False), ("ui-dry", CREDIT_INPUTS, True)):
        job = BrowserJob(job_id=job_id, script="billing/issue_credit", site_url=site.url,
                         inputs=inputs, dry_run=dry_run)  # fmt: skip
        await run_job(job, runtime)
    gate, dry = store.find_audit("ui-gate"), store.find_audit("ui-dry")
    assert gate.status == JobStatus.awaiting_approval and dry.report.would_submit is not None
    runner, host, port = await serve_ui(store)
    exports = tmp_path / "gate.html", tmp_path / "dry.html"
    exports[0].write_text(export_html(store, gate))
    exports[1].write_text(export_html(store, dry))
    loaded = "img => img.decode().then(() => img.naturalWidth)"
    try:
        for url in (f"http://{host}:{port}/jobs/{gate.path}", exports[0].as_uri()):
            await page.goto(url)
            card = page.locator("#handoff")
            sent = card.locator("dt", has_text="Will send").locator(
                "xpath=following-sibling::dd[1]"
            )
            await expect(sent).to_have_text(
                [
                    "credit.amount = 150.00",
                    "credit.reason = damaged item",
                    "credit.reference = T-88812",
                ]
            )
            assert await card.locator("figure.evidence img").evaluate(loaded) > 100
        for url in (f"http://{host}:{port}/jobs/{dry.path}", exports[1].as_uri()):
            await page.goto(url)
            card = page.locator("#would-submit")
            await expect(card.locator("h2")).to_have_text(
                "Dry run: what step submit would have sent"
            )
            await expect(card.locator("dt", has_text="credit.amount")).to_have_count(1)
            await expect(card.locator("dd").first).to_have_text("15.00")
            shot = card.locator("figure.evidence img")
            assert await shot.evaluate(loaded) > 100
            await shot.click()
            await expect(page.locator("#lightbox")).to_be_visible()
    finally:
        await runner.cleanup()
        site.reset()


async def test_each_attempt_of_a_retried_step_shows_its_own_screen(
    billing_server: FixtureServer, browser_host: BrowserHost, page: Page, tmp_path: Path
) -> None:
    # Each failed attempt keeps a screenshot of what the page showed (README: attempt_log),
    # but the page listed attempts without them: only the last attempt's screen was seen.
    store, runtime, site = fresh_billing(billing_server, browser_host, tmp_path)
    site.faults(fail=[{"path_contains": "/accounts/", "method": "GET", "status": 503, "times": 1}])
    job = BrowserJob(job_id="ui-retried", script="billing/issue_credit", site_url=site.url,
                     inputs=CREDIT_INPUTS)  # fmt: skip
    assert (await run_job(job, runtime)).status == JobStatus.succeeded
    site.reset()
    record = store.find_audit("ui-retried")
    step = next(s for s in record.report.steps if s.id == "open_account")
    first = step.attempt_log[0]
    assert step.attempts == 2 and first.failure is not None and first.screenshot is not None
    runner, host, port = await serve_ui(store)
    export = tmp_path / "retried.html"
    export.write_text(export_html(store, record))
    try:
        for url in (f"http://{host}:{port}/jobs/{record.path}", export.as_uri()):
            await page.goto(url)
            await page.locator(".step", has_text="open_account").click()
            rows = page.locator(".detail:not([hidden]) table.attempts tbody tr")
            await expect(rows).to_have_count(2)
            await rows.nth(0).get_by_role("button", name="Screenshot of attempt 1").click()
            shown = page.locator("#lightbox img")
            await expect(page.locator("#lightbox")).to_be_visible()
            assert await shown.evaluate("img => img.decode().then(() => img.naturalWidth)") > 100
            if url.startswith("http"):
                image = record.evidence[first.screenshot].image
                await expect(shown).to_have_attribute("src", f"/files/{image}")
            await page.keyboard.press("Escape")
            await expect(page.locator("#lightbox")).to_be_hidden()
    finally:
        await runner.cleanup()


def test_traces_are_kept_per_mode(audited: LocalArtifacts) -> None:
    assert len(audited.find_audit("ui-ok").traces) == 1  # always
    assert len(audited.find_audit("ui-ask").traces) == 1  # on_failure, and it did not succeed
    assert audited.find_audit("ui-drift").traces == []  # on_failure, and it succeeded


async def test_enter_on_a_focused_link_follows_it_and_never_opens_the_lightbox(
    ui: str, page: Page
) -> None:
    await page.goto(ui + "/")
    await page.get_by_role("link", name="ui-ask").click()
    lightbox = page.locator("#lightbox")
    current = page.locator(".detail:not([hidden])")
    await expect(current.locator(".step-title")).to_have_text(re.compile(r"\d+\. review$"))

    # A link inside the page (the failure's step): Enter follows it, no lightbox.
    await page.locator("#failure a[data-goto]").focus()
    await page.keyboard.press("Enter")
    await expect(page.locator(".step.current")).to_contain_text("review")
    await expect(lightbox).to_be_hidden()
    # Enter with a modifier is the browser's (open in a new tab…), never the lightbox.
    await page.locator("#steps .step.current").focus()
    await page.keyboard.press("Control+Enter")
    await expect(lightbox).to_be_hidden()

    # The brand link: Enter goes to the job list. What the job page showed as it left is
    # kept where the next page can read it (the same tab's sessionStorage).
    await page.evaluate(
        """() => addEventListener("pagehide", () => sessionStorage.setItem(
            "lightbox-at-leave", String(document.getElementById("lightbox").hidden)))"""
    )
    await page.locator("a.brand").focus()
    await page.keyboard.press("Enter")
    await expect(page).to_have_url(ui + "/")
    await shows_jobs(page, "ui-drift", "ui-ask", "ui-ok")
    assert await page.evaluate("sessionStorage.getItem('lightbox-at-leave')") == "true"


async def test_tab_reaches_each_step_and_enter_enlarges_the_focused_one(
    ui: str, page: Page
) -> None:
    await page.goto(ui + "/")
    await page.get_by_role("link", name="ui-ok").click()
    await expect(page.locator("#job-status")).to_have_text("succeeded")
    steps = page.locator("#steps .step")
    count = await steps.count()
    assert count >= 5

    # From the top of the page, Tab alone reaches the first step (past the page's links).
    focused_step = "() => document.activeElement?.closest('#steps .step')?.dataset.index ?? null"
    for _ in range(20):
        await page.keyboard.press("Tab")
        if await page.evaluate(focused_step) is not None:
            break
    assert await page.evaluate(focused_step) == "0"
    current = page.locator(".detail:not([hidden])")
    # Each Tab moves to the next step and shows it.
    for index in range(1, 4):
        await page.keyboard.press("Tab")
        assert await page.evaluate(focused_step) == str(index)
        await expect(current).to_have_attribute("data-index", str(index))
        await expect(steps.nth(index)).to_have_class(re.compile(r"\bcurrent\b"))
    # Enter on the focused step enlarges its screenshot; Esc closes it.
    await page.keyboard.press("Enter")
    lightbox = page.locator("#lightbox")
    await expect(lightbox).to_be_visible()
    shown = await current.locator("img.shot").evaluate("img => img.src")
    assert await lightbox.locator("img").evaluate("img => img.src") == shown
    await page.keyboard.press("Escape")
    await expect(lightbox).to_be_hidden()
    # j moves on from the focused step, and the focus goes along (Tab carries on from there).
    await page.keyboard.press("j")
    await expect(current).to_have_attribute("data-index", "4")
    assert await page.evaluate(focused_step) == "4"


RLO = "\u202e"  # RIGHT-TO-LEFT OVERRIDE: what follows it reads right to left


def _overridden(record: dict[str, Any]) -> int:
    """Put RLO into every text of `record` that may hold it and still be a valid record: every
    string and every mapping key (what the site, the orchestrator, an operator or a registry
    wrote), leaving enums, dates, the job's folder and the worker's own words (a digest, an
    action's name) as they are. Returns how many."""
    done = 0

    def visit(node: Any, top: bool) -> None:
        nonlocal done
        items = list(node.items()) if isinstance(node, dict) else list(enumerate(node))
        for key, value in items:
            if top and key in ("path", "evidence"):  # where the store finds the job, and keys
                if key == "evidence":
                    for ev in value.values():
                        visit(ev, False)
                continue
            if isinstance(value, dict | list):
                visit(value, False)
                if isinstance(node, dict) and isinstance(key, str) and try_set(node, key, None):
                    done += 1  # the key itself
            elif key in ("script_digest", "action"):
                continue
            elif isinstance(value, str) and try_set(node, key, f"{RLO}{value} 0.51"):
                done += 1

    def try_set(node: Any, key: Any, value: str | None) -> bool:
        """Set node[key] to `value` (None: put RLO into the key itself), unless the record
        would no longer validate."""
        before = dict(node) if isinstance(node, dict) else list(node)
        if value is None:  # the key, in its place
            renamed = {(RLO + k if k == key else k): v for k, v in before.items()}
            node.clear()
            node.update(renamed)
        else:
            node[key] = value
        try:
            AuditRecord.model_validate(record)
        except ValueError:
            node.clear()
            if isinstance(node, dict):
                node.update(before)
            else:
                node.extend(before)
            return False
        return True

    visit(record, True)
    return done


# Every text node that holds a bidi control lies in an isolating element of its own.
NOT_ISOLATED = """() => {
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  const found = [], loose = [];
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    if (!/[\\u202a-\\u202e\\u2066-\\u2069]/.test(node.data)) continue;
    found.push(node.data);
    const around = node.parentElement.closest("bdi, [dir=auto]");
    if (!around || around.textContent !== node.data) loose.push(node.data);
  }
  return [found.length, loose];
}"""


async def test_text_with_bidi_controls_is_isolated_from_the_page_around_it(
    audited: LocalArtifacts, page: Page, tmp_path: Path
) -> None:
    # A site's error text, an operator's note, a URL or a selector name holding U+202E
    # reordered the page around it: `Refund 15.00 to AC-1` could read as an amount of 51.00
    # or another reference. Each such value now sits in a <bdi> of its own.
    store = LocalArtifacts(tmp_path / "artifacts")
    asked = audited.find_audit("ui-ask")
    day = asked.path.split("/")[0]
    shutil.copytree(audited.root / asked.path, store.root / asked.path)
    record = json.loads((store.root / asked.path / "audit.json").read_text())
    report = record["report"]
    handoff = report["handoff"]
    report["decisions"] = [
        {"decision": "retry_step", "step_id": "review", "by": "lead", "at": report["ended_at"],
         "note": "customer agrees", "inputs_changed": ["amount"], "request": handoff},
    ]  # fmt: skip
    report["would_submit"] = {"step_id": "submit", "fields": {"credit.amount": "15.00"},
                              "url": "http://billing.test/review"}  # fmt: skip
    drifted = audited.find_audit("ui-drift").report.steps
    report["steps"][0]["drift"] = next(s.drift for s in drifted if s.drift).model_dump()
    report["correlation"]["ticket"] = "ZD-1"
    assert _overridden(record) > 60
    (store.root / asked.path / "audit.json").write_text(json.dumps(record))
    overridden = store.find_audit(asked.job_id)
    assert overridden.report.error is not None and RLO in overridden.report.error.message

    runner, host, port = await serve_ui(store)
    export = tmp_path / "export.html"
    export.write_text(export_html(store, overridden))
    try:
        for url in (
            f"http://{host}:{port}/",
            f"http://{host}:{port}/jobs/{asked.path}",
            export.as_uri(),
        ):
            await page.goto(url)
            found, loose = await page.evaluate(NOT_ISOLATED)
            assert found > (3 if url.endswith("/") else 40), url
            assert loose == [], url
        # An unreadable record's page says why, the reason isolated as well.
        (store.root / asked.path / "audit.json").write_text(f'{{"job_id": "{RLO}x"')
        await page.goto(f"http://{host}:{port}/jobs/{day}/{asked.path.split('/')[1]}")
        await expect(page.locator("#unreadable")).to_be_visible()
        found, loose = await page.evaluate(NOT_ISOLATED)
        assert loose == []
    finally:
        await runner.cleanup()


async def test_files_are_served_as_their_name_says_never_sniffed(
    ui: str, audited: LocalArtifacts
) -> None:
    # A file the site put in the evidence could be read by a browser as HTML if it looked so.
    record = audited.find_audit("ui-ok")
    key = f"{record.path}/audit.json"
    async with aiohttp.ClientSession() as session, session.get(f"{ui}/files/{key}") as answer:
        assert answer.status == 200
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
        assert answer.headers["Cache-Control"] == "no-store"


async def test_a_job_whose_audit_record_was_never_written_is_listed_from_its_report(
    billing_server: FixtureServer,
    browser_host: BrowserHost,
    page: Page,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The store fails as the job's evidence is drawn (its images/ folder cannot be made): the
    # report is kept, the audit record is not. The job was in no list, its page answered 404,
    # and its export said "no artifact …/audit.json" as if the job id were wrong.
    store, runtime, site = fresh_billing(billing_server, browser_host, tmp_path)
    folder = store.root / datetime.now(UTC).date().isoformat() / "ui-norecord"
    folder.mkdir(parents=True)
    (folder / "images").write_text("not a folder")
    rule = {"field": "amount", "value": "15.00", "message": "Credits over 10.00 need approval"}
    site.faults(reject_value=[rule])
    job = BrowserJob(
        job_id="ui-norecord", script="billing/issue_credit", inputs=CREDIT_INPUTS,
        site_url=site.url, correlation={"ticket": "ZD-lost"},
    )  # fmt: skip
    report = await run_job(job, runtime)
    assert report.status == JobStatus.needs_customer_input
    assert (folder / "report.json").is_file() and not (folder / "audit.json").exists()

    runner, host, port = await serve_ui(store)
    try:
        await page.goto(f"http://{host}:{port}/?q=ZD-lost")
        await shows_jobs(page, "ui-norecord")
        row = page.locator("tr.job-row", has_text="ui-norecord")
        await expect(row.locator(".pill")).to_have_text("needs customer input")
        await expect(row).to_contain_text("no audit record")
        await row.get_by_role("link", name="ui-norecord").click()
        await expect(page.locator("#no-record h2")).to_have_text(
            "No audit record: shown from the job's report"
        )
        await expect(page.locator("#handoff")).to_contain_text("Credits over 10.00 need approval")
        # The failed step's screenshot, as captured, loads.
        failed = page.locator("article.detail:not([hidden])")
        await expect(failed.locator("h2.step-title")).to_contain_text("review")
        shot = failed.locator("img.shot")
        await expect(shot).to_be_visible()
        assert await shot.evaluate("img => img.complete && img.naturalWidth > 0")
        await page.get_by_role("link", name="report.json").click()
        await expect(page.locator("body")).to_contain_text('"job_id": "ui-norecord"')
    finally:
        await runner.cleanup()
        site.reset()

    out = tmp_path / "norecord.html"
    code = main(
        ["audit", "export", "ui-norecord", "--artifacts", str(store.root), "--out", str(out)]
    )
    assert code == 0, capsys.readouterr().err
    exported = out.read_text()
    assert "No audit record: shown from the job" in exported
    assert exported.count("data:image/") >= 1  # the captures, inlined


async def test_a_decided_job_shows_its_decision_waiting_then_its_run_then_its_end(
    billing: Site,
    client: FormworkClient,
    settings: Settings,
    browser_host: BrowserHost,
    page: Page,
) -> None:
    # The UI read audit.json alone, written at the pause and at the end: a job whose decision
    # waited for a worker, and then its run, were listed as still waiting for a person, its
    # request an open question, until the job settled again.
    async with running_worker(settings, browser_host):
        paused = await paused_job(billing, client, "ui-live")
    assert paused.artifacts is not None
    decision = ResumeDecision(decision="retry_with_inputs", inputs={"amount": "9.00"}, by="ops")
    handle = client.handle("ui-live")
    last = await handle.last_event_id()
    assert await client.decide("ui-live", decision) == PauseClaim.claimed  # no worker is up

    store = LocalArtifacts(settings.artifacts_dir)
    queue = FormworkClient(settings.redis_url, key_prefix=settings.key_prefix)
    runner, host, port = await serve_ui(store, live=LiveState(queue, settings.redis_url))
    pill = page.locator("tr.job-row", has_text="ui-live").locator(".pill")
    try:
        await page.goto(f"http://{host}:{port}/")
        await expect(pill).to_have_text("decision sent")
        await page.get_by_role("link", name="ui-live").click()
        await expect(page).to_have_url(re.compile(f"/jobs/{paused.artifacts.path}"))
        await expect(page.locator("#job-status")).to_have_text("decision sent")
        await expect(page.locator("#handoff h2")).to_have_text(
            "Handoff: decision sent, waiting for a worker"
        )
        job_page = f"http://{host}:{port}/jobs/{paused.artifacts.path}"  # no #step: a reload

        billing.faults(latency_ms=1500)  # the resumed run takes seconds: time to look at it
        async with running_worker(settings, browser_host):
            async for _, event in handle.events(after=last):
                if event.kind == EventKind.job and event.status == JobStatus.running:
                    break
            await page.goto(job_page)
            await expect(page.locator("#job-status")).to_have_text("running")
            await expect(page.locator("#handoff h2")).to_have_text(
                "Handoff answered: the job is running"
            )
            await page.goto(f"http://{host}:{port}/")
            await expect(pill).to_have_text("running")
            report = await handle.wait(60, after=last)
        assert report.status == JobStatus.succeeded, report.error
        await page.goto(f"http://{host}:{port}/")
        await expect(pill).to_have_text("succeeded")
        await page.goto(job_page)
        await expect(page.locator("#job-status")).to_have_text("succeeded")
        await expect(page.locator("#handoff")).to_have_count(0)  # answered: in the decisions
        await expect(page.locator("#decisions")).to_contain_text("retry_with_inputs by ops")
    finally:
        await runner.cleanup()
        await queue.close()


async def test_a_queue_that_does_not_answer_is_said_and_the_records_shown_as_they_stood(
    audited: LocalArtifacts, page: Page
) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        url = f"redis://127.0.0.1:{probe.getsockname()[1]}/0"
    queue = FormworkClient(url, timeout_s=2)
    runner, host, port = await serve_ui(audited, live=LiveState(queue, url))
    try:
        await page.goto(f"http://{host}:{port}/")
        await expect(page.locator("#live-unknown")).to_contain_text(
            f"the queue's Redis at {url} did not answer"
        )
        await expect(page.locator("tr.job-row", has_text="ui-ask").locator(".pill")).to_have_text(
            "needs customer input"
        )
    finally:
        await runner.cleanup()
        await queue.close()
